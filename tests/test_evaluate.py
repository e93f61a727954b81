"""Evaluate stage: model file, set planning and bad input (fast), then one Ray evaluation (e2e) checked
against a direct in-process computation, with an OOD class-subset set and distribution metrics."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from helpers import fabricate_synthetic, forbid_ray_work

from realfake_ray import storage
from realfake_ray.data.views import eval_view
from realfake_ray.method.classifier import build_classifier, evaluate_batches, to_model_input
from realfake_ray.config import ConfigError, load_config
from realfake_ray.data.imagefolder import DatasetError, decode_image, open_rgb
from realfake_ray.data.sources import open_labelled_set
from realfake_ray.data.evaluation import plan_sets
from realfake_ray.method.classifier_file import load_classifier, model_url, read_classifier_info, save_classifier
from realfake_ray.stages.evaluate.driver import _markdown, run_evaluate
from realfake_ray.layout import RunLayout

CLASS_DIRS = [f"digit_{i}" for i in range(10)]
VAL = "embedded:digits/val"


def _cfg(out, *overrides):
    return load_config(preset="tiny", out=str(out), overrides=list(overrides))


def _fit_head(model: torch.nn.Module) -> None:
    """Least-squares fit of the last (linear) layer on random-conv features of the real train split:
    a deterministic, better-than-chance model with varied predictions, in a few seconds."""
    items = open_labelled_set("embedded:digits/train").items
    t = load_config(preset="tiny").train  # the eval view of the tiny preset's recipe
    pixels = np.stack([eval_view(open_rgb(storage.read_bytes(url)), 32, t.eval_crop_pct, t.eval_interpolation)
                       for url in items["url"].to_pylist()])
    with torch.no_grad():
        feats = model[:-1](to_model_input(pixels))
    feats = torch.cat([feats, torch.ones(len(feats), 1)], 1)
    target = torch.nn.functional.one_hot(torch.tensor(items["label"].to_pylist()), 10).float()
    solution = torch.linalg.solve(feats.T @ feats + 1e-2 * torch.eye(feats.shape[1]), feats.T @ target)
    model[-1].weight.data, model[-1].bias.data = solution[:-1].T.contiguous(), solution[-1].contiguous()


def _write_model(out, seed: int = 0, fit: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_classifier("resnet_tiny", 10).eval()
    if fit:
        _fit_head(model)
    info = {"arch": "resnet_tiny", "image_size": 32, "source": "real", "class_dirs": CLASS_DIRS,
            "class_names": [f"digit {i}" for i in range(10)], "epochs": 1}
    save_classifier(model_url(RunLayout(str(out)).classifier_dir()), model.state_dict(), info)
    return model


def _subset_set(root, classes=("digit_3", "digit_7")) -> str:
    for d in classes:
        shutil.copytree(storage.resolve_embedded(f"{VAL}/{d}"), os.path.join(root, d))
    return str(root)


# ------------------------------------------------------------------------------------ fast
def test_model_file_round_trip(tmp_path):
    model = _write_model(tmp_path)
    loaded, info = load_classifier(model_url(RunLayout(str(tmp_path)).classifier_dir()))
    assert info["class_dirs"] == CLASS_DIRS and info["arch"] == "resnet_tiny" and info["image_size"] == 32
    assert read_classifier_info(storage.read_bytes(model_url(RunLayout(str(tmp_path)).classifier_dir())))["epochs"] == 1
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(FileNotFoundError, match="run `realfake train` first"):
        load_classifier(model_url(RunLayout(str(tmp_path / "nothing")).classifier_dir()))


def test_plan_sets_maps_a_class_subset_to_real_indices(tmp_path):
    sub = _subset_set(tmp_path / "sub")
    names, sets, subsets = plan_sets(_cfg(tmp_path, f"evaluate.extra_sets={{sub: {sub}}}"), CLASS_DIRS)
    assert names == ["val", "sub"] and subsets == [None, [3, 7]]
    assert sets[1].num_images == 73 and set(sets[1].items["label"].to_pylist()) == {3, 7}
    assert sets[0].num_images == 360


def test_unknown_folder_in_an_extra_set_is_an_error_before_ray(tmp_path, no_ray):
    _write_model(tmp_path)
    sub = _subset_set(tmp_path / "sub")
    (tmp_path / "sub" / "cat").mkdir()
    (tmp_path / "sub" / "cat" / "x.png").write_bytes((tmp_path / "sub" / "digit_3").iterdir().__next__().read_bytes())
    with pytest.raises(DatasetError, match=r"extra_sets\['sub'\].*'cat' are not among the 10 real classes"):
        run_evaluate(_cfg(tmp_path, f"evaluate.extra_sets={{sub: {sub}}}"))


def test_reserved_name_and_missing_model(tmp_path, no_ray):
    with pytest.raises(FileNotFoundError, match="no trained classifier"):
        run_evaluate(_cfg(tmp_path))
    _write_model(tmp_path)
    with pytest.raises(ConfigError, match="reserved"):
        run_evaluate(_cfg(tmp_path, f"evaluate.extra_sets={{val: {tmp_path}}}"))


def test_the_training_s_val_pass_is_taken_only_when_it_covers_every_image(monkeypatch, no_ray):
    from types import SimpleNamespace

    from realfake_ray.stages.evaluate import driver

    calls = []

    def by_actors(cfg, url, names, sets, subsets, info):
        calls.append(list(names))
        return {n: {"top1": 0.5} for n in names}

    monkeypatch.setattr(driver, "evaluate_sets", by_actors)
    planned = (["val", "ood"], [SimpleNamespace(num_images=4), SimpleNamespace(num_images=3)], [None, [1]])
    info, merged = {"class_dirs": ["a", "b"]}, {"top1": 0.75, "top5": 1.0, "k": 2, "count": 4, "per_class": [1.0, 0.5]}
    sets = driver._score_sets(None, "model", planned, info, {"val": merged})
    assert calls == [["ood"]] and list(sets) == ["val", "ood"]
    assert sets["val"] == {"top1": 0.75, "top5": 1.0, "k": 2, "count": 4, "skipped": 0, "classes": None,
                           "per_class": {"a": 1.0, "b": 0.5}, "scored_by": "train"}
    calls.clear()
    sets = driver._score_sets(None, "model", planned, info, {"val": {**merged, "count": 3}})  # equal shards left one out
    assert calls == [["val", "ood"]] and sets["val"] == {"top1": 0.5}


def test_markdown_report_has_the_tables():
    report = {
        "source": "synthetic", "arch": "resnet_tiny", "num_classes": 2, "image_size": 32, "class_dirs": ["a", "b"],
        "sets": {"val": {"count": 4, "classes": None, "top1": 0.5, "top5": 1.0, "k": 2, "per_class": {"a": 1.0, "b": 0.0}}},
        "distribution": {"n_real": 10, "n_synth": 5, "kernel": "gaussian", "mmd2": 0.01, "mean_class_mmd2": 0.02,
                         "nn": {"count": 1, "fraction": 0.2, "threshold": 0.05, "label_agreement": 1.0},
                         "per_class_mmd2": {"a": 0.01, "b": None}},
    }
    text = _markdown(report)
    assert "| val | 4 | 2 | 0.5 | 1 | 2 |" in text and "| a | 1 |" in text and "| b | |" in text.replace("|  |", "| |")
    assert "mean_class_mmd2" in text and "nn_count" in text


# ------------------------------------------------------------------------------------ Ray (e2e)
@pytest.fixture(scope="module")
def evaluated(tiny_bank, tmp_path_factory):
    """A fixed (untrained) model, a copy of the tiny bank, a fabricated synthetic set; `realfake evaluate`."""
    from realfake_ray.cli import main

    out = tmp_path_factory.mktemp("evaluate")
    shutil.copytree(os.path.join(tiny_bank, "latents"), out / "latents")
    fabricate_synthetic(str(out), copies=1, per_class=20)
    model = _write_model(out, seed=3, fit=True)
    sub = _subset_set(out / "sub")
    assert main(["evaluate", "--preset", "tiny", "--out", str(out), "--set", f"evaluate.extra_sets.digits_3_7={sub}"]) == 0
    report = json.loads((out / "classifier" / "metrics.json").read_text())
    with pytest.MonkeyPatch.context() as mp:  # the same inputs again: the stored report, no Ray work at all
        forbid_ray_work(mp)
        again = run_evaluate(_cfg(out, f"evaluate.extra_sets={{digits_3_7: {sub}}}"))
    return {"out": out, "model": model, "sub": sub, "report": report, "again": again}



def _direct(model, root, class_subset=None):
    items = open_labelled_set(root, class_dirs=CLASS_DIRS).items
    labels = torch.tensor(items["label"].to_pylist())
    t = load_config(preset="tiny").train  # the eval view of the tiny preset's recipe
    pixels = np.stack([eval_view(open_rgb(storage.read_bytes(url)), 32, t.eval_crop_pct, t.eval_interpolation)
                       for url in items["url"].to_pylist()])
    return evaluate_batches(model, [(to_model_input(pixels), labels)], 10, class_subset)


@pytest.mark.e2e
def test_ray_evaluation_equals_a_direct_computation(evaluated):
    sets = evaluated["report"]["sets"]
    direct = _direct(evaluated["model"], VAL)
    assert sets["val"]["count"] == direct["count"] == 360 and sets["val"]["skipped"] == 0
    assert 0.3 < direct["top1"] < 1.0  # a model with varied predictions, so the comparison means something
    assert sets["val"]["top1"] == pytest.approx(direct["top1"]) and sets["val"]["top5"] == pytest.approx(direct["top5"])
    expected = {d: a for d, a in zip(CLASS_DIRS, direct["per_class"])}
    assert sets["val"]["per_class"] == pytest.approx(expected)


@pytest.mark.e2e
def test_rerun_with_the_same_inputs_returns_the_stored_report(evaluated):
    assert evaluated["again"].pop("skipped") is True
    assert evaluated["again"] == evaluated["report"]


@pytest.mark.e2e
def test_ood_subset_restricts_the_logits(evaluated):
    ood = evaluated["report"]["sets"]["digits_3_7"]
    direct = _direct(evaluated["model"], evaluated["sub"], class_subset=[3, 7])
    assert ood["classes"] == 2 and ood["k"] == 2 and ood["count"] == 73 and ood["top5"] == 1.0
    assert ood["top1"] == pytest.approx(direct["top1"]) and set(ood["per_class"]) == {"digit_3", "digit_7"}
    md = (evaluated["out"] / "classifier" / "metrics.md").read_text()
    assert "| digits_3_7 | 73 | 2 |" in md


@pytest.mark.e2e
def test_distribution_metrics_against_the_bank(evaluated):
    dist = evaluated["report"]["distribution"]
    assert dist["n_real"] == 1437 and dist["n_synth"] == 200 and dist["synthetic_embedded"] == 200
    assert set(dist["per_class_mmd2"]) == set(CLASS_DIRS) and dist["kernel"] == "gaussian"
    # The fabricated "synthetic" images are JPEG re-saves of real train images: near-copies of them.
    assert dist["nn"]["label_agreement"] > 0.95 and dist["nn"]["fraction"] > 0.9
    assert storage.read_json(RunLayout(str(evaluated["out"])).distribution_url())["report"] == dist  # shared per run


def test_the_distribution_report_is_computed_once_per_synthetic_set_bank_and_settings(tmp_path, monkeypatch):
    """The job's two classifiers (synthetic and the real-only baseline) share one synthetic set: the second
    evaluation reuses the first's CLIP pass; another set, bank or setting computes it again."""
    from types import SimpleNamespace

    from realfake_ray.stages.evaluate import driver

    calls = []
    monkeypatch.setattr(driver, "distribution_metrics", lambda cfg, meta, synth, dirs: calls.append(1) or {"mmd2": len(calls)})
    synth, meta = SimpleNamespace(url="s://set", num_images=60), {"class_dirs": CLASS_DIRS, "resolution": 32}

    def report(digest="d1", meta=meta, *overrides):
        return driver.shared_distribution(_cfg(tmp_path, *overrides), meta, synth, digest, CLASS_DIRS)

    assert report() == report() == report(*["d1", meta, "train.tag=real", "train.source=real"]) == {"mmd2": 1}
    assert report("d2") == {"mmd2": 2}  # another synthetic set
    assert report("d2", {**meta, "resolution": 64}) == {"mmd2": 3}  # another bank
    assert report("d2", {**meta, "resolution": 64}, "evaluate.nn_threshold=0.1") == {"mmd2": 4}
    assert len(calls) == 4


@pytest.mark.e2e
def test_clip_embedder_matches_the_bank(tiny_bank):
    from realfake_ray._internal.shards import read_parts
    from realfake_ray.method.embeddings import ClipEmbedder

    row = read_parts(RunLayout(tiny_bank).bank_dir("train"), ["image_id", "clip_embed"]).slice(0, 1).to_pylist()[0]
    pixels, _, _ = decode_image(storage.read_bytes(f"embedded:digits/train/{row['image_id']}"), 32)
    embed = ClipEmbedder(_cfg(tiny_bank)).embed(pixels[None])
    np.testing.assert_allclose(embed[0].astype(np.float32), np.asarray(row["clip_embed"], np.float32), atol=2e-3)
