"""Losses for distribution-matching LoRA fine-tuning (pure torch; no Ray, no pydantic).

The fine-tuning objective is the Min-SNR-weighted denoising loss plus ``mmd_weight`` times a
distribution-matching (MMD) term between the denoiser's predictions and its targets. The reference
recipe uses a linear-kernel mean match on each GPU's own batch (no gather); a Gaussian-kernel MMD is
offered as the generalisation the paper's formula describes, and a world-size-normalised global scope
as an option.

Example:
    >>> import torch
    >>> from realfake_ray.method.losses import finetune_loss
    >>> alphas_cumprod = torch.linspace(0.999, 0.01, 1000)
    >>> pred, target = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    >>> out = finetune_loss(pred, target, torch.tensor([1, 10, 500, 999]), alphas_cumprod)
    >>> sorted(out)
    ['denoise', 'loss', 'mmd']
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_BANDWIDTH_FACTORS",
    "denoising_loss",
    "distribution_matching_loss",
    "finetune_loss",
    "gather_with_grad",
    "global_mmd_scale",
    "min_snr_weights",
    "mmd2",
]

DEFAULT_BANDWIDTH_FACTORS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
KERNELS = ("linear", "gaussian")
DM_SCOPES = ("global", "local")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


# --------------------------------------------------------------------------------------------- MMD


def _as_sample_sets(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Flatten all but dim 0 and check the two sets live in the same space."""
    if x.ndim == 0 or y.ndim == 0:
        raise ValueError(f"mmd2 needs sample sets [n, d]; got shapes {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"mmd2 feature dimension mismatch: x has d={x.shape[1]}, y has d={y.shape[1]}")
    return x, y


def _check_sizes(n: int, m: int, unbiased: bool) -> None:
    minimum = 2 if unbiased else 1
    if n < minimum or m < minimum:
        kind = "unbiased (U-statistic) estimator" if unbiased else "MMD"
        raise ValueError(f"the {kind} needs at least {minimum} samples per set; got n={n}, m={m}")


def _linear_mmd2(x: Tensor, y: Tensor, unbiased: bool) -> Tensor:
    n, m = x.shape[0], y.shape[0]
    if not unbiased:
        return (x.mean(0) - y.mean(0)).pow(2).sum()
    # Off-diagonal sums via ||Σx||² − Σ||x_i||²: O((n+m)·d) instead of forming the Gram matrices.
    sx, sy = x.sum(0), y.sum(0)
    xx = (sx.pow(2).sum() - x.pow(2).sum()) / (n * (n - 1))
    yy = (sy.pow(2).sum() - y.pow(2).sum()) / (m * (m - 1))
    xy = (sx * sy).sum() / (n * m)
    return xx + yy - 2 * xy


def _pairwise_sq_dists(z: Tensor) -> Tensor:
    """‖z_i − z_j‖² via the Gram matrix: O(N²) memory, smooth gradient even at zero distance."""
    sq = z.pow(2).sum(1)
    # Clamp: the expansion can go slightly negative in floating point; self-distances are exactly 0.
    d2 = (sq[:, None] + sq[None, :] - 2 * z @ z.T).clamp_min(0)
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    return d2.masked_fill(eye, 0.0)


@torch.no_grad()
def median_heuristic_bandwidths(
    x: Tensor, y: Tensor, factors: Sequence[float] = DEFAULT_BANDWIDTH_FACTORS
) -> list[float]:
    """RBF bandwidths σ with 2σ² = factor · median of the pooled pairwise squared distances.

    So at ``factor == 1`` a pair at the median distance has kernel value exp(-1). Computed without
    gradient; a degenerate pool (all points equal) falls back to a median of 1.

    Example:
        >>> [round(s, 3) for s in median_heuristic_bandwidths(torch.zeros(2, 3), torch.ones(2, 3), [1.0])]
        [1.225]
    """
    z = torch.cat([x, y]).detach().float()
    d2 = _pairwise_sq_dists(z)
    i, j = torch.triu_indices(len(z), len(z), offset=1, device=z.device)
    med = d2[i, j].median().item() if len(i) else 0.0
    med = med if med > 0 else 1.0
    return [(f * med / 2) ** 0.5 for f in factors]


def _gaussian_mmd2(x: Tensor, y: Tensor, bandwidths: Sequence[float], unbiased: bool) -> Tensor:
    n, m = x.shape[0], y.shape[0]
    d2 = _pairwise_sq_dists(torch.cat([x, y]))
    gammas = torch.tensor([1.0 / (2.0 * s * s) for s in bandwidths], dtype=d2.dtype, device=d2.device)
    k = torch.exp(-d2.unsqueeze(0) * gammas.view(-1, 1, 1)).sum(0)
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    if unbiased:
        xx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
        yy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    else:
        xx, yy = kxx.mean(), kyy.mean()
    return xx + yy - 2 * kxy.mean()


def mmd2(
    x: Tensor,
    y: Tensor,
    kernel: str = "linear",
    bandwidths: Sequence[float] | None = None,
    unbiased: bool = True,
) -> Tensor:
    """Squared Maximum Mean Discrepancy between sample sets ``x`` [n, d] and ``y`` [m, d].

    Inputs of higher rank are flattened to [n, prod(rest)]. Differentiable in ``x`` and ``y``.

    With kernel k, Kxx = [k(x_i, x_j)], Kyy, Kxy likewise:

    * biased (V-statistic, ``unbiased=False``):
      MMD² = mean(Kxx) + mean(Kyy) − 2·mean(Kxy)  — always ≥ 0, exactly 0 when x and y are equal sets.
    * unbiased (U-statistic, default):
      MMD² = Σ_{i≠j} Kxx_ij / (n(n−1)) + Σ_{i≠j} Kyy_ij / (m(m−1)) − 2·mean(Kxy)
      — its expectation is 0 when x and y come from the same distribution, so single values may be
      negative; needs n, m ≥ 2.

    Kernels:

    * ``"linear"``: k(a, b) = a·b. The biased form is ‖x̄ − ȳ‖²; the unbiased form equals
      ‖x̄ − ȳ‖² − tr(Sx)/n − tr(Sy)/m with Sx, Sy the unbiased sample covariances.
    * ``"gaussian"``: k(a, b) = Σ_σ exp(−‖a − b‖² / (2σ²)) over ``bandwidths`` (σ values). When
      ``bandwidths`` is None they come from :func:`median_heuristic_bandwidths` on the pooled set.

    Example:
        >>> x, y = torch.randn(16, 8), torch.randn(16, 8) + 1.0
        >>> float(mmd2(x, y, unbiased=False)) == float((x.mean(0) - y.mean(0)).pow(2).sum())
        True
        >>> mmd2(x, y, kernel="gaussian", bandwidths=[1.0, 2.0]).shape
        torch.Size([])
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown MMD kernel {kernel!r}; expected one of {KERNELS}")
    x, y = _as_sample_sets(x, y)
    _check_sizes(x.shape[0], y.shape[0], unbiased)
    if kernel == "linear":
        return _linear_mmd2(x, y, unbiased)
    if bandwidths is None:
        bandwidths = median_heuristic_bandwidths(x, y)
    if len(bandwidths) == 0 or any(s <= 0 for s in bandwidths):
        raise ValueError(f"gaussian MMD bandwidths must be a non-empty list of positive σ; got {list(bandwidths)}")
    return _gaussian_mmd2(x, y, bandwidths, unbiased)


# ------------------------------------------------------------------------------------- Min-SNR


def min_snr_weights(
    timesteps: Tensor,
    alphas_cumprod: Tensor,
    gamma: float | None = 5.0,
    prediction_type: str = "epsilon",
) -> Tensor:
    """Per-sample Min-SNR-γ loss weights (Hang et al. 2023), float32, shaped like ``timesteps``.

    SNR(t) = ᾱ_t / (1 − ᾱ_t). Weights: ``"epsilon"`` min(SNR, γ)/SNR, ``"v_prediction"``
    min(SNR, γ)/(SNR + 1), ``"sample"`` min(SNR, γ). ``gamma`` None or 0 turns weighting off (ones).

    Example:
        >>> ac = torch.tensor([0.9, 0.5, 0.1])
        >>> min_snr_weights(torch.tensor([0, 1, 2]), ac, gamma=5.0)
        tensor([0.5556, 1.0000, 1.0000])
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
    if not gamma:
        return torch.ones(timesteps.shape, dtype=torch.float32, device=timesteps.device)
    alpha_bar = alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps.long()]
    snr = alpha_bar / (1.0 - alpha_bar)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    return clipped


# ------------------------------------------------------------------------------------ the losses


def _check_pair(pred: Tensor, target: Tensor, weights: Tensor | None) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if weights is not None and weights.shape != pred.shape[:1]:
        raise ValueError(f"weights must have shape [batch]={tuple(pred.shape[:1])}; got {tuple(weights.shape)}")


def _per_sample(weights: Tensor, like: Tensor) -> Tensor:
    """Reshape [B] weights to broadcast over ``like``'s non-batch dims."""
    return weights.to(like.device, torch.float32).view(-1, *([1] * (like.ndim - 1)))


def denoising_loss(pred: Tensor, target: Tensor, weights: Tensor | None = None) -> Tensor:
    """Per-sample MSE (mean over non-batch dims), times ``weights`` [B], averaged over the batch.

    Computed in float32 so fp16/bf16 predictions do not lose the loss's precision.

    Example:
        >>> denoising_loss(torch.ones(2, 3), torch.zeros(2, 3), torch.tensor([1.0, 0.0]))
        tensor(0.5000)
    """
    _check_pair(pred, target, weights)
    per_sample = (pred.float() - target.float()).pow(2).reshape(pred.shape[0], -1).mean(1)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.device, torch.float32)
    return per_sample.mean()


def distribution_matching_loss(
    pred: Tensor,
    target: Tensor,
    weights: Tensor,
    kernel: str = "linear",
    bandwidths: Sequence[float] | None = None,
) -> Tensor:
    """Distribution-matching term between predictions and targets, weighted per sample by ``weights``.

    * ``"linear"`` (the reference recipe): pred_sum = Σ_i w_i·pred_i and target_sum = Σ_i w_i·target_i
      (sums over the batch, elementwise over positions); loss = mean((pred_sum − target_sum)²).
      This is B²·‖mean_w(pred) − mean_w(target)‖² / positions, a linear-kernel MMD of the weighted sets.
    * ``"gaussian"``: the unbiased RBF :func:`mmd2` between the flattened, per-sample weighted sets
      w_i·pred_i and w_i·target_i. Weighting the samples (rather than the kernel's mixing
      probabilities) keeps the linear case's convention: both reduce to the same weighted features.

    Example:
        >>> p, t, w = torch.randn(4, 2, 3), torch.randn(4, 2, 3), torch.ones(4)
        >>> torch.allclose(distribution_matching_loss(p, t, w), (p.sum(0) - t.sum(0)).pow(2).mean())
        True
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown distribution-matching kernel {kernel!r}; expected one of {KERNELS}")
    _check_pair(pred, target, weights)
    w = _per_sample(weights, pred)
    weighted_pred, weighted_target = pred.float() * w, target.float() * w
    if kernel == "linear":
        return (weighted_pred.sum(0) - weighted_target.sum(0)).pow(2).mean()
    return mmd2(weighted_pred.flatten(1), weighted_target.flatten(1), kernel="gaussian", bandwidths=bandwidths)


# ------------------------------------------------------------------------------- distributed


def _dist_world_size() -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def gather_with_grad(x: Tensor) -> Tensor:
    """All-gather ``x`` across torch.distributed ranks along dim 0, keeping autograd to the local shard.

    Identity when torch.distributed is unavailable, not initialised or has one rank. Every rank must
    pass the same shape (use equal per-rank batches, e.g. ``drop_last=True``). The backward pass sums
    the gradients all ranks compute for a shard, so DDP's averaging gives the global loss's gradient.

    Example:
        >>> x = torch.randn(4, 3, requires_grad=True)
        >>> gather_with_grad(x) is x  # single process
        True
    """
    if _dist_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather  # sums the ranks' gradients in backward

    return torch.cat(all_gather(x.contiguous()))


def global_mmd_scale(kernel: str, world_size: int) -> float:
    """Factor that puts a DM term computed on the batch of ``world_size`` ranks on the local batch's scale.

    The linear term is ``B²·‖mean_w(pred) − mean_w(target)‖² / positions`` for a batch of B: gathered
    from W ranks, B becomes W·B and a systematic mismatch of the means would weigh W² times more, so the
    factor is 1/W². (Independent per-sample errors shrink in the better estimated gathered mean instead:
    the global term is the less noisy estimate of the same quantity.) The Gaussian MMD² is an average
    over pairs, already independent of the batch size: factor 1.

    Example:
        >>> global_mmd_scale("linear", 8), global_mmd_scale("gaussian", 8)
        (0.015625, 1.0)
    """
    _validate_choice("mmd_kernel", kernel, KERNELS)
    return 1.0 / world_size**2 if kernel == "linear" else 1.0


def _validate_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {tuple(allowed)}")


def finetune_loss(
    pred: Tensor,
    target: Tensor,
    timesteps: Tensor,
    alphas_cumprod: Tensor,
    *,
    gamma: float | None = 5.0,
    prediction_type: str = "epsilon",
    mmd_weight: float = 0.003,
    mmd_kernel: str = "linear",
    mmd_scope: str = "local",
) -> dict[str, Tensor]:
    """The distribution-matching fine-tuning loss: Min-SNR denoising + ``mmd_weight`` · DM term.

    The denoising loss uses the local batch. The DM term uses the local batch with ``mmd_scope="local"``
    (the reference behaviour: each GPU matches its own batch, whatever the worker count), or the batch
    gathered from all W ranks with ``"global"`` (identity outside torch.distributed). The linear term
    is a sum over its batch, so on the gathered batch it is divided by W²: the same ``mmd_weight`` then
    weighs a systematic mismatch equally at any world size (see :func:`global_mmd_scale`). With
    ``mmd_weight == 0`` the DM term is still computed (no grad) and reported, but not added. Returns
    ``{"loss", "denoise", "mmd"}``.

    Example:
        >>> ac = torch.linspace(0.999, 0.01, 1000)
        >>> p, t = torch.randn(2, 4, 8, 8, requires_grad=True), torch.randn(2, 4, 8, 8)
        >>> out = finetune_loss(p, t, torch.tensor([3, 700]), ac, mmd_scope="local")
        >>> out["loss"].backward()
    """
    _validate_choice("mmd_kernel", mmd_kernel, KERNELS)
    _validate_choice("mmd_scope", mmd_scope, DM_SCOPES)
    weights = min_snr_weights(timesteps, alphas_cumprod, gamma, prediction_type).to(pred.device)
    denoise = denoising_loss(pred, target, weights)
    with torch.set_grad_enabled(torch.is_grad_enabled() and mmd_weight != 0):
        if mmd_scope == "global":
            pred, target, weights = gather_with_grad(pred), gather_with_grad(target), gather_with_grad(weights)
        dm = distribution_matching_loss(pred, target, weights, kernel=mmd_kernel)
        if mmd_scope == "global":
            dm = dm * global_mmd_scale(mmd_kernel, _dist_world_size())
    if mmd_weight == 0:
        return {"loss": denoise, "denoise": denoise.detach(), "mmd": dm.detach()}
    return {"loss": denoise + mmd_weight * dm, "denoise": denoise.detach(), "mmd": dm.detach()}
