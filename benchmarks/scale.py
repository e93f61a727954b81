#!/usr/bin/env python
"""Scale: the job at ImageNet shape — 1,000 classes, the official flat val + LOC_val_solution.csv — at growing
sizes, on a local disk and on a local S3 server, plus the driver-side paths on fabricated sets of up to millions
of synthetic rows; fitted and extrapolated to ImageNet-1K × 10.

    python benchmarks/scale.py job --sizes 10000,100000 --storage disk,s3      # the tiny job end to end
    python benchmarks/scale.py driver --rows 10000,100000,1000000,2000000       # planning on fabricated shards
    python benchmarks/scale.py finetune-order --bank runs/scale/disk-10000 --replicate 10  # global vs files+buffer
    python benchmarks/scale.py cache --sizes 10000          # the S3 job, then its GETs per image in epoch 2
    python benchmarks/scale.py decode --sizes 10000                             # decode images/s on 1 and 2 CPUs
    python benchmarks/scale.py report --write BENCHMARKS.md                    # fits, plots, the section

Every stage runs as its own `realfake run --only <stage>` process: its wall time, the driver's peak RSS (the
process the user runs; Ray's workers are other processes) and, on S3, the requests the server logged. The
sampler runs 2 steps: this measures the plumbing, not the images. Results accumulate in
``runs/scale/results.json`` (one entry per measurement, so parts can run at different times).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from _common import machine, write_section  # first: puts the repository on sys.path

SECTION = "## Scale (CPU, tiny preset): ImageNet-shaped inputs on disk and S3, the driver at 1 M synthetic rows"
ROOT = Path("runs/scale")
RESULTS = ROOT / "results.json"
STAGES = ("encode", "finetune", "generate", "train", "evaluate")
CLASSES = 1000
IMAGENET, MULT = 1_281_167, 10
FAST = ["finetune.max_steps=4", "finetune.checkpoint_every=4", "finetune.num_workers=1", "generate.steps=2",
        "generate.actors.min_size=1", "generate.actors.max_size=1", "train.epochs=1", "train.real_baseline=false",
        "train.budget_images=null", "evaluate.distribution_max_images=2000", "encode.rows_per_file=1024",
        "ray.num_cpus=2"]


# ------------------------------------------------------------------------------------------ results
def _load() -> list[dict]:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else []


def _save(entry: dict) -> None:
    rows = [r for r in _load() if not all(r.get(k) == entry.get(k) for k in ("part", "storage", "size", "stage", "what"))]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(rows + [entry], indent=1))
    print(f"[scale] {entry}", flush=True)


def _peak_rss(cmd: list[str], env: dict) -> tuple[int, float, float, str]:
    """Run ``cmd``; ``(exit code, seconds, peak RSS of that process in MiB, output tail)``."""
    import psutil

    started = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, done = [0], threading.Event()

    def watch() -> None:
        p = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                peak[0] = max(peak[0], p.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    out, _ = proc.communicate()
    done.set()
    return proc.returncode, time.time() - started, peak[0] / 2**20, out[-3000:]


# ------------------------------------------------------------------------------------------ data
def make_imagenet_shaped(local: Path, train: int, val: int, side: int = 32) -> dict:
    """``train`` images over 1,000 synset folders and ``val`` flat images + LOC_val_solution.csv (small JPEGs)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    synsets = [f"n{i:08d}" for i in range(CLASSES)]
    colours = rng.integers(0, 255, (CLASSES, 3))
    for split in ("train", "val"):
        (local / split).mkdir(parents=True, exist_ok=True)
    for s in synsets:
        (local / "train" / s).mkdir(exist_ok=True)

    def jpeg(c: int) -> bytes:
        pixels = np.clip(colours[c] + rng.normal(0, 25, (side, side, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
        return buffer.getvalue()

    for i in range(train):
        c = i % CLASSES
        (local / "train" / synsets[c] / f"{synsets[c]}_{i}.JPEG").write_bytes(jpeg(c))
    lines = ["ImageId,PredictionString"]
    for i in range(val):
        c = i % CLASSES
        name = f"ILSVRC2012_val_{i + 1:08d}"
        (local / "val" / f"{name}.JPEG").write_bytes(jpeg(c))
        lines.append(f"{name},{synsets[c]} 1 1 {side} {side}")
    (local / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    return _paths(local)


def _paths(local: Path) -> dict:
    return {"train": str(local / "train"), "val": str(local / "val"), "labels": str(local / "LOC_val_solution.csv")}


def _s3_paths(url: str) -> dict:
    return {"train": f"{url}/train", "val": f"{url}/val", "labels": f"{url}/LOC_val_solution.csv"}


def _upload(local: Path, url: str) -> dict:
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.put(str(local) + "/", url.removeprefix("s3://") + "/", recursive=True)
    return _s3_paths(url)


# ------------------------------------------------------------------------------------------ the job
def _server():
    from realfake_ray._internal.local_s3 import LocalS3

    ROOT.mkdir(parents=True, exist_ok=True)
    server = LocalS3(str(ROOT / f"s3-{os.getpid()}.log"))
    os.environ.update(server.env)
    import fsspec

    fsspec.filesystem("s3").mkdir("scale")
    return server


def job(sizes: list[int], storages: list[str], server=None) -> None:
    own = server is None and "s3" in storages
    server = _server() if own else server
    try:
        for size in sizes:
            local = ROOT / f"data-{size}"
            if not (local / "LOC_val_solution.csv").exists():
                make_imagenet_shaped(local, size, max(1000, size // 25))
            for storage in storages:
                data = _upload(local, f"s3://scale/data-{size}") if storage == "s3" else _paths(local.resolve())
                out = f"s3://scale/run-{size}" if storage == "s3" else str((ROOT / f"{storage}-{size}").resolve())
                _run_job(storage, size, data, out, server)
    finally:
        if own:
            server.stop()


def _command(command: str, out: str, data: dict, *overrides: str) -> list[str]:
    """``realfake <command>`` on the job's data (the ImageNet-shaped set at ``data``) with FAST and ``overrides``."""
    return [sys.executable, "-m", "realfake_ray", command, "--preset", "tiny", "--out", out, "--data", data["train"],
            "--val-data", data["val"], *[a for o in (f"data.val_labels={data['labels']}", "data.classes_file=null",
                                                     *FAST, *overrides) for a in ("--set", o)]]


def _run_job(storage: str, size: int, data: dict, out: str, server) -> None:
    base = _command("run", out, data)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for stage in STAGES:
        before = server.by_method() if server else None
        code, seconds, rss, tail = _peak_rss(base + ["--only", stage], env)
        if code != 0:
            raise SystemExit(f"{storage} {size} {stage} failed:\n{tail}")
        delta = (server.by_method() - before) if server else {}
        images = {"encode": size + max(1000, size // 25), "generate": size, "train": size,
                  "evaluate": max(1000, size // 25), "finetune": None}[stage]
        _save({"part": "job", "storage": storage, "size": size, "stage": stage, "seconds": round(seconds, 1),
               "driver_peak_mib": round(rss), "images": images,
               "images_per_s": round(images / seconds, 1) if images else None,
               "requests": sum(delta.values()) if server else None,
               "puts": delta.get("PUT", 0) if server else None, "gets": delta.get("GET", 0) if server else None,
               "requests_per_image": round(sum(delta.values()) / images, 4) if server and images else None})
    before = server.by_method() if server else None  # counted from here: the rerun's own requests
    code, seconds, rss, tail = _peak_rss(base, env)  # the finished job again: every stage skips
    if code != 0:
        raise SystemExit(f"{storage} {size} rerun failed:\n{tail}")
    _save({"part": "job", "storage": storage, "size": size, "stage": "rerun", "seconds": round(seconds, 1),
           "driver_peak_mib": round(rss), "requests": sum((server.by_method() - before).values()) if server else None})


# ------------------------------------------------------------------------------------------ the driver at 1 M+
_DRIVER_CODE = r"""
import json, resource, sys, time
from realfake_ray.config import load_config
from realfake_ray.stages.train.plan import plan_training
from realfake_ray.stages.generate.plan import plan_units
from realfake_ray.data.labelled import set_digest, synthetic_set
from realfake_ray.data.synthetic import list_shards, sample_per_class
from realfake_ray._internal.shards import part_files
from realfake_ray.layout import RunLayout

out, what = sys.argv[1], sys.argv[2]
cfg = load_config(preset="tiny", out=out, overrides=["train.source=synthetic", "evaluate.distribution_metrics=false",
                                                     "generate.mult=10", "generate.images_per_shard=1000"])
started = time.time()
if what == "train plan":
    plan = plan_training(cfg); n = plan.synthetic_images
elif what == "evaluate inputs":
    n = len(set_digest(synthetic_set(cfg, [f"digit_{i}" for i in range(10)])))
elif what == "report samples":
    n = len(sample_per_class(list_shards(RunLayout(out).shards_dir()), 4, 10))
elif what == "generate plan":
    n = plan_units(cfg, part_files(RunLayout(out).bank_dir("train")), 1000)[3]
print("RESULT", json.dumps({"seconds": time.time() - started, "n": n,
                            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _fabricate(out: str, rows: int, storage: str) -> None:
    """``rows`` synthetic rows as generate names its shards (1,000 per shard, copies 0-9 over 1/10 as many bank
    rows), and that bank (image_id + label columns only): each shard file is a copy of one real small shard."""
    import numpy as np
    import pyarrow as pa

    from realfake_ray import storage as st
    from realfake_ray._internal.shards import write_part
    from realfake_ray.data.synthetic import shard_bytes, shard_name, shard_table
    from realfake_ray.layout import RunLayout

    layout = RunLayout(out)
    if st.exists(layout.synthetic_dir("_fabricated.json")):
        return
    from PIL import Image

    jpeg = io.BytesIO()
    Image.new("RGB", (32, 32)).save(jpeg, format="JPEG")
    n = 1000
    table = shard_table([jpeg.getvalue()] * n, [f"digit_{i % 10}/x{i}__c0.jpg" for i in range(n)], [i % 10 for i in range(n)],
                        {"image_id": [f"digit_{i % 10}/x{i}.png" for i in range(n)], "class_dir": [f"digit_{i % 10}" for i in range(n)],
                         "copy_idx": [0] * n, "seed": list(range(n)), "prompt": ["p"] * n}, {"mode": "img2img"},
                        [f"digit_{i}" for i in range(10)])
    data = shard_bytes(table)
    bank_rows = rows // MULT
    fs_items = []
    for part in range(max(1, bank_rows // n)):
        key = f"part-{part:032x}.parquet"
        ids = pa.array([f"digit_{i % 10}/{part}-{i}.png" for i in range(n)])
        write_part(layout.bank_dir("train"), pa.table({"image_id": ids, "label": pa.array(np.arange(n) % 10)}))
        for copy in range(MULT):
            fs_items.append(st.join(layout.shards_dir(), shard_name(copy, key, 0, n)))
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda url: st.write_bytes(url, data), fs_items))
    st.write_json(layout.meta_url(), {"class_dirs": [f"digit_{i}" for i in range(10)], "splits": {"train": {"rows": bank_rows}}})
    st.write_json(layout.synthetic_dir("_fabricated.json"), {"rows": rows})


def driver(rows_list: list[int], storages: list[str]) -> None:
    server = _server() if "s3" in storages else None
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    try:
        for rows in rows_list:
            for storage in storages:
                out = f"s3://scale/driver-{rows}" if storage == "s3" else str((ROOT / f"driver-{rows}").resolve())
                _fabricate(out, rows, storage)
                for what in ("generate plan", "train plan", "evaluate inputs", "report samples"):
                    before = server.by_method() if server else None
                    code, seconds, rss, tail = _peak_rss([sys.executable, "-c", _DRIVER_CODE, out, what], env)
                    line = next((x for x in tail.splitlines() if x.startswith("RESULT ")), None)
                    if code or not line:
                        raise SystemExit(f"driver {what} at {rows} failed:\n{tail}")
                    found = json.loads(line[7:])
                    requests = sum((server.by_method() - before).values()) if server else None
                    _save({"part": "driver", "storage": storage, "size": rows, "what": what,
                           "seconds": round(found["seconds"], 2), "peak_mib": round(found["peak_mib"]),
                           "requests": requests, "shards": rows // 1000})
    finally:
        if server:
            server.stop()


# ------------------------------------------------------------------------------------------ fine-tune data order
def replicated_bank(source: str, copies: int) -> str:
    """A bank of ``copies`` × the rows of ``source``'s train bank (its part files copied under new names; ids
    repeat, which data order does not care about): a ≥100 k-row bank without encoding 100 k images."""
    import shutil

    target = ROOT / f"bank-x{copies}-{Path(source).name}"
    train = target / "latents" / "train"
    if not train.exists():
        parts = sorted((Path(source) / "latents" / "train").glob("part-*.parquet"))
        tmp = target / "latents" / "train.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        for copy in range(copies):
            for part in parts:
                shutil.copyfile(part, tmp / f"part-{copy:04d}{part.name[5 + 4:]}")
        for name in ("_meta.json", "_identity.json"):
            if (Path(source) / "latents" / name).exists():
                shutil.copyfile(Path(source) / "latents" / name, target / "latents" / name)
        tmp.rename(train)
    return str(target.resolve())


class ObjectStorePeak:
    """Samples the cluster's object-store bytes in use (Ray's store stats, the numbers ``ray memory --stats-only``
    prints) every ``every_s`` on a thread; ``stop()`` returns ``(peak MiB, MiB spilled to disk meanwhile)``."""

    def __init__(self, every_s: float = 0.25) -> None:
        import threading

        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        self._read = lambda: get_memory_info_reply(get_state_from_address(None)).store_stats
        self._every_s, self._done = every_s, threading.Event()
        first = self._read()
        self._spilled0, self.peak = first.spilled_bytes_total, first.object_store_bytes_used
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(self._every_s):
            self.peak = max(self.peak, self._read().object_store_bytes_used)

    def stop(self) -> tuple[float, float]:
        self._done.set()
        self._thread.join()
        last = self._read()
        mib = 1024 * 1024
        return round(max(self.peak, last.object_store_bytes_used) / mib, 1), round((last.spilled_bytes_total - self._spilled0) / mib, 1)


def finetune_order(bank: str, batches: int = 20) -> None:
    """One epoch's data order from a ≥100 k-row bank, both ways: wall time, the peak of object-store bytes in use
    and the bytes spilled to disk meanwhile (:class:`ObjectStorePeak`), and the class mix of the first batches
    (distinct classes among the first 20 batches of 16 rows)."""
    import numpy as np
    import ray

    from realfake_ray._internal.cluster import init_ray
    from realfake_ray._internal.shards import part_files
    from realfake_ray.config import load_config
    from realfake_ray.layout import RunLayout
    from realfake_ray.stages.finetune.driver import bank_dataset

    for shuffle in ("global", "files"):
        cfg = load_config(preset="tiny", out=bank, overrides=[f"finetune.shuffle={shuffle}", "ray.num_cpus=2"])
        init_ray(cfg.ray)
        ds = bank_dataset(tuple(part_files(RunLayout(bank).bank_dir("train"))), shuffle, cfg.seed)
        store = ObjectStorePeak()
        started, first, rows = time.time(), [], 0
        for batch in ds.iter_batches(batch_size=16, batch_format="numpy",
                                     local_shuffle_buffer_size=cfg.finetune.shuffle_buffer_size if shuffle == "files" else None):
            if len(first) < batches:
                first.append(batch["label"])
            rows += len(batch["label"])
        seconds = time.time() - started
        peak_mib, spilled_mib = store.stop()
        mix = float(np.mean([len(set(b.tolist())) for b in first]))
        _save({"part": "finetune-order", "storage": "disk", "size": rows, "what": shuffle, "seconds": round(seconds, 1),
               "distinct_classes_per_batch_of_16": round(mix, 2), "object_store_peak_mib": peak_mib,
               "spilled_mib": spilled_mib})
        ray.shutdown()


# ------------------------------------------------------------------------------------------ epochs from S3
def cache(size: int, server=None) -> None:
    """GETs per synthetic image in a classifier run's second epoch, with and without ``train.cache``: the
    difference between a 2-epoch and a 1-epoch run on the S3 job of ``size`` (each with an empty per-node cache,
    so epoch 1 fetches in both)."""
    import tempfile

    own = server is None
    server = _server() if own else server
    try:
        if own:  # the server keeps objects in memory: the S3 job of this size first
            job([size], ["s3"], server)
        out, data = f"s3://scale/run-{size}", _s3_paths(f"s3://scale/data-{size}")
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        gets = {}
        for cached in (False, True):
            for epochs in (1, 2):
                tag = f"cache{int(cached)}-e{epochs}"
                cmd = _command("train", out, data, f"train.epochs={epochs}", f"train.cache={str(cached).lower()}",
                               f"train.tag={tag}", "train.source=synthetic")
                before = server.by_method()
                code, seconds, rss, tail = _peak_rss(cmd, {**env, "REALFAKE_CACHE": tempfile.mkdtemp(prefix="scale-cache-")})
                if code != 0:
                    raise SystemExit(f"train {tag} failed:\n{tail}")
                gets[(cached, epochs)] = (server.by_method() - before).get("GET", 0)
            second = gets[(cached, 2)] - gets[(cached, 1)]
            _save({"part": "cache", "storage": "s3", "size": size, "what": f"train.cache={str(cached).lower()}",
                   "gets_epoch_1_run": gets[(cached, 1)], "gets_epoch_1_and_2_run": gets[(cached, 2)],
                   "gets_per_image_epoch_2": round(second / size, 4)})
    finally:
        if own:
            server.stop()


# ------------------------------------------------------------------------------------------ decode rate
_DECODE_CODE = r"""
import json, sys, time
from realfake_ray._internal.cluster import init_ray
from realfake_ray.config import load_config
from realfake_ray.stages.train.driver import train_dataset
from realfake_ray.stages.train.plan import plan_training

out, cpus, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
import yaml
with open(f"{out}/config.yaml") as fh:  # the job's data (its other keys may predate renames)
    data = {k: v for k, v in yaml.safe_load(fh)["data"].items() if k in ("train", "val", "val_labels", "classes_file") and v}
cfg = load_config(preset="tiny", out=out, **{f"data__{k}": v for k, v in data.items()}, overrides=[
    f"ray.num_cpus={cpus}", "train.decode_cpus=1", "train.source=synthetic", "train.budget_images=null",
    f"train.image_size={size}"])
init_ray(cfg.ray)
ds = train_dataset(plan_training(cfg), cfg, 0)  # the classifier's own pipeline; each iteration is an epoch
for epoch in range(2):  # the first epoch starts the worker processes; the second is the steady rate
    started, n = time.time(), 0
    for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
        n += len(batch["pixels"])
    print("RESULT", json.dumps({"epoch": epoch, "images": n, "seconds": time.time() - started}))
"""


def decode(size: int, image_sizes: tuple[int, ...] = (32, 224)) -> None:
    """Images/s of the classifier's input pipeline (``train_dataset``: read, shuffle, decode, train-view
    augmentation) over the synthetic shards of the disk job of ``size``, on a Ray cluster of 1 and of 2 CPUs
    (one CPU per decode task), cutting views of the tiny preset's 32 px and of ImageNet's 224 px: the second
    of two epochs (the first also starts the worker processes); 0 images is an error, not a row."""
    out = str((ROOT / f"disk-{size}").resolve())
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for image_size in image_sizes:
        for cpus in (1, 2):
            cmd = [sys.executable, "-c", _DECODE_CODE, out, str(cpus), str(image_size)]
            code, seconds, rss, tail = _peak_rss(cmd, env)
            lines = [json.loads(x[7:]) for x in tail.splitlines() if x.startswith("RESULT ")]
            if code or len(lines) != 2:
                raise SystemExit(f"decode on {cpus} CPUs failed:\n{tail}")
            found = lines[1]
            if not found["images"]:
                raise SystemExit(f"decode on {cpus} CPUs read no image from {out}:\n{tail}")
            _save({"part": "decode", "storage": "disk", "size": found["images"],
                   "what": f"{cpus} CPU, {image_size} px view",
                   "first_epoch_seconds": round(lines[0]["seconds"], 1), "seconds": round(found["seconds"], 1),
                   "images_per_s": round(found["images"] / found["seconds"], 1),
                   "images_per_s_per_cpu": round(found["images"] / found["seconds"] / cpus, 1)})


# ------------------------------------------------------------------------------------------ report
def _fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    import numpy as np

    x, y = np.array([p[0] for p in points], float), np.array([p[1] for p in points], float)
    if len(x) < 2:
        return 0.0, float(y[0] / x[0]) if len(x) else 0.0
    slope, intercept = np.polyfit(x, y, 1)
    return float(intercept), float(slope)


def report(write: str | None) -> None:
    from realfake_ray.plots import markdown_table, plot_curves

    rows = _load()
    lines = [SECTION, "", f"Machine: {machine()}. `python benchmarks/scale.py` (parts: job, driver, finetune-order, "
             "cache, decode, report); the tiny preset with 2 sampling steps and 1 classifier epoch: these rows measure the plumbing "
             "(listing, reading, writing, planning), not the models. S3 = moto's server on 127.0.0.1 through the real "
             "s3fs client: request counts carry over to a real bucket, latencies do not.", ""]
    job_rows = [r for r in rows if r["part"] == "job"]
    if job_rows:
        lines += ["### The job, stage by stage", "", markdown_table([{k: r.get(k) for k in (
            "storage", "size", "stage", "seconds", "images_per_s", "driver_peak_mib", "requests", "puts", "gets",
            "requests_per_image")} for r in job_rows]), ""]
        fits = []
        for storage in sorted({r["storage"] for r in job_rows}):
            for stage in STAGES:
                pts = [(r["size"], r["seconds"]) for r in job_rows if r["storage"] == storage and r["stage"] == stage]
                if len({size for size, _ in pts}) >= 3:  # two points (often from different days) fit anything
                    a, b = _fit(pts)
                    n = IMAGENET * (MULT if stage == "generate" else 1)
                    fits.append({"storage": storage, "stage": stage, "fixed_s": round(a, 1), "s_per_1k_images": round(1000 * b, 2),
                                 "extrapolated_to": n, "hours_on_these_2_cores": round((a + b * n) / 3600, 1)})
        for storage in sorted({r["storage"] for r in job_rows}):
            mine = [r for r in job_rows if r["storage"] == storage and r["stage"] in STAGES]
            if len({r["size"] for r in mine}) < 3:
                continue
            picture = Path(f"benchmarks/scale_job_{storage}.png")
            points = [{"input images": r["size"], f"{r['stage']} s": r["seconds"],
                       f"{r['stage']} driver MiB": r["driver_peak_mib"]} for r in mine]
            plot_curves(points, "input images", [f"{s} s" for s in STAGES] + [f"{s} driver MiB" for s in STAGES],
                        str(picture), title=f"the job on {storage}: stage seconds and driver peak RSS (MiB)",
                        logx=True, logy=True)
            lines += [f"![the job on {storage} by size]({picture})", ""]
        if fits:
            lines += ["Linear fits `seconds = fixed + per_image × images` over the sizes measured, extrapolated to "
                      "ImageNet-1K (× 10 for generate) on this 2-core machine — CPU-bound tiny-model work, so what "
                      "carries to a GPU cluster is the shape (linear, no super-linear driver term), not the hours:", "",
                      markdown_table(fits), ""]
        else:
            lines += ["No per-stage fit yet: it needs at least three sizes of one storage (two points, measured hours "
                      "apart at this machine's varying speed, fit anything).", ""]
    driver_rows = [r for r in rows if r["part"] == "driver"]
    if driver_rows:
        lines += ["### The driver at millions of synthetic rows (fabricated shards, 1,000 rows each)", "",
                  markdown_table([{k: r.get(k) for k in ("storage", "size", "what", "seconds", "peak_mib", "requests", "shards")}
                                  for r in driver_rows]), ""]
        picture = Path("benchmarks/scale_driver.png")
        points = [{"synthetic rows": r["size"], f"{r['what']} ({r['storage']})": r["peak_mib"]} for r in driver_rows]
        plot_curves(points, "synthetic rows", sorted({k for p in points for k in p if k != "synthetic rows"}),
                    str(picture), title="driver peak RSS (MiB) vs synthetic rows", logx=True)
        lines += [f"![driver peak RSS vs rows]({picture})", ""]
    for part, heading in (("cache", "### Classifier epochs from S3: GETs per image in the second epoch"),
                          ("decode", "### Classifier read + decode rate by CPUs (train view, shards on local disk)")):
        found = [{k: v for k, v in r.items() if k != "part"} for r in rows if r["part"] == part]
        if found:
            lines += [heading, "", markdown_table(found), ""]
    order = [r for r in rows if r["part"] == "finetune-order"]
    if order:
        lines += ["### Fine-tuning data order on a large bank", "", markdown_table(order), ""]
    text = "\n".join(lines) + "\n"
    print(text)
    if write:
        write_section(write, SECTION, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=["job", "driver", "finetune-order", "cache", "decode", "report"])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--rows", default="10000,100000,1000000")
    parser.add_argument("--storage", default="disk,s3")
    parser.add_argument("--bank", default=str(ROOT / "disk-100000"))
    parser.add_argument("--replicate", type=int, default=1, help="finetune-order: the bank's rows copied N times")
    parser.add_argument("--write", metavar="BENCHMARKS.md")
    args = parser.parse_args()
    storages = args.storage.split(",")
    if args.part == "job":
        job([int(s) for s in args.sizes.split(",")], storages)
    elif args.part == "driver":
        driver([int(s) for s in args.rows.split(",")], storages)
    elif args.part == "finetune-order":
        finetune_order(replicated_bank(args.bank, args.replicate) if args.replicate > 1 else args.bank)
    elif args.part in ("cache", "decode"):
        for size in (int(s) for s in args.sizes.split(",")):
            (cache if args.part == "cache" else decode)(size)
    else:
        report(args.write)


if __name__ == "__main__":
    main()
