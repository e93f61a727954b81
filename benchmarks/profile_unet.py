#!/usr/bin/env python
"""Where the generate stage's sampling time goes: torch.profiler over whole Sampler calls, with exactly the
sampler settings the stage would use (``generate.*`` of the given config: dtype, batch, channels_last, compile
and the speed options), on the SD v1.5 architecture with random weights (or a model directory).

Prints, per profiled call: wall time; the GPU's busy share of it (kernels running; the rest is launch and host
overhead — a launch-bound loop shows up here); the time of each phase (``sampler.prepare`` text encoding and
start latents, ``sampler.denoise`` the UNet loop, ``sampler.decode`` the VAE, ``sampler.to_host`` the copy to
uint8 host arrays): host wall time and the kernel time launched inside it; the kernel time grouped into attention, convolution, matmul,
normalisation, compiled fusions and other; and the top kernels.

    python benchmarks/profile_unet.py                                   # GPU: the generate defaults (fp16, batch 24)
    python benchmarks/profile_unet.py --set generate.dtype=bf16 --set generate.batch_size=32 --set generate.compile=true
    python benchmarks/profile_unet.py --model /tmp/sd15-random --config run.yaml   # a saved diffusers directory
    python benchmarks/profile_unet.py --tiny --set generate.steps=4      # CPU smoke run (tiny preset)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from realfake_ray.config import load_config  # noqa: E402
from realfake_ray.method.sampler import Sampler  # noqa: E402
from realfake_ray.models.loading import load_pipeline  # noqa: E402
from realfake_ray.stages.generate.plan import sampler_settings  # noqa: E402
from realfake_ray.tools.sampler_bench import bench_inputs, speed_options  # noqa: E402

PHASES = ("sampler.prepare", "sampler.denoise", "sampler.decode", "sampler.to_host")
# Kernel (GPU) or operator (CPU) name fragments, first match wins: cuDNN convolutions are "*fprop*"/"*implicit_gemm*",
# cuBLAS(Lt) matmuls "*gemm*"/"nvjet*", torch.compile's fused Triton kernels "triton_*".
GROUPS = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "attn")),
    ("convolution", ("conv", "fprop", "dgrad", "wgrad", "implicit_gemm", "winograd")),
    ("matmul", ("gemm", "nvjet", "cutlass", "matmul", "aten::mm", "addmm", "bmm", "aten::linear")),
    ("normalisation", ("norm",)),
    ("compiled fusions (triton)", ("triton",)),
)


def group_of(name: str) -> str:
    """The kernel group of a kernel or operator name.

    Example:
        >>> group_of("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc"), group_of("nvjet_hsh_128x256")
        ('convolution', 'matmul')
        >>> group_of("flash_fwd_kernel"), group_of("triton_red_fused_native_group_norm_0"), group_of("elementwise_kernel")
        ('attention', 'normalisation', 'other (elementwise, copies, activations)')
    """
    lowered = name.lower()
    for group, keys in GROUPS:
        if any(k in lowered for k in keys):
            return group
    return "other (elementwise, copies, activations)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="a realfake YAML config: its generate section is what gets profiled")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (as the CLI's)")
    parser.add_argument("--model", help="a diffusers directory (default: SD v1.5 architecture, random weights)")
    parser.add_argument("--tiny", action="store_true", help="the tiny architecture with random weights (CPU smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first (compile, CUDA graph recording)")
    parser.add_argument("--iters", type=int, default=1, help="profiled calls")
    parser.add_argument("--top", type=int, default=25, help="kernels listed")
    parser.add_argument("--trace", help="also write a Chrome trace here (large)")
    parser.add_argument("--out", help="also write the report to this file")
    return parser.parse_args(argv)


def build_pipeline(args: argparse.Namespace, device: torch.device):
    if args.model:
        return load_pipeline(args.model), args.model
    if args.tiny:
        from realfake_ray.models.tiny import build_random_tiny_pipeline

        return build_random_tiny_pipeline(), "tiny architecture, random weights"
    from bench_sampler import build_sd15_pipeline

    return build_sd15_pipeline(str(device)), "SD v1.5 architecture, random weights"


def _ms(us: float, calls: int) -> str:
    return f"{us / 1e3 / calls:9.1f} ms"


def summarise(prof, wall_s: float, calls: int, on_gpu: bool, top: int) -> list[str]:
    """The report's lines: wall and GPU-busy time, phases, kernel groups and top kernels, per call."""
    events = prof.key_averages()
    kernels = [e for e in events if (e.device_type == torch.autograd.DeviceType.CUDA) == on_gpu and not e.key.startswith("sampler.")]
    self_time = (lambda e: e.self_device_time_total) if on_gpu else (lambda e: e.self_cpu_time_total)
    kernels = [e for e in kernels if self_time(e) > 0 and (on_gpu or e.key.startswith("aten::"))]
    busy = sum(self_time(e) for e in kernels)
    lines = [f"wall {wall_s / calls * 1e3:.1f} ms per call; "
             + (f"GPU busy {busy / 1e3 / calls:.1f} ms = {100 * busy / 1e6 / wall_s:.1f} % of the wall (the rest: launch "
                "and host overhead)" if on_gpu else f"CPU operator self time {busy / 1e3 / calls:.1f} ms")]
    lines += ["", f"{'phase':20s} {'host wall':>12s} {'kernel time':>12s}"]
    for phase in PHASES:
        found = [e for e in events if e.key == phase and e.device_type == torch.autograd.DeviceType.CPU]
        host, device = sum(e.cpu_time_total for e in found), sum(e.device_time_total for e in found)
        lines.append(f"{phase:20s} {_ms(host, calls)} {_ms(device, calls) if on_gpu else '':>12s}")
    grouped: dict[str, float] = defaultdict(float)
    for e in kernels:
        grouped[group_of(e.key)] += self_time(e)
    lines += ["", f"{'kernel group':42s} {'per call':>12s} {'share':>7s}"]
    for group, us in sorted(grouped.items(), key=lambda kv: -kv[1]):
        lines.append(f"{group:42s} {_ms(us, calls)} {100 * us / max(busy, 1e-9):6.1f} %")
    lines += ["", f"top {top} {'kernels' if on_gpu else 'operators'} by self time (name, calls per sampler call, per call):"]
    for e in sorted(kernels, key=lambda e: -self_time(e))[:top]:
        lines.append(f"  {e.key[:100]:100s} {e.count / calls:8.0f} {_ms(self_time(e), calls)}  [{group_of(e.key)}]")
    return lines


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    cfg = load_config(config_file=args.config, overrides=args.set)
    settings = sampler_settings(cfg.generate, device.type)
    batch = cfg.generate.batch_size
    pipe, arch = build_pipeline(args, device)
    sampler = Sampler(pipe, settings, device)
    inputs = bench_inputs(pipe, batch, cfg.seed)
    if settings.mode == "txt2img":
        inputs.pop("latent_mean"), inputs.pop("latent_std")
    on_gpu = device.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    for _ in range(args.warmup):
        sampler(**inputs)
    sync()
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        for _ in range(args.iters):
            sampler(**inputs)
        sync()
        wall = time.perf_counter() - started
    card = torch.cuda.get_device_name(device) if on_gpu else f"CPU x{torch.get_num_threads()}"
    head = (f"# profile: {arch} on {card} (torch {torch.__version__}); the generate stage's sampler: {settings.scheduler} "
            f"{settings.steps} steps at strength {settings.strength} ({settings.denoising_steps} UNet calls), CFG "
            f"{settings.guidance_scale}, batch {batch}, {settings.dtype}, channels_last {settings.channels_last}, compile "
            f"{settings.compile}, options [{speed_options(settings) or 'none'}]; {args.iters} profiled call(s) after "
            f"{args.warmup} warm-up")
    lines = [head, *summarise(prof, wall, args.iters, on_gpu, args.top)]
    print("\n".join(lines), flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    if args.trace:
        prof.export_chrome_trace(args.trace)
    return lines


if __name__ == "__main__":
    main()
