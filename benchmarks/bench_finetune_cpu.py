#!/usr/bin/env python
"""Fine-tune stage throughput on CPU, tiny preset: the real ``run_finetune`` (Ray Train, DDP over gloo,
Ray Data streaming of the latent bank) with 1 and 2 workers.

Starts a local Ray cluster (``--num-cpus``, default: all cores), encodes the tiny bank once (or reuses
``--bank``), then for each worker count fine-tunes a fresh copy for ``--steps`` steps, one checkpoint at
the end. Reports per worker count:

* ``steady_samples_per_s``: global samples/s over the logged windows after the first (the first holds
  the data pipeline's start), time-weighted;
* ``loop_samples_per_s``: the training loop as a whole (from the first batch request to the last step);
* ``call_s``: the whole ``run_finetune`` call (Ray Train start, model loading, outputs).

    python benchmarks/bench_finetune_cpu.py                    # 1,2 workers, 80 steps
    python benchmarks/bench_finetune_cpu.py --workers 2 --steps 40 --bank runs/tiny
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

from _common import machine, write_section  # first: puts the repository on sys.path

SECTION = "## Fine-tuning (CPU, tiny preset)"


def steady_rate(history: list[dict]) -> float:
    """Time-weighted samples/s over the windows after the first (each window holds equal samples)."""
    rows = history[1:] or history
    return len(rows) / sum(1.0 / r["samples_per_s"] for r in rows)


def bench(bank: str, workers: int, steps: int, batch: int, log_every: int) -> dict:
    from realfake_ray import storage
    from realfake_ray.config import load_config
    from realfake_ray.stages.finetune.driver import run_finetune
    from realfake_ray.layout import RunLayout

    out = tempfile.mkdtemp(prefix=f"bench-ft-{workers}w-")
    shutil.copytree(os.path.join(bank, "latents"), os.path.join(out, "latents"))
    cfg = load_config(preset="tiny", out=out, overrides=[
        f"finetune.num_workers={workers}", f"finetune.max_steps={steps}", f"finetune.batch_size={batch}",
        f"finetune.log_every={log_every}", f"finetune.checkpoint_every={steps}",
    ])
    started = time.time()
    done = run_finetune(cfg)
    call_s = time.time() - started
    text = storage.read_text(storage.join(RunLayout(out).finetune_dir(), "metrics.jsonl"))
    history = [json.loads(line) for line in text.splitlines()]
    shutil.rmtree(out, ignore_errors=True)
    return {
        "workers": workers,
        "global_batch": batch * workers,
        "steps": steps,
        "steady_samples_per_s": round(steady_rate(history), 1),
        "loop_samples_per_s": done["samples_per_s"],
        "call_s": round(call_s, 1),
        "final_loss": round(done["final_loss"], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", default="1,2", help="comma list of worker counts")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=16, help="per worker (the tiny preset's)")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--num-cpus", type=int, default=None, help="local Ray cluster CPUs (default: all cores)")
    parser.add_argument("--bank", default=None, help="a run directory that already holds the tiny latent bank")
    parser.add_argument("--write", metavar="BENCHMARKS.md", help="write the results as this script's section")
    args = parser.parse_args()

    import torch

    from realfake_ray._internal.cluster import init_ray
    from realfake_ray.config import RayConfig, load_config
    from realfake_ray.stages.encode.driver import run_encode
    from realfake_ray.plots import markdown_table

    init_ray(RayConfig(num_cpus=args.num_cpus))
    bank = args.bank
    if bank is None:
        bank = tempfile.mkdtemp(prefix="bench-ft-bank-")
        run_encode(load_config(preset="tiny", out=bank))
    rows = [bench(bank, int(w), args.steps, args.batch_size, args.log_every) for w in args.workers.split(",")]
    text = (f"{SECTION}\n\n`realfake finetune` end to end (`run_finetune`: Ray Train `TorchTrainer`, DDP over gloo, "
            f"Ray Data streaming the latent bank, no VAE), tiny preset (latent 4×8×8, LoRA rank 4 on "
            f"`to_q,to_k,to_v,to_out.0`, batch {args.batch_size} per worker, fp32), {args.steps} steps, one checkpoint "
            f"at the end. Machine: {machine()}, torch {torch.__version__}, local Ray cluster of "
            f"{args.num_cpus or os.cpu_count()} CPUs. Command: `python benchmarks/bench_finetune_cpu.py`. "
            f"*steady*: global samples/s over the logged windows after the first, time-weighted; *loop*: the "
            f"training loop from the first batch request to the last step; *call_s*: the whole `run_finetune` "
            f"call (Ray Train start-up, model loading, checkpoint, outputs).\n\n{markdown_table(rows)}\n")
    print(text)
    if args.write:
        write_section(args.write, SECTION, text)

if __name__ == "__main__":
    main()
