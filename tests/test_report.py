"""The run report from stage outputs alone (no Ray): per-classifier rows, throughput, pictures, cost."""

import numpy as np
from helpers import mlflow_runs

from realfake_ray import storage
from realfake_ray.config import load_config
from realfake_ray.plots import plot_curves
from realfake_ray.stages.registry import COMMANDS
from realfake_ray.tools.report import write_report


def _classifier(out: str, tag: str | None, source: str, real: int, synthetic: int, top1: float) -> None:
    cdir = storage.join(out, "classifier", *([tag] if tag else []))
    sets = {"val": {"top1": top1, "top5": 0.9, "count": 360}}
    dist = {"kernel": "gaussian", "mmd2": 0.5, "mean_class_mmd2": 0.6, "nn": {"count": 3, "threshold": 0.05}}
    storage.write_json(storage.join(cdir, "metrics.json"), {"source": source, "arch": "resnet_tiny", "epochs": 4,
                                                            "sets": sets, "distribution": dist if synthetic else {"skipped": "x"}})
    storage.write_json(storage.join(cdir, "_done.json"), {"real_images": real, "synthetic_images": synthetic,
                                                          "last_epoch": {"images_per_s": 250.0, "workers": 2},
                                                          "val_top1_last5": top1 - 0.01})
    rows = [{"epoch": e, "train_loss": 1.0 / (e + 1)} for e in range(3)]
    storage.upload_file(plot_curves(rows, "epoch", ["train_loss"], f"{out}/curves-{tag}.png"), storage.join(cdir, "curves.png"))


def test_report_lists_every_classifier_with_its_data_and_pictures(tmp_path):
    out = str(tmp_path)
    _classifier(out, None, "synthetic", 0, 14370, 0.12)
    _classifier(out, "real", "real", 1437, 0, 0.93)
    _classifier(out, "synthetic-1x", "synthetic", 0, 1437, 0.11)
    storage.write_json(storage.join(out, "synthetic", "_summary.json"),
                       {"count": 10, "images_per_s": 90.0, "sampler_images_per_s": 97.0, "gpus_per_actor": 0.0})
    cfg = load_config(preset="tiny", out=out, overrides=["generate.mult=10"])
    report = write_report(cfg, {"train": {"seconds": 12.0, "skipped": False, "result": {}}})

    accuracy = {r["classifier"]: r for r in report["accuracy"]}
    assert set(accuracy) == {"default", "real", "synthetic-1x"}
    assert (accuracy["real"]["real_images"], accuracy["default"]["synthetic_images"]) == (1437, 14370)
    assert accuracy["real"]["val_top1_last5"] == 0.92  # beside the final epoch's top-1, from train's summary
    assert [r["classifier"] for r in report["distribution"]] == ["default", "synthetic-1x"]  # real-only: none
    assert {r["stage"] for r in report["throughput"]} == {"generate", "train (default)", "train (real)", "train (synthetic-1x)"}
    assert report["pictures"]["scaling"] == "scaling.png" and storage.exists(storage.join(out, "scaling.png"))
    assert report["pictures"]["curves_real"] == "classifier/real/curves.png"
    assert report["imagenet_estimate"]["measured"] is None  # a CPU run of the tiny model
    assert report["config"]["generate"]["mult"] == 10 and storage.read_json(storage.join(out, "report.json")) == report
    text = storage.read_text(storage.join(out, "report.md"))
    for piece in ("| real | real |", "![val top-1 vs training images](scaling.png)", "classifier/real/curves.png",
                  "## Throughput", "GPU-hours", "No measured figure"):
        assert piece in text, piece
    for stage in ("generate", "train", "evaluate"):  # the sections of the stages whose outputs exist
        assert f"\n## {COMMANDS[stage].report}\n" in text, stage
    assert f"## {COMMANDS['finetune'].report}" not in text  # no fine-tuning record: no section
    assert np.isfinite(report["imagenet_estimate"]["flop_model"]["h100_gpu_hours"])


def test_the_report_and_its_pictures_reach_the_runs_mlflow_run(tmp_path):
    out, uri = str(tmp_path / "run"), f"file://{tmp_path}/mlruns"
    _classifier(out, "real", "real", 1437, 0, 0.93)
    _classifier(out, "synthetic-1x", "synthetic", 0, 1437, 0.11)
    cfg = load_config(preset="tiny", out=out, overrides=[f"tracking.mlflow_uri={uri}"])
    write_report(cfg, {"train": {"seconds": 12.0, "skipped": False, "result": {}}})
    from mlflow import MlflowClient

    (run,) = mlflow_runs(uri)  # the run of the whole --out (no stage ran here)
    client = MlflowClient(tracking_uri=uri)
    listed = {a.path for a in client.list_artifacts(run.info.run_id)} | {
        a.path for folder in ("classifier/real", "classifier/synthetic-1x") for a in client.list_artifacts(run.info.run_id, folder)}
    assert listed >= {"report.md", "scaling.png", "classifier/real/curves.png", "classifier/synthetic-1x/curves.png"}
    assert open(client.download_artifacts(run.info.run_id, "report.md")).read() == storage.read_text(f"{out}/report.md")


def test_the_caption_stage_has_its_section_and_its_rate(tmp_path):
    out = str(tmp_path)
    settings = {"model": "Salesforce/blip2-opt-2.7b", "revision": None, "max_tokens": 30, "image_size": 224}
    storage.write_json(storage.join(out, "captions", "_summary.json"),
                       {"images": 31, "captions": 30, "unreadable": 1, "settings": settings, "images_per_s": 12.5})
    report = write_report(load_config(preset="tiny", out=out), {"caption": {"seconds": 3.0, "skipped": False, "result": {}}})
    assert report["captions"] == {"images": 31, "captions": 30, "unreadable": 1, "settings": settings}
    assert {"stage": "caption", "rate": 12.5, "unit": "images/s"} in report["throughput"]
    text = storage.read_text(storage.join(out, "report.md"))
    assert f"\n## {COMMANDS['caption'].report}\n" in text and "Salesforce/blip2-opt-2.7b, at most 30 tokens" in text
    assert "| 31 | 30 | 1 |" in text
