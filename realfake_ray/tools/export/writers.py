"""Writing one synthetic shard in another layout (no Ray): an ImageFolder of its JPEGs (``<class_dir>/<file>.jpg``,
the same bytes) or one WebDataset tar (``<key>.jpg`` + ``<key>.cls`` + ``<key>.json`` provenance).

Each shard's export is atomic and marked done, so an interrupted export resumes shard by shard.

Example:
    >>> export_shard("runs/tiny/synthetic/data/train-c00-...-n512.parquet", "/tmp/folder", "imagefolder")  # doctest: +SKIP
    512
"""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq

from realfake_ray import storage

__all__ = ["FORMATS", "done_url", "export_shard", "wids_index"]

FORMATS = ("imagefolder", "webdataset")
_PROVENANCE = ("image_id", "class_dir", "copy_idx", "seed", "prompt", "lora_sha256")


def done_url(dest: str, shard: str, fmt: str) -> str:
    """What marks a shard exported: its tar (WebDataset), or a marker once all its files exist (ImageFolder)."""
    stem = shard.rsplit("/", 1)[-1].removesuffix(".parquet")
    return storage.join(dest, f"{stem}.tar") if fmt == "webdataset" else storage.join(dest, "_export", f"{stem}.done")


def _tar(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for row in table.to_pylist():
            key = row["image"]["path"].rsplit(".", 1)[0]
            meta = {k: row.get(k) for k in _PROVENANCE if k in row}
            for suffix, data in ((".jpg", row["image"]["bytes"]), (".cls", str(row["label"]).encode()),
                                 (".json", json.dumps(meta, sort_keys=True).encode())):
                info = tarfile.TarInfo(key + suffix)
                info.size, info.mtime = len(data), 0  # mtime 0: the same shard gives the same tar bytes
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def export_shard(url: str, dest: str, fmt: str) -> int:
    """Write shard ``url`` below ``dest`` in ``fmt`` (skipped when already done); returns its image count."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
    with storage.open_file(url) as f:
        table = pq.read_table(f)
    marker = done_url(dest, url, fmt)
    if storage.exists(marker):
        return table.num_rows
    if fmt == "webdataset":
        storage.write_bytes(marker, _tar(table))
        return table.num_rows
    for image in table["image"].to_pylist():
        storage.write_bytes(storage.join(dest, image["path"]), image["bytes"])
    storage.write_text(marker, f"{table.num_rows}\n")
    return table.num_rows


def wids_index(dest: str, shards: list[str], rows: list[int]) -> str:
    """A ``wids`` shard index (``shardlist`` of tar names and sample counts) for a WebDataset export, so that readers
    (``realfake_ray.data.sources``, ``wids``) know each tar's size without reading it."""
    entries = [{"url": done_url(dest, s, "webdataset").rsplit("/", 1)[-1], "nsamples": n} for s, n in zip(shards, rows)]
    url = storage.join(dest, "wids.json")
    storage.write_json(url, {"__kind__": "wids-shard-index-v1", "name": "realfake-synthetic", "shardlist": entries})
    return url
