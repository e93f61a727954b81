#!/usr/bin/env python
"""Generation on CPU, tiny preset: images/s of the full Ray Data pipeline vs a bare Sampler loop.

Both sides generate the same images (same bank rows, batch size, steps, seeds and LoRA-free model) with
one torch thread: a 1-CPU Ray actor gets ``OMP_NUM_THREADS=1``, and the bare loop sets the same. Order:
bare loop → pipeline (``run_generate`` on a local Ray cluster) → the bare loop inside a 1-CPU Ray task →
the bare loop again, to bracket drift on a shared machine. The pipeline is timed end to end (actor start, model load, JPEG writes included); its
summary also gives the actor's time inside Sampler calls, so wall − sampler time = the actor's idle time
(start-up, model load, waiting for input, the final JPEG and shard writes).

    OMP_NUM_THREADS=1 python benchmarks/bench_generate_cpu.py                 # all 1,437 digits, 1×
    OMP_NUM_THREADS=1 python benchmarks/bench_generate_cpu.py --mult 10       # 14,370 images
    OMP_NUM_THREADS=1 python benchmarks/bench_generate_cpu.py --per-class 20 --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from _common import machine  # first: puts the repository on sys.path


def make_bank(work: str, per_class: int | None) -> str:
    """Encode (a per-class prefix of) the embedded digits train split into ``<work>/run``."""
    from realfake_ray import storage
    from realfake_ray.config import load_config
    from realfake_ray.stages.encode.driver import run_encode

    root = storage.resolve_embedded("embedded:digits")
    data = os.path.join(work, "data")
    for class_dir in sorted(os.listdir(f"{root}/train")):
        os.makedirs(f"{data}/{class_dir}")
        for name in sorted(os.listdir(f"{root}/train/{class_dir}"))[:per_class]:
            shutil.copy(f"{root}/train/{class_dir}/{name}", f"{data}/{class_dir}/{name}")
    out = os.path.join(work, "run")
    run_encode(load_config(preset="tiny", out=out, data__train=data, data__classes_file=f"{root}/classes.json"))
    return out


def bare_loop(cfg) -> dict:
    """The same generation batches as the pipeline's plan, through one in-process Sampler; no Ray, no writes."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from realfake_ray.bank import read_bank
    from realfake_ray.stages.generate.plan import image_seed, plan_units, sampler_settings, unit_rows
    from realfake_ray.models import loading
    from realfake_ray.method.prompts import GENERATION_SUFFIX, build_prompt
    from realfake_ray.method.sampler import Sampler

    g = cfg.generate
    meta, files = read_bank(cfg.out)
    shape = tuple(meta["latent_shape"])
    started = time.time()
    sampler = Sampler(loading.load_pipeline(loading.resolve_model_dir(cfg.model.pretrained)), sampler_settings(g, "cpu"))
    load_s = time.time() - started
    tables = {f: pq.read_table(f) for f in files}
    units = plan_units(cfg.model_copy(update={"out": cfg.out + "-nothing-done"}), files)[0]
    batches = []
    for unit in units:
        table = tables[unit["file"]]
        indices = unit_rows(unit)
        for start in range(0, len(indices), g.batch_size):
            rows = table.take(indices[start : start + g.batch_size]).to_pylist()
            batches.append({
                "prompts": [build_prompt(r["class_name"], r["caption"], GENERATION_SUFFIX) for r in rows],
                "seeds": [image_seed(cfg.seed, r["image_id"], unit["copy_idx"]) for r in rows],
                "latent_mean": torch.tensor(np.array([r["latent_mean"] for r in rows], np.float32)).reshape(-1, *shape),
                "latent_std": torch.tensor(np.array([r["latent_std"] for r in rows], np.float32)).reshape(-1, *shape),
                "vision_tokens": torch.tensor(np.array([r["clip_embed"] for r in rows], np.float32)),
            })  # fmt: skip
    started = time.time()
    images = sum(len(sampler(**batch)) for batch in batches)
    seconds = time.time() - started
    return {"images": images, "seconds": round(seconds, 2), "images_per_s": round(images / seconds, 3),
            "model_load_s": round(load_s, 2)}  # fmt: skip


def pipeline(cfg) -> dict:
    """``run_generate`` end to end (Ray already up); the summary splits its time into Sampler calls and the rest."""
    from realfake_ray._internal.cluster import init_ray
    from realfake_ray.stages.generate.driver import run_generate

    init_ray(cfg.ray)
    started, cpu = time.time(), time.process_time()
    load = os.getloadavg()[0]
    summary = run_generate(cfg)
    wall = time.time() - started
    return {
        "driver_cpu_s": round(time.process_time() - cpu, 2),  # the driver's own CPU time (executor loop)
        "load_avg_1min_before_after": [round(load, 2), round(os.getloadavg()[0], 2)],
        "images": summary["generated_now"],
        "wall_s": round(wall, 2),
        "ray_data_s": summary["generation_s"],
        "sampler_s": summary["sampler_s"],
        "images_per_s_end_to_end": round(summary["generated_now"] / wall, 3),
        "images_per_s_in_actor": summary["sampler_images_per_s"],
    }


def in_ray_task(fn, *args):
    """``fn(*args)`` inside a 1-CPU Ray task: a Ray worker process, as the generation actor runs in."""
    import ray

    return ray.get(ray.remote(num_cpus=1)(fn).remote(*args))


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-class", type=int, default=None, help="images per class (default: all 1,437)")
    parser.add_argument("--steps", type=int, default=4, help="scheduler steps (the tiny preset's 4 by default)")
    parser.add_argument("--mult", type=int, default=1, help="copies per image (10: 14,370 images, start-up amortised)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from realfake_ray.config import load_config

    work = tempfile.mkdtemp(prefix="bench-generate-")
    try:
        out = make_bank(work, args.per_class)
        overrides = [f"generate.steps={args.steps}", f"generate.batch_size={args.batch_size}", "ray.num_cpus=2",
                     f"generate.images_per_shard={args.batch_size}", f"generate.mult={args.mult}",
                     "generate.actors.max_size=1"]  # one actor, one thread: the bare loop's resources  # fmt: skip
        cfg = load_config(preset="tiny", out=out, overrides=overrides)
        result = {"machine": machine(), "torch_threads_bare": torch.get_num_threads(), "steps": args.steps,
                  "batch_size": args.batch_size, "mult": args.mult}  # fmt: skip
        result["bare_before"] = bare_loop(cfg)
        result["pipeline"] = pipeline(cfg)
        result["torch_threads_actor"] = in_ray_task(torch_threads)
        result["bare_in_ray_task"] = in_ray_task(bare_loop, cfg)  # same loop, no pipeline around it
        result["bare_after"] = bare_loop(cfg)
        bare = (result["bare_before"]["images_per_s"] + result["bare_after"]["images_per_s"]) / 2
        p = result["pipeline"]
        result["overhead_end_to_end_pct"] = round(100 * (bare / p["images_per_s_end_to_end"] - 1), 1)
        result["overhead_in_actor_pct"] = round(100 * (bare / p["images_per_s_in_actor"] - 1), 1)
        result["actor_idle_s"] = round(p["wall_s"] - p["sampler_s"], 2)  # start-up, model load, drain, gaps
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
