"""Connecting to Ray and fitting work to the cluster (``_internal/cluster.py``)."""

from pathlib import Path

import pytest

from realfake_ray._internal import cluster
from realfake_ray._internal.cluster import actor_pool_kwargs, check_fits_a_node, fit_cpu_pool
from realfake_ray.config import ActorPool, ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_a_cpu_pool_that_would_take_every_cpu_is_shrunk_and_says_so(capsys):
    # 2 actors x 1 CPU on 2 CPUs left nothing for generate's read/write tasks: the stage hung.
    fitted = fit_cpu_pool(ActorPool(min_size=2, max_size=2), 2.0, 0.5, "generate.actors")
    assert (fitted.min_size, fitted.max_size) == (1, 1)
    assert "generate.actors: 2 actors x 1 CPU" in capsys.readouterr().out


def test_a_pool_that_fits_is_unchanged():
    pool = ActorPool(min_size=2, max_size=2, cpus_per_actor=0.75)  # the tiny preset on 2 cores
    assert fit_cpu_pool(pool, 2.0, 0.5, "generate.actors") is pool
    assert fit_cpu_pool(ActorPool(min_size=1, max_size=8), 16.0, 1.0, "encode.actors").max_size == 8
    zero = ActorPool(min_size=4, max_size=4, cpus_per_actor=0)
    assert fit_cpu_pool(zero, 1.0, 1.0, "evaluate.actors") is zero


def test_only_the_upper_end_shrinks_when_the_minimum_fits():
    fitted = fit_cpu_pool(ActorPool(min_size=2, max_size=6), 4.0, 1.0, "generate.actors")
    assert (fitted.min_size, fitted.max_size) == (2, 3)


def test_an_actor_larger_than_the_cluster_is_a_config_error():
    with pytest.raises(ConfigError, match=r"generate.actors.cpus_per_actor=4: the cluster has 2 CPUs"):
        fit_cpu_pool(ActorPool(cpus_per_actor=4), 2.0, 0.5, "generate.actors")


def test_a_gpu_pool_asks_for_all_its_actors_at_once(monkeypatch):
    """No Ray: the node-type check is the only cluster query a GPU pool makes. A GPU pool's initial size is its
    maximum (all its GPU nodes requested together)."""
    monkeypatch.setattr(cluster, "node_types", lambda: None)
    pool = ActorPool(min_size=2, max_size=9, gpus_per_actor=1, cpus_per_actor=4)
    compute = actor_pool_kwargs(pool, "generate.actors")["compute"]
    assert (compute.min_size, compute.initial_size, compute.max_size) == (2, 9, 9)


def test_the_no_ray_guard_catches_data_train_and_tune_work(no_ray):
    import ray.data
    import ray.train.torch
    import ray.tune

    for work in (lambda: ray.data.from_items([1]), lambda: ray.train.torch.TorchTrainer(lambda: None),
                 lambda: ray.tune.Tuner(lambda config: None), lambda: ray.init(), lambda: ray.remote(len),
                 lambda: ray.put(1)):
        with pytest.raises(AssertionError, match="Ray work started"):
            work()


def test_a_test_without_the_e2e_mark_cannot_start_ray():
    """conftest's guard, so that `make test-fast` (-m "not e2e") runs only tests that need no Ray."""
    from realfake_ray._internal.cluster import init_ray

    with pytest.raises(AssertionError, match="mark it @pytest.mark.e2e"):
        init_ray()


@pytest.mark.e2e
def test_a_gpu_request_no_node_of_a_static_cluster_has_is_refused_naming_the_key(ray_cluster):
    """The session's cluster is CPU-only: a pool of 1-GPU actors would wait forever."""
    with pytest.raises(ConfigError, match=r"generate.actors.gpus_per_actor: one actor needs \{CPU: 1, GPU: 1\} but no "
                                          r"node type of this cluster has that much \(node [^:]+: \{CPU: 4\}\)"):
        check_fits_a_node({"GPU": 1, "CPU": 1}, "generate.actors.gpus_per_actor")
    check_fits_a_node({"CPU": 1}, "generate.actors.gpus_per_actor")  # CPU pools are fitted, not refused


def _autoscaler_v2_config(*groups):
    from ray.core.generated import autoscaler_pb2

    config = autoscaler_pb2.ClusterConfig()
    for name, resources, max_count in groups:
        group = config.node_group_configs.add(name=name, max_count=max_count)
        group.resources.update(resources)
    return config


@pytest.mark.e2e
def test_node_types_of_an_autoscaler_v2_decide_before_any_node_exists(ray_cluster, monkeypatch):
    from ray._private.state import state

    config = _autoscaler_v2_config(("head", {"CPU": 0}, 1), ("gpu_worker", {"CPU": 8, "GPU": 1}, 3),
                                   ("big_gpu", {"CPU": 8, "GPU": 8}, 0))  # max_count 0: never launched
    monkeypatch.setattr(state, "get_cluster_config", lambda: config)
    check_fits_a_node({"GPU": 1, "CPU": 1}, "generate.actors.gpus_per_actor")  # no GPU node now, but one can come
    with pytest.raises(ConfigError, match=r"finetune.use_gpu: one worker needs \{CPU: 1, GPU: 2\} .*gpu_worker: \{CPU: 8, GPU: 1\}"):
        check_fits_a_node({"GPU": 2, "CPU": 1}, "finetune.use_gpu")


@pytest.mark.e2e
def test_a_v1_autoscaler_is_left_to_judge(ray_cluster, monkeypatch):
    """Ray's v1 autoscaler does not publish its node types: never refuse what it may launch."""
    import json

    import ray.experimental.internal_kv as kv
    from ray._private.state import state

    from realfake_ray._internal import cluster

    monkeypatch.setattr(state, "get_cluster_config", lambda: None)
    monkeypatch.setattr(cluster, "_started_here", False)  # a cluster this process joined, not started
    report = {"autoscaler_report": {"node_type_mapping": {"ab12": "ray.head.default", "cd34": "gpu_worker"}}}
    monkeypatch.setattr(kv, "_internal_kv_get", lambda key, *a, **k: json.dumps(report).encode())
    check_fits_a_node({"GPU": 8}, "generate.actors.gpus_per_actor")


@pytest.mark.e2e
@pytest.mark.system
def test_no_address_starts_a_new_local_cluster_even_after_a_head_died_without_ray_stop():
    """Ray's own discovery reads the last `ray start` address from its temp directory; a run given no
    address must not attach to (or wait on) that dead head."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    temp = Path(tempfile.mkdtemp(prefix="rt-"))  # short: Ray's socket paths live below it
    (temp / "ray").mkdir(parents=True)
    (temp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9")  # a head that is gone
    script = ("import ray; from realfake_ray._internal.cluster import init_ray; from realfake_ray.config import RayConfig; "
              "init_ray(RayConfig(num_cpus=1)); print('GCS', ray.get_runtime_context().gcs_address); ray.shutdown()")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(temp)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    gcs = [line for line in result.stdout.splitlines() if line.startswith("GCS ")]
    assert gcs and not gcs[0].endswith(":9"), result.stdout
    shutil.rmtree(temp, ignore_errors=True)


_LISTENERS_SCRIPT = """
import json, os, urllib.error, urllib.request
import psutil, ray
from realfake_ray._internal.cluster import init_ray, state_api_address
from realfake_ray.config import RayConfig
init_ray(RayConfig(num_cpus=1))
ray.get(ray.remote(lambda: 1).remote())  # a worker process too
cluster = {os.getpid()} | {p.pid for p in psutil.Process().children(recursive=True)}
listening = [(c.laddr.ip, c.laddr.port, psutil.Process(c.pid).name()) for c in psutil.net_connections("tcp")
             if c.status == psutil.CONN_LISTEN and c.pid in cluster]
try:
    dashboard = urllib.request.urlopen(state_api_address() + "/api/jobs/", timeout=10).status
except urllib.error.HTTPError as exc:
    dashboard = exc.code
print("RESULT", json.dumps({"listening": listening, "dashboard_without_token": dashboard}))
ray.shutdown()
"""


@pytest.mark.e2e
def test_a_local_run_listens_on_loopback_only_and_its_job_api_wants_the_token():
    """`ss -ltnp` during a local run: every socket of every process of the cluster (GCS, raylet, agents,
    dashboard, workers, the driver) is bound to 127.0.0.1; the job API refuses a client without the token."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    result = subprocess.run([sys.executable, "-c", _LISTENERS_SCRIPT], env=env, capture_output=True, text=True, timeout=180)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    found = json.loads(lines[0][len("RESULT "):])
    names = {name for _, _, name in found["listening"]}
    assert {"gcs_server", "raylet"} <= names, found  # the probe sees the cluster's processes
    exposed = [item for item in found["listening"] if not item[0].removeprefix("::ffff:").startswith("127.")]
    assert exposed == [], f"listening beyond loopback: {exposed}"
    assert found["dashboard_without_token"] == 401


_NEWER_CLUSTER = """
import sys
from ray.cluster_utils import Cluster
from realfake_ray._internal.addresses import free_port
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True,
                                                        "dashboard_port": free_port()})
print("READY", flush=True)
sys.stdin.read()  # until the test closes it
cluster.shutdown()
"""


@pytest.mark.e2e
@pytest.mark.system
def test_state_api_calls_reach_this_cluster_while_a_newer_one_runs(ray_cluster):
    """Ray's State API finds "the" cluster by discovery: the newest one on the machine. With another cluster
    started after ours, Ray Train's placement-group cleaner looked its controller up there, found nothing
    and removed the live run's placement group (seen: a benchmark's fine-tune died when a test cluster
    started). Our workers must ask their own cluster, and so must the driver's own State API calls
    (``state_api_address``) — without leaving the address in its environment for processes it starts."""
    import os
    import subprocess
    import sys

    from ray.util.state import get_actor

    from realfake_ray._internal.cluster import state_api_address

    @ray_cluster.remote(num_cpus=0)
    class Marker:
        def ready(self) -> bool:
            return True

    @ray_cluster.remote(num_cpus=0)
    def state_of(actor_id: str) -> str | None:
        from ray.util.state import get_actor

        found = get_actor(actor_id, timeout=10)
        return found.state if found else None

    marker = Marker.remote()
    ray_cluster.get(marker.ready.remote())
    actor_id = marker._actor_id.hex()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    newer = subprocess.Popen([sys.executable, "-c", _NEWER_CLUSTER], env={**env, "PYTHONPATH": str(REPO)},
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert newer.stdout.readline().strip() == "READY"
        assert ray_cluster.get(state_of.remote(actor_id)) == "ALIVE"  # a worker's State API call
        assert get_actor(actor_id, timeout=10, address=state_api_address()).state == "ALIVE"  # the driver's
        assert "RAY_API_SERVER_ADDRESS" not in os.environ  # a cluster this process starts must not inherit it
    finally:
        newer.communicate("", timeout=120)


_WAIT_FOR_SCALE_DOWN = """
import sys, time, ray
ray.init(address=sys.argv[1], logging_level="WARNING")
deadline = time.time() + float(sys.argv[2])
while time.time() < deadline:
    alive = sum(1 for n in ray.nodes() if n["Alive"])
    if alive == 1:
        break
    time.sleep(1)
print("ALIVE", alive)
"""


@pytest.mark.e2e
@pytest.mark.cluster_sim
def test_generate_on_an_autoscaling_cluster_grows_its_pool_as_gpu_nodes_join_and_idle_nodes_go(tiny_bank, tmp_path):
    """A head without CPUs and a 1-GPU worker type from 0 to 3 nodes (Ray's autoscaler, fake nodes): the
    generate stage asks for its 1-GPU actors, the autoscaler launches nodes, the pool's live actors grow
    as the nodes join, the stage completes, and the idle nodes are terminated afterwards. The actors run
    on CPU (the nodes advertise a GPU that torch cannot see): ``devices.torch_device``."""
    import os
    import shutil
    import subprocess
    import sys

    from realfake_ray import storage
    from realfake_ray._internal.fake_autoscaler import FakeAutoscalingCluster

    out = tmp_path / "run"
    shutil.copytree(os.path.join(tiny_bank, "latents"), out / "latents")  # the embedded digits, encoded once
    cluster = FakeAutoscalingCluster({"gpu_worker": {"resources": {"CPU": 1, "GPU": 1}, "min_workers": 0,
                                                     "max_workers": 3}})
    cluster.start()
    try:
        env = {**os.environ, **cluster.env, "RAY_ADDRESS": cluster.address}
        cmd = [sys.executable, "jobs/scale_in1k.py", "--only", "generate", "--preset", "tiny", "--out", str(out), "--mult", "1",
               "--set", "generate.use_lora=false",
               "--set", "generate.actors.gpus_per_actor=1", "--set", "generate.actors.cpus_per_actor=0.5",
               "--set", "generate.actors.min_size=1", "--set", "generate.actors.max_size=3"]
        job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        summary = storage.read_json(str(out / "synthetic" / "_summary.json"))
        assert summary["complete"] and summary["count"] == 1437 and summary["gpus_per_actor"] == 1
        timeline = summary["timeline"]
        assert timeline[0]["nodes"] <= 2, timeline  # the head (+ at most the node the first actor asked for)
        assert max(p["nodes"] for p in timeline) >= 3 and max(p["actors"] for p in timeline) >= 2, timeline
        assert "![nodes, actors and images/s while generating](synthesis_timeline.png)" in (out / "report.md").read_text()
        assert (out / "synthesis_timeline.png").stat().st_size > 0
        waited = subprocess.run([sys.executable, "-c", _WAIT_FOR_SCALE_DOWN, cluster.address, "120"], env=env,
                                capture_output=True, text=True, timeout=300)
        assert "ALIVE 1" in waited.stdout, waited.stdout + waited.stderr[-2000:]
    finally:
        cluster.shutdown()


def test_free_port_takes_the_preferred_port_only_when_nothing_holds_it():
    import socket

    from realfake_ray._internal.addresses import free_port

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        assert free_port(preferred=taken) != taken
    assert free_port(preferred=taken) == taken  # released


def test_attached_workers_find_their_clusters_state_api_through_the_given_address(monkeypatch):
    """Attached to a GCS address (``ray job submit``, the kill tests' drivers), the job's workers get it as
    RAY_ADDRESS: without it, Ray Train's placement-group cleaner asked whichever cluster discovery found."""
    import ray

    from realfake_ray._internal import cluster
    from realfake_ray.config import RayConfig

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for address in ("10.0.0.5:6379", "auto", "ray://head:10001"):
        cluster.init_ray(RayConfig(address=address))
    sent = [call["runtime_env"]["env_vars"].get("RAY_ADDRESS") for call in calls]
    assert sent == ["10.0.0.5:6379", None, None]  # discovery and Ray Client addresses are not GCS addresses


def test_ray_data_shows_its_progress_bar_on_a_terminal_and_its_operator_bars_only_when_verbose(monkeypatch):
    import io
    import logging

    import ray.data

    from realfake_ray._internal.cluster import quiet_data

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    ctx = ray.data.DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.enable_operator_progress_bars, ctx.print_on_execution_start)
    monkeypatch.setattr(ctx, "enable_auto_log_stats", ctx.enable_auto_log_stats)
    logger = logging.getLogger("ray.data")
    monkeypatch.setattr(logger, "level", logger.level)
    try:
        for stdout, verbose, expected in ((io.StringIO(), False, (False, False)), (Terminal(), False, (True, False)),
                                          (io.StringIO(), True, (True, True))):
            monkeypatch.setattr("sys.stdout", stdout)
            quiet_data(verbose)
            assert (ctx.enable_progress_bars, ctx.enable_operator_progress_bars) == expected
    finally:
        ctx.enable_progress_bars, ctx.enable_operator_progress_bars, ctx.print_on_execution_start = saved
