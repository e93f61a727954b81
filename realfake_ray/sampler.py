"""The generation core: latent-prior img2img with text-vision guidance and classifier-free guidance.

Pure torch + diffusers + transformers (no Ray, no pydantic): it runs on a bare GPU box. One
:class:`Sampler` owns a pipeline's VAE, UNet and text encoder on one device and turns a batch of
(prompt, seed, bank latent, CLIP guidance token) into uint8 images. Every random draw of image ``i``
comes from a CPU ``torch.Generator`` seeded with ``seeds[i]``, so an image does not depend on the
batch it was generated in.

The second half is the throughput benchmark (:func:`make_grid`, :func:`run_grid`, :func:`format_table`)
used by ``benchmarks/bench_sampler.py`` and the ``realfake bench-sampler`` CLI.

Example:
    >>> import torch
    >>> from realfake_ray.models.tiny import build_random_tiny_pipeline
    >>> from realfake_ray.sampler import Sampler, SamplerSettings
    >>> sampler = Sampler(build_random_tiny_pipeline(), SamplerSettings(steps=4))
    >>> mean = torch.zeros(2, 4, 8, 8)
    >>> sampler(prompts=["photo of one", "photo of two"], seeds=[0, 1], latent_mean=mean).shape
    (2, 32, 32, 3)
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from realfake_ray.flops import count_forward_flops, img2img_flops, mfu, peak_flops, time_calls
from realfake_ray.guidance import encode_text, inject_guidance_token
from realfake_ray.prompts import GENERATION_SUFFIX, NEGATIVE_PROMPT, build_prompt, tokenize

__all__ = [
    "DTYPES",
    "MODES",
    "SCHEDULERS",
    "Sampler",
    "SamplerSettings",
    "apply_lora",
    "check_lora_fits",
    "format_table",
    "latent_hw",
    "make_grid",
    "make_scheduler",
    "model_flops",
    "sampler_flops",
    "run_grid",
]

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODES = ("img2img", "txt2img")
_SCHEDULER_CLASSES = {
    "unipc": ("UniPCMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True, "algorithm_type": "dpmsolver++"}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
}
SCHEDULERS = frozenset(_SCHEDULER_CLASSES)
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def make_scheduler(name: str, base_config: dict):
    """A fresh diffusers scheduler ``name`` with the noise schedule of ``base_config``.

    ``base_config`` is a pipeline's ``scheduler.config``; keys the new class does not know are ignored.

    Example:
        >>> from realfake_ray.models.tiny import build_random_tiny_pipeline
        >>> make_scheduler("ddim", build_random_tiny_pipeline().scheduler.config).__class__.__name__
        'DDIMScheduler'
    """
    if name not in _SCHEDULER_CLASSES:
        raise ValueError(f"unknown scheduler {name!r}; valid: {sorted(SCHEDULERS)}")
    import diffusers

    class_name, overrides = _SCHEDULER_CLASSES[name]
    config = dict(base_config)
    if name == "ddim":  # DDIM's class defaults (clip x0 to [-1, 1], alpha_T = 1) are wrong for SD latents
        overrides = {"clip_sample": config.get("clip_sample", False), "set_alpha_to_one": config.get("set_alpha_to_one", False)}
    return getattr(diffusers, class_name).from_config(config, **overrides)


@dataclass
class SamplerSettings:
    """How to sample. Defaults are the reference recipe (UniPC, 30 steps, img2img at 0.75, CFG 2.0).

    ``sample_posterior``: the img2img start latent is ``mean + std * eps`` (True) or ``mean`` (False).
    ``dtype``: weights/activations of VAE, UNet and text encoder (scheduler math stays fp32).
    ``negative_guidance_token``: also write the image's guidance token into the negative prompt's last slot
    (the reference code hands its tokens to an unreleased pipeline, so its choice is unknown; default off).

    Example:
        >>> SamplerSettings(steps=30, strength=0.75).validate().denoising_steps
        22
    """

    scheduler: str = "unipc"
    steps: int = 30
    strength: float = 0.75
    guidance_scale: float = 2.0
    negative_prompt: str = NEGATIVE_PROMPT
    mode: str = "img2img"
    sample_posterior: bool = True
    dtype: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    negative_guidance_token: bool = False

    def validate(self) -> SamplerSettings:
        """Raise ValueError naming the first bad field; return self."""
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler={self.scheduler!r} is unknown; valid: {sorted(SCHEDULERS)}")
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is unknown; valid: {list(MODES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is unknown; valid: {list(DTYPES)}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps={self.steps!r} must be an integer >= 1")
        if not 0.0 < float(self.strength) <= 1.0:
            raise ValueError(f"strength={self.strength!r} must lie in (0, 1]")
        if self.mode == "img2img" and self.denoising_steps < 1:
            raise ValueError(
                f"steps={self.steps} x strength={self.strength} gives int({self.steps * self.strength:g}) = 0 "
                "denoising steps; raise steps or strength"
            )
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 1.0:
            raise ValueError(f"guidance_scale={self.guidance_scale!r} must be finite and >= 1.0 (1.0 = no CFG)")
        return self

    @property
    def denoising_steps(self) -> int:
        """UNet evaluations (per branch): ``min(int(steps * strength), steps)`` for img2img, else ``steps``."""
        if self.mode == "txt2img":
            return self.steps
        return min(int(self.steps * self.strength), self.steps)

    @property
    def cfg(self) -> bool:
        """Whether the uncond (negative prompt) branch runs."""
        return self.guidance_scale != 1.0


def latent_hw(pipe) -> tuple[int, int]:
    """The UNet's native latent (height, width), from ``unet.config.sample_size``.

    Example:
        >>> from realfake_ray.models.tiny import build_random_tiny_pipeline
        >>> latent_hw(build_random_tiny_pipeline())
        (8, 8)
    """
    size = pipe.unet.config.sample_size
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _vae_factor(vae) -> int:
    """Pixels per latent cell: 2 ** (number of VAE down blocks - 1)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _lora_weight_file(lora_dir: str) -> str:
    """The LoRA safetensors file: ``lora_dir`` itself, or the one (default-named) file inside it."""
    if os.path.isfile(lora_dir):
        return lora_dir
    if not os.path.isdir(lora_dir):
        raise FileNotFoundError(f"LoRA directory or file not found: {lora_dir}")
    default = os.path.join(lora_dir, LORA_WEIGHT_NAME)
    if os.path.isfile(default):
        return default
    found = sorted(f for f in os.listdir(lora_dir) if f.endswith(".safetensors"))
    if len(found) != 1:
        raise FileNotFoundError(f"no {LORA_WEIGHT_NAME} (nor exactly one *.safetensors) in {lora_dir}; found {found}")
    return os.path.join(lora_dir, found[0])


# (suffix, is_down): diffusers / peft / kohya-after-conversion spellings of the two LoRA factors.
_LORA_SUFFIXES = (
    (".lora_A.weight", True),
    (".lora.down.weight", True),
    (".lora_down.weight", True),
    (".lora_B.weight", False),
    (".lora.up.weight", False),
    (".lora_up.weight", False),
)


def _lora_target_dims(module: torch.nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a Linear / Conv2d that LoRA can wrap, else None."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, torch.nn.Conv2d):
        return module.in_channels, module.out_channels
    return None


def check_lora_fits(pipe, lora_file: str) -> int:
    """Raise ValueError naming ``lora_file`` and the first LoRA factor whose shape does not fit ``pipe``.

    Checks keys ``unet.<module>.lora_{A,B}.weight`` (and the ``lora.down/up`` spellings) against the
    Linear/Conv2d modules of the UNet and text encoder. Returns the number of factors checked.

    Example:
        >>> check_lora_fits(pipe, "/runs/x/lora/pytorch_lora_weights.safetensors")  # doctest: +SKIP
        128
    """
    state_dict, _ = type(pipe).lora_state_dict(lora_file)
    components = {"unet": pipe.unet, "text_encoder": getattr(pipe, "text_encoder", None)}
    checked = 0
    for key, tensor in state_dict.items():
        match = next(((key[: -len(s)], down) for s, down in _LORA_SUFFIXES if key.endswith(s)), None)
        if match is None:
            continue
        path, down = match
        prefix, _, sub = path.partition(".")
        root = components.get(prefix)
        if root is None:
            continue
        try:
            module = root.get_submodule(sub)
        except AttributeError:
            raise ValueError(f"LoRA file {lora_file}: key {key!r} names no module of the {prefix}") from None
        dims = _lora_target_dims(module)
        if dims is None:
            raise ValueError(f"LoRA file {lora_file}: key {key!r} targets a {type(module).__name__}, not Linear/Conv2d")
        want, got = (dims[0], tensor.shape[1]) if down else (dims[1], tensor.shape[0])
        if want != got:
            side = "input" if down else "output"
            raise ValueError(
                f"LoRA file {lora_file} does not fit this model: {key} has {side} width {got}, "
                f"but {prefix}.{sub} has {want} (shape {tuple(tensor.shape)}); was it trained on another base model?"
            )
        checked += 1
    if state_dict and not checked:
        example = next(iter(state_dict))
        raise ValueError(f"LoRA file {lora_file}: no key matches a UNet/text-encoder module (e.g. {example!r})")
    return checked


def apply_lora(pipe, lora_dir: str, lora_scale: float = 0.5) -> str:
    """Check, load and fuse a LoRA into ``pipe`` at ``lora_scale``, then drop the unfused adapters.

    Returns the weight file used. Raises ValueError (naming the file) when the LoRA does not fit.

    Example:
        >>> apply_lora(pipe, "/runs/x/lora", lora_scale=0.5)  # doctest: +SKIP
        '/runs/x/lora/pytorch_lora_weights.safetensors'
    """
    lora_file = _lora_weight_file(lora_dir)
    check_lora_fits(pipe, lora_file)
    try:
        pipe.load_lora_weights(os.path.dirname(lora_file) or ".", weight_name=os.path.basename(lora_file))
    except (RuntimeError, KeyError) as err:
        first_line = str(err).strip().splitlines()[:2]
        raise ValueError(f"LoRA file {lora_file} could not be loaded into this model: {' '.join(first_line)}") from err
    pipe.fuse_lora(lora_scale=lora_scale)
    pipe.unload_lora_weights()
    return lora_file


def _set_sdpa(module: torch.nn.Module) -> None:
    """Use PyTorch scaled-dot-product attention (diffusers' AttnProcessor2_0) in every attention layer."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    if getattr(module, "attn_processors", None):
        module.set_attn_processor(AttnProcessor2_0())


def _to_device_dtype(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move ``module`` to ``device``; cast only when its dtype differs (avoids diffusers' cast warning)."""
    module.to(device)
    param = next(module.parameters(), None)
    if param is not None and param.dtype != dtype:
        module.to(dtype)
    return module


def _per_image_randn(generators: list[torch.Generator], shape: tuple[int, ...]) -> Tensor:
    """One standard-normal draw of ``shape`` per generator, stacked (CPU, float32)."""
    return torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])


class Sampler:
    """Generate images from bank latents, prompts and guidance tokens with one pipeline on one device.

    Moves the pipeline's VAE, UNet and text encoder to ``device`` and the settings' dtype (in place),
    uses SDPA attention, optionally channels_last and ``torch.compile`` of the UNet, and pre-computes
    the negative-prompt embedding.

    Example:
        >>> from realfake_ray.models.tiny import build_random_tiny_pipeline
        >>> s = Sampler.from_pipeline(build_random_tiny_pipeline(), SamplerSettings(mode="txt2img", steps=2))
        >>> s(prompts=["photo of one"], seeds=[7]).dtype
        dtype('uint8')
    """

    def __init__(self, pipe, settings: SamplerSettings | None = None, device: str | torch.device = "cpu") -> None:
        self.settings = (settings or SamplerSettings()).validate()
        self.device = torch.device(device)
        self.dtype = DTYPES[self.settings.dtype]
        self.pipe = pipe
        self.vae, self.text_encoder, self.tokenizer = pipe.vae, pipe.text_encoder, pipe.tokenizer
        memory_format = torch.channels_last if self.settings.channels_last else torch.contiguous_format
        for module in (pipe.vae, pipe.unet, pipe.text_encoder):
            _to_device_dtype(module, self.device, self.dtype).eval().requires_grad_(False)
        for module in (pipe.vae, pipe.unet):
            module.to(memory_format=memory_format)
            _set_sdpa(module)
        self.unet = torch.compile(pipe.unet) if self.settings.compile else pipe.unet
        self.scheduler = make_scheduler(self.settings.scheduler, pipe.scheduler.config)
        self.scaling_factor = float(pipe.vae.config.scaling_factor)
        self.latent_channels = int(pipe.unet.config.in_channels)
        self.text_width = int(pipe.text_encoder.config.hidden_size)
        self.negative_embeds = self._encode([self.settings.negative_prompt]) if self.settings.cfg else None

    @classmethod
    def from_pipeline(
        cls,
        pipe,
        settings: SamplerSettings | None = None,
        device: str | torch.device = "cpu",
        lora_dir: str | None = None,
        lora_scale: float = 0.5,
    ) -> Sampler:
        """Like the constructor, after fusing the LoRA in ``lora_dir`` (if given) at ``lora_scale``.

        The LoRA is checked against the UNet before loading (ValueError naming the file on mismatch)
        and fused in the pipeline's current precision, before the cast to the sampling dtype.

        Example:
            >>> Sampler.from_pipeline(pipe, SamplerSettings(dtype="fp16"), "cuda", lora_dir="runs/x/lora")  # doctest: +SKIP
        """
        (settings or SamplerSettings()).validate()
        if lora_dir is not None:
            apply_lora(pipe, lora_dir, lora_scale)
        return cls(pipe, settings, device)

    def _encode(self, prompts: list[str], guidance_tokens: Tensor | None = None) -> Tensor:
        """Text hidden states [B, L, D] in the sampling dtype, guidance token in the last slot."""
        ids = tokenize(self.tokenizer, prompts).to(self.device)
        return encode_text(self.text_encoder, ids, guidance_tokens).to(self.dtype)

    def _check_inputs(self, prompts, seeds, latent_mean, latent_std, guidance_tokens) -> None:
        """ValueError naming the first inconsistent argument."""
        n = len(prompts)
        if n == 0 or len(seeds) != n:
            raise ValueError(f"need one seed per prompt and at least one prompt; got {n} prompts, {len(seeds)} seeds")
        if guidance_tokens is not None and tuple(guidance_tokens.shape) != (n, self.text_width):
            raise ValueError(f"guidance_tokens must be [{n}, {self.text_width}]; got {tuple(guidance_tokens.shape)}")
        if self.settings.mode == "txt2img":
            return
        if latent_mean is None:
            raise ValueError("img2img needs latent_mean [B, C, h, w] (bank latents x VAE scaling factor)")
        if latent_mean.ndim != 4 or latent_mean.shape[:2] != (n, self.latent_channels):
            raise ValueError(f"latent_mean must be [{n}, {self.latent_channels}, h, w]; got {tuple(latent_mean.shape)}")
        if latent_std is not None and latent_std.shape != latent_mean.shape:
            raise ValueError(f"latent_std shape {tuple(latent_std.shape)} != latent_mean {tuple(latent_mean.shape)}")

    def _timesteps(self) -> Tensor:
        """Set the schedule and return the timesteps to run (img2img keeps the last ``denoising_steps``)."""
        s, sched = self.settings, self.scheduler
        sched.set_timesteps(s.steps, device=self.device)
        begin = 0 if s.mode == "txt2img" else max(s.steps - s.denoising_steps, 0) * sched.order
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(begin)
        return sched.timesteps[begin:]

    def _initial_latents(self, generators, latent_mean, latent_std, timesteps) -> Tensor:
        """Start latents (fp32, on device): noised bank latent (img2img) or scaled pure noise (txt2img)."""
        if self.settings.mode == "txt2img":
            shape = (self.latent_channels, *latent_hw(self.pipe))
            noise = _per_image_randn(generators, shape).to(self.device)
            return noise * self.scheduler.init_noise_sigma
        shape = tuple(latent_mean.shape[1:])
        eps = _per_image_randn(generators, shape).to(self.device)  # posterior sample (always drawn)
        noise = _per_image_randn(generators, shape).to(self.device)  # forward-diffusion noise
        init = latent_mean.to(self.device, torch.float32)
        if self.settings.sample_posterior and latent_std is not None:
            init = init + latent_std.to(self.device, torch.float32) * eps
        return self.scheduler.add_noise(init, noise, timesteps[:1].repeat(len(init)))

    def _negative(self, n: int, guidance_tokens: Tensor | None) -> Tensor:
        """The CFG branch's embeddings [n, L, D]: the negative prompt, with the guidance token when asked."""
        negative = self.negative_embeds.expand(n, -1, -1)
        if self.settings.negative_guidance_token and guidance_tokens is not None:
            negative = inject_guidance_token(negative, guidance_tokens.to(self.device))
        return negative

    def _denoise(self, latents: Tensor, timesteps: Tensor, cond: Tensor, negative: Tensor | None) -> Tensor:
        """Run the UNet + scheduler loop; the uncond and cond branches share one UNet call."""
        s, sched = self.settings, self.scheduler
        embeds = torch.cat([negative, cond]) if s.cfg else cond
        for t in timesteps:
            x = torch.cat([latents, latents]) if s.cfg else latents
            x = sched.scale_model_input(x, t).to(self.dtype)
            eps = self.unet(x, t, encoder_hidden_states=embeds).sample.float()
            if s.cfg:
                uncond, text = eps.chunk(2)
                eps = uncond + s.guidance_scale * (text - uncond)
            latents = sched.step(eps, t, latents).prev_sample
        return latents

    def decode(self, latents: Tensor) -> np.ndarray:
        """VAE-decode scaled latents to uint8 images [B, H, W, 3]."""
        images = self.vae.decode((latents / self.scaling_factor).to(self.dtype)).sample.float()
        images = ((images / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return images.permute(0, 2, 3, 1).cpu().numpy()

    @torch.inference_mode()
    def __call__(
        self,
        *,
        prompts: list[str],
        seeds: list[int],
        latent_mean: Tensor | None = None,
        latent_std: Tensor | None = None,
        guidance_tokens: Tensor | None = None,
    ) -> np.ndarray:
        """Generate ``len(prompts)`` images, uint8 [B, H, W, 3].

        img2img: ``latent_mean``/``latent_std`` [B, C, h, w] are bank latents already multiplied by the
        VAE scaling factor. ``guidance_tokens`` [B, D] (CLIP image embeddings) replace the last text slot
        of the conditional branch; None = text only.

        Example:
            >>> images = sampler(prompts=p, seeds=[1, 2], latent_mean=m, latent_std=s, guidance_tokens=g)  # doctest: +SKIP
        """
        prompts = list(prompts)
        seeds = [int(x) for x in seeds]
        self._check_inputs(prompts, seeds, latent_mean, latent_std, guidance_tokens)
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        cond = self._encode(prompts, guidance_tokens)
        timesteps = self._timesteps()
        latents = self._initial_latents(generators, latent_mean, latent_std, timesteps)
        negative = self._negative(len(prompts), guidance_tokens) if self.settings.cfg else None
        latents = self._denoise(latents, timesteps, cond, negative)
        return self.decode(latents)


# ----------------------------------------------------------------------------------------------------
# Throughput benchmark (used by benchmarks/bench_sampler.py and the `realfake bench-sampler` CLI).
# ----------------------------------------------------------------------------------------------------

_SETTING_FIELDS = {f.name for f in dataclasses.fields(SamplerSettings)}
_ROW_KEYS = (
    "name", "scheduler", "steps", "strength", "batch_size", "dtype", "compile", "channels_last",
    "images_per_s", "s_per_batch", "tflop_per_img", "mfu", "peak_mem_gib", "note",
)  # fmt: skip
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


def _bench_inputs(pipe, batch_size: int, seed: int) -> dict:
    """Random-but-seeded sampler inputs shaped like a latent-bank batch."""
    gen = torch.Generator("cpu").manual_seed(seed)
    h, w = latent_hw(pipe)
    shape = (batch_size, int(pipe.unet.config.in_channels), h, w)
    width = int(pipe.text_encoder.config.hidden_size)
    return {
        "prompts": [build_prompt("tench", f"a fish number {i}", GENERATION_SUFFIX) for i in range(batch_size)],
        "seeds": list(range(seed, seed + batch_size)),
        "latent_mean": torch.randn(shape, generator=gen),
        "latent_std": 0.1 * torch.rand(shape, generator=gen),
        "guidance_tokens": torch.randn(batch_size, width, generator=gen),
    }


def model_flops(pipe, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Counted FLOPs per image of one UNet forward, one VAE decode and one VAE encode at native size."""
    h, w = latent_hw(pipe)
    unet, vae = pipe.unet, pipe.vae
    latent = torch.zeros(1, int(unet.config.in_channels), h, w, device=device, dtype=dtype)
    text = torch.zeros(1, pipe.tokenizer.model_max_length, int(unet.config.cross_attention_dim), device=device, dtype=dtype)
    factor = _vae_factor(vae)
    pixels = torch.zeros(1, 3, h * factor, w * factor, device=device, dtype=dtype)
    return {
        "unet_fwd": count_forward_flops(unet, latent, torch.tensor(500, device=device), encoder_hidden_states=text),
        "vae_decode": count_forward_flops(vae.decode, latent),
        "vae_encode": count_forward_flops(vae.encode, pixels),
    }


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
        "images_per_s": images_per_s,
        "s_per_batch": seconds,
        "tflop_per_img": flops / 1e12,
        "mfu": mfu(images_per_s, flops, peak) if peak else None,
        "peak_mem_gib": peak_mem,
        "note": spec.get("note", ""),
    }


def sampler_flops(settings: SamplerSettings, counted: dict[str, float]) -> float:
    """FLOPs per image of sampling with ``settings`` (FLOP model, see :func:`~realfake_ray.flops.img2img_flops`),
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
    inputs = _bench_inputs(pipe, batch_size, seed)
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
        _to_device_dtype(module, device, dtype)
    for module in (pipe.vae, pipe.unet):
        module.to(memory_format=torch.contiguous_format)
        _set_sdpa(module)
    if settings.dtype not in flops_cache:
        flops_cache[settings.dtype] = model_flops(pipe, device, dtype)
    counted = flops_cache[settings.dtype]
    ref.enable_model_cpu_offload(gpu_id=device.index or 0)  # the reference: moved to GPU, then offloaded
    h, w = latent_hw(pipe)
    factor = _vae_factor(pipe.vae)
    gen = torch.Generator("cpu").manual_seed(seed)
    images = torch.rand(batch_size, 3, h * factor, w * factor, generator=gen)
    prompts = _bench_inputs(pipe, batch_size, seed)["prompts"]

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
    are cast/moved in place; FLOPs per image follow :func:`realfake_ray.flops.img2img_flops`.
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
