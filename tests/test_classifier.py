"""Unit tests for realfake_ray.method.classifier (CPU, tiny tensors)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from realfake_ray.method.classifier import (
    available_architectures,
    build_classifier,
    build_optimizer,
    build_scheduler,
    evaluate_batches,
    merge_evaluations,
    resnet_tiny,
    scaled_lr,
    to_model_input,
    train_step,
)


# ---------------------------------------------------------------------------------------------- models
@pytest.mark.parametrize(
    ("arch", "num_classes", "size"),
    [("resnet50", 10, 64), ("resnet18", 7, 64), ("mobilenet_v3_small", 3, 64), ("resnet_tiny", 10, 32)],
)
def test_build_classifier_output_width(arch: str, num_classes: int, size: int) -> None:
    model = build_classifier(arch, num_classes).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, size, size)).shape == (1, num_classes)


def test_available_architectures_lists_torchvision_and_tiny() -> None:
    names = available_architectures()
    assert {"resnet50", "vit_b_16", "resnet_tiny"} <= set(names)


def test_unknown_arch_names_close_matches() -> None:
    with pytest.raises(ValueError, match="resnet50"):
        build_classifier("resnet5O", 10)
    with pytest.raises(ValueError, match="num_classes"):
        build_classifier("resnet_tiny", 0)


# ------------------------------------------------------------------------------------------ transforms
def _images(b: int = 4, h: int = 40, w: int = 50, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (b, h, w, 3), dtype=np.uint8)


def test_to_model_input_normalises_and_rejects_bad_input() -> None:
    mean_pixel = np.full((2, 8, 8, 3), [124, 116, 104], dtype=np.uint8)  # ≈ ImageNet mean
    out = to_model_input(mean_pixel)
    assert out.shape == (2, 3, 8, 8) and out.dtype == torch.float32 and out.abs().max() < 0.02
    assert torch.equal(to_model_input(torch.from_numpy(mean_pixel[0])), out[:1])
    with pytest.raises(ValueError, match="uint8"):
        to_model_input(np.zeros((2, 3, 32, 32), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        to_model_input(np.zeros((2, 32, 32, 3), dtype=np.float32))


# --------------------------------------------------------------------------------- optimiser / schedule
def _lrs(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def test_scaled_lr_and_optimizer_groups() -> None:
    assert scaled_lr(0.1, 512) == 0.1 and scaled_lr(0.1, 1024) == pytest.approx(0.2)  # the reference: 0.1 at 512
    model = resnet_tiny(4, width=8)
    opt = build_optimizer(model, 0.1)  # the reference: Nesterov, no decay on BatchNorm weights and biases
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0 and decay["nesterov"]
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(build_optimizer(model, 0.1, decay_norm_and_bias=True).param_groups) == 1


def test_zero_init_residual_starts_every_block_as_the_identity() -> None:
    from torchvision.models.resnet import BasicBlock, Bottleneck

    for model in (build_classifier("resnet_tiny", 10, zero_init_residual=True),
                  build_classifier("resnet18", 10, zero_init_residual=True)):
        blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
        assert blocks and all(float(b.bn2.weight.detach().abs().sum()) == 0 for b in blocks)
    bottlenecks = [m for m in build_classifier("resnet50", 10, True).modules() if isinstance(m, Bottleneck)]
    assert all(float(b.bn3.weight.detach().abs().sum()) == 0 for b in bottlenecks)
    assert all(float(b.bn2.weight.detach().abs().sum()) > 0 for b in build_classifier("resnet_tiny", 10).modules()
               if isinstance(b, BasicBlock))
    build_classifier("mobilenet_v3_small", 3, zero_init_residual=True)  # not a ResNet: the flag is ignored


def test_cosine_schedule_with_warmup() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    lrs = _lrs(build_scheduler(opt, "cosine", total_steps=100, warmup_steps=10), 101)
    assert lrs[0] == pytest.approx(0.0) and lrs[5] == pytest.approx(0.5)
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.5)
    assert lrs[100] == pytest.approx(0.0, abs=1e-12)


def test_multistep_schedule() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    lrs = _lrs(build_scheduler(opt, "multistep", total_steps=100, milestones=[30, 60], gamma=0.2), 100)
    assert lrs[29] == pytest.approx(1.0) and lrs[30] == pytest.approx(0.2) and lrs[60] == pytest.approx(0.04)
    default = _lrs(build_scheduler(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), "multistep", 100), 100)
    assert default[24] == 1.0 and default[25] == pytest.approx(0.2) and default[75] == pytest.approx(0.008)


def test_warmup_starts_at_the_reference_lr() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    lrs = _lrs(build_scheduler(opt, "multistep", total_steps=200, warmup_steps=5, warmup_start=1e-5 / 0.1), 8)
    assert lrs[0] == pytest.approx(1e-5) and lrs[5] == pytest.approx(0.1)
    assert lrs[1] == pytest.approx(1e-5 + (0.1 - 1e-5) / 5)


def _closed_form(step, schedule, total, warmup, milestones, gamma, start) -> float:
    if step < warmup:
        return start + (1.0 - start) * step / warmup
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return gamma ** sum(step >= m for m in milestones)


@pytest.mark.parametrize("schedule,warmup,milestones,start", [
    ("cosine", 0, None, 0.0), ("cosine", 7, None, 1e-4), ("multistep", 0, [10, 20], 0.0),
    ("multistep", 5, [3, 30, 31], 0.0),  # a milestone inside warm-up applies when warm-up ends
])
def test_torch_schedules_follow_the_closed_form(schedule, warmup, milestones, start) -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    lrs = _lrs(build_scheduler(opt, schedule, 40, warmup, milestones, 0.5, start), 41)
    expected = [_closed_form(i, schedule, 40, warmup, milestones or [10, 20, 30], 0.5, start) for i in range(41)]
    assert lrs == pytest.approx(expected, abs=1e-9)


def test_a_restored_schedule_continues_where_it_stopped() -> None:
    def fresh():
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        return opt, build_scheduler(opt, "multistep", 40, 5, [10, 20], 0.5, 1e-3)

    opt, sched = fresh()
    for _ in range(12):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2, sched2 = fresh()
    sched2.load_state_dict(state)
    opt2.param_groups[0]["lr"] = sched2.get_last_lr()[0]
    assert _lrs(sched2, 10) == pytest.approx(_lrs(sched, 10))


def test_scheduler_rejects_unknown_schedule() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="step"):
        build_scheduler(opt, "step", total_steps=10)


# ------------------------------------------------------------------------------------- train / evaluate
def test_resnet_tiny_learns_separable_toy_problem() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 64)
    colours = np.where(labels[:, None] == 0, [200, 40, 40], [40, 40, 200])
    imgs = np.clip(colours[:, None, None, :] + rng.normal(0, 40, (64, 16, 16, 3)), 0, 255).astype(np.uint8)
    x, y = to_model_input(imgs), torch.as_tensor(labels)
    model = resnet_tiny(2)
    opt = build_optimizer(model, lr=0.05)
    sched = build_scheduler(opt, "cosine", total_steps=30, warmup_steps=3)
    accs = [train_step(model, opt, sched, x[i % 4 * 16 :][:16], y[i % 4 * 16 :][:16])["acc"] for i in range(30)]
    assert np.mean(accs[-8:]) > 0.9
    assert evaluate_batches(model, [(x, y)], num_classes=2)["top1"] > 0.9


def test_train_step_autocast_bf16() -> None:
    model = resnet_tiny(3, width=8)
    opt = build_optimizer(model, lr=0.01)
    out = train_step(model, opt, None, torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0]),
                     label_smoothing=0.1, autocast_dtype=torch.bfloat16)
    assert math.isfinite(out["loss"]) and 0.0 <= out["acc"] <= 1.0 and out["lr"] == 0.01


class _Passthrough(nn.Module):
    """Model whose 'images' are the logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _logit_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    logits = torch.tensor([
        [9.0, 1, 2, 3, 4, 5],  # label 0: top-1 hit
        [1.0, 8, 9, 3, 4, 5],  # label 1: second → top-5 hit only
        [6.0, 5, 0, 2, 3, 4],  # label 2: ranked last → miss
        [1.0, 2, 9, 3, 4, 5],  # label 2: top-1 hit
    ])
    labels = torch.tensor([0, 1, 2, 2])
    return [(logits[:2], labels[:2]), (logits[2:], labels[2:])]


def test_evaluate_batches_against_hand_computed_logits() -> None:
    res = evaluate_batches(_Passthrough(), _logit_batches(), num_classes=6)
    assert res["top1"] == 0.5 and res["top5"] == 0.75 and res["count"] == 4 and res["k"] == 5
    assert res["per_class"] == [1.0, 0.0, 0.5, None, None, None]
    shards = [evaluate_batches(_Passthrough(), [b], num_classes=6) for b in _logit_batches()]
    merged = merge_evaluations(shards)
    assert {k: merged[k] for k in ("top1", "top5", "per_class")} == {k: res[k] for k in ("top1", "top5", "per_class")}


def test_evaluate_batches_class_subset() -> None:
    logits = torch.tensor([[9.0, 1, 5, 3, 2, 0], [9.0, 8, 1, 3, 7, 0]])
    labels = torch.tensor([2, 4])  # global argmax is class 0 for both; within {1,2,4}: 2 and 1
    res = evaluate_batches(_Passthrough(), [(logits, labels)], num_classes=6, class_subset=[1, 2, 4])
    assert res["k"] == 3 and res["top1"] == 0.5 and res["top5"] == 1.0
    assert res["per_class"] == [None, None, 1.0, None, 0.0, None]
    with pytest.raises(ValueError, match="class_subset"):
        evaluate_batches(_Passthrough(), [(logits, torch.tensor([0, 2]))], num_classes=6, class_subset=[1, 2, 4])
