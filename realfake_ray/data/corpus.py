"""The source corpus of the tiny base model: printed digits with captions (never the real set).

The tiny preset's diffusion model stands in for SD v1.5, which was pretrained on a broad web corpus
and then adapted to ImageNet by Real-Fake. Our analogue of the web corpus is printed digits: each image
is one digit rendered from a TrueType font that matplotlib ships (found at run time; fonts whose
glyphs are not digits are filtered out by rendering them), with a seeded random size, position,
rotation, shear, stroke weight, blur, contrast and background noise, and a caption built from those
choices ("digit seven, bold serif, tilted left, dark on light") — the analogue of web alt-text.
Class names match the embedded dataset ("digit seven"). The real handwritten scans are never used.

Image ``i`` of a corpus depends only on ``(seed, i)``, so any slice can be rendered anywhere.

Example:
    >>> corpus = DigitCorpus(seed=0)
    >>> sample = corpus[3]
    >>> sample.image.shape, sample.label, "digit three" in sample.caption
    ((32, 32, 3), 3, True)
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from realfake_ray.seeds import derive_seed

__all__ = ["CLASS_NAMES", "CaptionedDigit", "DigitCorpus", "FontStyle", "digit_fonts", "caption_prompts"]

CLASS_NAMES = tuple(f"digit {n}" for n in ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"))
SIZE = 32
_RENDER = 4  # render at 4x and downsample: anti-aliased strokes
_PREFIXES = ("", "", "photo of ", "a photo of ", "picture of ", "image of ", "a scan of ")
_QUALITY = ("", "", "", ", best quality", ", high quality", ", low quality")


@dataclass(frozen=True)
class FontStyle:
    """One usable font file and the words a caption uses for it."""

    path: str
    words: str  # e.g. "bold serif", "italic sans", "typewriter"


@dataclass(frozen=True)
class CaptionedDigit:
    image: np.ndarray  # uint8 [32, 32, 3]
    label: int
    caption: str


def _style_words(stem: str) -> str:
    """Caption words for a font file stem (DejaVuSerif-BoldItalic → "bold italic serif")."""
    s = stem.lower()
    family = "typewriter" if ("mono" in s or s.startswith("cmtt")) else (
        "sans" if ("sans" in s or s.startswith("cmss")) else "serif")
    weight = "bold " if ("bol" in s or s.startswith("cmb")) else ""
    slant = "italic " if any(k in s for k in ("ital", "obli", "cmti", "cmmi")) or s.endswith("ita") else ""
    old = " old-style" if s.startswith("cmmi") else ""
    return f"{weight}{slant}{family}{old}"


def _glyph(font: ImageFont.FreeTypeFont, text: str, size: int = 24) -> np.ndarray:
    """A glyph cropped to its ink and resized to ``size``² (float, 1 = ink); zeros when it draws nothing."""
    canvas = Image.new("L", (96, 96), 0)
    ImageDraw.Draw(canvas).text((48, 48), text, fill=255, font=font, anchor="mm")
    box = canvas.getbbox()
    if box is None:
        return np.zeros((size, size))
    return np.asarray(canvas.crop(box).resize((size, size), Image.BILINEAR), dtype=np.float64) / 255.0


@functools.lru_cache(maxsize=1)
def _reference_glyphs() -> np.ndarray:
    """The ten digits of matplotlib's DejaVu Sans, Serif and Serif Italic: the templates fonts are checked against."""
    import matplotlib

    font_dir = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")
    refs = []
    for name in ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Italic.ttf"):
        font = ImageFont.truetype(os.path.join(font_dir, name), 64)
        refs.append([_glyph(font, str(d)) for d in range(10)])
    return np.asarray(refs)  # [3, 10, 24, 24]


def _draws_digits(font: ImageFont.FreeTypeFont) -> bool:
    """True when at least 8 of the font's ten digit glyphs are nearest to the right reference digit.

    Fonts that map the digit code points to placeholder boxes, delimiters or math symbols fail.
    """
    refs = _reference_glyphs()
    hits = 0
    for digit in range(10):
        glyph = _glyph(font, str(digit))
        if not glyph.any():
            return False
        dist = ((refs - glyph) ** 2).sum(axis=(2, 3)).min(axis=0)  # nearest over the template fonts
        hits += int(dist.argmin() == digit)
    return hits >= 8


@functools.lru_cache(maxsize=4)
def digit_fonts(font_dir: str | None = None) -> tuple[FontStyle, ...]:
    """The TrueType fonts of ``font_dir`` (default: matplotlib's) that draw the ten digits, sorted by file.

    Raises RuntimeError when fewer than two are found (the corpus needs variety).

    Example:
        >>> len(digit_fonts()) >= 10
        True
    """
    if font_dir is None:
        import matplotlib

        font_dir = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")
    found = []
    for name in sorted(os.listdir(font_dir)):
        if not name.lower().endswith(".ttf"):
            continue
        path = os.path.join(font_dir, name)
        try:
            font = ImageFont.truetype(path, 64)
        except OSError:
            continue
        if _draws_digits(font):
            found.append(FontStyle(path, _style_words(os.path.splitext(name)[0])))
    if len(found) < 2:
        raise RuntimeError(f"{font_dir}: found {len(found)} fonts that draw the ten digits; the corpus needs at least 2")
    return tuple(found)


def caption_prompts() -> list[str]:
    """Prompt fragments the corpus captions use (for the tokenizer's merges)."""
    words = {w for f in digit_fonts() for w in f.words.split()}
    attrs = ("small large tilted left right slanted thick thin strokes blurry sharp dark light on low contrast "
             "noisy off-centre cropped out of frame distorted deformed unrealistic")
    return [*CLASS_NAMES, *_PREFIXES, *_QUALITY, " ".join(sorted(words)), attrs]


class DigitCorpus:
    """A deterministic, indexable corpus of captioned printed digits (see the module docstring).

    ``corpus[i]`` renders image ``i``; its label is ``i % 10`` (classes are balanced in every slice of
    ten). ``fonts`` defaults to :func:`digit_fonts`.

    Example:
        >>> images, labels, captions = DigitCorpus(seed=1).batch(range(20))
        >>> images.shape, labels[:3].tolist()
        ((20, 32, 32, 3), [0, 1, 2])
    """

    def __init__(self, seed: int = 0, fonts: tuple[FontStyle, ...] | None = None):
        self.seed = int(seed)
        self.fonts = fonts or digit_fonts()

    def identity(self) -> str:
        """A digest of the font files and the renderer version: equal identities render equal images."""
        h = hashlib.sha256(b"digit-corpus-v1")
        for f in self.fonts:
            with open(f.path, "rb") as fh:
                h.update(hashlib.sha256(fh.read()).digest())
        return h.hexdigest()[:16]

    def __getitem__(self, index: int) -> CaptionedDigit:
        rng = np.random.default_rng(derive_seed(self.seed, "corpus", int(index)))
        label = int(index) % 10
        image, attrs = _render(label, self.fonts[rng.integers(len(self.fonts))], rng)
        return CaptionedDigit(image, label, _caption(label, attrs, rng))

    def batch(self, indices) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """``(images uint8 [N,32,32,3], labels int64 [N], captions)`` of the given indices."""
        samples = [self[i] for i in indices]
        return (np.stack([s.image for s in samples]), np.array([s.label for s in samples], dtype=np.int64),
                [s.caption for s in samples])


def _render(label: int, font_style: FontStyle, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """Render one digit; returns the uint8 RGB image and the caption attributes of its draws."""
    big = SIZE * _RENDER
    attrs = [font_style.words]
    height = rng.uniform(0.45, 0.95)  # glyph height as a fraction of the canvas
    font = ImageFont.truetype(font_style.path, max(8, int(big * height * 1.25)))
    stroke = int(rng.choice([0, 0, 0, 1, 2, 3, 4]))
    if stroke >= 3:
        attrs.append("thick strokes")
    canvas = Image.new("L", (big * 2, big * 2), 0)
    ImageDraw.Draw(canvas).text((big, big), str(label), fill=255, font=font, anchor="mm",
                                stroke_width=stroke, stroke_fill=255)
    angle, shear = rng.normal(0, 12), rng.normal(0, 0.15)
    if abs(angle) > 10:
        attrs.append("tilted left" if angle > 0 else "tilted right")
    if abs(shear) > 0.2:
        attrs.append("slanted")
    distorted = rng.random() < 0.08
    sx = rng.uniform(0.55, 0.75) if distorted else 1.0
    # Rotation, shear and (rarely) a squash about the canvas centre, as one affine map (output -> input).
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    a, b, d, e = c / sx, -s + shear, s / sx, c
    cx = cy = big
    canvas = canvas.transform(canvas.size, Image.AFFINE, (a, b, cx - a * cx - b * cy, d, e, cy - d * cx - e * cy),
                              resample=Image.BILINEAR)
    if distorted:
        attrs.append("distorted")
    box = canvas.getbbox() or (0, 0, big * 2, big * 2)
    glyph = canvas.crop(box)
    scale = min(1.0, big * 0.98 / max(glyph.size))  # keep it on the canvas unless we crop on purpose
    glyph = glyph.resize((max(1, int(glyph.width * scale)), max(1, int(glyph.height * scale))), Image.BILINEAR)
    room_x, room_y = big - glyph.width, big - glyph.height
    if rng.random() < 0.08:  # partly out of frame
        ox = int(rng.choice([-1, 1]) * glyph.width * rng.uniform(0.25, 0.45)) + room_x // 2
        oy = int(rng.uniform(0, max(room_y, 0) + 1))
        attrs.append("cropped, out of frame")
    else:
        jitter = rng.uniform(0, 1, 2)
        ox, oy = int(jitter[0] * (room_x + 1)), int(jitter[1] * (room_y + 1))
        if max(abs(ox - room_x / 2), abs(oy - room_y / 2)) > 0.3 * big:
            attrs.append("off-centre")
    ink = Image.new("L", (big, big), 0)
    ink.paste(glyph, (ox, oy))
    if height < 0.6:
        attrs.append("small")
    elif height > 0.85:
        attrs.append("large")
    small = ink.resize((SIZE, SIZE), Image.LANCZOS)
    blur = float(rng.choice([0.0, 0.0, 0.5, 0.8, 1.2, 1.8]))
    if blur > 0:
        small = small.filter(ImageFilter.GaussianBlur(blur))
    attrs.append("blurry" if blur >= 1.2 else ("sharp" if blur == 0 else ""))
    alpha = np.asarray(small, dtype=np.float64) / 255.0
    dark_on_light = rng.random() < 0.6
    contrast = rng.uniform(0.35, 1.0)
    mid = rng.uniform(0.35, 0.65)
    fg, bg = (mid - contrast / 2, mid + contrast / 2) if dark_on_light else (mid + contrast / 2, mid - contrast / 2)
    attrs.append("dark on light" if dark_on_light else "light on dark")
    if contrast < 0.5:
        attrs.append("low contrast")
    pixels = bg + (fg - bg) * alpha
    if rng.random() < 0.25:
        pixels = pixels + rng.normal(0, rng.uniform(0.04, 0.1), pixels.shape)
        attrs.append("noisy")
    gray = (np.clip(pixels, 0, 1) * 255).round().astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2), [a for a in attrs if a]


def _caption(label: int, attrs: list[str], rng: np.random.Generator) -> str:
    """"[prefix]digit k, attr, attr[, quality]" with a random subset of the attributes in random order."""
    keep = [a for a in attrs if rng.random() < 0.4]
    order = rng.permutation(len(keep))
    parts = [CLASS_NAMES[label], *(keep[i] for i in order)]
    prefix = _PREFIXES[rng.integers(len(_PREFIXES))]
    quality = _QUALITY[rng.integers(len(_QUALITY))]
    return f"{prefix}{', '.join(parts)}{quality}"
