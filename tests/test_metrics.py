"""Unit tests for realfake_ray.method.metrics (CPU, small random embeddings)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from realfake_ray.method.metrics import DEFAULT_NN_THRESHOLD, distribution_report, nearest_neighbor_distances, subsample


def _set(n: int, d: int = 32, classes: int = 4, seed: int = 0, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, 0] += shift
    return x, torch.arange(n) % classes


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
def test_identical_sets_near_zero_and_shift_larger(kernel: str) -> None:
    real, ry = _set(200)
    same = distribution_report(real, ry, real.clone(), ry.clone(), kernel=kernel, unbiased=False)
    shifted = distribution_report(real, ry, *_set(200, seed=1, shift=3.0), kernel=kernel, unbiased=False)
    assert abs(same["mmd2"]) < 1e-5 and abs(same["mean_class_mmd2"]) < 1e-5
    assert shifted["mmd2"] > 0.1 and shifted["mean_class_mmd2"] > 0.1
    assert same["nn"]["count"] == 200 and same["nn"]["label_agreement"] == 1.0
    # Unbiased (default): identical sets give the U-statistic's small negative offset, shifted stays large.
    same_u = distribution_report(real, ry, real.clone(), ry.clone(), kernel=kernel)["mmd2"]
    assert abs(same_u) < 0.2 * distribution_report(real, ry, *_set(200, seed=1, shift=3.0), kernel=kernel)["mmd2"]


def test_memorisation_count_equals_planted_copies() -> None:
    real, ry = _set(300, d=64)
    fresh, fy = _set(200, d=64, seed=5)
    picks = torch.tensor([3, 17, 42, 99, 150, 151, 299])
    synth = torch.cat([fresh, 2.5 * real[picks]])  # scaled copies: same direction, cosine distance 0
    sy = torch.cat([fy, ry[picks]])
    nn = distribution_report(real, ry, synth, sy)["nn"]
    assert nn["threshold"] == DEFAULT_NN_THRESHOLD
    assert nn["count"] == len(picks) and nn["fraction"] == pytest.approx(len(picks) / len(synth))
    assert nn["quantiles"]["0"] < 1e-5 and nn["quantiles"]["0.5"] > 0.5
    assert distribution_report(real, ry, synth, sy, nn_threshold=0.0)["nn"]["count"] == 0


def test_per_class_none_for_tiny_classes() -> None:
    real, ry = _set(40, classes=4)
    synth, sy = _set(21, classes=4, seed=2)
    sy = sy.clone()
    sy[sy == 3] = 1
    sy[0] = 3  # class 3: one synthetic sample
    ry = ry.clone()
    ry[ry == 2] = 0  # class 2: synthetic only
    per_class = distribution_report(real, ry, synth, sy)["per_class_mmd2"]
    assert per_class[2] is None and per_class[3] is None
    assert isinstance(per_class[0], float) and isinstance(per_class[1], float)


def test_report_is_deterministic_and_subsamples() -> None:
    real, ry = _set(120)
    synth, sy = _set(90, seed=3, shift=1.0)
    a = distribution_report(real, ry, synth, sy, max_samples=50, seed=7)
    b = distribution_report(real.numpy(), ry.numpy(), synth, sy, max_samples=50, seed=7)
    assert a == b
    assert a["mmd2"] != distribution_report(real, ry, synth, sy, max_samples=50, seed=8)["mmd2"]
    assert torch.equal(subsample(10, 3, 0), subsample(10, 3, 0)) and len(subsample(10, 3, 0)) == 3


def test_nearest_neighbor_chunking_matches_brute_force() -> None:
    q, r = torch.randn(23, 8), torch.randn(31, 8)
    dist, idx = nearest_neighbor_distances(q, r, chunk_size=7)
    sims = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(r, dim=1).T
    assert torch.equal(idx, sims.argmax(1))
    assert torch.allclose(dist, 1 - sims.max(1).values, atol=1e-6)


def test_bad_inputs_raise() -> None:
    real, ry = _set(10)
    with pytest.raises(ValueError, match="widths"):
        distribution_report(real, ry, torch.randn(10, 16), ry)
    with pytest.raises(ValueError, match="kernel"):
        distribution_report(real, ry, real, ry, kernel="cubic")
    with pytest.raises(ValueError, match="labels"):
        distribution_report(real, ry[:5], real, ry)
    assert np.isfinite(distribution_report(real, ry, real, ry, kernel="linear")["mmd2"])
