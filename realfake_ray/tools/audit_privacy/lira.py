"""Membership inference for the privacy audit: shadow splits, the offline likelihood-ratio attack, ROC
numbers, and how close synthetic images sit to their source images.

Pure numpy / torch / scikit-learn (no Ray). The attack is LiRA's offline variant (Carlini et al.,
"Membership Inference Attacks From First Principles", 2022): K shadow models are each trained on a random
half of the real training set; every example is in exactly half of them. Each model in turn is the
*target*; for every example, the other models that did **not** train on it give a Gaussian of its
logit-scaled confidence φ = log p_y − log(1 − p_y); the target's φ, standardised against that Gaussian,
is the membership score (higher: more likely a member). Scores of all targets are pooled into one ROC.

Example:
    >>> masks = shadow_masks(n=6, k=4, seed=0)
    >>> masks.shape, masks.sum(0).tolist()
    ((4, 6), [2, 2, 2, 2, 2, 2])
    >>> rng = np.random.default_rng(0)
    >>> phi = rng.normal(size=(4, 6)) + 3.0 * masks      # members are more confident
    >>> scores, members = lira_offline(phi, masks)
    >>> attack_summary(scores, members)["auc"] > 0.8
    True
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

__all__ = [
    "FPR_POINTS", "shadow_masks", "lira_offline", "tpr_at_fpr", "attack_summary", "roc_points", "copy_distances",
    "copy_summary",
]

FPR_POINTS = (0.001, 0.01)  # the low-FPR operating points the audit reports (0.1 %, 1 %)
_MIN_STD = 1e-6


def shadow_masks(n: int, k: int, seed: int) -> np.ndarray:
    """``[k, n]`` bool: which of ``n`` examples each of ``k`` shadow models trains on. Every example is in
    exactly ``k // 2`` shadows and every shadow holds about half of the examples (seeded)."""
    if k < 4 or k % 2:
        raise ValueError(f"shadows={k}: need an even number >= 4 (each example is in exactly half of them, and a "
                         "target's non-members need another model that did not train on them)")
    order = np.random.default_rng(seed).random((k, n)).argsort(axis=0)
    return order < k // 2


def lira_offline(phi: np.ndarray, masks: np.ndarray, per_example_variance: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Pooled ``(scores, is_member)`` over every (target model, example) pair; see the module docstring.

    ``phi`` ``[k, n]``: each model's logit-scaled confidence on each example; ``masks`` ``[k, n]``: training
    membership. Each example's OUT mean comes from the other models that did not train on it; its spread is
    one variance pooled over all examples (Carlini et al.'s choice for few shadow models), or the example's
    own with ``per_example_variance`` (needs ≥ 2 OUT models; pairs with fewer are left out). A pair whose
    example has no OUT model among the others is left out.
    """
    phi, masks = np.asarray(phi, np.float64), np.asarray(masks, bool)
    if phi.shape != masks.shape:
        raise ValueError(f"phi {phi.shape} and masks {masks.shape} must have the same [models, examples] shape")
    scores, members = [], []
    for target in range(len(phi)):
        out = ~masks
        out[target] = False
        count = out.sum(0)
        mean = (phi * out).sum(0) / np.maximum(count, 1)
        squares = ((phi - mean) ** 2) * out
        if per_example_variance:
            var, keep = squares.sum(0) / np.maximum(count - 1, 1), count >= 2
        else:
            var = np.full(phi.shape[1], squares.sum() / max(int((count - 1).clip(min=0).sum()), 1))
            keep = count >= 1
        z = (phi[target] - mean) / np.maximum(np.sqrt(var), _MIN_STD)
        scores.append(z[keep])
        members.append(masks[target][keep])
    return np.concatenate(scores), np.concatenate(members)


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """The highest TPR of the ROC at a false-positive rate ≤ ``target``."""
    ok = fpr <= target
    return float(tpr[ok].max()) if ok.any() else 0.0


def attack_summary(scores: np.ndarray, members: np.ndarray) -> dict:
    """AUC and TPR at 0.1 % / 1 % FPR of membership ``scores`` (higher = member) against the truth."""
    members = np.asarray(members, bool)
    fpr, tpr, _ = roc_curve(members, scores)
    summary = {"auc": float(roc_auc_score(members, scores)), "pairs": int(len(scores)),
               "members": int(members.sum())}
    for point in FPR_POINTS:
        summary[f"tpr_at_{point * 100:g}pct_fpr"] = tpr_at_fpr(fpr, tpr, point)
    return summary


def roc_points(scores: np.ndarray, members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` of the ROC (scikit-learn), for plots."""
    fpr, tpr, _ = roc_curve(np.asarray(members, bool), scores)
    return fpr, tpr


def copy_distances(synthetic: np.ndarray, source: np.ndarray, real: np.ndarray, chunk: int = 4096) -> dict:
    """Cosine distances in an embedding space (e.g. CLIP) of each synthetic image to its own source image
    and to the closest *other* real image.

    ``synthetic`` ``[m, d]``, ``real`` ``[n, d]`` embeddings; ``source`` ``[m]`` the row in ``real`` each
    synthetic image was generated from. Returns both arrays (``to_source``, ``to_other``).
    """
    s = torch.nn.functional.normalize(torch.as_tensor(np.asarray(synthetic), dtype=torch.float32), dim=1)
    r = torch.nn.functional.normalize(torch.as_tensor(np.asarray(real), dtype=torch.float32), dim=1)
    src = torch.as_tensor(np.asarray(source), dtype=torch.long)
    to_source = 1.0 - (s * r[src]).sum(1)
    to_other = torch.empty(len(s))
    for i in range(0, len(s), chunk):
        sim = s[i : i + chunk] @ r.T
        sim[torch.arange(len(sim)), src[i : i + chunk]] = -torch.inf
        to_other[i : i + chunk] = 1.0 - sim.max(1).values
    return {"to_source": to_source.numpy(), "to_other": to_other.numpy()}


def copy_summary(distances: dict, threshold: float) -> dict:
    """Medians of both distances and the fraction of near-copies: synthetic images within ``threshold``
    (cosine distance) of their source image."""
    to_source, to_other = distances["to_source"], distances["to_other"]
    return {"median_to_source": float(np.median(to_source)), "median_to_other": float(np.median(to_other)),
            "near_copy_fraction": float((to_source < threshold).mean()),
            "closer_to_source_fraction": float((to_source < to_other).mean())}
