"""Experiment tracking (``_internal/tracking.py``) against a local MLflow file store and TensorBoard event files,
read back with MLflow's client and TensorBoard's own reader. No Ray: the stage paths are in test_train.py (MLflow
and TensorBoard on a resumed classifier) and test_finetune.py (TensorBoard on a resumed fine-tuning)."""

from __future__ import annotations

import json
import sys

import pytest
from helpers import mlflow_points, mlflow_runs, tensorboard_points

from realfake_ray import storage
from realfake_ray._internal.tracking import StageRun, evaluation_metrics, flatten_params, log_report
from realfake_ray.config import ConfigError, dump_config, load_config
from realfake_ray.plots import plot_curves


@pytest.fixture
def tracked(tmp_path):
    """A run config with both trackers on: MLflow in a file store below tmp_path, event files below the run."""
    uri = f"file://{tmp_path}/mlruns"
    cfg = load_config(preset="tiny", out=str(tmp_path / "run"),
                      overrides=[f"tracking.mlflow_uri={uri}", "tracking.tensorboard=true"])
    return cfg, uri


def _rows(steps, loss=lambda s: 1.0 / s):
    return [{"step": s, "loss": loss(s), "lr": 1e-3, "samples_per_s": 50.0 + s, "run": "finetune"} for s in steps]


def _run(uri: str, name: str):
    return next(r for r in mlflow_runs(uri) if r.info.run_name == name)


# ------------------------------------------------------------------------------------------------ pure parts


def test_the_config_flattens_to_one_string_parameter_per_key():
    cfg = load_config(preset="tiny", out="/tmp/run", overrides=["evaluate.extra_sets={v2 set!: /data/v2}"])
    flat = flatten_params(cfg.model_dump(mode="json"))
    assert flat["finetune.lr"] == "0.001" and flat["model.pretrained"] == "preset:tiny"
    assert flat["train.milestones"] == "[0.25, 0.5, 0.75]" and flat["tracking.mlflow_uri"] == "null"
    assert flat["evaluate.extra_sets.v2 set_"] == "/data/v2"  # a character MLflow refuses in a key → _
    assert flat["encode.actors.max_size"] == "1"  # nested sections: dotted all the way down
    assert all(isinstance(v, str) for v in flat.values()) and len(flat) > 150


def test_evaluation_metrics_leave_out_what_was_not_measured():
    evaluation = {"sets": {"val": {"top1": 0.5, "top5": 0.9, "per_class": {"digit_0": 1.0}}, "v2!": {"top1": 0.25}},
                  "distribution": {"skipped": "no latent bank"}}
    assert evaluation_metrics(evaluation) == {"eval/val/top1": 0.5, "eval/val/top5": 0.9, "eval/v2_/top1": 0.25}


def test_tracking_is_off_by_default_and_then_imports_and_writes_nothing(tmp_path, monkeypatch, capsys):
    cfg = load_config(preset="tiny", out=str(tmp_path / "run"))
    assert cfg.tracking.mlflow_uri is None and cfg.tracking.tensorboard is False
    for heavy in ("mlflow", "mlflow.entities", "tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, heavy, None)  # importing one would now raise ImportError
    run = StageRun.of(cfg, "finetune")
    run.start(cfg)
    run.logger([], "step").log(_rows([1, 2]))
    run.finish({"eval/val/top1": 0.5}, 2, [str(tmp_path / "missing.png")])
    log_report(cfg, [str(tmp_path / "run" / "report.md")])
    assert not run.enabled and capsys.readouterr().out == "" and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------ MLflow + TensorBoard


def test_a_stage_run_is_nested_under_its_out_run_with_the_config_as_parameters(tracked):
    cfg, uri = tracked
    StageRun.of(cfg, "finetune").start(cfg)
    parent, stage = _run(uri, "run"), _run(uri, "finetune")
    assert stage.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert stage.data.tags["realfake.out"] == parent.data.tags["realfake.out"] == cfg.out
    assert stage.data.params == flatten_params(cfg.model_dump(mode="json")) and stage.info.status == "RUNNING"
    assert parent.info.status == "FINISHED" and parent.data.params == {}  # a folder of stage runs

    # A resumed invocation continues the same run: parameters keep their first value, config.yaml is the newest.
    more = load_config(preset="tiny", out=cfg.out, overrides=["finetune.max_steps=60",
                                                              *(f"tracking.{k}={v}" for k, v in cfg.tracking)])
    StageRun.of(more, "finetune").start(more)
    assert [r.info.run_name for r in mlflow_runs(uri)] == ["run", "finetune"]
    stage = _run(uri, "finetune")
    assert stage.data.params["finetune.max_steps"] == json.dumps(cfg.finetune.max_steps)
    from mlflow import MlflowClient

    config = MlflowClient(tracking_uri=uri).download_artifacts(stage.info.run_id, "config.yaml")
    assert open(config).read() == dump_config(more)


def test_metric_rows_reach_both_trackers_once_across_an_interrupted_and_resumed_run(tracked):
    """Session 1 logs steps 1-3 and dies after its checkpoint at 2; session 2 resumes from that checkpoint (rows
    1-2 restored), recomputes step 3 (another value) and goes on to 4. Each tracker holds each step once: MLflow
    the first value of step 3, TensorBoard the resumed run's (it purges what the dead run logged past its
    checkpoint), as metrics.jsonl does."""
    cfg, uri = tracked
    run = StageRun.of(cfg, "finetune")
    run.start(cfg)
    first = run.logger([], "step")
    first.log(_rows([1, 2]))
    first.log(_rows([1, 2, 3]))
    resumed = StageRun.of(cfg, "finetune").logger(_rows([1, 2]), "step")
    resumed.log(_rows([1, 2, 3, 4], loss=lambda s: 10.0 * s))

    run_id = _run(uri, "finetune").info.run_id
    assert mlflow_points(uri, run_id, "loss") == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 40.0)]
    assert [s for s, _ in mlflow_points(uri, run_id, "samples_per_s")] == [1, 2, 3, 4]
    assert mlflow_points(uri, run_id, "run") == []  # strings are not metrics
    board = tensorboard_points(run.tensorboard_dir(), "loss")
    assert board == [(1, 1.0), (2, 0.5), (3, 30.0), (4, 40.0)]
    assert run.tensorboard_dir() == storage.join(cfg.out, "tensorboard", "finetune")


def test_tracking_switched_on_at_a_resume_also_logs_the_restored_rows(tracked):
    cfg, uri = tracked
    StageRun.of(cfg, "finetune").logger(_rows([1, 2]), "step").log(_rows([1, 2, 3]))
    run_id = _run(uri, "finetune").info.run_id
    assert [s for s, _ in mlflow_points(uri, run_id, "loss")] == [1, 2, 3]
    assert [s for s, _ in tensorboard_points(StageRun.of(cfg, "finetune").tensorboard_dir(), "loss")] == [1, 2, 3]


def test_finish_logs_final_metrics_and_the_pictures_that_exist_and_ends_the_run(tracked, tmp_path):
    cfg, uri = tracked
    run = StageRun.of(cfg, "train", tag="real", key="run-real-resnet_tiny-1")
    png = plot_curves([{"epoch": 0, "train_loss": 1.0}, {"epoch": 1, "train_loss": 0.5}], "epoch", ["train_loss"],
                      str(tmp_path / "curves.png"))
    run.finish({"eval/val/top1": 0.75}, 1, [png, str(tmp_path / "missing.png")])
    done = _run(uri, "train-real")
    assert done.info.status == "FINISHED" and mlflow_points(uri, done.info.run_id, "eval/val/top1") == [(1, 0.75)]
    from mlflow import MlflowClient

    assert [a.path for a in MlflowClient(tracking_uri=uri).list_artifacts(done.info.run_id)] == ["curves.png"]
    assert tensorboard_points(storage.join(cfg.out, "tensorboard", "train", "real"), "eval/val/top1") == [(1, 0.75)]

    # Another classifier run under the same tag (other settings: another Ray Train run name) is another run.
    StageRun.of(cfg, "train", tag="real", key="run-real-resnet_tiny-2").start(cfg)
    assert len({r.info.run_id for r in mlflow_runs(uri) if r.info.run_name == "train-real"}) == 2


def test_event_files_of_a_remote_out_are_uploaded_at_every_log(tmp_path):
    cfg = load_config(preset="tiny", out="memory://tracking-test/run", overrides=["tracking.tensorboard=true"])
    run = StageRun.of(cfg, "finetune")
    logger = run.logger([], "step")
    logger.log(_rows([1]))
    assert tensorboard_points(run.tensorboard_dir(), "loss") == [(1, 1.0)]
    logger.log(_rows([1, 2]))
    assert tensorboard_points(run.tensorboard_dir(), "loss") == [(1, 1.0), (2, 0.5)]
    assert run.tensorboard_dir() == "memory://tracking-test/run/tensorboard/finetune"


def test_a_failed_log_is_printed_and_its_rows_retried_at_the_next_log(tracked, monkeypatch, capsys):
    from mlflow import MlflowClient

    cfg, uri = tracked
    logger = StageRun.of(cfg, "finetune").logger([], "step")
    real, calls = MlflowClient.log_batch, []

    def down_once(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("tracking server unreachable")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", down_once)
    logger.log(_rows([1]))
    assert "[tracking] warning: logging metrics to MLflow failed (ConnectionError: tracking server unreachable)" in \
        capsys.readouterr().out
    logger.log(_rows([1, 2]))
    assert [s for s, _ in mlflow_points(uri, _run(uri, "finetune").info.run_id, "loss")] == [1, 2]


def test_a_tracker_that_cannot_be_used_is_named_before_any_work(tmp_path, monkeypatch):
    cfg = load_config(preset="tiny", out=str(tmp_path / "run"), overrides=["tracking.mlflow_uri=nosuch://host"])
    with pytest.raises(ConfigError, match=r"tracking.mlflow_uri='nosuch://host'"):
        StageRun.of(cfg, "finetune").start(cfg)
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ConfigError, match=r"needs MLflow: pip install 'realfake-ray\[mlflow\]'"):
        StageRun.of(cfg, "finetune").start(cfg)
    cfg = load_config(preset="tiny", out=str(tmp_path / "run"), overrides=["tracking.tensorboard=true"])
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ConfigError, match=r"tracking.tensorboard=true needs TensorBoard"):
        StageRun.of(cfg, "finetune").start(cfg)
