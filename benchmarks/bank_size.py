#!/usr/bin/env python
"""Latent bank size: what storing the fine-tuning view (the whole short-side-resized image) next to the
generation view costs, measured on Parquet files the encoder wrote.

Encodes ``--images`` synthetic 4:3 photos (640×480, the commonest ImageNet shape) and as many square
ones with the tiny preset (32 px: 8×8 generation latents, 8×10 fine-tuning latents for 4:3), sums the
compressed Parquet column chunks per column group, and scales the per-image figures to SD v1.5 at 512 px
(4×64×64 vs 4×64×85 latents) by the measured bytes per latent value.

    python benchmarks/bank_size.py --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import machine, write_section  # first: puts the repository on sys.path

SECTION = "## Latent bank size (generation view + fine-tuning view)"
GROUPS = {"generation view": ("latent_mean", "latent_std"), "fine-tuning view": ("full_latent_mean", "full_latent_std"),
          "CLIP embedding": ("clip_embed",)}


def _dataset(root: Path, n: int, size: tuple[int, int]) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class_{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
        base = np.stack([xx * 255 // size[0], yy * 255 // size[1], (xx + yy) * 255 // sum(size)], -1)
        noise = rng.integers(0, 40, (size[1], size[0], 3))
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(folder / f"{i:04d}.jpg")
    return str(root)


def _bytes_per_group(bank: str) -> dict[str, float]:
    import pyarrow.parquet as pq

    from realfake_ray._internal.shards import part_files
    from realfake_ray.layout import RunLayout

    totals: dict[str, float] = {g: 0.0 for g in GROUPS} | {"other columns": 0.0}
    rows = 0
    for url in part_files(RunLayout(bank).bank_dir("train")):
        meta = pq.ParquetFile(url).metadata
        rows += meta.num_rows
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                column = group.column(c)
                name = column.path_in_schema.split(".")[0]
                key = next((k for k, cols in GROUPS.items() if name in cols), "other columns")
                totals[key] += column.total_compressed_size
    return {k: v / rows for k, v in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--write", metavar="BENCHMARKS.md")
    args = parser.parse_args()

    from realfake_ray.config import load_config
    from realfake_ray.stages.encode.driver import run_encode
    from realfake_ray.plots import markdown_table

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, size in (("4:3 (640×480)", (640, 480)), ("square (480×480)", (480, 480))):
            data = _dataset(Path(tmp) / name.split()[0].replace(":", "x"), args.images, size)
            out = str(Path(tmp) / f"bank-{size[0]}")
            run_encode(load_config(preset="tiny", out=out, data__train=data))
            per = _bytes_per_group(out)
            total = sum(per.values())
            rows.append({"images": name, **{f"{k} B/image": round(v, 1) for k, v in per.items()},
                         "total B/image": round(total, 1),
                         "× of a generation-view-only bank": round(total / (total - per["fine-tuning view"]), 2)})
    four_three = rows[0]
    per_value = four_three["generation view B/image"] / (2 * 4 * 8 * 8)  # mean + std of 4×8×8 latents
    gen_sd, full_sd = 2 * 4 * 64 * 64 * per_value, 2 * 4 * 64 * 85 * per_value
    clip_sd = 768 * 2
    text = (f"{SECTION}\n\nMachine: {machine()}; `python benchmarks/bank_size.py` ({args.images} images per shape, "
            f"tiny preset at 32 px, Parquet as the encoder writes it).\n\n{markdown_table(rows)}\n\n"
            f"Square images store the same latent twice (the views coincide; the encoder skips the second VAE "
            f"pass but not the bytes). Scaled to SD v1.5 at 512 px by the measured {per_value:.2f} bytes per "
            f"latent value (float16, Parquet compresses it little): a 4:3 image costs {gen_sd / 1024:.0f} KiB "
            f"(generation view, 4×64×64 mean + std) + {full_sd / 1024:.0f} KiB (fine-tuning view, 4×64×85) + "
            f"{clip_sd / 1024:.1f} KiB (CLIP), i.e. {(gen_sd + full_sd + clip_sd) / (gen_sd + clip_sd):.2f}× a "
            f"generation-view-only bank; ImageNet-1K (1.28 M images, mostly 4:3) ≈ "
            f"{1.281e6 * (gen_sd + full_sd + clip_sd) / 2**30:.0f} GiB instead of "
            f"{1.281e6 * (gen_sd + clip_sd) / 2**30:.0f} GiB.\n")
    print(text)
    if args.write:
        write_section(args.write, SECTION, text)


if __name__ == "__main__":
    main()
