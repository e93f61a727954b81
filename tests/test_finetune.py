"""Fine-tune stage: fast validation tests, then two shared 2-worker Ray Train runs on the tiny preset
(a first run to step 4, and a second call with a larger target that resumes from its checkpoint)."""

import copy
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from helpers import forbid_ray_work, run_until_fault, run_with_node_loss, tensorboard_points
from safetensors.torch import load_file

from realfake_ray import storage
from realfake_ray.bank import class_mean_embeddings, read_meta
from realfake_ray.cli import main as cli_main
from realfake_ray.config import FinetuneConfig, load_config
from realfake_ray.stages.finetune.driver import bank_dataset, checkpoint_steps, derive_seed, resume_position, run_finetune
from realfake_ray.stages.finetune.plan import check_model_and_bank, data_order, finetune_settings, step_target
from realfake_ray.layout import RunLayout
from realfake_ray.method.lora import LORA_WEIGHT_NAME, add_lora, lora_state_dict
from realfake_ray.models.loading import load_pipeline

FIRST, SECOND = 4, 6
RUN_OVERRIDES = ["finetune.checkpoint_every=2", "finetune.log_every=1"]
TENSORBOARD = "tracking.tensorboard=true"  # on in the first run and its resume (test_tracking.py tests MLflow too)


def _cfg(out, max_steps, *extra):
    return load_config(preset="tiny", out=out, overrides=[f"finetune.max_steps={max_steps}", *RUN_OVERRIDES, *extra])


def _history(out):
    text = storage.read_text(storage.join(RunLayout(out).finetune_dir(), "metrics.jsonl"))
    return [json.loads(line) for line in text.splitlines()]


# ------------------------------------------------------------------------------------ fast


def test_step_target_per_worker_rows_and_too_large_batches():
    assert step_target(FinetuneConfig(num_workers=2, batch_size=16, epochs=3), rows=1437) == (44, 132)
    assert step_target(FinetuneConfig(num_workers=2, batch_size=16, max_steps=7), rows=1437) == (44, 7)
    with pytest.raises(ValueError, match="finetune.batch_size=800"):
        step_target(FinetuneConfig(num_workers=2, batch_size=800), rows=1437)


def test_missing_bank_is_a_clear_error_before_any_ray_work(tmp_path, monkeypatch):
    forbid_ray_work(monkeypatch)
    with pytest.raises(FileNotFoundError, match=r"run `realfake encode` first"):
        run_finetune(_cfg(str(tmp_path), 2))


def test_resume_position_continues_the_epoch_only_at_the_same_world_size():
    assert resume_position({"epoch": 1, "epoch_step": 7, "world": 2}, 44, 2) == (1, 7)
    assert resume_position({"epoch": 1, "epoch_step": 44, "world": 2}, 44, 2) == (2, 0)  # epoch was complete
    assert resume_position({"epoch": 1, "epoch_step": 7, "world": 2}, 88, 1) == (1, 0)  # another split: restart it
    assert resume_position({"epoch": 3}, 44, 2) == (3, 0)  # a checkpoint from before epoch_step was recorded


def test_auto_data_order_is_the_global_shuffle_up_to_its_row_limit_and_is_recorded_resolved():
    ft = FinetuneConfig(global_shuffle_max_rows=1000)
    assert (data_order(ft, 1000), data_order(ft, 1001)) == ("global", "files")
    assert data_order(FinetuneConfig(shuffle="global", global_shuffle_max_rows=10), 10**6) == "global"
    cfg = load_config(preset="tiny", out="memory://ft", overrides=["finetune.global_shuffle_max_rows=1000"])
    small, large = finetune_settings(cfg, 1000), finetune_settings(cfg, 5000)
    assert (small["shuffle"], large["shuffle"]) == ("global", "files") and "global_shuffle_max_rows" not in small
    explicit = load_config(preset="tiny", out="memory://ft", overrides=["finetune.shuffle=global"])
    assert finetune_settings(explicit, 1000) == small  # a run recorded as "global" resumes under auto


def test_derived_seeds_differ_by_label_and_are_stable():
    assert derive_seed(42, "rng", 0) == derive_seed(42, "rng", 0) != derive_seed(42, "rng", 1)


# ------------------------------------------------------------------------------ e2e


def _epoch_labels(tiny_bank, first_epoch, epochs, shuffle="global"):
    """Labels in the order the trainer's bank dataset yields them, for ``epochs`` executions."""
    from realfake_ray._internal.shards import part_files

    ds = bank_dataset(tuple(part_files(RunLayout(tiny_bank).bank_dir("train"))), shuffle, 42, first_epoch)
    ds.context.execution_options.preserve_order = True  # as the trainer runs it (DataConfig)
    return [[int(r["label"]) for r in ds.iter_rows()] for _ in range(epochs)]


@pytest.mark.e2e
def test_every_epoch_is_a_seeded_global_permutation_of_the_class_sorted_bank(tiny_bank):
    from collections import Counter

    epochs = _epoch_labels(tiny_bank, 0, 2)
    bank = sorted(_bank_labels(tiny_bank))  # the encoder writes its part files class by class
    for labels in epochs:
        assert sorted(labels) == bank  # each epoch is a permutation of the whole bank ...
        first = Counter(labels[:64])  # ... whose first 4 batches of 16 hold every class about equally
        assert len(first) == 10 and max(first.values()) <= 16, first
    assert epochs[0] != epochs[1]
    # A run resumed in epoch 1 draws epoch 1's permutation, not epoch 0's, and the same seed repeats it.
    assert _epoch_labels(tiny_bank, 1, 1)[0] == epochs[1]


def _bank_labels(out):
    from realfake_ray._internal.shards import read_parts

    return read_parts(RunLayout(out).bank_dir("train"), ["label"]).column("label").to_pylist()


@pytest.mark.e2e
def test_model_and_bank_mismatches_are_refused(tiny_bank, tiny_model_dir):
    from realfake_ray._internal.shards import part_files


    cfg, meta = _cfg(tiny_bank, 2), read_meta(tiny_bank)
    files = part_files(RunLayout(tiny_bank).bank_dir("train"))
    assert check_model_and_bank(cfg, meta, files, tiny_model_dir)["prediction_type"] == "epsilon"
    other_vae = copy.deepcopy(meta)
    other_vae["model"]["vae_sha256"] = "0" * 64
    with pytest.raises(ValueError, match="another VAE"):
        check_model_and_bank(cfg, other_vae, files, tiny_model_dir)
    small = copy.deepcopy(meta)
    small["latent_shape"] = [4, 4, 4]  # as if encoded at 16 px: the UNet's sample_size is 8
    with pytest.raises(ValueError, match="re-encode with encode.resolution=32"):
        check_model_and_bank(cfg, small, files, tiny_model_dir)
    means = class_mean_embeddings(files, len(meta["class_dirs"]))
    assert means.shape == (10, 64) and np.isfinite(means).all()


@pytest.fixture(scope="module")
def first_run(tiny_bank, tmp_path_factory):
    """A fresh run directory holding a copy of the bank, fine-tuned to step FIRST with 2 workers."""
    out = str(tmp_path_factory.mktemp("finetune") / "run")
    shutil.copytree(os.path.join(tiny_bank, "latents"), os.path.join(out, "latents"))
    done = run_finetune(_cfg(out, FIRST, TENSORBOARD))
    return out, done, _history(out), load_file(os.path.join(RunLayout(out).lora_dir(), LORA_WEIGHT_NAME))


@pytest.mark.e2e
def test_two_worker_run_trains_the_lora_and_writes_every_output(first_run, tiny_model_dir):
    out, done, history, weights = first_run
    assert done["step"] == FIRST and done["resumed_from"] == 0 and done["samples_per_s"] > 0
    assert [row["step"] for row in history] == list(range(1, FIRST + 1))
    for row in history:
        assert all(math.isfinite(row[k]) for k in ("loss", "denoise", "mmd", "samples_per_s"))
        assert row["lr"] == pytest.approx(1e-3)
    assert tensorboard_points(f"{out}/tensorboard/finetune", "loss") == \
        [(row["step"], pytest.approx(row["loss"], rel=1e-6)) for row in history]
    assert checkpoint_steps(out) == [2, 4]
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "_done.json"):
        assert storage.exists(storage.join(RunLayout(out).finetune_dir(), name)), name
    assert load_config(config_file=storage.join(RunLayout(out).finetune_dir(), "config.yaml")).finetune.max_steps == FIRST

    # The weights moved away from their (seeded) initial values: lora_A changed, lora_B left zero.
    cfg = _cfg(out, FIRST)
    unet = load_pipeline(tiny_model_dir).unet
    torch.manual_seed(derive_seed(cfg.seed, "lora-init"))
    add_lora(unet, cfg.finetune.lora_rank, cfg.finetune.lora_alpha, cfg.finetune.lora_targets)
    init = {f"unet.{k}": v for k, v in lora_state_dict(unet).items()}
    assert sorted(init) == sorted(weights)
    assert all(weights[k].abs().max() > 0 for k in weights if ".lora.up." in k)
    assert any(not torch.equal(weights[k], init[k]) for k in weights if ".lora.down." in k)

    # A stock pipeline loads the file and renders something else than without it.
    def render(pipe):
        return pipe("photo of digit one", num_inference_steps=2, height=32, width=32, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    pipe = load_pipeline(tiny_model_dir)
    baseline = render(pipe)
    pipe.load_lora_weights(RunLayout(out).lora_dir())
    assert np.abs(render(pipe) - baseline).max() > 1e-5


@pytest.mark.e2e
def test_a_complete_run_is_skipped_without_ray_and_a_changed_target_or_setting_is_refused(first_run, capsys):
    out, done, _, _ = first_run
    with pytest.MonkeyPatch.context() as mp:  # complete: the stored result, no Ray work at all
        forbid_ray_work(mp)
        again = run_finetune(_cfg(out, FIRST))
    assert again["skipped"] and again["lora_sha256"] == done["lora_sha256"]
    assert cli_main(["finetune", "--preset", "tiny", "--out", out, "--max-steps", str(FIRST)]) == 0
    assert '"skipped": true' in capsys.readouterr().out
    with pytest.raises(ValueError, match=f"checkpoint at step {FIRST}"):
        run_finetune(_cfg(out, FIRST - 1))
    # A LoRA-shaping setting changed: refused at once, naming the key; nothing is retrained or skipped.
    with pytest.raises(ValueError, match=r"other settings \(lr: .* → 0\.5\)"):
        run_finetune(_cfg(out, FIRST, "finetune.lr=0.5"))
    assert checkpoint_steps(out) == [2, FIRST]


@pytest.mark.e2e
@pytest.mark.system  # a second Ray Train fit (~70 s in CI); the skip and refusal checks above stay in make test
def test_larger_target_resumes_from_the_checkpoint(first_run, tmp_path):
    first_out, _, first_history, _ = first_run
    out = str(tmp_path / "run")  # a copy: first_run stays at FIRST steps for the tests that share it
    shutil.copytree(first_out, out)
    done = run_finetune(_cfg(out, SECOND, TENSORBOARD))
    history = _history(out)
    assert done["step"] == SECOND and done["resumed_from"] == FIRST
    assert [row["step"] for row in history] == list(range(1, SECOND + 1))
    assert history[:FIRST] == first_history  # restored from the checkpoint, not recomputed
    for key in ("loss", "mmd", "samples_per_s"):  # every logged step in TensorBoard once, across the resume
        assert tensorboard_points(f"{out}/tensorboard/finetune", key) == \
            [(row["step"], pytest.approx(row[key], rel=1e-6)) for row in history], key
    assert checkpoint_steps(out) == [FIRST, SECOND]  # keep_checkpoints=2
    assert run_finetune(_cfg(out, SECOND))["skipped"]


def _bank_rows(rng) -> dict:
    """Four bank rows as the trainer's dataset yields them (fine-tuning views: square, 5:4 wide, tall, square)."""
    wide = [(4, 8, 8), (4, 8, 10), (4, 11, 8), (4, 8, 8)]
    return {
        "image_id": np.array([f"digit_1/{i}.png" for i in range(4)], dtype=object),
        "class_name": np.array(["digit one", "digit two"] * 2, dtype=object),
        "caption": np.array(["", "a digit", "", ""], dtype=object),
        "full_latent_mean": np.array([rng.standard_normal(s).astype(np.float16).tobytes() for s in wide], dtype=object),
        "full_latent_std": np.array([np.full(s, 0.1, np.float16).tobytes() for s in wide], dtype=object),
        "full_latent_h": np.array([s[1] for s in wide]), "full_latent_w": np.array([s[2] for s in wide]),
        "clip_embed": rng.standard_normal((4, 64)).astype(np.float16),
        "label": np.array([1, 2, 1, 2]),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_train_step_updates_fp32_lora_over_a_frozen_base(tiny_model_dir, dtype):
    """One process, no Ray: the loop's step on bank-shaped rows (bf16 base = the GPU mixed-precision path)."""
    from realfake_ray.stages.finetune.driver import BankCollate
    from realfake_ray.stages.finetune.step import load_models, train_step

    ft = FinetuneConfig(batch_size=4, lr=1e-2, mmd_kernel="gaussian", vision_token="class_mean")
    models = load_models(tiny_model_dir, ft, seed=0, device=torch.device("cpu"), dtype=dtype)
    rows = _bank_rows(np.random.default_rng(0))
    batch = BankCollate(models.tokenizer, size=8, seed=0, epoch=0)(rows)
    assert batch["input_ids"].shape == (4, 77) and batch["latent_mean"].dtype == torch.float32
    assert batch["latent_mean"].shape == (4, 4, 8, 8)
    again = BankCollate(models.tokenizer, size=8, seed=0, epoch=0)(rows)["latent_mean"]
    assert torch.equal(again, batch["latent_mean"])  # crops are seeded by (seed, epoch, image id)
    before = [p.detach().clone() for p in models.params]
    optimizer = torch.optim.AdamW(models.params, lr=ft.lr)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        losses = train_step(models, batch, generator, ft, "epsilon", torch.randn(10, 64), optimizer, None)
        assert losses.shape == (3,) and torch.isfinite(losses).all()
    assert all(p.dtype == torch.float32 and p.grad is not None for p in models.params)
    assert any(not torch.equal(a, b) for a, b in zip(before, models.params))
    frozen = [p for n, p in models.unet.named_parameters() if "lora_" not in n]
    assert all(p.dtype == dtype and not p.requires_grad for p in frozen)


@pytest.mark.parametrize("vision_token", ["image", "none"])
def test_the_image_vision_token_reaches_the_unet_in_train_step(tiny_model_dir, vision_token):
    """vision_token=image: each row's own CLIP embedding is the token, so other embeddings give another loss
    (same weights, same noise); vision_token=none: the embeddings are not used at all."""
    from realfake_ray.stages.finetune.driver import BankCollate
    from realfake_ray.stages.finetune.step import load_models, train_step

    ft = FinetuneConfig(batch_size=4, lr=1e-2, vision_token=vision_token)
    models = load_models(tiny_model_dir, ft, seed=0, device=torch.device("cpu"))
    frozen = torch.optim.SGD(models.params, lr=0.0)  # the step changes nothing: both calls see the same weights
    rows = _bank_rows(np.random.default_rng(0))
    other = dict(rows, clip_embed=np.random.default_rng(1).standard_normal((4, 64)).astype(np.float16))
    losses = [train_step(models, BankCollate(models.tokenizer, size=8, seed=0, epoch=0)(r), torch.Generator().manual_seed(0),
                         ft, "epsilon", None, frozen, None) for r in (rows, other)]
    assert torch.equal(losses[0], losses[1]) == (vision_token == "none")


def test_v_prediction_trains_on_the_velocity_target(tiny_model_dir):
    from realfake_ray.stages.finetune.driver import BankCollate
    from realfake_ray.stages.finetune.step import load_models, train_step

    ft = FinetuneConfig(batch_size=4, lr=1e-2, vision_token="none", snr_gamma=None)
    models = load_models(tiny_model_dir, ft, seed=0, device=torch.device("cpu"))
    frozen = torch.optim.SGD(models.params, lr=0.0)
    batch = BankCollate(models.tokenizer, size=8, seed=0, epoch=0)(_bank_rows(np.random.default_rng(0)))
    eps, v = (train_step(models, batch, torch.Generator().manual_seed(0), ft, kind, None, frozen, None)
              for kind in ("epsilon", "v_prediction"))
    assert torch.isfinite(v).all() and not torch.equal(eps, v)  # same prediction, another target


def _steps(models, ft, batch, steps: int = 3) -> torch.Tensor:
    from realfake_ray.stages.finetune.step import train_step

    optimizer, generator = torch.optim.AdamW(models.params, lr=ft.lr), torch.Generator().manual_seed(0)
    return torch.stack([train_step(models, batch, generator, ft, "epsilon", None, optimizer, None) for _ in range(steps)])


@pytest.mark.system  # torch.compile on a CPU: ~30 s of inductor work
def test_the_compiled_unet_step_gives_the_eager_losses(tiny_model_dir):
    """finetune.compile: the UNet's forward compiled in place trains as the eager step does — equal losses over
    3 steps (1e-5 relative) and equal LoRA weights — and is saved under the same names. Graph capture and AOT
    autograd run here through the aot_eager backend: inductor's CPU code generation takes over 10 min on this
    2-core box; benchmarks/bench_finetune.py --compile 0,1 compares the inductor step's losses on a GPU."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from realfake_ray.stages.finetune.driver import BankCollate
    from realfake_ray.stages.finetune.step import compile_unet, load_models

    ft = FinetuneConfig(batch_size=4, lr=1e-2, vision_token="image")
    eager, compiled = (load_models(tiny_model_dir, ft, seed=0, device=torch.device("cpu")) for _ in range(2))
    counter = CompileCounterWithBackend("aot_eager")
    assert compile_unet(compiled.unet, "reduce-overhead", "cpu", backend=counter) is False  # no CUDA graphs on CPU
    batch = BankCollate(eager.tokenizer, size=8, seed=0, epoch=0)(_bank_rows(np.random.default_rng(0)))
    expected, got = _steps(eager, ft, batch), _steps(compiled, ft, batch)
    assert counter.frame_count >= 1  # the compiled forward ran
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert not torch.equal(expected[0], expected[-1])  # the steps trained
    ours, theirs = lora_state_dict(compiled.unet), lora_state_dict(eager.unet)
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-6)


def test_finetune_compile_compiles_the_unet_with_its_mode(tiny_model_dir, monkeypatch):
    from realfake_ray.stages.finetune.step import load_models

    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: calls.append((type(self).__name__, kwargs)))
    ft = FinetuneConfig(compile=True, compile_mode="reduce-overhead")
    models = load_models(tiny_model_dir, ft, seed=0, device=torch.device("cpu"))
    assert calls == [("UNet2DConditionModel", {"backend": "inductor", "mode": "default", "dynamic": False})]
    assert models.cuda_graphs is False  # on a CPU worker the CUDA-graph mode runs without graphs
    assert not load_models(tiny_model_dir, FinetuneConfig(), seed=0, device=torch.device("cpu")).cuda_graphs
    with pytest.raises(ValueError, match="compile_mode='reduce-overhead' needs compile=true"):
        FinetuneConfig(compile_mode="reduce-overhead")


def test_random_latent_crops_cover_every_offset_of_the_whole_image():
    from realfake_ray.stages.finetune.step import random_latent_crop

    c, h, w, size = 1, 4, 7, 4
    grid = np.arange(c * h * w, dtype=np.float16).reshape(c, h, w)
    corners = set()
    for seed in range(200):
        crop, std = random_latent_crop(grid.tobytes(), grid.tobytes(), (c, h, w), size, np.random.default_rng(seed))
        assert crop.shape == (1, 4, 4) and np.array_equal(crop, std)
        corners.add(int(crop[0, 0, 0]))  # the top-left cell names the offset: column 0..3 of row 0
    assert corners == {0, 1, 2, 3}  # every stride-1 latent offset (8 px for SD) is drawn


def test_arrow_filesystem_wraps_remote_urls_only(tmp_path):
    fs, path = storage.arrow_filesystem(str(tmp_path))
    assert fs is None and path == str(tmp_path)
    fs, path = storage.arrow_filesystem("memory://bucket/run/finetune")
    assert type(fs).__name__ == "PyFileSystem" and path.endswith("bucket/run/finetune")


@pytest.mark.e2e
@pytest.mark.cluster_sim  # `make test-cluster`; in CI, test_trainer.py tests the restart logic without nodes
def test_losing_the_node_of_the_training_worker_restarts_from_its_checkpoint(tiny_bank, tmp_path_factory):
    """A head and three 1-CPU workers; the worker holds after its checkpoint at step 4 and its node is
    removed. The driver restarts the run from that checkpoint (one restart) and it ends at step 8 with a
    gapless history, as an undisturbed run does."""
    out = str(tmp_path_factory.mktemp("finetune-node-loss") / "run")
    shutil.copytree(os.path.join(tiny_bank, "latents"), os.path.join(out, "latents"))
    overrides = ["finetune.max_steps=8", "finetune.checkpoint_every=2", "finetune.log_every=1",
                 "finetune.num_workers=1", "finetune.cpus_per_worker=1"]
    found = run_with_node_loss("finetune", out, overrides, at=4, workers=3, fault="finetune.checkpoint_hold:4")
    assert found["removed"]["at"] == 4
    assert (found["step"], found["resumed_from"], found["restarts"]) == (8, 4, 1)
    assert found["checkpoints"] == [6, 8]  # keep_checkpoints=2, also across the restart
    assert [row["step"] for row in _history(out)] == list(range(1, 9))


@pytest.mark.e2e
@pytest.mark.system
def test_killed_driver_resumes_from_its_last_checkpoint_and_ends_as_an_uninterrupted_run(first_run, tiny_bank,
                                                                                         tmp_path_factory, ray_cluster):
    """`jobs/finetune.py` SIGKILLed right after its checkpoint at step 2 (fault injection); the rerun resumes
    from exactly that checkpoint and ends where the uninterrupted ``first_run`` (same config) ends: the same
    losses at every step and a byte-identical LoRA."""
    import sys

    out = str(tmp_path_factory.mktemp("finetune-kill") / "run")
    shutil.copytree(os.path.join(tiny_bank, "latents"), os.path.join(out, "latents"))
    overrides = [f"finetune.max_steps={FIRST}", *RUN_OVERRIDES]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address, PYTHONPATH=repo)
    cmd = [sys.executable, os.path.join(repo, "jobs", "finetune.py"), "--preset", "tiny", "--out", out]
    run_until_fault(cmd + [arg for o in overrides for arg in ("--set", o)], env, "finetune.checkpoint:2")
    assert checkpoint_steps(out) == [2] and not storage.exists(storage.join(RunLayout(out).finetune_dir(), "_done.json"))
    done = run_finetune(load_config(preset="tiny", out=out, overrides=overrides))
    assert done["resumed_from"] == 2 and done["step"] == FIRST
    _, uninterrupted, uninterrupted_history, _ = first_run
    losses = ("loss", "denoise", "mmd")
    assert [[row[k] for k in ("step", *losses)] for row in _history(out)] == \
        [[row[k] for k in ("step", *losses)] for row in uninterrupted_history]
    assert done["lora_sha256"] == uninterrupted["lora_sha256"]
