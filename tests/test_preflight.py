"""The job's preflight: every broken input named at once, before any Ray work; its listings reused by the stages."""

from __future__ import annotations

import shutil

import pytest
from helpers import forbid_ray_work

from realfake_ray import storage
from realfake_ray.config import load_config
from realfake_ray.data import sources
from realfake_ray.layout import RunLayout
from realfake_ray.stages.pipeline import run_pipeline
from realfake_ray.stages.preflight import PreflightError, preflight


def test_every_broken_input_is_named_before_any_work(tmp_path, monkeypatch):
    forbid_ray_work(monkeypatch)
    (tmp_path / "flat").mkdir()
    shutil.copy(storage.resolve_embedded("embedded:digits/val/digit_3/0045.png"), tmp_path / "flat" / "a.png")
    (tmp_path / "labels.csv").write_text("file,label\nb.png,digit_3\n")
    (tmp_path / "sketch" / "cat").mkdir(parents=True)
    shutil.copy(tmp_path / "flat" / "a.png", tmp_path / "sketch" / "cat" / "x.png")
    cfg = load_config(preset="tiny", out=str(tmp_path / "run"), data__val=str(tmp_path / "flat"), overrides=[
        f"data.val_labels={tmp_path / 'labels.csv'}", f"evaluate.extra_sets={{sketch: {tmp_path / 'sketch'}}}",
        f"data.captions_file={tmp_path / 'missing.jsonl'}", "model.pretrained=/no/such/model"])
    with pytest.raises(PreflightError) as caught:
        run_pipeline(cfg)
    text = str(caught.value)
    assert "4 problem(s), nothing was started" in text
    assert "data.val" in text and "'b.png'" in text  # the labels file names a file that is not there
    assert "evaluate.extra_sets['sketch']" in text and "'cat'" in text
    assert "data.captions_file: captions file not found: " in text and text.count("missing.jsonl") == 1
    assert "model.pretrained '/no/such/model': no such directory" in text
    assert not (tmp_path / "run" / "latents").exists()


def test_the_captioner_s_location_and_the_captions_encode_needs_are_checked(tmp_path, monkeypatch):
    forbid_ray_work(monkeypatch)
    cfg = load_config(preset="tiny", out=str(tmp_path / "run"), overrides=[
        "caption.enabled=true", "caption.model=/no/such/blip2", "data.classes_file=imagenet1k"])
    with pytest.raises(PreflightError) as caught:  # the job: caption (with a bad model), then encode, ...
        run_pipeline(cfg)
    text = str(caught.value)
    assert "1 problem(s)" in text and "caption.model '/no/such/blip2': no such directory" in text
    with pytest.raises(PreflightError, match=r"(?s)1 problem\(s\).*encode: no captions yet: .*captions/captions.jsonl "
                                             r"does not exist; run the caption stage first"):
        run_pipeline(cfg, only=["encode"])  # without the caption stage, and nothing captioned yet
    storage.write_text(RunLayout(cfg.out).captions_url(), "")
    preflight(cfg, ["encode"])  # captioned by an earlier run: fine (a shipped class list is no missing file)
    assert not (tmp_path / "run" / "latents").exists()


def test_a_job_lists_each_dataset_once(tmp_path, monkeypatch):
    calls = []
    original = sources._open
    monkeypatch.setattr(sources, "_open", lambda *a: calls.append(a[0]) or original(*a))
    cfg = load_config(preset="tiny", out=str(tmp_path))
    with sources.listing_cache():
        preflight(cfg, ["encode", "train", "evaluate"])
        sources.open_labelled_set(cfg.data.train, classes_file=cfg.data.classes_file, extensions=cfg.data.extensions)
    assert sorted(calls) == sorted([cfg.data.train, cfg.data.val])
    preflight(cfg, ["encode"])  # outside a job's block: listed again
    assert len(calls) == 4
