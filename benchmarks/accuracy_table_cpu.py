#!/usr/bin/env python
"""The embedded-dataset accuracy table, tiny preset: real-only vs synthetic-only 1× and 10× vs mix.

One run URL (default ``runs/demo``, what ``make demo`` leaves: latent bank, LoRA, a 10× synthetic set;
missing stages are run first) and tagged classifiers trained with the tiny preset's recipe, all the same
epochs, so the 10× classifier takes 10× the steps of the 1× one as in the paper's scaling runs:

* ``real``: the 1,437 real train images;
* ``synthetic-1x`` / ``synthetic-10x``: copy 0 only / all 10 copies of each image;
* ``mix-1x``: every real image plus copy 0 of each (half the epoch synthetic).

Val top-1/top-5 on the 360 real val images and the CLIP-space MMD² come from each ``metrics.json``.

    OMP_NUM_THREADS=1 python benchmarks/accuracy_table_cpu.py --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import time

from _common import machine, write_section  # first: puts the repository on sys.path

SECTION = "## Accuracy on the embedded digits (CPU, tiny preset)"
CLASSIFIERS = {  # tag → overrides
    "real": ["train.source=real"],
    "synthetic-1x": ["train.source=synthetic", "train.synthetic_mult=1"],
    "synthetic-10x": ["train.source=synthetic"],
    "mix-1x": ["train.source=mix", "train.synthetic_mult=1"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--write", metavar="BENCHMARKS.md", help="write the results as this script's section")
    args = parser.parse_args()

    import ray
    import torch

    from realfake_ray.config import load_config
    from realfake_ray.plots import markdown_table
    from realfake_ray.run import run_pipeline
    from realfake_ray.train import run_train

    base = load_config(preset="tiny", out=args.out, overrides=["generate.mult=10"])
    run_pipeline(base, only=["encode", "finetune", "generate"])  # complete stages skip themselves
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = []
    for tag, overrides in CLASSIFIERS.items():
        cfg = load_config(preset="tiny", out=args.out, overrides=["generate.mult=10", f"train.tag={tag}", *overrides])
        began = time.time()
        summary = run_train(cfg)
        ev, dist = summary["evaluation"], summary["evaluation"]["distribution"]
        rows.append({
            "classifier": tag, "real_images": summary["real_images"], "synthetic_images": summary["synthetic_images"],
            "epoch_images": summary["epoch_images"], "epochs": summary["epochs"],
            "val_top1": ev["sets"]["val"]["top1"], "val_top5": ev["sets"]["val"]["top5"],
            "mmd2": dist.get("mmd2") if summary["synthetic_images"] else None, "call_s": round(time.time() - began, 1),
        })
        print(rows[-1], flush=True)
    table = markdown_table(rows)
    text = (f"{SECTION}\n\nMachine: {machine()} (torch {torch.__version__}, Ray {ray.__version__}); "
            f"`OMP_NUM_THREADS=1 python benchmarks/accuracy_table_cpu.py --out {args.out}`. Tiny preset: "
            f"`resnet_tiny` at 32 px, {base.train.epochs} epochs, batch {base.train.batch_size} × "
            f"{base.train.num_workers} workers, cosine schedule; val = the 360 real val digits (chance 0.10); "
            f"`mmd2`: Gaussian-kernel MMD² between real and synthetic tiny-CLIP embeddings (none for real-only). "
            f"`call_s` = the whole `run_train` call (Ray Train start-up and evaluation included).\n\n{table}\n")
    print(text)
    if args.write:
        write_section(args.write, SECTION, text)


if __name__ == "__main__":
    main()
