"""Decode images of any common kind: ``open_rgb`` turns the bytes of any image (RGB, L, LA, P, RGBA, CMYK, 16-bit,
any size) into an upright RGB image; ``decode_image`` / ``decode_views`` cut the views the stages use from it.
Listing datasets is :mod:`realfake_ray.data.sources`' (every layout, ImageFolder included).

Example:
    >>> from realfake_ray import storage
    >>> pixels, width, height = decode_image(storage.read_bytes("embedded:digits/train/digit_0/0000.png"), 16)
    >>> pixels.shape, pixels.dtype.name
    ((16, 16, 3), 'uint8')
"""

from __future__ import annotations

import io
import posixpath

import numpy as np
from PIL import Image, ImageOps

from realfake_ray import storage

__all__ = [
    "DEFAULT_EXTENSIONS", "DatasetError", "open_rgb", "decode_image", "centre_view", "stem", "squash_view",
    "GENERATION_VIEWS", "MAX_ASPECT", "full_view", "decode_views",
]

DEFAULT_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm")


class DatasetError(ValueError):
    """The dataset cannot be used; the message names the location and the problem."""


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        pixels = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
        image = Image.fromarray((pixels * (255.0 / peak)).clip(0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = Image.fromarray((np.asarray(image).clip(0, 1) * 255).astype(np.uint8), mode="L")
    if image.mode in ("LA", "PA", "RGBA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def _open(data: bytes) -> tuple[Image.Image, int, int]:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        width, height = image.size
        return _to_rgb(ImageOps.exif_transpose(image) or image), width, height


def open_rgb(data: bytes) -> Image.Image:
    """Decode image bytes of any common mode (see the module docstring) to an upright RGB PIL image.

    Raises ``ValueError``/``OSError`` for undecodable data. Example: ``open_rgb(storage.read_bytes(url))``.
    """
    return _open(data)[0]


def decode_image(data: bytes, resolution: int) -> tuple[np.ndarray, int, int]:
    """Decode image bytes to RGB uint8 ``[resolution, resolution, 3]``; also the source width and height.

    Raises ``ValueError``/``OSError`` for undecodable data (callers count and skip those).
    """
    image, width, height = _open(data)
    return centre_view(image, resolution), width, height


def centre_view(image: Image.Image, resolution: int) -> np.ndarray:
    """Short side to ``resolution`` (bicubic), centre square crop → uint8 ``[resolution, resolution, 3]``.

    Example: ``centre_view(open_rgb(data), 512)``."""
    scale = resolution / min(image.width, image.height)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, Image.BICUBIC, reducing_gap=3.0)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    return np.array(image.crop((left, top, left + resolution, top + resolution)), dtype=np.uint8)


def stem(image_id: str) -> str:
    """A safe file stem from an image id: ``n01/img_1.JPEG`` → ``img_1``; nested or odd names get a hash."""
    without_class = image_id.split("/", 1)[-1]
    return storage.safe_name(posixpath.splitext(without_class)[0])


def squash_view(image: Image.Image, resolution: int) -> np.ndarray:
    """The whole image resized to ``resolution``² whatever its aspect (bicubic) — the reference's img2img
    input. Example: ``squash_view(open_rgb(data), 512).shape`` → ``(512, 512, 3)``."""
    return np.array(image.resize((resolution, resolution), Image.BICUBIC, reducing_gap=3.0), dtype=np.uint8)


GENERATION_VIEWS = {"squash": squash_view, "centre": centre_view}
MAX_ASPECT = 2.0  # the fine-tuning view keeps at most a 2:1 centre part of a panorama


def full_view(image: Image.Image, resolution: int, multiple: int = 8) -> np.ndarray:
    """The whole image with its short side at ``resolution`` and its long side rounded down to a ``multiple`` of
    pixels (one latent cell), aspect capped at :data:`MAX_ASPECT` by a centre crop → uint8 ``[H, W, 3]``:
    what fine-tuning takes random ``resolution``² crops of (the reference: Resize + RandomCrop).

    Example: ``full_view(Image.new("RGB", (640, 480)), 512).shape`` → ``(512, 680, 3)``.
    """
    scale = resolution / min(image.width, image.height)
    long_side = min(int(max(image.width, image.height) * scale / multiple) * multiple, int(resolution * MAX_ASPECT))
    long_side = max(long_side, resolution)
    wide = image.width >= image.height
    crop_long = long_side / scale  # the source extent that maps to long_side pixels (≤ the image's long side)
    if wide:
        left = (image.width - crop_long) / 2
        box, size = (left, 0, left + crop_long, image.height), (long_side, resolution)
    else:
        top = (image.height - crop_long) / 2
        box, size = (0, top, image.width, top + crop_long), (resolution, long_side)
    return np.array(image.resize(size, Image.BICUBIC, box=box, reducing_gap=3.0), dtype=np.uint8)


def decode_views(data: bytes, resolution: int, generation_view: str = "squash", multiple: int = 8):
    """Decode image bytes into ``(generation view [res, res, 3], fine-tuning view [H, W, 3], width, height)``.

    Raises ``ValueError``/``OSError`` for undecodable data (callers count and skip those).
    """
    image, width, height = _open(data)
    return GENERATION_VIEWS[generation_view](image, resolution), full_view(image, resolution, multiple), width, height
