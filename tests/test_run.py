"""The main job: stage selection, the report, and `ray job submit` against a local head (127.0.0.1)."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from helpers import forbid_ray_work

from realfake_ray import storage
from realfake_ray.stages import pipeline as run
from realfake_ray._internal.addresses import free_port
from realfake_ray.data.synthetic import list_shards
from realfake_ray.cli import main as cli_main
from realfake_ray.config import ConfigError, load_config
from realfake_ray.tools.report import gpu_hours_estimate
from realfake_ray.stages.pipeline import select_stages
from realfake_ray.stages.registry import COMMANDS, PIPELINE

REPO = Path(__file__).resolve().parents[1]


def test_stage_selection():
    assert select_stages() == ["caption", "encode", "finetune", "generate", "train", "evaluate"] == list(PIPELINE)
    assert select_stages(cfg=load_config(preset="tiny"))[0] == "encode"  # captioning off: caption left out
    assert select_stages(from_stage="train") == ["train", "evaluate"]
    assert select_stages(only=["train", "generate"]) == ["generate", "train"]
    with pytest.raises(ConfigError, match="unknown stage 'gen'"):
        select_stages(only=["gen"])


@pytest.mark.parametrize("together", [False, True])
def test_train_stage_adds_a_real_only_baseline(monkeypatch, tmp_path, together):
    trained, threads = [], set()

    def fake_run_train(cfg):
        trained.append(cfg.train)
        threads.add(threading.current_thread().name)
        return {"skipped": cfg.train.tag == "real"}

    monkeypatch.setattr(run, "run_train", fake_run_train)
    monkeypatch.setattr(run, "is_complete", lambda cfg: False)
    monkeypatch.setattr(run, "side_by_side", lambda cfg: together)
    cfg = load_config(preset="tiny", out=str(tmp_path))  # the tiny preset turns train.real_baseline on
    result = run.train_with_baseline(cfg)
    assert sorted((t.source, str(t.tag)) for t in trained) == [("real", "real"), (cfg.train.source, str(cfg.train.tag))]
    assert [t for t in trained if t.tag == "real"][0].synthetic_mult is None and result["real_baseline"] == {"skipped": True}
    assert result["skipped"] is False  # skipped only when both classifiers were
    assert (threading.current_thread().name in threads) is not together  # side by side: in two threads of their own
    for override in ("train.real_baseline=false", "train.source=real"):
        trained.clear()
        assert "real_baseline" not in run.train_with_baseline(load_config(preset="tiny", out=str(tmp_path),
                                                                          overrides=[override]))
        assert len(trained) == 1


def test_two_classifiers_train_side_by_side_only_when_the_cluster_holds_both(monkeypatch):
    import ray

    monkeypatch.setattr(run, "init_ray", lambda cfg: None)
    cluster = {"CPU": 2.0}
    monkeypatch.setattr(ray, "cluster_resources", lambda: cluster)
    assert not run.side_by_side(load_config(preset="tiny"))  # 1 CPU per worker and per decode task: 4 for both
    assert run.side_by_side(load_config(preset="tiny", overrides=["train.worker_cpus=0.5", "train.decode_cpus=0.5"]))
    cluster.update(CPU=64.0, GPU=1.0)  # one GPU: the two would queue for it
    assert not run.side_by_side(load_config(overrides=["train.num_workers=1"]))
    cluster.update(GPU=2.0)
    assert run.side_by_side(load_config(overrides=["train.num_workers=1"]))
    assert not run.side_by_side(load_config(overrides=["train.num_workers=2"]))


def test_imagenet_estimate_uses_the_reference_flops():
    est = gpu_hours_estimate(load_config(overrides=["generate.mult=10"]))
    flops = est["flop_model"]
    assert est["images"] == 12_811_670 and est["measured"] is None
    assert abs(flops["tflop_per_image"] - (22 * 1.61 + 2.5)) < 0.1 and flops["paper_tflop_per_image"] == flops["tflop_per_image"]
    # 12.8 M images × 37.9 TFLOP / (989 TFLOP/s × 0.4) ≈ 341 GPU-hours
    assert 300 < flops["h100_gpu_hours"] < 380 and flops["paper_h100_gpu_hours"] == flops["h100_gpu_hours"]
    fewer_steps = gpu_hours_estimate(load_config(overrides=["generate.mult=10", "generate.steps=10"]))["flop_model"]
    assert fewer_steps["h100_gpu_hours"] < flops["h100_gpu_hours"] == fewer_steps["paper_h100_gpu_hours"]


def test_imagenet_estimate_from_a_measured_gpu_run():
    gpu_run = {"sampler_images_per_s": 10.0, "gpus_per_actor": 1.0}
    est = gpu_hours_estimate(load_config(overrides=["generate.mult=1"]), gpu_run)
    assert est["measured"]["gpu_hours"] == round(1_281_167 / 10.0 / 3600, 1)
    assert gpu_hours_estimate(load_config(preset="tiny"), gpu_run)["measured"] is None  # tiny model: not SD v1.5
    assert gpu_hours_estimate(load_config(), {**gpu_run, "gpus_per_actor": 0.0})["measured"] is None  # CPU run


@pytest.fixture(scope="module")
def local_head(s3_server):
    """A Ray head started with `ray start --head` on 127.0.0.1 (token auth on); yields (address, env).
    Its processes reach the session's S3 server (they inherit the endpoint and credentials)."""
    bin_dir = os.path.dirname(sys.executable)
    env = dict(
        os.environ,
        **s3_server.env,
        PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        RAY_USAGE_STATS_ENABLED="0",
    )
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="rh-")
    dash = free_port()
    ports = {
        "--port": free_port(), "--dashboard-port": dash, "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(), "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(), "--ray-client-server-port": free_port(),
    }
    cmd = [os.path.join(bin_dir, "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=4", f"--temp-dir={temp_dir}",
           "--disable-usage-stats", *(f"{k}={v}" for k, v in ports.items())]
    head = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 180
    while True:  # the job agent comes up some seconds after the head
        probe = subprocess.run([os.path.join(bin_dir, "ray"), "job", "list", "--address", address],
                               env=env, capture_output=True, text=True)
        if probe.returncode == 0 or time.time() > deadline:
            break
        time.sleep(2)
    try:
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(5)  # nothing of the head is needed any more: do not wait for a graceful shutdown
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(address: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    """`ray job submit` the main job, retrying only while the job agent is not ready yet."""
    cmd = [os.path.join(os.path.dirname(sys.executable), "ray"), "job", "submit", "--address", address,
           "--working-dir", str(REPO), "--", "python", "jobs/scale_in1k.py", *args]
    for _ in range(30):
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
        if "No available agent" not in result.stdout + result.stderr:
            return result
        time.sleep(3)
    return result


def _small_dataset(root: str) -> tuple[str, str]:
    """3 digit classes × 12 train / 4 val images copied from the embedded dataset to ``root`` (any URL)."""
    for split, count in (("train", 12), ("val", 4)):
        for cls in ("digit_1", "digit_3", "digit_7"):
            for url in storage.find(f"embedded:digits/{split}/{cls}")[:count]:
                storage.write_bytes(storage.join(root, split, cls, url.rsplit("/", 1)[-1]), storage.read_bytes(url))
    return storage.join(root, "train"), storage.join(root, "val")


@pytest.mark.e2e
@pytest.mark.system
def test_ray_job_submit_runs_resumes_and_skips_on_object_storage(local_head, s3_bucket, capsys):
    """The tiny job submitted to a cluster, reading its data from and writing its run to S3 (a local
    S3-compatible server, the real s3fs client): killed mid-generate, resubmitted, then run once more."""
    address, env = local_head
    no_token = {k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    refused = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "job", "list", "--address", address],
                             env=no_token, capture_output=True, text=True)
    assert refused.returncode != 0, "the head's job API answered a client without the token"
    train, val = _small_dataset(f"{s3_bucket}/data")
    out = f"{s3_bucket}/run"
    args = ["--preset", "tiny", "--mult", "2", "--out", out, "--data", train, "--val-data", val,
            "--set", "data.classes_file=embedded:digits/classes.json",
            "--set", "finetune.max_steps=2", "--set", "finetune.checkpoint_every=1", "--set", "finetune.num_workers=1",
            "--set", "generate.actors.min_size=1", "--set", "generate.actors.max_size=1",
            "--set", "generate.steps=4", "--set", "train.epochs=1", "--set", "train.batch_size=16",
            "--set", "train.real_baseline=false",  # the real-only baseline: test_train_stage_adds_a_real_only_baseline
            "--set", "evaluate.max_samples=50"]
    # 1) Up to generate; then simulate a generate stage killed mid-way (lose a shard + the summary).
    first = _submit(address, env, *args, "--only", "encode,finetune,generate")
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
    shards = list_shards(f"{out}/synthetic/data")
    assert shards.urls and shards.images == 2 * 36
    storage.remove(shards.urls[0])  # the state a kill before its upload completed leaves
    storage.remove(f"{out}/synthetic/_summary.json")

    # 2) Resubmit the whole job: encode + finetune skip, generate redoes only the lost rows, train/evaluate run.
    second = _submit(address, env, *args)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-2000:]
    stages = storage.read_json(f"{out}/report.json")["stages"]
    assert stages["encode"].get("skipped_last_run") and stages["finetune"].get("skipped_last_run")
    assert not stages["generate"]["skipped"] and not stages["train"]["skipped"]
    summary = storage.read_json(f"{out}/synthetic/_summary.json")
    assert summary["count"] == 2 * 36 and summary["generated_now"] == shards.rows[0] and summary["shards_written_now"] == 1
    report_md = storage.read_text(f"{out}/report.md")
    ran = [stage for stage in PIPELINE if stage != "caption"]  # the tiny preset captions nothing: no caption stage
    for section in ("## Stages", *(f"## {COMMANDS[stage].report}" for stage in ran), "## Throughput",
                    "GPU-hours", "## Resolved config"):
        assert section in report_md
    assert f"## {COMMANDS['caption'].report}" not in report_md
    report = storage.read_json(f"{out}/report.json")
    assert report["latent_bank"]["splits"]["train"]["rows"] == 36 and report["config"]["generate"]["mult"] == 2
    assert {r["set"] for r in report["accuracy"]} == {"val"}
    assert [r["synthetic_images"] for r in report["accuracy"]] == [72]
    assert {r["stage"] for r in report["throughput"]} >= {"encode", "finetune", "generate", "train (default)"}
    assert report["distribution"][0]["mmd2"] is not None
    for picture in ("samples.png", "finetune/loss.png", "classifier/curves.png"):
        assert storage.exists(f"{out}/{picture}") and picture in report_md
    metrics_before = storage.read_text(f"{out}/classifier/metrics.json")

    # 3) Run the same job again (here, in-process): every stage skipped, same results, and no Ray work at all.
    with pytest.MonkeyPatch.context() as mp:
        forbid_ray_work(mp)
        assert cli_main(["run", *args]) == 0
    printed = capsys.readouterr().out
    for stage in ran:
        assert f"stage {stage}: skipped" in printed, printed[-3000:]
    assert "stage caption" not in printed
    assert storage.read_text(f"{out}/classifier/metrics.json") == metrics_before


def test_typo_and_impossible_value_rejected_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    typo = subprocess.run(  # the job script as Ray runs it
        [sys.executable, "jobs/scale_in1k.py", "--preset", "tiny", "--out", str(out), "--set", "generate.strenght=0.5"],
        capture_output=True, text=True, cwd=REPO,
    )
    assert typo.returncode == 2 and "generate.strenght" in typo.stderr
    with pytest.MonkeyPatch.context() as mp:  # the same entry point in-process: no Ray either
        forbid_ray_work(mp)
        assert cli_main(["run", "--preset", "tiny", "--out", str(out), "--set", "generate.mult=0"]) == 2
    assert "generate.mult" in capsys.readouterr().err
    assert not out.exists()  # nothing written, no Ray started
