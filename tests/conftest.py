"""Shared fixtures: an isolated model/dataset cache and one local Ray cluster per test session."""

from __future__ import annotations

import os
import sys
import tempfile

import pytest

# Before anything imports Ray or builds a preset: every process of this session shares this cache.
os.environ.setdefault("REALFAKE_CACHE", tempfile.mkdtemp(prefix="realfake-cache-"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Ray Train's controller polls its workers every 2 s, so each fit ends up to 2 s after its workers did (a
# trivial 1-worker fit: 12 s → 7-8 s here); the suite runs ~20 fits. Its preemption watcher (an extra actor
# process per fit) guards against spot-instance reclaims, which a test cluster never has.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


@pytest.fixture(scope="session")
def pyproject() -> dict:
    """The repository's parsed ``pyproject.toml``."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    with open(os.path.join(os.path.dirname(__file__), os.pardir, "pyproject.toml"), "rb") as fh:
        return tomllib.load(fh)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster (127.0.0.1) shared by every test that needs Ray."""
    import ray

    from realfake_ray._internal.cluster import init_ray
    from realfake_ray.config import RayConfig

    init_ray(RayConfig(num_cpus=4))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    """The tiny preset materialised in the session cache."""
    from realfake_ray.models.loading import resolve_model_dir

    return resolve_model_dir("preset:tiny")


@pytest.fixture(scope="session")
def tiny_bank(ray_cluster, tmp_path_factory) -> str:
    """A run directory whose latent bank holds the embedded digits (train + val), encoded once."""
    from realfake_ray.config import load_config
    from realfake_ray.stages.encode.driver import run_encode

    out = str(tmp_path_factory.mktemp("bank"))
    run_encode(load_config(preset="tiny", out=out))
    return out


def small_bank(tiny_bank: str, out, per_class: int) -> list[str]:
    """Make ``out`` a run whose latent bank is ``tiny_bank``'s train split cut to the first ``per_class``
    images of each digit, without encoding again; returns their image ids."""
    import numpy as np

    from realfake_ray._internal.shards import read_parts
    from realfake_ray.bank import write_train_subset
    from realfake_ray.layout import RunLayout

    train = read_parts(RunLayout(tiny_bank).bank_dir("train"))
    by_class: dict[str, list[str]] = {}
    for image_id in sorted(train["image_id"].to_pylist()):
        by_class.setdefault(image_id.split("/")[0], []).append(image_id)
    keep = {i for ids in by_class.values() for i in ids[:per_class]}
    write_train_subset(tiny_bank, str(out), train, np.array([i in keep for i in train["image_id"].to_pylist()]))
    return sorted(keep)


def forbid_ray_work(mp: pytest.MonkeyPatch) -> None:
    """Make any Ray work fail the test — starting or joining a cluster, a task or actor, an object put or
    get, a Ray Data dataset, a Ray Train trainer or a Ray Tune tuner (even on the session's running
    cluster): bad input is reported, and a complete stage returns its stored result, before any Ray work."""
    import ray
    import ray.data
    import ray.train.torch
    import ray.tune

    def boom(*_args, **_kwargs):
        raise AssertionError("Ray work started (expected: an error before any work, or the stored result)")

    for name, module in list(sys.modules.items()):  # every module that imported init_ray by name
        if name.startswith("realfake_ray") and getattr(module, "init_ray", None) is not None:
            mp.setattr(module, "init_ray", boom)
    for name in ("init", "remote", "put", "get"):
        mp.setattr(ray, name, boom)
    mp.setattr(ray.data.Dataset, "__init__", boom)
    mp.setattr(ray.train.torch.TorchTrainer, "__init__", boom)
    mp.setattr(ray.tune.Tuner, "__init__", boom)


@pytest.fixture
def no_ray(monkeypatch):
    """Fail loudly if the test reaches Ray (see :func:`forbid_ray_work`)."""
    forbid_ray_work(monkeypatch)


def run_until_fault(cmd: list[str], env: dict, fault: str, timeout: float = 300) -> None:
    """Run a stage's job script with ``REALFAKE_FAULT=fault`` (see ``realfake_ray._internal.faults``): its
    driver must die by SIGKILL at that point. Then wait until Ray has reaped every worker of the dead job,
    so that nothing of it still writes while the test resumes the run."""
    reap_killed(start_with_fault(cmd, env, fault), fault, timeout)


def start_with_fault(cmd: list[str], env: dict, fault: str):
    """Start a stage's job script with ``REALFAKE_FAULT=fault``; returns its ``subprocess.Popen`` (its output
    goes to a temporary file, so a test may wait on something else without the job blocking on a full pipe)."""
    import subprocess

    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, env={**env, "REALFAKE_FAULT": fault}, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc


def reap_killed(proc, fault: str, timeout: float = 300) -> None:
    """Wait for ``proc`` (from :func:`start_with_fault`) to die by SIGKILL, then until Ray has reaped every
    worker of its job."""
    import signal
    import time

    from ray.util.state import list_actors, list_jobs, list_tasks

    from realfake_ray._internal.cluster import state_api_address

    here = {"address": state_api_address()}  # this session's cluster, whatever else runs on the machine
    proc.wait(timeout=timeout)
    proc.log.seek(0)
    output = proc.log.read()
    assert proc.returncode == -signal.SIGKILL, (
        f"expected the driver to be killed at {fault}, got exit code {proc.returncode}:\n{output[-4000:]}"
    )
    deadline = time.time() + 120
    while True:
        jobs = [j for j in list_jobs(**here) if j.driver_info and str(j.driver_info.pid) == str(proc.pid)]
        busy = []
        for job in jobs:
            busy += [a.class_name for a in list_actors(filters=[("job_id", "=", job.job_id), ("state", "!=", "DEAD")],
                                                        **here)]
            busy += [t.name for t in list_tasks(filters=[("job_id", "=", job.job_id), ("state", "=", "RUNNING")],
                                                limit=10000, raise_on_missing_output=False, **here)]
        if jobs and all(j.status not in ("PENDING", "RUNNING") for j in jobs) and not busy:
            return
        assert time.time() < deadline, f"the killed job still runs after 120 s: {busy}"
        time.sleep(0.5)


def run_with_node_loss(stage: str, out: str, overrides: list[str], at: int, workers: int = 2,
                       fault: str | None = None) -> dict:
    """``tests/node_loss.py``: ``stage`` on its own cluster (a head and ``workers`` 1-CPU nodes), the node
    hosting the stage's actor removed once it reaches ``at``; returns the script's RESULT record."""
    import json
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "REALFAKE_FAULT")}
    env |= {"PYTHONPATH": os.path.dirname(here), **({"REALFAKE_FAULT": fault} if fault else {})}
    result = subprocess.run([sys.executable, os.path.join(here, "node_loss.py"), stage, out, json.dumps(overrides),
                             str(at), str(workers)], env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stdout[-3000:] + result.stderr[-3000:]
    found = json.loads(lines[0][len("RESULT "):])
    assert found["removed"].get("node"), f"no node hosting the stage's actor was removed: {found}"
    assert found["alive"] == workers, found  # the head and all but one worker remain
    return found


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One local S3 server per session; this process's s3fs clients point at it while it runs."""
    from realfake_ray._internal.local_s3 import LocalS3

    server = LocalS3(str(tmp_path_factory.mktemp("s3") / "requests.log"))
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    yield server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request) -> str:
    """A fresh bucket on the session's S3 server, as ``s3://<name>``."""
    import re
    import uuid

    import fsspec

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir(name)
    return f"s3://{name}"
