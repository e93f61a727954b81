"""Encode stage: real ImageFolder → latent bank (VAE posterior, CLIP image embedding, caption).

Ray Data pipeline: rows planned on the driver → CPU decode/resize tasks → [captioner actor pool] →
encoder actor pool (VAE + CLIP vision loaded once per actor) → Parquet part files under
``<out>/latents/<split>/``. Reruns encode only images not yet in the bank.

Example:
    >>> from realfake_ray.config import load_config
    >>> from realfake_ray.stages.encode.driver import run_encode
    >>> summary = run_encode(load_config(preset="tiny", out="runs/tiny"))  # doctest: +SKIP
"""

from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np
import pyarrow as pa

from realfake_ray import storage
from realfake_ray._internal.cluster import actor_pool_kwargs, init_ray
from realfake_ray._internal.shards import existing_keys, read_parts, write_part
from realfake_ray._internal.lease import takes_run_lease
from realfake_ray.bank import read_meta, with_arrow_tensors
from realfake_ray.config import RunConfig
from realfake_ray.data.imagefolder import ImageFolderIndex, decode_views, scan_image_folder
from realfake_ray.devices import torch_device
from realfake_ray.method.embeddings import ClipEmbedder
from realfake_ray.layout import RunLayout
from realfake_ray.models import loading

__all__ = ["run_encode"]

SPLITS = ("train", "val")
BANK_FORMAT = 2  # 2: + the fine-tuning view (full_latent_*); banks of format 1 must be re-encoded
BANK_COLUMNS = (
    "image_id", "label", "class_dir", "class_name", "caption", "latent_mean", "latent_std", "clip_embed",
    "full_latent_mean", "full_latent_std", "full_latent_h", "full_latent_w", "width", "height",
)


# --------------------------------------------------------------------------------------- planning


def scan_splits(cfg: RunConfig) -> dict[str, ImageFolderIndex]:
    """Scan the train (and val) ImageFolders, with the train split's classes defining the labels."""
    d = cfg.require_data()
    common = dict(classes_file=d.classes_file, captions_file=d.captions_file, extensions=d.extensions)
    splits = {"train": scan_image_folder(d.train, **common)}
    if d.val:
        splits["val"] = scan_image_folder(d.val, class_dirs=splits["train"].class_dirs, **common)
    if not d.classes_file:
        names = splits["train"].class_names
        print(f"[encode] warning: no data.classes_file, so the prompts name classes by their folders "
              f"(\"photo of {names[0]}\"{', ...' if len(names) > 1 else ''}); for readable names pass "
              "--set data.classes_file=URL (JSON {folder: name} or lines 'folder name')", flush=True)
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


def _check_bank_compatible(meta: dict | None, identity: dict, cfg: RunConfig) -> None:
    if not meta:
        return
    view = meta.get("generation_view", "centre")
    if (meta["model"]["vae_sha256"] != identity["vae_sha256"] or meta["resolution"] != cfg.encode.resolution
            or meta.get("format", 1) != BANK_FORMAT or view != cfg.encode.generation_view):
        raise ValueError(
            f"the latent bank at {RunLayout(cfg.out).bank_dir()} was encoded with another VAE, resolution, view or bank format "
            f"({meta['model']['pretrained']} @ {meta['resolution']} px, generation view {view}, format "
            f"{meta.get('format', 1)}); use a new --out or delete it"
        )


def _pending_rows(index: ImageFolderIndex, split: str, out: str) -> list[dict]:
    done = {k[0] for k in _keys(RunLayout(out).bank_dir(split))} | {k[0] for k in _keys(RunLayout(out).skipped_dir(split))}
    return [dict(asdict(r), split=split) for r in index.records if r.image_id not in done]


def _keys(directory: str) -> set[tuple]:
    return existing_keys(directory, ["image_id"])


# --------------------------------------------------------------------------------------- workers


def decode_batch(batch: dict[str, np.ndarray], resolution: int, view: str = "squash", multiple: int = 8) -> dict[str, np.ndarray]:
    """CPU stage: read + decode each image into its two views (``data.imagefolder.decode_views``): the
    generation view ``pixels`` [res, res, 3] and the fine-tuning view ``full_pixels`` (uint8 bytes of
    ``full_h`` × ``full_w`` × 3). Undecodable files get an ``error`` and blank views."""
    n = len(batch["url"])
    pixels = np.zeros((n, resolution, resolution, 3), dtype=np.uint8)
    full = np.empty(n, dtype=object)
    full[:] = [pixels[0].tobytes()] * n  # not np.full: it stores a bytes fill value as b""
    full_h, full_w = np.full(n, resolution, dtype=np.int32), np.full(n, resolution, dtype=np.int32)
    width, height = np.zeros(n, dtype=np.int32), np.zeros(n, dtype=np.int32)
    errors = np.full(n, "", dtype=object)
    for i, url in enumerate(batch["url"]):
        try:
            pixels[i], whole, width[i], height[i] = decode_views(storage.read_bytes(url), resolution, view, multiple)
            full[i], (full_h[i], full_w[i]) = whole.tobytes(), whole.shape[:2]
        except Exception as exc:  # a bad file is counted and listed, never fatal
            errors[i] = f"{type(exc).__name__}: {exc}"[:300]
    return {**batch, "pixels": pixels, "full_pixels": full, "full_h": full_h, "full_w": full_w, "width": width,
            "height": height, "error": errors}


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


class Captioner:
    """Actor: an image-to-text model (default BLIP-2) fills empty captions."""

    def __init__(self, cfg: RunConfig):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model_dir = loading.resolve_model_dir(cfg.encode.captioner, None, cfg.model.hub_timeout_s)
        self.device = torch_device()
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.model = AutoModelForImageTextToText.from_pretrained(model_dir, torch_dtype=dtype).to(self.device).eval()
        self.dtype, self.max_tokens = dtype, cfg.encode.caption_max_tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        todo = [i for i, c in enumerate(batch["caption"]) if not c and not batch["error"][i]]
        if todo:
            inputs = self.processor(images=[batch["pixels"][i] for i in todo], return_tensors="pt")
            inputs = {k: v.to(self.device, self.dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}
            with torch.inference_mode():
                ids = self.model.generate(**inputs, max_new_tokens=self.max_tokens)
            captions = batch["caption"].copy()
            for i, text in zip(todo, self.processor.batch_decode(ids, skip_special_tokens=True)):
                captions[i] = text.strip()
            batch = {**batch, "caption": captions}
        return batch


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


def build_pipeline(rows: list[dict], cfg: RunConfig, multiple: int = 8):
    """The Ray Data plan for ``rows`` (not executed); ``multiple``: pixels per latent cell."""
    import ray.data

    enc = cfg.encode
    blocks = max(1, min(len(rows) // max(enc.batch_size, 1), 200))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    ds = ds.map_batches(
        decode_batch, batch_size=enc.batch_size, num_cpus=enc.decode_cpus,
        fn_kwargs={"resolution": enc.resolution, "view": enc.generation_view, "multiple": multiple},
    )
    if enc.caption and not cfg.data.captions_file:
        ds = ds.map_batches(
            Captioner, batch_size=enc.caption_batch_size, fn_constructor_args=(cfg,),
            **actor_pool_kwargs(enc.actors, "encode.actors"),
        )
    ds = ds.map_batches(LatentEncoder, batch_size=enc.batch_size, fn_constructor_args=(cfg,),
                        **actor_pool_kwargs(enc.actors, "encode.actors", reserve_cpus=enc.decode_cpus))
    return ds.map_batches(
        write_bank_batch, batch_format="pyarrow", batch_size=enc.rows_per_file, fn_kwargs={"out": cfg.out}
    )


def _split_summary(out: str, split: str) -> dict:
    skipped = read_parts(RunLayout(out).skipped_dir(split), ["image_id", "error"])
    skipped_rows = skipped.to_pylist() if skipped is not None else []
    return {"rows": len(_keys(RunLayout(out).bank_dir(split))), "skipped": len(skipped_rows), "skipped_files": skipped_rows}


@takes_run_lease
def run_encode(cfg: RunConfig) -> dict:
    """Encode every real image not yet in the bank; write ``_meta.json``; return the summary."""

    started = time.time()
    splits = scan_splits(cfg)
    identity = model_identity(cfg)
    # _meta.json is written at the end; the identity file guards a bank whose first run was cut off.
    identity_url = storage.join(RunLayout(cfg.out).bank_dir(), "_identity.json")
    started_with = storage.read_json(identity_url) if storage.exists(identity_url) else None
    previous = read_meta(cfg.out)
    _check_bank_compatible(previous or started_with, identity, cfg)
    rows = [row for name, index in splits.items() for row in _pending_rows(index, name, cfg.out)]
    if not rows and previous and previous.get("complete"):
        return {**previous, "skipped": True}  # nothing to do: the record (and its measured rate) stays
    if rows:
        storage.write_json(identity_url, {"model": identity, "resolution": cfg.encode.resolution, "format": BANK_FORMAT,
                                          "generation_view": cfg.encode.generation_view})
        init_ray(cfg.ray)
        build_pipeline(rows, cfg, identity["vae_downsample"]).materialize()
    elapsed = time.time() - started
    train = splits["train"]
    meta = {
        "format": BANK_FORMAT,
        "model": identity,
        "resolution": cfg.encode.resolution,
        "generation_view": cfg.encode.generation_view,
        "scaling_factor": identity["scaling_factor"],
        "latent_shape": [identity["latent_channels"], *(2 * [cfg.encode.resolution // identity["vae_downsample"]])],
        "class_dirs": train.class_dirs,
        "class_names": train.class_names,
        "class_names_from": "classes_file" if cfg.data.classes_file else "folder names",
        "caption_match": {name: index.caption_match for name, index in splits.items()},
        "splits": {name: _split_summary(cfg.out, name) for name in splits},
        "ignored_files": {name: index.ignored_files[:1000] for name, index in splits.items()},
        "last_run": {"encoded_now": len(rows), "seconds": round(elapsed, 2),
                     "images_per_s": round(len(rows) / elapsed, 2) if rows else None},
        "complete": True,
    }
    storage.write_json(RunLayout(cfg.out).meta_url(), meta)
    return {**meta, "skipped": not rows}
