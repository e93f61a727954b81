"""Shared by the CPU benchmark scripts (imported first): puts the repository root on ``sys.path``, keeps
Ray quiet, names the machine and writes a BENCHMARKS.md section."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


def machine() -> str:
    """``<CPU model>, <n> cores, no GPU`` (from ``lscpu``)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        name = platform.processor() or "unknown CPU"
    return f"{name}, {os.cpu_count()} cores, no GPU"


def write_section(path: str, title: str, text: str) -> None:
    """Replace the ``title`` section (``## ...`` up to the next ``## ``) of ``path``, or append it; the rest stays."""
    old = Path(path).read_text() if os.path.exists(path) else "# Benchmarks\n"
    if title in old:
        head, rest = old.split(title, 1)
        tail = rest[rest.find("\n## ") + 1:] if "\n## " in rest else ""
        new = head + text + ("\n" + tail if tail else "")
    else:
        new = old.rstrip("\n") + "\n\n" + text
    tmp = f"{path}.tmp-{os.getpid()}"
    Path(tmp).write_text(new)
    os.replace(tmp, path)


def prepare_run(out: Path, run: str | None, seed: int) -> None:
    """A Real-Fake run (latent bank + LoRA) in ``out`` for the audits: copied from ``run`` (its latents, LoRA and
    fine-tuning settings), or encoded and fine-tuned there (tiny preset, ``seed``)."""
    import shutil

    from realfake_ray.config import load_config
    from realfake_ray.stages.encode.driver import run_encode
    from realfake_ray.stages.finetune.driver import run_finetune

    if (out / "lora").exists():
        return
    if run:
        for name in ("latents", "lora"):
            shutil.copytree(Path(run) / name, out / name)
        (out / "finetune").mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(run) / "finetune" / "_settings.json", out / "finetune" / "_settings.json")
        return
    cfg = load_config(preset="tiny", out=str(out), seed=seed)
    run_encode(cfg)
    run_finetune(cfg)


def real_fake_run(doc: str, out_default: str):
    """``(args, cfg)`` for a script that audits a Real-Fake run: parses ``--out --run --seed --set --write``,
    prepares the run (:func:`prepare_run`) and resolves its tiny-preset config."""
    import argparse

    from realfake_ray.config import load_config

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--out", default=out_default)
    parser.add_argument("--run", help="a Real-Fake run to work on (its latents, LoRA and fine-tuning settings are copied)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], help="extra config overrides, as the CLI's --set")
    parser.add_argument("--write", metavar="BENCHMARKS.md")
    args = parser.parse_args()
    prepare_run(Path(args.out), args.run, args.seed)
    return args, load_config(preset="tiny", out=args.out, seed=args.seed, overrides=args.set)
