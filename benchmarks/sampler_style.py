#!/usr/bin/env python
"""How sharp are the generated digits against the real ones, per sampler setting? (CPU, tiny base)

The embedded digits are 8×8 scans upsampled to 32 px: blurry. The reference's negative prompt names "blurry",
so classifier-free guidance pushes every copy away from that look. This measures it: the mean absolute
Laplacian (grey levels, 0–255) of img2img copies of the same 60 bank images, with a run's LoRA, for the
reference's sampler and variants, against the VAE reconstructions of those images' latents.

    python benchmarks/sampler_style.py --run runs/effectiveness/seed0/mmd-0.003
"""

from __future__ import annotations

import argparse

from _common import machine  # first: puts the repository on sys.path

VARIANTS = [  # (name, SamplerSettings overrides, LoRA scale)
    ("the reference's: CFG 2 with its negative prompt", {}, 0.5),
    ("CFG 2, empty negative prompt", {"negative_prompt": ""}, 0.5),
    ("no CFG (guidance 1)", {"guidance_scale": 1.0}, 0.5),
    ("the reference's, LoRA scale 1.0", {}, 1.0),
    ("the reference's, strength 0.5", {"strength": 0.5}, 0.5),
]


def laplacian_sharpness(images) -> float:
    """Mean |4-neighbour Laplacian| of uint8 NHWC images, on their grey levels."""
    g = images.astype("float32").mean(-1)
    lap = 4 * g[:, 1:-1, 1:-1] - g[:, :-2, 1:-1] - g[:, 2:, 1:-1] - g[:, 1:-1, :-2] - g[:, 1:-1, 2:]
    return float(abs(lap).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a tiny-preset run with a latent bank and a LoRA")
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--steps", type=int, default=10, help="UniPC steps (the paper's rows of the effectiveness table)")
    args = parser.parse_args()

    import numpy as np
    import torch

    from realfake_ray._internal.shards import read_parts, tensor_column
    from realfake_ray.method.prompts import GENERATION_SUFFIX, build_prompt
    from realfake_ray.method.sampler import Sampler, SamplerSettings
    from realfake_ray.models.loading import load_pipeline, resolve_model_dir

    table = read_parts(f"{args.run}/latents/train")
    table = table.take(np.random.default_rng(0).choice(table.num_rows, args.images, replace=False))
    shape = (-1, 4, 8, 8)
    mean = torch.from_numpy(tensor_column(table, "latent_mean").reshape(shape))
    std = torch.from_numpy(tensor_column(table, "latent_std").reshape(shape))
    prompts = [build_prompt(name, "", GENERATION_SUFFIX) for name in table.column("class_name").to_pylist()]

    def pipe():
        return load_pipeline(resolve_model_dir("preset:tiny"), torch_dtype=torch.float32)

    base = pipe()
    with torch.no_grad():
        real = base.vae.decode(mean / base.vae.config.scaling_factor).sample.clamp(-1, 1)
    real = ((real + 1) * 127.5).permute(0, 2, 3, 1).numpy().astype(np.uint8)
    print(f"Machine: {machine()}; run {args.run}; {args.images} bank images, UniPC {args.steps} steps\n")
    print("| images | mean abs Laplacian |\n| --- | ---: |")
    print(f"| real (VAE reconstructions of the bank latents) | {laplacian_sharpness(real):.2f} |")
    for name, overrides, scale in VARIANTS:
        sampler = Sampler.from_pipeline(pipe(), SamplerSettings(steps=args.steps, **overrides),
                                        lora_dir=f"{args.run}/lora", lora_scale=scale)
        images = sampler(prompts=prompts, seeds=list(range(args.images)), latent_mean=mean, latent_std=std)
        print(f"| {name} | {laplacian_sharpness(images):.2f} |", flush=True)


if __name__ == "__main__":
    main()
