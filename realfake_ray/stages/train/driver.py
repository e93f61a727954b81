"""Train stage: a classifier from scratch on real, synthetic or mixed images (Ray Train + Ray Data).

The driver lists the sets (real in any layout, the sharded synthetic set, or both: Arrow listings, nothing
per image), checks them and the config before any Ray work, and hands Ray Data pipelines to a
``TorchTrainer``: rows or shards → per-epoch seeded sampling/shuffle → CPU read + decode tasks →
``get_dataset_shard("train")`` on every worker. Each epoch is checkpointed under ``<out>/classifier/<run name>/`` (model, optimizer, scheduler,
epoch); a rerun with the same settings (``train.epochs`` may grow) resumes from the latest checkpoint.
Per-epoch metrics go to ``<out>/classifier/metrics.jsonl`` and ``curves.png``; the final weights to
``model.safetensors``; then :func:`realfake_ray.stages.evaluate.driver.run_evaluate` runs and ``_done.json`` marks
the run complete (a rerun with the same settings returns at once).

Example:
    >>> from realfake_ray.config import load_config
    >>> from realfake_ray.stages.train.driver import run_train
    >>> summary = run_train(load_config(preset="tiny", out="runs/tiny", **{"train.source": "real"}))  # doctest: +SKIP
    >>> summary["evaluation"]["sets"]["val"]["top1"]  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import tempfile
import time

from realfake_ray import storage
from realfake_ray._internal import trainer
from realfake_ray._internal.checkpoints import checkpoint_number, newest_complete, prune_checkpoints, resume_checkpoint
from realfake_ray._internal.cluster import check_fits_a_node, init_ray, resolve_use_gpu, quiet_train_worker, train_logging
from realfake_ray._internal.lease import takes_run_lease
from realfake_ray._internal.faults import hold_at
from realfake_ray._internal.tracking import StageRun, evaluation_metrics
from realfake_ray.method.classifier import (
    build_classifier,
    build_optimizer,
    build_scheduler,
    evaluate_batches,
    merge_evaluations,
    scaled_lr,
    to_model_input,
    train_step,
)
from realfake_ray.data.labelled import (
    as_image_bytes,
    decoded_dataset,
    output_dir,
    read_error_count,
    repeated,
    rows_dataset,
    seed_of,
)
from realfake_ray.config import RunConfig
from realfake_ray.data.evaluation import VAL_SET, distribution_inputs, plan_sets
from realfake_ray.method.classifier_file import model_url, save_classifier
from realfake_ray.stages.evaluate.driver import run_evaluate
from realfake_ray.stages.train.plan import TrainPlan, apply_budget, done_url, finished_summary, plan_training

__all__ = ["run_train"]

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
EPOCH_PREFIX = "epoch_"  # checkpoint folders: <classifier dir>/<run name>/epoch_NNNN (the epoch it ends)
_CURVE_KEYS = ["train_loss", "train_acc", "val_top1", "val_top5", "val_top1_ema"]  # rows without a key: no curve


# ------------------------------------------------------------------------------------------ Ray Data


def errors_dir(cfg: RunConfig, run: str) -> str:
    """Where the read tasks of a run record the images they could not read (``<classifier dir>/_read_errors/<run>``)."""
    return storage.join(output_dir(cfg), "_read_errors", run)


def train_dataset(plan: TrainPlan, cfg: RunConfig, first_epoch: int = 0):
    """Per epoch (= per execution): seeded sampling of the mix, seeded shuffle, then read, decode and augment on
    CPU tasks. ``global`` shuffle: a fresh permutation of all rows every epoch; ``blocks``: per-image rows are
    still permuted, shards come in a fresh order and the workers' local buffers mix them. Every random draw is
    reseeded per execution from seeds derived from the config and the execution index, which starts at
    ``first_epoch``: epoch e draws the same sample, order and augmentations whether the run started at epoch 0 or
    resumed at e (a resumed run equals an uninterrupted one)."""
    from ray.data import RandomSeedConfig
    from ray.data.expressions import random

    def seed(tag: int) -> RandomSeedConfig:
        # the 0 keeps the seeds (and results) of runs made before resume was exact
        return RandomSeedConfig(seed=seed_of(cfg.seed, tag, 0), reseed_after_execution=True)

    parts = []
    chosen = [(tag, s, f) for tag, s, f in ((1, plan.real, plan.real_fraction), (2, plan.synthetic, plan.synthetic_fraction))
              if s is not None and f > 0]
    mixed = len({s.sharded for _, s, _ in chosen}) > 1  # URL rows and shard rows: both as image bytes before the union
    for tag, lset, fraction in chosen:
        order = seed(20 + tag) if plan.shuffle == "blocks" and lset.sharded else None
        ds = rows_dataset(repeated(lset, plan.repeats), cfg, shard_order=order)
        ds = as_image_bytes(ds, lset, cfg) if mixed else ds
        ds = ds.with_column("aug", random(seed=seed(10 + tag).seed, reseed_after_execution=True))
        ds = ds if fraction >= 1.0 else ds.random_sample(fraction, seed=seed(tag))
        if plan.shuffle == "blocks" and not lset.sharded:
            ds = ds.random_shuffle(seed=seed(30 + tag))
        parts.append(ds)
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    if plan.shuffle == "global":
        ds = ds.random_shuffle(seed=seed(3))
    decoded = decoded_dataset(ds, cfg.train.image_size, cfg, view="train", errors_dir=errors_dir(cfg, plan.run_name))
    return trainer.count_epochs_from(decoded, first_epoch)


# ------------------------------------------------------------------------------------------ worker side
def _amp_setup(device, enabled: bool, dtype: str = "fp16"):
    """``(autocast dtype, GradScaler)``: ``fp16`` + a grad scaler (the reference), or ``bf16`` where the GPU
    supports it (else fp16); none on CPU."""
    import torch

    if not enabled or device.type != "cuda":
        return None, None
    if dtype == "bf16" and torch.cuda.is_bf16_supported():
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler("cuda")


def _load_state(ckpt, model, optimizer, scheduler, scaler, ema=None) -> int:
    """Restore from a Ray checkpoint; returns the next epoch."""
    import torch

    with ckpt.as_directory() as directory:
        state = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    return int(state["epoch"]) + 1


def weight_ema(model, decay: float | None):
    """torch's ``AveragedModel`` keeping an exponential moving average of ``model``'s weights and buffers (the
    BatchNorm statistics too), or None when ``decay`` is None. ``update_parameters(model)`` after each step."""
    if decay is None:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _report(row: dict, state: dict | None) -> None:
    """Every worker reports; rank 0 also hands over the checkpoint (``state`` saved with torch.save)."""
    import ray.train
    import torch

    if state is None:
        ray.train.report(row)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, os.path.join(tmp, STATE_FILE))
        checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(row, checkpoint=checkpoint, checkpoint_dir_name=f"{EPOCH_PREFIX}{row['epoch']:04d}")


def _epoch_line(row: dict, epochs: int) -> str:
    """One console line per classifier epoch (the full row is in metrics.jsonl).

    Example:
        >>> _epoch_line({"epoch": 4, "train_loss": 1.3912, "train_acc": 0.6234, "val_top1": 0.6601, "val_top5": 0.9712,
        ...              "lr": 0.09731, "images_per_s": 460.4}, 30)
        'epoch 5/30 loss 1.39 acc 0.62 val 0.66/0.97 lr 0.0973 460 img/s'
    """
    val = "-" if row["val_top1"] is None else f"{row['val_top1']:.2f}/{row['val_top5']:.2f}"
    ema = f" ema {row['val_top1_ema']:.2f}" if row.get("val_top1_ema") is not None else ""
    return (f"epoch {row['epoch'] + 1}/{epochs} loss {row['train_loss']:.2f} acc {row['train_acc']:.2f} "
            f"val {val}{ema} lr {row['lr']:.3g} {row['images_per_s']:.0f} img/s")


def late_val_top1(history: list[dict], last: int = 5) -> float | None:
    """Mean val top-1 over the ``last`` epochs with a val score: next to the final epoch's value, a statistic
    that epoch-to-epoch swings (±0.1 late in a digits run) move less. None without a val score.

    Example:
        >>> round(late_val_top1([{"val_top1": v} for v in (0.2, 0.6, 0.8, 0.7, 0.9, 0.8, 0.7)]), 4)
        0.78
    """
    scores = [r["val_top1"] for r in history if r.get("val_top1") is not None][-last:]
    return sum(scores) / len(scores) if scores else None


def metrics_url(cdir: str) -> str:
    """``<classifier dir>/metrics.jsonl``: one row per finished epoch."""
    return storage.join(cdir, "metrics.jsonl")


def read_metrics(cdir: str) -> list[dict]:
    """Rows of ``<classifier dir>/metrics.jsonl`` (one per finished epoch)."""
    return trainer.read_metrics(metrics_url(cdir))


def write_curves(cdir: str, rows: list[dict]) -> str:
    """``<classifier dir>/curves.png``: train loss/accuracy and val top-1/top-5 per epoch."""
    return trainer.write_curves(storage.join(cdir, "curves.png"), rows, "epoch", _CURVE_KEYS, "classifier")


def _evaluate_shard(model, shard, cfg: RunConfig, num_classes: int, autocast_dtype) -> dict | None:
    """Val top-1/top-5 over this worker's shard, merged over all workers."""

    if shard is None:
        return None
    device = next(model.parameters()).device
    batches = ((to_model_input(b["pixels"].to(device)), b["label"])
               for b in shard.iter_torch_batches(batch_size=cfg.evaluate.batch_size, device="cpu"))
    local = evaluate_batches(model, batches, num_classes, autocast_dtype=autocast_dtype)
    return merge_evaluations(trainer.all_gather_objects(local))


def _run_epoch(model, optimizer, scheduler, shard, cfg: RunConfig, amp, buffer_seed: int | None = None,
               ema=None) -> list[float]:
    """One pass over this worker's shard; returns ``[loss sum, correct sum, images, last lr]`` (local).
    ``buffer_seed``: mix the rows in a local shuffle buffer of ``train.shuffle_buffer_size`` (shuffle=blocks);
    ``ema``: a :func:`weight_ema` updated after every step."""

    t, sums = cfg.train, [0.0, 0.0, 0.0, optimizer.param_groups[0]["lr"]]
    device = next(model.parameters()).device
    local = {"local_shuffle_buffer_size": t.shuffle_buffer_size, "local_shuffle_seed": buffer_seed} \
        if buffer_seed is not None else {}
    batches = shard.iter_torch_batches(batch_size=t.batch_size, drop_last=True, device="cpu", **local)
    for batch in batches:
        x = to_model_input(batch["pixels"].to(device, non_blocking=True))  # uint8 over the bus, 4× less than fp32
        stats = train_step(
            model, optimizer, scheduler, x, batch["label"].long(),
            label_smoothing=t.label_smoothing, scaler=amp[1], autocast_dtype=amp[0],
        )
        if ema is not None:
            ema.update_parameters(getattr(model, "module", model))
        n = len(batch["label"])
        sums = [sums[0] + stats["loss"] * n, sums[1] + stats["acc"] * n, sums[2] + n, stats["lr"]]
    return sums


def _build_training(cfg: RunConfig, num_classes: int, total_steps: int, warmup: int, world: int):
    import ray.train.torch
    import torch

    t = cfg.train
    torch.manual_seed(cfg.seed)  # the same initial weights on every worker
    model = ray.train.torch.prepare_model(build_classifier(t.arch, num_classes, t.zero_init_residual))
    lr = scaled_lr(t.base_lr, t.batch_size * world, t.lr_reference_batch)
    optimizer = build_optimizer(model, lr, momentum=t.momentum, weight_decay=t.weight_decay, nesterov=t.nesterov,
                                decay_norm_and_bias=t.decay_norm_and_bias)
    milestones = [int(f * total_steps) for f in sorted(t.milestones)]
    scheduler = build_scheduler(optimizer, t.schedule, total_steps, warmup, milestones, t.gamma,
                                warmup_start=min(1.0, t.warmup_lr / lr))
    return model, optimizer, scheduler


class TooManyReadErrors(RuntimeError):
    """More images could not be read than ``train.max_read_errors`` allows."""


def check_read_errors(cfg: RunConfig, run: str, images: int) -> dict:
    """``{"count", "first"}`` of the images a run could not read so far; raises :class:`TooManyReadErrors` when
    they exceed ``train.max_read_errors`` of the images read (``images`` trained on, plus the failures)."""
    count, first = read_error_count(errors_dir(cfg, run))
    if count and count > cfg.train.max_read_errors * (images + count):
        raise TooManyReadErrors(
            f"train: {count} of {images + count} images could not be read (more than train.max_read_errors="
            f"{cfg.train.max_read_errors:g}; first: {'; '.join(first[:3])}); all are listed in "
            f"{errors_dir(cfg, run)}. Fix the storage or the files, or raise train.max_read_errors"
        )
    return {"count": count, "first": first}


def train_loop(config: dict) -> None:
    """Ray Train worker loop (one per worker): resume, then per epoch train, validate, checkpoint, report."""
    import ray.train
    import ray.train.torch
    import torch

    cfg, plan = RunConfig.model_validate(config["cfg"]), config["plan"]
    quiet_train_worker(cfg.ray.verbose)
    t, ctx = cfg.train, ray.train.get_context()
    if t.torch_threads:
        torch.set_num_threads(t.torch_threads)
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    total_steps = max(1, t.epochs * plan["steps_per_epoch"])
    warmup = min(total_steps, round(t.warmup_epochs * plan["steps_per_epoch"]))
    model, optimizer, scheduler = _build_training(cfg, plan["num_classes"], total_steps, warmup, world)
    base = getattr(model, "module", model)
    device = ray.train.torch.get_device()
    amp = _amp_setup(device, t.amp, t.amp_dtype)
    ema = weight_ema(base, t.ema_decay)
    ckpt = resume_checkpoint(plan["resume_dir"], EPOCH_PREFIX)
    start = _load_state(ckpt, base, optimizer, scheduler, amp[1], ema) if ckpt else 0
    cdir = output_dir(cfg)
    kept = read_metrics(cdir) if rank == 0 else []  # rows of the epochs already checkpointed stay
    history = [r for r in kept if r.get("run") == plan["run_name"] and r["epoch"] < start]
    tracker = StageRun.of(cfg, "train", t.tag, plan["run_name"]).logger(history, "epoch", on=rank == 0)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if plan["has_val"] else None
    for epoch in range(start, t.epochs):
        began = time.time()
        buffer_seed = seed_of(cfg.seed, 40, epoch, rank) if plan["shuffle"] == "blocks" else None
        local = _run_epoch(model, optimizer, scheduler, train_shard, cfg, amp, buffer_seed, ema)
        seconds = time.time() - began
        loss, correct, images = trainer.all_reduce_sum(torch.tensor(local[:3], dtype=torch.float64, device=device)).tolist()
        val = _evaluate_shard(base, val_shard, cfg, plan["num_classes"], amp[0])
        val_ema = _evaluate_shard(ema.module, val_shard, cfg, plan["num_classes"], amp[0]) if ema is not None else None
        row = {
            "run": plan["run_name"], "epoch": epoch, "step": int(scheduler.last_epoch),
            "train_loss": loss / max(images, 1), "train_acc": correct / max(images, 1), "train_images": int(images),
            "val_top1": val["top1"] if val else None, "val_top5": val["top5"] if val else None,
            "lr": local[3], "seconds": round(seconds, 3),
            "images_per_s": images / seconds, "images_per_s_per_worker": images / seconds / world, "workers": world,
            "threads": torch.get_num_threads(),
            **({"val_top1_ema": val_ema["top1"]} if val_ema else {}),
        }
        state = None
        if rank == 0:
            check_read_errors(cfg, plan["run_name"], sum(r["train_images"] for r in history) + row["train_images"])
            history.append(row)
            trainer.write_metrics(metrics_url(cdir), history)
            write_curves(cdir, history)
            tracker.log(history)  # MLflow / TensorBoard, if on
            log.info(_epoch_line(row, t.epochs), extra={"tag": f"train {t.tag}" if t.tag else "train"})
            state = {"model": base.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "epoch": epoch, "scaler": amp[1].state_dict() if amp[1] else {},
                     "val_evaluation": val,  # these weights' val pass: the evaluation takes it instead of a second one
                     **({"ema": ema.state_dict()} if ema is not None else {})}
        _report(row, state)
        if rank == 0:
            hold_at("train.checkpoint_hold", epoch)  # tests only (_internal.faults): a node-loss test's moment


# ------------------------------------------------------------------------------------------ driver
def _warn_if_no_cpu_for_data(cfg: RunConfig) -> None:
    """Training workers hold ``worker_cpus`` each; decode tasks need CPUs beyond those, or the run waits forever."""
    import ray

    cpus, t = float(ray.cluster_resources().get("CPU", 0.0)), cfg.train
    held = t.num_workers * t.worker_cpus
    if cpus < held + t.decode_cpus:
        log.warning(f"the cluster has {cpus:g} CPUs; {t.num_workers} training workers hold {held:g} "
                    f"(train.worker_cpus={t.worker_cpus:g}) and Ray Data decode tasks need train.decode_cpus="
                    f"{t.decode_cpus:g} more. Unless the cluster autoscales, add CPUs (ray.num_cpus) or lower "
                    f"train.worker_cpus / train.num_workers, or the run will wait.")


def _trainer(plan: TrainPlan, cfg: RunConfig, first_epoch: int, resume_dir: str | None):
    import ray.train
    from ray.train.torch import TorchTrainer

    t = cfg.train
    _warn_if_no_cpu_for_data(cfg)
    use_gpu = resolve_use_gpu(t.use_gpu)
    check_fits_a_node({"CPU": t.worker_cpus, **({"GPU": 1} if use_gpu else {})}, "train.use_gpu")
    out_dir = output_dir(cfg)
    loop_plan = {"num_classes": len(plan.class_dirs), "steps_per_epoch": max(1, plan.steps_per_epoch),
                 "run_name": plan.run_name, "has_val": bool(plan.val), "resume_dir": resume_dir,
                 "shuffle": plan.shuffle}
    datasets = {"train": train_dataset(plan, cfg, first_epoch)}
    if plan.val:
        datasets["val"] = decoded_dataset(rows_dataset(plan.val, cfg), t.image_size, cfg, view="eval")
    fs, path = storage.arrow_filesystem(out_dir)  # the same filesystem object as finetune hands Ray Train
    run_config = ray.train.RunConfig(
        name=plan.run_name,
        storage_path=path,
        storage_filesystem=fs,
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.checkpoint_keep),
        failure_config=ray.train.FailureConfig(max_failures=0),  # restarts go through the driver (_internal.trainer)
        logging_config=train_logging(cfg.ray.verbose),
    )
    return TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "plan": loop_plan},
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": t.worker_cpus}
        ),
        run_config=run_config,
        datasets=datasets,
        dataset_config=trainer.ordered_data_config("train"),
    )


def _resume_point(cfg: RunConfig, name: str) -> tuple[int, str | None]:
    """``(first epoch, newest complete checkpoint folder)`` of this run name (0, None: a fresh run). The
    first epoch also seeds the resumed run's data order."""
    newest = newest_complete(storage.join(output_dir(cfg), name), EPOCH_PREFIX, (STATE_FILE,))
    return (checkpoint_number(newest, EPOCH_PREFIX) + 1, newest) if newest else (0, None)


def _final_state(result) -> dict:
    import torch

    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint (error: {result.error})")
    with result.checkpoint.as_directory() as directory:
        return torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)


@takes_run_lease
def run_train(cfg: RunConfig) -> dict:
    """Train (or resume, or return the finished run), save ``model.safetensors``, evaluate; return a summary."""

    plan = plan_training(cfg)
    cfg = apply_budget(cfg, plan.epoch_images)
    plan_sets(cfg, plan.class_dirs)  # the evaluation's inputs too: a bad extra set fails now, not after training
    distribution_inputs(cfg, plan.class_dirs)
    cdir = output_dir(cfg)
    done = finished_summary(cfg, plan)
    if done:
        # Training is complete; the evaluation is refreshed when its own inputs changed (e.g. a new extra set).
        evaluation = run_evaluate(cfg)
        evaluation.pop("skipped", None)
        return {**done, "evaluation": evaluation, "skipped": True}
    if plan.missing_synthetic_classes:
        log.warning(f"the synthetic set has no image of class(es) {plan.missing_synthetic_classes[:10]}")
    started = time.time()
    tracked = StageRun.of(cfg, "train", cfg.train.tag, plan.run_name)
    tracked.start(cfg)
    init_ray(cfg.ray)
    first = _resume_point(cfg, plan.run_name)  # a restart re-plans from the newest checkpoint
    try:
        result, restarts = trainer.fit_with_restarts(
            lambda restart: _trainer(plan, cfg, *(_resume_point(cfg, plan.run_name) if restart else first)).fit(),
            cfg.train.max_failures, "train")
    except Exception:
        check_read_errors(cfg, plan.run_name, plan.epoch_images)  # the workers' reason, said plainly, if it is that
        raise
    first_epoch = first[0]
    state = _final_state(result)
    prune_checkpoints(storage.join(output_dir(cfg), plan.run_name), EPOCH_PREFIX, cfg.train.checkpoint_keep)
    if int(state["epoch"]) + 1 > cfg.train.epochs:
        log.info(f"note: the latest checkpoint is epoch {int(state['epoch']) + 1} > train.epochs={cfg.train.epochs}; using it")
    info = {"arch": cfg.train.arch, "image_size": cfg.train.image_size, "source": cfg.train.source,
            "class_dirs": plan.class_dirs, "class_names": plan.class_names, "epochs": int(state["epoch"]) + 1}
    save_classifier(model_url(cdir), state["model"], info)
    history = [r for r in read_metrics(cdir) if r.get("run") == plan.run_name]
    if history:
        write_curves(cdir, history)
    evaluation = run_evaluate(cfg, scored={VAL_SET: state["val_evaluation"]} if state.get("val_evaluation") else None)
    tracked.finish(evaluation_metrics(evaluation), int(state["epoch"]), [storage.join(cdir, "curves.png")])
    summary = {
        "fingerprint": plan.fingerprint, "epochs": cfg.train.epochs, "run_name": plan.run_name,
        "source": cfg.train.source, "arch": cfg.train.arch, "epoch_images": plan.epoch_images,
        "real_images": plan.real_images, "synthetic_images": plan.synthetic_images, "resumed_at_epoch": first_epoch,
        "restarts": restarts, "shuffle": plan.shuffle,
        "read_errors": check_read_errors(cfg, plan.run_name, sum(r["train_images"] for r in history)),
        "seconds": round(time.time() - started, 2), "last_epoch": history[-1] if history else None,
        "val_top1_last5": late_val_top1(history),
        "val_top1_ema": history[-1].get("val_top1_ema") if history else None,
        "model": model_url(cdir), "evaluation": evaluation,
    }
    storage.write_json(done_url(cdir), summary)
    return summary
