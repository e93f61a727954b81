"""Planning the generate stage, without Ray: check the config, the bank, the model and the LoRA before any work;
cut the bank into shards (one copy of a chunk of one bank part file each) and plan the shards not written yet;
the seed and file name of every synthetic image; the settings recorded with a synthetic set.

Example:
    >>> plan = plan_generate(load_config(preset="tiny", out="runs/tiny"))  # doctest: +SKIP
    >>> plan.pending, len(plan.units)  # doctest: +SKIP
    (1437, 3)
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from realfake_ray import storage
from realfake_ray._internal.settings import read_settings, refuse_changed_settings
from realfake_ray.method.speedups import parse_speedup
from realfake_ray.bank import read_bank, tensor_shape
from realfake_ray.config import ConfigError, GenerateConfig, RunConfig
from realfake_ray.data.imagefolder import stem
from realfake_ray.data.synthetic import list_shards, shard_name
from realfake_ray.layout import RunLayout
from realfake_ray.method.lora import LORA_WEIGHT_NAME, check_lora_fits, lora_digest
from realfake_ray.models import loading
from realfake_ray.method.prompts import NEGATIVE_PROMPT
from realfake_ray.method.sampler import SamplerSettings
from realfake_ray.seeds import derive_seed

__all__ = [
    "SHARD_SETTINGS", "image_seed", "images_per_shard", "synthetic_path", "sampler_settings", "check_generate_config",
    "check_bank_fits_model", "meta_url_hint", "local_lora_dir", "find_lora", "check_vision_token_matches_lora",
    "check_lora", "recorded_settings", "shard_settings", "throughput_settings", "check_settings_unchanged",
    "GeneratePlan", "unit_rows", "shards_of", "plan_units", "plan_generate",
]

# The run-wide settings every row of a shard repeats, as recorded_settings gives them.
SHARD_SETTINGS = ("mode", "vision_token", "strength", "steps", "scheduler", "guidance_scale", "lora_scale", "lora_sha256")


# Settings that change what an image looks like: a synthetic set must not mix two of them.
_RECORDED = ("model", "vae_sha256", "seed", "mode", "strength", "steps", "scheduler", "guidance_scale", "vision_token",
             "negative_prompt", "negative_vision_token", "sample_posterior", "lora_sha256", "lora_scale", "jpeg_quality",
             "storage_size", "speedup", "images_per_shard")  # fmt: skip

_JPEG_BYTES_PER_PIXEL = 0.19  # JPEG quality 75 of natural images (≈ 50 KB at 512²): sizes shards before any exists


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


def _negative_prompt(gen: GenerateConfig) -> str:
    """The CFG branch's prompt: ``generate.negative_prompt``, or the reference's when unset (None)."""
    return NEGATIVE_PROMPT if gen.negative_prompt is None else gen.negative_prompt


def sampler_settings(gen: GenerateConfig, device_type: str = "cuda"):
    """The :class:`~realfake_ray.method.sampler.SamplerSettings` of ``gen``, validated; on a device other than
    CUDA as they run there (:meth:`~realfake_ray.method.sampler.SamplerSettings.for_cpu`: fp32, no CUDA-only option).

    Example:
        >>> sampler_settings(GenerateConfig(steps=4), "cpu").dtype
        'fp32'
    """

    settings = SamplerSettings(
        scheduler=gen.scheduler,
        steps=gen.steps,
        strength=gen.strength,
        guidance_scale=gen.guidance_scale,
        mode=gen.mode,
        sample_posterior=gen.sample_posterior,
        dtype=gen.dtype,
        channels_last=gen.channels_last,
        compile=gen.compile,
        negative_vision_token=gen.negative_vision_token,
        negative_prompt=_negative_prompt(gen),
        compile_mode=gen.compile_mode,
        sdpa_backend=gen.sdpa_backend,
        vae_dtype=gen.vae_dtype,
        fuse_qkv=gen.fuse_qkv,
    ).validate()
    return settings if device_type == "cuda" else settings.for_cpu()


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
    if gen.batch_size < 1:
        raise ConfigError("generate.batch_size must be >= 1")
    try:
        parse_speedup(gen.speedup)
    except ValueError as exc:
        raise ConfigError(f"generate.{exc}") from None
    if gen.compile and gen.speedup != "none":
        raise ConfigError(f"generate.speedup={gen.speedup!r} does not compose with generate.compile=true")


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
    if gen.vision_token != "none":
        shape = tensor_shape(first_file, "clip_embed")
        width = int(np.prod(shape)) if shape is not None else None
        if width is not None and width != int(text["hidden_size"]):
            raise ValueError(
                f"{first_file}: clip_embed width {width} != text encoder width {text['hidden_size']}; "
                f"the guidance token must match (or set generate.vision_token=none)"
            )


def meta_url_hint(meta: dict) -> str:
    """How errors name a bank: its model and resolution."""
    return f"the latent bank ({meta.get('model', {}).get('pretrained', '?')} @ {meta.get('resolution')} px)"


def _meta_unet_and_text_encoder(model_dir: str):
    """The UNet and text encoder of ``model_dir`` built from their configs on the meta device: shapes only,
    no weights read (instant even for SD v1.5) — what :func:`~realfake_ray.method.lora.check_lora_fits` needs."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(loading.read_component_config(model_dir, "unet"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(os.path.join(model_dir, "text_encoder")))
    return unet, text_encoder


def local_lora_dir(lora_url: str, sha256: str) -> str:
    """A local directory holding the LoRA file: the run's own when local, else a per-node cached copy."""
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

    if not cfg.generate.use_lora:
        return None, None
    url = storage.join(RunLayout(cfg.out).lora_dir(), LORA_WEIGHT_NAME)
    if not storage.exists(url):
        raise FileNotFoundError(
            f"generate.use_lora=true but there is no LoRA at {url}: run `realfake finetune` with the same --out "
            "first, or set generate.use_lora=false to generate with the base model (an ablation)"
        )
    return url, lora_digest(storage.read_bytes(url))


def check_vision_token_matches_lora(cfg: RunConfig) -> None:
    """ConfigError when ``generate.vision_token`` differs from the ``finetune.vision_token`` the LoRA learnt with.

    A LoRA trained with image tokens and sampled without them (or the other way round) is a silent method
    change; ``generate.allow_vision_token_mismatch=true`` makes it a deliberate one.
    """

    url = storage.join(RunLayout(cfg.out).finetune_dir(), "_settings.json")
    if cfg.generate.allow_vision_token_mismatch or not storage.exists(url):
        return
    trained = read_settings(url).get("vision_token")
    if trained is not None and trained != cfg.generate.vision_token:
        raise ConfigError(
            f"generate.vision_token={cfg.generate.vision_token!r} but the LoRA at {cfg.out} was fine-tuned with "
            f"finetune.vision_token={trained!r}: set generate.vision_token={trained}, or generate.allow_vision_token_mismatch=true "
            "to sample it with other conditioning on purpose"
        )


def check_lora(model_dir: str, lora_url: str, sha256: str) -> None:
    """ValueError naming the LoRA file and the first factor that does not fit this model's UNet."""
    local = os.path.join(local_lora_dir(lora_url, sha256), LORA_WEIGHT_NAME)
    try:
        check_lora_fits(*_meta_unet_and_text_encoder(model_dir), local)
    except ValueError as exc:
        raise ValueError(str(exc).replace(local, lora_url)) from None


def images_per_shard(gen: GenerateConfig, resolution: int) -> int:
    """Target images per shard: ``generate.images_per_shard``, else about ``generate.shard_mb`` of JPEGs at the
    stored size (between 16 and 10,000 images); a bank part is cut into equal shards near it (:func:`shards_of`).

    Example:
        >>> images_per_shard(GenerateConfig(), 512), images_per_shard(GenerateConfig(images_per_shard=7), 512)
        (1011, 7)
    """
    if gen.images_per_shard:
        return gen.images_per_shard
    side = gen.storage_size or resolution
    return int(min(10_000, max(16, round(gen.shard_mb * 2**20 / (_JPEG_BYTES_PER_PIXEL * side * side)))))


def recorded_settings(cfg: RunConfig, meta: dict, lora_sha256: str | None) -> dict:
    """The settings that define the look of the synthetic set (stored in ``_settings.json``)."""

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
        "vision_token": g.vision_token,
        "negative_prompt": _negative_prompt(g),
        "negative_vision_token": g.negative_vision_token if g.vision_token != "none" else None,
        "sample_posterior": g.sample_posterior if g.mode == "img2img" else None,
        "lora_sha256": lora_sha256,
        "lora_scale": g.lora_scale if lora_sha256 else None,
        "jpeg_quality": g.jpeg_quality,
        "storage_size": g.storage_size,
        "speedup": g.speedup if g.speedup != "none" else None,  # absent (None) in older records
        "images_per_shard": images_per_shard(g, int(meta["resolution"])),  # fixes the shards' names
    }


def shard_settings(settings: dict) -> dict:
    """The settings every row of a shard repeats, taken from :func:`recorded_settings` (one source: a shard and
    ``_settings.json`` never disagree; ``strength`` is None for txt2img in both)."""
    return {key: settings[key] for key in SHARD_SETTINGS}


def throughput_settings(cfg: RunConfig) -> dict:
    """The settings that pace and place a generate run without changing its images (in ``_summary.json``)."""
    g = cfg.generate
    return {"batch_size": g.batch_size, "dtype": g.dtype, "channels_last": g.channels_last, "compile": g.compile,
            "compile_mode": g.compile_mode, "sdpa_backend": g.sdpa_backend, "vae_dtype": g.vae_dtype, "fuse_qkv": g.fuse_qkv,
            "actors": g.actors.model_dump(), "shard_mb": g.shard_mb, "mult": g.mult}  # fmt: skip


def check_settings_unchanged(out: str, settings: dict, shards_present: bool) -> None:
    """ValueError when ``<out>/synthetic`` was generated with other image-defining settings, or in the layout
    of earlier versions (one JPEG per image and a ``_manifest``)."""
    layout = RunLayout(out)
    if storage.exists(layout.synthetic_dir("_manifest")):
        raise ValueError(
            f"{layout.synthetic_dir()} holds a synthetic set in the layout of earlier versions (one JPEG per image + "
            "_manifest/); generate into a new --out, or move that folder away (`realfake train` still reads it "
            f"with train.synthetic={layout.synthetic_dir('train')})"
        )
    if shards_present:
        refuse_changed_settings(layout.synthetic_dir("_settings.json"), settings,
                                f"the synthetic set at {layout.synthetic_dir()}", _RECORDED)


@dataclass
class GeneratePlan:
    """What the driver resolved: checked inputs and the shards still to write (``units``: one per shard)."""

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
    shards: int = 0  # shards of the whole set (present + pending)
    class_counts: dict[str, int] | None = None  # bank train rows per class (× copies: the set's counts)


def _read_tables(urls: list[str], columns: list[str]) -> list[pa.Table]:
    """The given columns of each Parquet file, read concurrently (the bank's id and label columns)."""

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
    """The bank-file row indices of a unit (a shard)."""
    return np.frombuffer(unit["rows"], dtype=np.int32)


def shards_of(rows: int, per_shard: int) -> int:
    """How many equal shards a bank part of ``rows`` rows is cut into: the count closest to ``per_shard`` rows each.

    Example:
        >>> shards_of(1024, 1011), shards_of(30, 8), shards_of(512, 10_000)
        (1, 4, 1)
    """
    return max(1, int(rows / per_shard + 0.5))  # half up (Python's round() would halve to even)


def plan_units(cfg: RunConfig, files: list[str], per_shard: int) -> tuple[list[dict], int, int, int, int, frozenset[str]]:
    """One unit per shard of ``(copy_idx < mult)`` × equal chunks of about ``per_shard`` rows of each bank file
    (:func:`shards_of`) that is not written yet. Returns ``(units, bank_rows, expected images, pending images, shards in all, stem collisions)``.

    A unit is ``{"file", "copy_idx", "rows" (int32 bytes, see :func:`unit_rows`), "shard" (its file name)}``;
    units run copy by copy, so an interrupted 10x run holds complete lower copies first. Memory: the bank's
    image_id column (Arrow) and 4 bytes per pending image; presence is one listing of the shard folder.
    """
    g = cfg.generate
    tables = _read_tables(files, ["image_id"])
    lengths = np.array([t.num_rows for t in tables], dtype=np.int64)
    ids = pa.chunked_array([t.column("image_id").combine_chunks() for t in tables], type=pa.string())
    keep = _first_occurrence(ids)
    collisions = _stem_collisions(ids, keep)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    present = set(u.rsplit("/", 1)[-1] for u in list_shards(RunLayout(cfg.out).shards_dir()).urls)
    units, pending, shards = [], 0, 0
    for copy_idx in range(g.mult):
        for f, url in enumerate(files):
            rows = np.flatnonzero(keep[offsets[f] : offsets[f + 1]]).astype(np.int32)
            for chunk, part in enumerate(np.array_split(rows, shards_of(len(rows), per_shard)) if len(rows) else []):
                name = shard_name(copy_idx, url, chunk, len(part))
                shards += 1
                if name not in present:
                    units.append({"file": url, "copy_idx": copy_idx, "rows": part.tobytes(), "shard": name})
                    pending += len(part)
    bank_rows = int(keep.sum())
    return units, bank_rows, bank_rows * g.mult, pending, shards, collisions


def _class_counts(files: list[str], meta: dict) -> dict[str, int]:
    labels = np.concatenate([t.column("label").to_numpy() for t in _read_tables(files, ["label"])])
    counts = np.bincount(labels, minlength=len(meta["class_dirs"]))
    return {c: int(n) for c, n in zip(meta["class_dirs"], counts)}


def plan_generate(cfg: RunConfig) -> GeneratePlan:
    """Validate everything and plan the missing shards; no Ray. Raises before any generation starts."""
    check_generate_config(cfg.generate)
    meta, files = read_bank(cfg.out)
    model_dir = loading.resolve_model_dir(cfg.model.pretrained, cfg.model.revision, cfg.model.hub_timeout_s)
    check_bank_fits_model(meta, model_dir, cfg.generate, files[0])
    lora_url, lora_sha = find_lora(cfg)
    if lora_url:
        check_lora(model_dir, lora_url, lora_sha)
        check_vision_token_matches_lora(cfg)
    settings = recorded_settings(cfg, meta, lora_sha)
    check_settings_unchanged(cfg.out, settings, bool(list_shards(RunLayout(cfg.out).shards_dir()).urls))
    units, bank_rows, expected, pending, shards, collisions = plan_units(cfg, files, settings["images_per_shard"])
    return GeneratePlan(model_dir, meta, files, lora_url, lora_sha, settings, units, bank_rows, expected, pending,
                        collisions, shards, _class_counts(files, meta))
