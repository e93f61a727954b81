"""The main job: encode → finetune → generate → train → evaluate, all below one run URL.

Each stage skips itself when its output is complete, so a resubmitted job resumes where a failed
one stopped; a stage starts (or joins) Ray only when it has work, so rerunning a finished job does no Ray
work at all. ``only`` / ``from_stage`` select stages. The report is rewritten after every stage that did
work, and after the last one.

Example:
    >>> from realfake_ray.config import load_config
    >>> from realfake_ray.stages.pipeline import run_pipeline
    >>> summary = run_pipeline(load_config(preset="tiny", out="runs/demo"))  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import time

from realfake_ray import storage
from realfake_ray._internal.lease import takes_run_lease
from realfake_ray.config import ConfigError, RunConfig, dump_config
from realfake_ray.tools.report import write_report
from realfake_ray.stages.train.driver import run_train

__all__ = ["run_pipeline", "select_stages", "STAGES"]

STAGE_ENTRIES = {
    "encode": "realfake_ray.stages.encode.driver:run_encode",
    "finetune": "realfake_ray.stages.finetune.driver:run_finetune",
    "generate": "realfake_ray.stages.generate.driver:run_generate",
    "train": "realfake_ray.stages.pipeline:train_with_baseline",
    "evaluate": "realfake_ray.stages.evaluate.driver:run_evaluate",
}
STAGES = tuple(STAGE_ENTRIES)


def select_stages(only: list[str] | None = None, from_stage: str | None = None) -> list[str]:
    """The stages to run, in pipeline order."""
    for name in [*(only or []), *([from_stage] if from_stage else [])]:
        if name not in STAGE_ENTRIES:
            raise ConfigError(f"unknown stage {name!r}; stages are: {', '.join(STAGES)}")
    if only:
        return [s for s in STAGES if s in only]
    start = STAGES.index(from_stage) if from_stage else 0
    return list(STAGES[start:])


def train_with_baseline(cfg: RunConfig) -> dict:
    """The train stage of the job: the ``train.source`` classifier, and with ``train.real_baseline`` also a
    real-only one (tag ``real``), so the report sets synthetic and real accuracy side by side."""

    result = run_train(cfg)
    if not cfg.train.real_baseline or cfg.train.source == "real":
        return result
    real = cfg.train.model_copy(update={"source": "real", "tag": "real", "synthetic_mult": None})
    baseline = run_train(cfg.model_copy(update={"train": real}))
    return {**result, "real_baseline": baseline, "skipped": bool(result.get("skipped") and baseline.get("skipped"))}


def _entry(stage: str):
    module, func = STAGE_ENTRIES[stage].split(":")
    return getattr(importlib.import_module(module), func)


@takes_run_lease
def run_pipeline(cfg: RunConfig, only: list[str] | None = None, from_stage: str | None = None) -> dict:
    """Run the selected stages in order; returns ``{stage: {"seconds", "skipped", "result"}}``."""

    stages = select_stages(only, from_stage)
    data = cfg.require_data()
    entries = {stage: _entry(stage) for stage in stages}  # fail on a missing stage before any work
    storage.check_reachable(cfg.out, data.train, data.val or "")
    storage.write_text(storage.join(cfg.out, "config.yaml"), dump_config(cfg))
    summary: dict = {}
    for stage in stages:
        print(f"[realfake] stage {stage}: starting", flush=True)
        started = time.time()
        result = entries[stage](cfg) or {}
        seconds = round(time.time() - started, 2)
        skipped = bool(result.get("skipped", False))
        summary[stage] = {"seconds": seconds, "skipped": skipped, "result": result}
        print(f"[realfake] stage {stage}: {'skipped (complete)' if skipped else 'done'} in {seconds:.1f} s", flush=True)
        if not skipped or stage == stages[-1]:  # a skipped stage changes nothing the report shows
            write_report(cfg, summary)
    return summary
