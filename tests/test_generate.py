"""Generate stage: fast planner/helper tests, bad-input checks, then end-to-end runs on a 30-image bank.

The e2e runs share one small bank (3 digits per class, tiny preset) and a random LoRA; steps are cut
to 4 so each run is dominated by actor start-up, not sampling.
"""

import io
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import forbid_ray_work, reap_killed, run_with_node_loss, small_bank, start_with_fault
from PIL import Image

from realfake_ray import storage
from realfake_ray._internal.shards import part_files, read_parts, write_part
from realfake_ray.bank import read_meta
from realfake_ray.cli import main as cli_main
from realfake_ray.config import ConfigError, load_config
from realfake_ray.stages.generate.driver import run_generate
from realfake_ray.stages.generate.plan import (
    _stem_collisions,
    check_generate_config,
    image_seed,
    plan_units,
    synthetic_path,
    unit_rows,
)
from realfake_ray.layout import RunLayout
from realfake_ray.method.lora import add_lora, save_lora
from realfake_ray.models.loading import load_pipeline, read_component_config, resolve_model_dir
from realfake_ray.stages.generate.workers import encode_jpeg, write_images, write_manifest

REPO = Path(__file__).resolve().parents[1]
# One actor: each actor process loads the pipeline, seconds on 2 cores (run_a uses the preset's pool of two).
FAST = ["generate.steps=4", "generate.batch_size=8", "generate.rows_per_manifest_file=16",
        "generate.actors.min_size=1", "generate.actors.max_size=1"]
TWO_ACTORS = ["generate.actors.min_size=2", "generate.actors.max_size=2"]
PER_CLASS = 3


def _cfg(out, *overrides, **flags):
    return load_config(preset="tiny", out=str(out), overrides=[*FAST, *overrides], **flags)


def _manifest(out):
    return read_parts(RunLayout(str(out)).manifest_dir())


def _files(out):
    root = RunLayout(str(out)).images_dir()
    return {storage.relative(u, root): u for u in storage.find(root)}


@pytest.fixture
def no_ray(monkeypatch):
    """Any attempt to start Ray or build the pipeline fails the test: validation must come first."""
    import realfake_ray.stages.generate.driver as generate

    def boom(*_args, **_kwargs):
        raise AssertionError("the pipeline was built before the input was validated")

    forbid_ray_work(monkeypatch)
    monkeypatch.setattr(generate, "build_pipeline", boom)


# ------------------------------------------------------------------------------------------ fast


def test_seeds_are_stable_63_bit_and_distinct_per_copy():
    assert image_seed(42, "digit_0/0001.png", 0) == image_seed(42, "digit_0/0001.png", 0)
    seeds = {image_seed(s, i, c) for s in (1, 2) for i in ("a/x.png", "a/y.png") for c in range(3)}
    assert len(seeds) == 12 and all(0 <= s < 2**63 for s in seeds)


def test_synthetic_paths_are_safe_and_disambiguated():
    assert synthetic_path("digit_0", "digit_0/0001.png", 2) == "digit_0/0001__c2.jpg"
    odd = synthetic_path("../evil dir", "../evil dir/sub/x.png", 0)
    assert ".." not in odd and odd.count("/") == 1 and odd.endswith("__c0.jpg")
    a, b = synthetic_path("c", "c/x.png", 0, True), synthetic_path("c", "c/x.jpg", 0, True)
    assert a != b and a.startswith("c/x-") and a.endswith("__c0.jpg")
    ids = pa.chunked_array([["c/x.png", "c/x.jpg", "c/y.png", "d/x.png"]])
    assert _stem_collisions(ids, np.ones(4, bool)) == {"c/x.png", "c/x.jpg"}
    assert _stem_collisions(pa.chunked_array([["c/x.png", "d/x.png"]]), np.ones(2, bool)) == frozenset()


def test_jpeg_encoding_and_storage_resize():
    image = np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8)
    assert Image.open(io.BytesIO(encode_jpeg(image, 90))).size == (48, 32)
    assert Image.open(io.BytesIO(encode_jpeg(image, 90, storage_size=16))).size == (24, 16)
    assert encode_jpeg(image, 90) == encode_jpeg(image, 90)


def _generated_batch(n: int, copy_idx: int = 0, error: str = "") -> dict[str, np.ndarray]:
    """What the generate actor hands the writers: n images with their keys."""
    ids = [f"img{i}" for i in range(n)]
    return {
        "path": np.array([f"0/{i}__c{copy_idx}.jpg" for i in ids], dtype=object),
        "image_id": np.array(ids, dtype=object), "label": np.zeros(n, np.int64),
        "class_dir": np.array(["0"] * n, dtype=object), "copy_idx": np.full(n, copy_idx, np.int64),
        "seed": np.arange(n, dtype=np.int64), "prompt": np.array(["photo of digit zero"] * n, dtype=object),
        "error": np.array([error] * n, dtype=object), "sampler_s": np.full(n, 0.1),
        "image": np.zeros((n, 8, 8, 3), np.uint8),
    }


def test_a_failed_write_or_batch_gets_no_manifest_row_so_a_rerun_retries_it(tmp_path, monkeypatch):
    root, manifest = str(tmp_path / "images"), str(tmp_path / "manifest")
    write_bytes = storage.write_bytes

    def flaky(url, data):
        if url.endswith("img1__c0.jpg"):
            raise OSError("connection reset")
        write_bytes(url, data)

    monkeypatch.setattr(storage, "write_bytes", flaky)
    written = write_images(_generated_batch(3), root=root, quality=90, storage_size=None)
    assert "image" not in written and written["error"].tolist() == ["", "write 0/img1__c0.jpg: OSError: connection reset", ""]
    assert sorted(os.listdir(tmp_path / "images" / "0")) == ["img0__c0.jpg", "img2__c0.jpg"]
    failed_batch = write_images(_generated_batch(2, 1, "RuntimeError: CUDA out of memory"), root=root, quality=90,
                                storage_size=None)  # the actor's failure: nothing written
    assert sorted(os.listdir(tmp_path / "images" / "0")) == ["img0__c0.jpg", "img2__c0.jpg"]
    constants = {"mode": "img2img", "vision_token": "image", "strength": 0.75, "steps": 4, "scheduler": "unipc",
                 "guidance_scale": 2.0, "lora_scale": 0.5, "lora_sha256": "ab"}
    counts = [write_manifest(pa.table(batch), directory=manifest, constants=constants) for batch in (written, failed_batch)]
    assert [(c["written"][0], c["failed"][0]) for c in counts] == [(2, 1), (0, 2)]
    assert counts[1]["error"][0] == "RuntimeError: CUDA out of memory"
    rows = read_parts(manifest).to_pylist()
    assert sorted((r["image_id"], r["copy_idx"]) for r in rows) == [("img0", 0), ("img2", 0)]


def test_planner_covers_exactly_the_missing_keys(tmp_path):
    out = str(tmp_path)
    ids = [[f"a/{i}.png" for i in range(5)], [f"b/{i}.png" for i in range(3)]]
    files = [write_part(RunLayout(out).bank_dir("train"), pa.table({"image_id": chunk})) for chunk in ids]
    files = sorted(files)
    done = pa.table({"image_id": ["a/1.png", "b/2.png", "a/0.png"], "copy_idx": [0, 0, 1]})
    write_part(RunLayout(out).manifest_dir(), done)
    cfg = _cfg(out, "generate.mult=2", "generate.batch_size=2")
    units, rows, expected, pending, collisions = plan_units(cfg, files)
    assert (rows, expected, pending, collisions) == (8, 16, 13, frozenset())
    tables = {f: pq.read_table(f).column("image_id").to_pylist() for f in files}
    planned = [(tables[u["file"]][r], u["copy_idx"]) for u in units for r in unit_rows(u)]
    assert len(planned) == len(set(planned)) == 13
    every = {(i, c) for chunk in ids for i in chunk for c in range(2)}
    assert set(planned) == every - {("a/1.png", 0), ("b/2.png", 0), ("a/0.png", 1)}
    assert [u["copy_idx"] for u in units] == sorted(u["copy_idx"] for u in units)  # copy 0 first


def test_bad_generate_values_are_config_errors(tmp_path):
    for bad, field in (("generate.mult=0", "generate.mult"), ("generate.strength=0", "generate.strength"),
                       ("generate.strength=1.5", "generate.strength"), ("generate.scheduler=heun", "generate.scheduler")):  # fmt: skip
        with pytest.raises(ConfigError, match=field):
            _cfg(tmp_path, bad)
    cfg = _cfg(tmp_path)
    for update, field in (({"mult": 0}, "generate.mult"), ({"strength": 1.5}, "generate.strength"),
                          ({"scheduler": "heun"}, "scheduler='heun'")):  # fmt: skip
        with pytest.raises(ConfigError, match=field):
            check_generate_config(cfg.generate.model_copy(update=update))


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    assert cli_main(["generate", "--preset", "tiny", "--out", str(tmp_path), "--mult", "0"]) == 2
    assert "generate.mult" in capsys.readouterr().err
    assert cli_main(["generate", "--preset", "tiny", "--out", str(tmp_path / "nothing")]) == 2
    assert "run `realfake encode` first" in capsys.readouterr().err


def test_missing_bank_is_a_clear_error(tmp_path, no_ray):
    with pytest.raises(FileNotFoundError, match="run `realfake encode` first"):
        run_generate(_cfg(tmp_path))


def test_job_script_forwards_to_the_cli():
    text = (REPO / "jobs" / "generate.py").read_text()
    assert 'main(["generate", *sys.argv[1:]])' in text


# ------------------------------------------------------------------------------------------ e2e


@pytest.fixture(scope="module")
def bank(tiny_bank, tmp_path_factory):
    """A run dir with a 30-image latent bank (3 per digit) and a random-but-seeded LoRA in <out>/lora."""
    out = tmp_path_factory.mktemp("bank")
    small_bank(tiny_bank, out, PER_CLASS)
    pipe = load_pipeline(resolve_model_dir("preset:tiny"))
    torch.manual_seed(1)
    add_lora(pipe.unet, rank=2)
    for name, param in pipe.unet.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0.0, 0.5)
    save_lora(pipe.unet, str(out / "lora"))
    return out


def _new_run(bank, tmp_path_factory, name, lora=True):
    """A fresh run dir holding a copy of the bank (and of the LoRA)."""
    out = tmp_path_factory.mktemp(name)
    shutil.copytree(bank / "latents", out / "latents")
    if lora:
        shutil.copytree(bank / "lora", out / "lora")
    return out


def _check_set(out, bank_out, mult):
    """Exactly mult x rows decodable files; one manifest row per key; paths exist; labels match the bank."""
    bank_rows = read_parts(RunLayout(str(bank_out)).bank_dir("train"), ["image_id", "label"]).to_pylist()
    labels = {r["image_id"]: r["label"] for r in bank_rows}
    manifest = _manifest(out).to_pylist()
    keys = [(r["image_id"], r["copy_idx"]) for r in manifest]
    assert len(keys) == len(set(keys)) == mult * len(labels)
    assert set(keys) == {(i, c) for i in labels for c in range(mult)}
    files = _files(out)
    assert set(files) == {r["path"] for r in manifest}
    for row in manifest:
        assert row["label"] == labels[row["image_id"]]
        assert row["path"].endswith(f"__c{row['copy_idx']}.jpg")
        assert row["path"].split("/")[0] == storage.safe_name(row["class_dir"])
    for url in files.values():
        with Image.open(io.BytesIO(storage.read_bytes(url))) as image:
            image.load()
            assert image.size == (32, 32)
    return manifest


@pytest.fixture(scope="module")
def run_a(bank, tmp_path_factory):
    out = _new_run(bank, tmp_path_factory, "gen-a")
    summary = run_generate(_cfg(out, "generate.mult=2", *TWO_ACTORS))
    return out, summary


@pytest.mark.e2e
def test_two_copies_per_image_with_a_consistent_manifest(run_a, bank):
    out, summary = run_a
    manifest = _check_set(out, bank, 2)
    assert summary["count"] == summary["expected"] == summary["generated_now"] == 60 and not summary["skipped"]
    assert summary["failed"] == 0 and summary["complete"] and summary["images_per_s"] > 0
    on_disk = storage.read_json(RunLayout(str(out)).synthetic_dir("_summary.json"))
    assert on_disk["count"] == 60 and on_disk["settings"]["steps"] == 4
    lora_sha = on_disk["settings"]["lora_sha256"]
    assert lora_sha and {r["lora_sha256"] for r in manifest} == {lora_sha}
    row = manifest[0]
    assert row["seed"] == image_seed(42, row["image_id"], row["copy_idx"])
    assert row["prompt"].startswith("photo of digit ") and row["prompt"].endswith(", best quality")
    assert (row["strength"], row["steps"], row["scheduler"], row["lora_scale"]) == (0.75, 4, "unipc", 0.5)


@pytest.mark.e2e
def test_copies_differ_and_a_second_run_on_one_actor_is_byte_identical(run_a, bank, tmp_path_factory):
    out_a, _ = run_a
    files_a = _files(out_a)
    some = sorted(files_a)[:5]
    for path in some:
        other = path.replace("__c0.jpg", "__c1.jpg")
        if path != other:
            assert storage.read_bytes(files_a[path]) != storage.read_bytes(files_a[other])
    out_b = _new_run(bank, tmp_path_factory, "gen-b")
    run_generate(_cfg(out_b, "generate.mult=2"))  # one actor where run_a had two: the same bytes
    files_b = _files(out_b)
    assert set(files_a) == set(files_b)
    assert all(storage.read_bytes(files_a[p]) == storage.read_bytes(files_b[p]) for p in files_a)


@pytest.mark.e2e
def test_raising_mult_adds_only_the_new_copy(run_a, bank):
    out, _ = run_a
    before = {p: (os.stat(storage.local_path(u)).st_mtime_ns, storage.read_bytes(u)) for p, u in _files(out).items()}
    parts_before = set(part_files(RunLayout(str(out)).manifest_dir()))
    summary = run_generate(_cfg(out, "generate.mult=3"))
    assert (summary["generated_now"], summary["already_present"], summary["count"]) == (30, 60, 90)
    _check_set(out, bank, 3)
    after = _files(out)
    for path, (mtime, data) in before.items():
        assert os.stat(storage.local_path(after[path])).st_mtime_ns == mtime
        assert storage.read_bytes(after[path]) == data
    assert parts_before < set(part_files(RunLayout(str(out)).manifest_dir()))
    again = run_generate(_cfg(out, "generate.mult=3"))
    # Nothing to do: the stored record of the run that generated copy 2 comes back (its measured rate stays).
    assert again["skipped"] and again["count"] == 90 and again["generated_now"] == 30 and again["images_per_s"] > 0


@pytest.mark.e2e
def test_failed_batches_are_counted_then_a_rerun_generates_only_them(bank, tmp_path_factory, monkeypatch):
    """Every batch of copy 1 raises in the actor (fault injection): the run completes copy 0, counts copy 1 as
    failed, writes no file or manifest row for it and is not complete; the rerun generates exactly copy 1."""
    out = _new_run(bank, tmp_path_factory, "gen-failures")
    monkeypatch.setenv("REALFAKE_FAULT", "generate.sampler_error:1")
    with pytest.raises(RuntimeError, match=r"30 of 60 images failed \(first error: RuntimeError: injected sampler"):
        run_generate(_cfg(out, "generate.mult=2"))
    first = storage.read_json(RunLayout(str(out)).synthetic_dir("_summary.json"))
    assert (first["generated_now"], first["failed"], first["count"], first["complete"]) == (30, 30, 30, False)
    assert {r["copy_idx"] for r in _manifest(out).to_pylist()} == {0}
    assert not [p for p in _files(out) if p.endswith("__c1.jpg")]
    monkeypatch.delenv("REALFAKE_FAULT")
    second = run_generate(_cfg(out, "generate.mult=2"))
    assert (second["generated_now"], second["already_present"], second["failed"], second["complete"]) == (30, 30, 0, True)
    _check_set(out, bank, 2)


@pytest.mark.e2e
def test_changed_settings_into_the_same_out_are_refused(run_a, no_ray):
    out, _ = run_a
    with pytest.raises(ValueError, match="made with other settings.*steps: 4 → 5"):
        run_generate(_cfg(out, "generate.steps=5"))


@pytest.mark.e2e
def test_txt2img_without_lora_and_with_class_mean_guidance(bank, tmp_path_factory, run_a):
    out = _new_run(bank, tmp_path_factory, "gen-t2i")
    summary = run_generate(_cfg(out, "generate.mode=txt2img", "generate.use_lora=false", "generate.vision_token=class_mean"))
    manifest = _check_set(out, bank, 1)
    assert summary["settings"]["lora_sha256"] is None and summary["settings"]["mode"] == "txt2img"
    assert {(r["mode"], r["vision_token"], r["lora_sha256"], r["lora_scale"]) for r in manifest} == {
        ("txt2img", "class_mean", None, None)
    }
    out_a, _ = run_a
    path = manifest[0]["path"]
    assert storage.read_bytes(_files(out)[path]) != storage.read_bytes(_files(out_a)[path])


@pytest.mark.e2e
def test_a_missing_lora_is_an_error_unless_use_lora_is_off(bank, tmp_path_factory, run_a, monkeypatch):
    out = _new_run(bank, tmp_path_factory, "gen-nolora", lora=False)
    with monkeypatch.context() as mp:
        forbid_ray_work(mp)
        with pytest.raises(FileNotFoundError, match=r"no LoRA at .*lora/pytorch_lora_weights.safetensors.*generate.use_lora=false"):
            run_generate(_cfg(out))  # use_lora is on, but <out>/lora does not exist
    summary = run_generate(_cfg(out, "generate.use_lora=false"))
    manifest = _check_set(out, bank, 1)
    assert summary["settings"]["lora_sha256"] is None and {r["lora_sha256"] for r in manifest} == {None}
    out_a, _ = run_a
    files_a, files = _files(out_a), _files(out)
    assert sum(storage.read_bytes(files[p]) != storage.read_bytes(files_a[p]) for p in files) > len(files) // 2


@pytest.mark.e2e
def test_lora_from_another_base_model_is_refused(bank, tmp_path_factory, no_ray):
    from diffusers import UNet2DConditionModel

    out = _new_run(bank, tmp_path_factory, "gen-badlora", lora=False)
    config = dict(read_component_config(resolve_model_dir("preset:tiny"), "unet"))
    config["cross_attention_dim"] = 32
    unet = UNet2DConditionModel.from_config(config)
    add_lora(unet, rank=2)
    save_lora(unet, str(out / "lora"))
    with pytest.raises(ValueError, match=r"pytorch_lora_weights.safetensors does not fit this model.*width 32.*has 64"):
        run_generate(_cfg(out))


@pytest.mark.e2e
def test_guidance_other_than_the_loras_is_refused_unless_allowed(bank, tmp_path_factory, no_ray, monkeypatch):
    out = _new_run(bank, tmp_path_factory, "gen-guidance")
    storage.write_json(str(out / "finetune" / "_settings.json"), {"vision_token": "class_mean"})
    with pytest.raises(ConfigError, match=r"generate.vision_token='image' but the LoRA .* finetune.vision_token='class_mean'"):
        run_generate(_cfg(out))
    from realfake_ray.stages.generate import plan as generate_plan

    monkeypatch.setattr(generate_plan, "plan_units", lambda *a: (_ for _ in ()).throw(RuntimeError("planned")))
    with pytest.raises(RuntimeError, match="planned"):  # allowed: the checks pass and planning starts
        run_generate(_cfg(out, "generate.allow_vision_token_mismatch=true"))


@pytest.mark.e2e
def test_bank_from_another_resolution_is_refused(bank, tmp_path_factory, no_ray):
    out = _new_run(bank, tmp_path_factory, "gen-badres")
    meta = read_meta(str(out))
    meta.update(resolution=16, latent_shape=[4, 4, 4])
    storage.write_json(RunLayout(str(out)).meta_url(), meta)
    with pytest.raises(ValueError, match="latent bank from another VAE resolution.*4x4x4.*encode.resolution=32"):
        run_generate(_cfg(out))


@pytest.mark.e2e
def test_a_second_job_is_refused_then_a_killed_drivers_rerun_leaves_no_gap_and_no_duplicate(
        bank, tmp_path_factory, ray_cluster, capsys):
    """`jobs/generate.py` stops mid-generation once its first manifest part is written (fault injection: its
    writers hold, its driver lives on and keeps the run's lease). A second `realfake generate` on the same
    --out fails at once, naming the first, before any work. The first is then SIGKILLed; the rerun takes over
    its lease and generates exactly the missing keys."""
    out = _new_run(bank, tmp_path_factory, "gen-kill")
    overrides = ["generate.mult=4", "generate.batch_size=2", "generate.rows_per_manifest_file=4", "generate.steps=10"]
    sets = [arg for o in overrides for arg in ("--set", o)]
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address, PYTHONPATH=str(REPO))
    fault = "generate.manifest_part_hold:1"
    first = start_with_fault([sys.executable, str(REPO / "jobs" / "generate.py"), "--preset", "tiny", "--out",
                              str(out), *sets], env, fault)
    deadline = time.monotonic() + 300
    while not part_files(RunLayout(str(out)).manifest_dir()):
        assert first.poll() is None and time.monotonic() < deadline, "the first job ended before its first part"
        time.sleep(0.1)
    capsys.readouterr()
    assert cli_main(["generate", "--preset", "tiny", "--out", str(out), *sets]) == 2
    second = capsys.readouterr()
    assert f"is in use by another job (host {socket.gethostname()}, pid {first.pid}" in second.err, second.err
    assert "[generate]" not in second.out  # refused before planning anything
    os.kill(first.pid, signal.SIGKILL)
    reap_killed(first, fault)
    partial = _manifest(out).num_rows
    assert 4 <= partial < 120  # the fault's part, plus what writers already running added
    summary = run_generate(_cfg(out, *overrides))
    assert f"took over {RunLayout(str(out)).lease_url()} from host" in capsys.readouterr().out
    assert summary["already_present"] == partial and summary["count"] == 120
    _check_set(out, bank, 4)


@pytest.mark.e2e
@pytest.mark.cluster_sim  # `make test-cluster` (a 4-node simulated cluster: ~100 s, too much for CI's 20 minutes)
def test_losing_a_node_that_hosts_a_generate_actor_loses_and_duplicates_nothing(bank, tmp_path_factory):
    """A cluster of a head and two 1-CPU workers; once 3 manifest parts exist, the worker hosting a
    SynthesisActor is removed (its raylet, actors and objects gone). The stage still completes with one
    manifest row and one valid image per (image_id, copy): Ray Data restarts the actor and retries the lost
    tasks, and a retried writer rewrites the same paths and the same part names."""
    out = _new_run(bank, tmp_path_factory, "gen-node-loss")
    overrides = ["generate.mult=4", "generate.batch_size=2", "generate.rows_per_manifest_file=4", "generate.steps=10",
                 "generate.actors.min_size=1", "generate.actors.max_size=2", "generate.actors.cpus_per_actor=0.25"]
    found = run_with_node_loss("generate", str(out), overrides, at=3)
    assert found["removed"]["at"] < 30  # mid-run: 30 parts in all
    assert (found["count"], found["failed"], found["complete"]) == (120, 0, True)
    _check_set(out, bank, 4)
