"""Encode stage: real dataset (any layout of ``realfake_ray.data.sources``) → latent bank (VAE posterior, CLIP
image embedding, caption).

Ray Data pipeline: pending images planned on the driver (Arrow columns, or the shards holding them) → CPU
read + decode/resize tasks → encoder actor pool (VAE + CLIP vision loaded once per actor) → Parquet part files
under ``<out>/latents/<split>/``. Reruns encode only images not yet in the bank. The training images' captions
come from ``data.captions_file`` or, without one, from the caption stage's ``<out>/captions/captions.jsonl``
(``realfake_ray.data.captions``).

Example:
    >>> from realfake_ray.config import load_config
    >>> from realfake_ray.stages.encode.driver import run_encode
    >>> summary = run_encode(load_config(preset="tiny", out="runs/tiny"))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from realfake_ray import storage
from realfake_ray._internal.cluster import actor_pool_kwargs, init_ray
from realfake_ray._internal.lease import takes_run_lease
from realfake_ray._internal.shards import read_parts, write_part
from realfake_ray.bank import read_meta, with_arrow_tensors
from realfake_ray.config import RunConfig
from realfake_ray.data.captions import (
    MIN_CAPTION_MATCH,
    caption_match_error,
    missing_captions_error,
    read_captions,
    training_captions_url,
)
from realfake_ray.data.imagefolder import decode_views
from realfake_ray.data.labelled import image_rows, not_in, pending_dataset, real_set, real_train_set
from realfake_ray.data.sources import LabelledSet, check_readable, fetch_images
from realfake_ray.method.embeddings import ClipEmbedder
from realfake_ray.layout import RunLayout
from realfake_ray.models import loading

__all__ = ["run_encode"]

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
BANK_FORMAT = 2  # 2: + the fine-tuning view (full_latent_*); banks of format 1 must be re-encoded
BANK_COLUMNS = (
    "image_id", "label", "class_dir", "class_name", "caption", "latent_mean", "latent_std", "clip_embed",
    "full_latent_mean", "full_latent_std", "full_latent_h", "full_latent_w", "width", "height",
)


# --------------------------------------------------------------------------------------- planning


def scan_splits(cfg: RunConfig) -> dict[str, LabelledSet]:
    """List and check the train (and val) sets, the train set's classes defining the labels."""
    d = cfg.require_data()
    splits = {"train": real_train_set(cfg)}
    if d.val:
        splits["val"] = real_set(d.val, cfg, splits["train"].class_dirs, d.val_labels)
    for lset in splits.values():
        check_readable(lset)
    if not d.classes_file and splits["train"].class_names == [n.replace("_", " ") for n in splits["train"].class_dirs]:
        names = splits["train"].class_names
        log.warning(f"no data.classes_file, so the prompts name classes by their folders "
                    f"(\"photo of {names[0]}\"{', ...' if len(names) > 1 else ''}); for readable names pass "
                    "--set data.classes_file=URL (JSON {folder: name} or lines 'folder name'; "
                    "imagenet1k names ImageNet's synset folders)")
    return splits


def model_identity(cfg: RunConfig) -> dict:
    """Resolve and check the models on the driver; the part of the result that identifies the VAE."""
    model_dir = loading.resolve_model_dir(cfg.model.pretrained, cfg.model.revision, cfg.model.hub_timeout_s)
    clip_dir = loading.clip_vision_dir(model_dir, cfg.model.clip_vision, cfg.model.hub_timeout_s)
    info = loading.check_models(model_dir, clip_dir)
    return {
        "pretrained": cfg.model.pretrained,
        "clip_vision": cfg.model.clip_vision if not clip_dir.startswith(model_dir) else "image_encoder",
        "vae_sha256": info["vae_sha256"],
        "scaling_factor": info["scaling_factor"],
        "latent_channels": info["latent_channels"],
        "vae_downsample": info["vae_downsample"],
    }


def _train_subset(cfg: RunConfig) -> dict | None:
    """What selects the train images of a data-scarce run (``data.train_per_class`` and the seed that draws it)."""
    k = cfg.require_data().train_per_class
    return None if k is None else {"per_class": k, "seed": cfg.seed}


def _check_bank_compatible(meta: dict | None, identity: dict, cfg: RunConfig) -> None:
    if not meta:
        return
    if meta.get("train_subset") != _train_subset(cfg):
        raise ValueError(
            f"the latent bank at {RunLayout(cfg.out).bank_dir()} holds the train images of train_subset "
            f"{meta.get('train_subset')} (data.train_per_class, seed), this run asks for {_train_subset(cfg)}; "
            "use a new --out for another subset"
        )
    view = meta.get("generation_view", "centre")
    if (meta["model"]["vae_sha256"] != identity["vae_sha256"] or meta["resolution"] != cfg.encode.resolution
            or meta.get("format", 1) != BANK_FORMAT or view != cfg.encode.generation_view):
        raise ValueError(
            f"the latent bank at {RunLayout(cfg.out).bank_dir()} was encoded with another VAE, resolution, view or bank format "
            f"({meta['model']['pretrained']} @ {meta['resolution']} px, generation view {view}, format "
            f"{meta.get('format', 1)}); use a new --out or delete it"
        )


def training_captions(cfg: RunConfig) -> tuple[str | None, pa.Table | None]:
    """The training images' captions file (``data.captions_file``, else the caption stage's JSONL, else None) and
    its ``image_id``, ``caption`` table; refuses to start, naming the caption stage, when that stage's JSONL is
    needed and not there."""
    url = training_captions_url(cfg)
    if url is None:
        return None, None
    if not cfg.data.captions_file and not storage.exists(url):
        raise missing_captions_error(url)
    return url, read_captions(url)


def _caption_column(ids: pa.Array, captions: pa.Table | None, captions_url: str | None,
                    lset: LabelledSet) -> tuple[pa.Array, float | None]:
    """Each id's caption ("" without one) and the fraction of ids that have one (None without a captions file);
    refuses a captions file that matches fewer than half of the images."""
    if captions is None:
        return pa.array([""] * len(ids), pa.string()), None
    position = pc.index_in(ids, value_set=captions["image_id"].combine_chunks())
    matched = len(ids) - position.null_count
    if matched < MIN_CAPTION_MATCH * len(ids):
        raise caption_match_error(captions_url, lset.url, matched, len(ids), ids[0].as_py())
    return pc.fill_null(pc.take(captions["caption"].combine_chunks(), position), ""), matched / max(len(ids), 1)


def _done_ids(out: str, split: str) -> pa.Array:
    tables = [t for t in (read_parts(RunLayout(out).bank_dir(split), ["image_id"]),
                          read_parts(RunLayout(out).skipped_dir(split), ["image_id"])) if t is not None]
    return pa.concat_tables(tables)["image_id"].combine_chunks() if tables else pa.array([], pa.string())


def pending_rows(lset: LabelledSet, split: str, out: str, captions: pa.Table | None,
                 captions_url: str | None = None) -> tuple[pa.Table, float | None]:
    """The images of ``lset`` not yet in the bank (nor listed as unreadable) — ``image_id``, ``url`` (per-image
    layouts; the shard's URL otherwise), ``label``, ``caption``, ``split``: Arrow columns — and the fraction of
    the set's images ``captions`` (read from ``captions_url``) covers."""
    table = image_rows(lset)
    caption, matched = _caption_column(table["image_id"].combine_chunks(), captions, captions_url, lset)
    table = not_in(table.append_column("caption", caption), _done_ids(out, split))
    return table.append_column("split", pa.array([split] * table.num_rows, pa.string())), matched


# --------------------------------------------------------------------------------------- workers


def decode_batch(batch: dict[str, np.ndarray], resolution: int, view: str = "squash", multiple: int = 8) -> dict[str, np.ndarray]:
    """CPU stage: decode each image (its ``bytes``, or read from its ``url`` — concurrently, with retries) into its
    two views (``data.imagefolder.decode_views``): the generation view ``pixels`` [res, res, 3] and the
    fine-tuning view ``full_pixels`` (uint8 bytes of ``full_h`` × ``full_w`` × 3). Unreadable or undecodable
    images get an ``error`` and blank views."""
    if "bytes" not in batch:
        batch = fetch_images(batch)
    n = len(batch["url"])
    pixels = np.zeros((n, resolution, resolution, 3), dtype=np.uint8)
    full = np.empty(n, dtype=object)
    full[:] = [pixels[0].tobytes()] * n  # not np.full: it stores a bytes fill value as b""
    full_h, full_w = np.full(n, resolution, dtype=np.int32), np.full(n, resolution, dtype=np.int32)
    width, height = np.zeros(n, dtype=np.int32), np.zeros(n, dtype=np.int32)
    errors = np.array([e or "" for e in batch.get("error", [""] * n)], dtype=object)
    for i, data in enumerate(batch["bytes"]):
        if errors[i]:
            continue
        try:
            pixels[i], whole, width[i], height[i] = decode_views(data, resolution, view, multiple)
            full[i], (full_h[i], full_w[i]) = whole.tobytes(), whole.shape[:2]
        except Exception as exc:  # a bad file is counted and listed, never fatal
            errors[i] = f"{type(exc).__name__}: {exc}"[:300]
    kept = {k: v for k, v in batch.items() if k not in ("bytes", "error")}
    return {**kept, "pixels": pixels, "full_pixels": full, "full_h": full_h, "full_w": full_w, "width": width,
            "height": height, "error": errors}


def with_classes(batch: dict[str, np.ndarray], class_dirs: list[str], class_names: list[str]) -> dict[str, np.ndarray]:
    """``class_dir`` and ``class_name`` of each row's ``label``."""
    labels = np.asarray(batch["label"], dtype=np.int64)
    dirs, names = np.array(class_dirs, dtype=object), np.array(class_names, dtype=object)
    return {**batch, "label": labels, "class_dir": dirs[labels], "class_name": names[labels]}


def full_images(batch: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The fine-tuning views of a decoded batch as uint8 ``[H, W, 3]`` arrays."""
    return [np.frombuffer(b, np.uint8).reshape(int(h), int(w), 3).copy()  # writable: torch.from_numpy warns otherwise
            for b, h, w in zip(batch["full_pixels"], batch["full_h"], batch["full_w"])]


class LatentEncoder:
    """Actor: loads the VAE and the CLIP vision model once, encodes batches of decoded images.

    Per image: the VAE posterior of the generation view (``latent_mean``/``latent_std`` [C, h, w]) and of the
    fine-tuning view (``full_latent_mean``/``full_latent_std``: float16 bytes of C × ``full_latent_h`` ×
    ``full_latent_w``; views of one shape are encoded together, and a view equal to the generation view —
    any square image — reuses its latent), and the CLIP embedding of the fine-tuning view (CLIP's own
    resize and centre crop, as the reference embeds the original image).
    """

    def __init__(self, cfg: RunConfig):
        model_dir = loading.resolve_model_dir(cfg.model.pretrained, cfg.model.revision, cfg.model.hub_timeout_s)
        self.clip = ClipEmbedder(cfg)
        self.device, self.dtype = self.clip.device, self.clip.dtype
        self.vae = loading.load_vae(model_dir, torch_dtype=self.dtype).to(self.device).eval()
        self.scaling = float(self.vae.config.scaling_factor)

    def _posterior(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 ``[B, H, W, 3]`` → float16 posterior mean and std × the scaling factor ``[B, C, h, w]``."""
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(pixels).to(self.device).permute(0, 3, 1, 2).to(self.dtype) / 127.5 - 1.0
            posterior = self.vae.encode(x).latent_dist
            mean = (posterior.mean * self.scaling).float().cpu().numpy().astype(np.float16)
            std = (posterior.std * self.scaling).float().cpu().numpy().astype(np.float16)
        return mean, std

    def _full_latents(self, pixels: np.ndarray, views: list[np.ndarray], mean: np.ndarray, std: np.ndarray):
        n = len(views)
        full_mean, full_std = np.empty(n, dtype=object), np.empty(n, dtype=object)
        shapes = np.zeros((n, 2), dtype=np.int32)
        todo: dict[tuple, list[int]] = {}
        for i, view in enumerate(views):
            if view.shape == pixels[i].shape and np.array_equal(view, pixels[i]):
                full_mean[i], full_std[i], shapes[i] = mean[i].tobytes(), std[i].tobytes(), mean[i].shape[1:]
            else:
                todo.setdefault(view.shape, []).append(i)
        for group in todo.values():
            m, s = self._posterior(np.stack([views[i] for i in group]))
            for j, i in enumerate(group):
                full_mean[i], full_std[i], shapes[i] = m[j].tobytes(), s[j].tobytes(), m[j].shape[1:]
        return full_mean, full_std, shapes

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels, views = batch.pop("pixels"), full_images(batch)
        for key in ("full_pixels", "full_h", "full_w"):
            batch.pop(key)
        mean, std = self._posterior(pixels)
        full_mean, full_std, shapes = self._full_latents(pixels, views, mean, std)
        return {**batch, "latent_mean": mean, "latent_std": std, "clip_embed": self.clip.embed(views),
                "full_latent_mean": full_mean, "full_latent_std": full_std,
                "full_latent_h": shapes[:, 0], "full_latent_w": shapes[:, 1]}


def write_bank_batch(batch: pa.Table, out: str) -> dict[str, np.ndarray]:
    """Writer task: one part file per split present in the batch (bank rows and skipped rows)."""
    import pyarrow.compute as pc

    written = []
    for split in SPLITS:
        rows = batch.filter(pc.equal(batch["split"], split))
        if rows.num_rows == 0:
            continue
        ok = pc.equal(rows["error"], "")
        good, bad = rows.filter(ok), rows.filter(pc.invert(ok))
        if good.num_rows:
            write_part(RunLayout(out).bank_dir(split), with_arrow_tensors(good.select(list(BANK_COLUMNS))))
        if bad.num_rows:
            write_part(RunLayout(out).skipped_dir(split), bad.select(["image_id", "url", "error"]))
        written.append((split, good.num_rows, bad.num_rows))
    return {
        "split": np.array([w[0] for w in written], dtype=object),
        "encoded": np.array([w[1] for w in written]),
        "skipped": np.array([w[2] for w in written]),
    }


# --------------------------------------------------------------------------------------- driver


def _split_dataset(lset: LabelledSet, pending: pa.Table, cfg: RunConfig, multiple: int, class_dirs, class_names):
    enc = cfg.encode
    ds = pending_dataset(lset, pending, enc.batch_size, enc.decode_cpus)
    ds = ds.map_batches(with_classes, batch_size=enc.batch_size, num_cpus=enc.decode_cpus,
                        fn_kwargs={"class_dirs": class_dirs, "class_names": class_names})
    return ds.map_batches(decode_batch, batch_size=enc.batch_size, num_cpus=enc.decode_cpus,
                          fn_kwargs={"resolution": enc.resolution, "view": enc.generation_view, "multiple": multiple})


def build_pipeline(pending: dict[str, tuple[LabelledSet, pa.Table]], cfg: RunConfig, multiple: int = 8):
    """The Ray Data plan for the pending images of each split (not executed); ``multiple``: pixels per latent cell."""
    enc = cfg.encode
    train = pending.get("train", next(iter(pending.values())))[0]
    parts = [_split_dataset(lset, rows, cfg, multiple, train.class_dirs, train.class_names)
             for lset, rows in pending.values() if rows.num_rows]
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    ds = ds.map_batches(LatentEncoder, batch_size=enc.batch_size, fn_constructor_args=(cfg,),
                        **actor_pool_kwargs(enc.actors, "encode.actors", reserve_cpus=enc.decode_cpus))
    return ds.map_batches(
        write_bank_batch, batch_format="pyarrow", batch_size=enc.rows_per_file, fn_kwargs={"out": cfg.out}
    )


def _split_summary(out: str, split: str) -> dict:
    skipped = read_parts(RunLayout(out).skipped_dir(split), ["image_id", "error"])
    skipped_rows = skipped.to_pylist()[:1000] if skipped is not None else []
    bank = read_parts(RunLayout(out).bank_dir(split), ["image_id"])
    return {"rows": bank.num_rows if bank is not None else 0, "skipped": skipped.num_rows if skipped is not None else 0,
            "skipped_files": skipped_rows}


@takes_run_lease
def run_encode(cfg: RunConfig) -> dict:
    """Encode every real image not yet in the bank; write ``_meta.json``; return the summary."""

    started = time.time()
    splits = scan_splits(cfg)
    captions_url, captions = training_captions(cfg)  # prompts are made from the train bank: val gets none
    identity = model_identity(cfg)
    # _meta.json is written at the end; the identity file guards a bank whose first run was cut off.
    identity_url = storage.join(RunLayout(cfg.out).bank_dir(), "_identity.json")
    started_with = storage.read_json(identity_url) if storage.exists(identity_url) else None
    previous = read_meta(cfg.out)
    _check_bank_compatible(previous or started_with, identity, cfg)
    planned = {name: pending_rows(lset, name, cfg.out, captions if name == "train" else None, captions_url)
               for name, lset in splits.items()}
    todo = sum(rows.num_rows for rows, _ in planned.values())
    if not todo and previous and previous.get("complete"):
        return {**previous, "skipped": True}  # nothing to do: the record (and its measured rate) stays
    if todo:
        storage.write_json(identity_url, {"model": identity, "resolution": cfg.encode.resolution, "format": BANK_FORMAT,
                                          "generation_view": cfg.encode.generation_view, "train_subset": _train_subset(cfg)})
        init_ray(cfg.ray)
        pending = {name: (splits[name], rows) for name, (rows, _) in planned.items()}
        ds = build_pipeline(pending, cfg, identity["vae_downsample"])
        # In listing order every operator bundles the same rows into the same batches on every run, so the part files
        # (named by content) are the same: fine-tuning's shuffle and generate's shards follow the bank's files.
        ds.context.execution_options.preserve_order = True
        ds.materialize()
    elapsed = time.time() - started
    train = splits["train"]
    meta = {
        "format": BANK_FORMAT,
        "model": identity,
        "resolution": cfg.encode.resolution,
        "generation_view": cfg.encode.generation_view,
        "train_subset": _train_subset(cfg),
        "scaling_factor": identity["scaling_factor"],
        "latent_shape": [identity["latent_channels"], *(2 * [cfg.encode.resolution // identity["vae_downsample"]])],
        "class_dirs": train.class_dirs,
        "class_names": train.class_names,
        "class_names_from": "classes_file" if cfg.data.classes_file else ("dataset" if train.sharded else "folder names"),
        "layouts": {name: lset.layout for name, lset in splits.items()},
        "captions_from": captions_url,  # the training images' captions file (None: no captions)
        "caption_match": {name: matched for name, (_, matched) in planned.items()},
        "splits": {name: _split_summary(cfg.out, name) for name in splits},
        "ignored_files": {name: lset.ignored[:1000] for name, lset in splits.items()},
        "last_run": {"encoded_now": todo, "seconds": round(elapsed, 2),
                     "images_per_s": round(todo / elapsed, 2) if todo else None},
        "complete": True,
    }
    storage.write_json(RunLayout(cfg.out).meta_url(), meta)
    return {**meta, "skipped": not todo}
