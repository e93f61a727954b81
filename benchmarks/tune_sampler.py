"""`realfake tune-sampler` on the tiny preset: the default grid, its Pareto front and recommendation (CPU).

Works on a Real-Fake run (latent bank + LoRA): `--run` names one (e.g. the effectiveness benchmark's
`runs/effectiveness/seed0/full`), or the script encodes and fine-tunes one in `--out` first (tiny preset,
seed 0, ~2 min). Its latents, LoRA and fine-tuning settings are copied into `--out`; the sweep writes
`<out>/tune_sampler/` and, with `--write BENCHMARKS.md`, this script's section there.

    python benchmarks/tune_sampler.py --run runs/effectiveness/seed0/full --write BENCHMARKS.md
"""

from __future__ import annotations

import _common  # noqa: F401  (repository root on sys.path)

import shutil
import time
from pathlib import Path

TITLE = "## Sampler tuning (CPU, tiny base): `realfake tune-sampler --preset tiny`"


def main() -> None:
    from _common import machine, real_fake_run, write_section

    from realfake_ray.layout import RunLayout
    from realfake_ray.tools.tune_sampler.driver import run_tune_sampler

    args, cfg = real_fake_run(__doc__, "runs/tune-sampler")
    out = Path(args.out)
    started = time.time()
    summary = run_tune_sampler(cfg)
    minutes = (time.time() - started) / 60
    table = Path(RunLayout(str(out)).tune_dir("results.md")).read_text()
    recommended = Path(RunLayout(str(out)).tune_dir("recommended.yaml")).read_text() if summary.get("recommended") else "(none)"
    command = "python benchmarks/tune_sampler.py" + (f" --run {args.run}" if args.run else "")
    text = (
        f"{TITLE}\n\nMachine: {machine()}. `{command}` "
        f"(seed {args.seed}; the default grid of `tune_sampler.axes`); wall time of the sweep "
        f"{minutes:.1f} min for {summary['settings']} settings and {summary['finalists']} classifier finalists.\n\n"
        f"{table}\n"
        f"Recommendation (`{RunLayout(str(out)).tune_dir('recommended.yaml')}`):\n\n```yaml\n{recommended}```\n\n"
        f"![front](benchmarks/tune_sampler.png)\n"
    )
    shutil.copy(RunLayout(str(out)).tune_dir("pareto.png"), Path(__file__).with_name("tune_sampler.png"))
    print(text)
    if args.write:
        write_section(args.write, TITLE, text)


if __name__ == "__main__":
    main()
