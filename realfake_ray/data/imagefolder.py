"""Read a labelled ImageFolder at any fsspec URL: ``root/<class_dir>/<...>/<file>``.

``scan_image_folder`` lists the files (driver side, cheap) and checks the dataset before any work
starts; ``decode_image`` turns the bytes of any common image (RGB, L, LA, P, RGBA, CMYK, 16-bit, any
size) into an RGB uint8 array resized and centre-cropped to the model resolution.

Example:
    >>> index = scan_image_folder("embedded:digits/train", classes_file="embedded:digits/classes.json")
    >>> index.class_names[0], len(index.records)
    ('digit zero', 1437)
"""

from __future__ import annotations

import io
import json
import posixpath
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps

from realfake_ray import storage
from realfake_ray.data.class_lists import shipped_class_list

__all__ = [
    "DEFAULT_EXTENSIONS", "DatasetError", "ImageRecord", "ImageFolderIndex", "CLASS_NAME_STYLES", "load_class_names",
    "load_captions", "MIN_CAPTION_MATCH", "caption_match_error", "scan_image_folder", "open_rgb", "decode_image", "centre_view",
    "stem", "squash_view", "GENERATION_VIEWS", "MAX_ASPECT", "full_view", "decode_views",
]

DEFAULT_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm")


class DatasetError(ValueError):
    """The dataset cannot be used; the message names the location and the problem."""


@dataclass(frozen=True)
class ImageRecord:
    image_id: str  # path relative to the root: stable across runs and machines
    url: str
    label: int
    class_dir: str
    class_name: str
    caption: str = ""


@dataclass
class ImageFolderIndex:
    root: str
    class_dirs: list[str]
    class_names: list[str]
    records: list[ImageRecord]
    ignored_files: list[str] = field(default_factory=list)  # not images, or not inside a class folder
    caption_match: float | None = None  # fraction of images the captions file has a caption for (None: no file)

    @property
    def num_classes(self) -> int:
        return len(self.class_dirs)


CLASS_NAME_STYLES = ("first", "all")


def load_class_names(url: str, style: str = "first") -> dict[str, str]:
    """Folder → readable name, from JSON (``{"n01440764": "tench"}``), from lines ``folder<whitespace>name``
    (``LOC_synset_mapping.txt``: ``n01440764 tench, Tinca tinca``), or from a list shipped with the package,
    named instead of a URL (``imagenet1k``: :mod:`realfake_ray.data.class_lists`).

    A lines file's name is a comma-separated list of synonyms: ``style="first"`` keeps the first ("tench"),
    ``"all"`` the whole list. JSON names are taken whole.

    Example:
        >>> load_class_names("imagenet1k")["n01440764"]
        'tench'
    """
    if style not in CLASS_NAME_STYLES:
        raise ValueError(f"class name style {style!r}: expected one of {', '.join(CLASS_NAME_STYLES)}")
    path = shipped_class_list(url) or url
    if not storage.exists(path):
        raise DatasetError(f"classes file not found: {url}")
    text = storage.read_text(path)
    if text.lstrip().startswith("{"):
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"classes file {url}: invalid JSON ({exc})") from None
        return _warn_shared_names(url, {str(k): str(v) for k, v in mapping.items()})
    mapping = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.strip().split(None, 1)
        name = parts[1].split(",")[0].strip() if len(parts) == 2 and style == "first" else parts[-1].strip()
        if len(parts) != 2 or not name:
            raise DatasetError(f"classes file {url}, line {lineno}: expected 'folder name', got {line!r}")
        mapping[parts[0]] = name
    return _warn_shared_names(url, mapping)


_warned_shared: set[str] = set()


def _warn_shared_names(url: str, mapping: dict[str, str]) -> dict[str, str]:
    """Say once per file when several classes get one name (``LOC_synset_mapping.txt``'s first synonyms:
    two "crane", two "maillot"): their prompts cannot tell them apart."""
    counts = Counter(mapping.values())
    shared = sorted(name for name, n in counts.items() if n > 1)
    if shared and url not in _warned_shared:
        _warned_shared.add(url)
        print(f"[data] warning: classes file {url} gives several classes the same name "
              f"({', '.join(map(repr, shared[:5]))}{', ...' if len(shared) > 5 else ''}), so their prompts are alike; "
              "data.class_name_style=all keeps every synonym (ImageNet: data.classes_file=imagenet1k names each "
              "class once)", flush=True)
    return mapping


def load_captions(url: str) -> dict[str, str]:
    """``image_id`` → caption from a JSONL file of ``{"image_id": ..., "caption": ...}`` records."""
    if not storage.exists(url):
        raise DatasetError(f"captions file not found: {url}")
    captions = {}
    for lineno, line in enumerate(storage.read_text(url).splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            captions[str(item["image_id"])] = str(item["caption"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DatasetError(
                f"captions file {url}, line {lineno}: expected {{\"image_id\": ..., \"caption\": ...}}"
            ) from None
    return captions


MIN_CAPTION_MATCH = 0.5  # below this, a captions file is taken to describe another dataset


def caption_match_error(captions_file: str, root: str, matched: int, total: int, example: str) -> DatasetError:
    """The error for a captions file whose ``image_id`` keys miss most images of the dataset."""
    return DatasetError(
        f"captions file {captions_file}: only {matched} of {total} images of {root} have a caption "
        f"({matched / max(total, 1):.0%} < {MIN_CAPTION_MATCH:.0%}); its image_id keys must be paths relative to "
        f"the dataset root, e.g. {example!r}"
    )


def scan_image_folder(
    root: str,
    *,
    classes_file: str | None = None,
    class_name_style: str = "first",
    captions_file: str | None = None,
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS,
    class_dirs: list[str] | None = None,
    check_readable: bool = True,
) -> ImageFolderIndex:
    """List an ImageFolder and check it: not empty, every class has a readable image, and a captions file
    covers at least :data:`MIN_CAPTION_MATCH` of the images (their fraction is ``caption_match``).

    ``class_dirs`` fixes the label order (e.g. a validation split must use the train split's classes);
    by default labels follow the sorted class folder names. ``class_name_style``: see :func:`load_class_names`.
    """
    if not storage.isdir(root):
        raise DatasetError(f"dataset not found (not a directory): {root}")
    exts = tuple(e.lower() for e in extensions)
    found: dict[str, list[tuple[str, str]]] = {name: [] for name, is_dir in storage.listdir(root) if is_dir}
    ignored = []
    for url in storage.find(root):
        rel = storage.relative(url, root)
        top, sep, _ = rel.partition("/")
        if not sep or not rel.lower().endswith(exts):
            ignored.append(rel)
            continue
        found[top].append((rel, url))
    if not any(found.values()):
        raise DatasetError(f"dataset {root} is empty: no images with extensions {', '.join(exts)} in class folders")
    empty = sorted(c for c, files in found.items() if not files)
    if empty:
        raise DatasetError(f"dataset {root}: class folder(s) with no image: {', '.join(map(repr, empty))}")
    if class_dirs is None:
        class_dirs = sorted(found)
    else:
        unknown = sorted(set(found) - set(class_dirs))
        if unknown:
            raise DatasetError(
                f"dataset {root}: class folder(s) {', '.join(map(repr, unknown[:10]))} are not among the "
                f"{len(class_dirs)} training classes"
            )
    names = load_class_names(classes_file, class_name_style) if classes_file else {}
    captions = load_captions(captions_file) if captions_file else {}
    class_names = [names.get(c, c.replace("_", " ")) for c in class_dirs]
    records = [
        ImageRecord(rel, url, label, c, class_names[label], captions.get(rel, ""))
        for label, c in enumerate(class_dirs)
        for rel, url in sorted(found.get(c, []))
    ]
    index = ImageFolderIndex(root, list(class_dirs), class_names, records, ignored)
    if captions_file:
        matched = sum(1 for r in records if r.image_id in captions)
        index.caption_match = matched / len(records)
        if index.caption_match < MIN_CAPTION_MATCH:
            raise caption_match_error(captions_file, root, matched, len(records), records[0].image_id)
    if check_readable:
        _check_each_class_readable(index)
    return index


def _first_readable(urls: list[str]) -> bool:
    for url in urls:
        try:
            decode_image(storage.read_bytes(url), 8)
            return True
        except (OSError, ValueError):
            continue
    return False


def _check_each_class_readable(index: ImageFolderIndex) -> None:
    by_class: dict[str, list[str]] = {}
    for rec in index.records:
        by_class.setdefault(rec.class_dir, []).append(rec.url)
    with ThreadPoolExecutor(max_workers=16) as pool:
        ok = dict(zip(by_class, pool.map(_first_readable, by_class.values())))
    bad = sorted(c for c, readable in ok.items() if not readable)
    if bad:
        raise DatasetError(f"dataset {index.root}: no readable image in class folder(s) {', '.join(map(repr, bad))}")


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
