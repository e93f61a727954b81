"""The fine-tuning step, pure torch (no Ray): load the frozen SD components with a trainable LoRA, draw a
random latent crop per bank row, and one optimisation step of the denoising loss plus the MMD
distribution-matching term, conditioned on text and the visual guidance token.

Example:
    >>> models = load_models(model_dir, FinetuneConfig(), seed=0, device=torch.device("cpu"))  # doctest: +SKIP
    >>> metrics = train_step(models, batch, generator, ft, "epsilon", None, optimizer, None)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from realfake_ray.config import FinetuneConfig
from realfake_ray.devices import compile_mode_on, records_cuda_graphs
from realfake_ray.method.lora import add_lora
from realfake_ray.method.losses import finetune_loss
from realfake_ray.method.vision_token import encode_text
from realfake_ray.seeds import derive_seed

__all__ = ["METRIC_KEYS", "random_latent_crop", "FinetuneModels", "compile_unet", "load_models", "latent_size", "lr_at",
           "train_step"]

METRIC_KEYS = ("loss", "denoise", "mmd")


def random_latent_crop(mean: bytes, std: bytes, shape: tuple[int, int, int], size: int,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A ``size``×``size`` crop at a random latent-cell offset (= 8 px for SD) of a stored fine-tuning view.

    ``mean``/``std`` are float16 bytes of ``shape`` = (C, h, w), h or w equal to ``size``: the reference's
    RandomCrop(512) of the short-side-resized image, taken in latent space. Returns float32 [C, size, size].

    Example:
        >>> m = np.arange(2 * 4 * 6, dtype=np.float16)
        >>> crop, _ = random_latent_crop(m.tobytes(), m.tobytes(), (2, 4, 6), 4, np.random.default_rng(0))
        >>> crop.shape
        (2, 4, 4)
    """
    c, h, w = shape
    top, left = int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))
    window = (slice(None), slice(top, top + size), slice(left, left + size))
    crop = [np.frombuffer(b, np.float16).reshape(c, h, w)[window].astype(np.float32) for b in (mean, std)]
    return crop[0], crop[1]


@dataclass
class FinetuneModels:
    unet: torch.nn.Module  # DDP-wrapped when world size > 1
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    params: list
    weight_dtype: torch.dtype
    cuda_graphs: bool = False  # the UNet replays recorded CUDA graphs (finetune.compile_mode on a GPU)


def _weight_dtype(mixed_precision: str, device: torch.device) -> torch.dtype:
    """Frozen-weight dtype: fp16/bf16 on GPU as configured; always fp32 on CPU."""
    if device.type != "cuda":
        return torch.float32
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def load_models(model_dir: str, ft: FinetuneConfig, seed: int, device: torch.device,
                 dtype: torch.dtype | None = None) -> FinetuneModels:
    """Tokenizer, frozen text encoder, UNet + LoRA (identically initialised on every rank), DDPM scheduler.

    ``dtype`` (default: from ``ft.mixed_precision`` and the device) is the frozen weights' dtype.
    """
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    dtype = dtype or _weight_dtype(ft.mixed_precision, device)
    tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", torch_dtype=dtype, use_safetensors=True)
    text_encoder.requires_grad_(False).eval().to(device)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", torch_dtype=dtype, use_safetensors=True)
    unet.to(device)
    torch.manual_seed(derive_seed(seed, "lora-init"))
    params = add_lora(unet, ft.lora_rank, ft.lora_alpha, ft.lora_targets)
    scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    graphs = compile_unet(unet, ft.compile_mode, device.type) if ft.compile else False
    return FinetuneModels(unet, text_encoder, tokenizer, scheduler, params, dtype, graphs)


def compile_unet(unet: torch.nn.Module, mode: str, device_type: str, backend: str = "inductor") -> bool:
    """``torch.compile`` the UNet's forward in place (``nn.Module.compile``: the same module, so its state dict,
    LoRA saving and DDP wrapping are unchanged), with static shapes (the step's batch is fixed). On a device
    other than CUDA the CUDA-graph modes run without graphs. Returns whether CUDA graphs are recorded.

    Example:
        >>> compile_unet(models.unet, "reduce-overhead", "cuda")  # doctest: +SKIP
        True
    """
    mode = compile_mode_on(device_type, mode)
    unet.compile(backend=backend, mode=mode if backend == "inductor" else None, dynamic=False)
    return records_cuda_graphs(mode)


def latent_size(unet: torch.nn.Module) -> int:
    """The UNet's square latent side (``config.sample_size``), through a DDP wrapper too."""
    size = getattr(unet, "module", unet).config.sample_size
    return int(size if isinstance(size, int) else size[0])


def lr_at(ft: FinetuneConfig, step: int) -> float:
    """Constant learning rate after an optional linear warm-up over ``warmup_steps``."""
    if ft.warmup_steps and step < ft.warmup_steps:
        return ft.lr * (step + 1) / ft.warmup_steps
    return ft.lr


def _guidance_token(ft: FinetuneConfig, batch: dict, class_means: torch.Tensor | None) -> torch.Tensor | None:
    if ft.vision_token == "image":
        return batch["clip_embed"]
    if ft.vision_token == "class_mean":
        return class_means[batch["label"]]
    return None


def _sample_latents(batch: dict, generator: torch.Generator, hflip: bool) -> torch.Tensor:
    """Draw from the stored posterior (mean + std·ε) and flip half the batch horizontally."""
    mean, std = batch["latent_mean"], batch["latent_std"]
    latents = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device)
    if hflip:
        flip = torch.rand(len(latents), generator=generator, device=mean.device) < 0.5
        latents = torch.where(flip.view(-1, 1, 1, 1), latents.flip(-1), latents)
    return latents


def train_step(models: FinetuneModels, batch: dict, generator: torch.Generator, ft: FinetuneConfig, prediction_type: str,
               class_means: torch.Tensor | None, optimizer, scaler) -> torch.Tensor:
    """One optimisation step on a local batch; returns the detached ``[loss, denoise, dm]``.

    Example:
        >>> train_step(models, batch, torch.Generator().manual_seed(0), ft, "epsilon", None, opt, None)  # doctest: +SKIP
        tensor([1.0312, 0.8470, 61.2331])
    """

    if models.cuda_graphs:  # a new step: the graphs' outputs of the last one are no longer read
        torch.compiler.cudagraph_mark_step_begin()
    latents = _sample_latents(batch, generator, ft.hflip)
    noise = torch.randn(latents.shape, generator=generator, device=latents.device)
    sched = models.scheduler
    timesteps = torch.randint(0, sched.config.num_train_timesteps, (len(latents),), generator=generator, device=latents.device)
    noisy = sched.add_noise(latents, noise, timesteps)
    target = noise if prediction_type == "epsilon" else sched.get_velocity(latents, noise, timesteps)
    with torch.no_grad():
        hidden = encode_text(models.text_encoder, batch["input_ids"], _guidance_token(ft, batch, class_means))
    device_type = latents.device.type
    with torch.autocast(device_type, dtype=models.weight_dtype, enabled=models.weight_dtype != torch.float32):
        pred = models.unet(noisy.to(models.weight_dtype), timesteps, hidden.to(models.weight_dtype), return_dict=False)[0]
    out = finetune_loss(
        pred.float(), target.float(), timesteps, sched.alphas_cumprod, gamma=ft.snr_gamma,
        prediction_type=prediction_type, mmd_weight=ft.mmd_weight, mmd_kernel=ft.mmd_kernel, mmd_scope=ft.mmd_scope,
    )
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(out["loss"]).backward()
        scaler.unscale_(optimizer)
    else:
        out["loss"].backward()
    if ft.grad_clip:
        torch.nn.utils.clip_grad_norm_(models.params, ft.grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return torch.stack([out[k].detach().float() for k in METRIC_KEYS])
