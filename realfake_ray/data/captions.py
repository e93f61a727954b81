"""Captions files: JSON lines of ``{"image_id": ..., "caption": ...}``, read by Arrow (no Python object per line).

Example:
    >>> from realfake_ray import storage
    >>> storage.write_text("memory://captions-demo/c.jsonl", '{"image_id": "a/1.png", "caption": "a fish"}\\n')
    >>> read_captions("memory://captions-demo/c.jsonl").to_pylist()
    [{'image_id': 'a/1.png', 'caption': 'a fish'}]
"""

from __future__ import annotations

import pyarrow as pa

from realfake_ray import storage
from realfake_ray.data.imagefolder import DatasetError

__all__ = ["read_captions"]


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
