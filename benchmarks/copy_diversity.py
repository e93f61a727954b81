#!/usr/bin/env python
"""How different are the synthetic copies of one real image? Tiny-CLIP cosine similarities in a stored run.

Why 10× copies did not beat 1× in the effectiveness table: either the copies of one source are near
duplicates (then more copies add little information), or the whole synthetic set sits away from the real
images (then more samples of it cannot close the gap). For a sample of sources of a multi-copy run this
measures, in the tiny CLIP's embedding space (mean cosine similarity):

    copies of one source                     the copies of the same real image, pairwise
    copies of other sources, same class      synthetic images of one class from different real images
    real images, same class                  the real train images of one class (the diversity to match)
    copy vs its real source                  each synthetic image against the real image it came from

    python benchmarks/copy_diversity.py --run runs/effectiveness/seed0/full --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json

from _common import machine, write_section  # first: puts the repository on sys.path

SECTION = "## Copy diversity (CPU, tiny base): how different are the copies of one real image?"


def similarities(run: str, sources: int, seed: int) -> dict:
    import numpy as np
    from PIL import Image

    from realfake_ray._internal.shards import read_parts, tensor_column
    from realfake_ray.config import load_config
    from realfake_ray.method.embeddings import ClipEmbedder
    from realfake_ray.layout import RunLayout

    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from realfake_ray.data.synthetic import list_shards

    layout = RunLayout(run)
    shards = [pq.read_table(u, columns=["image", "image_id", "copy_idx", "label"]) for u in list_shards(layout.shards_dir()).urls]
    manifest = pa.concat_tables(shards).to_pandas()
    bank = read_parts(layout.bank_dir("train"), ["image_id", "label", "clip_embed"])
    real = dict(zip(bank.column("image_id").to_pylist(), tensor_column(bank, "clip_embed")))
    picked = np.random.default_rng(seed).choice(sorted(manifest.image_id.unique()), sources, replace=False)
    rows = manifest[manifest.image_id.isin(picked)].sort_values(["image_id", "copy_idx"])
    pixels = [np.array(Image.open(io.BytesIO(image["bytes"])).convert("RGB")) for image in rows.image]
    synthetic = _unit(ClipEmbedder(load_config(preset="tiny", out=run)).embed(pixels, batch_size=256))
    source_of, label = rows.image_id.to_numpy(), rows.label.to_numpy()
    pairs = synthetic @ synthetic.T
    one_source = (source_of[:, None] == source_of[None, :]) & ~np.eye(len(rows), dtype=bool)
    same_class = (label[:, None] == label[None, :]) & (source_of[:, None] != source_of[None, :])
    reals = _unit(np.stack([real[i] for i in picked]))
    real_label = np.array([manifest[manifest.image_id == i].label.iloc[0] for i in picked])
    real_pairs = (real_label[:, None] == real_label[None, :]) & ~np.eye(len(picked), dtype=bool)
    return {
        "copies of one source": float(pairs[one_source].mean()),
        "copies of other sources, same class": float(pairs[same_class].mean()),
        "real images, same class": float((reals @ reals.T)[real_pairs].mean()),
        "copy vs its real source": float((synthetic * _unit(np.stack([real[i] for i in source_of]))).sum(1).mean()),
        "sources": int(sources), "images": int(len(rows)), "copies per source": int(rows.copy_idx.max() + 1),
    }


def _unit(x):
    import numpy as np

    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/effectiveness/seed0/full")
    parser.add_argument("--sources", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", metavar="BENCHMARKS.md")
    args = parser.parse_args()
    found = similarities(args.run, args.sources, args.seed)
    print(json.dumps(found, indent=1))
    keys = ["copies of one source", "copies of other sources, same class", "real images, same class",
            "copy vs its real source"]
    table = "\n".join(["| pairs | mean cosine similarity |", "| --- | ---: |"] + [f"| {k} | {found[k]:.3f} |" for k in keys])
    text = (f"{SECTION}\n\nMachine: {machine()}; `python benchmarks/copy_diversity.py --run {args.run}` "
            f"({found['sources']} random sources × {found['copies per source']} copies = {found['images']} synthetic "
            f"images; tiny-CLIP image embeddings, the same space as the effectiveness table's MMD²).\n\n{table}\n")
    print(text)
    if args.write:
        write_section(args.write, SECTION, text)


if __name__ == "__main__":
    main()
