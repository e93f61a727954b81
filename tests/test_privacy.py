import numpy as np
import pytest

from realfake_ray.tools.audit_privacy.lira import attack_summary, copy_distances, copy_summary, lira_offline, shadow_masks


def test_every_example_is_in_exactly_half_the_shadows():
    masks = shadow_masks(n=1000, k=8, seed=3)
    assert (masks.sum(0) == 4).all() and np.allclose(masks.mean(1), 0.5, atol=0.06)
    assert (shadow_masks(1000, 8, 3) == masks).all() and not (shadow_masks(1000, 8, 4) == masks).all()
    with pytest.raises(ValueError, match="even number >= 4"):
        shadow_masks(10, 5, 0)


def _naive_lira(phi, masks, per_example):
    """Straight from the definition: for target t, example i, the other models that did not train on i."""
    k, n = phi.shape
    scores, members = [], []
    for t in range(k):
        outs = {i: [phi[j, i] for j in range(k) if j != t and not masks[j, i]] for i in range(n)}
        squares = sum(float(np.sum((np.array(o) - np.mean(o)) ** 2)) for o in outs.values() if o)
        pooled = np.sqrt(squares / max(sum(len(o) - 1 for o in outs.values() if o), 1))
        for i, out in outs.items():
            if len(out) < (2 if per_example else 1):
                continue
            sd = np.std(out, ddof=1) if per_example else pooled
            scores.append((phi[t, i] - np.mean(out)) / max(sd, 1e-6))
            members.append(masks[t, i])
    return np.array(scores), np.array(members)


@pytest.mark.parametrize("per_example", [False, True])
def test_offline_lira_equals_a_naive_loop(per_example):
    rng = np.random.default_rng(0)
    masks = shadow_masks(n=30, k=8, seed=1)
    phi = rng.normal(size=masks.shape) + 2.0 * masks
    scores, members = lira_offline(phi, masks, per_example_variance=per_example)
    naive_scores, naive_members = _naive_lira(phi, masks, per_example)
    assert np.allclose(scores, naive_scores) and (members == naive_members).all()


def _naive_roc_numbers(scores, members):
    pos, neg = scores[members], scores[~members]
    auc = np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg])
    best = {0.001: 0.0, 0.01: 0.0}
    for threshold in np.unique(scores):
        fpr, tpr = np.mean(neg >= threshold), np.mean(pos >= threshold)
        for point in best:
            if fpr <= point:
                best[point] = max(best[point], tpr)
    return auc, best


def test_auc_and_tpr_at_low_fpr_equal_brute_force_on_fabricated_scores():
    rng = np.random.default_rng(5)
    for shift in (0.0, 1.0, 3.0):
        members = rng.random(600) < 0.5
        scores = np.round(rng.normal(size=600) + shift * members, 1)  # rounded: ties occur
        summary = attack_summary(scores, members)
        auc, best = _naive_roc_numbers(scores, members)
        assert summary["auc"] == pytest.approx(auc)
        assert summary["tpr_at_0.1pct_fpr"] == pytest.approx(best[0.001])
        assert summary["tpr_at_1pct_fpr"] == pytest.approx(best[0.01])
    random = attack_summary(rng.normal(size=4000), rng.random(4000) < 0.5)
    assert abs(random["auc"] - 0.5) < 0.05 and random["tpr_at_1pct_fpr"] < 0.05


def test_copy_distances_to_the_source_and_to_the_closest_other_real_image():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(20, 8))
    source = np.array([3, 7, 7, 0])
    synthetic = real[source] + 0.01 * rng.normal(size=(4, 8))
    synthetic[3] = real[5]  # generated from image 0 but identical to image 5
    d = copy_distances(synthetic, source, real, chunk=3)

    def cosine(a, b):
        return 1 - a @ b / np.linalg.norm(a) / np.linalg.norm(b)

    for i, s in enumerate(source):
        assert d["to_source"][i] == pytest.approx(cosine(synthetic[i], real[s]), abs=1e-5)
        others = [cosine(synthetic[i], real[j]) for j in range(20) if j != s]
        assert d["to_other"][i] == pytest.approx(min(others), abs=1e-5)
    summary = copy_summary(d, threshold=0.05)
    assert summary["near_copy_fraction"] == 0.75 and summary["closer_to_source_fraction"] == 0.75
