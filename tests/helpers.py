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
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from realfake_ray import storage
from realfake_ray._internal.shards import read_parts, write_part
from realfake_ray.bank import write_train_subset
from realfake_ray.data.imagefolder import scan_image_folder, stem
from realfake_ray.layout import RunLayout

__all__ = ["declared_api", "small_bank", "fabricate_synthetic", "forbid_ray_work", "run_until_fault",
           "run_with_node_loss"]

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


def fabricate_synthetic(out: str, copies: int = 1, per_class: int | None = None, manifest: bool = True,
                        source: str = "embedded:digits/train", class_dir_of=None) -> int:
    """Write a synthetic set in the generate stage's layout: real images re-saved as JPEG copies under
    ``<out>/synthetic/train/<safe class dir>/<stem>__c<copy>.jpg`` plus the Parquet manifest
    (path, image_id, label, class_dir, copy_idx, seed, prompt) and ``_summary.json``. Returns the count."""
    index = scan_image_folder(source, check_readable=False)
    root, rows, taken = os.path.join(out, "synthetic", "train"), [], {}
    for rec in index.records:
        taken[rec.label] = taken.get(rec.label, 0) + 1
        if per_class is not None and taken[rec.label] > per_class:
            continue
        image = Image.open(io.BytesIO(storage.read_bytes(rec.url))).convert("RGB")
        class_dir = class_dir_of(rec.class_dir) if class_dir_of else rec.class_dir
        folder = storage.safe_name(class_dir)
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        for c in range(copies):
            rel = f"{folder}/{stem(rec.image_id)}__c{c}.jpg"
            image.save(os.path.join(root, rel), quality=92 - 4 * c)
            rows.append({"path": rel, "image_id": rec.image_id, "label": rec.label, "class_dir": class_dir,
                         "copy_idx": c, "seed": 1000 + len(rows), "prompt": f"photo of {rec.class_name}"})
    if manifest:
        write_part(os.path.join(out, "synthetic", "_manifest"), pa.Table.from_pylist(rows))
        storage.write_json(os.path.join(out, "synthetic", "_summary.json"), {"images": len(rows), "complete": True})
    return len(rows)


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


def run_until_fault(cmd: list[str], env: dict, fault: str, timeout: float = 300) -> None:
    """Run a stage's job script with ``REALFAKE_FAULT=fault`` (see ``realfake_ray._internal.faults``): its
    driver must die by SIGKILL at that point. Then wait until Ray has reaped every worker of the dead job,
    so that nothing of it still writes while the test resumes the run."""
    from ray.util.state import list_actors, list_jobs, list_tasks

    from realfake_ray._internal.cluster import state_api_address

    here = {"address": state_api_address()}  # this session's cluster, whatever else runs on the machine
    proc = subprocess.Popen(cmd, env={**env, "REALFAKE_FAULT": fault}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    output, _ = proc.communicate(timeout=timeout)
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
