"""A classifier trained in one process on in-memory images: the quick judge of a set of images.

Used where many small classifiers are trained side by side and Ray Train's per-run overhead would dominate:
sampler tuning (one per finalist setting) and the privacy audit (one per shadow run). Same pieces and recipe
as the train stage (:mod:`realfake_ray.method.classifier`, a :class:`~realfake_ray.config.TrainConfig`), on the
CPU threads or GPU of the calling process, one seed for everything.

Example:
    >>> from realfake_ray.config import TrainConfig
    >>> t = TrainConfig(recipe="digits-32px", batch_size=8)
    >>> images, labels = np.zeros((16, 32, 32, 3), np.uint8), np.arange(16) % 2
    >>> model = train_quick(images, labels, t, num_classes=2, budget_images=16, seed=0)
    >>> top1(model, images, labels, t) in (0.0, 0.5, 1.0)
    True
    >>> margins(model, images, labels, t).shape
    (16,)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from realfake_ray.data.views import TrainView, eval_view
from realfake_ray.method.classifier import (
    build_classifier,
    build_optimizer,
    build_scheduler,
    evaluate_batches,
    scaled_lr,
    to_model_input,
    train_step,
)

__all__ = ["train_quick", "top1", "margins", "classifier_accuracy"]

_EVAL_BATCH = 256


def train_quick(images: np.ndarray, labels: np.ndarray, train_cfg, num_classes: int, budget_images: int,
                seed: int) -> torch.nn.Module:
    """A classifier trained from scratch on uint8 ``[N,H,W,3]`` ``images`` with the ``train_cfg`` recipe
    for about ``budget_images`` images (random batches with replacement, the recipe's augmentation)."""
    t = train_cfg
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = build_classifier(t.arch, num_classes, t.zero_init_residual)
    batch = min(t.batch_size, len(images))
    steps = max(1, budget_images // batch)
    warmup = min(steps, round(steps * t.warmup_epochs / max(t.epochs, 1)))
    lr = scaled_lr(t.base_lr, batch, t.lr_reference_batch)
    optimizer = build_optimizer(model, lr, momentum=t.momentum, weight_decay=t.weight_decay, nesterov=t.nesterov,
                                decay_norm_and_bias=t.decay_norm_and_bias)
    scheduler = build_scheduler(optimizer, t.schedule, steps, warmup, [int(f * steps) for f in sorted(t.milestones)],
                                t.gamma, warmup_start=min(1.0, t.warmup_lr / lr))
    view = TrainView(t.image_size, tuple(t.crop_scale), t.interpolation, t.hflip, t.color_jitter)
    rng = np.random.default_rng(seed)
    pil = [Image.fromarray(image) for image in images]
    targets = torch.tensor(labels, dtype=torch.long)
    for _ in range(steps):
        idx = torch.randint(len(pil), (batch,), generator=generator).numpy()
        x = to_model_input(np.stack([view(pil[i], rng) for i in idx]))
        train_step(model, optimizer, scheduler, x, targets[idx], label_smoothing=t.label_smoothing)
    return model.eval()


def _eval_batches(images: Sequence[np.ndarray], labels: np.ndarray, train_cfg):
    t = train_cfg
    views = np.stack([eval_view(Image.fromarray(v), t.image_size, t.eval_crop_pct, t.eval_interpolation) for v in images])
    for i in range(0, len(views), _EVAL_BATCH):
        yield to_model_input(views[i : i + _EVAL_BATCH]), torch.tensor(labels[i : i + _EVAL_BATCH], dtype=torch.long)


def top1(model: torch.nn.Module, images: Sequence[np.ndarray], labels: np.ndarray, train_cfg) -> float:
    """Top-1 accuracy on ``images`` (uint8 ``[H,W,3]`` each, any size: the recipe's eval view)."""
    num_classes = int(model.fc.out_features) if hasattr(model, "fc") else int(labels.max()) + 1
    return float(evaluate_batches(model, _eval_batches(images, labels, train_cfg), num_classes)["top1"])


@torch.inference_mode()
def margins(model: torch.nn.Module, images: Sequence[np.ndarray], labels: np.ndarray, train_cfg) -> np.ndarray:
    """The logit-scaled confidence of the true class, ``log p_y − log(1 − p_y)``, per image (float64): the
    statistic of the likelihood-ratio membership attack (Carlini et al. 2022), near-Gaussian across models."""
    model.eval()
    out = []
    for x, y in _eval_batches(images, labels, train_cfg):
        logp = torch.log_softmax(model(x).double(), dim=1)
        true = logp.gather(1, y[:, None]).squeeze(1)
        rest = torch.logsumexp(logp.scatter(1, y[:, None], float("-inf")), dim=1)  # log(1 - p_y), stably
        out.append((true - rest).numpy())
    return np.concatenate(out)


def classifier_accuracy(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    val_images: Sequence[np.ndarray],
    val_labels: np.ndarray,
    train_cfg,
    num_classes: int,
    budget_images: int,
    seed: int,
) -> float:
    """Top-1 on the real val images of a classifier trained from scratch, in this process, on
    ``train_images`` (uint8 ``[N,H,W,3]``) with the ``train_cfg`` recipe (a :class:`TrainConfig`) for about
    ``budget_images`` images. One seed for every setting, so settings differ only by their images."""
    model = train_quick(train_images, train_labels, train_cfg, num_classes, budget_images, seed)
    return top1(model, val_images, val_labels, train_cfg)
