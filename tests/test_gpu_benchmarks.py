"""The GPU check (benchmarks/gpu_pipeline.sh and its helpers): the pure parts without Ray, then its dry run — the
same code path as on a GPU, on the CPU at tiny shapes — on the session's Ray cluster, so that it cannot rot."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _script(name: str):
    """A benchmarks/ script as a module (they put the repository root and benchmarks/ on sys.path themselves)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gp():
    return _script("gpu_pipeline")


def test_the_generated_dataset_is_an_image_folder_of_the_asked_shape(gp, tmp_path):
    paths = gp.make_dataset(tmp_path, classes=3, train_per_class=2, val_per_class=1, size=(48, 36))
    train = sorted(Path(paths["train"]).rglob("*.jpg"))
    assert len(train) == 6 and len(list(Path(paths["val"]).rglob("*.jpg"))) == 3
    assert {p.parent.name for p in train} == {"class_0", "class_1", "class_2"}
    assert Image.open(train[0]).size == (48, 36)
    assert json.loads(Path(paths["classes_file"]).read_text()) == {f"class_{k}": f"shape {k}" for k in range(3)}
    again = gp.make_dataset(tmp_path / "again", classes=3, train_per_class=2, val_per_class=1, size=(48, 36))
    assert Path(train[0]).read_bytes() == (Path(again["train"]) / "class_0" / train[0].name).read_bytes()  # seeded


def test_actor_timings_from_ray_task_events(gp):
    ms = lambda s: int(s * 1000)  # noqa: E731
    tasks = [
        {"type": "ACTOR_CREATION_TASK", "actor_id": "a", "func_or_class_name": "MapWorker(MapBatches(SynthesisActor))",
         "worker_pid": 11, "start_time_ms": ms(102), "end_time_ms": ms(110)},
        {"type": "ACTOR_TASK", "actor_id": "a", "start_time_ms": ms(111), "end_time_ms": ms(118)},
        {"type": "ACTOR_TASK", "actor_id": "a", "start_time_ms": ms(118), "end_time_ms": ms(121)},
        {"type": "ACTOR_CREATION_TASK", "actor_id": "b", "func_or_class_name": "RayTrainWorker", "worker_pid": 12,
         "start_time_ms": ms(104), "end_time_ms": None},  # still starting when the run ended
        {"type": "ACTOR_CREATION_TASK", "actor_id": "c", "func_or_class_name": "Other", "start_time_ms": ms(300)},
        {"type": "NORMAL_TASK", "func_or_class_name": "ReadFiles", "start_time_ms": ms(101), "end_time_ms": ms(102)},
    ]
    assert gp.actor_timings(tasks, 100.0, 200.0) == [
        {"class": "MapWorker(MapBatches(SynthesisActor))", "pid": 11, "created_s": 2.0, "ready_s": 10.0,
         "first_batch_done_s": 18.0},
        {"class": "RayTrainWorker", "pid": 12, "created_s": 4.0, "ready_s": None, "first_batch_done_s": None},
    ]


def test_stage_rows_and_markdown_from_a_run_report(gp):
    report = {
        "stages": {s: {"seconds": 10.0 + i, "skipped": s == "evaluate"} for i, s in enumerate(gp.STAGES)},
        "throughput": [{"stage": "generate", "rate": 6.5, "unit": "images/s end to end"},
                       {"stage": "train (default)", "rate": 400.0, "unit": "images/s (last epoch, 1 workers)"}],
        "finetune": {"wall_seconds": 40.0, "train_seconds": 12.5},
        "synthesis": {"timeline": [{"t": 0.5, "images": 0, "nodes": 1, "actors": 0, "actors_pending": 1},
                                   {"t": 9.0, "images": 24, "nodes": 1, "actors": 1, "actors_pending": 0}]},
    }

    class NoGpu:
        def peak(self, start, end):
            return {"device_gib": None, "per_process_gib": {}}

    windows = {s: (1000.0 + 100 * i, 1050.0 + 100 * i) for i, s in enumerate(gp.STAGES)}
    windows |= {"train": (1300.0, 1309.0), "evaluate_in_train": (1309.0, 1313.0)}  # the train stage evaluated
    evaluator = {"type": "ACTOR_CREATION_TASK", "actor_id": "e", "func_or_class_name": "MapWorker(MapBatches(ClipEmbedder))",
                 "worker_pid": 5, "start_time_ms": 1_310_000, "end_time_ms": 1_311_000}
    rows = {r["stage"]: r for r in gp.stage_rows(report, windows, NoGpu(), [evaluator])}
    assert [r["wall_s"] for r in rows.values()] == [10.0, 11.0, 12.0, 9.0, 4.0]
    assert rows["evaluate"]["run_by"] == "train" and not rows["evaluate"]["skipped"]
    assert [a["class"] for a in rows["evaluate"]["actors"]] == ["MapWorker(MapBatches(ClipEmbedder))"]
    assert rows["train"]["actors"] == [] and rows["evaluate"]["actors"][0]["ready_s"] == 2.0
    assert rows["generate"]["rates"] == [{"rate": 6.5, "unit": "images/s end to end"}]
    assert rows["train"]["rates"][0]["rate"] == 400.0 and rows["encode"]["rates"] == []
    assert rows["finetune"]["before_training_s"] == 27.5 and rows["generate"]["first_images_written_s"] == 9.0
    result = {"machine": {"cpus": 2, "torch": "2.x", "cuda": None, "ray": "2.60.0", "diffusers": "0.42",
                          "transformers": "5"}, "dataset": "4 classes", "dry_run": True, "exit_code": 0, "wall_s": 70.0,
              "stages": list(rows.values())}  # fmt: skip
    text = gp.markdown(result)
    assert "| generate | 12.0 | 6.5 images/s end to end | - | - |" in text
    assert "| evaluate (run by train) | 4.0 | - | - | MapWorker(MapBatches(ClipEmbedder)): 2.0 / - |" in text
    assert "27.5 s of the stage before its first step" in text


def test_the_last_epoch_line_splits_train_from_its_evaluation(gp):
    assert gp._LAST_EPOCH_LINE.search("(RayTrainWorker pid=1) [train] epoch 30/30 loss 0.2")
    assert not gp._LAST_EPOCH_LINE.search("[train] epoch 3/30 loss 0.2")
    assert not gp._LAST_EPOCH_LINE.search("[train] epoch 1/12 loss 0.2")


def test_profile_groups_kernel_names():
    group_of = _script("profile_unet").group_of
    assert group_of("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128") == "convolution"
    assert group_of("nvjet_tst_192x192_64x3_2x1_v_bz_coopB_NNT") == "matmul"
    assert group_of("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>") == "attention"
    assert group_of("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3") == "attention"
    assert group_of("triton_red_fused_native_group_norm_silu_12") == "normalisation"
    assert group_of("triton_poi_fused_add_mul_3") == "compiled fusions (triton)"
    assert group_of("aten::mkldnn_convolution") == "convolution" and group_of("aten::addmm") == "matmul"


@pytest.mark.e2e
@pytest.mark.system
def test_the_gpu_check_dry_run_runs_every_stage_and_measures_it(ray_cluster, tmp_path):
    """``gpu_pipeline.sh --dry-run`` on the session's cluster: the whole job through ``realfake run`` (a driver of
    its own, attached to the cluster) with a speed option set, and its results files."""
    out = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env |= {"OUT": str(out), "WORK": str(tmp_path / "work"), "PYTHON": sys.executable}
    gcs = ray_cluster.get_runtime_context().gcs_address
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_pipeline.sh"), "--dry-run", "--", "--ray-address", gcs,
                           "--set", "generate.fuse_qkv=true"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["pipeline.json", "pipeline.log", "pipeline.md"]
    result = json.loads((out / "pipeline.json").read_text())
    rows = {r["stage"]: r for r in result["stages"]}
    assert list(rows) == ["encode", "finetune", "generate", "train", "evaluate"]
    assert all(r["wall_s"] > 0 and not r["skipped"] for r in rows.values())
    assert {r["rates"][0]["unit"].split(" ")[0] for s, r in rows.items() if s != "evaluate"} == {"images/s", "samples/s"}
    for stage in ("encode", "generate"):  # Ray Data actors: ready, then their first batch done
        actor = next(a for a in rows[stage]["actors"] if "MapWorker" in a["class"])
        assert 0 <= actor["created_s"] <= actor["ready_s"] <= actor["first_batch_done_s"] <= rows[stage]["wall_s"] + 5
    assert any("TrainWorker" in a["class"] for a in rows["finetune"]["actors"])
    assert rows["finetune"]["before_training_s"] > 0 and rows["generate"]["first_images_written_s"] > 0
    assert rows["generate"]["peak_gpu"] == {"device_gib": None, "per_process_gib": {}}  # no GPU here
    assert result["generate_throughput_settings"]["fuse_qkv"] is True  # the speed option, recorded by the stage
    assert rows["evaluate"]["run_by"] == "train" and rows["evaluate"]["wall_s"] > 0  # train ends by evaluating
    assert any("ClassifierActor" in a["class"] or "ClipEmbedder" in a["class"] for a in rows["evaluate"]["actors"])
    assert result["accuracy"] and result["config"]["train"]["amp"] is True
    assert "| evaluate (run by train) |" in (out / "pipeline.md").read_text()
