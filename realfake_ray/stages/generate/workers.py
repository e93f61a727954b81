"""The workers of the generate stage (Ray Data batch functions and the actor; no Ray import): load units of bank
rows into generation batches, synthesise them with the sampler, JPEG-encode and write the images, write
manifest parts. ``generate.py`` wires them into one Ray Data pipeline; :func:`generate_in_process` runs
the same code without Ray (the audits, the benchmarks).

Example:
    >>> out = generate_in_process(cfg, spec, units)  # doctest: +SKIP
    >>> out.images.shape  # doctest: +SKIP
    (512, 32, 32, 3)
"""

from __future__ import annotations

import hashlib
import io
import threading
import time
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from realfake_ray import storage
from realfake_ray._internal.faults import hold_while_alive, kill_driver
from realfake_ray._internal.quiet import quiet_libraries
from realfake_ray._internal.shards import PART_PREFIX, part_files, tensor_column
from realfake_ray.method.speedups import apply_speedup
from realfake_ray.config import RunConfig
from realfake_ray.devices import torch_device
from realfake_ray.stages.generate.plan import (
    MANIFEST_COLUMNS,
    image_seed,
    local_lora_dir,
    sampler_settings,
    synthetic_path,
    unit_rows,
)
from realfake_ray.models import loading
from realfake_ray.method.prompts import GENERATION_SUFFIX, build_prompt
from realfake_ray.method.sampler import Sampler, latent_hw

__all__ = [
    "load_units", "SynthesisActor", "GeneratedSet", "generate_in_process", "encode_jpeg", "write_images",
    "write_manifest",
]

_BATCH_SCHEMA = pa.schema(
    [("copy_idx", pa.int64())]
    + [(c, pa.list_(pa.string())) for c in ("image_id", "class_dir", "path", "prompt")]
    + [(c, pa.list_(pa.int64())) for c in ("label", "seed")]
    + [(c, pa.large_binary()) for c in ("latent_mean", "latent_std", "clip_embed")]
)


def _batch_row(chunk: pa.Table, copy_idx: int, seed: int, collisions: frozenset[str]) -> dict:
    """One generation batch as one row: per-image lists, and the tensors as float16 bytes (b"" if unused)."""

    ids, class_dirs = chunk.column("image_id").to_pylist(), chunk.column("class_dir").to_pylist()
    names, captions = chunk.column("class_name").to_pylist(), chunk.column("caption").to_pylist()
    row = {
        "copy_idx": copy_idx,
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


def load_units(units: pa.Table, *, seed: int, batch_size: int, mode: str, vision_token: str, collisions: frozenset[str]) -> pa.Table:
    """CPU task: read each unit's bank rows; emit one row per generation batch of ``batch_size`` images."""
    columns = ["image_id", "label", "class_dir", "class_name", "caption"]
    columns += ["latent_mean", "latent_std"] if mode == "img2img" else []
    columns += ["clip_embed"] if vision_token == "image" else []
    batches, cache = [], {}
    for unit in units.to_pylist():
        if unit["file"] not in cache:  # units of one file are adjacent: keep only the last file
            with storage.open_file(unit["file"]) as f:
                cache = {unit["file"]: pq.read_table(f, columns=columns)}
        rows = unit_rows(unit)
        for start in range(0, len(rows), batch_size):
            chunk = cache[unit["file"]].take(pa.array(rows[start : start + batch_size], type=pa.int32()))
            batches.append(_batch_row(chunk, int(unit["copy_idx"]), seed, collisions))
    return pa.Table.from_pylist(batches, schema=_BATCH_SCHEMA)


class SynthesisActor:
    """Actor: loads the pipeline once, fuses the LoRA, turns each generation-batch row into images.

    A batch that raises (bad row, CUDA OOM, ...) is reported as failed rows with the error, not as a
    crashed job; those keys get no manifest row, so a rerun retries them.

    Example::

        ds.map_batches(SynthesisActor, fn_constructor_args=(cfg, spec), batch_size=1, batch_format="pyarrow", ...)
    """

    def __init__(self, cfg: RunConfig, spec: dict):
        import torch

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
        self.fail_copy = spec.get("fail_copy")  # tests only: _internal.faults generate.sampler_error
        self.lock = threading.Lock()  # the Sampler's scheduler is stateful: one call at a time, even if Ray
        # Data is configured to run several actor calls concurrently

    def _inputs(self, row: dict) -> dict:
        import torch

        n = len(row["image_id"])
        inputs = {"prompts": row["prompt"], "seeds": row["seed"]}
        if self.sampler.settings.mode == "img2img":
            shape = (n, *self.latent_shape)
            inputs["latent_mean"] = torch.from_numpy(np.frombuffer(row["latent_mean"], np.float16).reshape(shape).copy())
            inputs["latent_std"] = torch.from_numpy(np.frombuffer(row["latent_std"], np.float16).reshape(shape).copy())
        if self.vision_token == "image":
            inputs["vision_tokens"] = torch.from_numpy(np.frombuffer(row["clip_embed"], np.float16).reshape(n, -1).copy())
        elif self.vision_token == "class_mean":
            inputs["vision_tokens"] = self.class_means[torch.tensor(row["label"])]
        return inputs

    def _generate(self, row: dict) -> tuple[np.ndarray, str]:
        n = len(row["image_id"])
        try:
            if row["copy_idx"] == self.fail_copy:
                raise RuntimeError(f"injected sampler error (REALFAKE_FAULT=generate.sampler_error:{self.fail_copy})")
            with self.lock:
                return self.sampler(**self._inputs(row)), ""
        except Exception as exc:  # reported per image; the keys stay missing and a rerun retries them
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            error = f"{type(exc).__name__}: {exc}"[:500]
            print(f"[generate] batch of {n} failed: {error}", flush=True)
            return np.zeros((n, *self.image_shape), dtype=np.uint8), error

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        keys = ("path", "image_id", "label", "class_dir", "copy_idx", "seed", "prompt", "error", "sampler_s")
        parts: dict[str, list] = {k: [] for k in keys}
        images = []
        for row in batch.to_pylist():
            started = time.perf_counter()
            generated, error = self._generate(row)
            n = len(row["image_id"])
            images.append(generated)
            for key in ("path", "image_id", "label", "class_dir", "seed", "prompt"):
                parts[key].extend(row[key])
            parts["copy_idx"].extend([row["copy_idx"]] * n)
            parts["error"].extend([error] * n)
            parts["sampler_s"].extend([(time.perf_counter() - started) / n] * n)  # busy time, per image
        out = {k: np.array(v, dtype=object) for k, v in parts.items()}
        for key, dtype in (("label", np.int64), ("seed", np.int64), ("copy_idx", np.int64), ("sampler_s", np.float64)):
            out[key] = np.array(parts[key], dtype)
        out["image"] = np.concatenate(images)
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
    for i in range(batches.num_rows):
        started = time.perf_counter()
        out = actor(batches.slice(i, 1))
        timings.append((len(out["image"]), max(time.perf_counter() - started, 1e-9)))
        errors = [e for e in out["error"].tolist() if e]
        if errors:
            raise RuntimeError(f"generation failed: {errors[0]}")
        images.append(out["image"])
        labels.append(out["label"])
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


def write_images(batch: dict[str, np.ndarray], *, root: str, quality: int, storage_size: int | None) -> dict[str, np.ndarray]:
    """CPU task: write each generated image atomically to ``<root>/<path>``; drops the pixels."""
    errors = batch["error"].astype(object)
    for i, (path, image) in enumerate(zip(batch["path"], batch["image"])):
        if errors[i]:
            continue
        try:
            storage.write_bytes(storage.join(root, path), encode_jpeg(image, quality, storage_size))
        except Exception as exc:  # storage hiccup: counted as failed, retried by the next run
            errors[i] = f"write {path}: {type(exc).__name__}: {exc}"[:500]
    return {k: v for k, v in batch.items() if k != "image"} | {"error": errors}


def _part_name(table: pa.Table) -> str:
    """A part file name derived from its keys: a retried writer task overwrites instead of duplicating."""
    keys = sorted(zip(table.column("image_id").to_pylist(), table.column("copy_idx").to_pylist()))
    digest = hashlib.sha256("\n".join(f"{i}\x1f{c}" for i, c in keys).encode()).hexdigest()[:32]
    return f"{PART_PREFIX}{digest}.parquet"


def write_manifest(batch: pa.Table, *, directory: str, constants: dict,
                   kill_driver_after: tuple[int, int] | None = None,
                   hold_after: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """Writer task: the rows whose files were written become one manifest part; returns counts.
    ``kill_driver_after=(parts, pid)``, ``hold_after=(parts, pid)``: tests only, see ``_internal.faults``."""
    ok = pc.equal(batch["error"], "")
    good, bad = batch.filter(ok), batch.filter(pc.invert(ok))
    if good.num_rows:
        n = good.num_rows
        table = good.select(["path", "image_id", "label", "class_dir", "copy_idx", "seed", "prompt"])
        types = {"strength": pa.float64(), "steps": pa.int64(), "guidance_scale": pa.float64(), "lora_scale": pa.float64()}
        for key in MANIFEST_COLUMNS[7:]:
            table = table.append_column(key, pa.array([constants[key]] * n, types.get(key, pa.string())))
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        storage.write_bytes(storage.join(directory, _part_name(table)), buffer.getvalue())
        if kill_driver_after and len(part_files(directory)) >= kill_driver_after[0]:
            kill_driver(kill_driver_after[1])
        if hold_after and len(part_files(directory)) >= hold_after[0]:
            hold_while_alive(hold_after[1], f"manifest part {hold_after[0]}")
    first_error = bad.column("error")[0].as_py() if bad.num_rows else ""
    return {
        "written": np.array([good.num_rows]),
        "failed": np.array([bad.num_rows]),
        "error": np.array([first_error], dtype=object),
        "sampler_s": np.array([pc.sum(batch["sampler_s"]).as_py() or 0.0]),
    }
