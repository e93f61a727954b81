"""Training-free sampler speed-ups from well-kept libraries, as one ``generate.speedup`` string.

``none``; ``deepcache[:N]`` (DeepCache, Ma et al. 2024: reuse the UNet's deep features for N-1 of every N
denoising steps); ``tomesd[:r]`` (token merging, Bolya & Hoffman 2023: merge a fraction r of the tokens in
the highest-resolution attention blocks). Pure torch + diffusers; the libraries load only when used.

Example:
    >>> from realfake_ray.models.tiny import build_random_tiny_pipeline
    >>> from realfake_ray.method.sampler import Sampler, SamplerSettings
    >>> sampler = Sampler(build_random_tiny_pipeline(), SamplerSettings(steps=4))
    >>> undo = apply_speedup(sampler, "deepcache:2")
    >>> undo()
"""

from __future__ import annotations

import types
from collections.abc import Callable

__all__ = ["SPEEDUPS", "parse_speedup", "apply_speedup"]

SPEEDUPS = ("none", "deepcache", "tomesd")


def parse_speedup(spec: str) -> tuple[str, float | None]:
    """``"deepcache:3"`` → ``("deepcache", 3.0)``; ``"tomesd:0.5"`` → ``("tomesd", 0.5)``; ``"none"`` → ``("none", None)``.

    Example:
        >>> parse_speedup("deepcache"), parse_speedup("tomesd:0.3")
        (('deepcache', 3.0), ('tomesd', 0.3))
    """
    name, _, value = str(spec).partition(":")
    if name not in SPEEDUPS or (name == "none" and value):
        raise ValueError(f"speedup={spec!r}: expected none, deepcache[:<interval>] or tomesd[:<ratio>]")
    defaults = {"none": None, "deepcache": 3.0, "tomesd": 0.5}
    try:
        number = float(value) if value else defaults[name]
    except ValueError:
        raise ValueError(f"speedup={spec!r}: {value!r} is not a number") from None
    if name == "deepcache" and (number is None or number < 1 or number != int(number)):
        raise ValueError(f"speedup={spec!r}: the DeepCache interval must be an integer >= 1")
    if name == "tomesd" and not 0 < number < 1:
        raise ValueError(f"speedup={spec!r}: the ToMe merge ratio must lie in (0, 1)")
    return name, number


def apply_speedup(sampler, spec: str) -> Callable[[], None]:
    """Patch ``sampler``'s UNet with a training-free speed-up; returns the function that undoes it.

    ``deepcache[:N]``: DeepCache (``DeepCache.DeepCacheSDHelper``, branch 0) — the full UNet runs every N-th
    denoising step, the others reuse the deep features of the last full step and recompute only the first
    down/last up block. ``tomesd[:r]``: token merging (``tomesd.apply_patch``) on the attention blocks of the
    highest resolution level; a UNet without attention there (the tiny preset) is left unchanged and runs
    as without it. Neither composes with ``compile``.
    """
    name, value = parse_speedup(spec)
    if name == "none":
        return lambda: None
    if getattr(sampler.settings, "compile", False):
        raise ValueError(f"speedup={spec!r} does not compose with compile=True (it patches module forwards)")
    if name == "deepcache":
        from DeepCache import DeepCacheSDHelper

        # The helper reads the step index from `pipe.scheduler.timesteps`: hand it the Sampler's own scheduler.
        helper = DeepCacheSDHelper(pipe=types.SimpleNamespace(unet=sampler.unet, scheduler=sampler.scheduler))
        helper.set_params(cache_interval=int(value), cache_branch_id=0)
        helper.enable()
        return helper.disable
    import tomesd

    tomesd.apply_patch(sampler.unet, ratio=float(value))
    return lambda: tomesd.remove_patch(sampler.unet)
