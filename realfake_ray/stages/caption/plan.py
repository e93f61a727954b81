"""The caption stage's planning, without Ray: the settings that make the captions, and the training images that
have no caption row yet (a rerun captions only those).

Example:
    >>> from realfake_ray.config import load_config
    >>> caption_settings(load_config(preset="tiny"))
    {'model': 'Salesforce/blip2-opt-2.7b', 'revision': None, 'max_tokens': 30, 'image_size': 224}
"""

from __future__ import annotations

import pyarrow as pa

from realfake_ray._internal.shards import read_parts
from realfake_ray.config import RunConfig
from realfake_ray.data.labelled import image_rows, not_in
from realfake_ray.data.sources import LabelledSet
from realfake_ray.layout import RunLayout

__all__ = ["PARTS", "caption_settings", "pending_rows"]

PARTS = "_parts"  # below <out>/captions: Parquet parts of (image_id, caption, error)


def caption_settings(cfg: RunConfig) -> dict:
    """What makes the captions (recorded in ``<out>/captions/_settings.json``: a rerun with others is refused)."""
    c = cfg.caption
    return {"model": c.model, "revision": c.revision, "max_tokens": c.max_tokens, "image_size": c.image_size}


def pending_rows(lset: LabelledSet, out: str) -> pa.Table:
    """``image_id``, ``url``, ``label`` (:func:`~realfake_ray.data.labelled.image_rows`) of every image of ``lset``
    without a part row yet (a captioned or an unreadable one)."""
    done = read_parts(RunLayout(out).captions_dir(PARTS), ["image_id"])
    return not_in(image_rows(lset), done["image_id"].combine_chunks() if done is not None else pa.array([], pa.string()))
