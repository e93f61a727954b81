"""The classifier's data: the labelled sets (real in any layout, the sharded synthetic set) and the Ray Data
pipelines that read and decode them into train / eval views. Shared by ``train`` and ``evaluate``.

Nothing per image lives in the driver: a set is a :class:`~realfake_ray.data.sources.LabelledSet` (Arrow
columns of a per-image listing, or a shard listing), and rows become Python objects only inside the tasks.
Reading scales with the data and the cluster: per-image sets are cut into blocks of ~256 images whose fetches
overlap inside a task; sharded sets are read one shard per task, in one request. With ``train.cache`` every
remote file read (a shard or an image) is kept on the node's disk and later epochs read that copy. A read
that fails is retried; one that keeps failing is skipped, named, and counted against ``train.max_read_errors``.

Example:
    >>> val = real_set("embedded:digits/val", cfg)  # doctest: +SKIP
    >>> ds = decoded_dataset(rows_dataset(val, cfg), 32, cfg, view="eval")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import hashlib
import io
import os
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from realfake_ray import storage
from realfake_ray.config import ConfigError, RunConfig
from realfake_ray.data.imagefolder import DatasetError, centre_view, open_rgb
from realfake_ray.data.sources import LabelledSet, fetch_images, open_labelled_set, parquet_class_names, read_shard
from realfake_ray.data.synthetic import SyntheticShards, list_shards
from realfake_ray.layout import RunLayout
from realfake_ray.data.views import TrainView, eval_view
from realfake_ray.seeds import derive_seed

__all__ = [
    "output_dir", "seed_of", "real_set", "real_train_set", "per_class_subset", "repeated", "synthetic_set",
    "unknown_classes_error", "set_digest", "VIEWS",
    "view_settings", "decode_rows", "read_shards", "rows_dataset", "decoded_dataset", "read_error_count",
    "ROWS_PER_BLOCK", "images_in_memory", "as_image_bytes", "cut_into_blocks", "image_rows", "not_in",
    "read_pending_shards", "pending_dataset", "read_cached",
]

log = logging.getLogger(__name__)

_COPY_RE = r"__c(?P<copy>\d+)\.[A-Za-z]+$"  # the copy index in an exported synthetic file's name
ROWS_PER_BLOCK = 256  # per-image sets: images per read/decode block (more blocks as the set grows)


def output_dir(cfg: RunConfig) -> str:
    """This run's classifier directory (``train.tag`` keeps several classifiers apart in one run URL)."""
    tag = cfg.train.tag
    if tag is not None and (not tag or storage.safe_name(tag) != tag):
        raise ConfigError(f"train.tag: {tag!r} is not a plain folder name (letters, digits, '.', '_', '-')")
    return RunLayout(cfg.out).classifier_dir(tag)


def seed_of(*parts: int) -> int:
    """A 32-bit seed (what Ray Data's seeds take) from :func:`~realfake_ray.seeds.derive_seed` of ``parts``."""
    return derive_seed(*(int(p) for p in parts)) & 0xFFFFFFFF


def real_set(url: str, cfg: RunConfig, class_dirs: list[str] | None = None, labels_file: str | None = None) -> LabelledSet:
    """A real labelled set in any layout (:mod:`realfake_ray.data.sources`); ``class_dirs`` fixes the label order;
    classes named by ``data.classes_file`` in ``data.class_name_style``."""
    return open_labelled_set(url, class_dirs=class_dirs, classes_file=cfg.data.classes_file, labels_file=labels_file,
                             extensions=cfg.data.extensions, class_name_style=cfg.data.class_name_style)


def real_train_set(cfg: RunConfig) -> LabelledSet:
    """``data.train`` as every stage sees it: the whole set, or its ``data.train_per_class`` subset."""
    d = cfg.require_data()
    lset = real_set(d.train, cfg, labels_file=d.train_labels)
    return lset if d.train_per_class is None else per_class_subset(lset, d.train_per_class, cfg.seed)


def per_class_subset(lset: LabelledSet, per_class: int, seed: int) -> LabelledSet:
    """``per_class`` images of each class of ``lset`` (all of a smaller class), drawn with a generator seeded by
    ``seed``, kept in listing order. Per-image layouts only: a sharded set's labels are inside its shards."""
    if lset.sharded:
        raise ConfigError(f"data.train_per_class={per_class} needs a per-image train set (ImageFolder, class-index "
                          f"folders or a labels file); {lset.url} is {lset.layout} shards")
    rng = np.random.default_rng(seed_of(seed, 0x5CA2CE))
    labels = lset.items["label"].to_numpy()
    chosen = [rng.choice(idx, min(per_class, len(idx)), replace=False)
              for idx in (np.flatnonzero(labels == c) for c in range(lset.num_classes))]
    keep = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
    short = {d: int(n) for d, n in zip(lset.class_dirs, lset.class_counts()) if n < per_class}
    if short:
        log.warning(f"data.train_per_class={per_class}: {len(short)} class(es) have fewer images and are kept whole "
                    f"({', '.join(f'{d}: {n}' for d, n in list(short.items())[:5])}{' ...' if len(short) > 5 else ''})")
    return dataclasses.replace(lset, items=lset.items.take(keep))


def repeated(lset: LabelledSet, times: int) -> LabelledSet:
    """``lset`` listed ``times`` times over (its images, or its shards): an epoch that passes over it repeatedly."""
    if times == 1:
        return lset
    if lset.sharded:
        return dataclasses.replace(lset, shards=pa.concat_tables([lset.shards] * times))
    return dataclasses.replace(lset, items=pa.concat_tables([lset.items] * times))


def unknown_classes_error(where: str, unknown: list[str], class_dirs: list[str]) -> DatasetError:
    """The error for classes of ``where`` that are not among the real ``class_dirs``."""
    shown = ", ".join(map(repr, sorted(unknown)[:10])) + (" ..." if len(unknown) > 10 else "")
    return DatasetError(
        f"{where}: class(es) {shown} are not among the {len(class_dirs)} real classes "
        f"({', '.join(class_dirs[:5])}{', ...' if len(class_dirs) > 5 else ''})"
    )


def _shard_set(root: str, shards: SyntheticShards, class_dirs: list[str], names: list[str]) -> LabelledSet:
    with storage.open_file(shards.urls[0]) as f:
        own = parquet_class_names(pq.read_schema(f))
    if own is not None and own != list(class_dirs):
        unknown = sorted(set(own) - set(class_dirs))
        if unknown or len(own) != len(class_dirs):
            raise unknown_classes_error(f"synthetic set {root}", unknown or own, class_dirs)
    table = pa.table({"url": pa.array(shards.urls, pa.string()), "rows": pa.array(shards.rows, pa.int64())})
    label_map = None if own in (None, list(class_dirs)) else [class_dirs.index(n) for n in own]
    return LabelledSet(root, "parquet", list(class_dirs), list(names), shards=table, label_map=label_map)


def _below_copy(lset: LabelledSet, mult: int | None) -> LabelledSet:
    """A per-image synthetic set (an exported ImageFolder) cut to copies ``< mult`` by its ``__c<copy>`` names."""
    if mult is None or lset.sharded:
        return lset
    copies = pc.struct_field(pc.extract_regex(lset.items["image_id"], _COPY_RE), "copy")
    keep = pc.less(pc.fill_null(pc.cast(copies, pa.int64()), 0), mult)
    return LabelledSet(lset.url, lset.layout, lset.class_dirs, lset.class_names, items=lset.items.filter(keep))


def synthetic_set(cfg: RunConfig, class_dirs: list[str], class_names: list[str] | None = None) -> LabelledSet:
    """The synthetic set: ``<out>/synthetic`` (its shards), or ``train.synthetic`` — a folder of this format's shards,
    any other dataset layout (an exported ImageFolder, a Parquet or WebDataset set), or a synthetic set of the
    earlier one-file-per-image layout (its ``train/`` folder). Only copies ``< train.synthetic_mult`` when set.

    Raises :class:`DatasetError` naming classes that are not real classes, or for an empty set.
    """
    root = cfg.train.synthetic or RunLayout(cfg.out).synthetic_dir()
    names = class_names or list(class_dirs)
    for data_dir in (storage.join(root, "data"), root):
        shards = list_shards(data_dir)
        if shards.urls:
            chosen = shards.below_copy(cfg.train.synthetic_mult)
            if not chosen.urls:
                break
            return _shard_set(root, chosen, class_dirs, names)
    else:
        legacy = storage.join(root, "train")
        where = legacy if storage.exists(storage.join(root, "_manifest")) else root
        if not storage.exists(where):
            raise DatasetError(f"no synthetic data at {root} (run `realfake generate` first, or set train.synthetic)")
        try:
            lset = _below_copy(real_set(where, cfg, class_dirs), cfg.train.synthetic_mult)
        except DatasetError as exc:
            raise DatasetError(f"synthetic set {where}: {exc}") from None
        if lset.num_images:
            return lset
    raise DatasetError(f"synthetic set {root} is empty (train.synthetic_mult={cfg.train.synthetic_mult})")


def set_digest(lset: LabelledSet) -> str:
    """The identity of a labelled set: sha256 over its sorted ``url<TAB>label`` lines (per-image sets) or its
    sorted ``shard name<TAB>rows`` lines (sharded sets). Sorted in Arrow; hashed a slice at a time.

    Example:
        >>> t = pa.table({"image_id": ["b", "a"], "url": ["/d/b", "/d/a"], "label": [1, 0]})
        >>> s = LabelledSet("/d", "imagefolder", ["x", "y"], ["x", "y"], items=t)
        >>> set_digest(s) == set_digest(LabelledSet("/d", "imagefolder", ["x", "y"], ["x", "y"], items=t.take([1, 0])))
        True
    """
    if lset.sharded:
        names = pc.replace_substring_regex(lset.shards["url"], pattern=r"^.*/", replacement="")
        keys = pc.binary_join_element_wise(names, pc.cast(lset.shards["rows"], pa.string()), "\t")
    else:
        keys = pc.binary_join_element_wise(lset.items["url"], pc.cast(lset.items["label"], pa.string()), "\t")
    ordered = pc.take(keys, pc.sort_indices(keys))
    digest = hashlib.sha256()
    for start in range(0, len(ordered), 65536):
        digest.update("".join(f"{k}\n" for k in ordered.slice(start, 65536).to_pylist()).encode("utf-8"))
    return digest.hexdigest()


VIEWS = ("centre", "train", "eval")


def view_settings(cfg: RunConfig) -> dict:
    """The ``train.*`` values that shape the train and eval views (:func:`decode_rows` keyword arguments)."""
    t = cfg.train
    return {"crop_scale": tuple(t.crop_scale), "interpolation": t.interpolation, "hflip": t.hflip,
            "color_jitter": t.color_jitter, "eval_crop_pct": t.eval_crop_pct, "eval_interpolation": t.eval_interpolation}


def _view_fn(view: str, size: int, settings: dict):
    """``fn(image, row index, batch)`` → uint8 ``[size, size, 3]`` for one decoded RGB image."""

    if view == "train":  # the row's ``aug`` draw (Ray Data, reseeded every epoch) seeds its crop, flip and jitter
        train_view = TrainView(size, settings["crop_scale"], settings["interpolation"], settings["hflip"],
                               settings["color_jitter"])
        return lambda image, i, batch: train_view(image, np.random.default_rng(int(batch["aug"][i] * 2**53)))
    if view == "eval":
        return lambda image, i, batch: eval_view(image, size, settings["eval_crop_pct"], settings["eval_interpolation"])
    return lambda image, i, batch: centre_view(image, size)


def _record_errors(errors_dir: str | None, bad: list[str]) -> None:
    """One small part file of the read/decode errors of a task (its name from its content: a retried task
    overwrites, never duplicates)."""
    if not errors_dir or not bad:
        return
    buffer = io.BytesIO()
    pq.write_table(pa.table({"error": bad}), buffer)
    name = f"part-{hashlib.sha256(chr(10).join(bad).encode()).hexdigest()[:32]}.parquet"
    storage.write_bytes(storage.join(errors_dir, name), buffer.getvalue())


def decode_rows(batch: dict[str, np.ndarray], size: int, view: str = "centre", settings: dict | None = None,
                errors_dir: str | None = None, cache: bool = False) -> dict[str, np.ndarray]:
    """CPU task: decode each row's image and cut its ``view`` (``centre``: the latent bank's resize + centre crop;
    ``train``: seeded :class:`~realfake_ray.data.views.TrainView`; ``eval``: resize to ⌊S/crop_pct⌋ +
    centre crop; ``settings`` from :func:`view_settings`) into ``pixels`` uint8 [S,S,3]. Rows carry their
    ``bytes`` (sharded sets) or a ``url``, fetched here, concurrently and with retries (through the node's
    file cache when ``cache``: ``train.cache``). Drops the
    ``url``/``bytes``/``aug``/``copy_idx``/``error`` columns; unreadable or undecodable rows are skipped, named
    (printed, and written to ``errors_dir`` when given) and counted against the stage's threshold."""
    if "bytes" not in batch:
        batch = fetch_images(batch, reader=_reader(cache))
    make, n = _view_fn(view, size, settings or view_settings(RunConfig())), len(batch["bytes"])
    pixels, ok, bad = np.zeros((n, size, size, 3), np.uint8), np.ones(n, bool), []
    names = batch["url"] if "url" in batch else batch.get("image_id", np.arange(n))
    errors = batch.get("error")
    for i, data in enumerate(batch["bytes"]):
        try:
            if errors is not None and errors[i]:
                raise OSError(errors[i])
            pixels[i] = make(open_rgb(data), i, batch)
        except Exception as exc:  # a bad file is skipped and named, never fatal
            ok[i] = False
            message = str(exc) if errors is not None and errors[i] else f"{names[i]}: {type(exc).__name__}: {exc}"
            bad.append(message[:300])
    if bad:
        log.info(f"skipped {len(bad)} unreadable image(s): {'; '.join(bad[:3])}")
        _record_errors(errors_dir, bad)
    drop = ("url", "bytes", "copy_idx", "aug", "error", "image_id")
    keep = {k: np.asarray(v)[ok] for k, v in batch.items() if k not in drop}
    return {**keep, "pixels": pixels[ok]}


def read_cached(url: str) -> bytes:
    """The bytes at ``url`` through this node's cache of whole files below ``$REALFAKE_CACHE/files``: a remote
    file (object store, URL) is fetched once per node and later epochs read the local copy; a local file is
    read in place."""
    if storage.is_local(url):
        return storage.read_bytes(url)
    local = storage.cache_dir("files", hashlib.sha256(url.encode()).hexdigest()[:32] + "-" + url.rsplit("/", 1)[-1])
    if os.path.exists(local):
        with open(local, "rb") as f:
            return f.read()
    data = storage.read_bytes(url)
    os.makedirs(os.path.dirname(local), exist_ok=True)
    tmp = f"{local}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, local)
    return data


def _reader(cache: bool):
    """What the read tasks read files with: :func:`read_cached` under ``train.cache``, else storage (``None``)."""
    return read_cached if cache else None


def read_shards(batch: dict[str, np.ndarray], *, layout: str, root: str, label_map: list[int] | None,
                cache: bool = False) -> pa.Table:
    """Read task for sharded sets: every row of each shard in ``batch["url"]`` (``image_id``, ``label``,
    ``bytes``, plus any other column of ``batch`` repeated). A shard that cannot be read after retries gives
    one row with its ``error`` (named and counted downstream)."""
    tables, reader = [], _reader(cache)
    extra = [k for k in batch if k not in ("url", "rows")]
    for i, url in enumerate(batch["url"]):
        try:
            table = read_shard(str(url), layout, root, label_map, reader=reader)
            table = table.append_column("error", pa.array([""] * table.num_rows, pa.string()))
        except Exception as exc:
            table = pa.table({"image_id": [str(url)], "label": pa.array([0], pa.int64()), "bytes": pa.array([b""]),
                              "error": [f"{url}: {type(exc).__name__}: {exc}"[:300]]})
        for key in extra:
            table = table.append_column(key, pa.array([batch[key][i]] * table.num_rows))
        tables.append(table)
    return pa.concat_tables(tables)


def _blocks(n: int, rows_per_block: int) -> int:
    return max(1, n // rows_per_block)


def cut_into_blocks(table: pa.Table, blocks: int) -> list[pa.Table]:
    """``table`` cut into ``blocks`` consecutive slices, the first ``n % blocks`` one row longer (as
    ``ray.data.from_items`` cuts its items: the same blocks, so the same seeded shuffles)."""
    size, extra = divmod(table.num_rows, blocks)
    out, start = [], 0
    for b in range(blocks):
        length = size + (1 if b < extra else 0)
        out.append(table.slice(start, length))
        start += length
    return out


def image_rows(lset: LabelledSet) -> pa.Table:
    """Every image of ``lset`` as ``image_id``, ``url``, ``label`` Arrow columns, in listing order: a sharded set's
    rows carry their shard's ``url`` and a null ``label`` (read with the image, :func:`read_pending_shards`).

    Example:
        >>> t = pa.table({"image_id": ["a/1.png"], "url": ["/d/a/1.png"], "label": [0]})
        >>> image_rows(LabelledSet("/d", "imagefolder", ["a"], ["a"], items=t)).column_names
        ['image_id', 'url', 'label']
    """
    if not lset.sharded:
        return lset.items.select(["image_id", "url", "label"])
    rows = lset.shards["rows"].to_numpy()
    urls = pc.take(lset.shards["url"], pa.array(np.repeat(np.arange(len(rows)), rows)))
    ids = lset.image_ids()
    return pa.table({"image_id": ids, "url": urls, "label": pa.nulls(len(ids), pa.int64())})


def not_in(rows: pa.Table, done: pa.Array) -> pa.Table:
    """The rows of ``rows`` whose ``image_id`` is not in ``done`` (what a resumed stage has left to do)."""
    return rows.filter(pc.invert(pc.is_in(rows["image_id"], value_set=done))) if len(done) else rows


def read_pending_shards(batch: pa.Table, *, layout: str, root: str, label_map: list[int] | None) -> pa.Table:
    """Read task for sharded sets: the pending rows of each shard (``batch``: one row per pending image, grouped
    by shard ``url``), with their ``bytes`` and ``label`` from the shard. A shard that cannot be read after
    retries gives each of its pending rows that ``error`` (label 0, no bytes)."""
    out = []
    for url in pc.unique(batch["url"]).to_pylist():
        rows = batch.filter(pc.equal(batch["url"], url))
        label_at = rows.schema.get_field_index("label")
        try:
            shard = read_shard(url, layout, root, label_map)
        except Exception as exc:
            error = f"{url}: {type(exc).__name__}: {exc}"[:300]
            out.append(rows.set_column(label_at, "label", pa.array([0] * rows.num_rows, pa.int64()))
                       .append_column("bytes", pa.array([b""] * rows.num_rows, pa.binary()))
                       .append_column("error", pa.array([error] * rows.num_rows, pa.string())))
            continue
        taken = shard.take(pc.index_in(rows["image_id"], value_set=shard["image_id"]))
        rows = rows.set_column(label_at, "label", taken["label"])
        out.append(rows.append_column("bytes", taken["bytes"]).append_column("error", pa.array([""] * rows.num_rows)))
    return pa.concat_tables(out)


def pending_dataset(lset: LabelledSet, pending: pa.Table, batch_size: int, num_cpus: float):
    """A Ray Dataset of ``pending`` (rows of :func:`image_rows`, in listing order): a sharded set's as one read
    task per shard (its pending rows are adjacent), with their ``bytes``; a per-image set's in blocks of about
    ``batch_size`` rows, as many as it needs (their images are fetched by the decode task)."""
    import ray.data

    if not lset.sharded:
        return ray.data.from_arrow(cut_into_blocks(pending, max(1, pending.num_rows // max(batch_size, 1))))
    urls = pending["url"]
    bounds = np.flatnonzero(np.r_[True, pc.not_equal(urls[1:], urls[:-1]).to_numpy(zero_copy_only=False)])
    blocks = [pending.slice(a, b - a) for a, b in zip(bounds, [*bounds[1:], pending.num_rows])]
    return ray.data.from_arrow(blocks).map_batches(
        read_pending_shards, batch_size=None, batch_format="pyarrow", num_cpus=num_cpus,
        fn_kwargs={"layout": lset.layout, "root": lset.url, "label_map": lset.label_map})


def rows_dataset(lset: LabelledSet, cfg: RunConfig, columns: dict[str, object] | None = None,
                 rows_per_block: int = ROWS_PER_BLOCK, shard_order=None):
    """A Ray Dataset of the set's rows: per-image sets as ``url``, ``label`` rows in ~``rows_per_block`` blocks
    (fetched when decoded); sharded sets as their shards read (``bytes``, ``label``), one shard per task, in a
    fresh seeded order per execution when ``shard_order`` (a ``RandomSeedConfig``) is given.
    ``columns``: constant columns to add (e.g. ``set_idx``)."""
    import ray.data

    if lset.sharded:
        urls = lset.shards.select(["url"])
        for key, value in (columns or {}).items():
            urls = urls.append_column(key, pa.array([value] * urls.num_rows))
        ds = ray.data.from_arrow(cut_into_blocks(urls, urls.num_rows))
        if shard_order is not None:
            ds = ds.randomize_block_order(seed=shard_order)
        kwargs = {"layout": lset.layout, "root": lset.url, "label_map": lset.label_map, "cache": bool(cfg.train.cache)}
        return ds.map_batches(read_shards, batch_size=1, batch_format="numpy", fn_kwargs=kwargs,
                              num_cpus=cfg.train.decode_cpus)
    table = lset.items.select(["url", "label"])
    for key, value in (columns or {}).items():
        table = table.append_column(key, pa.array([value] * table.num_rows))
    return ray.data.from_arrow(cut_into_blocks(table, _blocks(table.num_rows, rows_per_block)))


def as_image_bytes(ds, lset: LabelledSet, cfg: RunConfig):
    """``ds`` of :func:`rows_dataset` as ``bytes``, ``label``, ``error`` rows whatever the layout (per-image rows
    are fetched here), so that sets of different layouts can be unioned before one shuffle."""
    if not lset.sharded:
        ds = ds.map_batches(fetch_images, batch_size=64, num_cpus=cfg.train.decode_cpus,
                            fn_kwargs={"reader": _reader(cfg.train.cache)})
    return ds.select_columns(["bytes", "label", "error"])


def decoded_dataset(ds, size: int, cfg: RunConfig, view: str = "centre", errors_dir: str | None = None):
    """``ds`` (rows with ``bytes`` or ``url``; ``aug`` for the train view) → ``pixels`` uint8 [S,S,3] on CPU tasks."""
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    kwargs = {"size": size, "view": view, "settings": view_settings(cfg), "errors_dir": errors_dir,
              "cache": bool(cfg.train.cache)}
    return ds.map_batches(decode_rows, batch_size=64, fn_kwargs=kwargs, num_cpus=cfg.train.decode_cpus)


def read_error_count(errors_dir: str) -> tuple[int, list[str]]:
    """``(errors recorded below errors_dir, the first 10 of them)``."""
    parts = [u for u in storage.find(errors_dir) if u.endswith(".parquet")] if storage.exists(errors_dir) else []
    errors: list[str] = []
    total = 0
    for url in parts:
        with storage.open_file(url) as f:
            column = pq.read_table(f)["error"].to_pylist()
        total += len(column)
        errors += column[: max(0, 10 - len(errors))]
    return total, errors


def images_in_memory(lset: LabelledSet) -> tuple[list[np.ndarray], np.ndarray]:
    """Every image of a *small* set decoded in this process (RGB uint8 arrays) and its labels: for the tools that
    train a quick classifier in memory (sampler tuning, the privacy audit), never for a stage's data."""
    if lset.sharded:
        tables = [read_shard(u, lset.layout, lset.url, lset.label_map) for u in lset.shards["url"].to_pylist()]
        table = pa.concat_tables(tables)
        data, labels = table["bytes"].to_pylist(), table["label"].to_numpy()
    else:
        fetched = fetch_images({"url": np.array(lset.items["url"].to_pylist(), dtype=object)})
        bad = [e for e in fetched["error"] if e]
        if bad:
            raise OSError(f"{len(bad)} image(s) of {lset.url} could not be read, e.g. {bad[0]}")
        data, labels = list(fetched["bytes"]), lset.items["label"].to_numpy()
    return [np.array(open_rgb(d)) for d in data], np.asarray(labels, dtype=np.int64)
