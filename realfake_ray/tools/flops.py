"""FLOP accounting for generation and fine-tuning: SD v1.5 constants, counting, peak and MFU.

Pure torch (no Ray, no pydantic), so the standalone benchmarks can use it on a bare GPU box.

Example:
    >>> from realfake_ray.tools.flops import SD15_FLOPS, img2img_flops, mfu
    >>> per_image = img2img_flops(30, 0.75, cfg=True)   # ~22 x 1.61 + 2.5 TFLOP
    >>> round(per_image / 1e12, 1)
    37.9
    >>> round(mfu(10.0, per_image, 989e12), 3)
    0.383
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "TFLOP", "SDFlops", "SD15_FLOPS", "denoising_steps", "img2img_flops", "count_flops", "count_forward_flops",
    "time_calls", "peak_flops", "mfu",
]

TFLOP = 1e12


@dataclass(frozen=True)
class SDFlops:
    """FLOPs per image of one Stable Diffusion architecture at its native resolution."""

    unet_fwd: float  # one UNet forward, one image
    vae_decode: float
    vae_encode: float

    @property
    def cfg_step(self) -> float:
        """One denoising step with classifier-free guidance (uncond + cond branch)."""
        return 2 * self.unet_fwd


# SD v1.5 at 512x512 (64x64 latent), from the method notes: UNet forward ~0.80 TFLOP (0.805, so that a
# CFG step is the quoted 1.61), VAE decode ~2.5 TFLOP, VAE encode ~1.1 TFLOP.
SD15_FLOPS = SDFlops(unet_fwd=0.805 * TFLOP, vae_decode=2.5 * TFLOP, vae_encode=1.1 * TFLOP)


def denoising_steps(steps: int, strength: float = 1.0) -> int:
    """UNet steps an img2img run makes: ``min(int(steps * strength), steps)`` (diffusers' rule).

    Example:
        >>> denoising_steps(30, 0.75)
        22
    """
    return min(int(steps * strength), steps)


def img2img_flops(
    steps: int,
    strength: float,
    cfg: bool,
    decode: bool = True,
    unet_fwd_flops: float = SD15_FLOPS.unet_fwd,
    vae_decode_flops: float = SD15_FLOPS.vae_decode,
    encode: bool = False,
    vae_encode_flops: float = SD15_FLOPS.vae_encode,
) -> float:
    """FLOPs to generate one image: denoising steps x UNet (x2 with CFG) + VAE decode (+ encode).

    ``strength=1.0`` gives txt2img. ``encode=True`` adds a VAE encode (latent not precomputed).

    Example:
        >>> img2img_flops(30, 0.75, cfg=False, decode=False) == 22 * SD15_FLOPS.unet_fwd
        True
    """
    per_step = unet_fwd_flops * (2 if cfg else 1)
    total = denoising_steps(steps, strength) * per_step
    if decode:
        total += vae_decode_flops
    if encode:
        total += vae_encode_flops
    return float(total)


def count_flops(fn: Callable, *args, **kwargs) -> float:
    """FLOPs of one call ``fn(*args, **kwargs)`` (forward and any backward it runs), via FlopCounterMode.

    Counts matmuls, convolutions and attention (multiply-add = 2 FLOPs); elementwise ops are not counted.

    Example:
        >>> x = torch.zeros(3, 8, requires_grad=True)
        >>> count_flops(lambda: torch.nn.Linear(8, 4)(x).sum().backward())  # fwd + input grad + weight grad
        576.0
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn(*args, **kwargs)
    return float(counter.get_total_flops())


def count_forward_flops(module: Callable, *example_inputs, **example_kwargs) -> float:
    """FLOPs of one forward of ``module`` (or a bound method like ``vae.decode``), under inference mode.

    Example:
        >>> count_forward_flops(torch.nn.Linear(8, 4), torch.zeros(3, 8))
        192.0
    """
    with torch.inference_mode():
        return count_flops(module, *example_inputs, **example_kwargs)


def time_calls(fn: Callable[[], object], device: str | torch.device, iters: int, warmup: int) -> tuple[float, float | None]:
    """Mean seconds per ``fn()`` over ``iters`` calls after ``warmup`` calls, and peak CUDA GiB (None on CPU).

    CUDA work is synchronised before and after the timed calls.

    Example:
        >>> seconds, peak_gib = time_calls(lambda: torch.ones(4).sum(), "cpu", iters=2, warmup=1)
        >>> seconds > 0, peak_gib
        (True, None)
    """
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    if on_cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if on_cuda:
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / max(iters, 1)
    return seconds, (torch.cuda.max_memory_allocated(device) / 2**30 if on_cuda else None)


# Dense (no sparsity) tensor-core peaks, FLOP/s: (bf16/fp16, tf32). Order matters: first substring wins.
_PEAKS: tuple[tuple[tuple[str, ...], float, float], ...] = (
    (("H200",), 989e12, 494.5e12),
    (("H100", "PCIE"), 756e12, 378e12),
    (("H100",), 989e12, 494.5e12),  # SXM ("H100 80GB HBM3")
    (("A100",), 312e12, 156e12),
    (("L40S",), 362e12, 183e12),
    (("L4",), 121e12, 60e12),
)
_HALF = {"fp16", "bf16", "float16", "bfloat16", "half"}
_FULL = {"fp32", "float32", "tf32", "float"}


def peak_flops(device: str | torch.device, dtype: str = "bf16", name: str | None = None) -> float | None:
    """Dense peak FLOP/s of a known GPU for ``dtype``; None for CPU or an unknown card.

    fp16 and bf16 share the peak; fp32 returns the TF32 tensor-core figure (assumes TF32 matmuls are on).
    ``name`` overrides the CUDA device name (for tests / reporting a remote card).

    Example:
        >>> peak_flops("cuda", "bf16", name="NVIDIA H100 80GB HBM3")
        989000000000000.0
        >>> peak_flops("cpu") is None
        True
    """
    dtype = str(dtype).replace("torch.", "").lower()
    if dtype not in _HALF | _FULL:
        raise ValueError(f"peak_flops: unknown dtype {dtype!r}; expected one of {sorted(_HALF | _FULL)}")
    device = torch.device(device)
    if name is None:
        if device.type != "cuda" or not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name(device)
    upper = name.upper()
    for keys, half, tf32 in _PEAKS:
        if all(k in upper for k in keys):
            return float(half if dtype in _HALF else tf32)
    return None


def mfu(images_per_s: float, flops_per_image: float, peak: float) -> float:
    """Model FLOP utilisation: achieved FLOP/s over peak FLOP/s.

    Example:
        >>> mfu(2.0, 1e12, 4e12)
        0.5
    """
    if not peak or peak <= 0:
        raise ValueError(f"mfu: peak FLOP/s must be positive, got {peak!r}")
    return images_per_s * flops_per_image / peak
