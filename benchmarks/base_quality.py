#!/usr/bin/env python
"""Quality of the shipped tiny base (or any pretrained base directory): what one would ask of SD v1.5.

* VAE reconstruction PSNR on the 360 real val digits (never seen in pretraining) and on held-out corpus
  images;
* text conditioning: txt2img "photo of digit k, best quality" recognised as class k by a classifier
  trained on other corpus images (the "judge"), per class, at two guidance scales;
* tiny-CLIP zero-shot top-1 ("photo of digit k") on held-out corpus images and on the real val digits.

    python benchmarks/base_quality.py --write BENCHMARKS.md
    python benchmarks/base_quality.py --model /path/to/retrained/base
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time

from _common import machine, write_section  # first: puts the repository on sys.path

SECTION = "## Tiny base quality (CPU)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a pretrained base directory (default: the shipped one)")
    parser.add_argument("--per-class", type=int, default=50, help="txt2img samples per class")
    parser.add_argument("--steps", type=int, default=20, help="UniPC steps for txt2img")
    parser.add_argument("--write", metavar="BENCHMARKS.md")
    args = parser.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    from realfake_ray.models.base_quality import per_class_recognition, train_corpus_judge, txt2img_per_class
    from realfake_ray.models.loading import TINY_BASE_DIR, load_pipeline
    from realfake_ray.models.pretrain import PretrainConfig, clip_zero_shot, render_corpus, vae_psnr
    from realfake_ray.plots import markdown_table
    from realfake_ray.storage import resolve_embedded

    model_dir = args.model or TINY_BASE_DIR
    pipe = load_pipeline(model_dir, torch_dtype=torch.float32)
    record = json.load(open(os.path.join(model_dir, "training.json")))
    cfg = PretrainConfig(**record["config"])
    root = resolve_embedded("embedded:digits")
    files = sorted(glob.glob(f"{root}/val/*/*.png"))
    real = np.stack([np.array(Image.open(f).convert("RGB")) for f in files])
    real_labels = np.array([int(f.split("/")[-2].rsplit("_", 1)[1]) for f in files])
    held, held_labels, _ = render_corpus(cfg.seed, cfg.corpus_size, cfg.corpus_size + cfg.holdout_size)
    began = time.time()
    judge = train_corpus_judge(seed=cfg.seed)
    judge_acc = float(np.mean(per_class_recognition(judge, held, held_labels)))
    rows, labels = [], np.repeat(np.arange(10), args.per_class)
    for scale in (2.0, 5.0):
        images = txt2img_per_class(pipe, args.per_class, args.steps, scale, seed=1)
        rates = per_class_recognition(judge, images, labels)
        rows.append({"txt2img guidance": scale, "mean": round(float(np.mean(rates)), 3),
                     "min": round(float(np.min(rates)), 3), **{f"digit {k}": round(r, 2) for k, r in enumerate(rates)}})
        if scale == 2.0:
            grid = images.reshape(10, args.per_class, 32, 32, 3)[:, :10].transpose(0, 2, 1, 3, 4).reshape(320, 320, 3)
            Image.fromarray(grid).resize((640, 640), Image.NEAREST).save(os.path.join(os.path.dirname(__file__), "base_txt2img.png"))
    quality = [{
        "VAE PSNR real val (dB)": round(vae_psnr(pipe.vae, real), 2),
        "VAE PSNR corpus hold-out (dB)": round(vae_psnr(pipe.vae, held), 2),
        "CLIP zero-shot corpus hold-out": round(clip_zero_shot(pipe.text_encoder, pipe.image_encoder, pipe.tokenizer, held, held_labels), 3),
        "CLIP zero-shot real val": round(clip_zero_shot(pipe.text_encoder, pipe.image_encoder, pipe.tokenizer, real, real_labels), 3),
    }]
    phases = record["phases"]
    training = [{"phase": name, "steps": p.get("steps", "—"), "batch": p.get("batch", "—"), "seconds": p.get("seconds"),
                 "final": ", ".join(f"{k} {v:.4g}" for k, v in p.get("final", {}).items() if k != "step") or "—",
                 "trained": "with an earlier base, reused" if p.get("reused_from") else "this run"}
                for name, p in phases.items()]
    text = (f"{SECTION}\n\nMachine: {machine()} (torch {torch.__version__}); `python benchmarks/base_quality.py` "
            f"({time.time() - began:.0f} s). Base: `{os.path.relpath(model_dir)}`, pretrained by "
            f"`realfake pretrain-base` in {record['wall_seconds'] / 60:.1f} min on {record['machine']['cpus']} CPUs "
            f"(corpus seed {cfg.seed}, {cfg.corpus_size:,} images; UNet layout "
            f"`{record['config'].get('unet_layout', 'v1')}`; per phase below, a reused phase with the time it took "
            f"when it was trained).\n\n"
            f"{markdown_table(training)}\n\n{markdown_table(quality)}\n\n"
            f"Text conditioning: {args.per_class} txt2img samples per class (UniPC {args.steps} steps, negative "
            f"prompt), recognised by a ResNet trained on 6,000 other corpus images (its accuracy on the corpus "
            f"hold-out: {judge_acc:.3f}):\n\n{markdown_table(rows)}\n\n"
            f"![txt2img samples, one row per prompt digit 0–9](benchmarks/base_txt2img.png)\n")
    print(text)
    if args.write:
        write_section(args.write, SECTION, text)


if __name__ == "__main__":
    main()
