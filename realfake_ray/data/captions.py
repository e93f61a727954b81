"""Captions of the training images: JSON lines of ``{"image_id": ..., "caption": ...}``, read by Arrow (no Python
object per line) — ``data.captions_file``, or the caption stage's ``<out>/captions/captions.jsonl`` (same format).

Example:
    >>> from realfake_ray import storage
    >>> storage.write_text("memory://captions-demo/c.jsonl", '{"image_id": "a/1.png", "caption": "a fish"}\\n')
    >>> read_captions("memory://captions-demo/c.jsonl").to_pylist()
    [{'image_id': 'a/1.png', 'caption': 'a fish'}]
"""

from __future__ import annotations

import pyarrow as pa

from realfake_ray import storage
from realfake_ray.config import RunConfig
from realfake_ray.data.imagefolder import DatasetError
from realfake_ray.layout import RunLayout

__all__ = [
    "read_captions", "MIN_CAPTION_MATCH", "caption_match_error", "caption_stage_idle", "training_captions_url",
    "missing_captions_error",
]

MIN_CAPTION_MATCH = 0.5  # below this, a captions file is taken to describe another dataset


def read_captions(url: str) -> pa.Table:
    """``image_id``, ``caption`` of a captions file; DatasetError naming the file when it is missing or malformed."""
    import pyarrow.json as pj

    if not storage.exists(url):
        raise DatasetError(f"captions file not found: {url}")
    try:
        with storage.open_file(url) as f:
            table = pj.read_json(f)
    except pa.ArrowInvalid as exc:
        raise DatasetError(f"captions file {url}: not JSON lines of {{\"image_id\": ..., \"caption\": ...}} ({exc})") from None
    if not {"image_id", "caption"} <= set(table.column_names):
        raise DatasetError(f"captions file {url}: expected {{\"image_id\": ..., \"caption\": ...}} records")
    schema = pa.schema([("image_id", pa.string()), ("caption", pa.string())])
    return table.select(["image_id", "caption"]).cast(schema)


def caption_match_error(captions_file: str, root: str, matched: int, total: int, example: str) -> DatasetError:
    """The error for a captions file whose ``image_id`` keys miss most images of the dataset."""
    return DatasetError(
        f"captions file {captions_file}: only {matched} of {total} images of {root} have a caption "
        f"({matched / max(total, 1):.0%} < {MIN_CAPTION_MATCH:.0%}); its image_id keys must be paths relative to "
        f"the dataset root, e.g. {example!r}"
    )


def caption_stage_idle(cfg: RunConfig) -> str | None:
    """Why the caption stage has nothing to do for ``cfg`` (captions given, or captioning off), or None.

    Example:
        >>> from realfake_ray.config import load_config
        >>> caption_stage_idle(load_config(preset="tiny"))  # the digits need no captions
        'caption.enabled is off'
    """
    if cfg.data.captions_file:
        return f"data.captions_file is given ({cfg.data.captions_file})"
    if not cfg.caption.enabled:
        return "caption.enabled is off"
    return None


def training_captions_url(cfg: RunConfig) -> str | None:
    """The captions file of the training images: ``data.captions_file``, else the caption stage's JSONL when
    captioning is on (it may not exist yet: :func:`missing_captions_error`), else None (no captions)."""
    if cfg.data.captions_file or not cfg.caption.enabled:
        return cfg.data.captions_file
    return RunLayout(cfg.out).captions_url()


def missing_captions_error(url: str) -> ValueError:
    """The error for a run that needs the caption stage's captions before that stage has written them."""
    return ValueError(
        f"no captions yet: caption.enabled is on and no data.captions_file is given, but {url} does not exist; "
        "run the caption stage first (`realfake caption`, or `realfake run`, which does), give "
        "data.captions_file, or set caption.enabled=false"
    )
