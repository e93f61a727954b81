"""Generate stage: latent bank (+ LoRA) → synthetic ImageFolder + manifest, ``mult`` copies per real image.

Driver: validate config, bank, model and LoRA (no Ray yet) → plan the missing ``(image_id, copy_idx)``
keys from the bank's ``image_id`` column and the manifest → Ray Data pipeline:

    from_items(load units)           one unit = up to ~512 pending rows of one bank part file, one copy
    → map_batches(load_units)        CPU tasks: read the rows, build prompts and seeds; one output row
                                     per *generation batch* (``generate.batch_size`` images)
    → map_batches(SynthesisActor)    actor pool (one GPU each on GPU clusters): pipeline loaded once,
                                     LoRA fused; one Sampler call per generation batch → uint8 images
    → map_batches(write_images)      CPU tasks: JPEG-encode, write each file atomically
    → map_batches(write_manifest)    CPU tasks: one manifest part per ``rows_per_manifest_file`` rows

Files are written before their manifest rows, so a manifest row always means the file exists. A rerun
(after any interruption, or with a larger ``mult``) generates only the keys missing from the manifest.
Generation batches are fixed by the driver's plan, not by Ray's block bundling, so the same config on
the same hardware gives byte-identical images.

Example:
    >>> from realfake_ray.config import load_config
    >>> from realfake_ray.generate import run_generate
    >>> summary = run_generate(load_config(preset="tiny", out="runs/tiny", overrides=["generate.mult=2"]))  # doctest: +SKIP
    >>> summary["count"] == summary["expected"]  # doctest: +SKIP
    True
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from realfake_ray import storage
from realfake_ray._internal.faults import fault_at, kill_driver
from realfake_ray._internal.quiet import quiet_libraries
from realfake_ray._internal.shards import PART_PREFIX, part_files, tensor_column
from realfake_ray.accelerators import apply_accelerator, parse_accelerator
from realfake_ray.bank import class_mean_embeddings, read_bank
from realfake_ray.config import ConfigError, GenerateConfig, RunConfig
from realfake_ray.data.imagefolder import stem
from realfake_ray.layout import RunLayout
from realfake_ray.models import loading
from realfake_ray.seeds import derive_seed

SYNTHETIC = "synthetic"
MANIFEST_COLUMNS = (
    "path", "image_id", "label", "class_dir", "copy_idx", "seed", "prompt", "mode", "guidance", "strength",
    "steps", "scheduler", "guidance_scale", "lora_scale", "lora_sha256",
)  # fmt: skip
# Settings that change what an image looks like: a synthetic set must not mix two of them.
_RECORDED = ("model", "vae_sha256", "seed", "mode", "strength", "steps", "scheduler", "guidance_scale", "guidance",
             "negative_prompt", "negative_guidance_token", "sample_posterior", "lora_sha256", "lora_scale", "jpeg_quality",
             "storage_size", "accelerator")  # fmt: skip
_UNIT_TARGET_ROWS = 512  # rows per load unit (rounded up to whole generation batches)
LIGHT_TASK_CPUS = 0.25
_PROGRESS_EVERY_S = 10.0


def image_seed(seed: int, image_id: str, copy_idx: int) -> int:
    """The 63-bit seed of one synthetic image: blake2b of ``(seed, image_id, copy_idx)``, stable everywhere.

    Example:
        >>> image_seed(42, "digit_0/0001.png", 0) == image_seed(42, "digit_0/0001.png", 0)
        True
        >>> image_seed(42, "digit_0/0001.png", 0) != image_seed(42, "digit_0/0001.png", 1)
        True
    """
    return derive_seed(int(seed), image_id, int(copy_idx))


def synthetic_path(class_dir: str, image_id: str, copy_idx: int, disambiguate: bool = False) -> str:
    """Path below ``<out>/synthetic/train``: ``<safe class_dir>/<stem(image_id)>__c<copy_idx>.jpg``.

    ``disambiguate`` appends a hash of the id (for ids whose stems collide, e.g. ``a.png`` and ``a.jpg``).

    Example:
        >>> synthetic_path("n01440764", "n01440764/img_1.JPEG", 3)
        'n01440764/img_1__c3.jpg'
    """
    name = stem(image_id)
    if disambiguate:
        name = f"{name}-{hashlib.sha1(image_id.encode('utf-8')).hexdigest()[:8]}"
    return f"{storage.safe_name(class_dir)}/{name}__c{int(copy_idx)}.jpg"


# ------------------------------------------------------------------------------------------ validation


def sampler_settings(gen: GenerateConfig, device_type: str = "cuda"):
    """The :class:`~realfake_ray.sampler.SamplerSettings` of ``gen`` (fp32 on CPU), validated.

    Example:
        >>> sampler_settings(GenerateConfig(steps=4), "cpu").dtype
        'fp32'
    """
    from realfake_ray.sampler import SamplerSettings

    return SamplerSettings(
        scheduler=gen.scheduler,
        steps=gen.steps,
        strength=gen.strength,
        guidance_scale=gen.guidance_scale,
        mode=gen.mode,
        sample_posterior=gen.sample_posterior,
        dtype=gen.dtype if device_type == "cuda" else "fp32",
        channels_last=gen.channels_last,
        compile=gen.compile,
        negative_guidance_token=gen.negative_guidance_token,
    ).validate()


def check_generate_config(gen: GenerateConfig) -> None:
    """ConfigError naming the first bad ``generate.*`` value (also for configs built without validation)."""
    if isinstance(gen.mult, bool) or not isinstance(gen.mult, int) or gen.mult < 1:
        raise ConfigError(f"generate.mult={gen.mult!r}: must be an integer >= 1 (copies per real image)")
    if not 0.0 < float(gen.strength) <= 1.0:
        raise ConfigError(f"generate.strength={gen.strength!r}: must lie in (0, 1] (img2img noise level)")
    try:
        sampler_settings(gen)
    except ValueError as exc:
        raise ConfigError(f"generate: {exc}") from None
    if gen.batch_size < 1 or gen.rows_per_manifest_file < 1:
        raise ConfigError("generate.batch_size and generate.rows_per_manifest_file must be >= 1")
    try:
        parse_accelerator(gen.accelerator)
    except ValueError as exc:
        raise ConfigError(f"generate.{exc}") from None
    if gen.compile and gen.accelerator != "none":
        raise ConfigError(f"generate.accelerator={gen.accelerator!r} does not compose with generate.compile=true")


def _bank_tensor_width(file_url: str, column: str) -> int | None:
    """Elements per row of a tensor column, from the Parquet schema (Ray's tensor extension metadata)."""
    import json

    with storage.open_file(file_url) as f:
        field = pq.read_schema(f).field(column)
    shape = getattr(field.type, "shape", None)
    if shape is None:
        raw = (field.metadata or {}).get(b"ARROW:extension:metadata")
        if not raw:
            return None
        shape = json.loads(raw)
    return int(np.prod([int(d) for d in shape]))


def check_bank_fits_model(meta: dict, model_dir: str, gen: GenerateConfig, first_file: str) -> None:
    """ValueError when the bank's latents or CLIP embeddings cannot drive this model (before any Ray work)."""
    unet = loading.read_component_config(model_dir, "unet")
    vae = loading.read_component_config(model_dir, "vae")
    text = loading.read_component_config(model_dir, "text_encoder")
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    size = unet.get("sample_size")
    size = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
    want = [int(unet["in_channels"]), *size]
    channels, *hw = (int(d) for d in meta["latent_shape"])
    if gen.mode == "img2img":
        bank_factor = int(meta["model"].get("vae_downsample", factor))
        if [channels, *hw] != want or bank_factor * hw[0] != factor * size[0]:
            raise ValueError(
                f"latent bank from another VAE resolution: {meta_url_hint(meta)} holds latents "
                f"{channels}x{hw[0]}x{hw[1]} ({meta['resolution']} px, VAE downsample {bank_factor}) but this "
                f"model's UNet samples {want[0]}x{size[0]}x{size[1]} latents ({factor * size[0]} px); re-encode "
                f"with encode.resolution={factor * size[0]} into a new --out (or use generate.mode=txt2img)"
            )
        sha = loading.weights_sha256(os.path.join(model_dir, "vae"))
        if meta["model"].get("vae_sha256") not in (None, sha):
            raise ValueError(
                f"{meta_url_hint(meta)} was encoded with another VAE than model.pretrained's; "
                "re-encode with this model into a new --out"
            )
    if gen.guidance != "none":
        width = _bank_tensor_width(first_file, "clip_embed")
        if width is not None and width != int(text["hidden_size"]):
            raise ValueError(
                f"{first_file}: clip_embed width {width} != text encoder width {text['hidden_size']}; "
                f"the guidance token must match (or set generate.guidance=none)"
            )


def meta_url_hint(meta: dict) -> str:
    """How errors name a bank: its model and resolution."""
    return f"the latent bank ({meta.get('model', {}).get('pretrained', '?')} @ {meta.get('resolution')} px)"


class _ConfigOnlyPipeline:
    """Just enough of a pipeline for :func:`~realfake_ray.sampler.check_lora_fits`: UNet and text
    encoder built from their configs on the meta device (no weights read, instant even for SD v1.5)."""

    def __init__(self, model_dir: str):
        import torch
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        with torch.device("meta"):
            self.unet = UNet2DConditionModel.from_config(loading.read_component_config(model_dir, "unet"))
            self.text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(os.path.join(model_dir, "text_encoder")))

    @staticmethod
    def lora_state_dict(lora_file: str):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline.lora_state_dict(lora_file)


def local_lora_dir(lora_url: str, sha256: str) -> str:
    """A local directory holding the LoRA file: the run's own when local, else a per-node cached copy."""
    from realfake_ray.sampler import LORA_WEIGHT_NAME

    if storage.is_local(lora_url):
        return os.path.dirname(storage.local_path(lora_url))
    target = storage.cache_dir("lora", sha256[:32])
    local_file = os.path.join(target, LORA_WEIGHT_NAME)
    if not os.path.exists(local_file):
        storage.write_bytes(local_file, storage.read_bytes(lora_url))
    return target


def find_lora(cfg: RunConfig) -> tuple[str | None, str | None]:
    """``(url, content digest)`` of ``<out>/lora/pytorch_lora_weights.safetensors`` when used, else ``(None, None)``.

    ``generate.use_lora`` on but no LoRA there: FileNotFoundError naming both fixes (the method without
    its fine-tuning is an ablation, chosen with ``generate.use_lora=false``, never a silent fallback).
    """

    from realfake_ray.lora import lora_digest
    from realfake_ray.sampler import LORA_WEIGHT_NAME

    if not cfg.generate.use_lora:
        return None, None
    url = storage.join(RunLayout(cfg.out).lora_dir(), LORA_WEIGHT_NAME)
    if not storage.exists(url):
        raise FileNotFoundError(
            f"generate.use_lora=true but there is no LoRA at {url}: run `realfake finetune` with the same --out "
            "first, or set generate.use_lora=false to generate with the base model (an ablation)"
        )
    return url, lora_digest(storage.read_bytes(url))


def check_guidance_matches_lora(cfg: RunConfig) -> None:
    """ConfigError when ``generate.guidance`` differs from the ``finetune.guidance`` the LoRA learnt with.

    A LoRA trained with image tokens and sampled without them (or the other way round) is a silent method
    change; ``generate.allow_guidance_mismatch=true`` makes it a deliberate one.
    """

    url = storage.join(RunLayout(cfg.out).finetune_dir(), "_settings.json")
    if cfg.generate.allow_guidance_mismatch or not storage.exists(url):
        return
    trained = storage.read_json(url).get("guidance")
    if trained is not None and trained != cfg.generate.guidance:
        raise ConfigError(
            f"generate.guidance={cfg.generate.guidance!r} but the LoRA at {cfg.out} was fine-tuned with "
            f"finetune.guidance={trained!r}: set generate.guidance={trained}, or generate.allow_guidance_mismatch=true "
            "to sample it with other conditioning on purpose"
        )


def check_lora(model_dir: str, lora_url: str, sha256: str) -> None:
    """ValueError naming the LoRA file and the first factor that does not fit this model's UNet."""
    from realfake_ray.sampler import LORA_WEIGHT_NAME, check_lora_fits

    local = os.path.join(local_lora_dir(lora_url, sha256), LORA_WEIGHT_NAME)
    try:
        check_lora_fits(_ConfigOnlyPipeline(model_dir), local)
    except ValueError as exc:
        raise ValueError(str(exc).replace(local, lora_url)) from None


def recorded_settings(cfg: RunConfig, meta: dict, lora_sha256: str | None) -> dict:
    """The settings that define the look of the synthetic set (stored in ``_settings.json``)."""
    from realfake_ray.prompts import NEGATIVE_PROMPT

    g = cfg.generate
    return {
        "model": cfg.model.pretrained,
        "vae_sha256": meta.get("model", {}).get("vae_sha256"),
        "seed": cfg.seed,
        "mode": g.mode,
        "strength": g.strength if g.mode == "img2img" else None,
        "steps": g.steps,
        "scheduler": g.scheduler,
        "guidance_scale": g.guidance_scale,
        "guidance": g.guidance,
        "negative_prompt": NEGATIVE_PROMPT,
        "negative_guidance_token": g.negative_guidance_token if g.guidance != "none" else None,
        "sample_posterior": g.sample_posterior if g.mode == "img2img" else None,
        "lora_sha256": lora_sha256,
        "lora_scale": g.lora_scale if lora_sha256 else None,
        "jpeg_quality": g.jpeg_quality,
        "storage_size": g.storage_size,
        "accelerator": g.accelerator if g.accelerator != "none" else None,  # absent (None) in older records
    }


def check_settings_unchanged(out: str, settings: dict) -> None:
    """ValueError when ``<out>/synthetic`` was generated with other image-defining settings."""
    from realfake_ray._internal.settings import refuse_changed_settings

    if part_files(RunLayout(out).manifest_dir()):
        refuse_changed_settings(
            RunLayout(out).synthetic_dir("_settings.json"), settings, f"the synthetic set at {RunLayout(out).synthetic_dir()}", _RECORDED
        )


# ------------------------------------------------------------------------------------------ planning


@dataclass
class GeneratePlan:
    """What the driver resolved: checked inputs and the load units of the missing keys."""

    model_dir: str
    meta: dict
    files: list[str]
    lora_url: str | None
    lora_sha256: str | None
    settings: dict
    units: list[dict]
    bank_rows: int
    expected: int
    pending: int
    collisions: frozenset[str]


def _read_tables(urls: list[str], columns: list[str]) -> list[pa.Table]:
    """The given columns of each Parquet file, read concurrently (bank and manifest key columns)."""

    def read(url: str) -> pa.Table:
        with storage.open_file(url) as f:
            return pq.read_table(f, columns=columns)

    if not urls:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(urls))) as pool:
        return list(pool.map(read, urls))


def _first_occurrence(ids: pa.ChunkedArray) -> np.ndarray:
    """Boolean mask keeping the first row of each image_id (a bank should not repeat ids; guard anyway)."""
    if pc.count_distinct(ids).as_py() == len(ids):
        return np.ones(len(ids), dtype=bool)
    codes = pc.index_in(ids, value_set=pc.unique(ids)).to_numpy(zero_copy_only=False)
    mask = np.zeros(len(ids), dtype=bool)
    mask[np.unique(codes, return_index=True)[1]] = True
    return mask


def _stem_collisions(ids: pa.ChunkedArray, keep: np.ndarray) -> frozenset[str]:
    """Ids whose file stem collides with another id's in the same class folder (``x.png`` and ``x.jpg``)."""
    roots = pc.replace_substring_regex(ids, pattern=r"\.[^./]*$", replacement="")
    if pc.count_distinct(roots).as_py() == int(keep.sum()):
        return frozenset()
    seen: dict[tuple[str, str], list[str]] = {}
    for image_id, kept in zip(ids.to_pylist(), keep):
        if kept:
            seen.setdefault((image_id.split("/", 1)[0], stem(image_id)), []).append(image_id)
    return frozenset(i for group in seen.values() if len(group) > 1 for i in group)


def unit_rows(unit: dict) -> np.ndarray:
    """The bank-file row indices of a load unit."""
    return np.frombuffer(unit["rows"], dtype=np.int32)


def plan_units(cfg: RunConfig, files: list[str]) -> tuple[list[dict], int, int, int, frozenset[str]]:
    """Load units for every ``(image_id, copy_idx < mult)`` key missing from the manifest.

    Returns ``(units, bank_rows, expected, pending, stem_collisions)``. A unit is one bank file, one copy and
    up to ~512 row indices (whole generation batches; int32 bytes, see :func:`unit_rows`); units run copy
    by copy, so an interrupted 10x run holds complete lower copies first. Memory: the bank's image_id
    column and the manifest's key columns (Arrow), 4 bytes per pending image.
    """

    g = cfg.generate
    tables = _read_tables(files, ["image_id"])
    lengths = np.array([t.num_rows for t in tables], dtype=np.int64)
    ids = pa.chunked_array([t.column("image_id").combine_chunks() for t in tables], type=pa.string())
    keep = _first_occurrence(ids)
    collisions = _stem_collisions(ids, keep)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    done_tables = _read_tables(part_files(RunLayout(cfg.out).manifest_dir()), ["image_id", "copy_idx"])
    done = pa.concat_tables(done_tables) if done_tables else None
    per_unit = g.batch_size * max(1, math.ceil(_UNIT_TARGET_ROWS / g.batch_size))
    units, pending = [], 0
    for copy_idx in range(g.mult):
        missing = keep.copy()
        if done is not None:
            done_ids = done.filter(pc.equal(done["copy_idx"], copy_idx)).column("image_id")
            if len(done_ids):
                missing &= ~pc.is_in(ids, value_set=done_ids.combine_chunks()).to_numpy(zero_copy_only=False)
        flat = np.flatnonzero(missing)
        pending += len(flat)
        bounds = np.searchsorted(flat, offsets)
        for f, url in enumerate(files):
            rows = flat[bounds[f] : bounds[f + 1]] - offsets[f]
            for start in range(0, len(rows), per_unit):
                chunk = rows[start : start + per_unit].astype(np.int32)
                units.append({"file": url, "copy_idx": copy_idx, "rows": chunk.tobytes()})
    bank_rows = int(keep.sum())
    return units, bank_rows, bank_rows * g.mult, pending, collisions


def plan_generate(cfg: RunConfig) -> GeneratePlan:
    """Validate everything and plan the missing work; no Ray. Raises before any generation starts."""
    check_generate_config(cfg.generate)
    meta, files = read_bank(cfg.out)
    model_dir = loading.resolve_model_dir(cfg.model.pretrained, cfg.model.revision, cfg.model.hub_timeout_s)
    check_bank_fits_model(meta, model_dir, cfg.generate, files[0])
    lora_url, lora_sha = find_lora(cfg)
    if lora_url:
        check_lora(model_dir, lora_url, lora_sha)
        check_guidance_matches_lora(cfg)
    settings = recorded_settings(cfg, meta, lora_sha)
    check_settings_unchanged(cfg.out, settings)
    units, bank_rows, expected, pending, collisions = plan_units(cfg, files)
    return GeneratePlan(model_dir, meta, files, lora_url, lora_sha, settings, units, bank_rows, expected, pending, collisions)


# ------------------------------------------------------------------------------------------ workers


_BATCH_SCHEMA = pa.schema(
    [("copy_idx", pa.int64())]
    + [(c, pa.list_(pa.string())) for c in ("image_id", "class_dir", "path", "prompt")]
    + [(c, pa.list_(pa.int64())) for c in ("label", "seed")]
    + [(c, pa.large_binary()) for c in ("latent_mean", "latent_std", "clip_embed")]
)


def _batch_row(chunk: pa.Table, copy_idx: int, seed: int, collisions: frozenset[str]) -> dict:
    """One generation batch as one row: per-image lists, and the tensors as float16 bytes (b"" if unused)."""
    from realfake_ray.prompts import GENERATION_SUFFIX, build_prompt

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


def load_units(units: pa.Table, *, seed: int, batch_size: int, mode: str, guidance: str, collisions: frozenset[str]) -> pa.Table:
    """CPU task: read each unit's bank rows; emit one row per generation batch of ``batch_size`` images."""
    columns = ["image_id", "label", "class_dir", "class_name", "caption"]
    columns += ["latent_mean", "latent_std"] if mode == "img2img" else []
    columns += ["clip_embed"] if guidance == "image" else []
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

        from realfake_ray.devices import torch_device
        from realfake_ray.sampler import Sampler, latent_hw

        quiet_libraries()  # no per-component loading bars or LoRA-prefix notices, one set per actor
        device = torch_device().type
        model_dir = loading.resolve_model_dir(cfg.model.pretrained, cfg.model.revision, cfg.model.hub_timeout_s)
        pipe = loading.load_pipeline(model_dir)
        lora = local_lora_dir(spec["lora_url"], spec["lora_sha256"]) if spec["lora_url"] else None
        settings = sampler_settings(cfg.generate, device)
        self.sampler = Sampler.from_pipeline(pipe, settings, device, lora_dir=lora, lora_scale=cfg.generate.lora_scale)
        self.undo_accelerator = apply_accelerator(self.sampler, cfg.generate.accelerator)
        self.latent_shape = tuple(int(d) for d in spec["latent_shape"])
        hw = self.latent_shape[1:] if settings.mode == "img2img" else latent_hw(pipe)
        factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        self.image_shape = (hw[0] * factor, hw[1] * factor, 3)
        self.guidance = cfg.generate.guidance
        means = spec.get("class_means")
        self.class_means = torch.from_numpy(np.asarray(means, dtype=np.float32)) if means is not None else None
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
        if self.guidance == "image":
            inputs["guidance_tokens"] = torch.from_numpy(np.frombuffer(row["clip_embed"], np.float16).reshape(n, -1).copy())
        elif self.guidance == "class_mean":
            inputs["guidance_tokens"] = self.class_means[torch.tensor(row["label"])]
        return inputs

    def _generate(self, row: dict) -> tuple[np.ndarray, str]:
        n = len(row["image_id"])
        try:
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
                         guidance=g.guidance, collisions=frozenset())
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
                   kill_driver_after: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """Writer task: the rows whose files were written become one manifest part; returns counts.
    ``kill_driver_after=(parts, pid)``: tests only, see ``_internal.faults``."""
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
    first_error = bad.column("error")[0].as_py() if bad.num_rows else ""
    return {
        "written": np.array([good.num_rows]),
        "failed": np.array([bad.num_rows]),
        "error": np.array([first_error], dtype=object),
        "sampler_s": np.array([pc.sum(batch["sampler_s"]).as_py() or 0.0]),
    }


# ------------------------------------------------------------------------------------------ driver


def _manifest_constants(cfg: RunConfig, plan: GeneratePlan) -> dict:
    g = cfg.generate
    return {
        "mode": g.mode,
        "guidance": g.guidance,
        "strength": g.strength if g.mode == "img2img" else 1.0,
        "steps": g.steps,
        "scheduler": g.scheduler,
        "guidance_scale": g.guidance_scale,
        "lora_scale": g.lora_scale if plan.lora_sha256 else None,
        "lora_sha256": plan.lora_sha256,
    }


def build_pipeline(cfg: RunConfig, plan: GeneratePlan, class_means: np.ndarray | None = None):
    """The Ray Data plan for ``plan.units`` (not executed)."""
    import ray.data

    from realfake_ray._internal.cluster import actor_pool_kwargs

    g = cfg.generate
    spec = {
        "lora_url": plan.lora_url,
        "lora_sha256": plan.lora_sha256,
        "latent_shape": plan.meta["latent_shape"],
        "class_means": class_means,
    }
    ds = ray.data.from_items(plan.units, override_num_blocks=max(1, min(len(plan.units), 20000)))
    load_kwargs = {"seed": cfg.seed, "batch_size": g.batch_size, "mode": g.mode, "guidance": g.guidance,
                   "collisions": plan.collisions}  # fmt: skip
    # The CPU tasks around the actors are light (Parquet reads, JPEG writes): a quarter CPU each, so that on a
    # small CPU machine they do not keep an actor from starting.
    ds = ds.map_batches(load_units, batch_format="pyarrow", batch_size=None, fn_kwargs=load_kwargs,
                        num_cpus=LIGHT_TASK_CPUS)
    ds = ds.map_batches(
        SynthesisActor,
        batch_size=1,  # one row = one planned generation batch (fixes batch composition: reproducible bytes)
        batch_format="pyarrow",
        fn_constructor_args=(cfg, spec),
        **actor_pool_kwargs(g.actors, "generate.actors", reserve_cpus=2 * LIGHT_TASK_CPUS),
    )
    ds = ds.map_batches(
        write_images,
        batch_size=None,
        num_cpus=LIGHT_TASK_CPUS,
        fn_kwargs={"root": RunLayout(cfg.out).images_dir(), "quality": g.jpeg_quality, "storage_size": g.storage_size},
    )
    return ds.map_batches(
        write_manifest,
        batch_format="pyarrow",
        batch_size=g.rows_per_manifest_file,
        num_cpus=LIGHT_TASK_CPUS,
        fn_kwargs={"directory": RunLayout(cfg.out).manifest_dir(), "constants": _manifest_constants(cfg, plan),
                   "kill_driver_after": (kill_at, os.getpid()) if (kill_at := fault_at("generate.manifest_part")) else None},
    )


def _class_means(cfg: RunConfig, plan: GeneratePlan) -> np.ndarray | None:
    """Per-class mean CLIP embedding of the bank (``generate.guidance=class_mean``), computed once here."""
    if cfg.generate.guidance != "class_mean":
        return None

    return class_mean_embeddings(plan.files, len(plan.meta["class_dirs"]))


def _execute(cfg: RunConfig, plan: GeneratePlan) -> dict:
    """Run the pipeline with a progress bar (images done / total, images/s; on a terminal) or a progress
    line every few seconds (job logs) as manifest parts land; returns the counts."""
    import sys

    from tqdm.auto import tqdm

    from realfake_ray._internal.cluster import ClusterTimeline

    ds = build_pipeline(cfg, plan, _class_means(cfg, plan))
    written = failed = 0
    sampler_s = 0.0
    errors: list[str] = []
    present = plan.expected - plan.pending
    bar = tqdm(total=plan.expected, initial=present, unit="img", desc="generate", disable=not sys.stdout.isatty())
    started = last = time.time()
    progress = {"written": 0}
    timeline = ClusterTimeline(lambda: progress["written"])
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        done, lost = int(batch["written"].sum()), int(batch["failed"].sum())
        written, failed = written + done, failed + lost
        sampler_s += float(batch["sampler_s"].sum())
        errors += [e for e in batch["error"].tolist() if e][: max(0, 10 - len(errors))]
        bar.update(done)
        bar.set_postfix(failed=failed, refresh=False)
        progress["written"] = written
        now = time.time()
        if bar.disable and (now - last >= _PROGRESS_EVERY_S or written + failed == plan.pending):
            last = now
            rate = written / max(now - started, 1e-9)
            print(
                f"[generate] {present + written}/{plan.expected} images "
                f"({100 * (present + written) / max(plan.expected, 1):.1f}%), "
                f"this run {written}/{plan.pending} at {rate:.2f} images/s, failed {failed}",
                flush=True,
            )
    bar.close()
    return {"written": written, "failed": failed, "errors": errors, "seconds": time.time() - started,
            "sampler_s": sampler_s, "timeline": timeline.stop()}


def _throughput_settings(cfg: RunConfig) -> dict:
    g = cfg.generate
    return {"batch_size": g.batch_size, "dtype": g.dtype, "channels_last": g.channels_last, "compile": g.compile,
            "actors": g.actors.model_dump(), "rows_per_manifest_file": g.rows_per_manifest_file, "mult": g.mult}  # fmt: skip


def run_generate(cfg: RunConfig) -> dict:
    """Generate every missing synthetic image; write ``<out>/synthetic/_summary.json``; return the summary.

    ``"skipped": True`` when nothing was missing. Raises before any Ray work on bad input (config, bank,
    model, LoRA, changed settings), and RuntimeError after the summary when some images failed.

    Example:
        >>> run_generate(load_config(preset="tiny", out="runs/tiny"))["count"]  # doctest: +SKIP
        1437
    """
    from realfake_ray._internal.cluster import init_ray

    started = time.time()
    plan = plan_generate(cfg)
    print(
        f"[generate] {plan.bank_rows} bank rows x mult {cfg.generate.mult} = {plan.expected} images; "
        f"{plan.expected - plan.pending} present, {plan.pending} to generate in {len(plan.units)} load units"
        + (f"; LoRA {plan.lora_sha256[:12]}" if plan.lora_sha256 else "; no LoRA"),
        flush=True,
    )
    summary_url = RunLayout(cfg.out).synthetic_dir("_summary.json")
    if not plan.units and storage.exists(summary_url):
        stored = storage.read_json(summary_url)
        if stored.get("count") == plan.expected and stored.get("complete"):
            return {**stored, "skipped": True}  # nothing to do: the record of the run that did the work stays
    result = {"written": 0, "failed": 0, "errors": [], "seconds": 0.0, "sampler_s": 0.0}
    gpus = None
    if plan.units:
        from realfake_ray._internal.cluster import gpus_per_actor

        storage.write_json(RunLayout(cfg.out).synthetic_dir("_settings.json"), plan.settings)
        init_ray(cfg.ray)
        gpus = gpus_per_actor(cfg.generate.actors)
        result = _execute(cfg, plan)
    summary = {
        "count": plan.expected - plan.pending + result["written"],
        "expected": plan.expected,
        "generated_now": result["written"],
        "already_present": plan.expected - plan.pending,
        "failed": result["failed"],
        "errors": result["errors"],
        "images_per_s": round(result["written"] / result["seconds"], 3) if result["written"] else None,
        "generation_s": round(result["seconds"], 2),
        "sampler_s": round(result["sampler_s"], 2),  # actor time inside Sampler calls, summed over actors
        # images per second of one actor while sampling = per GPU on GPU clusters (one GPU per actor)
        "sampler_images_per_s": round(result["written"] / result["sampler_s"], 3) if result["sampler_s"] else None,
        "gpus_per_actor": gpus,
        "wall_s": round(time.time() - started, 2),
        "bank_rows": plan.bank_rows,
        "mult": cfg.generate.mult,
        "images": RunLayout(cfg.out).images_dir(),
        "manifest": RunLayout(cfg.out).manifest_dir(),
        "settings": plan.settings,
        "throughput_settings": _throughput_settings(cfg),
        # (seconds, images written, alive nodes, alive synthesis actors) while this run generated
        "timeline": result.get("timeline", []),
    }
    summary["complete"] = summary["count"] == plan.expected
    storage.write_json(summary_url, summary)
    if result["failed"]:
        raise RuntimeError(
            f"generate: {result['failed']} of {plan.pending} images failed (first error: {result['errors'][0]}); "
            f"see {summary_url}; rerun to retry only the missing ones"
        )
    return {**summary, "skipped": not plan.units}
