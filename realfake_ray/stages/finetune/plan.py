"""Planning a fine-tuning run, without Ray: the step target, the model checked against the latent bank
before any work, and the settings that define a LoRA (a rerun with other values is refused).

Example:
    >>> plan = plan_finetune(cfg, meta, files, step_target(cfg.finetune, rows)[1])  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from realfake_ray.bank import class_mean_embeddings, tensor_shape
from realfake_ray.config import FinetuneConfig, RunConfig
from realfake_ray.method.vision_token import check_vision_token_width
from realfake_ray.layout import RunLayout
from realfake_ray.models import loading

__all__ = ["finetune_settings", "data_order", "FinetunePlan", "step_target", "check_model_and_bank", "plan_finetune"]

# Keys that only place or pace the run: they may change between a run and its resume. Everything else in
# the finetune section shapes the LoRA, so a rerun into the same --out with another value is refused.
_PLACEMENT_KEYS = {"num_workers", "use_gpu", "cpus_per_worker", "epochs", "max_steps", "checkpoint_every",
                   "keep_checkpoints", "max_failures", "log_every"}


def finetune_settings(cfg: RunConfig, rows: int) -> dict:
    """What defines the LoRA of a run on a bank of ``rows`` training rows (recorded in
    ``<out>/finetune/_settings.json``): the data order as resolved (:func:`data_order`), not how it was asked for."""
    section = cfg.finetune.model_dump(mode="json", exclude=_PLACEMENT_KEYS | {"global_shuffle_max_rows"})
    return {"model": cfg.model.pretrained, "revision": cfg.model.revision, "seed": cfg.seed,
            **section, "shuffle": data_order(cfg.finetune, rows)}


def data_order(ft: FinetuneConfig, rows: int) -> str:
    """``"global"`` or ``"files"``: ``finetune.shuffle`` with ``auto`` resolved by the bank's size.

    Example:
        >>> data_order(FinetuneConfig(), 1_281_167), data_order(FinetuneConfig(), 9_000)
        ('files', 'global')
    """
    if ft.shuffle != "auto":
        return ft.shuffle
    return "global" if rows <= ft.global_shuffle_max_rows else "files"


@dataclass(frozen=True)
class FinetunePlan:
    """What the driver resolved and checked; every worker trains from it (plain data, picklable)."""

    model_dir: str
    bank_files: tuple[str, ...]
    rows: int
    total_steps: int
    prediction_type: str
    num_classes: int
    class_means: tuple[tuple[float, ...], ...] | None = None  # only for vision_token="class_mean"
    resume_dir: str | None = None  # newest complete checkpoint folder found by the driver (see _internal.checkpoints)
    first_epoch: int = 0  # the epoch that checkpoint was taken in (seeds the data order, see bank_dataset)
    shuffle: str = "global"  # the data order, "global" or "files" (see data_order)


def step_target(ft: FinetuneConfig, rows: int) -> tuple[int, int]:
    """``(steps_per_epoch, total_steps)``: each worker gets ⌊rows / workers⌋ rows per epoch, drops the last partial batch.

    Example:
        >>> step_target(FinetuneConfig(num_workers=2, batch_size=16, epochs=3), rows=1000)
        (31, 93)
    """
    per_epoch = (rows // ft.num_workers) // ft.batch_size
    if per_epoch == 0:
        raise ValueError(
            f"finetune.batch_size={ft.batch_size} x finetune.num_workers={ft.num_workers} is larger than the "
            f"{rows} training rows of the bank: lower the batch size or the number of workers"
        )
    return per_epoch, ft.max_steps or ft.epochs * per_epoch


def _tensor_shape(files: list[str], column: str) -> list[int]:
    shape = tensor_shape(files[0], column)
    if shape is None:
        raise ValueError(f"{files[0]}: column {column!r} is not a tensor column; re-encode the bank")
    return shape


def _read_scheduler_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "scheduler", "scheduler_config.json")
    if not os.path.exists(path):
        raise loading.ModelLoadError(f"{model_dir}: missing scheduler/scheduler_config.json")
    with open(path) as f:
        return json.load(f)


def check_model_and_bank(cfg: RunConfig, meta: dict, files: list[str], model_dir: str) -> dict:
    """Fail before any Ray work when the model cannot train on this bank; returns scheduler facts.

    Example:
        >>> check_model_and_bank(cfg, read_meta(cfg.out), files, model_dir)  # doctest: +SKIP
        {'prediction_type': 'epsilon'}
    """
    unet = loading.read_component_config(model_dir, "unet")
    text = loading.read_component_config(model_dir, "text_encoder")
    vae_sha = loading.weights_sha256(os.path.join(model_dir, "vae"))
    if meta["model"].get("vae_sha256") != vae_sha:
        raise ValueError(
            f"the latent bank at {RunLayout(cfg.out).bank_dir()} was encoded with another VAE ({meta['model'].get('pretrained')}) "
            f"than model.pretrained={cfg.model.pretrained!r}; re-encode with this model (new --out)"
        )
    if int(text["hidden_size"]) != int(unet["cross_attention_dim"]):
        raise ValueError(
            f"{model_dir}: text encoder width {text['hidden_size']} != UNet cross_attention_dim {unet['cross_attention_dim']}"
        )
    channels, *hw = meta["latent_shape"]
    if channels != int(unet["in_channels"]):
        raise ValueError(f"bank latents have {channels} channels but the UNet expects in_channels={unet['in_channels']}")
    size = unet.get("sample_size")
    if size is not None and hw != [int(size)] * 2:
        factor = meta["model"]["vae_downsample"]
        raise ValueError(
            f"bank latents are {hw[0]}x{hw[1]} (encode.resolution={meta['resolution']}) but the UNet's sample_size is "
            f"{size}: re-encode with encode.resolution={int(size) * factor}"
        )
    if _tensor_shape(files, "latent_mean") != meta["latent_shape"]:
        raise ValueError(f"{files[0]}: latent_mean shape differs from _meta.json latent_shape {meta['latent_shape']}")
    if meta.get("format", 1) < 2:
        raise ValueError(
            f"the latent bank at {RunLayout(cfg.out).bank_dir()} has no fine-tuning view (bank format {meta.get('format', 1)}, "
            "written before random crops of the whole image were stored): re-encode it into a new --out"
        )
    if cfg.finetune.vision_token != "none":
        check_vision_token_width(int(text["hidden_size"]), _tensor_shape(files, "clip_embed")[0])
    sched = _read_scheduler_config(model_dir)
    prediction_type = sched.get("prediction_type", "epsilon")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"{model_dir}: scheduler prediction_type {prediction_type!r}; supported: epsilon, v_prediction")
    return {"prediction_type": prediction_type}


def plan_finetune(cfg: RunConfig, meta: dict, files: list[str], total_steps: int) -> FinetunePlan:
    """Resolve the model and check it against the bank (no Ray); see :func:`check_model_and_bank`."""
    model_dir = loading.resolve_model_dir(cfg.model.pretrained, cfg.model.revision, cfg.model.hub_timeout_s)
    facts = check_model_and_bank(cfg, meta, files, model_dir)
    num_classes, rows = len(meta["class_dirs"]), int(meta["splits"]["train"]["rows"])
    means = None
    if cfg.finetune.vision_token == "class_mean":
        means = tuple(tuple(float(v) for v in row) for row in class_mean_embeddings(files, num_classes))
    return FinetunePlan(
        model_dir=model_dir,
        bank_files=tuple(files),
        rows=rows,
        total_steps=total_steps,
        shuffle=data_order(cfg.finetune, rows),
        num_classes=num_classes,
        class_means=means,
        **facts,
    )
