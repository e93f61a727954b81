"""Generate stage: latent bank (+ LoRA) → synthetic ImageFolder + manifest, ``mult`` copies per real image.

Driver: validate config, bank, model and LoRA (no Ray yet) → plan the missing ``(image_id, copy_idx)``
keys from the bank's ``image_id`` column and the manifest → Ray Data pipeline:

    from_items(load units)           one unit = up to ~512 pending rows of one bank part file, one copy
    → map_batches(load_units)        CPU tasks: read the rows, build prompts and seeds; one output row
                                     per *generation batch* (``generate.batch_size`` images)
    → map_batches(SynthesisActor)    actor pool (one GPU each on GPU clusters): pipeline loaded once,
                                     LoRA fused; one Sampler call per generation batch → uint8 images
    → map_batches(write_images)      CPU tasks: JPEG-encode, write each file atomically
    → map_batches(write_manifest)    CPU tasks: one manifest part per ``rows_per_manifest_file`` rows

The planning and checks live in ``generate_plan.py`` and the batch functions and the actor in
``synthesis.py`` (neither imports Ray); this module wires them into the pipeline and reports progress.

Files are written before their manifest rows, so a manifest row always means the file exists. A rerun
(after any interruption, or with a larger ``mult``) generates only the keys missing from the manifest.
Generation batches are fixed by the driver's plan, not by Ray's block bundling, so the same config on
the same hardware gives byte-identical images.

Example:
    >>> from realfake_ray.config import load_config
    >>> from realfake_ray.stages.generate.driver import run_generate
    >>> summary = run_generate(load_config(preset="tiny", out="runs/tiny", overrides=["generate.mult=2"]))  # doctest: +SKIP
    >>> summary["count"] == summary["expected"]  # doctest: +SKIP
    True
"""

from __future__ import annotations

import os
import time

import numpy as np

from realfake_ray import storage
from realfake_ray._internal.cluster import ClusterTimeline, actor_pool_kwargs, gpus_per_actor, init_ray
from realfake_ray._internal.faults import fault_at
from realfake_ray._internal.lease import takes_run_lease
from realfake_ray.bank import class_mean_embeddings
from realfake_ray.config import RunConfig
from realfake_ray.stages.generate.plan import GeneratePlan, plan_generate
from realfake_ray.layout import RunLayout
from realfake_ray.stages.generate.workers import SynthesisActor, load_units, write_images, write_manifest

__all__ = ["run_generate"]

SYNTHETIC = "synthetic"
LIGHT_TASK_CPUS = 0.25
_PROGRESS_EVERY_S = 10.0


# ------------------------------------------------------------------------------------------ validation


# ------------------------------------------------------------------------------------------ planning


# ------------------------------------------------------------------------------------------ workers


# ------------------------------------------------------------------------------------------ driver


def _manifest_constants(cfg: RunConfig, plan: GeneratePlan) -> dict:
    g = cfg.generate
    return {
        "mode": g.mode,
        "vision_token": g.vision_token,
        "strength": g.strength if g.mode == "img2img" else 1.0,
        "steps": g.steps,
        "scheduler": g.scheduler,
        "guidance_scale": g.guidance_scale,
        "lora_scale": g.lora_scale if plan.lora_sha256 else None,
        "lora_sha256": plan.lora_sha256,
    }


def build_pipeline(cfg: RunConfig, plan: GeneratePlan, class_means: np.ndarray | None = None):
    """The Ray Data plan for ``plan.units`` (not executed)."""
    import ray.data

    g = cfg.generate
    spec = {
        "lora_url": plan.lora_url,
        "lora_sha256": plan.lora_sha256,
        "latent_shape": plan.meta["latent_shape"],
        "class_means": class_means,
        "fail_copy": fault_at("generate.sampler_error"),
    }
    ds = ray.data.from_items(plan.units, override_num_blocks=max(1, min(len(plan.units), 20000)))
    load_kwargs = {"seed": cfg.seed, "batch_size": g.batch_size, "mode": g.mode, "vision_token": g.vision_token,
                   "collisions": plan.collisions}  # fmt: skip
    # The CPU tasks around the actors are light (Parquet reads, JPEG writes): a quarter CPU each, so that on a
    # small CPU machine they do not keep an actor from starting.
    ds = ds.map_batches(load_units, batch_format="pyarrow", batch_size=None, fn_kwargs=load_kwargs,
                        num_cpus=LIGHT_TASK_CPUS)
    ds = ds.map_batches(
        SynthesisActor,
        batch_size=1,  # one row = one planned generation batch (fixes batch composition: reproducible bytes)
        batch_format="pyarrow",
        fn_constructor_args=(cfg, spec),
        **actor_pool_kwargs(g.actors, "generate.actors", reserve_cpus=2 * LIGHT_TASK_CPUS),
    )
    ds = ds.map_batches(
        write_images,
        batch_size=None,
        num_cpus=LIGHT_TASK_CPUS,
        fn_kwargs={"root": RunLayout(cfg.out).images_dir(), "quality": g.jpeg_quality, "storage_size": g.storage_size},
    )
    return ds.map_batches(
        write_manifest,
        batch_format="pyarrow",
        batch_size=g.rows_per_manifest_file,
        num_cpus=LIGHT_TASK_CPUS,
        fn_kwargs={"directory": RunLayout(cfg.out).manifest_dir(), "constants": _manifest_constants(cfg, plan),
                   "kill_driver_after": (kill_at, os.getpid()) if (kill_at := fault_at("generate.manifest_part")) else None,
                   "hold_after": (hold_at, os.getpid()) if (hold_at := fault_at("generate.manifest_part_hold")) else None},
    )


def _class_means(cfg: RunConfig, plan: GeneratePlan) -> np.ndarray | None:
    """Per-class mean CLIP embedding of the bank (``generate.vision_token=class_mean``), computed once here."""
    if cfg.generate.vision_token != "class_mean":
        return None

    return class_mean_embeddings(plan.files, len(plan.meta["class_dirs"]))


def _execute(cfg: RunConfig, plan: GeneratePlan) -> dict:
    """Run the pipeline with a progress bar (images done / total, images/s; on a terminal) or a progress
    line every few seconds (job logs) as manifest parts land; returns the counts."""
    import sys

    from tqdm.auto import tqdm

    ds = build_pipeline(cfg, plan, _class_means(cfg, plan))
    written = failed = 0
    sampler_s = 0.0
    errors: list[str] = []
    present = plan.expected - plan.pending
    bar = tqdm(total=plan.expected, initial=present, unit="img", desc="generate", disable=not sys.stdout.isatty())
    started = last = time.time()
    progress = {"written": 0}
    timeline = ClusterTimeline(lambda: progress["written"])
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        done, lost = int(batch["written"].sum()), int(batch["failed"].sum())
        written, failed = written + done, failed + lost
        sampler_s += float(batch["sampler_s"].sum())
        errors += [e for e in batch["error"].tolist() if e][: max(0, 10 - len(errors))]
        bar.update(done)
        bar.set_postfix(failed=failed, refresh=False)
        progress["written"] = written
        now = time.time()
        if bar.disable and (now - last >= _PROGRESS_EVERY_S or written + failed == plan.pending):
            last = now
            rate = written / max(now - started, 1e-9)
            print(
                f"[generate] {present + written}/{plan.expected} images "
                f"({100 * (present + written) / max(plan.expected, 1):.1f}%), "
                f"this run {written}/{plan.pending} at {rate:.2f} images/s, failed {failed}",
                flush=True,
            )
    bar.close()
    return {"written": written, "failed": failed, "errors": errors, "seconds": time.time() - started,
            "sampler_s": sampler_s, "timeline": timeline.stop()}


def _throughput_settings(cfg: RunConfig) -> dict:
    g = cfg.generate
    return {"batch_size": g.batch_size, "dtype": g.dtype, "channels_last": g.channels_last, "compile": g.compile,
            "actors": g.actors.model_dump(), "rows_per_manifest_file": g.rows_per_manifest_file, "mult": g.mult}  # fmt: skip


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
    print(
        f"[generate] {plan.bank_rows} bank rows x mult {cfg.generate.mult} = {plan.expected} images; "
        f"{plan.expected - plan.pending} present, {plan.pending} to generate in {len(plan.units)} load units"
        + (f"; LoRA {plan.lora_sha256[:12]}" if plan.lora_sha256 else "; no LoRA"),
        flush=True,
    )
    summary_url = RunLayout(cfg.out).synthetic_dir("_summary.json")
    if not plan.units and storage.exists(summary_url):
        stored = storage.read_json(summary_url)
        if stored.get("count") == plan.expected and stored.get("complete"):
            return {**stored, "skipped": True}  # nothing to do: the record of the run that did the work stays
    result = {"written": 0, "failed": 0, "errors": [], "seconds": 0.0, "sampler_s": 0.0}
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
        "images": RunLayout(cfg.out).images_dir(),
        "manifest": RunLayout(cfg.out).manifest_dir(),
        "settings": plan.settings,
        "throughput_settings": _throughput_settings(cfg),
        # (seconds, images written, alive nodes, alive synthesis actors) while this run generated
        "timeline": result.get("timeline", []),
    }
    summary["complete"] = summary["count"] == plan.expected
    storage.write_json(summary_url, summary)
    if result["failed"]:
        raise RuntimeError(
            f"generate: {result['failed']} of {plan.pending} images failed (first error: {result['errors'][0]}); "
            f"see {summary_url}; rerun to retry only the missing ones"
        )
    return {**summary, "skipped": not plan.units}
