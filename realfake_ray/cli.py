"""``realfake`` command line (also ``python -m realfake_ray``): one subcommand per stage and tool of
:mod:`realfake_ray.stages.registry` (its help, flags and entry point), plus ``preset`` and ``pretrain-base``.

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
from typing import NoReturn

from realfake_ray import storage
from realfake_ray._internal.quiet import QUIET_ENV, quiet_libraries
from realfake_ray.config import ConfigError, RunConfig, dump_config, load_config
from realfake_ray.layout import RunLayout
from realfake_ray.models import pretrain
from realfake_ray.models.tiny import UNET_LAYOUTS
from realfake_ray.models.loading import materialise_preset, write_fp32_copy
from realfake_ray.stages.registry import COMMANDS, Command

__all__ = ["main", "run_job"]


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=["tiny"], help="laptop-sized models and the embedded digits dataset")
    parser.add_argument("--data", help="training set URL (data.train): ImageFolder, flat folder + labels, Parquet, WebDataset")
    parser.add_argument("--val-data", help="validation set URL (data.val; a flat folder takes --set data.val_labels=FILE)")
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
    base.add_argument("--unet-layout", choices=sorted(UNET_LAYOUTS), default="sd",
                      help="the UNet's levels: sd (the shipped base: cross-attention where SD v1.5 has it) or v1 "
                           "(the first base)")
    base.add_argument("--encoders-from", metavar="DIR",
                      help="take the VAE, CLIP and tokenizer of this base (same corpus seed) and train only the UNet")
    for name, stage in COMMANDS.items():
        p = sub.add_parser(name, help=stage.help)
        _add_common(p)
        for flag in stage.flags:
            p.add_argument(flag.name, type=flag.type, help=flag.help or flag.key, choices=flag.choices)
        for arg in stage.args:
            p.add_argument(arg.name, type=arg.type, help=arg.help, dest=arg.kwarg)
    return parser


def config_from_args(args: argparse.Namespace, stage: Command) -> RunConfig:
    flags = {"out": args.out, "seed": args.seed, "data__train": args.data, "data__val": args.val_data,
             "ray__verbose": args.verbose}
    for flag in stage.flags:
        flags[flag.key.replace(".", "__")] = getattr(args, flag.name.lstrip("-").replace("-", "_"))
    return load_config(preset=args.preset, config_file=args.config, overrides=args.set, **flags)


def _run_stage(name: str, args: argparse.Namespace) -> None:
    stage = COMMANDS[name]
    cfg = config_from_args(args, stage)
    if args.print_config:
        print(dump_config(cfg), end="")
        return
    if not stage.offline:
        storage.check_reachable(cfg.out, cfg.data.train or "", cfg.data.val or "")
    module, func = stage.entry.split(":")
    kwargs = {arg.kwarg: getattr(args, arg.kwarg) for arg in stage.args}
    result = getattr(importlib.import_module(module), func)(cfg, **kwargs)
    if name == "run":
        print(job_summary(result, RunLayout(cfg.out).report_url("md")))
    elif result is not None:
        print(json.dumps(result, indent=2, default=str)[:4000])


def job_summary(result: dict, report: str) -> str:
    """What a finished job prints: each stage's time, the val top-1 of its classifiers, and where the report is
    (the whole record is in the report and each stage's own files).

    Example:
        >>> print(job_summary({"encode": {"seconds": 45.2, "skipped": False, "result": {}},
        ...                    "train": {"seconds": 427.8, "skipped": False, "result": {"source": "synthetic",
        ...                              "evaluation": {"sets": {"val": {"top1": 0.8194}}}, "real_baseline":
        ...                              {"source": "real", "evaluation": {"sets": {"val": {"top1": 0.9722}}}}}}},
        ...                   "runs/demo/report.md"))
        encode      45.2 s
        train      427.8 s
        val top-1: synthetic 0.819, real 0.972
        report: runs/demo/report.md
    """
    lines = [f"{stage:<8} {s['seconds']:>7.1f} s{'  (skipped: complete)' if s['skipped'] else ''}"
             for stage, s in result.items()]
    train = (result.get("train") or {}).get("result") or {}
    scores = [(run.get("source"), ((run.get("evaluation") or {}).get("sets") or {}).get("val", {}).get("top1"))
              for run in (train, train.get("real_baseline") or {})]
    scores = [f"{source} {top1:.3f}" for source, top1 in scores if source and top1 is not None]
    return "\n".join(lines + ([f"val top-1: {', '.join(scores)}"] if scores else []) + [f"report: {report}"])


def _pretrain_base(args: argparse.Namespace) -> None:
    given = {k: getattr(args, k) for k in ("corpus_size", "vae_steps", "clip_steps", "unet_steps")}
    steps = {k: v for k, v in given.items() if v is not None}
    record = pretrain.pretrain_base(args.out, pretrain.PretrainConfig(
        seed=args.seed, unet_layout=args.unet_layout, encoders_from=args.encoders_from, **steps))
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


def run_job(command: str) -> NoReturn:
    """A Ray job script's whole body: ``realfake <command>`` with the script's arguments (``jobs/*.py``).

    Example:
        >>> run_job("encode")  # doctest: +SKIP
    """
    sys.exit(main([command, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
