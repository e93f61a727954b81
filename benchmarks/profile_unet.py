#!/usr/bin/env python
"""Where a sampler step's GPU time goes: torch.profiler over SD v1.5 UNet forwards (random weights).

One CFG step of the sampler = one UNet forward on 2 × batch latents. Prints the top operators by CUDA
time and a grouped summary (convolution, attention, matmul, normalisation, other).

    python benchmarks/profile_unet.py --batch-size 32 --dtype bf16      # GPU only
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

GROUPS = (("attention", ("attention", "flash", "sdpa", "efficient_attention", "fmha")),
          ("convolution", ("conv", "cudnn")), ("matmul", ("gemm", "matmul", "addmm", "mm", "linear", "bmm")),
          ("normalisation", ("norm",)))


def group_of(name: str) -> str:
    lowered = name.lower()
    for group, keys in GROUPS:
        if any(k in lowered for k in keys):
            return group
    return "other (elementwise, copies, activations)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=32, help="images per generation batch (UNet sees 2×)")
    parser.add_argument("--dtype", choices=["fp16", "bf16"], default="bf16")
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    from bench_sampler import build_sd15_unet
    from torch.profiler import ProfilerActivity, profile

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    torch.backends.cudnn.benchmark = True
    with torch.device("cuda"):
        unet = build_sd15_unet().to(dtype).to(memory_format=torch.channels_last).eval()
    n = 2 * args.batch_size
    x = torch.randn(n, 4, 64, 64, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)
    text = torch.randn(n, 77, 768, device="cuda", dtype=dtype)
    t = torch.full((n,), 500, device="cuda")
    with torch.inference_mode():
        for _ in range(3):
            unet(x, t, text)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.iters):
                unet(x, t, text)
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.self_device_time_total for e in events)
    print(f"# SD v1.5 UNet forward, {n} latents 4x64x64 ({args.batch_size} images with CFG), {args.dtype}, "
          f"channels_last; {torch.cuda.get_device_name()}; {total / args.iters / 1e3:.1f} ms CUDA time per forward")
    grouped = defaultdict(float)
    for e in events:
        grouped[group_of(e.key)] += e.self_device_time_total
    for group, us in sorted(grouped.items(), key=lambda kv: -kv[1]):
        print(f"{group:45s} {100 * us / total:5.1f} %")
    print()
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
