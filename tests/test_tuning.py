import itertools

import numpy as np
import pytest
import yaml

from realfake_ray.config import load_config
from realfake_ray.tools.quick_classifier import classifier_accuracy
from realfake_ray.tools.tune_sampler.grid import (
    expand_grid,
    pareto_front,
    pick_finalists,
    recommend,
    recommendation_yaml,
    setting_id,
)


def test_grid_is_the_product_of_the_axes_on_top_of_the_base():
    grid = expand_grid({"scheduler": ["unipc", "ddim"], "steps": [15, 8, 4]}, {"steps": 30, "strength": 0.75})
    assert len(grid) == 6 and all(s["strength"] == 0.75 for s in grid)
    assert {(s["scheduler"], s["steps"]) for s in grid} == set(itertools.product(["unipc", "ddim"], [15, 8, 4]))
    assert len({setting_id(s) for s in grid}) == 6


@pytest.mark.parametrize("axes, match", [({"step": [4]}, "unknown key.*'step'"), ({"steps": []}, "axes.steps is empty")])
def test_bad_axes_are_named(axes, match):
    with pytest.raises(ValueError, match=match):
        expand_grid(axes, {})


def _brute_force_front(rows, x, y, higher):
    sign = 1 if higher else -1

    def dominates(a, b):
        return a[x] >= b[x] and sign * a[y] >= sign * b[y] and (a[x] > b[x] or sign * a[y] > sign * b[y])

    return [r for r in rows if not any(dominates(o, r) for o in rows)]


@pytest.mark.parametrize("higher", [True, False])
def test_pareto_front_equals_the_brute_force_definition(higher):
    rng = np.random.default_rng(0)
    for _ in range(50):
        # few distinct values, so that ties on x, on y and on both occur
        rows = [{"id": i, "s": float(rng.integers(1, 6)), "q": float(rng.integers(1, 6))} for i in range(12)]
        rows.append({"id": 99, "s": None, "q": 1.0})  # unmeasured rows are ignored
        front = pareto_front(rows, "s", "q", higher_y_is_better=higher)
        expected = _brute_force_front(rows[:-1], "s", "q", higher)
        assert sorted(r["id"] for r in front) == sorted(r["id"] for r in expected)
        assert [r["s"] for r in front] == sorted((r["s"] for r in front), reverse=True)


def test_finalists_are_the_reference_and_faster_front_points_spread_along_the_front():
    ref = {"name": "ref", "reference": True, "images_per_s": 10.0, "kid": 0.02}
    front = [{"name": f"f{i}", "images_per_s": 10.0 + 10 * i, "kid": 0.02 + 0.01 * i} for i in range(1, 8)]
    dominated = {"name": "bad", "images_per_s": 15.0, "kid": 0.5}
    slower = {"name": "slow", "images_per_s": 5.0, "kid": 0.01}
    rows = [ref, *front, dominated, slower]
    picked = [r["name"] for r in pick_finalists(rows, 3)]
    assert picked == ["ref", "f7", "f4", "f1"]  # fastest, middle and slowest of the faster front points
    assert [r["name"] for r in pick_finalists(rows, 0)] == ["ref"]
    assert len(pick_finalists(rows, 20)) == 1 + len(front)


def test_recommendation_is_the_fastest_within_tolerance_else_the_reference():
    ref = {"name": "ref", "reference": True, "images_per_s": 10.0, "accuracy": 0.80}
    rows = [ref, {"name": "a", "images_per_s": 20.0, "accuracy": 0.791}, {"name": "b", "images_per_s": 40.0, "accuracy": 0.785},
            {"name": "c", "images_per_s": 15.0, "accuracy": 0.85}, {"name": "d", "images_per_s": 99.0}]
    assert recommend(rows, 0.01)["name"] == "a"
    assert recommend(rows, 0.02)["name"] == "b"
    assert recommend(rows, 0.0)["name"] == "c"  # better than the reference and faster
    assert recommend([ref, {"name": "e", "images_per_s": 50.0, "accuracy": 0.5}], 0.01)["name"] == "ref"
    assert recommend([{**ref, "accuracy": None}, rows[1]], 0.01) is None


def test_recommended_yaml_loads_as_a_config_file(tmp_path):
    row = {"name": "x", "scheduler": "ddim", "steps": 8, "strength": 0.75, "guidance_scale": 1.0, "lora_scale": 0.5,
           "batch_size": 64, "dtype": "fp32", "channels_last": False, "compile": False, "speedup": "deepcache:3",
           "images_per_s": 80.0, "accuracy": 0.8}
    text = recommendation_yaml(row, "from a test\nsecond line")
    assert text.startswith("# from a test\n# second line\n") and set(yaml.safe_load(text)) == {"generate"}
    path = tmp_path / "recommended.yaml"
    path.write_text(text)
    g = load_config(preset="tiny", config_file=str(path)).generate
    assert (g.scheduler, g.steps, g.guidance_scale, g.speedup, g.batch_size) == ("ddim", 8, 1.0, "deepcache:3", 64)


@pytest.mark.system  # two classifier fits (~30 s in CI); its users, tune-sampler and audit-privacy, are system tests
def test_quick_classifier_learns_the_real_digits_and_is_seeded():
    from realfake_ray.data.labelled import images_in_memory, real_set

    cfg = load_config(preset="tiny")

    def load(url):
        images, labels = images_in_memory(real_set(url, cfg))
        return np.stack(images), labels

    (train_x, train_y), (val_x, val_y) = load(cfg.data.train), load(cfg.data.val)
    args = (train_x, train_y, val_x, val_y, cfg.train, 10, 2000)
    first = classifier_accuracy(*args, seed=1)
    assert first > 0.2  # chance: 0.1 (31 steps of training: far from converged, see BENCHMARKS.md)
    assert classifier_accuracy(*args, seed=1) == first
