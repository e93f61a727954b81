"""The classifier's image views, cut on CPU decode tasks: the training view (RandomResizedCrop, flip, ColorJitter
as timm/torchvision draw them, every draw from an explicit numpy generator) and the standard eval view.

numpy and PIL only: the Ray Data tasks that decode images import this module and never torch.

Example:
    >>> from PIL import Image
    >>> TrainView(16, (1.0, 1.0), "bilinear", hflip=False)(Image.new("RGB", (40, 30)), np.random.default_rng(0)).shape
    (16, 16, 3)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance

__all__ = ["random_crop_box", "colour_jitter", "TrainView", "eval_view"]

_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def random_crop_box(
    width: int, height: int, scale: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop draw as ``(left, top, w, h)``, on an explicit numpy generator.

    Example: ``random_crop_box(500, 375, (0.08, 1.0), np.random.default_rng(0))``.
    """
    area, log_ratio = width * height, (math.log(_RATIO[0]), math.log(_RATIO[1]))
    for _ in range(10):
        u = rng.random(4)
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(u[3] * (width - w + 1)), int(u[2] * (height - h + 1)), w, h
    in_ratio = width / height  # fallback: centre crop at the aspect ratio clamped to _RATIO
    if in_ratio < _RATIO[0]:
        w, h = width, int(round(width / _RATIO[0]))
    elif in_ratio > _RATIO[1]:
        w, h = int(round(height * _RATIO[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def colour_jitter(image: Image.Image, strength: float, rng: np.random.Generator) -> Image.Image:
    """torchvision/timm ``ColorJitter(strength, strength, strength)``: brightness, contrast and saturation
    factors uniform in [1 − s, 1 + s], applied in a random order, all draws from ``rng``.

    Example: ``colour_jitter(image, 0.4, np.random.default_rng(0))``.
    """
    ops = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)  # torchvision's PIL kernels
    factors = rng.uniform(max(0.0, 1 - strength), 1 + strength, 3)
    for i in rng.permutation(3):
        image = ops[i](image).enhance(float(factors[i]))
    return image


@dataclass(frozen=True)
class TrainView:
    """The training view of one decoded RGB image: RandomResizedCrop(``size``, ``crop_scale``, ratio 3/4–4/3)
    resized with ``interpolation`` (``random``: bilinear or bicubic per image, as timm), horizontal flip
    (p = ½, when ``hflip``), ColorJitter(``color_jitter``) → uint8 ``[size, size, 3]``. Every random draw
    comes from the ``rng`` passed per image.

    Example: ``TrainView(224)(Image.open(path).convert("RGB"), np.random.default_rng(seed))``.
    """

    size: int
    crop_scale: tuple[float, float] = (0.08, 1.0)
    interpolation: str = "random"
    hflip: bool = True
    color_jitter: float = 0.0

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> np.ndarray:
        left, top, w, h = random_crop_box(image.width, image.height, self.crop_scale, rng)
        mode = self.interpolation if self.interpolation != "random" else ("bilinear", "bicubic")[int(rng.integers(2))]
        view = image.resize((self.size, self.size), _RESAMPLE[mode], box=(left, top, left + w, top + h))
        if rng.random() < 0.5 and self.hflip:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.color_jitter > 0:
            view = colour_jitter(view, self.color_jitter, rng)
        return np.array(view, dtype=np.uint8)  # a writable copy (torch.from_numpy warns on read-only)


def eval_view(image: Image.Image, image_size: int, crop_pct: float = 0.875, interpolation: str = "bilinear") -> np.ndarray:
    """The standard eval view: short side to ⌊S / crop_pct⌋ and a centre S×S crop → uint8 ``[S,S,3]``
    (the reference: crop_pct 0.95, bicubic → resize 235, crop 224; crop_pct 1 keeps a square S-px image as is).

    Example: ``eval_view(Image.open(path).convert("RGB"), 224, 0.95, "bicubic").shape`` → ``(224, 224, 3)``.
    """
    short = int(math.floor(image_size / crop_pct))
    factor = short / min(image.width, image.height)
    size = (max(short, round(image.width * factor)), max(short, round(image.height * factor)))
    if size != image.size:
        image = image.resize(size, _RESAMPLE[interpolation])
    left, top = (image.width - image_size) // 2, (image.height - image_size) // 2
    return np.array(image.crop((left, top, left + image_size, top + image_size)), dtype=np.uint8)
