#!/usr/bin/env python
"""LoRA fine-tuning throughput: bank latents (ours) vs VAE-encoding every batch (the reference's way).

Standalone: needs only torch, diffusers and peft; the repository root is put on sys.path. Builds the
SD v1.5 UNet (and VAE) architecture with random weights: frozen base in bf16, LoRA (rank 4, alpha 4,
on to_q/to_k/to_v/to_out.0) in fp32 under bf16 autocast, AdamW. Each training step is: noise +
random timesteps, UNet forward, the fine-tuning loss (``realfake_ray.method.losses.finetune_loss`` when
present, else MSE), backward, optimizer step. Both modes use the same random text states (the text
encoder is frozen and its cost is the same in both) and tensors already on the GPU (no data loading).

  (a) latents   the step gets a latent straight from the bank: mean + std * eps   [B, 4, 64, 64]
  (b) vae       the step VAE-encodes [B, 3, 512, 512] pixels first (no grad), as the reference code does

    python benchmarks/bench_finetune.py                      # GPU: batch 8 at 512x512 (the reference's)
    python benchmarks/bench_finetune.py --batch-size 16 --iters 20
    python benchmarks/bench_finetune.py --compile 0,1 --compile-mode reduce-overhead --skip-vae   # before/after
    python benchmarks/bench_finetune.py --tiny --device cpu  # CPU smoke run

Prints samples/s, s/step, TFLOP/sample, MFU (known GPUs) and peak GiB for each mode, then the speed-up a/b.
``--compile 0,1`` adds the (a) step with the UNet compiled as ``finetune.compile`` does it
(``realfake_ray.stages.finetune.step.compile_unet``, mode ``--compile-mode``): both rows start from the same LoRA,
optimizer state and seeds, and the first ``--check-steps`` losses of each are printed with their largest
relative difference. ``--json PATH`` writes the rows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from realfake_ray.stages.finetune.step import compile_unet  # noqa: E402
from realfake_ray.tools.flops import count_flops, mfu, peak_flops, time_calls  # noqa: E402

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_loss():
    """``realfake_ray.method.losses.finetune_loss`` if available, else Min-SNR-free MSE with the same interface."""
    try:
        from realfake_ray.method.losses import finetune_loss

        return finetune_loss, "finetune_loss (Min-SNR + linear DM)"
    except ImportError:

        def mse(pred, target, timesteps, alphas_cumprod, **_):
            return {"loss": torch.nn.functional.mse_loss(pred, target)}

        return mse, "plain MSE (realfake_ray.method.losses not found)"


def build_models(tiny: bool, device: torch.device):
    """(unet, vae, text width, pixel resolution) for SD v1.5 (random weights) or the tiny preset."""
    if tiny:
        from realfake_ray.models.tiny import TINY_RESOLUTION, build_random_tiny_pipeline

        pipe = build_random_tiny_pipeline()
        return pipe.unet.to(device), pipe.vae.to(device), int(pipe.unet.config.cross_attention_dim), TINY_RESOLUTION
    from bench_sampler import build_sd15_unet, build_sd15_vae

    torch.manual_seed(0)
    with torch.device(device):
        return build_sd15_unet(), build_sd15_vae(), 768, 512


def cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast only when needed (diffusers warns on every ``.to(dtype)``)."""
    return module if next(module.parameters()).dtype == dtype else module.to(dtype)


def add_lora(unet, base_dtype: torch.dtype, rank: int = 4) -> list[torch.nn.Parameter]:
    """Freeze the UNet in ``base_dtype``, add a LoRA adapter, keep the LoRA parameters in fp32."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    cast(unet, base_dtype)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    unet.train()
    return params


class Step:
    """One fine-tuning step; ``latents_fn()`` supplies the batch's (scaled) latents."""

    def __init__(self, unet, params, text_states, autocast_dtype, device, loss_fn):
        from diffusers import DDPMScheduler

        self.unet, self.text, self.device, self.loss_fn = unet, text_states, device, loss_fn
        self.noise_scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(device)
        self.opt = torch.optim.AdamW(params, lr=1e-4)
        use_autocast = autocast_dtype != torch.float32
        self.autocast = (lambda: torch.autocast(device.type, dtype=autocast_dtype)) if use_autocast else contextlib.nullcontext
        self.gen = torch.Generator(device).manual_seed(0)

    def __call__(self, latents: torch.Tensor) -> float:
        noise = torch.randn(latents.shape, generator=self.gen, device=self.device)
        t = torch.randint(0, 1000, (len(latents),), generator=self.gen, device=self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        with self.autocast():
            pred = self.unet(noisy, t, encoder_hidden_states=self.text).sample
        loss = self.loss_fn(pred.float(), noise, t, self.alphas_cumprod)["loss"]
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny preset (32 px) instead of SD v1.5 (CPU smoke)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8, help="per-GPU batch (the reference: 8)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="frozen base / autocast dtype (GPU bf16, CPU fp32)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--compile", default="0", help="comma list of 0/1: the (a) step eager and/or compiled")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode of the compiled rows")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: a quick CPU check)")
    parser.add_argument("--check-steps", type=int, default=5, help="steps whose losses are compared across rows")
    parser.add_argument("--skip-vae", action="store_true", help="no (b) row (per-step VAE encoding)")
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    args.compile = [part.strip() == "1" for part in args.compile.split(",") if part.strip()]
    args.dtype = args.dtype or ("bf16" if torch.device(args.device).type == "cuda" else "fp32")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    dtype = DTYPES[args.dtype]
    loss_fn, loss_name = pick_loss()
    unet, vae, text_width, resolution = build_models(args.tiny, device)
    params = add_lora(unet, dtype, args.rank)
    cast(vae.requires_grad_(False), dtype).eval()
    scaling = float(vae.config.scaling_factor)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_shape = (args.batch_size, int(unet.config.in_channels), resolution // factor, resolution // factor)

    gen = torch.Generator(device).manual_seed(1)
    text = torch.randn(args.batch_size, 77, text_width, generator=gen, device=device, dtype=dtype)
    bank_mean = torch.randn(latent_shape, generator=gen, device=device)  # already x scaling factor
    bank_std = 0.05 * torch.rand(latent_shape, generator=gen, device=device)
    pixels = torch.rand(args.batch_size, 3, resolution, resolution, generator=gen, device=device) * 2 - 1
    initial = [p.detach().clone() for p in params]

    def fresh_step() -> Step:
        """The same start for every row: the initial LoRA, a new optimizer, the generators re-seeded."""
        with torch.no_grad():
            for p, p0 in zip(params, initial):
                p.copy_(p0)
        gen.manual_seed(2)
        return Step(unet, params, text, dtype, device, loss_fn)

    def from_bank():
        eps = torch.randn(latent_shape, generator=gen, device=device)
        return step(bank_mean + bank_std * eps)

    def from_pixels():
        with torch.no_grad():
            latents = vae.encode(pixels.to(dtype)).latent_dist.sample(generator=gen).float() * scaling
        return step(latents)

    arch = "tiny preset" if args.tiny else "SD v1.5 UNet+VAE, random weights"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()}"
    print(f"# bench_finetune: {arch}, {resolution}px (latent {latent_shape[2]}x{latent_shape[3]}), batch {args.batch_size}, "
          f"base {args.dtype} + fp32 LoRA r={args.rank}, loss {loss_name}; {name}; warmup {args.warmup}, iters {args.iters}")  # fmt: skip
    peak = peak_flops(device, args.dtype)
    rows = []
    if False in args.compile:
        rows += [("a_latents", from_bank, False)] + ([] if args.skip_vae else [("b_vae_encode", from_pixels, False)])
    if True in args.compile:
        rows += [(f"a_latents_compiled_{args.compile_mode}", from_bank, True)]
    step = fresh_step()
    flops_of = {fn: count_flops(fn) / args.batch_size for fn in {fn for _, fn, _ in rows}}  # eager, before compiling
    results = {}
    for mode, fn, compiled in rows:
        if compiled:
            compile_unet(unet, args.compile_mode, device.type, backend=args.compile_backend)
        step = fresh_step()
        losses = [float(fn()) for _ in range(args.check_steps)]  # also the warm-up (and the compile)
        flops = flops_of[fn]
        seconds, mem = time_calls(fn, device, args.iters, args.warmup)
        rate = args.batch_size / seconds
        results[mode] = {"samples_per_s": rate, "s_per_step": seconds, "tflop_per_sample": flops / 1e12,
                         "mfu": mfu(rate, flops, peak) if peak else None, "peak_mem_gib": mem, "losses": losses}  # fmt: skip
        cells = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}=-" for k, v in results[mode].items() if k != "losses"]
        print(f"{mode:13s} " + "  ".join(cells), flush=True)
        print(f"{'':13s} losses of the first {args.check_steps} steps: " + " ".join(f"{x:.6g}" for x in losses), flush=True)
    if "a_latents" in results and "b_vae_encode" in results:
        results["speedup"] = results["a_latents"]["samples_per_s"] / results["b_vae_encode"]["samples_per_s"]
        print(f"speed-up of bank latents over per-step VAE encoding: {results['speedup']:.2f}x")
    compiled_rows = [m for m, _, c in rows if c]
    if compiled_rows and "a_latents" in results:
        row, eager = results[compiled_rows[0]], results["a_latents"]
        row["speedup_over_eager"] = row["samples_per_s"] / eager["samples_per_s"]
        row["max_rel_loss_diff"] = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(row["losses"], eager["losses"]))
        print(f"compiled ({args.compile_mode}) over eager: {row['speedup_over_eager']:.2f}x samples/s; largest relative "
              f"difference of the first {args.check_steps} losses {row['max_rel_loss_diff']:.3g}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "args": vars(args), "rows": results}, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
