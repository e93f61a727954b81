"""Train stage: fast planning / bad-input tests (no Ray), then tiny-preset Ray Train runs (e2e):
a real-only run stopped after 1 epoch and resumed to 2, a synthetic-only run on generate's output, and a
mixed epoch as its workers would receive it."""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest
from helpers import fabricate_synthetic, forbid_ray_work, mlflow_points, mlflow_runs, run_with_node_loss, small_bank, \
    tensorboard_points

from realfake_ray import storage
from realfake_ray.config import ConfigError, load_config
from realfake_ray.data.imagefolder import DatasetError
from realfake_ray.data.labelled import seed_of, synthetic_set
from realfake_ray.data.synthetic import shard_name
from realfake_ray.layout import RunLayout
from realfake_ray.stages.train.driver import read_metrics, run_train, train_dataset
from realfake_ray.stages.train.plan import apply_budget, epoch_composition, epoch_repeats, fingerprint, plan_training, run_name

REAL = "embedded:digits/train"

VAL = "embedded:digits/val"


def _cfg(out, *overrides, **flags):
    return load_config(preset="tiny", out=str(out), overrides=list(overrides), **flags)


# ------------------------------------------------------------------------------------ planning (fast)
def test_epoch_composition():
    assert epoch_composition(100, 0, "real", 0.5) == (1.0, 0.0, 100)
    assert epoch_composition(100, 300, "synthetic", 0.5) == (0.0, 1.0, 300)
    assert epoch_composition(1000, 10000, "mix", 0.5) == (1.0, 0.1, 2000)
    real_frac, synth_frac, n = epoch_composition(1000, 100, "mix", 0.5)  # too few synthetic: subsample real
    assert (real_frac, synth_frac, n) == (0.1, 1.0, 200)
    real_frac, synth_frac, n = epoch_composition(1000, 10000, "mix", 0.25)
    assert real_frac == 1.0 and n == 1333 and abs(synth_frac * 10000 / n - 0.25) < 1e-3


def test_seeds_and_run_names_are_stable():
    assert seed_of(42, 1, 0, 3) == seed_of(42, 1, 0, 3) != seed_of(42, 1, 1, 3)
    a = _cfg("/tmp/x", "train.epochs=2")
    b = _cfg("/tmp/x", "train.epochs=9")  # more epochs: the same run (it resumes)
    c = _cfg("/tmp/x", "train.base_lr=0.2")  # another recipe: another run
    assert fingerprint(a) == fingerprint(b) and run_name(a) == run_name(b) != run_name(c)
    placed = _cfg("/tmp/x", "train.epochs=2", "train.cache=true", "train.worker_cpus=2", "train.decode_cpus=0.25",
                  "train.torch_threads=1")
    assert run_name(placed) == run_name(a)  # where and how it reads and runs: the same run
    assert run_name(a).startswith("run-synthetic-resnet_tiny-")


def test_the_synthetic_set_from_shards_and_from_exported_folders(tmp_path):
    n = fabricate_synthetic(str(tmp_path / "s"), copies=2, per_class=3)
    class_dirs = [f"digit_{i}" for i in range(10)]
    shards = synthetic_set(_cfg(tmp_path / "s"), class_dirs)
    assert shards.sharded and shards.num_images == n == 60 and shards.shards.num_rows == 2
    one_x = synthetic_set(_cfg(tmp_path / "s", "train.synthetic_mult=1"), class_dirs)
    assert one_x.num_images == 30 and one_x.shards["url"][0].as_py().rsplit("/", 1)[-1].startswith("train-c00-")
    # An ImageFolder export (or any other layout) given as train.synthetic: labelled by the real class list,
    # copies parsed from the file names.
    fabricate_synthetic(str(tmp_path / "f"), copies=2, per_class=3, layout="folders")
    folders = synthetic_set(_cfg(tmp_path / "f", f"train.synthetic={tmp_path / 'f' / 'synthetic' / 'train'}"), class_dirs)
    assert not folders.sharded and folders.num_images == 60 and sorted(folders.class_counts()) == [6] * 10
    cut = synthetic_set(_cfg(tmp_path / "f", f"train.synthetic={tmp_path / 'f' / 'synthetic' / 'train'}",
                             "train.synthetic_mult=1"), class_dirs)
    assert cut.num_images == 30 and all(i.endswith("__c0.jpg") for i in cut.items["image_id"].to_pylist())


def test_planning_holds_no_python_object_per_synthetic_image(tmp_path):
    """1,000 shards named as generate names them, 1,000 images each (1 M synthetic rows): training's plan, its
    data digest and the evaluation's inputs come from the listing. Python allocations stay far below one object
    per image (a row dict alone is ~200 bytes: 1 M of them ≈ 200 MB)."""
    import tracemalloc

    fabricate_synthetic(str(tmp_path), per_class=2)
    data = tmp_path / "synthetic" / "data"
    (shard,) = list(data.iterdir())
    for i in range(1000):
        (data / shard_name(i % 10, f"part-{i:032x}", 0, 1000)).write_bytes(shard.read_bytes())
    shard.unlink()
    cfg = _cfg(tmp_path, "train.source=synthetic", "evaluate.distribution_metrics=false")
    tracemalloc.start()
    plan = plan_training(cfg)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert plan.synthetic_images == 1_000_000 and plan.shuffle == "blocks"  # 1 M sharded images: no global shuffle
    assert peak < 40 * 2**20, f"planning allocated {peak / 2**20:.0f} MiB of Python objects"


# ------------------------------------------------------------------------------------ bad input (fast)
@pytest.mark.parametrize("layout", ["shards", "folders"])
def test_synthetic_classes_not_in_the_real_set_are_named(tmp_path, no_ray, layout):
    fabricate_synthetic(str(tmp_path), per_class=4, layout=layout,
                        class_dir_of=lambda d: "digit_11" if d == "digit_1" else d)
    overrides = [f"train.synthetic={tmp_path / 'synthetic' / 'train'}"] if layout == "folders" else []
    with pytest.raises(DatasetError, match=r"'digit_11'.*not among the 10 .*classes"):
        run_train(_cfg(tmp_path, "train.source=synthetic", *overrides))


def test_missing_or_empty_synthetic_source(tmp_path, no_ray):
    with pytest.raises(DatasetError, match="no synthetic data at .*run `realfake generate`"):
        run_train(_cfg(tmp_path / "none", "train.source=synthetic"))
    (tmp_path / "empty" / "synthetic" / "train" / "digit_0").mkdir(parents=True)
    with pytest.raises(DatasetError, match="is empty"):
        run_train(_cfg(tmp_path / "empty", "train.source=synthetic"))
    fabricate_synthetic(str(tmp_path / "copy3"), per_class=2)
    (tmp_path / "copy3" / "synthetic" / "data").iterdir().__next__().rename(
        tmp_path / "copy3" / "synthetic" / "data" / shard_name(3, "part-" + "0" * 32, 0, 20))
    with pytest.raises(DatasetError, match=r"synthetic set .* is empty \(train.synthetic_mult=1\)"):
        run_train(_cfg(tmp_path / "copy3", "train.source=synthetic", "train.synthetic_mult=1"))


def test_empty_real_source(tmp_path, no_ray):
    (tmp_path / "data" / "cat").mkdir(parents=True)
    (tmp_path / "data" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match="is empty"):
        run_train(_cfg(tmp_path / "run", "train.source=real", data__train=str(tmp_path / "data")))


def test_unknown_architecture(tmp_path, no_ray):
    with pytest.raises(ValueError, match=r"unknown classifier arch 'resnet5O'.*did you mean"):
        run_train(_cfg(tmp_path, "train.source=real", "train.arch=resnet5O"))


def test_batch_larger_than_an_epoch(tmp_path, no_ray):
    fabricate_synthetic(str(tmp_path), per_class=5)
    with pytest.raises(ConfigError, match=r"train.batch_size × train.num_workers = 64 exceeds the 50 images"):
        run_train(_cfg(tmp_path, "train.source=synthetic", "train.epochs=2"))  # no budget: one pass per epoch


def test_bad_evaluation_set_is_reported_before_training(tmp_path, no_ray):
    (tmp_path / "sketch" / "cat").mkdir(parents=True)
    shutil.copy(storage.resolve_embedded(f"{VAL}/digit_0/0078.png"), tmp_path / "sketch" / "cat" / "a.png")
    with pytest.raises(DatasetError, match=r"extra_sets\['sketch'\].*'cat' are not among the 10 real classes"):
        run_train(_cfg(tmp_path, "train.source=real", f"evaluate.extra_sets={{sketch: {tmp_path / 'sketch'}}}"))


def test_tag_must_be_a_plain_folder_name(tmp_path, no_ray):
    with pytest.raises(ConfigError, match=r"train.tag: '../x' is not a plain folder name"):
        run_train(_cfg(tmp_path, "train.source=real", "train.tag=../x"))


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    from realfake_ray.cli import main

    assert main(["train", "--preset", "tiny", "--out", str(tmp_path), "--source", "synthetic"]) == 2
    err = capsys.readouterr().err
    assert "no synthetic data" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------ Ray Train (e2e)
FIRST_EPOCHS, EPOCHS = 1, 2
SHORT = "train.warmup_epochs=0.5"  # the recipe's 2 warm-up epochs would outlast this 2-epoch run


@pytest.fixture(scope="module")
def real_run(ray_cluster, tmp_path_factory):
    """A real-only run stopped after 1 epoch, then resumed to 2 (plus an OOD subset set), both calls tracked in
    MLflow (a file store) and TensorBoard."""
    out = tmp_path_factory.mktemp("train-real")
    subset = out / "digits_3_7"
    for d in ("digit_3", "digit_7"):
        shutil.copytree(storage.resolve_embedded(f"{VAL}/{d}"), subset / d)
    sets = f"evaluate.extra_sets={{digits_3_7: {subset}}}"
    mlflow_uri = f"file://{tmp_path_factory.mktemp('mlruns')}"
    tracking = [f"tracking.mlflow_uri={mlflow_uri}", "tracking.tensorboard=true", "train.ema_decay=0.9"]
    started = time.time()
    first = run_train(_cfg(out, "train.source=real", SHORT, f"train.epochs={FIRST_EPOCHS}", sets, *tracking))
    first_metrics = read_metrics(RunLayout(str(out)).classifier_dir())
    second = run_train(_cfg(out, "train.source=real", SHORT, f"train.epochs={EPOCHS}", sets, *tracking))
    return {"out": out, "first": first, "first_metrics": first_metrics, "second": second,
            "seconds": time.time() - started, "mlflow_uri": mlflow_uri}


@pytest.mark.e2e
@pytest.mark.cluster_sim  # `make test-cluster`: CI's 20 minutes have no room (test_trainer.py tests the restart logic)
def test_losing_the_node_of_the_training_worker_restarts_from_its_epoch_checkpoint(tiny_bank, tmp_path_factory):
    """A head and three 1-CPU workers; the worker holds after its epoch-0 checkpoint and its node is removed.
    The driver restarts the run from that checkpoint (one restart) and it trains epoch 1 only, ending at 2
    epochs with one metrics row per epoch."""
    out = tmp_path_factory.mktemp("train-node-loss") / "run"
    shutil.copytree(os.path.join(tiny_bank, "latents"), out / "latents")
    overrides = ["train.source=real", "train.budget_images=null", "train.epochs=2", SHORT]
    found = run_with_node_loss("train", str(out), overrides, at=0, workers=3, fault="train.checkpoint_hold:0")
    assert found["removed"]["at"] == 0
    assert (found["epochs"], found["restarts"], found["metric_epochs"]) == (2, 1, [0, 1])
    assert found["top1"] > 0.1  # the evaluation ran on the restarted run's model (chance: 0.1)


@pytest.mark.e2e
def test_a_resumed_run_draws_each_epoch_as_an_uninterrupted_run_does(ray_cluster, tmp_path):
    """Epoch e's sample order and augmentations depend on (seed, e) only: a run resumed at epoch 2 gets the
    batches an uninterrupted run gets in its third epoch (the benchmark's seed-2 baseline once did not)."""
    cfg = _cfg(tmp_path, "train.source=real")
    plan = plan_training(cfg)

    def first_batches(first_epoch: int, epochs: int) -> list[dict]:
        ds = train_dataset(plan, cfg, first_epoch)
        ds.context.execution_options.preserve_order = True  # as the trainer runs it (its DataConfig)
        epochs_seen = []
        for _ in range(epochs):  # one whole execution per epoch
            batches = list(ds.iter_batches(batch_size=256))
            epochs_seen.append({k: np.concatenate([b[k] for b in batches]) for k in ("label", "pixels")})
        return epochs_seen

    uninterrupted = first_batches(0, 3)
    assert uninterrupted[0]["label"].tolist() != uninterrupted[1]["label"].tolist() != uninterrupted[2]["label"].tolist()
    resumed = first_batches(2, 1)[0]
    assert resumed["label"].tolist() == uninterrupted[2]["label"].tolist()
    assert np.array_equal(resumed["pixels"], uninterrupted[2]["pixels"])  # the same crops, flips and jitter


@pytest.mark.e2e
@pytest.mark.system
def test_resume_continues_at_the_saved_epoch(real_run):
    assert [r["epoch"] for r in real_run["first_metrics"]] == [0]
    assert real_run["second"]["resumed_at_epoch"] == FIRST_EPOCHS
    rows = read_metrics(RunLayout(str(real_run["out"])).classifier_dir())
    assert [r["epoch"] for r in rows] == [0, 1]  # epoch 0 from the first call, 1 from the second
    assert rows[:FIRST_EPOCHS] == real_run["first_metrics"]  # the first call's rows are kept, not recomputed
    assert len({r["run"] for r in rows}) == 1 and all(r["images_per_s"] > 0 for r in rows)
    run_dir = os.path.join(RunLayout(str(real_run["out"])).classifier_dir(), rows[0]["run"])
    assert "epoch_0001" in os.listdir(run_dir)


@pytest.mark.e2e
@pytest.mark.system
def test_epoch_metrics_and_the_evaluation_reach_mlflow_and_tensorboard_once_across_the_resume(real_run):
    from mlflow import MlflowClient

    uri, out = real_run["mlflow_uri"], str(real_run["out"])
    rows = read_metrics(RunLayout(out).classifier_dir())
    parent, run = mlflow_runs(uri)
    assert run.info.run_name == "train" and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.info.status == "FINISHED" and run.data.tags["realfake.key"] == rows[0]["run"]
    assert run.data.params["train.epochs"] == str(FIRST_EPOCHS)  # the first call's; the resumed call continued it
    for key in ("train_loss", "train_acc", "val_top1", "val_top5", "lr", "images_per_s"):
        values = [(r["epoch"], r[key]) for r in rows]
        assert mlflow_points(uri, run.info.run_id, key) == [(e, pytest.approx(v)) for e, v in values], key  # once each
        assert tensorboard_points(f"{out}/tensorboard/train", key) == [(e, pytest.approx(v, rel=1e-6)) for e, v in values]
    evaluations = [(0, real_run["first"]["evaluation"]), (1, real_run["second"]["evaluation"])]
    expected = [(epoch, pytest.approx(e["sets"]["val"]["top1"])) for epoch, e in evaluations]
    assert mlflow_points(uri, run.info.run_id, "eval/val/top1") == expected
    assert tensorboard_points(f"{out}/tensorboard/train", "eval/digits_3_7/top1") == \
        [(epoch, pytest.approx(e["sets"]["digits_3_7"]["top1"])) for epoch, e in evaluations]
    assert [a.path for a in MlflowClient(tracking_uri=uri).list_artifacts(run.info.run_id)] == ["config.yaml", "curves.png"]


@pytest.mark.e2e
@pytest.mark.system
def test_real_only_run_is_evaluated_on_every_val_image(real_run):
    # How well it learns is the benchmark's question (BENCHMARKS.md, effectiveness: real-only 0.99 after 30
    # epochs); here, that the evaluation covers the val set and agrees with the last epoch's own val row.
    val = real_run["second"]["evaluation"]["sets"]["val"]
    assert val["count"] == 360 and len(val["per_class"]) == 10 and 0.0 <= val["top1"] <= val["top5"] <= 1.0
    last = read_metrics(RunLayout(str(real_run["out"])).classifier_dir())[-1]
    assert "no latent bank" in real_run["second"]["evaluation"]["distribution"]["skipped"]
    assert last["epoch"] == EPOCHS - 1 and last["val_top1"] == pytest.approx(val["top1"], abs=0.02)


PER_CLASS = 3
SMALL = ["train.batch_size=8", "train.epochs=1", "generate.steps=4", "generate.batch_size=8", "generate.mult=2",
         "generate.use_lora=false", "generate.actors.min_size=1", "generate.actors.max_size=1"]


@pytest.fixture(scope="module")
def generated(tiny_bank, tmp_path_factory):
    """Real generate-stage output: a 30-image real subset (3 per digit), its slice of the tiny bank, and
    `realfake generate --mult 2` on it (tiny preset, 4 steps): 60 synthetic images in shards."""
    from realfake_ray.stages.generate.driver import run_generate

    out, data = tmp_path_factory.mktemp("train-gen"), tmp_path_factory.mktemp("train-gen-data")
    for image_id in small_bank(tiny_bank, out, PER_CLASS):  # "<class_dir>/<file>"
        (data / image_id).parent.mkdir(exist_ok=True)
        shutil.copy(storage.resolve_embedded(f"{REAL}/{image_id}"), data / image_id)
    run_generate(_cfg(out, *SMALL, data__train=str(data), data__val=VAL))
    return {"out": out, "data": str(data)}


def _synthetic_cfg(generated, *more):
    return _cfg(generated["out"], *SMALL, "train.source=synthetic", "train.tag=synthetic-2x", "train.ema_decay=0.9",
                f"evaluate.extra_sets={{digits_3_7: {generated['out'] / 'digits_3_7'}}}", *more,
                data__train=generated["data"], data__val=VAL)


@pytest.fixture(scope="module")
def synthetic_run(generated):
    """A synthetic-only run on generate's output, evaluated on val and on an OOD subset set (digits 3 and 7)."""
    for d in ("digit_3", "digit_7"):
        shutil.copytree(storage.resolve_embedded(f"{VAL}/{d}"), generated["out"] / "digits_3_7" / d)
    return run_train(_synthetic_cfg(generated))


@pytest.mark.e2e
def test_synthetic_only_run_on_generated_output(generated, synthetic_run):
    out, summary = generated["out"], synthetic_run
    assert summary["synthetic_images"] == 60 and summary["real_images"] == 0
    assert summary["model"].endswith("classifier/synthetic-2x/model.safetensors")
    [row] = read_metrics(RunLayout(str(out)).classifier_dir("synthetic-2x"))
    assert row["train_images"] == 56 and row["train_loss"] > 0  # 1 worker × 7 full batches of 8
    assert row["threads"] == 2  # the tiny preset's train.torch_threads, above the 1 CPU the worker holds
    report = summary["evaluation"]
    assert report["source"] == "synthetic" and report["sets"]["val"]["count"] == 360
    assert 0 <= report["sets"]["val"]["top1"] <= 1
    assert row["val_top1"] == report["sets"]["val"]["top1"]  # the last epoch's val pass is the evaluation's
    assert report["sets"]["val"]["skipped"] == 0 and len(report["sets"]["val"]["per_class"]) == 10
    assert report["sets"]["val"]["scored_by"] == "train" and report["sets"]["digits_3_7"]["scored_by"] == "evaluate"
    assert summary["val_top1_last5"] == pytest.approx(row["val_top1"])  # one epoch: its own val score
    assert 0 <= row["val_top1_ema"] <= 1 and summary["val_top1_ema"] == row["val_top1_ema"]  # the weights' EMA, scored too
    dist = report["distribution"]  # the bank of this run (30 real) against the 60 generated images
    assert dist["n_real"] == 30 and dist["n_synth"] == 60 and dist["mmd2"] is not None
    assert set(dist["per_class_mmd2"]) == {f"digit_{i}" for i in range(10)}


@pytest.mark.e2e
def test_ood_set_with_a_class_subset(generated, synthetic_run):
    ood = synthetic_run["evaluation"]["sets"]["digits_3_7"]
    assert ood["classes"] == 2 and ood["k"] == 2 and ood["count"] == 73
    assert set(ood["per_class"]) == {"digit_3", "digit_7"}
    assert ood["top5"] == 1.0  # a 2-way choice between the two classes present
    # The same 73 images as val's digit_3 + digit_7: restricting the logits to those two classes can only turn
    # wrong answers right, so the subset's top-1 is at least the 10-way accuracy on them.
    val = synthetic_run["evaluation"]["sets"]["val"]["per_class"]
    counts = {d: len(os.listdir(generated["out"] / "digits_3_7" / d)) for d in ("digit_3", "digit_7")}
    ten_way = sum(val[d] * n for d, n in counts.items()) / sum(counts.values())
    assert ood["top1"] >= ten_way - 1e-9


@pytest.mark.e2e
def test_outputs_and_done_marker(generated, synthetic_run):
    cdir = RunLayout(str(generated["out"])).classifier_dir("synthetic-2x")
    for name in ("model.safetensors", "curves.png", "metrics.json", "metrics.md", "_done.json", "metrics.jsonl"):
        assert os.path.exists(os.path.join(cdir, name)), name
    report = json.loads(open(os.path.join(cdir, "metrics.json")).read())
    assert report["source"] == "synthetic" and report["arch"] == "resnet_tiny" and report["epochs"] == 1
    assert "| val |" in open(os.path.join(cdir, "metrics.md")).read()
    with pytest.MonkeyPatch.context() as mp:  # complete, same inputs: the stored result, no Ray work at all
        forbid_ray_work(mp)
        again = run_train(_synthetic_cfg(generated))
    assert again.pop("skipped") is True
    assert again == json.loads(json.dumps(synthetic_run))


@pytest.mark.e2e
def test_a_mixed_epoch_unions_every_real_image_with_a_seeded_share_of_the_synthetic_ones(generated):
    """The mix as the trainer's workers receive it (the fit itself is the synthetic-only run's code): real rows
    (URLs) and synthetic ones (shard rows) meet as image bytes, all 30 real images and a seeded ~half of the 60
    synthetic ones, decoded to training views; the same epoch again draws the same images."""
    out = generated["out"]
    cfg = _cfg(out, *SMALL, "train.source=mix", "train.mix_ratio=0.5", "train.tag=mix", "evaluate.distribution_metrics=false",
               data__train=generated["data"], data__val=VAL)
    plan = plan_training(cfg)
    assert (plan.real_fraction, plan.synthetic_fraction, plan.epoch_images) == (1.0, 0.5, 60)
    assert (plan.real.num_images, plan.synthetic.num_images) == (30, 60)

    def epoch(first_epoch: int) -> np.ndarray:
        batches = list(train_dataset(plan, cfg, first_epoch).iter_batches(batch_size=64))
        assert all(b["pixels"].shape[1:] == (32, 32, 3) for b in batches)  # HWC uint8, decoded on CPU tasks
        return np.sort(np.concatenate([b["label"] for b in batches]))

    labels = epoch(0)
    assert 40 <= len(labels) <= 80  # 30 real + a seeded ~half of the 60 synthetic
    assert all(np.bincount(labels, minlength=10) >= 3)  # every class's 3 real images at least
    assert np.array_equal(epoch(0), labels)


def test_a_budget_gives_every_set_size_the_same_images_and_schedule_shape():

    cfg = load_config(preset="tiny")  # the digits-32px recipe: 30 epochs of the 1,437 real train digits
    assert cfg.train.budget_images == 43110 and cfg.train.epochs == 30 and cfg.train.warmup_epochs == 2.0
    real, ten_x, mix = apply_budget(cfg, 1437), apply_budget(cfg, 14370), apply_budget(cfg, 2874)
    assert (real.train.epochs, ten_x.train.epochs, mix.train.epochs) == (30, 3, 15)
    assert ten_x.train.warmup_epochs == pytest.approx(0.2)  # the same fraction of training warms up
    no_budget = load_config(preset="tiny", overrides=["train.budget_images=null"])
    assert apply_budget(no_budget, 14370).train.epochs == 30  # no budget: epochs as given
    explicit = load_config(preset="tiny", overrides=["train.epochs=4"])
    assert explicit.train.budget_images is None and apply_budget(explicit, 14370).train.epochs == 4


def test_a_small_set_passes_several_times_per_epoch_so_the_budget_keeps_its_epoch_count(tmp_path):
    """The data-scarce regime: 10 real digits per class under the digits-32px budget (43,110 images) would be
    431 epochs of 100 images, each with its validation pass; instead an epoch passes 15 times over the 100
    (1,500 images) and the budget takes 29 epochs. Sets the size of the real one keep one pass."""
    t = load_config(preset="tiny").train
    assert [epoch_repeats(t, n) for n in (100, 300, 1437, 2874, 14370)] == [15, 5, 1, 1, 1]
    assert epoch_repeats(load_config(preset="tiny", overrides=["train.epochs=4"]).train, 100) == 1  # no budget
    cfg = _cfg(tmp_path, "train.source=real", "data.train_per_class=10")
    plan = plan_training(cfg)
    assert plan.real.num_images == 100 and plan.repeats == 15 and plan.epoch_images == 1500
    assert plan.steps_per_epoch == 1500 // 64 and apply_budget(cfg, plan.epoch_images).train.epochs == 29


def test_the_weight_ema_averages_parameters_and_batchnorm_statistics():
    """train.ema_decay: torch's AveragedModel with an EMA of the weights and buffers (the BatchNorm running
    statistics too, or the averaged model would score with statistics of other weights)."""
    import torch

    from realfake_ray.method.classifier import build_classifier
    from realfake_ray.stages.train.driver import weight_ema

    assert weight_ema(torch.nn.Linear(2, 2), None) is None
    model = build_classifier("resnet_tiny", 10)
    ema = weight_ema(model, 0.75)
    for value in (1.0, 3.0):
        with torch.no_grad():
            for tensor in [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]:
                tensor.fill_(value)
        ema.update_parameters(model)
    expected = 0.75 * 1.0 + 0.25 * 3.0  # the first update copies, the second mixes
    assert torch.allclose(ema.module[0].weight, torch.full_like(ema.module[0].weight, expected))
    assert torch.allclose(ema.module[1].running_mean, torch.full_like(ema.module[1].running_mean, expected))


def test_unreadable_images_are_recorded_and_over_the_threshold_fail_the_stage(tmp_path, capsys):
    """The decode tasks record every image they could not read (after retries); a run with more of them than
    train.max_read_errors allows stops with the first ones named instead of training on a smaller set."""
    import numpy as np

    from realfake_ray.data.labelled import decode_rows, read_error_count
    from realfake_ray.stages.train.driver import TooManyReadErrors, check_read_errors, errors_dir

    cfg = _cfg(tmp_path, "train.max_read_errors=0.01")
    good = storage.resolve_embedded(f"{REAL}/digit_0/0000.png")
    urls = [good] * 98 + [str(tmp_path / "gone-1.png"), str(tmp_path / "gone-2.png")]
    batch = {"url": np.array(urls, dtype=object), "label": np.zeros(100, np.int64), "aug": np.linspace(0, 1, 100)}
    decoded = decode_rows(batch, 32, "train", errors_dir=errors_dir(cfg, "run-x"))
    assert len(decoded["label"]) == 98 and "skipped 2 unreadable image(s)" in capsys.readouterr().out
    count, first = read_error_count(errors_dir(cfg, "run-x"))
    assert count == 2 and all("gone-" in e and "FileNotFoundError" in e for e in first)
    decode_rows(batch, 32, "train", errors_dir=errors_dir(cfg, "run-x"))  # a retried task: the same record, not two
    assert read_error_count(errors_dir(cfg, "run-x"))[0] == 2
    assert check_read_errors(cfg, "run-x", 198)["count"] == 2  # 2 of 200: 1 %, at the threshold
    with pytest.raises(TooManyReadErrors, match=r"train: 2 of 100 images could not be read .*gone-1.png"):
        check_read_errors(cfg, "run-x", 98)
