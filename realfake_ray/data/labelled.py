"""The classifier's data: ``(url, label)`` rows of real and synthetic sets, and the Ray Data pipelines that
decode them into train / eval views. Shared by ``train`` and ``evaluate`` (neither imports the other for it).

Example:
    >>> rows = real_rows("embedded:digits/val", cfg)  # doctest: +SKIP
    >>> ds = decoded_dataset(rows_dataset(rows), 32, cfg, view="eval")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
import re

import numpy as np

from realfake_ray import storage
from realfake_ray._internal.shards import part_files, read_parts
from realfake_ray.method.classifier import TrainView, eval_view
from realfake_ray.config import ConfigError, RunConfig
from realfake_ray.data.imagefolder import DatasetError, centre_view, open_rgb, scan_image_folder
from realfake_ray.layout import RunLayout
from realfake_ray.seeds import derive_seed

__all__ = [
    "output_dir", "synthetic_root", "synthetic_manifest_dir", "seed_of", "real_rows", "class_index",
    "unknown_classes_error", "scan_mapped_folder", "synthetic_rows", "rows_digest", "VIEWS", "view_settings",
    "decode_rows", "rows_dataset", "decoded_dataset",
]

_COPY_RE = re.compile(r"__c(\d+)$")


def output_dir(cfg: RunConfig) -> str:
    """This run's classifier directory (``train.tag`` keeps several classifiers apart in one run URL)."""
    tag = cfg.train.tag
    if tag is not None and (not tag or storage.safe_name(tag) != tag):
        raise ConfigError(f"train.tag: {tag!r} is not a plain folder name (letters, digits, '.', '_', '-')")
    return RunLayout(cfg.out).classifier_dir(tag)


def synthetic_root(cfg: RunConfig) -> str:
    """The synthetic ImageFolder: ``train.synthetic`` or ``<out>/synthetic/train``."""
    return cfg.train.synthetic or RunLayout(cfg.out).images_dir()


def synthetic_manifest_dir(cfg: RunConfig) -> str:
    """The manifest beside the synthetic ImageFolder: ``<synthetic>/../_manifest``."""
    parent = synthetic_root(cfg).rstrip("/").rsplit("/", 1)[0]
    return storage.join(parent, "_manifest")


def seed_of(*parts: int) -> int:
    """A 32-bit seed (what Ray Data's seeds take) from :func:`~realfake_ray.seeds.derive_seed` of ``parts``."""
    return derive_seed(*(int(p) for p in parts)) & 0xFFFFFFFF


def real_rows(url: str, cfg: RunConfig, class_dirs: list[str] | None = None):
    """``(index, rows)`` of a labelled real ImageFolder; ``class_dirs`` fixes the label order."""
    index = scan_image_folder(
        url, classes_file=cfg.data.classes_file, extensions=cfg.data.extensions, class_dirs=class_dirs
    )
    return index, [{"url": r.url, "label": r.label} for r in index.records]


def class_index(class_dirs: list[str]) -> dict[str, int]:
    """Folder name → real label; synthetic folders are ``storage.safe_name`` of the real folder names."""
    index = {storage.safe_name(d): i for i, d in enumerate(class_dirs)}
    index.update({d: i for i, d in enumerate(class_dirs)})
    return index


def unknown_classes_error(where: str, unknown: list[str], class_dirs: list[str]) -> DatasetError:
    """The error for class folders of ``where`` that are not among the real ``class_dirs``."""
    shown = ", ".join(map(repr, sorted(unknown)[:10])) + (" ..." if len(unknown) > 10 else "")
    return DatasetError(
        f"{where}: class folder(s) {shown} are not among the {len(class_dirs)} real classes "
        f"({', '.join(class_dirs[:5])}{', ...' if len(class_dirs) > 5 else ''})"
    )


def _manifest_rows(cfg: RunConfig, class_dirs: list[str], table) -> list[dict]:
    root, lookup = synthetic_root(cfg), class_index(class_dirs)
    data = {c: table.column(c).to_pylist() for c in table.column_names}
    unknown = sorted({c for c in data["class_dir"] if c not in lookup})
    if unknown:
        raise unknown_classes_error(f"synthetic manifest {synthetic_manifest_dir(cfg)}", unknown, class_dirs)
    copies = data.get("copy_idx") or [0] * len(data["path"])
    rows = []
    for path, label, cdir, copy in zip(data["path"], data["label"], data["class_dir"], copies):
        if int(label) != lookup[cdir]:
            raise DatasetError(
                f"synthetic manifest {synthetic_manifest_dir(cfg)}: {path} has label {label} but class "
                f"folder {cdir!r} is real label {lookup[cdir]} (generated from another class list?)"
            )
        rows.append({"url": storage.join(root, path), "label": int(label), "copy_idx": int(copy)})
    return rows


def scan_mapped_folder(root: str, class_dirs: list[str], cfg: RunConfig, where: str, missing: str) -> list[tuple[str, int]]:
    """``(url, real label)`` of an ImageFolder whose class folders must be real classes (by folder name or
    its ``storage.safe_name``); ``missing`` is the error text when ``root`` is not a directory."""
    lookup = class_index(class_dirs)
    if not storage.isdir(root):
        raise DatasetError(missing)
    unknown = [name for name, is_dir in storage.listdir(root) if is_dir and name not in lookup]
    if unknown:
        raise unknown_classes_error(where, unknown, class_dirs)
    return [(r.url, lookup[r.class_dir]) for r in scan_image_folder(root, extensions=cfg.data.extensions).records]


def _folder_rows(cfg: RunConfig, class_dirs: list[str]) -> list[dict]:
    root = synthetic_root(cfg)
    missing = f"no synthetic data at {root} (run `realfake generate` first, or set train.synthetic)"
    rows = []
    for url, label in scan_mapped_folder(root, class_dirs, cfg, f"synthetic set {root}", missing):
        match = _COPY_RE.search(os.path.splitext(url.rsplit("/", 1)[-1])[0])
        rows.append({"url": url, "label": label, "copy_idx": int(match.group(1)) if match else 0})
    return rows


def synthetic_rows(cfg: RunConfig, class_dirs: list[str]) -> list[dict]:
    """Rows ``{url, label, copy_idx}`` of the synthetic set, from its manifest when present (labels from
    it) else from its folders; only copies ``< train.synthetic_mult`` when that is set.

    Raises :class:`DatasetError` naming folders that are not real classes, or for an empty set.
    """

    parts = part_files(synthetic_manifest_dir(cfg))
    if parts:
        table = read_parts(synthetic_manifest_dir(cfg))
        missing = {"path", "label", "class_dir"} - set(table.column_names)
        if missing:
            raise DatasetError(f"synthetic manifest {synthetic_manifest_dir(cfg)}: missing column(s) {sorted(missing)}")
        rows = _manifest_rows(cfg, class_dirs, table)
    else:
        rows = _folder_rows(cfg, class_dirs)
    if cfg.train.synthetic_mult is not None:
        rows = [r for r in rows if r["copy_idx"] < cfg.train.synthetic_mult]
    if not rows:
        raise DatasetError(f"synthetic set {synthetic_root(cfg)} is empty (train.synthetic_mult={cfg.train.synthetic_mult})")
    return rows


def rows_digest(rows: list[dict]) -> str:
    """sha256 of the sorted ``url<TAB>label`` lines: the identity of a labelled image list."""
    lines = sorted(f"{r['url']}\t{r['label']}" for r in rows)
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


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


def decode_rows(batch: dict[str, np.ndarray], size: int, view: str = "centre", settings: dict | None = None) -> dict[str, np.ndarray]:
    """CPU task: read + decode each ``url`` and cut its ``view`` (``centre``: the latent bank's resize +
    centre crop; ``train``: seeded :class:`~realfake_ray.method.classifier.TrainView`; ``eval``: resize to
    ⌊S/crop_pct⌋ + centre crop; ``settings`` from :func:`view_settings`) into ``pixels`` uint8 [S,S,3].
    Drops the ``url``/``aug``/``copy_idx`` columns and undecodable rows (named)."""

    make, n = _view_fn(view, size, settings or view_settings(RunConfig())), len(batch["url"])
    pixels, ok, bad = np.zeros((n, size, size, 3), np.uint8), np.ones(n, bool), []
    for i, url in enumerate(batch["url"]):
        try:
            pixels[i] = make(open_rgb(storage.read_bytes(url)), i, batch)
        except Exception as exc:  # a bad file is skipped and named, never fatal
            ok[i] = False
            bad.append(f"{url}: {type(exc).__name__}: {exc}"[:300])
    if bad:
        print(f"[realfake] skipped {len(bad)} undecodable image(s): {'; '.join(bad[:3])}")
    keep = {k: np.asarray(v)[ok] for k, v in batch.items() if k not in ("url", "copy_idx", "aug")}
    return {**keep, "pixels": pixels[ok]}


def rows_dataset(rows: list[dict], rows_per_block: int = 256):
    """A Ray Dataset of plain rows (blocks of about ``rows_per_block``)."""
    import ray.data

    return ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // rows_per_block, 200)))


def decoded_dataset(ds, size: int, cfg: RunConfig, view: str = "centre"):
    """``ds`` (rows with ``url``; ``aug`` for the train view) → ``pixels`` uint8 [S,S,3] on CPU tasks."""
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    kwargs = {"size": size, "view": view, "settings": view_settings(cfg)}
    return ds.map_batches(decode_rows, batch_size=64, fn_kwargs=kwargs, num_cpus=cfg.train.decode_cpus)

