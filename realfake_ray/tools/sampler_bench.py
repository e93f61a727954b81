"""``realfake bench-sampler``: time the generation core on the configured model over a small grid.

Same code as ``benchmarks/bench_sampler.py`` (:func:`run_grid`), but on
``model.pretrained`` (real weights, or the tiny preset) with defaults from the ``generate`` section.
Prints one table row per grid point as it is measured, then the table; writes the rows to
``<out>/bench/sampler.csv`` (rewritten after every row, so a killed run keeps what it measured).
No Ray: it times one device of the machine it runs on.

Example:
    $ realfake bench-sampler --preset tiny --out runs/bench --steps 10 --batch-sizes 2,8
    $ realfake bench-sampler --out runs/bench --set model.pretrained=/models/sd-v1-5 --dtypes fp16,bf16 --compile 0,1
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
from collections.abc import Callable
from typing import Any

import torch

from realfake_ray import storage
from realfake_ray.config import ConfigError, RunConfig
from realfake_ray.devices import torch_device
from realfake_ray.layout import RunLayout
from realfake_ray.tools.flops import count_forward_flops, img2img_flops, mfu, peak_flops, time_calls
from realfake_ray.models import loading
from realfake_ray.method.prompts import GENERATION_SUFFIX, build_prompt
from realfake_ray.method.sampler import (
    DTYPES,
    Sampler,
    SamplerSettings,
    latent_hw,
    make_scheduler,
    set_sdpa,
    to_device_dtype,
    vae_factor,
)

__all__ = [
    "bench_grid", "rows_to_csv", "run_bench_sampler", "REFERENCE_ROW", "make_grid", "model_flops", "sampler_flops",
    "run_grid", "format_table", "speed_options", "bench_inputs",
]

_TRUE, _FALSE = ("1", "true", "y", "yes"), ("0", "false", "n", "no")


def _ints(name: str, values: list[str]) -> list[int]:
    try:
        return [int(v) for v in values]
    except ValueError:
        raise ConfigError(f"--{name}: expected a comma list of integers, got {','.join(values)!r}") from None


def _bools(name: str, values: list[str]) -> list[bool]:
    bad = [v for v in values if v.lower() not in _TRUE + _FALSE]
    if bad:
        raise ConfigError(f"--{name}: expected a comma list of 0/1, got {','.join(values)!r}")
    return [v.lower() in _TRUE for v in values]


def bench_grid(
    cfg: RunConfig,
    device_type: str,
    schedulers: list[str] | None = None,
    steps: list[str] | None = None,
    batch_sizes: list[str] | None = None,
    dtypes: list[str] | None = None,
    compile: list[str] | None = None,
    channels_last: list[str] | None = None,
    reference: bool = True,
) -> list[dict]:
    """Grid rows from comma-list flags (strings, as the CLI gives them), defaults from ``cfg.generate``
    (its speed options too; on a CPU without the CUDA-only ones, as the stage runs there).

    Every row is validated here (unknown scheduler / dtype, steps < 1, ...): a ConfigError before timing.

    Example:
        >>> from realfake_ray.config import load_config
        >>> rows = bench_grid(load_config(preset="tiny"), "cpu", batch_sizes=["2", "4"], reference=False)
        >>> [(r["batch_size"], r["dtype"], r["steps"]) for r in rows]
        [(2, 'fp32', 8), (4, 'fp32', 8)]
    """

    g = cfg.generate
    default_dtype = g.dtype if device_type == "cuda" else "fp32"
    grid = make_grid(
        schedulers=schedulers or [g.scheduler],
        steps=_ints("steps", steps) if steps else [g.steps],
        batch_sizes=_ints("batch-sizes", batch_sizes) if batch_sizes else [g.batch_size],
        dtypes=dtypes or [default_dtype],
        compile=_bools("compile", compile) if compile else [g.compile],
        channels_last=_bools("channels-last", channels_last) if channels_last else [g.channels_last],
        reference=reference,
        strength=g.strength,
        guidance_scale=g.guidance_scale,
        mode=g.mode,
        sample_posterior=g.sample_posterior,
        **{k: getattr(g, k) for k in _SPEED_OPTIONS},
    )
    for row in grid:
        if not row.get("compile"):
            row["compile_mode"] = "default"
        try:
            if device_type != "cuda" and not row.get("reference"):  # as the stage runs on a CPU node
                row.update({k: getattr(_split_spec(row)[0].for_cpu(), k) for k in _SPEED_OPTIONS})
            _split_spec(row)
        except ValueError as exc:
            raise ConfigError(f"bench-sampler grid: {exc}") from None
    return grid


def rows_to_csv(rows: list[dict]) -> str:
    """CSV text of :func:`run_grid` rows (columns of the first row)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def run_bench_sampler(
    cfg: RunConfig,
    schedulers: list[str] | None = None,
    steps: list[str] | None = None,
    batch_sizes: list[str] | None = None,
    dtypes: list[str] | None = None,
    compile: list[str] | None = None,
    channels_last: list[str] | None = None,
    iters: int | None = None,
    warmup: int | None = None,
    reference: int | None = None,
) -> dict:
    """Time the sampler on ``cfg.model.pretrained`` over the grid; print the table; write the CSV.

    Returns ``{"csv": url, "device": ..., "rows": [...]}``. Uses CUDA when present, else the CPU.

    Example:
        >>> run_bench_sampler(load_config(preset="tiny", out="/tmp/b"), steps=["4"], batch_sizes=["2"], iters=1)  # doctest: +SKIP
    """
    import torch

    iters, warmup = 3 if iters is None else iters, 1 if warmup is None else warmup
    if iters < 1 or warmup < 0:
        raise ConfigError(f"--iters must be >= 1 and --warmup >= 0 (got {iters}, {warmup})")
    device = torch_device()
    grid = bench_grid(cfg, device.type, schedulers, steps, batch_sizes, dtypes, compile, channels_last, reference != 0)
    model_dir = loading.resolve_model_dir(cfg.model.pretrained, cfg.model.revision, cfg.model.hub_timeout_s)
    pipe = loading.load_pipeline(model_dir)
    url = RunLayout(cfg.out).bench_dir("sampler.csv")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"# bench-sampler: {cfg.model.pretrained} on {name}; {len(grid)} grid points, warmup {warmup}, iters {iters}")
    print(format_table([]), flush=True)
    done: list[dict] = []

    def on_row(row: dict) -> None:
        done.append(row)
        print(format_table([row]).splitlines()[1], flush=True)
        storage.write_text(url, rows_to_csv(done))

    rows = run_grid(pipe, grid, device, iters=iters, warmup=warmup, seed=cfg.seed, on_row=on_row)
    print("\n" + format_table(rows) + f"\n# wrote {url}", flush=True)
    return {"csv": url, "device": name, "rows": rows}


# ------------------------------------------------------------------ the grid (also benchmarks/bench_sampler.py)

_SETTING_FIELDS = {f.name for f in dataclasses.fields(SamplerSettings)}
_ROW_KEYS = (
    "name", "scheduler", "steps", "strength", "batch_size", "dtype", "compile", "channels_last", "options",
    "images_per_s", "s_per_batch", "tflop_per_img", "mfu", "peak_mem_gib", "note",
)  # fmt: skip
_SPEED_OPTIONS = ("compile_mode", "sdpa_backend", "vae_dtype", "fuse_qkv")  # the ``options`` column: those not at default
REFERENCE_ROW = {
    "name": "reference",
    "reference": True,
    "scheduler": "unipc",
    "steps": 30,
    "strength": 0.75,
    "batch_size": 24,
    "dtype": "fp16",
}


def make_grid(
    schedulers=("unipc",),
    steps=(30,),
    batch_sizes=(24,),
    dtypes=("fp16",),
    compile=(False,),
    channels_last=(False,),
    reference: bool = True,
    **fixed: Any,
) -> list[dict]:
    """The cartesian product of the given lists as grid rows, plus the reference row last.

    ``fixed`` holds settings shared by every row (e.g. ``strength=0.75``, ``guidance_scale=2.0``).

    Example:
        >>> len(make_grid(batch_sizes=(8, 24), dtypes=("fp16", "bf16"), reference=False))
        4
    """
    rows = [
        {"scheduler": sc, "steps": st, "batch_size": b, "dtype": d, "compile": c, "channels_last": cl, **fixed}
        for sc, st, b, d, c, cl in itertools.product(schedulers, steps, batch_sizes, dtypes, compile, channels_last)
    ]
    return rows + ([dict(REFERENCE_ROW)] if reference else [])


def _split_spec(spec: dict) -> tuple[SamplerSettings, int]:
    """Grid row -> (validated settings, batch size); ValueError naming an unknown key."""
    extra = set(spec) - _SETTING_FIELDS - {"batch_size", "name", "reference"}
    if extra:
        raise ValueError(f"grid row has unknown keys {sorted(extra)}; allowed: {sorted(_SETTING_FIELDS)} + batch_size")
    settings = SamplerSettings(**{k: v for k, v in spec.items() if k in _SETTING_FIELDS}).validate()
    batch_size = int(spec.get("batch_size", 1))
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    return settings, batch_size


def bench_inputs(pipe, batch_size: int, seed: int) -> dict:
    """Random-but-seeded sampler inputs shaped like a latent-bank batch (keyword arguments of a Sampler call).

    Example:
        >>> from realfake_ray.models.tiny import build_random_tiny_pipeline
        >>> sorted(bench_inputs(build_random_tiny_pipeline(), 2, seed=0))
        ['latent_mean', 'latent_std', 'prompts', 'seeds', 'vision_tokens']
    """
    gen = torch.Generator("cpu").manual_seed(seed)
    h, w = latent_hw(pipe)
    shape = (batch_size, int(pipe.unet.config.in_channels), h, w)
    width = int(pipe.text_encoder.config.hidden_size)
    return {
        "prompts": [build_prompt("tench", f"a fish number {i}", GENERATION_SUFFIX) for i in range(batch_size)],
        "seeds": list(range(seed, seed + batch_size)),
        "latent_mean": torch.randn(shape, generator=gen),
        "latent_std": 0.1 * torch.rand(shape, generator=gen),
        "vision_tokens": torch.randn(batch_size, width, generator=gen),
    }


def model_flops(pipe, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Counted FLOPs per image of one UNet forward, one VAE decode and one VAE encode at native size."""
    h, w = latent_hw(pipe)
    unet, vae = pipe.unet, pipe.vae
    latent = torch.zeros(1, int(unet.config.in_channels), h, w, device=device, dtype=dtype)
    text = torch.zeros(1, pipe.tokenizer.model_max_length, int(unet.config.cross_attention_dim), device=device, dtype=dtype)
    factor = vae_factor(vae)
    pixels = torch.zeros(1, 3, h * factor, w * factor, device=device, dtype=dtype)
    return {
        "unet_fwd": count_forward_flops(unet, latent, torch.tensor(500, device=device), encoder_hidden_states=text),
        "vae_decode": count_forward_flops(vae.decode, latent),
        "vae_encode": count_forward_flops(vae.encode, pixels),
    }


def speed_options(settings: SamplerSettings) -> str:
    """The speed options of ``settings`` not at their defaults, as ``key=value`` words (``""``: none).

    Example:
        >>> speed_options(SamplerSettings(sdpa_backend="cudnn", fuse_qkv=True))
        'sdpa_backend=cudnn fuse_qkv=True'
    """
    defaults = SamplerSettings()
    changed = [k for k in _SPEED_OPTIONS if getattr(settings, k) != getattr(defaults, k)]
    return " ".join(f"{k}={getattr(settings, k)}" for k in changed)


def _result_row(spec: dict, settings: SamplerSettings, batch_size: int, seconds: float, flops: float, peak_mem, device):
    """Assemble one output row with throughput, TFLOP/img, MFU (GPU with a known peak) and memory."""
    images_per_s = batch_size / seconds
    peak = peak_flops(device, settings.dtype)
    return {
        "name": spec.get("name", ""),
        "scheduler": settings.scheduler,
        "steps": settings.steps,
        "strength": settings.strength,
        "batch_size": batch_size,
        "dtype": settings.dtype,
        "compile": settings.compile,
        "channels_last": settings.channels_last,
        "options": speed_options(settings),
        "images_per_s": images_per_s,
        "s_per_batch": seconds,
        "tflop_per_img": flops / 1e12,
        "mfu": mfu(images_per_s, flops, peak) if peak else None,
        "peak_mem_gib": peak_mem,
        "note": spec.get("note", ""),
    }


def sampler_flops(settings: SamplerSettings, counted: dict[str, float]) -> float:
    """FLOPs per image of sampling with ``settings`` (FLOP model, see :func:`~realfake_ray.tools.flops.img2img_flops`),
    from :func:`model_flops` counts."""
    strength = 1.0 if settings.mode == "txt2img" else settings.strength
    return img2img_flops(settings.steps, strength, settings.cfg, True, counted["unet_fwd"], counted["vae_decode"])


def _bench_sampler_row(pipe, spec, device, iters, warmup, seed, flops_cache) -> dict:
    """Time our Sampler on one grid row."""
    settings, batch_size = _split_spec(spec)
    sampler = Sampler(pipe, settings, device)
    key = settings.dtype
    if key not in flops_cache:
        flops_cache[key] = model_flops(pipe, device, sampler.dtype)
    flops = sampler_flops(settings, flops_cache[key])
    inputs = bench_inputs(pipe, batch_size, seed)
    if settings.mode == "txt2img":
        inputs.pop("latent_mean"), inputs.pop("latent_std")
    seconds, peak_mem = time_calls(lambda: sampler(**inputs), device, iters, warmup)
    return _result_row(spec, settings, batch_size, seconds, flops, peak_mem, device)


def _bench_reference_row(pipe, spec, device, iters, warmup, seed, flops_cache) -> dict:
    """The reference code's way: stock img2img pipeline, fp16, ``enable_model_cpu_offload()``, VAE encode."""
    settings, batch_size = _split_spec(spec)
    skipped = {k: spec.get(k, "") for k in _ROW_KEYS} | {"name": spec.get("name", "reference")}
    if device.type != "cuda":
        return skipped | {"note": "skipped: the reference row (enable_model_cpu_offload) needs CUDA"}
    try:
        import accelerate  # noqa: F401  (enable_model_cpu_offload needs it)
    except ImportError:
        return skipped | {"note": "skipped: enable_model_cpu_offload needs `accelerate` (pip install accelerate)"}
    from diffusers import StableDiffusionImg2ImgPipeline

    dtype = DTYPES[settings.dtype]
    ref = StableDiffusionImg2ImgPipeline(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=pipe.unet,
        scheduler=make_scheduler(settings.scheduler, pipe.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    ref.set_progress_bar_config(disable=True)
    for module in (pipe.vae, pipe.unet, pipe.text_encoder):
        to_device_dtype(module, device, dtype)
    for module in (pipe.vae, pipe.unet):
        module.to(memory_format=torch.contiguous_format)
        set_sdpa(module)
    if settings.dtype not in flops_cache:
        flops_cache[settings.dtype] = model_flops(pipe, device, dtype)
    counted = flops_cache[settings.dtype]
    ref.enable_model_cpu_offload(gpu_id=device.index or 0)  # the reference: moved to GPU, then offloaded
    h, w = latent_hw(pipe)
    factor = vae_factor(pipe.vae)
    gen = torch.Generator("cpu").manual_seed(seed)
    images = torch.rand(batch_size, 3, h * factor, w * factor, generator=gen)
    prompts = bench_inputs(pipe, batch_size, seed)["prompts"]

    def call():
        ref(
            prompt=prompts,
            negative_prompt=[settings.negative_prompt] * batch_size,
            image=images,
            strength=settings.strength,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            output_type="np",
        )

    try:
        seconds, peak_mem = time_calls(call, device, iters, warmup)
    finally:
        ref.remove_all_hooks()
    flops = img2img_flops(
        settings.steps, settings.strength, settings.cfg, True, counted["unet_fwd"], counted["vae_decode"],
        encode=True, vae_encode_flops=counted["vae_encode"],
    )  # fmt: skip
    spec = spec | {"note": spec.get("note") or "stock img2img + enable_model_cpu_offload, VAE-encodes pixels"}
    return _result_row(spec, settings, batch_size, seconds, flops, peak_mem, device)


def _bench_row(pipe, spec, device, iters, warmup, seed, flops_cache) -> dict:
    """One grid row; a CUDA out-of-memory becomes a row with a note instead of an exception."""
    if spec.get("compile"):
        torch._dynamo.reset()  # fresh compile cache per row: avoids silent eager fallback at the recompile limit
    bench = _bench_reference_row if spec.get("reference") else _bench_sampler_row
    try:
        return bench(pipe, spec, device, iters, warmup, seed, flops_cache)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {k: spec.get(k, "") for k in _ROW_KEYS} | {"note": "CUDA out of memory"}


def run_grid(
    pipe,
    grid: list[dict],
    device: str | torch.device = "cuda",
    iters: int = 3,
    warmup: int = 1,
    seed: int = 0,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Time sampling for every grid row (see :func:`make_grid`); returns one result dict per row.

    Each row is SamplerSettings fields + ``batch_size`` (+ ``name``; ``reference: True`` times the stock
    diffusers img2img pipeline with CPU offload instead). Rows report images/s, s/batch, TFLOP/img
    (FLOPs counted on this architecture), MFU (known GPUs) and peak CUDA memory. The pipeline's modules
    are cast/moved in place; FLOPs per image follow :func:`realfake_ray.tools.flops.img2img_flops`.
    ``on_row`` is called with each row as soon as it is measured (progress output, partial CSV).

    Example:
        >>> from realfake_ray.models.tiny import build_random_tiny_pipeline
        >>> rows = run_grid(build_random_tiny_pipeline(), make_grid(steps=(4,), batch_sizes=(2,), dtypes=("fp32",)),
        ...                 device="cpu", iters=1, warmup=0)
        >>> rows[0]["images_per_s"] > 0, rows[1]["note"].startswith("skipped")
        (True, True)
    """
    device = torch.device(device)
    for spec in grid:  # fail on a bad row before any timing
        _split_spec(spec)
    flops_cache: dict[str, dict[str, float]] = {}
    rows = []
    for spec in grid:
        rows.append(_bench_row(pipe, spec, device, iters, warmup, seed, flops_cache))
        if on_row is not None:
            on_row(rows[-1])
    return rows


def _fmt(value) -> str:
    """Table cell: floats to 3 significant figures, None as '-'."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "y" if value else "n"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def format_table(rows: list[dict]) -> str:
    """Fixed-width text table of :func:`run_grid` rows.

    Example:
        >>> print(format_table([{"name": "a", "images_per_s": 1.5}]).splitlines()[0].split()[:2])
        ['name', 'scheduler']
    """
    cells = [list(_ROW_KEYS)] + [[_fmt(row.get(k)) for k in _ROW_KEYS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(_ROW_KEYS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells)
