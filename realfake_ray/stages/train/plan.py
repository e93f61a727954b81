"""Planning of the train stage, without Ray: the rows a classifier samples from, each epoch's real/synthetic
composition, the image budget, and the run name that identifies a configuration (so a rerun resumes only
its own checkpoints). Every check runs here, on the driver, before any Ray work.

Example:
    >>> epoch_composition(1000, 10000, "mix", 0.5)
    (1.0, 0.1, 2000)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from realfake_ray import storage
from realfake_ray.method.classifier import build_classifier
from realfake_ray.data.labelled import output_dir, real_rows, rows_digest, synthetic_rows
from realfake_ray.config import ConfigError, RunConfig

__all__ = ["TrainPlan", "epoch_composition", "fingerprint", "run_name", "apply_budget", "plan_training"]


def epoch_composition(n_real: int, n_synth: int, source: str, mix_ratio: float) -> tuple[float, float, int]:
    """``(real fraction, synthetic fraction, expected images)`` sampled per epoch.

    ``mix``: all real images plus enough synthetic ones that they are ``mix_ratio`` of the epoch; when
    there are too few synthetic images, all of them plus a real subset. Example::

        epoch_composition(1000, 10000, "mix", 0.5)  # → (1.0, 0.1, 2000)
    """
    if source == "real":
        return 1.0, 0.0, n_real
    if source == "synthetic":
        return 0.0, 1.0, n_synth
    want_synth = n_real * mix_ratio / (1.0 - mix_ratio)
    if want_synth <= n_synth:
        return 1.0, want_synth / n_synth, n_real + round(want_synth)
    want_real = n_synth * (1.0 - mix_ratio) / mix_ratio
    return want_real / n_real, 1.0, n_synth + round(want_real)


@dataclass
class TrainPlan:
    """Everything the trainer needs, checked on the driver before any Ray work."""

    class_dirs: list[str]
    class_names: list[str]
    real: list[dict]
    synthetic: list[dict]
    val: list[dict]
    real_fraction: float
    synthetic_fraction: float
    epoch_images: int
    steps_per_epoch: int
    run_name: str
    missing_synthetic_classes: list[str]
    fingerprint: dict


def fingerprint(cfg: RunConfig, data_digest: str | None = None) -> dict:
    """What identifies a training run: everything but ``train.epochs`` and placement-only settings, plus
    ``data_digest`` (:func:`rows_digest` of the images it samples from), so that a synthetic set that
    changed (``--mult 10`` after ``--mult 2``) trains a new classifier instead of reusing the old one."""
    placement = {"epochs", "use_gpu", "decode_cpus", "worker_cpus", "checkpoint_keep", "max_failures", "tag",
                 "real_baseline"}
    train = cfg.train.model_dump(mode="json", exclude=placement)
    data = cfg.data.model_dump(mode="json", include={"train", "val", "classes_file"})
    return {"seed": cfg.seed, "train": train, "data": data, "rows": data_digest}


def run_name(cfg: RunConfig, data_digest: str | None = None) -> str:
    """Ray Train run name: checkpoints of one configuration, so that a rerun resumes only its own run."""
    digest = hashlib.sha256(json.dumps(fingerprint(cfg, data_digest), sort_keys=True).encode()).hexdigest()[:10]
    return f"run-{cfg.train.source}-{storage.safe_name(cfg.train.arch)}-{digest}"


def _check_storage(url: str) -> None:
    if storage.is_local(url):
        return
    import pyarrow.fs

    try:
        pyarrow.fs.FileSystem.from_uri(url)
    except Exception as exc:
        raise ConfigError(
            f"out: Ray Train checkpoints need a pyarrow filesystem (local, s3://, gs://, hdfs://); {url}: {exc}"
        ) from None


def apply_budget(cfg: RunConfig, epoch_images: int) -> RunConfig:
    """``cfg`` with ``train.epochs`` (and ``warmup_epochs``, in proportion) resolved from ``train.budget_images``.

    With a budget every classifier sees about the same number of images: a 10× synthetic set trains a tenth
    of the epochs of the 1× one. Without one, ``cfg`` is returned unchanged.

    Example:
        >>> cfg = load_config(preset="tiny", overrides=["train.budget_images=43110"])  # doctest: +SKIP
        >>> apply_budget(cfg, 14370).train.epochs  # doctest: +SKIP
        3
    """
    t = cfg.train
    if t.budget_images is None:
        return cfg
    epochs = max(1, round(t.budget_images / max(epoch_images, 1)))
    train = t.model_copy(update={"epochs": epochs, "warmup_epochs": t.warmup_epochs * epochs / t.epochs})
    return cfg.model_copy(update={"train": train})


def plan_training(cfg: RunConfig) -> TrainPlan:
    """Validate data, classes, architecture and batch sizes; list the rows. No Ray work."""

    t, data = cfg.train, cfg.require_data()
    real_index, real = real_rows(data.train, cfg)
    class_dirs = real_index.class_dirs
    build_classifier(t.arch, len(class_dirs))  # unknown arch: the classifier's error, with suggestions
    synth = synthetic_rows(cfg, class_dirs) if t.source in ("synthetic", "mix") else []
    val = real_rows(data.val, cfg, class_dirs)[1] if data.val else []
    real_frac, synth_frac, n_epoch = epoch_composition(len(real), len(synth), t.source, t.mix_ratio)
    global_batch = t.batch_size * t.num_workers
    if n_epoch < global_batch:
        raise ConfigError(
            f"train.batch_size × train.num_workers = {global_batch} exceeds the {n_epoch} images of an epoch "
            f"(source={t.source}); lower train.batch_size"
        )
    _check_storage(output_dir(cfg))
    covered = {r["label"] for r in synth}
    missing = [d for i, d in enumerate(class_dirs) if synth and i not in covered]
    real = real if real_frac > 0 else []
    digest = rows_digest(real + synth)
    return TrainPlan(
        class_dirs, real_index.class_names, real, synth, val, real_frac, synth_frac, n_epoch,
        (n_epoch // t.num_workers) // t.batch_size, run_name(cfg, digest), missing, fingerprint(cfg, digest),
    )
