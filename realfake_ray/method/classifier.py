"""Classifier side of Real-Fake: models, input normalisation, optimiser/schedule, one train step, evaluation
(the image views the decode tasks cut are in :mod:`realfake_ray.data.views`).

Pure torch/torchvision (no Ray): the Ray Train loop in ``train.py`` and the evaluation stage call these.
The reference recipe (timm 0.9 ``train.py`` as the paper's scripts call it; ``train.recipe=realfake-ref``)
is ResNet-50 from scratch with zero-initialised last BatchNorms, SGD Nesterov momentum 0.9, lr 0.1 at a
global batch of 512, weight decay 5e-4 except on BatchNorm and biases, 5 warm-up epochs from 1e-5, ×0.2
at epochs 50/100/150 of 200, label smoothing 0.1, RandomResizedCrop(0.08–1, random interpolation) + flip +
ColorJitter 0.4, eval resize 235 bicubic + centre crop 224, AMP fp16. ``resnet_tiny`` is our 32-px model
for the tiny preset and CPU tests.

Example::

    model = build_classifier("resnet_tiny", num_classes=10)
    opt = build_optimizer(model, lr=scaled_lr(0.1, global_batch=128), nesterov=True, decay_norm_and_bias=False)
    sched = build_scheduler(opt, "multistep", total_steps=1000, warmup_steps=50, warmup_start=1e-4)
    pixels = np.stack([TrainView(32)(image, np.random.default_rng(i)) for i, image in enumerate(pil_images)])
    stats = train_step(model, opt, sched, to_model_input(pixels), labels)   # {"loss", "acc", "lr"}
    report = evaluate_batches(model, [(to_model_input(val_uint8), val_labels)], num_classes=10)
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock
from torchvision.transforms.v2 import functional as TF

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "TINY_ARCH", "SCHEDULES", "DEFAULT_MILESTONE_FRACTIONS",
    "available_architectures", "resnet_tiny", "build_classifier", "to_model_input",
    "scaled_lr", "build_optimizer", "build_scheduler", "train_step",
    "evaluate_batches", "merge_evaluations",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TINY_ARCH = "resnet_tiny"
SCHEDULES = ("cosine", "multistep")
#: Multistep milestones (fractions of the run) when none are given: epochs 50/100/150 of a 200-epoch run.
DEFAULT_MILESTONE_FRACTIONS = (0.25, 0.5, 0.75)


# ----------------------------------------------------------------------------------------------- models
def available_architectures() -> list[str]:
    """Names accepted by :func:`build_classifier`: every torchvision classification model plus ``resnet_tiny``.

    Example: ``"resnet50" in available_architectures()`` → ``True``.
    """
    return sorted([*torchvision.models.list_models(module=torchvision.models), TINY_ARCH])


def resnet_tiny(num_classes: int, width: int = 16, zero_init_residual: bool = False) -> nn.Module:
    """A 4-stage ResNet ([1,1,1,1] BasicBlocks, widths w/2w/4w/8w) for 32-px images: 3×3 stride-1 stem, no max-pool.

    ``zero_init_residual``: each block's last BatchNorm starts at zero (the block starts as the identity).
    Example: ``resnet_tiny(10)(torch.zeros(2, 3, 32, 32)).shape`` → ``(2, 10)``.
    """
    layers: list[nn.Module] = [
        nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
    ]
    in_ch = width
    for stage in range(4):
        out_ch, stride = width * 2**stage, 1 if stage == 0 else 2
        down = None
        if stride != 1 or in_ch != out_ch:
            down = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))
        block = BasicBlock(in_ch, out_ch, stride, down)
        if zero_init_residual:
            nn.init.zeros_(block.bn2.weight)
        layers.append(block)
        in_ch = out_ch
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_ch, num_classes)]
    return nn.Sequential(*layers)


def build_classifier(arch: str, num_classes: int, zero_init_residual: bool = False) -> nn.Module:
    """A randomly initialised classifier by name (torchvision ``get_model`` or ``resnet_tiny``).

    ``zero_init_residual`` zero-initialises the last BatchNorm of each residual block (timm's default for
    ResNets; torchvision's ``zero_init_residual``); other architectures ignore it. Raises ValueError naming
    close matches for an unknown ``arch``. Example::

        build_classifier("resnet50", 1000, zero_init_residual=True)
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if arch == TINY_ARCH:
        return resnet_tiny(num_classes, zero_init_residual=zero_init_residual)
    names = available_architectures()
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see available_architectures()"
        raise ValueError(f"unknown classifier arch {arch!r}{hint}")
    residual = {"zero_init_residual": True} if zero_init_residual and _is_resnet(arch) else {}
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **residual)


def _is_resnet(arch: str) -> bool:
    return arch.startswith(("resnet", "resnext", "wide_resnet"))


# ------------------------------------------------------------------------------------------- transforms
# The per-image views are made where the image is decoded (Ray Data CPU tasks): RandomResizedCrop from the
# whole decoded image + flip for training, resize + centre crop for evaluation. The worker only turns the
# uint8 batch into normalised floats (:func:`to_model_input`), on its own device.
def to_model_input(images: Any) -> torch.Tensor:
    """uint8 ``[B,H,W,3]`` (tensor or numpy, any device) → float32 ``[B,3,H,W]``, ImageNet mean/std normalised.

    Example: ``to_model_input(batch["pixels"].to(device))``.
    """
    x = torch.as_tensor(images)
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 [B,H,W,3] (channels last), got {x.dtype} {list(x.shape)}")
    x = x.permute(0, 3, 1, 2).contiguous()  # NCHW memory, as the model's (and DDP's gradient buckets') layout
    return TF.normalize(TF.to_dtype(x, torch.float32, scale=True), list(IMAGENET_MEAN), list(IMAGENET_STD))


# ------------------------------------------------------------------------------ optimiser and schedule
def scaled_lr(base_lr: float, global_batch: int, reference_batch: int = 512) -> float:
    """Linear scaling rule: ``base_lr × global_batch / reference_batch`` — exactly ``base_lr`` at the
    reference batch (the paper: 0.1 at 512). Example: ``scaled_lr(0.1, 1024)`` → 0.2."""
    if base_lr <= 0 or global_batch < 1 or reference_batch < 1:
        raise ValueError(f"need base_lr > 0 and batches >= 1, got {base_lr}, {global_batch}, {reference_batch}")
    return base_lr * global_batch / reference_batch


def build_optimizer(
    model: nn.Module,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    nesterov: bool = True,
    decay_norm_and_bias: bool = False,
) -> torch.optim.SGD:
    """SGD over trainable params. By default as the reference (timm): Nesterov momentum, and no weight decay
    on 1-d params (BatchNorm weights and biases, every bias); ``decay_norm_and_bias=True`` decays them too.

    Example: ``build_optimizer(model, 0.1)``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = [{"params": params, "weight_decay": weight_decay}]
    if not decay_norm_and_bias:
        groups = [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        ]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: str,
    total_steps: int,
    warmup_steps: int = 0,
    milestones: list[int] | None = None,
    gamma: float = 0.2,
    warmup_start: float = 0.0,
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step torch schedule: linear warm-up over ``warmup_steps`` from ``warmup_start`` × lr (the reference:
    1e-5 / 0.1), then ``cosine`` to 0 or ``multistep`` decay.

    Multistep ``milestones`` are step indices (default 25/50/75% of ``total_steps``); lr is multiplied by
    ``gamma`` at each. Call ``scheduler.step()`` once per optimiser step. Example::

        build_scheduler(opt, "cosine", total_steps=10_000, warmup_steps=500)
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"need total_steps >= 1 and 0 <= warmup_steps <= total_steps, got {total_steps}, {warmup_steps}"
        )
    if milestones is None:
        milestones = [int(f * total_steps) for f in DEFAULT_MILESTONE_FRACTIONS]
    if list(milestones) != sorted(milestones) or any(m < 0 for m in milestones):
        raise ValueError(f"milestones must be sorted non-negative step indices, got {milestones}")
    if not 0.0 <= warmup_start <= 1.0:
        raise ValueError(f"warmup_start must lie in [0, 1], got {warmup_start}")
    sched = torch.optim.lr_scheduler
    decay = (
        sched.CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps))
        if schedule == "cosine"
        # counted from the end of warm-up; a milestone inside warm-up applies when it ends
        else sched.MultiStepLR(optimizer, [max(0, m - warmup_steps) for m in milestones], gamma)
    )
    if warmup_steps == 0:
        return decay
    # LinearLR needs a factor > 0: a warm-up "from 0" starts at 1e-12 × lr
    ramp = sched.LinearLR(optimizer, start_factor=max(warmup_start, 1e-12), end_factor=1.0, total_iters=warmup_steps)
    return sched.SequentialLR(optimizer, [ramp, decay], milestones=[warmup_steps])


# ------------------------------------------------------------------------------------- train / evaluate
def _device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for parameter-free modules)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _logits(output: Any) -> torch.Tensor:
    """Main logits of a model output (Inception/GoogLeNet return a namedtuple with aux logits in training)."""
    return getattr(output, "logits", output)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
    scaler: torch.amp.GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """One SGD step on a normalised float batch; returns ``{"loss", "acc", "lr"}`` (lr used for this step).

    With ``scaler`` (fp16) the loss is scaled; ``autocast_dtype`` (e.g. ``torch.bfloat16``) enables AMP.
    Example: ``train_step(model, opt, sched, x, y, label_smoothing=0.1)``.
    """
    device = _device(model)
    images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    model.train()
    lr = optimizer.param_groups[0]["lr"]
    with _autocast(device, autocast_dtype):
        logits = _logits(model(images))
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    acc = (logits.detach().argmax(1) == labels).float().mean()
    return {"loss": loss.item(), "acc": acc.item(), "lr": lr}


def _finalize(correct1: int, correctk: int, count: int, k: int, pc_correct: list[int], pc_count: list[int]) -> dict:
    nan = float("nan")
    return {
        "top1": correct1 / count if count else nan,
        "top5": correctk / count if count else nan,
        "k": k,
        "count": count,
        "per_class": [c / n if n else None for c, n in zip(pc_correct, pc_count)],
        "correct1": correct1,
        "correct5": correctk,
        "per_class_correct": pc_correct,
        "per_class_count": pc_count,
    }


@torch.no_grad()
def evaluate_batches(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    class_subset: list[int] | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Top-1 / top-k (k = min(5, classes considered)) and per-class accuracy over ``(images, labels)`` batches.

    Labels are original class indices. ``class_subset`` restricts predictions to those classes (e.g. the
    200 ImageNet-R/A classes of a 1000-way model). ``per_class`` has ``num_classes`` entries (None where no
    sample); raw counts are included so shards can be merged with :func:`merge_evaluations`. Example::

        evaluate_batches(model, loader, 1000, class_subset=imagenet_r_indices)["top1"]
    """
    from torchmetrics.classification import MulticlassAccuracy  # here: importing it loads scipy and pyplot

    device = _device(model)
    model.eval()
    subset = None if class_subset is None else torch.as_tensor(class_subset, dtype=torch.long, device=device)
    k = min(5, num_classes if subset is None else len(subset))
    # per-class hit counts (tp) and misses (fn) at top-1 and top-k; summing them gives the overall counts
    top1, topk = (MulticlassAccuracy(num_classes, top_k=n, average=None).to(device) for n in (1, k))
    if subset is not None:
        outside = torch.ones(num_classes, dtype=torch.bool, device=device)
        outside[subset] = False
    for images, labels in batches:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with _autocast(device, autocast_dtype):
            logits = _logits(model(images)).float()
        if subset is not None:
            if not torch.isin(labels, subset).all():
                bad = labels[~torch.isin(labels, subset)].unique().tolist()
                raise ValueError(f"labels {bad[:10]} are not in class_subset")
            logits = logits.masked_fill(outside, float("-inf"))  # predictions only among the subset
        top1.update(logits, labels)
        topk.update(logits, labels)
    pc_correct, pc_count = top1.tp, top1.tp + top1.fn
    correct1, correctk, count = int(pc_correct.sum()), int(topk.tp.sum()), int(pc_count.sum())
    return _finalize(correct1, correctk, count, k, pc_correct.tolist(), pc_count.tolist())


def merge_evaluations(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Combine :func:`evaluate_batches` results from data shards (e.g. Ray Train workers) into one.

    Example: ``merge_evaluations([shard0, shard1])["top1"]``.
    """
    if not results:
        raise ValueError("merge_evaluations needs at least one result")
    pc_correct = np.sum([r["per_class_correct"] for r in results], axis=0).tolist()
    pc_count = np.sum([r["per_class_count"] for r in results], axis=0).tolist()
    c1, c5, n = (sum(int(r[key]) for r in results) for key in ("correct1", "correct5", "count"))
    return _finalize(c1, c5, n, results[0]["k"], pc_correct, pc_count)

