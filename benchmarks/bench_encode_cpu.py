#!/usr/bin/env python
"""Encode throughput on CPU, tiny preset: the embedded digits (1,437 train + 360 val) into a latent bank.

For each encoder actor-pool size in ``--actors`` (a fresh run directory each, ``--repeats`` times):
``run_encode`` end to end (listing, Ray Data read + decode + resize CPU tasks, VAE + CLIP vision actors,
Parquet part files, ``_meta.json``); images/s = images / the whole call. Then the same call again over
the complete bank (the "no work" rerun). Also the encoder alone in this process (no Ray, one thread):
``ClipEmbedder`` + VAE posterior on decoded batches, the compute ceiling of one actor.

    OMP_NUM_THREADS=1 python benchmarks/bench_encode_cpu.py --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from _common import machine, write_section  # first: puts the repository on sys.path

SECTION = "## Encode (CPU, tiny preset)"


def encoder_ceiling(batch_size: int) -> dict:
    """The encode actor's work (VAE posterior + CLIP embedding) on the train split, in this process."""
    import numpy as np
    import torch

    from realfake_ray.data.labelled import real_set
    from realfake_ray.config import load_config
    from realfake_ray.stages.encode.driver import LatentEncoder, decode_batch

    torch.set_num_threads(1)
    cfg = load_config(preset="tiny", out=tempfile.mkdtemp(prefix="bench-encode-"))
    rows = real_set(cfg.data.train, cfg).items["url"].to_pylist()
    urls = np.array(rows, dtype=object)
    decoded = decode_batch({"url": urls}, cfg.encode.resolution)
    encoder = LatentEncoder(cfg)
    began = time.time()
    for start in range(0, len(rows), batch_size):
        encoder({k: v[start:start + batch_size] for k, v in decoded.items()})
    seconds = time.time() - began
    return {"what": "encoder actor's work in one process, no Ray, 1 thread", "actors": "-", "images": len(rows),
            "seconds": round(seconds, 2), "images_per_s": round(len(rows) / seconds, 1)}


def encode_run(actors: int, repeat: int) -> list[dict]:
    from realfake_ray.config import load_config
    from realfake_ray.stages.encode.driver import run_encode

    work = tempfile.mkdtemp(prefix="bench-encode-")
    try:
        cfg = load_config(preset="tiny", out=work, overrides=[f"encode.actors.min_size={actors}",
                                                               f"encode.actors.max_size={actors}"])
        began = time.time()
        meta = run_encode(cfg)
        seconds = time.time() - began
        images = meta["last_run"]["encoded_now"]
        began = time.time()
        again = run_encode(cfg)
        rerun = time.time() - began
        assert again["skipped"], "a rerun over a complete bank must do no work"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return [
        {"what": f"run_encode, fresh bank (run {repeat})", "actors": actors, "images": images,
         "seconds": round(seconds, 2), "images_per_s": round(images / seconds, 1)},
        {"what": f"run_encode again over the complete bank (run {repeat})", "actors": actors, "images": 0,
         "seconds": round(rerun, 2), "images_per_s": None},
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--actors", default="1,2", help="comma list of encoder actor-pool sizes")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the local cluster (default: cores)")
    parser.add_argument("--write", metavar="BENCHMARKS.md", help="write the results as this script's section")
    args = parser.parse_args()

    import ray
    import torch

    from realfake_ray._internal.cluster import init_ray
    from realfake_ray.config import RayConfig
    from realfake_ray.models.loading import resolve_model_dir
    from realfake_ray.plots import markdown_table

    resolve_model_dir("preset:tiny")  # materialise the preset first: not part of any timing
    num_cpus = args.num_cpus or os.cpu_count() or 1
    init_ray(RayConfig(num_cpus=num_cpus))
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = [row for r in range(1, args.repeats + 1) for a in args.actors.split(",") for row in encode_run(int(a), r)]
    rows.append(encoder_ceiling(batch_size=128))
    table = markdown_table(rows, ["what", "actors", "images", "seconds", "images_per_s"])
    text = (f"{SECTION}\n\nMachine: {machine()} (torch {torch.__version__}, Ray {ray.__version__}); "
            f"`OMP_NUM_THREADS=1 python benchmarks/bench_encode_cpu.py`. Tiny preset (32 px, VAE to a 4×8×8 "
            f"latent, tiny CLIP vision tower), embedded digits (1,437 train + 360 val); local Ray cluster of "
            f"{num_cpus} logical CPUs; each encoder actor holds 1 CPU. *images/s* = images / the whole "
            f"`run_encode` call (listing, Ray start-up of the tasks and actors, model load, writes included).\n\n"
            f"{table}\n")
    print(text)
    if args.write:
        write_section(args.write, SECTION, text)


if __name__ == "__main__":
    main()
