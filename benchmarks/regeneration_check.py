#!/usr/bin/env python
"""Did a change move what generate produces? Regenerate the first shard (up to 512 images) of a stored
tiny-preset run with the current code and compare the JPEG bytes with the run's images (its shards, or the
one-file-per-image layout of earlier versions).

    python benchmarks/regeneration_check.py runs/effectiveness/seed0/full     # RESULT 512/512 identical

The run's latents, LoRA and recorded generate settings are reused (the LoRA digest must match); nothing is
written into the run. A change that keeps every image byte-identical leaves the effectiveness rows as
they are.
"""

from __future__ import annotations

import shutil
import sys
import tempfile

import _common  # noqa: F401  (repository root on sys.path)

# Recorded settings (``<run>/synthetic/_settings.json``) that are ``generate.*`` keys of the same name.
_KEYS = ("mode", "strength", "steps", "scheduler", "guidance_scale", "vision_token", "lora_scale", "jpeg_quality",
         "sample_posterior", "negative_vision_token", "storage_size", "speedup", "negative_prompt")


def identical(run: str) -> tuple[int, int]:
    """``(identical, compared)`` JPEGs of the first load unit of ``run``."""
    import pyarrow as pa

    from realfake_ray import storage
    from realfake_ray.bank import class_mean_embeddings, read_bank
    from realfake_ray.config import load_config
    import pyarrow.parquet as pq

    from realfake_ray.data.synthetic import list_shards
    from realfake_ray.stages.generate.plan import find_lora, images_per_shard, plan_units
    from realfake_ray.stages.generate.workers import encode_jpeg, generate_in_process, load_units

    recorded = storage.read_json(f"{run}/synthetic/_settings.json")
    tmp = tempfile.mkdtemp(prefix="regen-")
    shutil.copytree(f"{run}/latents", f"{tmp}/latents")
    shutil.copytree(f"{run}/lora", f"{tmp}/lora")
    recorded["speedup"] = recorded.get("speedup") or "none"  # recorded as null (absent in older runs) when off
    overrides = ["generate.mult=1"] + [f"generate.{k}={recorded[k]}" for k in _KEYS if recorded.get(k) is not None]
    cfg = load_config(preset="tiny", out=tmp, seed=recorded["seed"], overrides=overrides)
    meta, files = read_bank(tmp)
    units = plan_units(cfg, files, images_per_shard(cfg.generate, int(meta["resolution"])))[0][:1]
    lora_url, sha = find_lora(cfg)
    if sha != recorded["lora_sha256"]:
        raise SystemExit(f"{run}: its LoRA digest {sha} differs from the recorded {recorded['lora_sha256']}")
    means = class_mean_embeddings(files, len(meta["class_dirs"])) if cfg.generate.vision_token == "class_mean" else None
    spec = {"lora_url": lora_url, "lora_sha256": sha, "latent_shape": meta["latent_shape"], "class_means": means}
    images = generate_in_process(cfg, spec, units).images
    g = cfg.generate
    batches = load_units(pa.Table.from_pylist(units), seed=cfg.seed, batch_size=g.batch_size, mode=g.mode,
                         vision_token=g.vision_token, collisions=frozenset())
    paths = [p for row in batches.column("path").to_pylist() for p in row]
    stored = {}
    for url in list_shards(f"{run}/synthetic/data").urls:
        stored |= {i["path"]: i["bytes"] for i in pq.read_table(url, columns=["image"])["image"].to_pylist()}

    def original(path: str) -> bytes:
        return stored[path] if stored else storage.read_bytes(f"{run}/synthetic/train/{path}")

    same = sum(encode_jpeg(image, g.jpeg_quality, g.storage_size) == original(p) for image, p in zip(images, paths))
    shutil.rmtree(tmp, ignore_errors=True)
    return same, len(paths)


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        sys.exit(__doc__)
    same, total = identical(sys.argv[1])
    print(f"RESULT {same}/{total} identical")
