"""The workers of the generate stage (Ray Data batch functions and the actor; no Ray import): load each planned
shard's bank rows, synthesise its images batch by batch with the sampler, JPEG-encode them while the next batch
samples, and write the shard (one Parquet file, atomically) from the actor — pixels never travel through the
object store. ``driver.py`` wires them into one Ray Data pipeline; :func:`generate_in_process` runs the same
code without Ray (the audits, the benchmarks).

Example:
    >>> out = generate_in_process(cfg, spec, units)  # doctest: +SKIP
    >>> out.images.shape  # doctest: +SKIP
    (512, 32, 32, 3)
"""

from __future__ import annotations

import logging
import io
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from realfake_ray import storage
from realfake_ray._internal.faults import fault_at, hold_while_driver_lives, kill_driver
from realfake_ray._internal.quiet import quiet_libraries
from realfake_ray._internal.shards import tensor_column
from realfake_ray.config import RunConfig
from realfake_ray.data.synthetic import list_shards, shard_bytes, shard_table
from realfake_ray.devices import torch_device
from realfake_ray.method.prompts import GENERATION_SUFFIX, build_prompt
from realfake_ray.method.sampler import Sampler, latent_hw
from realfake_ray.method.speedups import apply_speedup
from realfake_ray.models import loading
from realfake_ray.stages.generate.plan import image_seed, local_lora_dir, sampler_settings, synthetic_path, unit_rows

__all__ = ["load_units", "SynthesisActor", "GeneratedSet", "generate_in_process", "encode_jpeg", "SUMMARY_KEYS"]

log = logging.getLogger(__name__)

_BATCH_SCHEMA = pa.schema(
    [("copy_idx", pa.int64()), ("shard", pa.string())]
    + [(c, pa.list_(pa.string())) for c in ("image_id", "class_dir", "path", "prompt")]
    + [(c, pa.list_(pa.int64())) for c in ("label", "seed")]
    + [(c, pa.large_binary()) for c in ("latent_mean", "latent_std", "clip_embed")]
)


def _batch_row(chunk: pa.Table, copy_idx: int, seed: int, collisions: frozenset[str], shard: str = "") -> dict:
    """One shard (or generation batch) as one row: per-image lists, and the tensors as float16 bytes (b"" if unused)."""

    ids, class_dirs = chunk.column("image_id").to_pylist(), chunk.column("class_dir").to_pylist()
    names, captions = chunk.column("class_name").to_pylist(), chunk.column("caption").to_pylist()
    row = {
        "copy_idx": copy_idx,
        "shard": shard,
        "image_id": ids,
        "class_dir": class_dirs,
        "path": [synthetic_path(c, i, copy_idx, i in collisions) for c, i in zip(class_dirs, ids)],
        "prompt": [build_prompt(n, c, GENERATION_SUFFIX) for n, c in zip(names, captions)],
        "label": [int(x) for x in chunk.column("label").to_pylist()],
        "seed": [image_seed(seed, i, copy_idx) for i in ids],
    }
    for column in ("latent_mean", "latent_std", "clip_embed"):
        present = column in chunk.column_names
        row[column] = tensor_column(chunk, column, np.float16).tobytes() if present else b""
    return row


def load_units(units: pa.Table, *, seed: int, mode: str, vision_token: str, collisions: frozenset[str],
               batch_size: int | None = None) -> pa.Table:
    """CPU task: read each unit's bank rows; one output row per unit (a shard), or per generation batch of
    ``batch_size`` images when given (in-process generation)."""
    columns = ["image_id", "label", "class_dir", "class_name", "caption"]
    columns += ["latent_mean", "latent_std"] if mode == "img2img" else []
    columns += ["clip_embed"] if vision_token == "image" else []
    rows, cache = [], {}
    for unit in units.to_pylist():
        if unit["file"] not in cache:  # units of one file are adjacent: keep only the last file
            with storage.open_file(unit["file"]) as f:
                cache = {unit["file"]: pq.read_table(f, columns=columns)}
        indices = unit_rows(unit)
        step = batch_size or max(1, len(indices))
        for start in range(0, len(indices), step):
            chunk = cache[unit["file"]].take(pa.array(indices[start : start + step], type=pa.int32()))
            rows.append(_batch_row(chunk, int(unit["copy_idx"]), seed, collisions, unit.get("shard") or ""))
    return pa.Table.from_pylist(rows, schema=_BATCH_SCHEMA)


SUMMARY_KEYS = ("shard", "copy_idx", "written", "failed", "error", "sampler_s", "bytes", "actor", "load_s",
                "first_batch_s", "first_batch_at")


class SynthesisActor:
    """Actor: loads the pipeline once and fuses the LoRA; for each planned shard it samples the shard's images in
    generation batches of ``generate.batch_size`` (JPEG encoding of one batch overlaps the sampling of the next)
    and writes the shard atomically. Returns one summary row per shard.

    A batch that raises (bad row, CUDA OOM, ...) fails its shard: nothing is written for it and its row says
    so, so a rerun regenerates exactly that shard — never a crashed job, never a partial shard.

    Example::

        ds.map_batches(SynthesisActor, fn_constructor_args=(cfg, spec), batch_size=1, batch_format="pyarrow", ...)
    """

    def __init__(self, cfg: RunConfig, spec: dict):
        import torch

        self.started = time.time()
        quiet_libraries()  # no per-component loading bars or LoRA-prefix notices, one set per actor
        device = torch_device().type
        model_dir = loading.resolve_model_dir(cfg.model.pretrained, cfg.model.revision, cfg.model.hub_timeout_s)
        pipe = loading.load_pipeline(model_dir)
        lora = local_lora_dir(spec["lora_url"], spec["lora_sha256"]) if spec["lora_url"] else None
        settings = sampler_settings(cfg.generate, device)
        self.sampler = Sampler.from_pipeline(pipe, settings, device, lora_dir=lora, lora_scale=cfg.generate.lora_scale)
        self.undo_speedup = apply_speedup(self.sampler, cfg.generate.speedup)
        self.latent_shape = tuple(int(d) for d in spec["latent_shape"])
        hw = self.latent_shape[1:] if settings.mode == "img2img" else latent_hw(pipe)
        factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        self.image_shape = (hw[0] * factor, hw[1] * factor, 3)
        self.vision_token = cfg.generate.vision_token
        means = spec.get("class_means")
        self.class_means = torch.from_numpy(np.asarray(means, dtype=np.float32)) if means is not None else None
        g = cfg.generate
        self.batch_size, self.quality, self.storage_size = g.batch_size, g.jpeg_quality, g.storage_size
        self.shards_dir, self.settings = spec.get("shards_dir"), spec.get("settings") or {}
        self.class_dirs = list(spec.get("class_dirs") or [])
        self.fail_copy = fault_at("generate.sampler_error")  # tests only (_internal.faults); None in production
        self.kill_after = fault_at("generate.shard")
        self.hold_after = fault_at("generate.shard_hold")
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.load_s = time.time() - self.started
        self.first_batch_s: float | None = None
        self.lock = threading.Lock()  # the Sampler's scheduler is stateful: one call at a time, even if Ray
        # Data is configured to run several actor calls concurrently
        self.encoder = ThreadPoolExecutor(max_workers=2, thread_name_prefix="jpeg")

    def _inputs(self, row: dict, start: int, stop: int) -> dict:
        import torch

        n = len(row["image_id"])
        inputs = {"prompts": row["prompt"][start:stop], "seeds": row["seed"][start:stop]}

        def tensor(column: str, shape: tuple) -> torch.Tensor:
            return torch.from_numpy(np.frombuffer(row[column], np.float16).reshape(n, *shape)[start:stop].copy())

        if self.sampler.settings.mode == "img2img":
            inputs["latent_mean"] = tensor("latent_mean", self.latent_shape)
            inputs["latent_std"] = tensor("latent_std", self.latent_shape)
        if self.vision_token == "image":
            inputs["vision_tokens"] = tensor("clip_embed", (-1,))
        elif self.vision_token == "class_mean":
            inputs["vision_tokens"] = self.class_means[torch.tensor(row["label"][start:stop])]
        return inputs

    def sample(self, row: dict, start: int, stop: int) -> np.ndarray:
        """uint8 ``[stop - start, H, W, 3]``: images ``start:stop`` of a shard row (one generation batch)."""
        if row["copy_idx"] == self.fail_copy:
            raise RuntimeError(f"injected sampler error (REALFAKE_FAULT=generate.sampler_error:{self.fail_copy})")
        with self.lock:
            images = self.sampler(**self._inputs(row, start, stop))
        if self.first_batch_s is None:
            self.first_batch_s = time.time() - self.started
        return images

    def _jpegs(self, row: dict) -> tuple[list[bytes], float]:
        """Every image of a shard row as JPEG bytes, and the seconds spent sampling."""
        n, futures, sampler_s = len(row["image_id"]), [], 0.0
        for start in range(0, n, self.batch_size):
            began = time.perf_counter()
            images = self.sample(row, start, min(n, start + self.batch_size))
            sampler_s += time.perf_counter() - began
            futures.append(self.encoder.submit(lambda b: [encode_jpeg(i, self.quality, self.storage_size) for i in b], images))
        return [jpeg for f in futures for jpeg in f.result()], sampler_s

    def write_shard(self, row: dict) -> dict:
        """Sample, encode and write one shard; its summary row (``failed`` = all its images on any error)."""
        n = len(row["image_id"])
        summary = {"shard": row["shard"], "copy_idx": row["copy_idx"], "written": 0, "failed": 0, "error": "",
                   "sampler_s": 0.0, "bytes": 0, "actor": self.name, "load_s": self.load_s, "first_batch_s": None,
                   "first_batch_at": None}
        try:
            jpegs, summary["sampler_s"] = self._jpegs(row)
            provenance = {k: row[k] for k in ("image_id", "class_dir", "seed", "prompt")} | {"copy_idx": [row["copy_idx"]] * n}
            table = shard_table(jpegs, row["path"], row["label"], provenance, self.settings, self.class_dirs)
            data = shard_bytes(table)
            storage.write_bytes(storage.join(self.shards_dir, row["shard"]), data)
            summary.update(written=n, bytes=len(data))
        except Exception as exc:  # reported per shard; the shard stays missing and a rerun regenerates it
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            summary.update(failed=n, error=f"{type(exc).__name__}: {exc}"[:500])
            log.warning(f"shard {row['shard']} ({n} images) failed: {summary['error']}")
        summary["first_batch_s"] = self.first_batch_s
        summary["first_batch_at"] = None if self.first_batch_s is None else self.started + self.first_batch_s
        if self.kill_after and summary["written"] and len(list_shards(self.shards_dir).urls) >= self.kill_after:
            kill_driver()
        if self.hold_after and summary["written"] and len(list_shards(self.shards_dir).urls) >= self.hold_after:
            hold_while_driver_lives(f"generate.shard_hold:{self.hold_after}")
        return summary

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        rows = [self.write_shard(row) for row in batch.to_pylist()]
        out = {k: np.array([r[k] for r in rows], dtype=object) for k in SUMMARY_KEYS}
        for key, dtype in (("copy_idx", np.int64), ("written", np.int64), ("failed", np.int64), ("bytes", np.int64),
                           ("sampler_s", np.float64), ("load_s", np.float64)):
            out[key] = np.array([r[key] for r in rows], dtype)
        for key in ("first_batch_s", "first_batch_at"):
            out[key] = np.array([np.nan if r[key] is None else r[key] for r in rows], dtype=np.float64)
        return out


class GeneratedSet(NamedTuple):
    images: np.ndarray  # uint8 [N, H, W, 3]
    labels: np.ndarray
    images_per_s: float
    actor: Any  # the SynthesisActor that made them (its sampler's settings; FLOP accounting)


def generate_in_process(cfg: RunConfig, spec: dict, units: list[dict]) -> GeneratedSet:
    """``(images, labels, images/s, actor)`` for the bank rows of ``units`` (see :func:`plan_units`), generated in this
    process with ``cfg.generate`` through the stage's own batching and :class:`SynthesisActor` (``spec`` as the
    actor's). For sampler tuning and audits; nothing is written. images/s is the median over the largest
    batches after the first (an untimed warm-up, unless it is the only one), so that one disturbed batch
    does not move it."""
    g = cfg.generate
    batches = load_units(pa.Table.from_pylist(units), seed=cfg.seed, batch_size=g.batch_size, mode=g.mode,
                         vision_token=g.vision_token, collisions=frozenset())
    actor = SynthesisActor(cfg, spec)
    images, labels, timings = [], [], []
    for row in batches.to_pylist():
        started = time.perf_counter()
        generated = actor.sample(row, 0, len(row["image_id"]))
        timings.append((len(generated), max(time.perf_counter() - started, 1e-9)))
        images.append(generated)
        labels.append(np.asarray(row["label"], dtype=np.int64))
    timed = timings[1:] or timings
    largest = max(n for n, _ in timed)
    speed = float(np.median([n / s for n, s in timed if n == largest]))
    return GeneratedSet(np.concatenate(images), np.concatenate(labels), speed, actor)


def encode_jpeg(image: np.ndarray, quality: int, storage_size: int | None = None) -> bytes:
    """JPEG bytes of a uint8 ``[H, W, 3]`` image, optionally resized (Lanczos) so its short side is ``storage_size``.

    Example:
        >>> encode_jpeg(np.zeros((32, 32, 3), np.uint8), 90)[:2]
        b'\\xff\\xd8'
    """
    from PIL import Image

    pil = Image.fromarray(image)
    if storage_size and min(pil.size) != storage_size:
        scale = storage_size / min(pil.size)
        pil = pil.resize((max(1, round(pil.width * scale)), max(1, round(pil.height * scale))), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
