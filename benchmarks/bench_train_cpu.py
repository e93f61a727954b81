#!/usr/bin/env python
"""Classifier training throughput on CPU, tiny preset (resnet_tiny, 32 px, embedded digits).

Measures, on a local Ray cluster (``--num-cpus``, default: all cores):

* ``decode ceiling``: the Ray Data decode + augment stage alone (rows → ``storage.read_bytes`` + PIL
  decode + the seeded train view, RandomResizedCrop + flip, on CPU tasks: the same ``decoded_dataset``
  the trainer consumes), the real train split repeated ``--repeat`` times, iterated to the end: images/s
  with nothing downstream.
* ``loop, 1 process``: ``to_model_input`` + ``train_step`` on uint8 views already in memory, one thread,
  no Ray: what one worker could do with free data.
* ``run_train`` with 1 and 2 workers (``--workers``): the real stage (Ray Train, DDP over gloo, Ray Data
  streaming), ``--epochs`` epochs on the real split; images/s from ``metrics.jsonl`` over the epochs
  after the first (the first holds the pipeline start), plus the whole call's wall time.

    OMP_NUM_THREADS=1 python benchmarks/bench_train_cpu.py
    OMP_NUM_THREADS=1 python benchmarks/bench_train_cpu.py --workers 2 --epochs 3 --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from _common import machine, write_section  # first: puts the repository on sys.path

SECTION = "## Classifier training (CPU)"


def decode_ceiling(repeat: int) -> list[dict]:
    """Ray Data decode + train-view stage alone (total, and steady = after the first batch), plus one
    process without Ray."""
    import numpy as np

    import pyarrow as pa
    from ray.data.expressions import random

    from realfake_ray.config import load_config
    from realfake_ray.data.labelled import decode_rows, decoded_dataset, real_set, rows_dataset, view_settings
    from realfake_ray.data.sources import LabelledSet

    cfg = load_config(preset="tiny", out=tempfile.mkdtemp(prefix="bench-train-"))
    rng = np.random.default_rng(0)
    real = real_set(cfg.data.train, cfg)
    began = time.time()
    batch = {"url": np.array(real.items["url"].to_pylist(), dtype=object), "label": real.items["label"].to_numpy(),
             "aug": rng.random(real.num_images)}
    n_local = len(decode_rows(batch, cfg.train.image_size, view="train", settings=view_settings(cfg))["label"])
    local_s = time.time() - began
    repeated = LabelledSet(real.url, real.layout, real.class_dirs, real.class_names,
                           items=pa.concat_tables([real.items] * repeat))
    ds = rows_dataset(repeated, cfg).with_column("aug", random(seed=0))
    ds = decoded_dataset(ds, cfg.train.image_size, cfg, view="train")
    began, first, n = time.time(), None, 0
    for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
        first = first or time.time()
        n += len(batch["label"])
    seconds, steady = time.time() - began, time.time() - first
    return [
        {"what": "decode + train view in one process, no Ray", "workers": "-", "images": n_local,
         "seconds": round(local_s, 2), "images_per_s": round(n_local / local_s, 1)},
        {"what": "Ray Data decode + train view only (total, incl. start)", "workers": "-", "images": n,
         "seconds": round(seconds, 2), "images_per_s": round(n / seconds, 1)},
        {"what": "Ray Data decode + train view only (after the first batch)", "workers": "-", "images": n - 256,
         "seconds": round(steady, 2), "images_per_s": round((n - 256) / steady, 1)},
    ]


def loop_one_process(steps: int, batch: int) -> dict:
    import numpy as np
    import torch

    from realfake_ray.method.classifier import build_classifier, build_optimizer, to_model_input, train_step

    torch.set_num_threads(1)
    model = build_classifier("resnet_tiny", 10)
    opt = build_optimizer(model, 0.05)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    labels = torch.from_numpy(rng.integers(0, 10, batch))
    train_step(model, opt, None, to_model_input(images), labels)  # warm-up
    began = time.time()
    for _ in range(steps):
        train_step(model, opt, None, to_model_input(images), labels)
    seconds = time.time() - began
    rate = steps * batch / seconds
    return {"what": "to_model_input + train_step, no Ray (1 thread)", "workers": 1, "images": steps * batch,
            "seconds": round(seconds, 2), "images_per_s": round(rate, 1), "images_per_s_per_worker": round(rate, 1)}


def run_train_rate(workers: int, epochs: int) -> dict:
    from realfake_ray.config import load_config
    from realfake_ray.layout import RunLayout
    from realfake_ray.stages.train.driver import read_metrics, run_train

    out = tempfile.mkdtemp(prefix=f"bench-train-{workers}w-")
    cfg = load_config(preset="tiny", out=out, overrides=[
        "train.source=real", f"train.num_workers={workers}", f"train.epochs={epochs}", "train.worker_cpus=1",
        "evaluate.distribution_metrics=false",
    ])
    began = time.time()
    summary = run_train(cfg)
    call = time.time() - began
    rows = read_metrics(RunLayout(out).classifier_dir())
    steady = rows[1:] or rows
    images, seconds = sum(r["train_images"] for r in steady), sum(r["seconds"] for r in steady)
    return {"what": f"run_train, real, {epochs} epochs (call {call:.0f} s, val top-1 "
                    f"{summary['evaluation']['sets']['val']['top1']:.3f})",
            "workers": workers, "images": images, "seconds": round(seconds, 2),
            "images_per_s": round(images / seconds, 1), "images_per_s_per_worker": round(images / seconds / workers, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2", help="comma list of Ray Train worker counts")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=8, help="copies of the 1,437-image split for the decode ceiling")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="logical CPUs of the local cluster (default: max(cores, workers + 2))")
    parser.add_argument("--write", metavar="BENCHMARKS.md", help="write the results as this script's section")
    args = parser.parse_args()

    import ray

    from realfake_ray._internal.cluster import init_ray
    from realfake_ray.config import RayConfig
    from realfake_ray.plots import markdown_table

    workers = [int(w) for w in args.workers.split(",")]
    # Logical CPUs: each training worker holds one, and the decode tasks need at least one more.
    num_cpus = args.num_cpus or max(os.cpu_count() or 1, max(workers) + 2)
    init_ray(RayConfig(num_cpus=num_cpus))
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = [*decode_ceiling(args.repeat), loop_one_process(steps=10, batch=64)]
    rows += [run_train_rate(w, args.epochs) for w in workers]
    table = markdown_table(rows, ["what", "workers", "images", "seconds", "images_per_s", "images_per_s_per_worker"])
    text = (f"{SECTION}\n\nMachine: {machine()} (torch {__import__('torch').__version__}, Ray {ray.__version__}); "
            f"`OMP_NUM_THREADS=1 python benchmarks/bench_train_cpu.py`. Tiny preset: resnet_tiny at 32 px, "
            f"batch 64 per worker, embedded digits (1,437 train images); local Ray cluster of {num_cpus} logical CPUs.\n\n{table}\n")
    print(text)
    if args.write:
        write_section(args.write, SECTION, text)


if __name__ == "__main__":
    main()
