"""Distribution metrics between real and synthetic image sets in CLIP image-embedding space (pure torch).

* MMD² overall and per class (the paper's distribution-matching distance), on L2-normalised embeddings,
  with one set of Gaussian bandwidths for the whole report so per-class values are comparable.
* Nearest real neighbour of every synthetic embedding (cosine distance, chunked so it scales to
  ImageNet): near-copies of training images are a memorisation / privacy signal.

Example::

    report = distribution_report(real_emb, real_y, synth_emb, synth_y, kernel="gaussian")
    report["mmd2"], report["per_class_mmd2"][3], report["nn"]["fraction"]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from realfake_ray.method.losses import KERNELS, median_heuristic_bandwidths, mmd2
from realfake_ray.seeds import derive_seed

__all__ = [
    "DEFAULT_NN_THRESHOLD", "QUANTILES", "subsample", "nearest_neighbor_distances", "distribution_report",
    "set_distances",
]

#: Cosine distance below which a synthetic image counts as a near-copy of a real one.
DEFAULT_NN_THRESHOLD = 0.05
QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


def _as_embeddings(x: Any, name: str) -> Tensor:
    """[N, D] float32 tensor, rows L2-normalised."""
    if isinstance(x, np.ndarray) and not x.flags.writeable:  # e.g. read from Ray's object store
        x = x.copy()
    t = torch.as_tensor(x)
    if t.ndim != 2 or len(t) == 0:
        raise ValueError(f"{name} must be a non-empty [N, D] embedding matrix, got shape {list(t.shape)}")
    return torch.nn.functional.normalize(t.float(), dim=1)


def _as_labels(y: Any, n: int, name: str) -> Tensor:
    t = torch.as_tensor(y).long().reshape(-1)
    if len(t) != n:
        raise ValueError(f"{name} has {len(t)} labels for {n} embeddings")
    return t


def subsample(n: int, max_samples: int, seed: int) -> Tensor:
    """Sorted indices of a deterministic random subset of ``range(n)`` of size ``min(n, max_samples)``.

    Example: ``subsample(10, 3, seed=0)`` → three sorted indices, the same every call.
    """
    if n <= max_samples:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_samples].sort().values


@torch.no_grad()
def nearest_neighbor_distances(query: Tensor, reference: Tensor, chunk_size: int = 4096) -> tuple[Tensor, Tensor]:
    """Cosine distance (1 − cos) from each ``query`` row to its nearest ``reference`` row, and that row's index.

    Both inputs are L2-normalised here; memory is O(chunk_size²). Example::

        dist, idx = nearest_neighbor_distances(synth_emb, real_emb)
    """
    query, reference = _as_embeddings(query, "query"), _as_embeddings(reference, "reference")
    best = torch.full((len(query),), -2.0, device=query.device)
    arg = torch.zeros(len(query), dtype=torch.long, device=query.device)
    for q0 in range(0, len(query), chunk_size):
        q = query[q0 : q0 + chunk_size]
        for r0 in range(0, len(reference), chunk_size):
            sim, idx = (q @ reference[r0 : r0 + chunk_size].T).max(dim=1)
            better = sim > best[q0 : q0 + len(q)]
            best[q0 : q0 + len(q)] = torch.where(better, sim, best[q0 : q0 + len(q)])
            arg[q0 : q0 + len(q)] = torch.where(better, idx + r0, arg[q0 : q0 + len(q)])
    return (1.0 - best).clamp_min(0.0), arg


def _mmd2(x: Tensor, y: Tensor, kernel: str, bandwidths: Sequence[float] | None, unbiased: bool) -> float:
    return float(mmd2(x, y, kernel=kernel, bandwidths=bandwidths, unbiased=unbiased))


def _per_class_mmd2(
    real: Tensor, real_labels: Tensor, synth: Tensor, synth_labels: Tensor,
    kernel: str, bandwidths: Sequence[float] | None, unbiased: bool, max_samples: int, seed: int,
) -> dict[int, float | None]:
    """MMD² per class over the union of labels; None where either side has fewer than 2 samples."""
    out: dict[int, float | None] = {}
    for c in torch.cat([real_labels, synth_labels]).unique().tolist():
        r, s = real[real_labels == c], synth[synth_labels == c]
        if len(r) < 2 or len(s) < 2:
            out[c] = None
            continue
        r = r[subsample(len(r), max_samples, derive_seed(seed, "real", c))]
        s = s[subsample(len(s), max_samples, derive_seed(seed, "synthetic", c))]
        out[c] = _mmd2(r, s, kernel, bandwidths, unbiased)
    return out


def _nn_summary(dist: Tensor, agree: Tensor, threshold: float) -> dict[str, Any]:
    d = dist.cpu().double().numpy()
    count = int((d < threshold).sum())
    return {
        "threshold": threshold,
        "count": count,
        "fraction": count / len(d),
        "mean": float(d.mean()),
        "quantiles": {f"{q:g}": float(v) for q, v in zip(QUANTILES, np.quantile(d, QUANTILES))},
        "label_agreement": float(agree.float().mean()),
    }


def distribution_report(
    real: Tensor,
    real_labels: Tensor,
    synth: Tensor,
    synth_labels: Tensor,
    kernel: str = "gaussian",
    nn_threshold: float | None = None,
    max_samples: int = 2000,
    seed: int = 0,
    bandwidths: Sequence[float] | None = None,
    chunk_size: int = 4096,
    unbiased: bool = True,
) -> dict[str, Any]:
    """MMD² (overall and per class) and nearest-real-neighbour statistics of a synthetic set.

    Embeddings are L2-normalised. MMD² uses the unbiased estimator (``unbiased=False``: the biased one,
    ≥ 0 and exactly 0 for identical sets; the unbiased one has expectation 0 for equal distributions, so
    identical sets of n give about −2·k(0)/n) on deterministic subsets of at most ``max_samples`` per
    set (per class: per class and set); for ``kernel="gaussian"`` without
    ``bandwidths`` the median heuristic runs once on the overall subsets and is reused per class.
    Nearest-neighbour statistics use every synthetic and every real embedding; ``nn.count`` /
    ``nn.fraction`` are synthetic images with cosine distance < ``nn_threshold`` (default
    :data:`DEFAULT_NN_THRESHOLD` = 0.05) to some real image, ``nn.label_agreement`` the fraction whose
    neighbour has the same label. Example::

        r = distribution_report(real, ry, synth, sy, kernel="linear", nn_threshold=0.02)
        r["mmd2"], r["mean_class_mmd2"], r["nn"]["count"], r["nn"]["quantiles"]["0.5"]
    """
    real, synth = _as_embeddings(real, "real"), _as_embeddings(synth, "synth")
    real_labels = _as_labels(real_labels, len(real), "real_labels").to(real.device)
    synth_labels = _as_labels(synth_labels, len(synth), "synth_labels").to(synth.device)
    if real.shape[1] != synth.shape[1]:
        raise ValueError(f"embedding widths differ: real D={real.shape[1]}, synth D={synth.shape[1]}")
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")
    if max_samples < 2:
        raise ValueError(f"max_samples must be >= 2, got {max_samples}")
    threshold = DEFAULT_NN_THRESHOLD if nn_threshold is None else float(nn_threshold)
    r_sub, s_sub = real[subsample(len(real), max_samples, seed)], synth[subsample(len(synth), max_samples, seed + 1)]
    if kernel == "gaussian" and bandwidths is None:
        bandwidths = median_heuristic_bandwidths(r_sub, s_sub)
    overall = _mmd2(r_sub, s_sub, kernel, bandwidths, unbiased) if min(len(r_sub), len(s_sub)) >= 2 else None
    per_class = _per_class_mmd2(
        real, real_labels, synth, synth_labels, kernel, bandwidths, unbiased, max_samples, seed
    )
    valid = [v for v in per_class.values() if v is not None]
    dist, idx = nearest_neighbor_distances(synth, real, chunk_size)
    return {
        "n_real": len(real),
        "n_synth": len(synth),
        "kernel": kernel,
        "unbiased": unbiased,
        "bandwidths": None if bandwidths is None else [float(b) for b in bandwidths],
        "mmd2": overall,
        "per_class_mmd2": per_class,
        "mean_class_mmd2": float(np.mean(valid)) if valid else None,
        "nn": _nn_summary(dist, real_labels[idx] == synth_labels, threshold),
    }


def set_distances(real: Any, synthetic: Any, seed: int = 0, subset_size: int = 100, subsets: int = 50) -> dict[str, float]:
    """MMD² (Gaussian kernel, median-heuristic bandwidths, unbiased) and KID (torchmetrics: polynomial-kernel
    MMD² averaged over ``subsets`` random subsets of ``subset_size``) between two embedding sets [N, D],
    both on L2-normalised rows. Seeded: the same inputs give the same numbers.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> real, same = torch.randn(200, 8, generator=g), torch.randn(200, 8, generator=g)
        >>> near, far = set_distances(real, same), set_distances(real, same + 0.5)
        >>> far["mmd2"] > 5 * abs(near["mmd2"]) and far["kid"] > 5 * abs(near["kid"])
        True
    """
    import warnings

    from torchmetrics.image.kid import KernelInceptionDistance

    x, y = _as_embeddings(real, "real"), _as_embeddings(synthetic, "synthetic")
    size = min(subset_size, len(x), len(y))
    with warnings.catch_warnings():  # "will save all extracted features in buffer": they are small embeddings
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=torch.nn.Identity(), subsets=subsets, subset_size=size)
    kid.update(x, real=True)
    kid.update(y, real=False)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(derive_seed(seed, "kid") % 2**63)
        kid_mean, kid_std = kid.compute()
    finally:
        torch.random.set_rng_state(state)
    return {"mmd2": float(mmd2(x, y, kernel="gaussian")), "kid": float(kid_mean), "kid_std": float(kid_std),
            "n_real": len(x), "n_synthetic": len(y)}
