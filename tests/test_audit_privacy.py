import json

import numpy as np
import pytest
from helpers import forbid_ray_work, small_bank

import pyarrow.parquet as pq

from realfake_ray import storage
from realfake_ray.data.synthetic import list_shards
from realfake_ray._internal.shards import read_parts
from realfake_ray.tools.audit_privacy.driver import run_audit_privacy
from realfake_ray.config import ConfigError, load_config
from realfake_ray.layout import RunLayout
from realfake_ray.tools.report import write_report


def _cfg(out, *overrides):
    return load_config(preset="tiny", out=str(out), overrides=[
        "audit_privacy.shadows=4", "audit_privacy.classifier_budget_images=64", "audit_privacy.strengths=[0.5]",
        "audit_privacy.strength_rows=8", "generate.steps=2", "generate.use_lora=false", *overrides])


def test_an_odd_shadow_count_or_no_arm_is_a_config_error(tmp_path, no_ray):
    with pytest.raises(ConfigError, match="audit_privacy.shadows=5"):
        run_audit_privacy(_cfg(tmp_path, "audit_privacy.shadows=5"))
    with pytest.raises(ConfigError, match="audit_privacy.arms is empty"):
        run_audit_privacy(_cfg(tmp_path, "audit_privacy.arms=[]"))
    with pytest.raises(ConfigError, match="audit_privacy.shadows"):
        load_config(preset="tiny", overrides=["audit_privacy.shadows=2"])


def test_a_run_without_a_bank_is_a_clear_error(tmp_path, no_ray):
    with pytest.raises(FileNotFoundError, match="realfake encode"):
        run_audit_privacy(_cfg(tmp_path))


@pytest.mark.e2e
@pytest.mark.system
def test_tiny_audit_runs_both_arms_on_shadow_halves_and_resumes(tiny_bank, tmp_path, monkeypatch):
    out = tmp_path / "run"
    small_bank(tiny_bank, out, per_class=12)  # a 120-image bank: the audit's wiring, quickly
    cfg = _cfg(out, "generate.actors.min_size=1", "generate.actors.max_size=1")
    write_report(cfg, {})  # a run report exists: the audit adds its section to it
    summary = run_audit_privacy(cfg)
    report = storage.read_text(f"{out}/report.md")
    assert "## Audit: membership inference" in report and "audit_privacy/roc.png" in report
    bank_ids = set(read_parts(RunLayout(str(out)).bank_dir("train"), ["image_id"]).column("image_id").to_pylist())
    halves = []
    for k in range(4):  # each synthetic shadow's pipeline saw only its half of the real train set
        shadow = RunLayout(str(out)).audit_dir("synthetic", f"shadow_{k}")
        ids = read_parts(RunLayout(shadow).bank_dir("train"), ["image_id"]).column("image_id").to_pylist()
        manifest = [i for u in list_shards(f"{shadow}/synthetic/data").urls
                    for i in pq.read_table(u, columns=["image_id"]).column("image_id").to_pylist()]
        assert set(ids) < bank_ids and sorted(manifest) == sorted(ids) and abs(len(ids) - len(bank_ids) / 2) < 20
        halves.append(set(ids))
    assert all(sum(i in h for h in halves) == 2 for i in bank_ids)  # every image in exactly half the shadows
    for arm in ("real", "synthetic"):
        result = summary["arms"][arm]
        assert 0.0 <= result["auc"] <= 1.0 and result["pairs"] > len(bank_ids) and 0 <= result["val_top1_mean"] <= 1
        phi = np.load(storage.open_file(RunLayout(str(out)).audit_dir(arm, "shadow_0.npz")))["phi"]
        assert phi.shape == (len(bank_ids),) and np.isfinite(phi).all()
    (strength,) = summary["strengths"]
    assert strength["strength"] == 0.5 and strength["images"] == 8 and 0 <= strength["near_copy_fraction"] <= 1
    assert json.loads(storage.read_text(RunLayout(str(out)).audit_dir("summary.json")))["arms"].keys() == {"real", "synthetic"}
    assert storage.exists(RunLayout(str(out)).audit_dir("roc.png")) and "| arm |" in storage.read_text(RunLayout(str(out)).audit_dir("audit.md"))

    forbid_ray_work(monkeypatch)  # every shadow is stored: the rerun only recomputes the attack from them
    rerun = run_audit_privacy(cfg.model_copy(update={"audit_privacy": cfg.audit_privacy.model_copy(update={"strengths": []})}))
    assert rerun["arms"] == summary["arms"]
