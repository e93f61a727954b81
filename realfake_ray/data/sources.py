"""Labelled image datasets in the layouts people have them in, behind one interface.

:func:`open_labelled_set` lists a dataset on the driver — as Arrow columns, never one Python object per
image — checks it, and returns a :class:`LabelledSet`; the batch functions below read it on workers.

Layouts (detected from the location, or named with ``layout=``):

- ``imagefolder`` — ``root/<class_dir>/.../<file>`` (torchvision's ImageFolder); ``image_id`` = the path
  below the root.
- ``index_folders`` — class folders named ``0 … K-1`` (ImageNet-V2): folder ``i`` is the ``i``-th class of
  the class order it is opened with.
- ``labels_file`` — a flat folder of images plus a labels file: ImageNet's ``LOC_val_solution.csv``
  (``ImageId,PredictionString``, the first token of the prediction string is the synset) or a plain
  ``file,label`` CSV/TSV (a header row is optional); a label is a class folder name or a class index.
- ``parquet`` — Parquet shards in the Hugging Face ``datasets`` layout: an ``image`` struct column
  (``bytes``, ``path``) and an integer ``label`` whose names are the ``ClassLabel`` names in the schema's
  ``huggingface`` metadata; ``image_id`` = ``<shard path>#<row>``. Any fsspec URL, ``hf://datasets/...``
  included (``huggingface_hub``'s filesystem).
- ``webdataset`` — tar shards of ``<key>.<jpg|png|...>`` + ``<key>.cls`` (an integer label);
  ``image_id`` = ``<shard path>#<i>`` (the i-th sample).

Example:
    >>> s = open_labelled_set("embedded:digits/train", classes_file="embedded:digits/classes.json")
    >>> s.layout, s.class_names[0], s.num_images
    ('imagefolder', 'digit zero', 1437)
"""

from __future__ import annotations

import logging
import csv
import io
from contextlib import contextmanager
import json
import posixpath
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from realfake_ray import storage
from realfake_ray.data.class_lists import shipped_class_list
from realfake_ray.data.imagefolder import DEFAULT_EXTENSIONS, DatasetError, decode_image

__all__ = [
    "LAYOUTS", "LabelledSet", "detect_layout", "open_labelled_set", "listing_cache", "read_with_retries", "fetch_images",
    "read_shard", "shard_image_ids", "read_images_by_id", "parquet_class_names", "CLASS_NAME_STYLES",
    "load_class_names", "display_name", "check_readable",
]

log = logging.getLogger(__name__)

LAYOUTS = ("imagefolder", "index_folders", "labels_file", "parquet", "webdataset")
_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff", "gif")


@dataclass
class LabelledSet:
    """A listed, checked labelled dataset. Per-image layouts fill ``items`` (``image_id``, ``url``,
    ``label``); sharded layouts fill ``shards`` (``url``, ``rows``). Labels index ``class_dirs``."""

    url: str
    layout: str
    class_dirs: list[str]
    class_names: list[str]
    items: pa.Table | None = None
    shards: pa.Table | None = None
    ignored: list[str] = field(default_factory=list)  # files that are not images of a known class (first 1000)
    label_map: list[int] | None = None  # sharded layouts: a shard's own label → label in class_dirs (None: same)

    @property
    def sharded(self) -> bool:
        return self.shards is not None

    @property
    def num_images(self) -> int:
        return int(pc.sum(self.shards["rows"]).as_py() or 0) if self.sharded else self.items.num_rows

    @property
    def num_classes(self) -> int:
        return len(self.class_dirs)

    def class_counts(self) -> np.ndarray | None:
        """Images per class (per-image layouts; None for sharded ones, whose labels are read with the rows)."""
        if self.sharded:
            return None
        return np.bincount(self.items["label"].to_numpy(), minlength=self.num_classes)

    def image_ids(self) -> pa.Array:
        """Every image's ``image_id``, in listing order (a sharded set's from its shard sizes, nothing read)."""
        if not self.sharded:
            return self.items["image_id"].combine_chunks()
        urls, rows = self.shards["url"].to_pylist(), self.shards["rows"].to_pylist()
        return pa.array([i for u, n in zip(urls, rows) for i in shard_image_ids(u, self.url, n)], pa.string())


# ------------------------------------------------------------------------------------------ class names
CLASS_NAME_STYLES = ("first", "all")


def load_class_names(url: str) -> dict[str, str]:
    """Class folder → name, from JSON (``{"n01440764": "tench"}``), from lines ``folder<whitespace>name``
    (ImageNet's ``LOC_synset_mapping.txt``: ``n01440764 tench, Tinca tinca``; ``#`` comments), or from a list
    shipped with the package, named instead of a URL (``imagenet1k``: :mod:`realfake_ray.data.class_lists`).
    The names are returned whole; :func:`display_name` makes the prompt's name of one.

    Example:
        >>> load_class_names("imagenet1k")["n01440764"]
        'tench'
    """
    path = shipped_class_list(url) or url
    if not storage.exists(path):
        raise DatasetError(f"classes file not found: {url}")
    text = storage.read_text(path)
    if text.lstrip().startswith("{"):
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"classes file {url}: invalid JSON ({exc})") from None
        return {str(k): str(v) for k, v in mapping.items()}
    names = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.strip().split(None, 1)
        if len(parts) != 2 or not display_name(parts[1]):  # "n01440764 , Tinca tinca": no first synonym
            raise DatasetError(f"classes file {url}, line {lineno}: expected 'folder name', got {line!r}")
        names[parts[0]] = parts[1].strip()
    return names


def display_name(name: str, style: str = "first") -> str:
    """A class's name in prompts: the first synonym of ``"tench, Tinca tinca"`` (``style="first"``) or the whole
    list (``"all"``); ``_`` as spaces.

    Example:
        >>> display_name("tench, Tinca tinca"), display_name("tench, Tinca tinca", "all"), display_name("digit_7")
        ('tench', 'tench, Tinca tinca', 'digit 7')
    """
    if style not in CLASS_NAME_STYLES:
        raise ValueError(f"class name style {style!r}: expected one of {', '.join(CLASS_NAME_STYLES)}")
    return (name.split(",")[0] if style == "first" else name).strip().replace("_", " ")


_WARNED_SHARED: set[tuple] = set()


def _warn_shared_names(classes_file: str | None, url: str, class_names: list[str]) -> None:
    """Say once per classes file (or, without one, per set of shared names) when several classes get one name
    (``LOC_synset_mapping.txt``'s first synonyms: two "crane", two "maillot"): their prompts cannot tell them
    apart. A job's train, val and extra sets share their classes: said once."""
    shared = tuple(sorted(name for name, n in Counter(class_names).items() if n > 1))
    if not shared or (classes_file, shared) in _WARNED_SHARED:
        return
    _WARNED_SHARED.add((classes_file, shared))
    where = f"classes file {classes_file}" if classes_file else f"dataset {url}"
    log.warning(f"{where} gives several classes the same name "
                f"({', '.join(map(repr, shared[:5]))}{', ...' if len(shared) > 5 else ''}), so their prompts are alike; "
                "data.class_name_style=all keeps every synonym (ImageNet: data.classes_file=imagenet1k names each class "
                "once)")


# ------------------------------------------------------------------------------------------ detection
def _suffix(url: str) -> str:
    return posixpath.splitext(url.lower())[1].lstrip(".")


def detect_layout(url: str, labels_file: str | None = None) -> str:
    """The layout of ``url`` (see the module docstring): a labels file makes it ``labels_file``; a ``.parquet``
    or ``.tar`` file, or a folder holding such files, is ``parquet`` / ``webdataset``; class folders all named
    by integers are ``index_folders``; anything else is ``imagefolder``."""
    if labels_file:
        return "labels_file"
    if _suffix(url) in ("parquet", "tar"):  # a shard, or a glob of shards (``…/train-*.parquet``)
        return "parquet" if _suffix(url) == "parquet" else "webdataset"
    if not storage.isdir(url):
        raise DatasetError(f"dataset not found (not a directory, .parquet or .tar file): {url}")
    entries = storage.listdir(url)
    files = [name for name, is_dir in entries if not is_dir]
    folders = [name for name, is_dir in entries if is_dir]
    for kind, ext in (("parquet", "parquet"), ("webdataset", "tar")):
        if any(_suffix(f) == ext for f in files) or (folders and _nested_has(url, ext)):
            return kind
    if folders and all(name.isdigit() for name in folders):
        return "index_folders"
    return "imagefolder"


def _nested_has(url: str, ext: str) -> bool:
    """Whether a ``data/`` or ``train/``-style subfolder holds ``.ext`` shards (the hub's dataset repos)."""
    for name, is_dir in storage.listdir(url):
        if is_dir and name in ("data", "train", "val", "validation", "test"):
            if any(_suffix(f) == ext for f, d in storage.listdir(storage.join(url, name)) if not d):
                return True
    return False


# ------------------------------------------------------------------------------------------ listing
def _classes(class_dirs: list[str]) -> str:
    return f"{len(class_dirs)} real classes ({', '.join(class_dirs[:5])}{', ...' if len(class_dirs) > 5 else ''})"


_LISTINGS: dict | None = None  # set inside listing_cache(): one listing per dataset for a whole job


@contextmanager
def listing_cache() -> Iterator[None]:
    """Within this block :func:`open_labelled_set` lists each dataset once (same arguments, same result): a job's
    preflight, encode, train and evaluate share one listing of 1.28 M objects instead of making four."""
    global _LISTINGS
    outer, _LISTINGS = _LISTINGS, ({} if _LISTINGS is None else _LISTINGS)
    try:
        yield
    finally:
        _LISTINGS = outer


def open_labelled_set(
    url: str,
    *,
    class_dirs: list[str] | None = None,
    classes_file: str | None = None,
    labels_file: str | None = None,
    layout: str | None = None,
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS,
    class_name_style: str = "first",
) -> LabelledSet:
    """List and check the dataset at ``url``; raises :class:`DatasetError` naming the location and the problem.

    ``class_dirs`` fixes the class order (a val or OOD set opened with the train set's classes); a class
    the set has that is not in it is an error. ``classes_file`` (:func:`load_class_names`) maps class folders to
    readable names; every class is named by :func:`display_name` in ``class_name_style``.
    """
    key = (url, tuple(class_dirs) if class_dirs is not None else None, classes_file, labels_file, layout,
           tuple(extensions), class_name_style)
    if _LISTINGS is not None and key in _LISTINGS:
        return _LISTINGS[key]
    result = _open(url, class_dirs, classes_file, labels_file, layout, extensions, class_name_style)
    if _LISTINGS is not None:
        _LISTINGS[key] = result
    return result


def _open(url: str, class_dirs: list[str] | None, classes_file: str | None, labels_file: str | None,
          layout: str | None, extensions: tuple[str, ...], class_name_style: str) -> LabelledSet:
    layout = layout or detect_layout(url, labels_file)
    if layout not in LAYOUTS:
        raise DatasetError(f"{url}: unknown dataset layout {layout!r}; layouts: {', '.join(LAYOUTS)}")
    display_name("", class_name_style)  # an unknown style is refused before the listing
    names = load_class_names(classes_file) if classes_file else {}
    if layout in ("parquet", "webdataset"):
        result = _open_sharded(url, layout, class_dirs)
    else:
        exts = tuple(e.lower() for e in extensions)
        openers = {"imagefolder": _open_imagefolder, "index_folders": _open_index_folders}
        result = (_open_labels_file(url, labels_file, class_dirs, exts) if layout == "labels_file"
                  else openers[layout](url, class_dirs, exts))
        _check_items(result)
    result.class_names = [display_name(names.get(c, c), class_name_style) for c in result.class_dirs]
    _warn_shared_names(classes_file, url, result.class_names)
    return result


def _list_files(root: str, exts: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """``(image paths below root, other paths)``, sorted, from one recursive listing."""
    images, other = [], []
    for file_url in storage.find(root):
        rel = storage.relative(file_url, root)
        (images if rel.lower().endswith(exts) else other).append(rel)
    return images, other


def _items(root: str, ids: list[str], labels: np.ndarray) -> pa.Table:
    base = root.rstrip("/") + "/"
    ids_array = pa.array(ids, pa.string())
    return pa.table({"image_id": ids_array, "url": pc.binary_join_element_wise(base, ids_array, ""),
                     "label": pa.array(labels, pa.int64())})


def _by_top_folder(root: str, exts: tuple[str, ...]) -> tuple[dict[str, list[str]], list[str]]:
    """Images per top folder; folders named ``_…`` or ``.…`` hold metadata (an export's markers), not a class."""
    images, other = _list_files(root, exts)
    found: dict[str, list[str]] = {n: [] for n, is_dir in storage.listdir(root) if is_dir and not n.startswith(("_", "."))}
    for rel in images:
        top, sep, _ = rel.partition("/")
        (found[top] if sep and top in found else other).append(rel)
    return found, other


def _open_imagefolder(root: str, class_dirs: list[str] | None, exts: tuple[str, ...]) -> LabelledSet:
    found, other = _by_top_folder(root, exts)
    if not any(found.values()):
        raise DatasetError(f"dataset {root} is empty: no images with extensions {', '.join(exts)} in class folders")
    empty = sorted(c for c, files in found.items() if not files)
    if empty:
        raise DatasetError(f"dataset {root}: class folder(s) with no image: {', '.join(map(repr, empty))}")
    if class_dirs is None:
        class_dirs = sorted(found)
    # a folder is a class by its name, or by the file-safe form of it (synthetic sets exported to folders)
    lookup = {storage.safe_name(c): i for i, c in enumerate(class_dirs)} | {c: i for i, c in enumerate(class_dirs)}
    unknown = sorted(set(found) - set(lookup))
    if unknown:
        raise DatasetError(f"dataset {root}: class folder(s) {', '.join(map(repr, unknown[:10]))} are not among the "
                           f"{_classes(class_dirs)}")
    folders = sorted(found, key=lambda f: (lookup[f], f))
    ids = [rel for f in folders for rel in sorted(found[f])]
    labels = np.concatenate([np.full(len(found[f]), lookup[f], dtype=np.int64) for f in folders])
    return LabelledSet(root, "imagefolder", list(class_dirs), [], items=_items(root, ids, labels), ignored=other[:1000])


def _open_index_folders(root: str, class_dirs: list[str] | None, exts: tuple[str, ...]) -> LabelledSet:
    found, other = _by_top_folder(root, exts)
    indices = sorted(int(f) for f in found)
    if class_dirs is None:  # opened on its own: the indices are the classes
        class_dirs = [str(i) for i in range(max(indices) + 1)] if indices else []
    bad = [i for i in indices if i >= len(class_dirs)]
    if bad:
        raise DatasetError(f"dataset {root}: class index folder(s) {bad[:10]} are outside the {len(class_dirs)} "
                           "classes of the class order it is read with")
    if not any(found.values()):
        raise DatasetError(f"dataset {root} is empty: no images with extensions {', '.join(exts)} in class folders")
    ids, labels = [], []
    for folder in sorted(found, key=int):
        files = sorted(found[folder])
        ids += files
        labels += [int(folder)] * len(files)
    return LabelledSet(root, "index_folders", list(class_dirs), [], items=_items(root, ids, np.array(labels)),
                       ignored=other[:1000])


def _labels_rows(text: str, where: str) -> list[tuple[str, str]]:
    """``(file, label)`` pairs of a labels file: LOC_val_solution.csv or a plain two-column CSV/TSV."""
    dialect = "excel-tab" if "\t" in text.split("\n", 1)[0] else "excel"
    rows = [r for r in csv.reader(io.StringIO(text), dialect=dialect) if r and any(c.strip() for c in r)]
    if not rows:
        raise DatasetError(f"labels file {where} is empty")
    header = [c.strip().lower() for c in rows[0]]
    if header[:2] == ["imageid", "predictionstring"]:  # ImageNet's LOC_val_solution.csv
        return [(r[0].strip(), r[1].split()[0]) for r in rows[1:] if len(r) > 1 and r[1].split()]
    if header and header[0] in ("file", "filename", "image", "image_id", "path"):
        rows = rows[1:]
    pairs = []
    for lineno, row in enumerate(rows, 2 if header and header[0] in ("file", "filename", "image", "image_id", "path") else 1):
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise DatasetError(f"labels file {where}, line {lineno}: expected 'file,label', got {','.join(row)!r}")
        pairs.append((row[0].strip(), row[1].strip()))
    return pairs


def _open_labels_file(root: str, labels_file: str | None, class_dirs: list[str] | None,
                      exts: tuple[str, ...]) -> LabelledSet:
    if not storage.exists(labels_file):
        raise DatasetError(f"labels file not found: {labels_file}")
    pairs = _labels_rows(storage.read_text(labels_file), labels_file)
    images, other = _list_files(root, exts)
    by_stem: dict[str, str] = {}
    for rel in images:
        by_stem.setdefault(posixpath.splitext(rel)[0], rel)
        by_stem.setdefault(rel, rel)
    if class_dirs is None:
        class_dirs = sorted({label for _, label in pairs})
    index = {c: i for i, c in enumerate(class_dirs)}
    ids, labels, unknown, missing = [], [], set(), []
    for file, label in pairs:
        rel = by_stem.get(file) or by_stem.get(posixpath.splitext(file)[0])
        if rel is None:
            missing.append(file)
            continue
        if label in index:
            labels.append(index[label])
        elif label.isdigit() and int(label) < len(class_dirs):
            labels.append(int(label))
        else:
            unknown.add(label)
            continue
        ids.append(rel)
    if unknown:
        shown = ", ".join(map(repr, sorted(unknown)[:10]))
        raise DatasetError(f"labels file {labels_file}: label(s) {shown} are not among the {_classes(class_dirs)}")
    if missing:
        raise DatasetError(f"labels file {labels_file}: {len(missing)} labelled file(s) are not images in {root}, "
                           f"e.g. {missing[0]!r}")
    unlabelled = sorted(set(images) - set(ids))
    if unlabelled:
        raise DatasetError(f"dataset {root}: {len(unlabelled)} image(s) have no label in {labels_file}, "
                           f"e.g. {unlabelled[0]!r}")
    order = np.argsort(np.array(ids, dtype=object), kind="stable")
    ids = [ids[i] for i in order]
    return LabelledSet(root, "labels_file", list(class_dirs), [], items=_items(root, ids, np.array(labels)[order]),
                       ignored=other[:1000])


def _check_items(result: LabelledSet) -> None:
    if result.items.num_rows == 0:
        raise DatasetError(f"dataset {result.url} is empty")
    if pc.count_distinct(result.items["image_id"]).as_py() != result.items.num_rows:
        raise DatasetError(f"dataset {result.url}: an image is listed twice")


# ------------------------------------------------------------------------------------------ sharded layouts
def _shard_urls(url: str, ext: str) -> list[str]:
    if "*" in url:
        return [u for u in storage.glob(url) if _suffix(u) == ext]
    if _suffix(url) == ext:
        return [url]
    return [u for u in storage.find(url) if _suffix(u) == ext]


def _root_of(url: str) -> str:
    """The folder that shard names are relative to (a glob's or a single shard's folder)."""
    if "*" in url:
        return url[: url.index("*")].rsplit("/", 1)[0]
    return url.rsplit("/", 1)[0] if _suffix(url) in ("parquet", "tar") else url


def parquet_class_names(schema: pa.Schema) -> list[str] | None:
    """The ``ClassLabel`` names of the ``label`` feature in a Hugging Face ``datasets`` Parquet schema, if any."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return None
    try:
        feature = json.loads(raw)["info"]["features"]["label"]
    except (KeyError, TypeError, json.JSONDecodeError):
        return None
    return [str(n) for n in feature["names"]] if feature.get("_type") == "ClassLabel" and "names" in feature else None


def _parquet_footer(url: str) -> tuple[int, pa.Schema]:
    with storage.open_file(url) as f:
        meta = pq.read_metadata(f)
    return meta.num_rows, meta.schema.to_arrow_schema()


def _count_tar(url: str) -> int:
    """Samples (keys with an image and a ``.cls``) of a tar shard, streamed: the whole shard is read once."""
    exts: dict[str, set[str]] = {}
    with storage.open_file(url) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            if member.isfile():
                key, _, ext = member.name.rpartition(".")
                exts.setdefault(key, set()).add(ext.lower())
    return sum(1 for e in exts.values() if "cls" in e and e & set(_IMAGE_EXTS))


def shard_image_ids(shard_url: str, root: str, rows: int) -> list[str]:
    """The ``image_id`` of every row of a shard, without reading it: ``<shard below root>#<i>``.

    Example:
        >>> shard_image_ids("s3://b/ds/data/train-0.parquet", "s3://b/ds", 2)
        ['data/train-0.parquet#0', 'data/train-0.parquet#1']
    """
    shard = _shard_name(shard_url, root)
    return [f"{shard}#{i}" for i in range(rows)]


def _shard_name(url: str, root: str) -> str:
    root = _root_of(root)
    if url.rstrip("/") == root.rstrip("/"):
        return url.rsplit("/", 1)[-1]
    return url[len(root.rstrip("/")) + 1 :] if url.startswith(root.rstrip("/") + "/") else storage.relative(url, root)


def _wids_counts(url: str) -> dict[str, int]:
    """Shard sizes from a ``wids`` shard index (``*.json`` with ``shardlist: [{url, nsamples}]``), if one exists."""
    counts: dict[str, int] = {}
    for json_url in ([] if _suffix(url) == "tar" else [u for u in storage.find(url) if _suffix(u) == "json"]):
        try:
            shardlist = storage.read_json(json_url).get("shardlist", [])
        except (ValueError, AttributeError):
            continue
        base = json_url.rsplit("/", 1)[0]
        for entry in shardlist:
            counts[storage.join(base, entry["url"])] = int(entry["nsamples"])
    return counts


def _open_sharded(url: str, layout: str, class_dirs: list[str] | None) -> LabelledSet:
    ext = "parquet" if layout == "parquet" else "tar"
    urls = _shard_urls(url, ext)
    if not urls:
        raise DatasetError(f"dataset {url}: no .{ext} shards found")
    own_names: list[str] | None = None
    with ThreadPoolExecutor(max_workers=min(32, len(urls))) as pool:
        if layout == "parquet":
            footers = list(pool.map(_parquet_footer, urls))
            rows = [n for n, _ in footers]
            schema = footers[0][1]
            missing = {"image", "label"} - set(schema.names)
            if missing:
                raise DatasetError(f"dataset {url}: {urls[0]} has no column(s) {sorted(missing)} (expected the Hugging "
                                   "Face datasets layout: an `image` struct of bytes/path and an integer `label`)")
            own_names = parquet_class_names(schema)
        else:
            known = _wids_counts(url)
            rows = list(pool.map(lambda u: known[u] if u in known else _count_tar(u), urls))
    if class_dirs is None:
        if own_names is None:
            raise DatasetError(f"dataset {url}: its labels are class indices with no class names (no ClassLabel "
                               "metadata); open it with the train set's classes or give data.classes_file")
        class_dirs = own_names
    elif own_names is not None and own_names != list(class_dirs):
        unknown = sorted(set(own_names) - set(class_dirs))
        if unknown:
            raise DatasetError(f"dataset {url}: class(es) {', '.join(map(repr, unknown[:10]))} are not among the "
                               f"{_classes(class_dirs)}")
    shards = pa.table({"url": pa.array(urls, pa.string()), "rows": pa.array(rows, pa.int64())})
    if int(pc.sum(shards["rows"]).as_py() or 0) == 0:
        raise DatasetError(f"dataset {url} is empty: its {len(urls)} shard(s) hold no rows")
    return LabelledSet(_root_of(url), layout, list(class_dirs), [], shards=shards,
                       label_map=_label_map(own_names, class_dirs))


def _label_map(own: list[str] | None, class_dirs: list[str]) -> list[int] | None:
    """Shard label → label in ``class_dirs`` (None: the same indices)."""
    if own is None or own == list(class_dirs):
        return None
    index = {c: i for i, c in enumerate(class_dirs)}
    return [index[n] for n in own]


def check_readable(lset: LabelledSet, threads: int = 16) -> None:
    """DatasetError naming the classes of a per-image set none of whose first few images decodes (a class
    folder of broken files, a wrong extension): checked before any Ray work. Sharded sets are checked by
    their footers when opened."""
    if lset.sharded:
        return
    checked = ("readable", lset.url, lset.num_images)  # inside listing_cache(): once per job, not per stage
    if _LISTINGS is not None and checked in _LISTINGS:
        return
    first: dict[int, list[str]] = {}
    for url, label in zip(lset.items["url"].to_pylist(), lset.items["label"].to_pylist()):
        urls = first.setdefault(label, [])
        if len(urls) < 8:
            urls.append(url)

    def readable(urls: list[str]) -> bool:
        for url in urls:
            try:
                decode_image(storage.read_bytes(url), 8)
                return True
            except (OSError, ValueError):
                continue
        return False

    with ThreadPoolExecutor(max_workers=threads) as pool:
        ok = dict(zip(first, pool.map(readable, first.values())))
    bad = sorted(lset.class_dirs[c] for c, good in ok.items() if not good)
    if bad:
        raise DatasetError(f"dataset {lset.url}: no readable image in class(es) {', '.join(map(repr, bad))}")
    if _LISTINGS is not None:
        _LISTINGS[checked] = True


# ------------------------------------------------------------------------------------------ reading (workers)
def read_with_retries(url: str, attempts: int = 3, backoff_s: float = 0.5, reader: Callable[[str], bytes] | None = None) -> bytes:
    """The bytes at ``url``, retried ``attempts`` times with exponential backoff (S3 throttling, a dropped
    connection); a missing file is not retried."""
    reader = reader or storage.read_bytes
    for attempt in range(attempts):
        try:
            return reader(url)
        except FileNotFoundError:
            raise
        except Exception:
            if attempt == attempts - 1:
                raise
            time.sleep(backoff_s * 2**attempt)
    raise AssertionError("unreachable")


def fetch_images(batch: dict[str, np.ndarray], threads: int = 16, attempts: int = 3,
                 reader: Callable[[str], bytes] | None = None) -> dict[str, np.ndarray]:
    """Worker task for per-image layouts: the ``bytes`` of each row's ``url``, fetched concurrently (a task's
    requests overlap instead of running one after another) by ``reader`` (default: storage); a read that still
    fails after ``attempts`` leaves empty bytes and its ``error``."""
    urls = list(batch["url"])

    def one(url: str) -> tuple[bytes, str]:
        try:
            return read_with_retries(url, attempts, reader=reader), ""
        except Exception as exc:
            return b"", f"{url}: {type(exc).__name__}: {exc}"[:300]

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(urls)))) as pool:
        results = list(pool.map(one, urls))
    data, errors = np.empty(len(urls), dtype=object), np.empty(len(urls), dtype=object)
    for i, (content, error) in enumerate(results):
        data[i], errors[i] = content, error
    return {**batch, "bytes": data, "error": errors}


def _parquet_rows(content: bytes, shard: str, label_map: list[int] | None, columns: list[str] | None) -> pa.Table:
    table = pq.read_table(io.BytesIO(content), columns=["image", "label", *(columns or [])])
    image = table["image"].combine_chunks()
    data = image.field("bytes") if pa.types.is_struct(image.type) else image
    labels = table["label"].to_numpy(zero_copy_only=False).astype(np.int64)
    if label_map is not None:
        labels = np.asarray(label_map, dtype=np.int64)[labels]
    ids = pa.array([f"{shard}#{i}" for i in range(table.num_rows)], pa.string())
    out = {"image_id": ids, "label": pa.array(labels), "bytes": data.cast(pa.binary())}
    return pa.table({**out, **{c: table[c] for c in (columns or [])}})


def _tar_rows(content: bytes, shard: str) -> pa.Table:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(content), mode="r:*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.rpartition(".")
            samples.setdefault(key, {})[ext.lower()] = tar.extractfile(member).read()
    ids, labels, data = [], [], []
    for parts in samples.values():  # samples in tar order: #i is the i-th sample of the shard
        image_ext = next((e for e in _IMAGE_EXTS if e in parts), None)
        if image_ext is None or "cls" not in parts:
            continue
        ids.append(f"{shard}#{len(ids)}")
        labels.append(int(parts["cls"].decode().strip()))
        data.append(parts[image_ext])
    return pa.table({"image_id": pa.array(ids, pa.string()), "label": pa.array(labels, pa.int64()),
                     "bytes": pa.array(data, pa.binary())})


def read_shard(url: str, layout: str, root: str, label_map: list[int] | None = None,
               columns: list[str] | None = None, reader: Callable[[str], bytes] | None = None) -> pa.Table:
    """The rows of one shard: ``image_id`` (``<shard below root>#<i>``, see :func:`shard_image_ids`), ``label``, ``bytes`` (+ extra
    Parquet ``columns``). The shard is read whole, in one request (retried), by ``reader`` (e.g. a cache)."""
    content = read_with_retries(url, reader=reader)
    shard = _shard_name(url, root)
    if layout == "parquet":
        return _parquet_rows(content, shard, label_map, columns)
    return _tar_rows(content, shard)



def read_images_by_id(root: str, layout: str, image_ids: list[str]) -> dict[str, bytes]:
    """The image bytes of a few ``image_id`` s of the set at ``root`` (e.g. a report's real thumbnails): one read
    per image of a per-image layout, one read per shard of a sharded one."""
    if layout not in ("parquet", "webdataset"):
        return {i: read_with_retries(storage.join(root, i)) for i in image_ids}
    by_shard: dict[str, list[str]] = {}
    for image_id in image_ids:
        by_shard.setdefault(image_id.rsplit("#", 1)[0], []).append(image_id)
    found: dict[str, bytes] = {}
    for shard, ids in by_shard.items():
        url = storage.join(_root_of(root), shard)
        table = read_shard(url, layout, root)
        index = {k: i for i, k in enumerate(table["image_id"].to_pylist())}
        found |= {i: table["bytes"][index[i]].as_py() for i in ids if i in index}
    return found
