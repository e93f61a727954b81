#!/usr/bin/env python
"""Generation throughput of the Sampler on the SD v1.5 architecture (random weights), over a grid.

Standalone: needs only torch, diffusers and transformers (+ accelerate for the reference row); the
repository root is put on sys.path, nothing is installed or downloaded. Speed does not depend on the
weights, so the SD v1.5 architecture is built from its config with random weights.

    python benchmarks/bench_sampler.py --csv bench_sampler.csv                       # GPU, default grid
    python benchmarks/bench_sampler.py --dtypes bf16 --batch-sizes 24,32 --compile 0,1 --channels-last 1
    python benchmarks/bench_sampler.py --tiny --device cpu                           # CPU smoke run
    python benchmarks/bench_sampler.py --row name=ours,dtype=bf16,batch_size=32,channels_last=1,compile=1 \
        --row name=graphs,dtype=bf16,batch_size=32,channels_last=1,compile=1,compile_mode=reduce-overhead

``--row`` gives rows one by one (any SamplerSettings field, ``batch_size``, ``name``) instead of the grid's
cartesian product. Prints one table row per grid point as it finishes (images/s, s/batch, TFLOP/img, MFU, peak GiB), then the
whole table; ``--csv`` writes the rows (rewritten after each row, so a killed run keeps what it measured).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from realfake_ray.tools.sampler_bench import format_table, make_grid, run_grid  # noqa: E402
from realfake_ray.method.sampler import SCHEDULERS  # noqa: E402

SD15_TEXT_LEN = 77


def build_sd15_unet():
    """SD v1.5's UNet2DConditionModel architecture (860M parameters), random weights."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def build_sd15_vae():
    """SD v1.5's AutoencoderKL architecture (factor 8, 4 latent channels), random weights."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=0.18215,
    )


def sd15_scheduler():
    """SD v1.5's noise schedule (scaled-linear betas 0.00085..0.012), sampled with UniPC."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )


def build_sd15_pipeline(device: str = "cpu"):
    """A StableDiffusionPipeline with SD v1.5's architecture and random weights, built on ``device``.

    The tokenizer is the tiny preset's (speed does not depend on the vocabulary); the text encoder's
    vocabulary is sized to it. CLIP text ViT-L/14 and CLIP vision ViT-L/14 (projection 768) as in SD v1.5
    + openai/clip-vit-large-patch14, with that model's image preprocessing. ``save_pretrained`` makes it a
    diffusers directory that ``model.pretrained`` can name (benchmarks/gpu_pipeline.py).
    """
    from diffusers import StableDiffusionPipeline
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from realfake_ray.models.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    text_config = CLIPTextConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_attention_heads=12,
        num_hidden_layers=12,
        max_position_embeddings=SD15_TEXT_LEN,
        vocab_size=len(tokenizer.get_vocab()),
        projection_dim=768,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision_config = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_attention_heads=16,
        num_hidden_layers=24,
        patch_size=14,
        image_size=224,
        projection_dim=768,
        hidden_act="quick_gelu",
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialise directly on the GPU: much faster than 1.2B parameters on CPU
        components = {
            "unet": build_sd15_unet(),
            "vae": build_sd15_vae(),
            "text_encoder": CLIPTextModel(text_config),
            "image_encoder": CLIPVisionModelWithProjection(vision_config),
        }
    return StableDiffusionPipeline(
        **components,
        tokenizer=tokenizer,
        scheduler=sd15_scheduler(),
        safety_checker=None,
        feature_extractor=CLIPImageProcessor(),  # CLIP ViT-L/14's preprocessing (224 px), the class defaults
        requires_safety_checker=False,
    )


def _str_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _int_list(text: str) -> list[int]:
    return [int(part) for part in _str_list(text)]


def _bool_list(text: str) -> list[bool]:
    values = {"0": False, "1": True, "false": False, "true": True, "n": False, "y": True}
    try:
        return [values[part.lower()] for part in _str_list(text)]
    except KeyError as err:
        raise argparse.ArgumentTypeError(f"expected a comma list of 0/1, got {text!r}") from err


def _value(text: str):
    """A --row value: int, float, bool (true/false; 0/1 stay ints), none, else the string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false", "none", "null"):
        return {"true": True, "false": False}.get(lowered)
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def _row(text: str) -> dict:
    """``key=value,key=value`` -> a grid row (0/1 of the boolean settings become booleans)."""
    row = {}
    for part in _str_list(text):
        key, sep, value = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--row expects key=value pairs, got {part!r}")
        row[key.strip()] = _value(value)
    for key in ("compile", "channels_last", "fuse_qkv", "sample_posterior", "negative_vision_token"):
        if key in row:
            row[key] = bool(row[key])
    return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="use the tiny preset (32 px) instead of SD v1.5 (CPU smoke)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--schedulers", type=_str_list, default=["unipc"], help=f"comma list of {sorted(SCHEDULERS)}")
    parser.add_argument("--steps", type=_int_list, default=None, help="comma list (default 30; tiny 10)")
    parser.add_argument("--batch-sizes", type=_int_list, default=None, help="comma list (default 8,24; tiny 2)")
    parser.add_argument("--dtypes", type=_str_list, default=None, help="comma list of fp32,fp16,bf16 (default fp16,bf16; CPU fp32)")
    parser.add_argument("--compile", type=_bool_list, default=[False], help="comma list of 0/1 (torch.compile the UNet)")
    parser.add_argument("--channels-last", type=_bool_list, default=None, help="comma list of 0/1 (default 0,1; CPU 0)")
    parser.add_argument("--row", type=_row, action="append", default=[],
                        help="one grid row as key=value pairs (SamplerSettings fields, batch_size, name); repeatable, "
                             "replaces the cartesian grid")
    parser.add_argument("--strength", type=float, default=0.75)
    parser.add_argument("--guidance-scale", type=float, default=2.0)
    parser.add_argument("--mode", choices=["img2img", "txt2img"], default="img2img")
    parser.add_argument("--iters", type=int, default=3, help="timed batches per grid point")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches first (>=1 with --compile 1)")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference baseline row")
    parser.add_argument("--reference-batch-size", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csv", default=None, help="write the result rows to this CSV file")
    args = parser.parse_args(argv)
    on_gpu = torch.device(args.device).type == "cuda"
    args.steps = args.steps or ([10] if args.tiny else [30])
    args.batch_sizes = args.batch_sizes or ([2] if args.tiny else [8, 24])
    args.dtypes = args.dtypes or (["fp16", "bf16"] if on_gpu else ["fp32"])
    args.channels_last = args.channels_last or ([False, True] if on_gpu else [False])
    return args


def write_csv(rows: list[dict], path: str) -> None:
    """Write rows to ``path`` atomically (temp file + rename)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return f"CPU x{torch.get_num_threads()} threads (torch {torch.__version__})"


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 rows use TF32 (and MFU uses the TF32 peak)
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    if args.tiny:
        from realfake_ray.models.tiny import build_random_tiny_pipeline

        pipe, arch = build_random_tiny_pipeline(), "tiny architecture, random weights (32 px, latent 4x8x8)"
    else:
        pipe, arch = build_sd15_pipeline(args.device), "SD v1.5 architecture, random weights (512 px, latent 4x64x64)"
    fixed = {"strength": args.strength, "guidance_scale": args.guidance_scale, "mode": args.mode}
    grid = [fixed | row for row in args.row] or make_grid(
        args.schedulers, args.steps, args.batch_sizes, args.dtypes, args.compile, args.channels_last,
        reference=False, **fixed,
    )  # fmt: skip
    if not args.no_reference:
        grid.append({"name": "reference", "reference": True, "scheduler": "unipc", "steps": 30, "strength": 0.75,
                     "guidance_scale": 2.0, "dtype": "fp16", "batch_size": args.reference_batch_size})  # fmt: skip
    print(f"# bench_sampler: {arch} on {describe_device(device)}; {len(grid)} grid points, "
          f"warmup {args.warmup}, iters {args.iters}", flush=True)  # fmt: skip
    done: list[dict] = []

    def report(row: dict) -> None:
        done.append(row)
        print(format_table([row]).splitlines()[1], flush=True)
        if args.csv:
            write_csv(done, args.csv)

    print(format_table([]), flush=True)
    rows = run_grid(pipe, grid, device, iters=args.iters, warmup=args.warmup, seed=args.seed, on_row=report)
    print("\n" + format_table(rows))
    if args.csv:
        print(f"# wrote {args.csv}")
    return rows


if __name__ == "__main__":
    main()
