"""``realfake`` command line (also ``python -m realfake_ray``): one subcommand per stage.

Every stage takes the common flags ``--preset``, ``--data``, ``--val-data``, ``--out``, ``--config``,
``--set section.key=value`` (repeatable) and ``--seed``; the config is fully validated before any
Ray work starts.

Example:
    $ realfake preset tiny --out /tmp/tiny-sd
    $ realfake encode --preset tiny --out runs/tiny
    $ realfake encode --data s3://bucket/imagenet/train --out s3://bucket/run --set encode.batch_size=64
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from realfake_ray import storage
from realfake_ray._internal.quiet import QUIET_ENV, quiet_libraries
from realfake_ray.config import ConfigError, RunConfig, dump_config, load_config
from realfake_ray.models import pretrain
from realfake_ray.models.loading import materialise_preset, write_fp32_copy

__all__ = ["main"]


@dataclass(frozen=True)
class Flag:
    """A stage-specific flag that sets one dotted config key."""

    name: str
    key: str
    type: Callable = str
    help: str = ""
    choices: tuple | None = None


@dataclass(frozen=True)
class Arg:
    """A flag passed to the entry function as a keyword argument (not a config key)."""

    name: str
    kwarg: str
    type: Callable = str
    help: str = ""


@dataclass(frozen=True)
class Stage:
    entry: str  # "module:function" taking a RunConfig (imported lazily: keeps --help fast)
    help: str
    flags: tuple[Flag, ...] = field(default_factory=tuple)
    args: tuple[Arg, ...] = field(default_factory=tuple)


def _stage_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


_MULT = Flag("--mult", "generate.mult", int, "synthetic copies per real image (1-10 in the paper)")


STAGES: dict[str, Stage] = {
    "run": Stage(
        "realfake_ray.stages.pipeline:run_pipeline",
        "the main job: caption → encode → finetune → generate → train → evaluate (complete stages are skipped)",
        flags=(_MULT, Flag("--source", "train.source", str, "classifier training data", ("real", "synthetic", "mix"))),
        args=(
            Arg("--only", "only", _stage_list, "comma-separated stages to run, e.g. generate,train"),
            Arg("--from", "from_stage", str, "run from this stage on, e.g. train"),
        ),
    ),
    "caption": Stage(
        "realfake_ray.stages.caption.driver:run_caption",
        "training images → one BLIP-2 caption each → <out>/captions/captions.jsonl (resumes; nothing to do when "
        "data.captions_file is given or caption.enabled=false)",
    ),
    "encode": Stage("realfake_ray.stages.encode.driver:run_encode", "real ImageFolder → latent bank (VAE latents, CLIP embeddings, captions)"),
    "finetune": Stage(
        "realfake_ray.stages.finetune.driver:run_finetune",
        "latent bank → distribution-matching LoRA on the UNet (Ray Train; resumes from <out>/finetune)",
        flags=(
            Flag("--num-workers", "finetune.num_workers", int, "Ray Train workers (one GPU each on GPU clusters)"),
            Flag("--max-steps", "finetune.max_steps", int, "total optimiser steps (overrides finetune.epochs)"),
        ),
    ),
    "generate": Stage(
        "realfake_ray.stages.generate.driver:run_generate",
        "latent bank (+ LoRA) → synthetic ImageFolder + manifest, --mult copies per real image (resumes)",
        flags=(_MULT,),
    ),
    "bench-sampler": Stage(
        "realfake_ray.tools.sampler_bench:run_bench_sampler",
        "time the sampler on model.pretrained over a grid; table + <out>/bench/sampler.csv",
        args=(
            Arg("--schedulers", "schedulers", _stage_list, "comma list (default generate.scheduler)"),
            Arg("--steps", "steps", _stage_list, "comma list of step counts (default generate.steps)"),
            Arg("--batch-sizes", "batch_sizes", _stage_list, "comma list (default generate.batch_size)"),
            Arg("--dtypes", "dtypes", _stage_list, "comma list of fp32,fp16,bf16 (default generate.dtype; CPU fp32)"),
            Arg("--compile", "compile", _stage_list, "comma list of 0/1 (default generate.compile)"),
            Arg("--channels-last", "channels_last", _stage_list, "comma list of 0/1 (default generate.channels_last)"),
            Arg("--iters", "iters", int, "timed batches per grid point (default 3)"),
            Arg("--warmup", "warmup", int, "untimed batches first (default 1)"),
            Arg("--reference", "reference", int, "1: add the reference baseline row (default), 0: leave it out"),
        ),
    ),
    "tune-sampler": Stage(
        "realfake_ray.tools.tune_sampler.driver:run_tune_sampler",
        "Ray Tune sweep of sampler settings: images/s x data quality (KID, classifier top-1); Pareto front + "
        "recommended YAML in <out>/tune_sampler",
    ),
    "audit-privacy": Stage(
        "realfake_ray.tools.audit_privacy.driver:run_audit_privacy",
        "membership-inference audit (shadow runs, offline LiRA) of real- vs synthetic-trained classifiers + "
        "synthetic-to-source distances; <out>/audit_privacy",
    ),
    "train": Stage(
        "realfake_ray.stages.train.driver:run_train",
        "real / synthetic / mixed images → classifier from scratch (Ray Train; resumes from <out>/classifier)",
        flags=(Flag("--source", "train.source", str, "classifier training data", ("real", "synthetic", "mix")),),
    ),
    "evaluate": Stage(
        "realfake_ray.stages.evaluate.driver:run_evaluate",
        "trained classifier → top-1/top-5 on val and extra sets, synthetic-vs-real distribution metrics",
    ),
}


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=["tiny"], help="laptop-sized models and the embedded digits dataset")
    parser.add_argument("--data", help="training ImageFolder URL (data.train)")
    parser.add_argument("--val-data", help="validation ImageFolder URL (data.val)")
    parser.add_argument("--out", help="run URL: every stage writes below it (out)")
    parser.add_argument("--config", help="YAML config file (sections as in realfake_ray/config.py)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. encode.batch_size=64")
    parser.add_argument("--seed", type=int, help="global seed (seed)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--verbose", action="store_true", default=None,
                        help="Ray Data's own progress bars and execution logs (ray.verbose)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="realfake", description="Real-Fake training-data synthesis on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    preset = sub.add_parser("preset", help="write a built-in model preset as a diffusers directory (fp32)")
    preset.add_argument("name", choices=["tiny"])
    preset.add_argument("--out", required=True, help="local directory to write")
    base = sub.add_parser("pretrain-base", help="retrain the tiny base model from scratch on the printed-digit corpus")
    base.add_argument("--out", required=True, help="local directory to write the diffusers pipeline to")
    base.add_argument("--seed", type=int, default=0, help="corpus and initialisation seed (default 0)")
    for option in ("corpus_size", "vae_steps", "clip_steps", "unet_steps"):
        base.add_argument(f"--{option.replace('_', '-')}", type=int, dest=option, help=f"default: PretrainConfig.{option}")
    for name, stage in STAGES.items():
        p = sub.add_parser(name, help=stage.help)
        _add_common(p)
        for flag in stage.flags:
            p.add_argument(flag.name, type=flag.type, help=flag.help or flag.key, choices=flag.choices)
        for arg in stage.args:
            p.add_argument(arg.name, type=arg.type, help=arg.help, dest=arg.kwarg)
    return parser


def config_from_args(args: argparse.Namespace, stage: Stage) -> RunConfig:
    flags = {"out": args.out, "seed": args.seed, "data__train": args.data, "data__val": args.val_data,
             "ray__verbose": args.verbose}
    for flag in stage.flags:
        flags[flag.key.replace(".", "__")] = getattr(args, flag.name.lstrip("-").replace("-", "_"))
    return load_config(preset=args.preset, config_file=args.config, overrides=args.set, **flags)


def _run_stage(name: str, args: argparse.Namespace) -> None:
    stage = STAGES[name]
    cfg = config_from_args(args, stage)
    if args.print_config:
        print(dump_config(cfg), end="")
        return
    storage.check_reachable(cfg.out, cfg.data.train or "", cfg.data.val or "")
    module, func = stage.entry.split(":")
    kwargs = {arg.kwarg: getattr(args, arg.kwarg) for arg in stage.args}
    result = getattr(importlib.import_module(module), func)(cfg, **kwargs)
    if result is not None:
        print(json.dumps(result, indent=2, default=str)[:4000])


def _pretrain_base(args: argparse.Namespace) -> None:
    given = {k: getattr(args, k) for k in ("corpus_size", "vae_steps", "clip_steps", "unet_steps")}
    steps = {k: v for k, v in given.items() if v is not None}
    record = pretrain.pretrain_base(args.out, pretrain.PretrainConfig(seed=args.seed, **steps))
    print(f"wrote {args.out} in {record['wall_seconds'] / 60:.1f} min; use it with --set model.pretrained={args.out}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not getattr(args, "verbose", None):  # before the libraries are imported: they read it once
        import os

        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)
        quiet_libraries()
    try:
        if args.command == "preset":
            print(write_fp32_copy(materialise_preset(args.name), args.out))
        elif args.command == "pretrain-base":
            _pretrain_base(args)
        else:
            _run_stage(args.command, args)
    except (ConfigError, ValueError, OSError, RuntimeError) as exc:
        if not raised_by_us(exc):
            raise  # torch's, Ray's, a library's: the traceback is the useful part
        print(f"realfake {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def raised_by_us(exc: BaseException) -> bool:
    """Whether ``exc`` was raised by realfake_ray's own code (a checked, explained error: one line for the
    user) rather than inside a library (a bug or an environment problem: keep the traceback)."""
    import os

    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    package = os.path.dirname(os.path.abspath(__file__))
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(package + os.sep)


if __name__ == "__main__":
    sys.exit(main())
