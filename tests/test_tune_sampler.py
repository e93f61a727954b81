import csv
import io
import json

import pytest
from helpers import forbid_ray_work

from realfake_ray import storage
from realfake_ray.config import ConfigError, load_config
from realfake_ray.layout import RunLayout
from realfake_ray.tools.tune_sampler.driver import grid_settings, run_tune_sampler

_REFERENCE = json.dumps({"scheduler": "unipc", "steps": 6, "strength": 0.75, "guidance_scale": 2.0, "lora_scale": 0.5,
                         "speedup": "none"})


def _cfg(out, *overrides):
    return load_config(preset="tiny", out=str(out), overrides=[
        "generate.use_lora=false", f"tune_sampler.reference={_REFERENCE}", "tune_sampler.proxy_rows=16",
        "tune_sampler.accuracy_rows=32", "tune_sampler.classifier_budget_images=64", "tune_sampler.finalists=2",
        *overrides])


def test_the_grid_is_checked_before_any_work(tmp_path, no_ray):
    with pytest.raises(ConfigError, match="unknown key.*'step'"):
        grid_settings(_cfg(tmp_path, 'tune_sampler.axes={"step": [4]}'))
    with pytest.raises(ConfigError, match="setting .*'deepcache:0'.*generate.speedup"):
        grid_settings(_cfg(tmp_path, 'tune_sampler.axes={"speedup": ["deepcache:0"]}'))
    settings, reference, swept = grid_settings(_cfg(tmp_path, 'tune_sampler.axes={"steps": [6, 3]}'))
    assert len(settings) == 2 and settings[0] is reference and swept == ["steps"]  # steps=6 is the reference itself


def test_a_run_without_a_bank_is_a_clear_error(tmp_path, no_ray):
    with pytest.raises(FileNotFoundError, match="realfake encode"):
        run_tune_sampler(_cfg(tmp_path, 'tune_sampler.axes={"steps": [3]}'))


@pytest.mark.e2e
@pytest.mark.system
def test_tiny_sweep_writes_table_front_and_recommendation_then_reruns_nothing(tiny_bank, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(f"{tiny_bank}/latents", out / "latents")
    cfg = _cfg(out, 'tune_sampler.axes={"speedup": ["deepcache:2"]}')
    summary = run_tune_sampler(cfg)
    rows = list(csv.DictReader(io.StringIO(storage.read_text(RunLayout(str(out)).tune_dir("results.csv")))))
    assert [r["name"] for r in rows][:1] == ["reference: none"] and len(rows) == 2
    for row in rows:
        assert not row["error"] and float(row["images_per_s"]) > 0 and float(row["kid_std"]) >= 0
    reference = rows[0]
    assert 0.0 <= float(reference["accuracy"]) <= 1.0 and reference["finalist"] == "True"
    recommended = [r for r in rows if r["recommended"] == "True"]
    assert len(recommended) == 1 and summary["recommended"] == recommended[0]["name"]
    loaded = load_config(preset="tiny", config_file=RunLayout(str(out)).tune_dir("recommended.yaml")).generate
    assert loaded.speedup == recommended[0]["speedup"] and loaded.steps == 6
    assert storage.exists(RunLayout(str(out)).tune_dir("pareto.png")) and "| name |" in storage.read_text(RunLayout(str(out)).tune_dir("results.md"))

    forbid_ray_work(monkeypatch)  # every trial is stored: the rerun only rebuilds the outputs
    assert run_tune_sampler(cfg)["recommended"] == summary["recommended"]
