"""realfake plan: a job's images, objects, requests and GPU-hours per stage, offline."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import forbid_ray_work

from realfake_ray.cli import main
from realfake_ray.config import ConfigError, load_config
from realfake_ray.tools.plan import MEASURED_RATES, plan_job, run_plan

REPO = Path(__file__).resolve().parents[1]


def test_the_imagenet_x10_plan_runs_offline_with_no_ray_and_no_storage(monkeypatch, capsys):
    forbid_ray_work(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ["plan", "--config", str(REPO / "jobs" / "configs" / "in1k.yaml"), "--mult", "10",
            "--assume-images", "1281167", "--assume-val-images", "50000"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| generate | 12811670 |" in out and "GPU-hours" in out and "S3 list prices" in out


def test_generate_hours_follow_the_measured_rate_and_the_sampler_settings():
    cfg = load_config(config_file=str(REPO / "jobs" / "configs" / "in1k.yaml"), overrides=["generate.mult=10"])
    plans = {p.stage: p for p in plan_job(cfg, 1_281_167)}
    images = 1_281_167 * 10
    assert plans["generate"].images == images
    assert plans["generate"].gpu_hours == pytest.approx(images / MEASURED_RATES["generate"]["per_gpu"] / 3600, abs=0.1)
    fewer = load_config(config_file=str(REPO / "jobs" / "configs" / "in1k.yaml"),
                        overrides=["generate.mult=10", "generate.steps=15"])  # half the denoising steps
    half = {p.stage: p for p in plan_job(fewer, 1_281_167)}["generate"].gpu_hours
    assert half < 0.6 * plans["generate"].gpu_hours
    given = {p.stage: p for p in plan_job(cfg, 1_281_167, rates={"generate": 2 * 9.26})}["generate"].gpu_hours
    assert given == pytest.approx(plans["generate"].gpu_hours / 2, abs=0.1)
    assert plans["generate"].objects_written < images / 500  # shards, not one object per image


def test_the_caption_stage_has_a_row_only_when_the_job_captions():
    in1k = str(REPO / "jobs" / "configs" / "in1k.yaml")
    plans = {p.stage: p for p in plan_job(load_config(config_file=in1k), 1_281_167)}
    caption = plans["caption"]  # in1k.yaml captions with BLIP-2 (no captions_file): the caption stage runs
    assert caption.images == 1_281_167 and caption.gpu_hours > 0 and caption.note == "FLOP model"
    assert caption.objects_written == -(-1_281_167 // load_config(config_file=in1k).caption.rows_per_file) + 3
    given = load_config(config_file=in1k, overrides=["data.captions_file=s3://b/captions.jsonl"])
    assert "caption" not in {p.stage for p in plan_job(given, 1_281_167)}
    assert "caption" not in {p.stage for p in plan_job(load_config(preset="tiny"), 1437)}  # captioning off
    rated = {p.stage: p for p in plan_job(load_config(config_file=in1k), 1_281_167, rates={"caption": 100.0})}
    assert rated["caption"].gpu_hours == pytest.approx(1_281_167 / 100 / 3600, abs=0.1) and rated["caption"].note == "given"


def test_a_bad_rate_is_a_config_error():
    with pytest.raises(ConfigError, match=r"--images-per-s expects stage=rate"):
        run_plan(load_config(preset="tiny"), assume_images=10, images_per_s=["generate:3"])
