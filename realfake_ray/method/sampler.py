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
    >>> from realfake_ray.method.sampler import Sampler, SamplerSettings
    >>> sampler = Sampler(build_random_tiny_pipeline(), SamplerSettings(steps=4))
    >>> mean = torch.zeros(2, 4, 8, 8)
    >>> sampler(prompts=["photo of one", "photo of two"], seeds=[0, 1], latent_mean=mean).shape
    (2, 32, 32, 3)
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from realfake_ray.devices import COMPILE_MODES, compile_mode_on, records_cuda_graphs
from realfake_ray.method.lora import apply_lora
from realfake_ray.method.prompts import NEGATIVE_PROMPT, tokenize
from realfake_ray.method.vision_token import encode_text, inject_vision_token

__all__ = [
    "DTYPES",
    "MODES",
    "SCHEDULERS",
    "SDPA_BACKENDS",
    "Sampler",
    "SamplerSettings",
    "latent_hw",
    "make_scheduler",
    "set_sdpa",
    "to_device_dtype",
    "vae_factor",
]

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODES = ("img2img", "txt2img")
# Scaled-dot-product attention kernels of the UNet ("auto": PyTorch picks); efficient and cudnn exist only on CUDA
SDPA_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")
_CUDA_SDPA = ("efficient", "cudnn")
_SCHEDULER_CLASSES = {
    "unipc": ("UniPCMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True, "algorithm_type": "dpmsolver++"}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
}
SCHEDULERS = frozenset(_SCHEDULER_CLASSES)


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
    ``negative_vision_token``: also write the image's guidance token into the negative prompt's last slot
    (the reference code hands its tokens to an unreleased pipeline, so its choice is unknown; default off).

    Speed options (all off by default; docs/generate.md says what each is tested to change):
    ``compile_mode``: the ``torch.compile`` mode of the UNet when ``compile`` (``reduce-overhead`` and
    ``max-autotune`` record CUDA graphs: one per batch shape, CUDA only). ``sdpa_backend``: the attention
    kernel of the UNet's attention layers (``efficient``/``cudnn``: CUDA only; ``flash`` needs fp16/bf16 on
    CUDA). ``vae_dtype``: the VAE's dtype (None: ``dtype``), e.g. bf16 to decode fp16-sampled latents without
    fp16's overflow. ``fuse_qkv``: fuse each attention layer's q/k/v (self) and k/v (cross) projections into
    one matmul (diffusers' ``fuse_qkv_projections``).

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
    negative_vision_token: bool = False
    compile_mode: str = "default"
    sdpa_backend: str = "auto"
    vae_dtype: str | None = None
    fuse_qkv: bool = False

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
        return self._validate_speed_options()

    def _validate_speed_options(self) -> SamplerSettings:
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode={self.compile_mode!r} is unknown; valid: {list(COMPILE_MODES)}")
        if self.compile_mode != "default" and not self.compile:
            raise ValueError(f"compile_mode={self.compile_mode!r} needs compile=True")
        if self.sdpa_backend not in SDPA_BACKENDS:
            raise ValueError(f"sdpa_backend={self.sdpa_backend!r} is unknown; valid: {list(SDPA_BACKENDS)}")
        if self.vae_dtype is not None and self.vae_dtype not in DTYPES:
            raise ValueError(f"vae_dtype={self.vae_dtype!r} is unknown; valid: None (= dtype) or {list(DTYPES)}")
        return self

    def cuda_only(self) -> list[str]:
        """The settings that need a CUDA device (``name=value``), empty when none is set.

        Example:
            >>> SamplerSettings(compile=True, compile_mode="reduce-overhead", sdpa_backend="cudnn").cuda_only()
            ['compile_mode=reduce-overhead', 'sdpa_backend=cudnn']
        """
        found = [f"compile_mode={self.compile_mode}"] if self.compile and records_cuda_graphs(self.compile_mode) else []
        return found + ([f"sdpa_backend={self.sdpa_backend}"] if self.sdpa_backend in _CUDA_SDPA else [])

    def for_cpu(self) -> SamplerSettings:
        """These settings as they run on a CPU: fp32 throughout, the CUDA-only options dropped (CUDA graphs,
        the CUDA attention kernels: see :meth:`cuda_only`). What the generate stage samples with on a CPU node.

        Example:
            >>> s = SamplerSettings(dtype="bf16", vae_dtype="bf16", compile=True, compile_mode="max-autotune")
            >>> s.for_cpu().dtype, s.for_cpu().vae_dtype, s.for_cpu().compile_mode
            ('fp32', None, 'max-autotune-no-cudagraphs')
        """
        return dataclasses.replace(
            self,
            dtype="fp32",
            vae_dtype=None,
            compile_mode=compile_mode_on("cpu", self.compile_mode),
            sdpa_backend="auto" if self.sdpa_backend in _CUDA_SDPA else self.sdpa_backend,
        ).validate()

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


def vae_factor(vae) -> int:
    """Pixels per latent cell: 2 ** (number of VAE down blocks - 1)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def set_sdpa(module: torch.nn.Module) -> None:
    """Use PyTorch scaled-dot-product attention (diffusers' AttnProcessor2_0) in every attention layer."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    if getattr(module, "attn_processors", None):
        module.set_attn_processor(AttnProcessor2_0())


def to_device_dtype(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
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

    Moves the pipeline's VAE, UNet and text encoder to ``device`` and the settings' dtypes (in place),
    uses SDPA attention, optionally channels_last, fused q/k/v projections and ``torch.compile`` of the
    UNet, turns VAE tiling and slicing off, and pre-computes the negative-prompt embedding. The two CFG
    branches always run as one UNet batch. Settings that need CUDA raise ValueError on another device.
    Each phase of a call is a ``torch.profiler`` range (``sampler.prepare``, ``sampler.denoise``,
    ``sampler.decode``, ``sampler.to_host``), which ``benchmarks/profile_unet.py`` reads.

    Example:
        >>> from realfake_ray.models.tiny import build_random_tiny_pipeline
        >>> s = Sampler.from_pipeline(build_random_tiny_pipeline(), SamplerSettings(mode="txt2img", steps=2))
        >>> s(prompts=["photo of one"], seeds=[7]).dtype
        dtype('uint8')
    """

    def __init__(self, pipe, settings: SamplerSettings | None = None, device: str | torch.device = "cpu") -> None:
        self.settings = (settings or SamplerSettings()).validate()
        self.device = torch.device(device)
        if self.device.type != "cuda" and self.settings.cuda_only():
            raise ValueError(
                f"{', '.join(self.settings.cuda_only())} needs a CUDA device, not {self.device}; "
                "SamplerSettings.for_cpu() drops it"
            )
        if self.device.type == "cuda" and self.settings.sdpa_backend == "flash" and self.settings.dtype == "fp32":
            raise ValueError("sdpa_backend='flash' needs dtype fp16 or bf16 on CUDA (FlashAttention has no fp32 kernel)")
        self.dtype = DTYPES[self.settings.dtype]
        self.vae_dtype = DTYPES[self.settings.vae_dtype or self.settings.dtype]
        self.pipe = pipe
        self.vae, self.text_encoder, self.tokenizer = pipe.vae, pipe.text_encoder, pipe.tokenizer
        self._prepare_modules(pipe)
        self.unet = self._compiled(pipe.unet)
        self.scheduler = make_scheduler(self.settings.scheduler, pipe.scheduler.config)
        self.scaling_factor = float(pipe.vae.config.scaling_factor)
        self.latent_channels = int(pipe.unet.config.in_channels)
        self.text_width = int(pipe.text_encoder.config.hidden_size)
        self.negative_embeds = self._encode([self.settings.negative_prompt]) if self.settings.cfg else None

    def _prepare_modules(self, pipe) -> None:
        """Device, dtypes, memory format, SDPA attention, fused projections and no VAE tiling, in place (each
        setting applied or undone, so that a pipeline can be reused by Samplers of other settings)."""
        s = self.settings
        memory_format = torch.channels_last if s.channels_last else torch.contiguous_format
        for module, dtype in ((pipe.vae, self.vae_dtype), (pipe.unet, self.dtype), (pipe.text_encoder, self.dtype)):
            to_device_dtype(module, self.device, dtype).eval().requires_grad_(False)
        for module in (pipe.vae, pipe.unet):
            module.to(memory_format=memory_format)
            set_sdpa(module)
        if s.fuse_qkv:
            pipe.unet.fuse_qkv_projections()
        pipe.vae.disable_tiling()  # one decode per batch at full size: tiles only save memory, at a cost in speed
        pipe.vae.disable_slicing()

    def _compiled(self, unet: torch.nn.Module):
        """The UNet, ``torch.compile``d with the settings' mode (static shapes: one graph per batch size)."""
        if not self.settings.compile:
            return unet
        return torch.compile(unet, mode=self.settings.compile_mode, dynamic=False)

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

    def _encode(self, prompts: list[str], vision_tokens: Tensor | None = None) -> Tensor:
        """Text hidden states [B, L, D] in the sampling dtype, guidance token in the last slot."""
        ids = tokenize(self.tokenizer, prompts).to(self.device)
        return encode_text(self.text_encoder, ids, vision_tokens).to(self.dtype)

    def _check_inputs(self, prompts, seeds, latent_mean, latent_std, vision_tokens) -> None:
        """ValueError naming the first inconsistent argument."""
        n = len(prompts)
        if n == 0 or len(seeds) != n:
            raise ValueError(f"need one seed per prompt and at least one prompt; got {n} prompts, {len(seeds)} seeds")
        if vision_tokens is not None and tuple(vision_tokens.shape) != (n, self.text_width):
            raise ValueError(f"vision_tokens must be [{n}, {self.text_width}]; got {tuple(vision_tokens.shape)}")
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

    def _negative(self, n: int, vision_tokens: Tensor | None) -> Tensor:
        """The CFG branch's embeddings [n, L, D]: the negative prompt, with the guidance token when asked."""
        negative = self.negative_embeds.expand(n, -1, -1)
        if self.settings.negative_vision_token and vision_tokens is not None:
            negative = inject_vision_token(negative, vision_tokens.to(self.device))
        return negative

    def _attention(self):
        """The context that selects the UNet's attention kernel (``sdpa_backend``; nothing for ``auto``)."""
        if self.settings.sdpa_backend == "auto":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                   "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[self.settings.sdpa_backend]
        return sdpa_kernel([backend])

    def _denoise(self, latents: Tensor, timesteps: Tensor, cond: Tensor, negative: Tensor | None) -> Tensor:
        """Run the UNet + scheduler loop; the uncond and cond branches share one UNet call."""
        s, sched = self.settings, self.scheduler
        embeds = torch.cat([negative, cond]) if s.cfg else cond
        graphs = s.compile and records_cuda_graphs(s.compile_mode)
        with self._attention():
            for t in timesteps:
                x = torch.cat([latents, latents]) if s.cfg else latents
                x = sched.scale_model_input(x, t).to(self.dtype)
                if graphs:  # a new replay of the recorded graphs: the last step's outputs are no longer read
                    torch.compiler.cudagraph_mark_step_begin()
                # a graph's output lives in the graph's memory, overwritten by the next replay: copy it out
                eps = self.unet(x, t, encoder_hidden_states=embeds).sample.to(torch.float32, copy=graphs)
                if s.cfg:
                    uncond, text = eps.chunk(2)
                    eps = uncond + s.guidance_scale * (text - uncond)
                latents = sched.step(eps, t, latents).prev_sample
        return latents

    def decode(self, latents: Tensor) -> np.ndarray:
        """VAE-decode scaled latents to uint8 images [B, H, W, 3] (in the VAE's dtype, ``vae_dtype``)."""
        with torch.profiler.record_function("sampler.decode"):
            images = self.vae.decode((latents / self.scaling_factor).to(self.vae_dtype)).sample.float()
            images = ((images / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        with torch.profiler.record_function("sampler.to_host"):
            return images.permute(0, 2, 3, 1).cpu().numpy()

    @torch.inference_mode()
    def __call__(
        self,
        *,
        prompts: list[str],
        seeds: list[int],
        latent_mean: Tensor | None = None,
        latent_std: Tensor | None = None,
        vision_tokens: Tensor | None = None,
    ) -> np.ndarray:
        """Generate ``len(prompts)`` images, uint8 [B, H, W, 3].

        img2img: ``latent_mean``/``latent_std`` [B, C, h, w] are bank latents already multiplied by the
        VAE scaling factor. ``vision_tokens`` [B, D] (CLIP image embeddings) replace the last text slot
        of the conditional branch; None = text only.

        Example:
            >>> images = sampler(prompts=p, seeds=[1, 2], latent_mean=m, latent_std=s, vision_tokens=g)  # doctest: +SKIP
        """
        prompts = list(prompts)
        seeds = [int(x) for x in seeds]
        self._check_inputs(prompts, seeds, latent_mean, latent_std, vision_tokens)
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        with torch.profiler.record_function("sampler.prepare"):  # text encoding, start latents
            cond = self._encode(prompts, vision_tokens)
            timesteps = self._timesteps()
            latents = self._initial_latents(generators, latent_mean, latent_std, timesteps)
            negative = self._negative(len(prompts), vision_tokens) if self.settings.cfg else None
        with torch.profiler.record_function("sampler.denoise"):
            latents = self._denoise(latents, timesteps, cond, negative)
        return self.decode(latents)
