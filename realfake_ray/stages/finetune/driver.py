"""Fine-tune stage: LoRA distribution-matching fine-tuning of the UNet on the latent bank (Ray Train).

The driver validates everything first (bank, model widths, bank/VAE compatibility, step target),
then runs a ``TorchTrainer``: each worker streams its shard of ``<out>/latents/train`` (no VAE is
loaded: latents are drawn from the stored posterior), trains the LoRA adapter with
:func:`realfake_ray.method.losses.finetune_loss` under DDP, and reports checkpoints (LoRA, optimizer, step,
RNG, metric history) to ``<out>/finetune/finetune``. A new call with the same ``out`` resumes from the
newest checkpoint. Outputs: ``<out>/lora/pytorch_lora_weights.safetensors`` (diffusers LoRA format),
``<out>/finetune/{config.yaml, metrics.jsonl, loss.png, _done.json}``.

Example:
    >>> from realfake_ray.config import load_config
    >>> from realfake_ray.stages.finetune.driver import run_finetune
    >>> done = run_finetune(load_config(preset="tiny", out="runs/tiny"))  # doctest: +SKIP
    >>> done["step"]  # doctest: +SKIP
    40
"""

from __future__ import annotations

import logging
import io
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from realfake_ray import storage
from realfake_ray._internal.checkpoints import (
    checkpoint_number,
    newest_complete,
    numbered_folders,
    prune_checkpoints,
    resume_checkpoint,
)
from realfake_ray._internal.cluster import check_fits_a_node, init_ray, quiet_train_worker, resolve_use_gpu, train_logging
from realfake_ray._internal.faults import hold_at, kill_driver_at
from realfake_ray._internal.settings import refuse_changed_settings
from realfake_ray._internal.tracking import StageRun
from realfake_ray._internal.trainer import (
    all_gather_objects,
    all_reduce_sum,
    count_epochs_from,
    fit_with_restarts,
    ordered_data_config,
    write_curves,
    write_metrics,
)
from realfake_ray._internal.lease import takes_run_lease
from realfake_ray.bank import read_bank
from realfake_ray.config import FinetuneConfig, RunConfig, build_config, dump_config
from realfake_ray.stages.finetune.plan import FinetunePlan, finetune_settings, plan_finetune, step_target
from realfake_ray.stages.finetune.step import (
    METRIC_KEYS,
    FinetuneModels,
    latent_size,
    load_models,
    lr_at,
    random_latent_crop,
    train_step,
)
from realfake_ray.layout import RunLayout
from realfake_ray.method.lora import LORA_WEIGHT_NAME, load_lora, lora_sha256, save_lora
from realfake_ray.method.prompts import build_prompt, tokenize
from realfake_ray.seeds import derive_seed

__all__ = ["run_finetune"]

log = logging.getLogger(__name__)

RUN_NAME = "finetune"  # Ray Train run name: checkpoints live in <out>/finetune/finetune/checkpoint_<step>
CHECKPOINT_PREFIX = "checkpoint_"
BANK_READ_COLUMNS = ["image_id", "label", "class_name", "caption", "clip_embed",
                     "full_latent_mean", "full_latent_std", "full_latent_h", "full_latent_w"]
_OPTIMIZER_FILE, _STATE_FILE, _HISTORY_FILE = "optimizer.pt", "state.pt", "metrics.json"


# ---------------------------------------------------------------------------------- planning


def checkpoint_steps(out: str) -> list[int]:
    """Steps of the checkpoints stored below ``<out>/finetune/finetune`` (sorted).

    Example:
        >>> checkpoint_steps("runs/tiny")  # doctest: +SKIP
        [20, 40]
    """
    root = storage.join(RunLayout(out).finetune_dir(), RUN_NAME)
    return [checkpoint_number(url, CHECKPOINT_PREFIX) for url in numbered_folders(root, CHECKPOINT_PREFIX)]


# ---------------------------------------------------------------------------------- the worker


class BankCollate(NumpyBatchCollateFn):
    """Bank rows (numpy) → tensors: prompt token ids, a random crop of the fine-tuning view's posterior
    mean/std, CLIP embedding, label.

    The ``collate_fn`` of ``iter_torch_batches``; Ray moves the returned tensors to the worker's device.
    Each row's crop offset is seeded by ``(seed, epoch, image_id)``, so it does not depend on batching or
    on which thread collates.

    Example:
        >>> BankCollate(tokenizer, size=64, seed=42, epoch=0)(shard_batch)["input_ids"].shape  # doctest: +SKIP
        torch.Size([16, 77])
    """

    def __init__(self, tokenizer, size: int, seed: int, epoch: int, channels: int = 4) -> None:
        super().__init__()
        self.tokenizer, self.size, self.seed, self.epoch, self.channels = tokenizer, size, seed, epoch, channels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        prompts = [build_prompt(str(name), str(caption or "")) for name, caption in zip(batch["class_name"], batch["caption"])]
        crops = [
            random_latent_crop(m, s, (self.channels, int(h), int(w)), self.size,
                               np.random.default_rng(derive_seed(self.seed, "crop", self.epoch, str(image_id))))
            for image_id, m, s, h, w in zip(batch["image_id"], batch["full_latent_mean"], batch["full_latent_std"],
                                            batch["full_latent_h"], batch["full_latent_w"])
        ]
        return {
            "input_ids": tokenize(self.tokenizer, prompts),
            "latent_mean": torch.from_numpy(np.stack([c[0] for c in crops])),
            "latent_std": torch.from_numpy(np.stack([c[1] for c in crops])),
            "clip_embed": torch.as_tensor(np.asarray(batch["clip_embed"], dtype=np.float32)),
            "label": torch.as_tensor(np.array(batch["label"], dtype=np.int64)),  # a copy: Ray arrays are read-only
        }


@dataclass
class _TrainState:
    step: int = 0
    epoch: int = 0
    epoch_step: int = 0  # steps already taken in `epoch` (batches of its permutation to skip on resume)
    history: list | None = None  # one dict per logged step
    resumed_from: int = 0


def resume_position(state: dict, steps_per_epoch: int, world: int) -> tuple[int, int]:
    """``(epoch, batches to skip in it)`` to continue a checkpoint's data order.

    Same world size: the rest of the checkpoint's epoch (its permutation and split are deterministic,
    see :func:`bank_dataset`). Another world size, or an old checkpoint without ``epoch_step``: the
    epoch from its start. A checkpoint at the end of an epoch continues with the next one.

    Example:
        >>> resume_position({"epoch": 2, "epoch_step": 5, "world": 2}, steps_per_epoch=44, world=2)
        (2, 5)
        >>> resume_position({"epoch": 2, "epoch_step": 44, "world": 2}, steps_per_epoch=44, world=2)
        (3, 0)
    """
    epoch, done = int(state["epoch"]), int(state.get("epoch_step", 0))
    if state.get("world") != world:
        return epoch, 0
    return (epoch + 1, 0) if done >= steps_per_epoch else (epoch, done)


def _restore(ckpt, models: FinetuneModels, optimizer, scaler, generator: torch.Generator, rank: int, world: int,
             steps_per_epoch: int) -> _TrainState:
    """Load LoRA, optimizer, step/epoch position, this rank's RNG state and the metric history from a checkpoint."""
    with ckpt.as_directory() as directory:
        load_lora(models.unet, directory)
        optimizer.load_state_dict(torch.load(os.path.join(directory, _OPTIMIZER_FILE), map_location="cpu", weights_only=True))
        state = torch.load(os.path.join(directory, _STATE_FILE), map_location="cpu", weights_only=True)
        with open(os.path.join(directory, _HISTORY_FILE)) as f:
            history = json.load(f)
    rng = state["rng"]
    if len(rng) > rank:  # same world size: continue each rank's stream exactly
        generator.set_state(rng[rank])
    else:  # the world grew: new ranks start a fresh, still seeded stream
        generator.manual_seed(derive_seed(state["seed"], "rng", rank, state["step"]))
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    epoch, skip = resume_position(state, steps_per_epoch, world)
    return _TrainState(step=int(state["step"]), epoch=epoch, epoch_step=skip, history=history, resumed_from=int(state["step"]))


def _save_checkpoint(directory: str, models: FinetuneModels, optimizer, scaler, st: _TrainState, rng: list, seed: int) -> None:
    unet = getattr(models.unet, "module", models.unet)
    save_lora(unet, directory)
    torch.save(optimizer.state_dict(), os.path.join(directory, _OPTIMIZER_FILE))
    state = {"step": st.step, "epoch": st.epoch, "epoch_step": st.epoch_step, "world": len(rng), "rng": rng,
             "seed": seed, "scaler": scaler.state_dict() if scaler else {}}
    torch.save(state, os.path.join(directory, _STATE_FILE))
    with open(os.path.join(directory, _HISTORY_FILE), "w") as f:
        json.dump(st.history, f)


def _gather_rng(generator: torch.Generator) -> list[torch.Tensor]:
    """Every rank's generator state (collective), so rank 0's checkpoint can resume all of them."""
    return [torch.as_tensor(state) for state in all_gather_objects(generator.get_state())]


def _report(st: _TrainState, models, optimizer, scaler, generator, cfg: RunConfig, metrics: dict, rank: int) -> None:
    """Checkpoint (rank 0 writes, every rank reports) and mirror the metric history to metrics.jsonl."""
    from ray import train

    rng = _gather_rng(generator)
    if rank != 0:
        train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="realfake-ft-ckpt-") as tmp:
        _save_checkpoint(tmp, models, optimizer, scaler, st, rng, cfg.seed)
        train.report(metrics, checkpoint=train.Checkpoint.from_directory(tmp),
                     checkpoint_dir_name=f"{CHECKPOINT_PREFIX}{st.step:08d}")
    write_metrics(_metrics_url(cfg.out), st.history)
    last = st.history[-1]
    log.info(f"step {st.step}: loss {last['loss']:.4f} (denoise {last['denoise']:.4f}, mmd {last['mmd']:.4g}), "
             f"{last['samples_per_s']:.0f} samples/s, checkpoint saved")


def train_loop(loop_config: dict) -> None:
    """Ray Train per-worker loop (see the module docstring); ``loop_config = {"cfg": ..., "plan": ...}``."""
    from ray import train
    from ray.train.torch import get_device, prepare_model

    cfg, plan = build_config(loop_config["cfg"]), FinetunePlan(**loop_config["plan"])
    quiet_train_worker(cfg.ray.verbose)
    ft = cfg.finetune
    ctx = train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = get_device()
    models = load_models(plan.model_dir, ft, cfg.seed, device)
    optimizer = torch.optim.AdamW(models.params, lr=ft.lr, weight_decay=ft.weight_decay)
    use_scaler = device.type == "cuda" and models.weight_dtype == torch.float16
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    generator = torch.Generator(device=device).manual_seed(derive_seed(cfg.seed, "rng", rank, 0))
    ckpt = resume_checkpoint(plan.resume_dir, CHECKPOINT_PREFIX)
    steps_per_epoch, _ = step_target(ft, plan.rows)
    st = _restore(ckpt, models, optimizer, scaler, generator, rank, world, steps_per_epoch) if ckpt else _TrainState(history=[])
    tracker = StageRun.of(cfg, "finetune").logger(st.history, "step", on=rank == 0)  # MLflow / TensorBoard, if on
    models.unet = prepare_model(models.unet)
    class_means = torch.tensor(plan.class_means, device=device) if plan.class_means else None
    shard = train.get_dataset_shard("train")
    side, channels = latent_size(models.unet), int(getattr(models.unet, "module", models.unet).config.in_channels)
    window = torch.zeros(len(METRIC_KEYS), device=device)
    window_steps, window_start, run_start, run_steps = 0, time.perf_counter(), time.perf_counter(), 0
    while st.step < plan.total_steps:
        local_buffer = ft.shuffle_buffer_size if plan.shuffle == "files" else 0
        collate = BankCollate(models.tokenizer, side, cfg.seed, st.epoch, channels)
        batches = shard.iter_torch_batches(
            batch_size=ft.batch_size, drop_last=True, collate_fn=collate,
            local_shuffle_buffer_size=local_buffer or None,
            local_shuffle_seed=derive_seed(cfg.seed, "shuffle", rank, st.epoch) % (2**31),
        )
        seen, skip = 0, st.epoch_step
        for batch in batches:
            if skip:  # resumed inside this epoch: its first batches were trained on before the checkpoint
                skip, seen = skip - 1, seen + 1
                continue
            for group in optimizer.param_groups:
                group["lr"] = lr_at(ft, st.step)
            window += train_step(models, batch, generator, ft, plan.prediction_type, class_means, optimizer, scaler)
            st.step, seen, window_steps, run_steps = st.step + 1, seen + 1, window_steps + 1, run_steps + 1
            st.epoch_step = seen
            last = st.step >= plan.total_steps
            checkpoint_now = st.step % ft.checkpoint_every == 0 or last
            if st.step % ft.log_every == 0 or checkpoint_now:  # a checkpoint always carries a fresh row
                means = (all_reduce_sum(window) / (world * window_steps)).tolist()
                elapsed = time.perf_counter() - window_start
                row = {"step": st.step, **dict(zip(METRIC_KEYS, means)), "lr": lr_at(ft, st.step - 1),
                       "samples_per_s": window_steps * ft.batch_size * world / elapsed, "epoch": st.epoch}
                st.history.append(row)
                tracker.log(st.history)
                window.zero_()
                window_steps, window_start = 0, time.perf_counter()
            if checkpoint_now:
                seconds = time.perf_counter() - run_start
                metrics = {**st.history[-1], "step": st.step, "resumed_from": st.resumed_from, "train_seconds": seconds,
                           "run_samples_per_s": run_steps * ft.batch_size * world / seconds}
                _report(st, models, optimizer, scaler, generator, cfg, metrics, rank)
                if rank == 0:  # tests only (_internal.faults): stop right after this checkpoint
                    kill_driver_at("finetune.checkpoint", st.step)
                    hold_at("finetune.checkpoint_hold", st.step)
            if last:
                break
        if seen == 0:
            raise RuntimeError(f"rank {rank}: the bank shard yielded no full batch of {ft.batch_size} rows")
        if st.step < plan.total_steps:
            st.epoch, st.epoch_step = st.epoch + 1, 0
    if run_steps == 0:  # resumed at the target (e.g. the last run stopped before writing outputs)
        train.report({"step": st.step, "resumed_from": st.resumed_from, "train_seconds": 0.0, "run_samples_per_s": 0.0})


# ---------------------------------------------------------------------------------- the driver


def _metrics_url(out: str) -> str:
    return storage.join(RunLayout(out).finetune_dir(), "metrics.jsonl")


def _write_outputs(out: str, history: list[dict]) -> None:
    """``<out>/finetune/metrics.jsonl`` (one row per logged step) and ``loss.png``."""
    write_metrics(_metrics_url(out), history)
    write_curves(storage.join(RunLayout(out).finetune_dir(), "loss.png"), history, "step", list(METRIC_KEYS),
                 "LoRA fine-tuning", logy=True)


def _use_gpu(ft: FinetuneConfig) -> bool:
    return resolve_use_gpu(ft.use_gpu)


def _cpus_per_worker(ft: FinetuneConfig, use_gpu: bool) -> float:
    """``auto``: 1 CPU per worker, but on a CPU cluster smaller than workers + 1 CPUs split what is left
    after one CPU for the Ray Data reader (a 2-core laptop would otherwise starve the data pipeline)."""
    import ray

    if ft.cpus_per_worker != "auto":
        return float(ft.cpus_per_worker)
    total = float(ray.cluster_resources().get("CPU", 0.0))
    if use_gpu or total >= ft.num_workers + 1:
        return 1.0
    share = (total - 1.0) / ft.num_workers
    if share < 0.1:
        raise ValueError(
            f"finetune.num_workers={ft.num_workers} CPU workers do not fit a cluster with {total:g} CPUs "
            "(one is kept for reading the bank): use fewer workers or set finetune.cpus_per_worker"
        )
    return share


def bank_dataset(files: tuple[str, ...], shuffle: str, seed: int, first_epoch: int = 0):
    """The train bank as a Ray Dataset over its complete part files, in a new seeded order every epoch.

    ``shuffle="global"`` (the reference: a ``DataLoader(shuffle=True)`` over the whole set):
    ``random_shuffle`` re-seeded at every execution (= every epoch), the execution count starting at
    ``first_epoch`` so that epoch e is permuted by ``(seed, e)`` whether the run started at epoch 0 or
    resumed at e. ``files``: part files in a seeded random order per epoch, rows mixed only by each
    worker's local buffer (cheaper on huge banks; batches are not i.i.d. when the bank is class-sorted).

    Example:
        >>> ds = bank_dataset(tuple(part_files(RunLayout("runs/tiny").bank_dir("train"))), "global", 42)  # doctest: +SKIP
    """
    import ray.data
    from ray.data import RandomSeedConfig

    fs, _ = storage.arrow_filesystem(files[0])
    paths = [storage.filesystem(url)[1] for url in files]
    order = RandomSeedConfig(seed=derive_seed(seed, "finetune-shuffle") % 2**31, reseed_after_execution=True)
    if shuffle == "files":
        from ray.data import FileShuffleConfig

        ds = ray.data.read_parquet(paths, filesystem=fs, columns=BANK_READ_COLUMNS,
                                   shuffle=FileShuffleConfig(seed=order.seed, reseed_after_execution=True))
    else:
        ds = ray.data.read_parquet(paths, filesystem=fs, columns=BANK_READ_COLUMNS).random_shuffle(seed=order)
    return count_epochs_from(ds, first_epoch)


def _checkpoint_epoch(checkpoint_dir: str | None, ft: FinetuneConfig, rows: int) -> int:
    """The epoch a resume from ``checkpoint_dir`` continues in (0 without one; see :func:`resume_position`)."""
    if checkpoint_dir is None:
        return 0
    state = torch.load(io.BytesIO(storage.read_bytes(storage.join(checkpoint_dir, _STATE_FILE))),
                       map_location="cpu", weights_only=True)
    return resume_position(state, step_target(ft, rows)[0], ft.num_workers)[0]


def _fit(cfg: RunConfig, plan: FinetunePlan):
    """Run the TorchTrainer; returns the Ray Train ``Result``."""
    from ray import train
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = _use_gpu(cfg.finetune)
    worker = {"CPU": _cpus_per_worker(cfg.finetune, use_gpu), **({"GPU": 1} if use_gpu else {})}
    check_fits_a_node(worker, "finetune.use_gpu")
    fs, path = storage.arrow_filesystem(RunLayout(cfg.out).finetune_dir())
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "plan": asdict(plan)},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=train.ScalingConfig(
            num_workers=cfg.finetune.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=worker,
        ),
        run_config=train.RunConfig(
            name=RUN_NAME,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=train.FailureConfig(max_failures=0),  # restarts go through the driver (_internal.trainer)
            checkpoint_config=train.CheckpointConfig(num_to_keep=cfg.finetune.keep_checkpoints),
            logging_config=train_logging(cfg.ray.verbose),
        ),
        datasets={"train": bank_dataset(plan.bank_files, plan.shuffle, cfg.seed, plan.first_epoch)},
        dataset_config=ordered_data_config("train"),
    )
    return trainer.fit()


def _finish(cfg: RunConfig, result, started: float, restarts: int) -> dict:
    """Publish the final LoRA, metrics, plot and ``_done.json`` from the newest checkpoint."""
    if result.checkpoint is None:
        raise RuntimeError(f"fine-tuning reported no checkpoint (see the Ray Train logs under {RunLayout(cfg.out).finetune_dir()})")
    with result.checkpoint.as_directory() as directory:
        step = int(torch.load(os.path.join(directory, _STATE_FILE), map_location="cpu", weights_only=True)["step"])
        with open(os.path.join(directory, _HISTORY_FILE)) as f:
            history = json.load(f)
        storage.upload_file(os.path.join(directory, LORA_WEIGHT_NAME), storage.join(RunLayout(cfg.out).lora_dir(), LORA_WEIGHT_NAME))
        sha = lora_sha256(directory)
    _write_outputs(cfg.out, history)
    prune_checkpoints(storage.join(RunLayout(cfg.out).finetune_dir(), RUN_NAME), CHECKPOINT_PREFIX, cfg.finetune.keep_checkpoints)
    metrics = result.metrics or {}
    done = {
        "step": step,
        "lora": storage.join(RunLayout(cfg.out).lora_dir(), LORA_WEIGHT_NAME),
        "lora_sha256": sha,
        "wall_seconds": round(time.time() - started, 2),
        "train_seconds": round(float(metrics.get("train_seconds", 0.0)), 2),
        "samples_per_s": round(float(metrics.get("run_samples_per_s", 0.0)), 2),
        "resumed_from": int(metrics.get("resumed_from", 0)),
        "restarts": restarts,
        "final_loss": history[-1]["loss"] if history else None,
        "num_workers": cfg.finetune.num_workers,
    }
    storage.write_json(storage.join(RunLayout(cfg.out).finetune_dir(), "_done.json"), done)
    return done


@takes_run_lease
def run_finetune(cfg: RunConfig) -> dict:
    """Fine-tune the LoRA adapter on ``<out>/latents/train``; resume or skip when work already exists.

    Returns the ``_done.json`` record (with ``skipped: True`` when it already matched the step target).

    Example:
        >>> cfg = load_config(preset="tiny", out="runs/tiny", overrides=["finetune.max_steps=20"])  # doctest: +SKIP
        >>> run_finetune(cfg)["lora"]  # doctest: +SKIP
        'runs/tiny/lora/pytorch_lora_weights.safetensors'
    """

    started = time.time()
    meta, files = read_bank(cfg.out)
    rows = int(meta["splits"]["train"]["rows"])
    _, total = step_target(cfg.finetune, rows)
    settings_url, settings = storage.join(RunLayout(cfg.out).finetune_dir(), "_settings.json"), finetune_settings(cfg, rows)
    refuse_changed_settings(settings_url, settings, f"the fine-tuning run at {RunLayout(cfg.out).finetune_dir()}")
    done_url = storage.join(RunLayout(cfg.out).finetune_dir(), "_done.json")
    if storage.exists(done_url):
        done = storage.read_json(done_url)
        if done.get("step") == total and storage.exists(storage.join(RunLayout(cfg.out).lora_dir(), LORA_WEIGHT_NAME)):
            return {**done, "skipped": True}
    previous = checkpoint_steps(cfg.out)
    if previous and previous[-1] > total:
        raise ValueError(
            f"{RunLayout(cfg.out).finetune_dir()} holds a checkpoint at step {previous[-1]}, beyond the target of {total} steps: "
            "raise finetune.max_steps/epochs or use a new --out"
        )
    plan = _plan_from_newest(cfg, meta, files, total)
    storage.write_json(settings_url, settings)
    storage.write_text(storage.join(RunLayout(cfg.out).finetune_dir(), "config.yaml"), dump_config(cfg))
    tracked = StageRun.of(cfg, "finetune")
    tracked.start(cfg)
    init_ray(cfg.ray)
    result, restarts = fit_with_restarts(
        lambda restart: _fit(cfg, _plan_from_newest(cfg, meta, files, total) if restart else plan),
        cfg.finetune.max_failures, "finetune")
    done = _finish(cfg, result, started, restarts)
    tracked.finish(files=[storage.join(RunLayout(cfg.out).finetune_dir(), "loss.png")])
    return done


def _plan_from_newest(cfg: RunConfig, meta: dict, files: tuple[str, ...], total: int) -> FinetunePlan:
    """The plan of one fit: resume from the newest complete checkpoint (none: a fresh start)."""
    run_dir = storage.join(RunLayout(cfg.out).finetune_dir(), RUN_NAME)
    complete = newest_complete(run_dir, CHECKPOINT_PREFIX, (LORA_WEIGHT_NAME, _OPTIMIZER_FILE, _STATE_FILE, _HISTORY_FILE))
    plan = plan_finetune(cfg, meta, files, total)
    return replace(plan, resume_dir=complete, first_epoch=_checkpoint_epoch(complete, cfg.finetune, plan.rows))
