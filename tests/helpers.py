"""Helpers the tests share (plain functions; the fixtures live in ``conftest.py``). Test modules import them
as ``from helpers import ...`` (``tests/`` is on pytest's ``pythonpath``)."""

from __future__ import annotations

import ast
import functools
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from realfake_ray import storage
from realfake_ray._internal.shards import read_parts
from realfake_ray.bank import write_train_subset
from realfake_ray.data.imagefolder import stem
from realfake_ray.data.sources import open_labelled_set
from realfake_ray.data.synthetic import shard_bytes, shard_name, shard_table
from realfake_ray.layout import RunLayout

__all__ = ["declared_api", "small_bank", "fabricate_synthetic", "forbid_ray_work", "PlanRecorder", "record_plan",
           "run_until_fault", "start_with_fault", "reap_killed", "run_with_node_loss", "mlflow_runs", "mlflow_points",
           "tensorboard_points"]

TESTS = Path(__file__).resolve().parent


@functools.cache
def declared_api(path: Path) -> set[str] | None:
    """The names in a module's literal ``__all__``, read without importing it (None: it declares none)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return None


def small_bank(tiny_bank: str, out, per_class: int) -> list[str]:
    """Make ``out`` a run whose latent bank is ``tiny_bank``'s train split cut to the first ``per_class``
    images of each digit, without encoding again; returns their image ids."""
    train = read_parts(RunLayout(tiny_bank).bank_dir("train"))
    by_class: dict[str, list[str]] = {}
    for image_id in sorted(train["image_id"].to_pylist()):
        by_class.setdefault(image_id.split("/")[0], []).append(image_id)
    keep = {i for ids in by_class.values() for i in ids[:per_class]}
    write_train_subset(tiny_bank, str(out), train, np.array([i in keep for i in train["image_id"].to_pylist()]))
    return sorted(keep)


def fabricate_synthetic(out: str, copies: int = 1, per_class: int | None = None, layout: str = "shards",
                        source: str = "embedded:digits/train", class_dir_of=None) -> int:
    """Write a synthetic set of real images re-saved as JPEG copies: generate's shards (one per copy) below
    ``<out>/synthetic/data``, or (``layout="folders"``) an exported ImageFolder
    ``<out>/synthetic/train/<safe class dir>/<stem>__c<copy>.jpg``. Returns the image count."""
    real = open_labelled_set(source)
    taken, picked = {}, []
    for image_id, url, label in zip(*(real.items[c].to_pylist() for c in ("image_id", "url", "label"))):
        taken[label] = taken.get(label, 0) + 1
        if per_class is None or taken[label] <= per_class:
            picked.append((image_id, url, label))
    class_dirs = [class_dir_of(d) if class_dir_of else d for d in real.class_dirs]
    count = 0
    for c in range(copies):
        jpegs, paths = [], []
        for image_id, url, label in picked:
            buffer = io.BytesIO()
            Image.open(io.BytesIO(storage.read_bytes(url))).convert("RGB").save(buffer, format="JPEG", quality=92 - 4 * c)
            jpegs.append(buffer.getvalue())
            paths.append(f"{storage.safe_name(class_dirs[label])}/{stem(image_id)}__c{c}.jpg")
        if layout == "folders":
            for path, data in zip(paths, jpegs):
                storage.write_bytes(os.path.join(out, "synthetic", "train", path), data)
        else:
            n = len(picked)
            provenance = {"image_id": [p[0] for p in picked], "class_dir": [class_dirs[p[2]] for p in picked],
                          "copy_idx": [c] * n, "seed": list(range(n)), "prompt": ["photo of a digit"] * n}
            table = shard_table(jpegs, paths, [p[2] for p in picked], provenance, {"mode": "img2img"}, class_dirs)
            name = shard_name(c, "part-" + "0" * 32, 0, n)
            storage.write_bytes(os.path.join(out, "synthetic", "data", name), shard_bytes(table))
        count += len(picked)
    return count


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


class PlanRecorder:
    """Stands in for a Ray Data dataset: records each ``map_batches`` step (function name and keyword arguments)."""

    def __init__(self):
        self.steps: list[tuple[str, dict]] = []

    def map_batches(self, fn, **kwargs):
        self.steps.append((getattr(fn, "__name__", str(fn)), kwargs))
        return self

    def pools(self) -> dict:
        """The actor pools of the recorded steps: ``{callable class name: ActorPoolStrategy}``."""
        return {name: kwargs["compute"] for name, kwargs in self.steps if "compute" in kwargs}


def record_plan(mp: pytest.MonkeyPatch) -> PlanRecorder:
    """Make ``ray.data.from_arrow`` return a :class:`PlanRecorder` and GPU pools plan without a cluster (the
    node-type check is the only cluster query a GPU pool makes): a pipeline builder's steps, with no Ray."""
    import ray.data

    from realfake_ray._internal import cluster

    recorder = PlanRecorder()
    mp.setattr(ray.data, "from_arrow", lambda *a, **k: recorder)
    mp.setattr(cluster, "node_types", lambda: None)
    return recorder


def run_until_fault(cmd: list[str], env: dict, fault: str, timeout: float = 300) -> None:
    """Run a stage's job script with ``REALFAKE_FAULT=fault`` (see ``realfake_ray._internal.faults``): its
    driver must die by SIGKILL at that point. Then wait until Ray has reaped every worker of the dead job,
    so that nothing of it still writes while the test resumes the run."""
    reap_killed(start_with_fault(cmd, env, fault), fault, timeout)


def start_with_fault(cmd: list[str], env: dict, fault: str) -> subprocess.Popen:
    """Start a stage's job script with ``REALFAKE_FAULT=fault``; its output goes to a temporary file (``.log``),
    so that a test may wait on something else without the job blocking on a full pipe."""
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, env={**env, "REALFAKE_FAULT": fault}, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc


def reap_killed(proc: subprocess.Popen, fault: str, timeout: float = 300) -> None:
    """Wait for ``proc`` (from :func:`start_with_fault`) to die by SIGKILL, then until Ray has reaped every
    worker of its job."""
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
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "REALFAKE_FAULT")}
    env |= {"PYTHONPATH": str(TESTS.parent), **({"REALFAKE_FAULT": fault} if fault else {})}
    result = subprocess.run([sys.executable, str(TESTS / "node_loss.py"), stage, out, json.dumps(overrides),
                             str(at), str(workers)], env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stdout[-3000:] + result.stderr[-3000:]
    found = json.loads(lines[0][len("RESULT "):])
    assert found["removed"].get("node"), f"no node hosting the stage's actor was removed: {found}"
    assert found["alive"] == workers, found  # the head and all but one worker remain
    return found


def mlflow_runs(uri: str, experiment: str = "realfake") -> list:
    """Every run of an MLflow experiment (``MlflowClient.search_runs``), oldest first; [] without the experiment."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"]) if found else []


def mlflow_points(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every value a run holds for a metric, by step."""
    from mlflow import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key))


def tensorboard_points(url: str, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of a scalar as TensorBoard shows it: read by TensorBoard's own reader from every event
    file below ``url`` (a local copy of a remote one), what a restart purged left out."""
    import tempfile

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with tempfile.TemporaryDirectory() as local:
        folder = storage.local_path(url) if storage.is_local(url) else local
        if not storage.is_local(url):
            storage.copy_tree_to_local(url, local)
        events = EventAccumulator(folder, size_guidance={"scalars": 0})
        events.Reload()
        return [(e.step, e.value) for e in events.Scalars(key)] if key in events.Tags()["scalars"] else []
