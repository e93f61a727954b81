"""CLIP image embeddings with the run's own CLIP vision model: the latent bank's ``clip_embed`` column, the
guidance token's source, and the space the distribution metrics (MMD, KID) are measured in.

Example:
    >>> embeds = ClipEmbedder(cfg).embed(uint8_bhw3)  # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np

from realfake_ray.config import RunConfig
from realfake_ray.devices import device_and_dtype
from realfake_ray.models import loading

__all__ = ["ClipEmbedder"]


class ClipEmbedder:
    """Actor (or plain object): the CLIP vision model of the run, loaded once, embeds decoded images.

    The same model and preprocessing serve the latent bank (real images) and the distribution metrics
    (synthetic images), so both sides of an MMD live in one embedding space. Example::

        embedder = ClipEmbedder(cfg)
        embeds = embedder.embed(uint8_bhw3)          # float16 [B, D]
        ds.map_batches(ClipEmbedder, fn_constructor_args=(cfg,), ...)  # "pixels" -> "clip_embed"
    """

    def __init__(self, cfg: RunConfig, dtype: str | None = None):
        model_dir = loading.resolve_model_dir(cfg.model.pretrained, cfg.model.revision, cfg.model.hub_timeout_s)
        clip_dir = loading.clip_vision_dir(model_dir, cfg.model.clip_vision, cfg.model.hub_timeout_s)
        self.device, self.dtype = device_and_dtype(dtype or cfg.encode.dtype)
        self.model, self.processor = loading.load_clip_vision(clip_dir, torch_dtype=self.dtype)
        self.model.to(self.device)

    def embed(self, pixels, batch_size: int | None = None) -> np.ndarray:
        """uint8 ``[B, H, W, 3]`` images (or a list of ``[H, W, 3]`` of any sizes: the processor resizes and
        centre-crops each) → float16 ``[B, D]`` projected CLIP image embeddings, ``batch_size`` at a time
        (None: all in one forward)."""
        import torch

        out = []
        with torch.inference_mode():
            step = batch_size or max(len(pixels), 1)
            for start in range(0, len(pixels), step):
                chunk = list(pixels[start : start + step])
                clip_in = self.processor(images=chunk, return_tensors="pt")["pixel_values"]
                out.append(self.model(pixel_values=clip_in.to(self.device, self.dtype)).image_embeds.float().cpu())
        return torch.cat(out).numpy().astype(np.float16)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels = batch.pop("pixels")
        return {**batch, "clip_embed": self.embed(pixels)}
