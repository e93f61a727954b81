"""Generate stage: fast planner/shard-writer tests, bad-input checks, then end-to-end runs on a 30-image bank.

The e2e runs share one small bank (3 digits per class, tiny preset) and a random LoRA; steps are cut
to 4 so each run is dominated by actor start-up, not sampling. Shards of 8 images: 4 shards per copy.
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
from helpers import forbid_ray_work, reap_killed, run_with_node_loss, small_bank, start_with_fault
from PIL import Image

from realfake_ray import storage
from realfake_ray._internal.shards import read_parts, write_part
from realfake_ray.bank import read_meta
from realfake_ray.cli import main as cli_main
from realfake_ray.config import ConfigError, load_config
from realfake_ray.stages.generate.driver import run_generate
from realfake_ray.data.synthetic import list_shards, shard_name
from realfake_ray.stages.generate.plan import (
    _stem_collisions,
    check_generate_config,
    image_seed,
    images_per_shard,
    shard_settings,
    plan_units,
    recorded_settings,
    sampler_settings,
    synthetic_path,
    unit_rows,
)
from realfake_ray.layout import RunLayout
from realfake_ray.method.lora import add_lora, save_lora
from realfake_ray.models.loading import load_pipeline, read_component_config, resolve_model_dir
from realfake_ray.stages.generate.workers import SynthesisActor, encode_jpeg

REPO = Path(__file__).resolve().parents[1]
# One actor: each actor process loads the pipeline, seconds on 2 cores (run_a uses the preset's pool of two).
FAST = ["generate.steps=4", "generate.batch_size=4", "generate.images_per_shard=8",
        "generate.actors.min_size=1", "generate.actors.max_size=1"]
TWO_ACTORS = ["generate.actors.min_size=2", "generate.actors.max_size=2"]
PER_CLASS = 3


def _cfg(out, *overrides, **flags):
    return load_config(preset="tiny", out=str(out), overrides=[*FAST, *overrides], **flags)


def _rows(out):
    """Every row of the synthetic set's shards (one table), with the shard each came from."""
    tables = []
    for url in list_shards(RunLayout(str(out)).shards_dir()).urls:
        table = pq.read_table(url)
        tables.append(table.append_column("shard", pa.array([url.rsplit("/", 1)[-1]] * table.num_rows)))
    return pa.concat_tables(tables) if tables else None


def _files(out):
    """Shard file name → URL."""
    return {u.rsplit("/", 1)[-1]: u for u in list_shards(RunLayout(str(out)).shards_dir()).urls}


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


class _StubActor(SynthesisActor):
    """The shard writer of SynthesisActor without a pipeline: ``sample`` paints each image's index."""

    def __init__(self, shards_dir: str, batch_size: int = 2, fail_at: int | None = None):  # noqa: D107 - no super()
        self.batch_size, self.quality, self.storage_size = batch_size, 90, None
        self.shards_dir, self.class_dirs, self.name, self.load_s = shards_dir, ["a", "b"], "host:1", 0.5
        self.started = 100.0
        self.settings = {"mode": "img2img", "vision_token": "image", "strength": 0.75, "steps": 4,
                         "scheduler": "unipc", "guidance_scale": 2.0, "lora_scale": 0.5, "lora_sha256": "ab"}
        self.first_batch_s, self.kill_after, self.hold_after, self.fail_at, self.calls = None, None, None, fail_at, []
        from concurrent.futures import ThreadPoolExecutor

        self.encoder = ThreadPoolExecutor(max_workers=2)

    def sample(self, row, start, stop):
        self.calls.append((start, stop))
        if self.fail_at == start:
            raise RuntimeError("CUDA out of memory")
        self.first_batch_s = self.first_batch_s or 1.0
        return np.stack([np.full((8, 8, 3), 10 * i, np.uint8) for i in range(start, stop)])


def _shard_row(n: int, copy_idx: int = 0) -> dict:
    ids = [f"{'ab'[i % 2]}/img{i}.png" for i in range(n)]
    return {"shard": shard_name(copy_idx, "part-0123456789abcdef0123456789abcdef.parquet", 0, n),
            "copy_idx": copy_idx, "image_id": ids, "class_dir": [i[0] for i in ids],
            "path": [synthetic_path(i[0], i, copy_idx) for i in ids], "label": [i % 2 for i in range(n)],
            "seed": list(range(n)), "prompt": ["photo of a"] * n}


def test_a_shard_is_written_whole_in_the_datasets_layout(tmp_path):
    import datasets

    actor = _StubActor(str(tmp_path / "data"))
    summary = actor.write_shard(_shard_row(5))
    assert actor.calls == [(0, 2), (2, 4), (4, 5)]  # generation batches of batch_size, fixed by the row
    assert (summary["written"], summary["failed"], summary["error"], summary["first_batch_s"], summary["first_batch_at"]) == (5, 0, "", 1.0, 101.0)
    (url,) = list_shards(str(tmp_path / "data")).urls
    assert summary["bytes"] == len(storage.read_bytes(url)) and url.endswith("-n5.parquet")
    loaded = datasets.load_dataset("parquet", data_dir=str(tmp_path / "data"), split="train")
    assert isinstance(loaded.features["image"], datasets.Image)
    assert loaded.features["label"].names == ["a", "b"] and loaded.num_rows == 5
    assert loaded[3]["image_id"] == "b/img3.png" and loaded[3]["label"] == 1 and loaded[3]["lora_sha256"] == "ab"
    assert np.asarray(loaded[3]["image"].convert("RGB")).mean() == pytest.approx(30, abs=3)
    assert loaded[3]["image"].size == (8, 8) and pq.read_table(url)["image"][3]["path"].as_py() == "b/img3__c0.jpg"


@pytest.mark.parametrize("failure", ["batch", "write"])
def test_a_failed_batch_or_write_writes_no_shard_so_a_rerun_retries_it(tmp_path, monkeypatch, failure):
    actor = _StubActor(str(tmp_path / "data"), fail_at=2 if failure == "batch" else None)
    if failure == "write":
        monkeypatch.setattr(storage, "write_bytes", lambda *a: (_ for _ in ()).throw(OSError("connection reset")))
    summary = actor.write_shard(_shard_row(5))
    assert (summary["written"], summary["failed"]) == (0, 5)
    assert summary["error"] == ("RuntimeError: CUDA out of memory" if failure == "batch" else "OSError: connection reset")
    assert not list_shards(str(tmp_path / "data")).urls and not list(tmp_path.rglob("*.parquet"))


def test_planner_covers_exactly_the_missing_shards(tmp_path):
    out = str(tmp_path)
    ids = [[f"a/{i}.png" for i in range(5)], [f"b/{i}.png" for i in range(3)]]
    files = sorted(write_part(RunLayout(out).bank_dir("train"), pa.table({"image_id": chunk})) for chunk in ids)
    sizes = {f: pq.read_table(f).num_rows for f in files}
    cfg = _cfg(out, "generate.mult=2")
    every, _, _, _, shards, _ = plan_units(cfg, files, 2)
    assert shards == len(every) == 2 * (3 + 2)  # ~2 rows each: 5 rows → 3 shards (2, 2, 1), 3 rows → 2 (2, 1), per copy
    done = [every[1], every[6]]
    for unit in done:
        storage.write_bytes(storage.join(RunLayout(out).shards_dir(), unit["shard"]), b"a complete shard")
    storage.write_bytes(storage.join(RunLayout(out).shards_dir(), ".tmp-x-" + every[0]["shard"]), b"half")
    units, rows, expected, pending, shards, collisions = plan_units(cfg, files, 2)
    done_rows = sum(len(unit_rows(u)) for u in done)
    assert (rows, expected, pending, shards, collisions) == (8, 16, 16 - done_rows, 10, frozenset())
    assert [u["shard"] for u in units] == [u["shard"] for u in every if u not in done]
    tables = {f: pq.read_table(f).column("image_id").to_pylist() for f in files}
    planned = [(tables[u["file"]][r], u["copy_idx"]) for u in every for r in unit_rows(u)]
    assert len(planned) == len(set(planned)) == 16 and set(planned) == {(i, c) for ch in ids for i in ch for c in range(2)}
    assert [u["copy_idx"] for u in units] == sorted(u["copy_idx"] for u in units)  # copy 0 first
    assert all(u["shard"].endswith(f"-n{len(unit_rows(u))}.parquet") and sizes[u["file"]] for u in units)


def test_shard_size_follows_the_stored_image_size():
    from realfake_ray.config import GenerateConfig

    assert images_per_shard(GenerateConfig(), 512) == 1011  # ~48 MiB of 50 KB JPEGs
    assert images_per_shard(GenerateConfig(storage_size=256), 512) == 4042
    assert images_per_shard(GenerateConfig(), 32) == 10_000 and images_per_shard(GenerateConfig(shard_mb=0.001), 512) == 16


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


def test_speed_options_reach_the_sampler_settings_and_cpu_nodes_drop_the_cuda_only_ones(tmp_path):
    speed = ["generate.compile=true", "generate.compile_mode=reduce-overhead", "generate.sdpa_backend=cudnn",
             "generate.vae_dtype=bf16", "generate.fuse_qkv=true", "generate.dtype=fp16"]
    gen = _cfg(tmp_path, *speed).generate
    on_gpu, on_cpu = sampler_settings(gen, "cuda"), sampler_settings(gen, "cpu")
    assert (on_gpu.compile_mode, on_gpu.sdpa_backend, on_gpu.vae_dtype, on_gpu.fuse_qkv) == ("reduce-overhead", "cudnn", "bf16", True)
    assert (on_cpu.compile_mode, on_cpu.sdpa_backend, on_cpu.vae_dtype, on_cpu.fuse_qkv) == ("default", "auto", None, True)
    with pytest.raises(ConfigError, match="generate.sdpa_backend"):
        _cfg(tmp_path, "generate.sdpa_backend=xformers")
    with pytest.raises(ConfigError, match="compile_mode='max-autotune' needs compile=True"):
        check_generate_config(_cfg(tmp_path, "generate.compile_mode=max-autotune").generate)


def test_the_negative_prompt_is_the_references_unless_set_and_is_recorded(tmp_path):
    from realfake_ray.method.prompts import NEGATIVE_PROMPT

    meta = {"model": {"vae_sha256": "v"}, "resolution": 32}
    for overrides, expected in (((), NEGATIVE_PROMPT), (("generate.negative_prompt=",), ""),
                                (("generate.negative_prompt=low contrast",), "low contrast")):
        cfg = _cfg(tmp_path, *overrides)
        assert sampler_settings(cfg.generate, "cpu").negative_prompt == expected
        assert recorded_settings(cfg, meta, None)["negative_prompt"] == expected


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    assert cli_main(["generate", "--preset", "tiny", "--out", str(tmp_path), "--mult", "0"]) == 2
    assert "generate.mult" in capsys.readouterr().err
    assert cli_main(["generate", "--preset", "tiny", "--out", str(tmp_path / "nothing")]) == 2
    assert "run `realfake encode` first" in capsys.readouterr().err


def test_missing_bank_is_a_clear_error(tmp_path, no_ray):
    with pytest.raises(FileNotFoundError, match="run `realfake encode` first"):
        run_generate(_cfg(tmp_path))


def test_the_shard_rows_repeat_the_recorded_settings():
    """One source for what a synthetic set was made with: a shard row's settings are the run's record
    (txt2img has no strength: None in both)."""
    from realfake_ray.data.synthetic import SETTING_COLUMNS

    meta = {"model": {"vae_sha256": "v"}, "resolution": 32}
    for mode, strength in (("img2img", 0.75), ("txt2img", None)):
        cfg = load_config(preset="tiny", overrides=[f"generate.mode={mode}", "generate.strength=0.75"])
        settings = recorded_settings(cfg, meta, "ab12")
        row = shard_settings(settings)
        assert tuple(row) == tuple(SETTING_COLUMNS)  # the shard's columns, in its order
        assert row["strength"] == settings["strength"] == strength and row["lora_scale"] == cfg.generate.lora_scale
    assert shard_settings(recorded_settings(cfg, meta, None))["lora_scale"] is None


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
    """Exactly one row per (image_id, copy < mult) across the shards; labels match the bank; every image a
    decodable 32-px JPEG; each shard's name says its copy and row count."""
    bank_rows = read_parts(RunLayout(str(bank_out)).bank_dir("train"), ["image_id", "label"]).to_pylist()
    labels = {r["image_id"]: r["label"] for r in bank_rows}
    rows = _rows(out).to_pylist()
    keys = [(r["image_id"], r["copy_idx"]) for r in rows]
    assert len(keys) == len(set(keys)) == mult * len(labels)
    assert set(keys) == {(i, c) for i in labels for c in range(mult)}
    shards = list_shards(RunLayout(str(out)).shards_dir())
    for url, copy_idx, n in zip(shards.urls, shards.copies, shards.rows):
        shard_rows = [r for r in rows if r["shard"] == url.rsplit("/", 1)[-1]]
        assert len(shard_rows) == n and {r["copy_idx"] for r in shard_rows} == {copy_idx}
    for row in rows:
        assert row["label"] == labels[row["image_id"]]
        assert row["image"]["path"].endswith(f"__c{row['copy_idx']}.jpg")
        assert row["image"]["path"].split("/")[0] == storage.safe_name(row["class_dir"])
        with Image.open(io.BytesIO(row["image"]["bytes"])) as image:
            image.load()
            assert image.size == (32, 32)
    return rows


@pytest.fixture(scope="module")
def run_a(bank, tmp_path_factory):
    out = _new_run(bank, tmp_path_factory, "gen-a")
    summary = run_generate(_cfg(out, "generate.mult=2", *TWO_ACTORS))
    return out, summary


@pytest.mark.e2e
def test_two_copies_per_image_in_shards_with_their_provenance(run_a, bank):
    import datasets

    out, summary = run_a
    rows = _check_set(out, bank, 2)
    assert summary["count"] == summary["expected"] == summary["generated_now"] == 60 and not summary["skipped"]
    assert summary["failed"] == 0 and summary["complete"] and summary["images_per_s"] > 0
    assert summary["shards"] == summary["shards_written_now"] == 8 and len(_files(out)) == 8  # 4 per copy
    assert {a["actor"] for a in summary["actors"]} and all(a["first_batch_s"] > a["load_s"] > 0 for a in summary["actors"])
    assert all(0 < a["first_batch_t"] < summary["generation_s"] for a in summary["actors"])
    on_disk = storage.read_json(RunLayout(str(out)).synthetic_dir("_summary.json"))
    assert on_disk["count"] == 60 and on_disk["settings"]["steps"] == 4
    lora_sha = on_disk["settings"]["lora_sha256"]
    assert lora_sha and {r["lora_sha256"] for r in rows} == {lora_sha}
    loaded = datasets.load_dataset("parquet", data_dir=RunLayout(str(out)).shards_dir(), split="train")
    assert loaded.num_rows == 60 and loaded.features["label"].names == read_meta(str(bank))["class_dirs"]
    card = storage.read_text(RunLayout(str(out)).synthetic_dir("README.md"))
    assert "path: data/*.parquet" in card and "| digit_0 | digit zero | 6 |" in card and lora_sha in card
    row = rows[0]
    assert row["seed"] == image_seed(42, row["image_id"], row["copy_idx"])
    assert row["prompt"].startswith("photo of digit ") and row["prompt"].endswith(", best quality")
    assert (row["strength"], row["steps"], row["scheduler"], row["lora_scale"]) == (0.5, 4, "euler", 0.5)  # tiny-tuned


@pytest.mark.e2e
def test_copies_differ_and_a_second_run_on_one_actor_is_byte_identical(run_a, bank, tmp_path_factory):
    out_a, _ = run_a
    by_key = {(r["image_id"], r["copy_idx"]): r["image"]["bytes"] for r in _rows(out_a).to_pylist()}
    assert all(by_key[(i, 0)] != by_key[(i, 1)] for i, c in by_key if c == 0)
    files_a = _files(out_a)
    out_b = _new_run(bank, tmp_path_factory, "gen-b")
    run_generate(_cfg(out_b, "generate.mult=2"))  # one actor where run_a had two: the same bytes
    files_b = _files(out_b)
    assert set(files_a) == set(files_b)
    assert all(storage.read_bytes(files_a[p]) == storage.read_bytes(files_b[p]) for p in files_a)


@pytest.mark.e2e
def test_raising_mult_adds_only_the_new_copy(run_a, bank):
    out, _ = run_a
    before = {p: (os.stat(storage.local_path(u)).st_mtime_ns, storage.read_bytes(u)) for p, u in _files(out).items()}
    summary = run_generate(_cfg(out, "generate.mult=3"))
    assert (summary["generated_now"], summary["already_present"], summary["count"]) == (30, 60, 90)
    _check_set(out, bank, 3)
    after = _files(out)
    for path, (mtime, data) in before.items():
        assert os.stat(storage.local_path(after[path])).st_mtime_ns == mtime
        assert storage.read_bytes(after[path]) == data
    assert {p for p in after if p not in before} == {p for p in after if p.startswith("train-c02-")}
    again = run_generate(_cfg(out, "generate.mult=3"))
    # Nothing to do: the stored record of the run that generated copy 2 comes back (its measured rate stays).
    assert again["skipped"] and again["count"] == 90 and again["generated_now"] == 30 and again["images_per_s"] > 0


@pytest.mark.e2e
@pytest.mark.system
def test_failed_batches_are_counted_then_a_rerun_generates_only_them(bank, tmp_path_factory, monkeypatch):
    """Every batch of copy 1 raises in the actor (fault injection): the run completes copy 0, counts copy 1 as
    failed, writes no shard of it and is not complete; the rerun generates exactly copy 1."""
    out = _new_run(bank, tmp_path_factory, "gen-failures")
    monkeypatch.setenv("REALFAKE_FAULT", "generate.sampler_error:1")
    with pytest.raises(RuntimeError, match=r"30 of 60 images failed \(first error: RuntimeError: injected sampler"):
        run_generate(_cfg(out, "generate.mult=2"))
    first = storage.read_json(RunLayout(str(out)).synthetic_dir("_summary.json"))
    assert (first["generated_now"], first["failed"], first["count"], first["complete"]) == (30, 30, 30, False)
    assert {r["copy_idx"] for r in _rows(out).to_pylist()} == {0}
    assert not [p for p in _files(out) if p.startswith("train-c01-")]
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
def test_a_missing_lora_is_refused_before_any_ray_work(bank, tmp_path_factory, no_ray):
    out = _new_run(bank, tmp_path_factory, "gen-nolora", lora=False)
    with pytest.raises(FileNotFoundError, match=r"no LoRA at .*lora/pytorch_lora_weights.safetensors.*generate.use_lora=false"):
        run_generate(_cfg(out))  # use_lora is on, but <out>/lora does not exist


@pytest.mark.e2e
@pytest.mark.system  # a generate run of its own (~35 s in CI); the sampler's txt2img is unit-tested in test_sampler.py
def test_without_a_lora_txt2img_runs_with_class_mean_guidance(bank, tmp_path_factory, run_a):
    out = _new_run(bank, tmp_path_factory, "gen-t2i", lora=False)
    summary = run_generate(_cfg(out, "generate.mode=txt2img", "generate.use_lora=false", "generate.vision_token=class_mean"))
    rows = _check_set(out, bank, 1)
    assert summary["settings"]["lora_sha256"] is None and summary["settings"]["mode"] == "txt2img"
    assert {(r["mode"], r["vision_token"], r["strength"], r["lora_sha256"], r["lora_scale"]) for r in rows} == {
        ("txt2img", "class_mean", None, None, None)
    }
    out_a, _ = run_a
    first = _files(out_a)[sorted(_files(out))[0]]
    assert storage.read_bytes(_files(out)[sorted(_files(out))[0]]) != storage.read_bytes(first)


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
@pytest.mark.system
def test_a_second_job_is_refused_then_a_killed_drivers_rerun_leaves_no_gap_and_no_duplicate(
        bank, tmp_path_factory, ray_cluster, capsys):
    """`jobs/generate.py` stops mid-generation once its first shard is written (fault injection: its actors
    hold, its driver lives on and keeps the run's lease). A second `realfake generate` on the same --out fails
    at once, naming the first, before any work. The first is then SIGKILLed; the rerun takes over its lease,
    generates exactly the missing shards, and the set equals an uninterrupted run's byte for byte."""
    out = _new_run(bank, tmp_path_factory, "gen-kill")
    overrides = ["generate.mult=4", "generate.batch_size=2", "generate.images_per_shard=4", "generate.steps=10"]
    sets = [arg for o in overrides for arg in ("--set", o)]
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address, PYTHONPATH=str(REPO))
    fault = "generate.shard_hold:1"
    first = start_with_fault([sys.executable, str(REPO / "jobs" / "generate.py"), "--preset", "tiny", "--out",
                              str(out), *sets], env, fault)
    deadline = time.monotonic() + 300
    while not list_shards(RunLayout(str(out)).shards_dir()).urls:
        assert first.poll() is None and time.monotonic() < deadline, "the first job ended before its first shard"
        time.sleep(0.1)
    capsys.readouterr()
    assert cli_main(["generate", "--preset", "tiny", "--out", str(out), *sets]) == 2
    second = capsys.readouterr()
    assert f"is in use by another job (host {socket.gethostname()}, pid {first.pid}" in second.err, second.err
    assert "[generate]" not in second.out  # refused before planning anything
    os.kill(first.pid, signal.SIGKILL)
    reap_killed(first, fault)
    partial = _rows(out).num_rows
    assert 3 <= partial < 120  # whole shards only: the fault's, plus any finished meanwhile
    assert partial == sum(list_shards(RunLayout(str(out)).shards_dir()).rows)
    assert not [p for p in (out / "synthetic" / "data").iterdir() if not p.name.startswith("train-")]
    summary = run_generate(_cfg(out, *overrides))
    assert f"took over {RunLayout(str(out)).lease_url()} from host" in capsys.readouterr().out
    assert summary["already_present"] == partial and summary["count"] == 120
    _check_set(out, bank, 4)


@pytest.mark.e2e
@pytest.mark.cluster_sim  # `make test-cluster` (a 4-node simulated cluster: ~100 s, too much for CI's 20 minutes)
def test_losing_a_node_that_hosts_a_generate_actor_loses_and_duplicates_nothing(bank, tmp_path_factory):
    """A cluster of a head and two 1-CPU workers; once 3 shards exist, the worker hosting a SynthesisActor is
    removed (its raylet, actors and objects gone). The stage still completes with one row and one valid image
    per (image_id, copy): Ray Data restarts the actor and retries the lost tasks, and a retried shard is
    rewritten under the same name."""
    out = _new_run(bank, tmp_path_factory, "gen-node-loss")
    overrides = ["generate.mult=4", "generate.batch_size=2", "generate.images_per_shard=4", "generate.steps=10",
                 "generate.actors.min_size=1", "generate.actors.max_size=2", "generate.actors.cpus_per_actor=0.25"]
    found = run_with_node_loss("generate", str(out), overrides, at=3)
    assert found["removed"]["at"] < 40  # mid-run: 40 shards in all
    assert (found["count"], found["failed"], found["complete"]) == (120, 0, True)
    _check_set(out, bank, 4)


@pytest.mark.e2e
def test_realfake_export_writes_the_set_as_an_imagefolder_with_the_same_bytes(run_a, bank, tmp_path):
    from realfake_ray.data.sources import open_labelled_set

    out, _ = run_a
    dest = tmp_path / "exported"
    args = ["export", "--preset", "tiny", "--out", str(out), "--format", "imagefolder", "--dest", str(dest),
            "--set", "train.synthetic_mult=2"]
    assert cli_main(args) == 0
    exported = open_labelled_set(str(dest), class_dirs=read_meta(str(bank))["class_dirs"])
    rows = {r["image"]["path"]: r for r in _rows(out).to_pylist() if r["copy_idx"] < 2}
    assert exported.num_images == len(rows) == 60
    for image_id, url, label in zip(*(exported.items[c].to_pylist() for c in ("image_id", "url", "label"))):
        assert storage.read_bytes(url) == rows[image_id]["image"]["bytes"] and label == rows[image_id]["label"]


@pytest.mark.e2e
def test_the_plan_predicts_what_generate_wrote(run_a):
    from realfake_ray.tools.plan import plan_job

    out, summary = run_a
    cfg = _cfg(out, "generate.mult=2")
    planned = {p.stage: p for p in plan_job(cfg, summary["bank_rows"])}["generate"]
    assert planned.images == summary["count"] == 60
    written = list_shards(RunLayout(str(out)).shards_dir()).below_copy(2)  # (a later test adds copy 2)
    assert planned.objects_written - 3 == len(written.urls) == summary["shards"]  # + summary, settings, card
