"""The latent bank of a run (``<out>/latents``, written by encode): its metadata, its train part files and
the per-class mean of its CLIP embeddings — what fine-tuning, generation and the tools read from it.

Example:
    >>> meta, files = read_bank("runs/tiny")  # doctest: +SKIP
    >>> meta["class_dirs"][:2], len(files)  # doctest: +SKIP
    (['digit_0', 'digit_1'], 10)
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from realfake_ray import storage
from realfake_ray._internal.shards import part_files, tensor_column, write_part
from realfake_ray.layout import RunLayout

__all__ = ["read_meta", "read_bank", "write_train_subset", "tensor_shape", "class_mean_embeddings", "with_arrow_tensors"]


def read_meta(out: str) -> dict | None:
    """The bank's ``_meta.json`` (classes, splits and row counts, the models that made it); None if absent."""
    url = RunLayout(out).meta_url()
    return storage.read_json(url) if storage.exists(url) else None


def read_bank(out: str) -> tuple[dict, list[str]]:
    """The bank's ``_meta.json`` and its train part files, or FileNotFoundError naming ``realfake encode``."""
    layout = RunLayout(out)
    meta = read_meta(out)
    if meta is None:
        raise _bank_error(out, f"{layout.meta_url()} not found")
    files = part_files(layout.bank_dir("train"))
    if not files:
        raise _bank_error(out, f"{layout.bank_dir('train')} has no part files")
    if int(meta.get("splits", {}).get("train", {}).get("rows", 0)) == 0:
        raise _bank_error(out, "the bank has no train rows")
    return meta, files


def write_train_subset(out: str, subset_out: str, train: pa.Table, mask: np.ndarray) -> None:
    """Write ``<subset_out>/latents``: the rows of ``out``'s train bank ``train`` selected by ``mask``, with
    ``out``'s identity and meta (its only split: train, with the subset's row count). The meta is written
    last: a bank is complete once its meta exists."""
    src, dst = RunLayout(out), RunLayout(subset_out)
    write_part(dst.bank_dir("train"), train.filter(pa.array(mask)))
    identity = storage.join(src.bank_dir(), "_identity.json")
    if storage.exists(identity):
        storage.write_bytes(storage.join(dst.bank_dir(), "_identity.json"), storage.read_bytes(identity))
    meta = storage.read_json(src.meta_url())
    meta["splits"] = {"train": {**meta["splits"]["train"], "rows": int(np.count_nonzero(mask))}}
    storage.write_json(dst.meta_url(), meta)


def with_arrow_tensors(table: pa.Table) -> pa.Table:
    """``table`` with every fixed-shape tensor column (Ray Data's tensor extension) stored as Arrow's own
    ``arrow.fixed_shape_tensor``, so that any Parquet reader gets each row's shape, Ray imported or not.

    Example:
        >>> t = with_arrow_tensors(pa.table({"x": pa.FixedShapeTensorArray.from_numpy_ndarray(np.zeros((2, 3, 4)))}))
        >>> t.schema.field("x").type.shape
        [3, 4]
    """
    for i, field in enumerate(table.schema):
        shape = getattr(field.type, "shape", None)
        if shape is None or isinstance(field.type, pa.FixedShapeTensorType):
            continue
        values = tensor_column(table, field.name, field.type.storage_type.value_type.to_pandas_dtype())
        tensors = pa.FixedShapeTensorArray.from_numpy_ndarray(values.reshape(table.num_rows, *shape))
        table = table.set_column(i, field.name, tensors)
    return table


def tensor_shape(file_url: str, column: str) -> list[int] | None:
    """Shape of one row of a tensor column, from the Parquet schema of ``file_url`` (no data read); None when
    the column is not a tensor column. Arrow's ``fixed_shape_tensor``, or Ray's tensor extension (banks
    written before this version), registered or not."""
    import json

    import pyarrow.parquet as pq

    with storage.open_file(file_url) as f:
        field = pq.read_schema(f).field(column)
    if getattr(field.type, "shape", None) is not None:  # Arrow's type, or Ray's registered (Ray imported)
        return [int(d) for d in field.type.shape]
    raw = (field.metadata or {}).get(b"ARROW:extension:metadata")
    return [int(d) for d in json.loads(raw)] if raw else None


def _bank_error(out: str, what: str) -> FileNotFoundError:
    return FileNotFoundError(f"{what}: no usable latent bank at {RunLayout(out).bank_dir()}; "
                             "run `realfake encode` first with the same --out")


def class_mean_embeddings(files: list[str], num_classes: int) -> np.ndarray:
    """Per-class mean of the bank's ``clip_embed`` [num_classes, D] (float32), streamed file by file.

    Example:
        >>> class_mean_embeddings(part_files(RunLayout("runs/tiny").bank_dir("train")), 10).shape  # doctest: +SKIP
        (10, 32)
    """
    import pyarrow.parquet as pq

    sums, counts = None, np.zeros(num_classes, dtype=np.int64)
    for url in files:
        with storage.open_file(url) as f:
            table = pq.read_table(f, columns=["label", "clip_embed"])
        labels = table.column("label").to_numpy()
        embeds = tensor_column(table, "clip_embed", np.float64)
        sums = np.zeros((num_classes, embeds.shape[1])) if sums is None else sums
        np.add.at(sums, labels, embeds)
        counts += np.bincount(labels, minlength=num_classes)
    empty = np.flatnonzero(counts == 0).tolist()
    if empty:
        raise ValueError(f"finetune.vision_token=class_mean: classes without any bank row: {empty[:20]}")
    return (sums / counts[:, None]).astype(np.float32)
