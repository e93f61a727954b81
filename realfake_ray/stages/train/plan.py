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
import math
from dataclasses import dataclass

from realfake_ray import storage
from realfake_ray.method.classifier import build_classifier
from realfake_ray.data.labelled import output_dir, real_set, real_train_set, set_digest, synthetic_set
from realfake_ray.data.sources import LabelledSet
from realfake_ray.config import ConfigError, RunConfig, TrainConfig

__all__ = ["TrainPlan", "epoch_composition", "epoch_repeats", "fingerprint", "run_name", "apply_budget", "shuffle_mode",
           "plan_training", "done_url", "finished_summary", "is_complete"]


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


def epoch_repeats(train: TrainConfig, images: int) -> int:
    """How many times an epoch passes over its ``images``: 1, or — when ``train.budget_images`` would take more
    than ``train.epochs`` epochs of a small set (the data-scarce regime) — enough passes that the budget fits in
    about ``train.epochs`` epochs, so a 100-image set trains 29 epochs of 1,500 images, not 431 of 100 (each
    with its validation pass). Example: ``epoch_repeats(digits-32px recipe, 100)`` → 15."""
    if train.budget_images is None or images <= 0:
        return 1
    return max(1, math.ceil(train.budget_images / (train.epochs * images)))


@dataclass
class TrainPlan:
    """Everything the trainer needs, checked on the driver before any Ray work. The sets are listings (Arrow
    columns or shard lists), never one Python object per image."""

    class_dirs: list[str]
    class_names: list[str]
    real: LabelledSet | None  # None when the epoch takes no real image
    synthetic: LabelledSet | None
    val: LabelledSet | None
    real_fraction: float
    synthetic_fraction: float
    epoch_images: int
    steps_per_epoch: int
    run_name: str
    missing_synthetic_classes: list[str]
    fingerprint: dict
    shuffle: str = "global"  # "global" or "blocks" (see train.shuffle)
    repeats: int = 1  # passes over the sampled sets per epoch (epoch_repeats); epoch_images counts them all

    @property
    def real_images(self) -> int:
        return self.real.num_images if self.real else 0

    @property
    def synthetic_images(self) -> int:
        return self.synthetic.num_images if self.synthetic else 0


def fingerprint(cfg: RunConfig, data_digest: str | None = None) -> dict:
    """What identifies a training run: everything but ``train.epochs`` and placement-only settings, plus
    ``data_digest`` (:func:`~realfake_ray.data.labelled.set_digest` of the sets it samples from), so that a synthetic set that
    changed (``--mult 10`` after ``--mult 2``) trains a new classifier instead of reusing the old one."""
    placement = {"epochs", "use_gpu", "decode_cpus", "worker_cpus", "torch_threads", "cache", "checkpoint_keep",
                 "max_failures", "tag", "real_baseline"}
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


def shuffle_mode(cfg: RunConfig, synthetic: LabelledSet | None, synthetic_fraction: float) -> str:
    """``global`` or ``blocks`` for this run (``train.shuffle``; ``auto``: global while the sharded images of an
    epoch stay within ``train.global_shuffle_max_images``)."""
    t = cfg.train
    if t.shuffle != "auto":
        return t.shuffle
    sharded = synthetic.num_images * synthetic_fraction if synthetic is not None and synthetic.sharded else 0
    return "global" if sharded <= t.global_shuffle_max_images else "blocks"


def _missing_classes(synthetic: LabelledSet | None, class_dirs: list[str]) -> list[str]:
    """Real classes without a synthetic image (per-image sets; a sharded set's labels are inside its shards)."""
    counts = synthetic.class_counts() if synthetic is not None else None
    return [] if counts is None else [d for d, n in zip(class_dirs, counts) if n == 0]


def plan_training(cfg: RunConfig) -> TrainPlan:
    """Validate data, classes, architecture and batch sizes; list the sets. No Ray work."""

    t, data = cfg.train, cfg.require_data()
    listed = real = real_train_set(cfg)
    class_dirs = real.class_dirs
    build_classifier(t.arch, len(class_dirs))  # unknown arch: the classifier's error, with suggestions
    synth = synthetic_set(cfg, class_dirs, real.class_names) if t.source in ("synthetic", "mix") else None
    val = real_set(data.val, cfg, class_dirs, data.val_labels) if data.val else None
    n_synth = synth.num_images if synth else 0
    real_frac, synth_frac, n_epoch = epoch_composition(real.num_images, n_synth, t.source, t.mix_ratio)
    repeats = epoch_repeats(t, n_epoch)
    n_epoch *= repeats
    global_batch = t.batch_size * t.num_workers
    if n_epoch < global_batch:
        raise ConfigError(
            f"train.batch_size × train.num_workers = {global_batch} exceeds the {n_epoch} images of an epoch "
            f"(source={t.source}); lower train.batch_size"
        )
    _check_storage(output_dir(cfg))
    real = real if real_frac > 0 else None
    digest = hashlib.sha256("".join(set_digest(s) for s in (real, synth) if s is not None).encode()).hexdigest()
    return TrainPlan(
        class_dirs, listed.class_names, real, synth, val, real_frac, synth_frac, n_epoch, (n_epoch // t.num_workers) // t.batch_size, run_name(cfg, digest),
        _missing_classes(synth, class_dirs), fingerprint(cfg, digest), shuffle_mode(cfg, synth, synth_frac), repeats,
    )


def done_url(cdir: str) -> str:
    """``<classifier dir>/_done.json``: the summary of a complete run, written last."""
    return storage.join(cdir, "_done.json")


def finished_summary(cfg: RunConfig, plan: TrainPlan) -> dict | None:
    """The summary of this run when its training is complete (``cfg`` with its budget applied), else None."""
    url = done_url(output_dir(cfg))
    done = storage.read_json(url) if storage.exists(url) else None
    return done if done and done.get("fingerprint") == plan.fingerprint and done.get("epochs") == cfg.train.epochs \
        else None


def is_complete(cfg: RunConfig) -> bool:
    """Whether this classifier's training is complete (the train stage would only re-check its evaluation)."""
    plan = plan_training(cfg)
    return finished_summary(apply_budget(cfg, plan.epoch_images), plan) is not None
