"""The main job: caption → encode → finetune → generate → train → evaluate, all below one run URL.

Each stage skips itself when its output is complete, so a resubmitted job resumes where a failed
one stopped; a stage starts (or joins) Ray only when it has work, so rerunning a finished job does no Ray
work at all. ``only`` / ``from_stage`` select stages; the caption stage is left out when it has nothing to do
(``data.captions_file`` given, or ``caption.enabled`` off). The report is rewritten after every stage that did
work, and after the last one.

Example:
    >>> from realfake_ray.config import load_config
    >>> from realfake_ray.stages.pipeline import run_pipeline
    >>> summary = run_pipeline(load_config(preset="tiny", out="runs/demo"))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import importlib
import time
from concurrent.futures import ThreadPoolExecutor

from realfake_ray import storage
from realfake_ray._internal.cluster import init_ray, resolve_use_gpu
from realfake_ray._internal.lease import takes_run_lease
from realfake_ray.config import ConfigError, RunConfig, dump_config
from realfake_ray.data.sources import listing_cache
from realfake_ray.stages.preflight import preflight
from realfake_ray.stages.registry import COMMANDS, PIPELINE
from realfake_ray.stages.train.driver import run_train
from realfake_ray.stages.train.plan import is_complete
from realfake_ray.tools.report import write_report

__all__ = ["run_pipeline", "select_stages", "train_with_baseline", "side_by_side"]

log = logging.getLogger(__name__)


def _function(spec: str):
    """The function a registry ``"module:function"`` names (its module imported now)."""
    module, func = spec.split(":")
    return getattr(importlib.import_module(module), func)


def select_stages(only: list[str] | None = None, from_stage: str | None = None,
                  cfg: RunConfig | None = None) -> list[str]:
    """The stages to run, in pipeline order (:data:`~realfake_ray.stages.registry.PIPELINE`). Unless named in
    ``only``, a stage whose registry ``idle_when`` gives ``cfg`` a reason is left out (the caption stage when
    ``data.captions_file`` is given or ``caption.enabled`` is off)."""
    for name in [*(only or []), *([from_stage] if from_stage else [])]:
        if name not in PIPELINE:
            raise ConfigError(f"unknown stage {name!r}; stages are: {', '.join(PIPELINE)}")
    if only:
        return [s for s in PIPELINE if s in only]
    start = PIPELINE.index(from_stage) if from_stage else 0

    def idle(stage: str) -> bool:
        check = COMMANDS[stage].idle_when
        return cfg is not None and check is not None and bool(_function(check)(cfg))

    return [s for s in PIPELINE[start:] if not idle(s)]


def train_with_baseline(cfg: RunConfig) -> dict:
    """The train stage of the job: the ``train.source`` classifier, and with ``train.real_baseline`` also a
    real-only one (tag ``real``), so the report sets synthetic and real accuracy side by side. The two train
    at the same time when the cluster holds both (:func:`side_by_side`), else one after the other."""

    if not cfg.train.real_baseline or cfg.train.source == "real":
        return run_train(cfg)
    real = cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"source": "real", "tag": "real", "synthetic_mult": None})})
    if not (is_complete(cfg) and is_complete(real)) and side_by_side(cfg):
        log.info("training the real-only baseline beside the synthetic classifier")
        with ThreadPoolExecutor(2, thread_name_prefix="train") as pool:
            runs = [pool.submit(run_train, c) for c in (cfg, real)]
        result, baseline = (run.result() for run in runs)  # the first failure is raised, after both ended
    else:
        result, baseline = run_train(cfg), run_train(real)
    return {**result, "real_baseline": baseline, "skipped": bool(result.get("skipped") and baseline.get("skipped"))}


def side_by_side(cfg: RunConfig) -> bool:
    """Whether the cluster (started now, if it is not) holds two classifiers' training workers and a decode
    task for each at once: ``2 × (num_workers × worker_cpus + decode_cpus)`` CPUs and, on GPUs, twice the
    workers. On a smaller cluster two runs would each hold workers while their decode tasks wait."""
    import ray

    init_ray(cfg.ray)
    t, have = cfg.train, ray.cluster_resources()
    cpus = 2 * (t.num_workers * t.worker_cpus + t.decode_cpus)
    return have.get("CPU", 0) >= cpus and (not resolve_use_gpu(t.use_gpu) or have.get("GPU", 0) >= 2 * t.num_workers)


def _entry(stage: str):
    return _function(COMMANDS[stage].job_entry)


@takes_run_lease
def run_pipeline(cfg: RunConfig, only: list[str] | None = None, from_stage: str | None = None) -> dict:
    """Run the selected stages in order; returns ``{stage: {"seconds", "skipped", "result"}}``."""

    stages = select_stages(only, from_stage, cfg)
    data = cfg.require_data()
    entries = {stage: _entry(stage) for stage in stages}  # fail on a missing stage before any work
    storage.check_reachable(cfg.out, data.train, data.val or "", *cfg.evaluate.extra_sets.values())
    with listing_cache():  # the preflight's listings serve the stages of this job
        preflight(cfg, stages)
        storage.write_text(storage.join(cfg.out, "config.yaml"), dump_config(cfg))
        return _run_stages(cfg, stages, entries)


def _run_stages(cfg: RunConfig, stages: list[str], entries: dict) -> dict:
    summary: dict = {}
    for stage in stages:
        log.info(f"stage {stage}: starting")
        started = time.time()
        result = entries[stage](cfg) or {}
        seconds = round(time.time() - started, 2)
        skipped = bool(result.get("skipped", False))
        summary[stage] = {"seconds": seconds, "skipped": skipped, "result": result}
        log.info(f"stage {stage}: {'skipped (complete)' if skipped else 'done'} in {seconds:.1f} s")
        if not skipped or stage == stages[-1]:  # a skipped stage changes nothing the report shows
            write_report(cfg, summary)
    return summary
