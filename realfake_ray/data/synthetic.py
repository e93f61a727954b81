"""The synthetic set's on-disk format: Parquet shards in the Hugging Face ``datasets`` layout.

``<out>/synthetic/data/train-c<copy>-<bank part>-<chunk>-n<rows>.parquet``: each shard holds ~1,000 images
(``generate.shard_mb``) of one copy of one bank part file. A row is the JPEG (``image``: struct of ``bytes``
and ``path``, the ``datasets`` ``Image`` feature), its ``label`` (a ``ClassLabel`` over the real class folders,
in the schema's ``huggingface`` metadata) and every provenance column (source ``image_id``, ``copy_idx``,
``seed``, ``prompt``, sampler settings, LoRA hash). The shard is the unit of atomic write and of resume: it is
written whole or not at all, its name says which images it holds and how many, so planning, digests and
reports work from a listing — no shard is opened for that.

Example:
    >>> name = shard_name(3, "part-0123456789abcdef0123456789abcdef.parquet", 2, 1000)
    >>> name
    'train-c03-0123456789abcdef0123456789abcdef-0002-n1000.parquet'
    >>> parse_shard_name(name)
    (3, 1000)
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from realfake_ray import storage

__all__ = [
    "SHARD_PREFIX", "PROVENANCE_COLUMNS", "ROW_GROUP", "shard_name", "parse_shard_name", "SyntheticShards",
    "list_shards", "shard_table", "shard_bytes", "hf_features", "dataset_card", "sample_per_class",
]

SHARD_PREFIX = "train-"
ROW_GROUP = 64  # images per Parquet row group: one image is read with ~64 images' bytes, not the whole shard
_NAME = re.compile(r"^train-c(\d+)-([0-9A-Za-z]+)-(\d+)-n(\d+)\.parquet$")
# Per-image provenance, then the sampler settings (one value per shard, stored once by Parquet's encoding).
PROVENANCE_COLUMNS = ("image_id", "class_dir", "copy_idx", "seed", "prompt")
SETTING_COLUMNS = {"mode": pa.string(), "vision_token": pa.string(), "strength": pa.float64(), "steps": pa.int64(),
                   "scheduler": pa.string(), "guidance_scale": pa.float64(), "lora_scale": pa.float64(),
                   "lora_sha256": pa.string()}


def _part_key(bank_file: str) -> str:
    stem = bank_file.rsplit("/", 1)[-1].removesuffix(".parquet").removeprefix("part-")
    return stem if re.fullmatch(r"[0-9a-f]{8,64}", stem) else hashlib.sha1(stem.encode()).hexdigest()[:16]


def shard_name(copy_idx: int, bank_file: str, chunk: int, rows: int) -> str:
    """The file name of the shard of ``copy_idx`` over chunk ``chunk`` of bank part ``bank_file`` (``rows`` images)."""
    return f"{SHARD_PREFIX}c{int(copy_idx):02d}-{_part_key(bank_file)}-{int(chunk):04d}-n{int(rows)}.parquet"


def parse_shard_name(name: str) -> tuple[int, int] | None:
    """``(copy_idx, rows)`` of a shard named by :func:`shard_name`; None for any other name."""
    match = _NAME.match(name.rsplit("/", 1)[-1])
    return (int(match.group(1)), int(match.group(4))) if match else None


@dataclass
class SyntheticShards:
    """The shards of a synthetic set as a listing: ``url``, ``copy_idx``, ``rows`` per shard."""

    root: str
    urls: list[str]
    copies: list[int]
    rows: list[int]

    @property
    def images(self) -> int:
        return sum(self.rows)

    def below_copy(self, mult: int | None) -> SyntheticShards:
        """Only the shards of copies ``< mult`` (all when None)."""
        keep = [i for i, c in enumerate(self.copies) if mult is None or c < mult]
        return SyntheticShards(self.root, [self.urls[i] for i in keep], [self.copies[i] for i in keep],
                               [self.rows[i] for i in keep])

    def digest(self) -> str:
        """sha256 of the sorted shard names: the identity of the set (a shard's name says which images it holds)."""
        names = sorted(u.rsplit("/", 1)[-1] for u in self.urls)
        return hashlib.sha256("\n".join(names).encode()).hexdigest()


def list_shards(data_dir: str) -> SyntheticShards:
    """The shards below ``data_dir`` (one listing). Files not named by :func:`shard_name` are not shards of
    this format; temporary files of an unfinished write are never listed (``storage.find``)."""
    urls, copies, rows = [], [], []
    for url in storage.find(data_dir) if storage.exists(data_dir) else []:
        parsed = parse_shard_name(url)
        if parsed:
            urls.append(url)
            copies.append(parsed[0])
            rows.append(parsed[1])
    return SyntheticShards(data_dir, urls, copies, rows)


def hf_features(class_dirs: list[str], table: pa.Table) -> dict:
    """The ``datasets`` features of a shard table: ``Image``, ``ClassLabel`` over ``class_dirs``, ``Value`` others."""
    value_types = {pa.string(): "string", pa.int64(): "int64", pa.float64(): "float64", pa.null(): "null"}
    features = {"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": list(class_dirs)}}
    for field in table.schema:
        if field.name not in features:
            features[field.name] = {"dtype": value_types.get(field.type, "string"), "_type": "Value"}
    return features


def shard_table(images: list[bytes], paths: list[str], labels: list[int], provenance: dict[str, list],
                settings: dict, class_dirs: list[str]) -> pa.Table:
    """One shard as an Arrow table in the ``datasets`` layout (see the module docstring)."""
    n = len(images)
    columns: dict[str, pa.Array] = {
        "image": pa.StructArray.from_arrays([pa.array(images, pa.binary()), pa.array(paths, pa.string())],
                                            names=["bytes", "path"]),
        "label": pa.array(labels, pa.int64()),
    }
    types = {"image_id": pa.string(), "class_dir": pa.string(), "copy_idx": pa.int64(), "seed": pa.int64(),
             "prompt": pa.string()}
    for key in PROVENANCE_COLUMNS:
        columns[key] = pa.array(provenance[key], types[key])
    for key, kind in SETTING_COLUMNS.items():
        columns[key] = pa.array([settings.get(key)] * n, kind)
    table = pa.table(columns)
    meta = {b"huggingface": json.dumps({"info": {"features": hf_features(class_dirs, table)}}).encode()}
    return table.replace_schema_metadata(meta)


def shard_bytes(table: pa.Table) -> bytes:
    """The Parquet bytes of a shard (images are JPEG already: no second compression of that column)."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=ROW_GROUP,
                   compression={c: ("none" if c == "image.bytes" else "zstd") for c in
                                ("image.bytes", "image.path", *table.column_names[1:])},
                   use_dictionary=[c for c in table.column_names if c not in ("image", "seed")])
    return buffer.getvalue()


def dataset_card(summary: dict, settings: dict, class_names: list[str], class_counts: dict[str, int]) -> str:
    """``README.md`` of a synthetic set: what made it, what is in it, how to load it (Hugging Face dataset card)."""
    lines = [
        "---",
        "configs:",
        "- config_name: default",
        "  data_files:",
        "  - split: train",
        "    path: data/*.parquet",
        "task_categories:",
        "- image-classification",
        "tags:",
        "- synthetic",
        "- real-fake",
        "---",
        "",
        "# Synthetic training set (Real-Fake, realfake-ray)",
        "",
        f"{summary.get('count', 0):,} images: {summary.get('bank_rows', 0):,} real train images × "
        f"{summary.get('mult')} cop{'y' if summary.get('mult') == 1 else 'ies'}, generated by img2img from each real "
        "image's latent with a distribution-matching LoRA (Yuan et al., ICLR 2024).",
        "",
        "## Made with",
        "",
        "| setting | value |",
        "| --- | --- |",
    ]
    lines += [f"| {k} | `{v}` |" for k, v in sorted(settings.items())]
    lines += ["", "## Images per class", "", "| class | name | images |", "| --- | --- | ---: |"]
    lines += [f"| {c} | {n} | {class_counts.get(c, 0):,} |" for c, n in zip(class_counts, class_names)]
    lines += [
        "",
        "## Load",
        "",
        "```python",
        "import datasets",
        "ds = datasets.load_dataset('parquet', data_dir='<this folder>/data', split='train')  # Image + ClassLabel",
        "```",
        "",
        "Each row: `image` (JPEG bytes and a file name), `label`, and its provenance (`image_id` of the real source "
        "image, `copy_idx`, `seed`, `prompt`, sampler settings, `lora_sha256`). Any Parquet reader works "
        "(pandas, DuckDB, Ray Data). `realfake export --format imagefolder|webdataset` writes other layouts.",
        "",
    ]
    return "\n".join(lines)


def sample_per_class(shards: SyntheticShards, per_class: int, max_classes: int) -> list[dict]:
    """Up to ``per_class`` images of each of the first ``max_classes`` labels, from the shards in name order:
    per shard one read of its small columns, then only the row groups holding the chosen rows. Returns rows
    ``{label, image_id, copy_idx, bytes}`` (a report's sample grid; no shard is read whole)."""
    chosen: dict[int, list[dict]] = {}
    for url in sorted(shards.urls, key=lambda u: u.rsplit("/", 1)[-1]):
        with storage.open_file(url) as f:
            parquet = pq.ParquetFile(f)
            small = parquet.read(columns=["label", "image_id", "copy_idx"]).to_pylist()
            wanted = []
            for i, row in enumerate(small):
                taken = chosen.setdefault(row["label"], []) if (row["label"] in chosen or len(chosen) < max_classes) else None
                if taken is not None and len(taken) < per_class:
                    taken.append(row)
                    wanted.append((i, row))
            groups = sorted({i // ROW_GROUP for i, _ in wanted})
            if groups:
                images = parquet.read_row_groups(groups, columns=["image"])["image"].to_pylist()
                position = {g: k * ROW_GROUP for k, g in enumerate(groups)}
                for i, row in wanted:
                    row["bytes"] = images[position[i // ROW_GROUP] + i % ROW_GROUP]["bytes"]
        if len(chosen) >= max_classes and all(len(v) >= per_class for v in chosen.values()):
            break
    return [row for label in sorted(chosen) for row in chosen[label]]
