"""Tests for realfake_ray.method.losses: MMD estimators, Min-SNR weights, the fine-tuning loss, gathering."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from realfake_ray.method.losses import (
    denoising_loss,
    distribution_matching_loss,
    finetune_loss,
    gather_with_grad,
    global_mmd_scale,
    median_heuristic_bandwidths,
    min_snr_weights,
    mmd2,
)

BANDWIDTHS = (0.5, 1.0, 3.0)


def _sets(n: int = 5, m: int = 6, d: int = 4, shift: float = 0.7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(m, d, generator=g, dtype=torch.float64) + shift
    return x, y


def _kernel(kind: str):
    if kind == "linear":
        return lambda a, b: float(a @ b)
    return lambda a, b: sum(math.exp(-float((a - b).pow(2).sum()) / (2 * s * s)) for s in BANDWIDTHS)


def _brute_mmd2(x: torch.Tensor, y: torch.Tensor, kind: str, unbiased: bool) -> float:
    """Textbook double loops over all pairs."""
    k, n, m = _kernel(kind), len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if not (unbiased and i == j))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if not (unbiased and i == j))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m))
    nxx, nyy = (n * (n - 1), m * (m - 1)) if unbiased else (n * n, m * m)
    return xx / nxx + yy / nyy - 2 * xy / (n * m)


# --------------------------------------------------------------------------------------- mmd2


@pytest.mark.parametrize("kind", ["linear", "gaussian"])
@pytest.mark.parametrize("unbiased", [True, False])
def test_mmd2_matches_brute_force(kind: str, unbiased: bool) -> None:
    x, y = _sets()
    got = mmd2(x, y, kernel=kind, bandwidths=BANDWIDTHS, unbiased=unbiased)
    assert got.item() == pytest.approx(_brute_mmd2(x, y, kind, unbiased), rel=1e-9, abs=1e-12)


def test_linear_closed_forms() -> None:
    x, y = _sets(n=7, m=4)
    biased = (x.mean(0) - y.mean(0)).pow(2).sum()
    assert mmd2(x, y, unbiased=False).item() == pytest.approx(biased.item(), rel=1e-12)
    # U-statistic = ‖x̄ − ȳ‖² − tr(Sx)/n − tr(Sy)/m with unbiased sample covariances.
    correction = x.var(0, unbiased=True).sum() / 7 + y.var(0, unbiased=True).sum() / 4
    assert mmd2(x, y).item() == pytest.approx((biased - correction).item(), rel=1e-9)


@pytest.mark.parametrize("kind", ["linear", "gaussian"])
def test_identical_sets(kind: str) -> None:
    x, _ = _sets(n=8)
    # The V-statistic of a set against itself is exactly zero.
    assert mmd2(x, x.clone(), kernel=kind, bandwidths=BANDWIDTHS, unbiased=False).item() == pytest.approx(0, abs=1e-12)
    # The U-statistic is not: it is ≤ 0 (its diagonal-free Kxx/Kyy means can only be below the full mean).
    unbiased = mmd2(x, x.clone(), kernel=kind, bandwidths=BANDWIDTHS).item()
    assert unbiased < 0
    if kind == "linear":
        assert unbiased == pytest.approx(-2 * x.var(0, unbiased=True).sum().item() / 8, rel=1e-9)


def test_unbiased_has_zero_mean_under_the_null() -> None:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(400, 8, 3, generator=g), torch.randn(400, 8, 3, generator=g)
    unbiased = torch.stack([mmd2(a, b) for a, b in zip(x, y)])
    biased = torch.stack([mmd2(a, b, unbiased=False) for a, b in zip(x, y)])
    assert abs(unbiased.mean()) < 4 * unbiased.std() / 20  # 4 standard errors of 400 draws
    assert biased.mean() == pytest.approx(3 * (1 / 8 + 1 / 8), rel=0.2)  # tr(Σ)(1/n + 1/m)


@pytest.mark.parametrize("kind", ["linear", "gaussian"])
def test_grows_with_mean_shift(kind: str) -> None:
    x, y0 = _sets(n=16, m=16, shift=0.0)
    values = [mmd2(x, y0 + s, kernel=kind, bandwidths=BANDWIDTHS).item() for s in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert values == sorted(values) and values[-1] > values[0]


def test_default_bandwidths_median_heuristic() -> None:
    x, y = torch.zeros(2, 3), torch.ones(2, 3)
    # Pooled pairwise squared distances {0, 0, 3, 3, 3, 3}: median 3, so 2σ² = 3·factor.
    assert median_heuristic_bandwidths(x, y, [1.0, 4.0]) == pytest.approx([1.5**0.5, 6**0.5])
    x, y = _sets(n=10, m=10, shift=2.0)
    assert mmd2(x, y, kernel="gaussian").item() > 0


@pytest.mark.parametrize("kind", ["linear", "gaussian"])
@pytest.mark.parametrize("unbiased", [True, False])
def test_mmd2_gradients(kind: str, unbiased: bool) -> None:
    x, y = _sets(n=4, m=3, d=3)
    x.requires_grad_(True)
    y.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: mmd2(a, b, kind, BANDWIDTHS, unbiased), (x, y))


def test_mmd2_gradient_at_coincident_points_is_finite() -> None:
    x = torch.zeros(3, 4, requires_grad=True)
    mmd2(x, torch.ones(3, 4), kernel="gaussian").backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_mmd2_flattens_higher_rank() -> None:
    x, y = _sets(n=4, m=5, d=6)
    want = mmd2(x, y, "gaussian", BANDWIDTHS)
    assert mmd2(x.view(4, 2, 3), y.view(5, 3, 2), "gaussian", BANDWIDTHS).item() == pytest.approx(want.item())


def test_mmd2_errors() -> None:
    with pytest.raises(ValueError, match="d=3.*d=4"):
        mmd2(torch.zeros(4, 3), torch.zeros(4, 4))
    with pytest.raises(ValueError, match="at least 2 samples.*n=1"):
        mmd2(torch.zeros(1, 3), torch.zeros(4, 3))
    mmd2(torch.zeros(1, 3), torch.zeros(1, 3), unbiased=False)  # the V-statistic is fine with one sample
    with pytest.raises(ValueError, match="kernel"):
        mmd2(torch.zeros(4, 3), torch.zeros(4, 3), kernel="cubic")
    with pytest.raises(ValueError, match="bandwidths"):
        mmd2(torch.zeros(4, 3), torch.zeros(4, 3), kernel="gaussian", bandwidths=[0.0])


# ------------------------------------------------------------------------------------ Min-SNR


ALPHAS = torch.tensor([0.9, 0.5, 0.02])
SNR = [9.0, 1.0, 0.02 / 0.98]


@pytest.mark.parametrize(
    ("prediction_type", "expected"),
    [
        ("epsilon", [5 / 9, 1.0, 1.0]),
        ("v_prediction", [5 / 10, 1 / 2, SNR[2] / (SNR[2] + 1)]),
        ("sample", [5.0, 1.0, SNR[2]]),
    ],
)
def test_min_snr_weights(prediction_type: str, expected: list[float]) -> None:
    w = min_snr_weights(torch.tensor([0, 1, 2]), ALPHAS, gamma=5.0, prediction_type=prediction_type)
    assert w.dtype == torch.float32
    assert w.tolist() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("gamma", [None, 0, 0.0])
def test_min_snr_off(gamma) -> None:
    assert min_snr_weights(torch.tensor([0, 2]), ALPHAS, gamma=gamma).tolist() == [1.0, 1.0]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_match_diffusers_compute_snr(prediction_type: str) -> None:
    """The weights of diffusers' own training scripts (``compute_snr``, then min(SNR, γ) / SNR for epsilon,
    / (SNR + 1) for v-prediction) on SD v1.5's schedule, every timestep. ``compute_snr`` squares √ᾱ/√(1−ᾱ), so it
    agrees with ᾱ/(1−ᾱ) to ~3e-7 relative, not bit for bit: why min_snr_weights keeps its own one-line SNR
    (bit-identical fine-tuning runs; docs/finetune.md)."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    timesteps = torch.arange(scheduler.config.num_train_timesteps)
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.stack([snr, 5.0 * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    expected = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}[prediction_type]
    ours = min_snr_weights(timesteps, scheduler.alphas_cumprod, gamma=5.0, prediction_type=prediction_type)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=0)
    if prediction_type == "epsilon":  # timesteps on both sides of γ: clipped (< 1) and not (= 1)
        assert (ours < 1).any() and (ours == 1).any()


def test_min_snr_unknown_prediction_type() -> None:
    with pytest.raises(ValueError, match="prediction_type 'flow'"):
        min_snr_weights(torch.tensor([0]), ALPHAS, prediction_type="flow")


# ---------------------------------------------------------------------------------- the losses


def test_denoising_loss_by_hand() -> None:
    pred = torch.tensor([[1.0, 3.0], [2.0, 2.0]])
    target = torch.zeros(2, 2)
    # per-sample MSE: (1 + 9)/2 = 5 and (4 + 4)/2 = 4
    assert denoising_loss(pred, target).item() == pytest.approx(4.5)
    assert denoising_loss(pred, target, torch.tensor([0.5, 2.0])).item() == pytest.approx((2.5 + 8) / 2)
    with pytest.raises(ValueError, match="weights"):
        denoising_loss(pred, target, torch.ones(3))


def test_distribution_matching_linear_by_hand() -> None:
    g = torch.Generator().manual_seed(3)
    pred, target = torch.randn(3, 2, 2, generator=g), torch.randn(3, 2, 2, generator=g)
    w = torch.tensor([0.2, 1.0, 3.0])
    total = 0.0
    for pos in [(a, b) for a in range(2) for b in range(2)]:
        diff = sum(w[i] * (pred[i][pos] - target[i][pos]) for i in range(3))
        total += float(diff) ** 2
    assert distribution_matching_loss(pred, target, w).item() == pytest.approx(total / 4, rel=1e-5)


def test_distribution_matching_gaussian_weights_samples() -> None:
    pred, target = _sets(n=4, m=4, d=6)
    w = torch.tensor([1.0, 0.5, 2.0, 1.5], dtype=torch.float64)
    got = distribution_matching_loss(pred.view(4, 2, 3), target.view(4, 2, 3), w, "gaussian", BANDWIDTHS)
    want = mmd2((pred * w[:, None]).float(), (target * w[:, None]).float(), "gaussian", BANDWIDTHS)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def _finetune_inputs(batch: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(batch, 4, 4, 4, generator=g, requires_grad=True)
    target = torch.randn(batch, 4, 4, 4, generator=g)
    timesteps = torch.randint(0, 1000, (batch,), generator=g)
    alphas_cumprod = torch.cumprod(1 - torch.linspace(0.00085, 0.012, 1000), 0)
    return pred, target, timesteps, alphas_cumprod


def test_finetune_loss_combines_terms() -> None:
    pred, target, t, ac = _finetune_inputs()
    out = finetune_loss(pred, target, t, ac, mmd_weight=0.5)
    assert set(out) == {"loss", "denoise", "mmd"}
    assert all(torch.isfinite(v) for v in out.values())
    assert not out["denoise"].requires_grad and not out["mmd"].requires_grad
    assert out["loss"].item() == pytest.approx((out["denoise"] + 0.5 * out["mmd"]).item(), rel=1e-6)
    w = min_snr_weights(t, ac)
    assert out["mmd"].item() == pytest.approx(distribution_matching_loss(pred, target, w).item(), rel=1e-6)
    # Outside torch.distributed (world size 1) the global scope is the local batch.
    world = finetune_loss(pred, target, t, ac, mmd_weight=0.5, mmd_scope="global")
    assert world["loss"].item() == pytest.approx(out["loss"].item())


def test_finetune_loss_defaults_to_the_reference_local_scope() -> None:
    import inspect

    assert inspect.signature(finetune_loss).parameters["mmd_scope"].default == "local"
    from realfake_ray.config import FinetuneConfig

    assert FinetuneConfig().mmd_scope == "local"


def test_global_mmd_scale_keeps_a_shared_bias_equally_strong_at_any_world_size() -> None:
    # A systematic offset of the predictions: the linear term on W·B samples is W² times the local one;
    # the scale brings it back, so one mmd_weight means one strength at any worker count.
    pred, target, t, ac = _finetune_inputs(batch=8)
    biased = target + 0.3
    w = torch.ones(8)
    local = distribution_matching_loss(biased[:2], target[:2], w[:2])
    gathered = distribution_matching_loss(biased, target, w)  # 4 "ranks" of 2
    assert gathered.item() == pytest.approx(16 * local.item(), rel=1e-5)
    assert (gathered * global_mmd_scale("linear", 4)).item() == pytest.approx(local.item(), rel=1e-5)
    assert global_mmd_scale("gaussian", 4) == 1.0
    with pytest.raises(ValueError, match="mmd_kernel"):
        global_mmd_scale("cosine", 2)


def test_finetune_loss_zero_mmd_weight_reports_but_does_not_train() -> None:
    pred, target, t, ac = _finetune_inputs()
    out = finetune_loss(pred, target, t, ac, mmd_weight=0.0, mmd_kernel="gaussian")
    assert out["mmd"].item() != 0 and not out["mmd"].requires_grad
    assert out["loss"].item() == out["denoise"].item()
    out["loss"].backward()
    grad = pred.grad.clone()
    pred.grad = None
    denoising_loss(pred, target, min_snr_weights(t, ac)).backward()
    assert torch.equal(grad, pred.grad)


def test_finetune_loss_validates_choices() -> None:
    pred, target, t, ac = _finetune_inputs()
    with pytest.raises(ValueError, match="mmd_kernel='rbf'"):
        finetune_loss(pred, target, t, ac, mmd_kernel="rbf")
    with pytest.raises(ValueError, match="mmd_scope='world'"):
        finetune_loss(pred, target, t, ac, mmd_scope="world")


# ----------------------------------------------------------------------------------- gathering


def test_gather_with_grad_identity_without_dist() -> None:
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x


def _gather_worker(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        coef = torch.arange(12.0).view(4, 3)
        x = torch.full((2, 3), float(rank + 1), requires_grad=True)
        g = gather_with_grad(x)
        assert torch.equal(g, torch.tensor([1.0] * 6 + [2.0] * 6).view(4, 3))
        (g * coef).sum().backward()
        # Every rank's loss sees this shard: gradients are summed across the 2 ranks.
        assert torch.equal(x.grad, 2 * coef[2 * rank : 2 * rank + 2])
        # The global DM term is the single-process term on the concatenated batch, divided by W² (linear);
        # the default local scope sees only this rank's shard.
        pred, target, t, ac = _finetune_inputs(batch=4, seed=7)
        shard = slice(2 * rank, 2 * rank + 2)
        dm = finetune_loss(pred[shard], target[shard], t[shard], ac, mmd_scope="global")["mmd"]
        assert torch.allclose(dm, finetune_loss(pred, target, t, ac)["mmd"] / world**2)
        local = finetune_loss(pred[shard], target[shard], t[shard], ac)["mmd"]
        assert torch.allclose(local, finetune_loss(pred[shard], target[shard], t[shard], ac, mmd_scope="local")["mmd"])
        assert not torch.allclose(local, dm)
    finally:
        dist.destroy_process_group()
    # Skip interpreter teardown: gloo's background threads can abort a normal exit ("terminate called
    # without an active exception"), a torch shutdown race unrelated to what this test checks.
    os._exit(0)


def test_gather_with_grad_two_gloo_ranks(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # loopback only: no dependence on the host's interfaces
    mp.spawn(_gather_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True)
