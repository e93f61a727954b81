"""Every ``realfake`` command that runs on a :class:`~realfake_ray.config.RunConfig` — the pipeline's stages, in
pipeline order, the tools on top of a run, and ``run`` (the whole job) — in one table, read by the CLI (its
subcommands, help and flags), the pipeline (which stages ``realfake run`` runs and what it calls), the run
layout (each command's folders below ``--out``), the report (its section headings) and the tests (the import
rules, the job scripts). Pure data: importing it imports neither Ray nor a stage.

Adding a stage: a package ``stages/<name>/`` whose ``driver.py`` exports ``run_<name>``, and one entry in
:data:`STAGES` (and a one-line ``jobs/<name>.py``).

Example:
    >>> [stage.name for stage in STAGES if stage.in_pipeline]
    ['caption', 'encode', 'finetune', 'generate', 'train', 'evaluate']
    >>> COMMANDS["train"].job_entry
    'realfake_ray.stages.pipeline:train_with_baseline'
    >>> COMMANDS["finetune"].outputs
    ('finetune', 'lora')
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Flag", "Arg", "Command", "comma_list", "RUN", "STAGES", "TOOLS", "COMMANDS", "PIPELINE"]


@dataclass(frozen=True)
class Flag:
    """A command-line flag that sets one dotted config key."""

    name: str
    key: str
    type: Callable = str
    help: str = ""
    choices: tuple | None = None


@dataclass(frozen=True)
class Arg:
    """A command-line flag passed to the entry function as a keyword argument (not a config key)."""

    name: str
    kwarg: str
    type: Callable = str
    help: str = ""


@dataclass(frozen=True)
class Command:
    """One ``realfake <name>`` command.

    ``entry``: ``"module:function"`` taking a RunConfig (imported only when the command runs: ``--help`` stays
    fast and Ray-free). ``outputs``: its folders below ``--out``, first the main one (:class:`~realfake_ray.
    layout.RunLayout` spells every path from them). ``in_pipeline``: ``realfake run`` runs it, in the order of
    :data:`STAGES`, through ``pipeline_entry`` when that is set, else ``entry`` — unless ``idle_when``
    (``"module:function"`` taking a RunConfig) gives a reason it has nothing to do for that config. ``report``:
    the heading of its section in ``report.md`` (None: the report has none)."""

    name: str
    entry: str
    help: str
    flags: tuple[Flag, ...] = ()
    args: tuple[Arg, ...] = ()
    outputs: tuple[str, ...] = ()
    in_pipeline: bool = False
    pipeline_entry: str | None = None
    idle_when: str | None = None
    report: str | None = None
    offline: bool = False  # runs with no storage, model or network access (no reachability probe first)

    @property
    def job_entry(self) -> str:
        """What ``realfake run`` calls for this stage."""
        return self.pipeline_entry or self.entry


def comma_list(text: str) -> list[str]:
    """``"a, b,,c"`` → ``["a", "b", "c"]`` (the type of list-valued flags)."""
    return [s.strip() for s in text.split(",") if s.strip()]


_MULT = Flag("--mult", "generate.mult", int, "synthetic copies per real image (1-10 in the paper)")
_SOURCE = Flag("--source", "train.source", str, "classifier training data", ("real", "synthetic", "mix"))

STAGES: tuple[Command, ...] = (
    Command(
        "caption", "realfake_ray.stages.caption.driver:run_caption",
        "training images → one BLIP-2 caption each → <out>/captions/captions.jsonl (resumes; nothing to do when "
        "data.captions_file is given or caption.enabled=false)",
        outputs=("captions",), in_pipeline=True, idle_when="realfake_ray.data.captions:caption_stage_idle",
        report="Captions",
    ),
    Command(
        "encode", "realfake_ray.stages.encode.driver:run_encode",
        "real dataset (ImageFolder, flat folder + labels, Parquet, WebDataset) → latent bank (VAE latents, CLIP "
        "embeddings, the training images' captions)",
        outputs=("latents",), in_pipeline=True, report="Latent bank",
    ),
    Command(
        "finetune", "realfake_ray.stages.finetune.driver:run_finetune",
        "latent bank → distribution-matching LoRA on the UNet (Ray Train; resumes from <out>/finetune)",
        flags=(
            Flag("--num-workers", "finetune.num_workers", int, "Ray Train workers (one GPU each on GPU clusters)"),
            Flag("--max-steps", "finetune.max_steps", int, "total optimiser steps (overrides finetune.epochs)"),
        ),
        outputs=("finetune", "lora"), in_pipeline=True, report="Fine-tuning",
    ),
    Command(
        "generate", "realfake_ray.stages.generate.driver:run_generate",
        "latent bank (+ LoRA) → synthetic set (Parquet shards, Hugging Face datasets layout), --mult copies per "
        "real image (resumes)",
        flags=(_MULT,), outputs=("synthetic",), in_pipeline=True, report="Synthesis",
    ),
    Command(
        "train", "realfake_ray.stages.train.driver:run_train",
        "real / synthetic / mixed images → classifier from scratch (Ray Train; resumes from <out>/classifier)",
        flags=(_SOURCE,), outputs=("classifier",), in_pipeline=True,
        # the job trains a real-only baseline beside the train.source classifier (train.real_baseline)
        pipeline_entry="realfake_ray.stages.pipeline:train_with_baseline", report="Accuracy",
    ),
    Command(
        "evaluate", "realfake_ray.stages.evaluate.driver:run_evaluate",
        "trained classifier → top-1/top-5 on val and extra sets, synthetic-vs-real distribution metrics",
        outputs=("classifier",), in_pipeline=True, report="Real vs synthetic distribution (CLIP space)",
    ),
)

TOOLS: tuple[Command, ...] = (
    Command(
        "plan", "realfake_ray.tools.plan:run_plan",
        "what the job will do and cost (images, objects, requests, GPU-hours per stage) — no GPU, weights or network",
        flags=(_MULT,),
        args=(
            Arg("--assume-images", "assume_images", int, "plan for this many train images instead of listing data.train"),
            Arg("--assume-val-images", "assume_val_images", int, "with --assume-images: val images (default 0)"),
            Arg("--images-per-s", "images_per_s", comma_list, "per-GPU rates, e.g. generate=12.5,train=3000"),
        ),
        offline=True,
    ),
    Command(
        "export", "realfake_ray.tools.export.driver:run_export",
        "the synthetic set's shards written as an ImageFolder or WebDataset tars (same JPEG bytes; resumes)",
        args=(
            Arg("--format", "fmt", str, "imagefolder or webdataset"),
            Arg("--dest", "dest", str, "where to write it: a local path or a storage URL"),
        ),
    ),
    Command(
        "filter-synthetic", "realfake_ray.tools.filter_synthetic.driver:run_filter_synthetic",
        "the synthetic set without the images a classifier trained on real images does not label as their class "
        "(beyond the paper; resumes) → <out>/synthetic_filtered/<classifier hash>, a set for train.synthetic",
        args=(Arg("--classifier", "classifier", str, "a classifier file (default: <out>/classifier/real/model.safetensors)"),),
        outputs=("synthetic_filtered",),
    ),
    Command(
        "bench-sampler", "realfake_ray.tools.sampler_bench:run_bench_sampler",
        "time the sampler on model.pretrained over a grid; table + <out>/bench/sampler.csv",
        args=(
            Arg("--schedulers", "schedulers", comma_list, "comma list (default generate.scheduler)"),
            Arg("--steps", "steps", comma_list, "comma list of step counts (default generate.steps)"),
            Arg("--batch-sizes", "batch_sizes", comma_list, "comma list (default generate.batch_size)"),
            Arg("--dtypes", "dtypes", comma_list, "comma list of fp32,fp16,bf16 (default generate.dtype; CPU fp32)"),
            Arg("--compile", "compile", comma_list, "comma list of 0/1 (default generate.compile)"),
            Arg("--channels-last", "channels_last", comma_list, "comma list of 0/1 (default generate.channels_last)"),
            Arg("--iters", "iters", int, "timed batches per grid point (default 3)"),
            Arg("--warmup", "warmup", int, "untimed batches first (default 1)"),
            Arg("--reference", "reference", int, "1: add the reference baseline row (default), 0: leave it out"),
        ),
        outputs=("bench",),
    ),
    Command(
        "tune-sampler", "realfake_ray.tools.tune_sampler.driver:run_tune_sampler",
        "Ray Tune sweep of sampler settings: images/s x data quality (KID, classifier top-1); Pareto front + "
        "recommended YAML in <out>/tune_sampler",
        outputs=("tune_sampler",),
    ),
    Command(
        "audit-privacy", "realfake_ray.tools.audit_privacy.driver:run_audit_privacy",
        "membership-inference audit (shadow runs, offline LiRA) of real- vs synthetic-trained classifiers + "
        "synthetic-to-source distances; <out>/audit_privacy",
        outputs=("audit_privacy",), report="Audit: membership inference (realfake audit-privacy)",
    ),
)

RUN = Command(
    "run", "realfake_ray.stages.pipeline:run_pipeline",
    "the main job: caption → encode → finetune → generate → train → evaluate (complete stages are skipped; caption "
    "only when it has work)",
    flags=(_MULT, _SOURCE),
    args=(
        Arg("--only", "only", comma_list, "comma-separated stages to run, e.g. generate,train"),
        Arg("--from", "from_stage", str, "run from this stage on, e.g. train"),
    ),
)

COMMANDS: dict[str, Command] = {c.name: c for c in (RUN, *STAGES, *TOOLS)}
PIPELINE: tuple[str, ...] = tuple(s.name for s in STAGES if s.in_pipeline)  # what `realfake run` runs, in order
