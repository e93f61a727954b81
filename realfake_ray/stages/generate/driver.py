"""Generate stage: latent bank (+ LoRA) → a sharded synthetic set, ``mult`` copies per real image.

Driver: validate config, bank, model and LoRA (no Ray yet) → plan the shards not written yet from the bank's
``image_id`` column and one listing of ``<out>/synthetic/data`` → Ray Data pipeline:

    from_items(units)                one unit = one shard: up to ``images_per_shard`` rows of one bank part
                                     file, one copy
    → map_batches(load_units)        CPU tasks: read the rows, build prompts and seeds; one row per shard
    → map_batches(SynthesisActor)    actor pool (one GPU each on GPU clusters): pipeline loaded once, LoRA
                                     fused; samples the shard in generation batches, JPEG-encodes, writes
                                     the shard (one Parquet file, atomically); one summary row per shard

The planning and checks live in ``plan.py``, the actor in ``workers.py``, the format in
``realfake_ray.data.synthetic`` (none imports Ray); this module wires them and reports progress.

A shard is written whole or not at all, so a rerun (after any interruption, or with a larger ``mult``)
generates exactly the shards that are missing. Generation batches are fixed by the plan, not by Ray's
block bundling, so the same config on the same hardware gives byte-identical shards.

Example:
    >>> from realfake_ray.config import load_config
    >>> from realfake_ray.stages.generate.driver import run_generate
    >>> summary = run_generate(load_config(preset="tiny", out="runs/tiny", overrides=["generate.mult=2"]))  # doctest: +SKIP
    >>> summary["count"] == summary["expected"]  # doctest: +SKIP
    True
"""

from __future__ import annotations

import logging
import time

import numpy as np

from realfake_ray import storage
from realfake_ray._internal.cluster import ClusterTimeline, actor_pool_kwargs, gpus_per_actor, init_ray
from realfake_ray._internal.lease import takes_run_lease
from realfake_ray.bank import class_mean_embeddings
from realfake_ray.config import RunConfig
from realfake_ray.stages.generate.plan import GeneratePlan, plan_generate, shard_settings, throughput_settings
from realfake_ray.layout import RunLayout
from realfake_ray.data.synthetic import dataset_card
from realfake_ray.stages.generate.workers import SynthesisActor, load_units

__all__ = ["run_generate"]

log = logging.getLogger(__name__)

SYNTHETIC = "synthetic"
LIGHT_TASK_CPUS = 0.25
_PROGRESS_EVERY_S = 10.0


def build_pipeline(cfg: RunConfig, plan: GeneratePlan, class_means: np.ndarray | None = None):
    """The Ray Data plan for ``plan.units`` (not executed)."""
    import ray.data

    g = cfg.generate
    spec = {
        "lora_url": plan.lora_url,
        "lora_sha256": plan.lora_sha256,
        "latent_shape": plan.meta["latent_shape"],
        "class_means": class_means,
        "class_dirs": plan.meta["class_dirs"],
        "shards_dir": RunLayout(cfg.out).shards_dir(),
        "settings": shard_settings(plan.settings),
    }
    ds = ray.data.from_items(plan.units, override_num_blocks=max(1, min(len(plan.units), 20000)))
    load_kwargs = {"seed": cfg.seed, "mode": g.mode, "vision_token": g.vision_token, "collisions": plan.collisions}
    # The CPU tasks before the actors are light (Parquet reads): a quarter CPU each, so that on a small CPU
    # machine they do not keep an actor from starting.
    ds = ds.map_batches(load_units, batch_format="pyarrow", batch_size=None, fn_kwargs=load_kwargs,
                        num_cpus=LIGHT_TASK_CPUS)
    return ds.map_batches(
        SynthesisActor,
        batch_size=1,  # one row = one planned shard (fixes batch composition: reproducible bytes)
        batch_format="pyarrow",
        fn_constructor_args=(cfg, spec),
        **actor_pool_kwargs(g.actors, "generate.actors", reserve_cpus=LIGHT_TASK_CPUS),
    )


def _class_means(cfg: RunConfig, plan: GeneratePlan) -> np.ndarray | None:
    """Per-class mean CLIP embedding of the bank (``generate.vision_token=class_mean``), computed once here."""
    if cfg.generate.vision_token != "class_mean":
        return None

    return class_mean_embeddings(plan.files, len(plan.meta["class_dirs"]))


def _execute(cfg: RunConfig, plan: GeneratePlan) -> dict:
    """Run the pipeline with a progress bar (images done / total, images/s; on a terminal) or a progress
    line every few seconds (job logs) as shards land; returns the counts and each actor's start-up times."""
    import sys

    from tqdm.auto import tqdm

    ds = build_pipeline(cfg, plan, _class_means(cfg, plan))
    written = failed = shards = size = 0
    sampler_s = 0.0
    errors: list[str] = []
    actors: dict[str, dict] = {}
    present = plan.expected - plan.pending
    bar = tqdm(total=plan.expected, initial=present, unit="img", desc="generate", disable=not sys.stdout.isatty())
    started = last = time.time()
    progress = {"written": 0}
    timeline = ClusterTimeline(lambda: progress["written"])
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        done, lost = int(batch["written"].sum()), int(batch["failed"].sum())
        written, failed = written + done, failed + lost
        shards, size = shards + int((batch["written"] > 0).sum()), size + int(batch["bytes"].sum())
        sampler_s += float(batch["sampler_s"].sum())
        errors += [e for e in batch["error"].tolist() if e][: max(0, 10 - len(errors))]
        for name, load_s, first, at in zip(batch["actor"], batch["load_s"], batch["first_batch_s"], batch["first_batch_at"]):
            actors.setdefault(str(name), {"actor": str(name), "load_s": round(float(load_s), 2),
                                          "first_batch_s": None if np.isnan(first) else round(float(first), 2),
                                          # when, in the stage's timeline, this actor finished its first batch
                                          "first_batch_t": None if np.isnan(at) else round(float(at) - started, 2)})
        bar.update(done)
        bar.set_postfix(failed=failed, refresh=False)
        progress["written"] = written
        now = time.time()
        if bar.disable and (now - last >= _PROGRESS_EVERY_S or written + failed == plan.pending):
            last = now
            rate = written / max(now - started, 1e-9)
            log.info(f"{present + written}/{plan.expected} images "
                     f"({100 * (present + written) / max(plan.expected, 1):.1f}%), "
                     f"this run {written}/{plan.pending} at {rate:.2f} images/s, failed {failed}")
    bar.close()
    return {"written": written, "failed": failed, "errors": errors, "seconds": time.time() - started,
            "sampler_s": sampler_s, "timeline": timeline.stop(), "shards": shards, "bytes": size,
            "actors": sorted(actors.values(), key=lambda a: a["actor"])}


@takes_run_lease
def run_generate(cfg: RunConfig) -> dict:
    """Generate every missing synthetic image; write ``<out>/synthetic/_summary.json``; return the summary.

    ``"skipped": True`` when nothing was missing. Raises before any Ray work on bad input (config, bank,
    model, LoRA, changed settings), and RuntimeError after the summary when some images failed.

    Example:
        >>> run_generate(load_config(preset="tiny", out="runs/tiny"))["count"]  # doctest: +SKIP
        1437
    """

    started = time.time()
    plan = plan_generate(cfg)
    log.info(f"{plan.bank_rows} bank rows x mult {cfg.generate.mult} = {plan.expected} images; "
             f"{plan.expected - plan.pending} present, {plan.pending} to generate in {len(plan.units)} of "
             f"{plan.shards} shards ({plan.settings['images_per_shard']} images each)"
             + (f"; LoRA {plan.lora_sha256[:12]}" if plan.lora_sha256 else "; no LoRA"))
    summary_url = RunLayout(cfg.out).synthetic_dir("_summary.json")
    if not plan.units and storage.exists(summary_url):
        stored = storage.read_json(summary_url)
        if stored.get("count") == plan.expected and stored.get("complete"):
            return {**stored, "skipped": True}  # nothing to do: the record of the run that did the work stays
    result = {"written": 0, "failed": 0, "errors": [], "seconds": 0.0, "sampler_s": 0.0, "shards": 0, "bytes": 0,
              "actors": []}
    gpus = None
    if plan.units:
        storage.write_json(RunLayout(cfg.out).synthetic_dir("_settings.json"), plan.settings)
        init_ray(cfg.ray)
        gpus = gpus_per_actor(cfg.generate.actors)
        result = _execute(cfg, plan)
    summary = {
        "count": plan.expected - plan.pending + result["written"],
        "expected": plan.expected,
        "generated_now": result["written"],
        "already_present": plan.expected - plan.pending,
        "failed": result["failed"],
        "errors": result["errors"],
        "images_per_s": round(result["written"] / result["seconds"], 3) if result["written"] else None,
        "generation_s": round(result["seconds"], 2),
        "sampler_s": round(result["sampler_s"], 2),  # actor time inside Sampler calls, summed over actors
        # images per second of one actor while sampling = per GPU on GPU clusters (one GPU per actor)
        "sampler_images_per_s": round(result["written"] / result["sampler_s"], 3) if result["sampler_s"] else None,
        "gpus_per_actor": gpus,
        "wall_s": round(time.time() - started, 2),
        "bank_rows": plan.bank_rows,
        "mult": cfg.generate.mult,
        "shards_dir": RunLayout(cfg.out).shards_dir(),
        "shards": plan.shards,
        "shards_written_now": result["shards"],
        "bytes_written_now": result["bytes"],
        "settings": plan.settings,
        "throughput_settings": throughput_settings(cfg),
        # (seconds, images written, alive nodes, alive synthesis actors) while this run generated
        "timeline": result.get("timeline", []),
        # each actor's seconds to load the pipeline and to finish its first generation batch (from its start)
        "actors": result["actors"],
    }
    summary["complete"] = summary["count"] == plan.expected
    storage.write_json(summary_url, summary)
    counts = {c: n * cfg.generate.mult for c, n in (plan.class_counts or {}).items()}
    storage.write_text(RunLayout(cfg.out).synthetic_dir("README.md"),
                       dataset_card(summary, plan.settings, plan.meta["class_names"], counts))
    if result["failed"]:
        raise RuntimeError(
            f"generate: {result['failed']} of {plan.pending} images failed (first error: {result['errors'][0]}); "
            f"see {summary_url}; rerun to retry only the missing ones"
        )
    return {**summary, "skipped": not plan.units}
