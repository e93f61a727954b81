"""Label agreement, without Ray: which rows of a synthetic shard a classifier assigns their own label, and the
filtered shard (the same rows and columns, fewer of them) with what was kept and dropped per label in its
Parquet metadata, so a summary is read from footers and a rerun knows a shard is done from its name.

Example:
    >>> filtered_name("train-c00-0123abcd-0002-n1000.parquet", 871)
    'train-c00-0123abcd-0002-n871.parquet'
"""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import torch

from realfake_ray.data.imagefolder import open_rgb
from realfake_ray.data.views import eval_view
from realfake_ray.method.classifier import to_model_input

__all__ = ["FILTER_KEY", "agreeing_rows", "filtered_shard", "filtered_name", "source_key", "filter_counts"]

FILTER_KEY = b"realfake_filter"  # schema metadata of a filtered shard: its source, rows kept / dropped per label
_ROWS = re.compile(r"-n\d+\.parquet$")


def source_key(name: str) -> str:
    """A shard's name without its row count: the same for a shard and its filtered version."""
    return _ROWS.sub("", name.rsplit("/", 1)[-1])


def filtered_name(source_name: str, kept: int) -> str:
    """The filtered shard's file name: the source's, with the kept row count."""
    return f"{source_key(source_name)}-n{kept}.parquet"


@torch.no_grad()
def agreeing_rows(table: pa.Table, model: torch.nn.Module, image_size: int, crop_pct: float, interpolation: str,
                  batch_size: int = 256, device: torch.device | None = None) -> np.ndarray:
    """True for each row whose image ``model`` classifies as the row's ``label`` (the eval view of the classifier's
    recipe); an undecodable image is False."""
    images = table.column("image").combine_chunks().field("bytes").to_pylist()
    labels = table.column("label").to_numpy()
    views, decoded = [], np.zeros(len(images), bool)
    for i, data in enumerate(images):
        try:
            views.append(eval_view(open_rgb(data), image_size, crop_pct, interpolation))
            decoded[i] = True
        except Exception:  # a bad JPEG is simply not kept
            continue
    predicted = []
    for start in range(0, len(views), batch_size):
        x = to_model_input(torch.from_numpy(np.stack(views[start : start + batch_size])).to(device or "cpu"))
        predicted.append(model(x).argmax(1).cpu().numpy())
    agree = np.zeros(len(images), bool)
    if views:
        agree[decoded] = np.concatenate(predicted) == labels[decoded]
    return agree


def filtered_shard(table: pa.Table, keep: np.ndarray, source_name: str, classifier_sha256: str) -> pa.Table:
    """The rows of ``table`` where ``keep``, its schema metadata (the ``datasets`` features) kept, plus
    :data:`FILTER_KEY`: the source shard, the classifier's sha256 and the rows kept and dropped per label."""
    labels = table.column("label").to_numpy()

    def per_label(mask: np.ndarray) -> dict[str, int]:
        values, counts = np.unique(labels[mask], return_counts=True)
        return {str(int(v)): int(c) for v, c in zip(values, counts)}

    record = {"source": source_name.rsplit("/", 1)[-1], "classifier_sha256": classifier_sha256,
              "kept": per_label(keep), "dropped": per_label(~keep)}
    kept = table.filter(pa.array(keep))
    return kept.replace_schema_metadata({**(table.schema.metadata or {}), FILTER_KEY: json.dumps(record).encode()})


def filter_counts(schema: pa.Schema) -> dict:
    """The :data:`FILTER_KEY` record of a filtered shard's schema."""
    return json.loads((schema.metadata or {})[FILTER_KEY])
