"""Append-only Parquet part files: the resume mechanism of every stage that writes rows.

A stage writes each finished batch as its own ``part-<content hash>.parquet`` (temp + rename), so a killed
run leaves only complete files, and the same rows written in the same batches get the same names (a bank
encoded twice from the same inputs is the same files, so what reads it in name order sees the same rows).
A rerun reads the key columns of the parts already there and processes only the missing keys: nothing is
lost, nothing is written twice.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from realfake_ray import storage

__all__ = ["PART_PREFIX", "part_files", "read_parts", "existing_keys", "write_part", "tensor_column"]

PART_PREFIX = "part-"


def part_files(directory: str) -> list[str]:
    return [u for u in storage.find(directory) if u.rsplit("/", 1)[-1].startswith(PART_PREFIX)]


def read_parts(directory: str, columns: list[str] | None = None) -> pa.Table | None:
    """All part files of ``directory`` as one table (``None`` when there are none)."""
    tables = []
    for url in part_files(directory):
        with storage.open_file(url) as f:
            tables.append(pq.read_table(f, columns=columns))
    return pa.concat_tables(tables) if tables else None


def existing_keys(directory: str, columns: list[str]) -> set[tuple]:
    """The set of key tuples (e.g. ``(image_id,)`` or ``(image_id, copy_idx)``) already written."""
    table = read_parts(directory, columns)
    if table is None:
        return set()
    return set(zip(*(table.column(c).to_pylist() for c in columns)))


def write_part(directory: str, table: pa.Table) -> str:
    """Write ``table`` as a part file named by the SHA-256 of its bytes, atomically; returns its URL."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    data = buffer.getvalue()
    url = storage.join(directory, f"{PART_PREFIX}{hashlib.sha256(data).hexdigest()[:32]}.parquet")
    storage.write_bytes(url, data)
    return url


def tensor_column(table: pa.Table, column: str, dtype=np.float32) -> np.ndarray:
    """A Ray tensor column (or a plain list column) as an ndarray ``[rows, -1]`` of ``dtype``."""
    array = table.column(column).combine_chunks()
    array = array.storage if isinstance(array, pa.ExtensionArray) else array
    return array.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(table.num_rows, -1)
