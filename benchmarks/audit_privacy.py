"""`realfake audit-privacy` on the embedded digits (CPU, tiny base): membership inference against real- and
synthetic-trained classifiers, K shadow runs per arm, and the synthetic-to-source distances per strength.

Like `benchmarks/tune_sampler.py` it works on a Real-Fake run (`--run` copies one's bank, LoRA and
fine-tuning settings; without it one is encoded and fine-tuned in `--out`).

    python benchmarks/audit_privacy.py --run runs/effectiveness/seed0/full --write BENCHMARKS.md
"""

from __future__ import annotations

import _common  # noqa: F401  (repository root on sys.path)

import shutil
from pathlib import Path

TITLE = "## Privacy audit (CPU, tiny base): `realfake audit-privacy --preset tiny`"


def goal_reading(arms: dict) -> str:
    """The issue's goal: synthetic TPR at 1 % FPR ≤ half the real one, at val accuracy ≥ 0.9 × real."""
    if not {"real", "synthetic"} <= set(arms):
        return "(both arms are needed for the goal)"
    real, synthetic = arms["real"], arms["synthetic"]
    tpr_ok = synthetic["tpr_at_1pct_fpr"] <= 0.5 * real["tpr_at_1pct_fpr"]
    acc_ok = synthetic["val_top1_mean"] >= 0.9 * real["val_top1_mean"]
    return (f"Goal (synthetic TPR at 1 % FPR ≤ ½ × real, at val top-1 ≥ 0.9 × real): TPR "
            f"{synthetic['tpr_at_1pct_fpr']:.4f} vs ½ × {real['tpr_at_1pct_fpr']:.4f} → {'met' if tpr_ok else 'not met'}; "
            f"val top-1 {synthetic['val_top1_mean']:.4f} vs 0.9 × {real['val_top1_mean']:.4f} → "
            f"{'met' if acc_ok else 'not met'}.")


def main() -> None:
    from _common import machine, real_fake_run, write_section

    from realfake_ray.tools.audit_privacy.driver import audit_markdown, run_audit_privacy
    from realfake_ray.layout import RunLayout

    args, cfg = real_fake_run(__doc__, "runs/audit-privacy")
    out = Path(args.out)
    summary = run_audit_privacy(cfg)
    command = "python benchmarks/audit_privacy.py" + (f" --run {args.run}" if args.run else "")
    text = (
        f"{TITLE}\n\nMachine: {machine()}. `{command}` (seed {args.seed}; defaults: "
        f"{cfg.audit_privacy.shadows} shadow runs per arm, classifier budget {cfg.audit_privacy.classifier_budget_images} "
        f"images, the tiny preset's fine-tuning and generation settings); wall time {summary['wall_s'] / 60:.1f} min "
        f"(a rerun on stored shadows only recomputes the attack).\n\n{audit_markdown(summary)}\n\n"
        f"{goal_reading(summary['arms'])}\n\n![ROC](benchmarks/audit_privacy_roc.png)\n"
    )
    shutil.copy(RunLayout(str(out)).audit_dir("roc.png"), Path(__file__).with_name("audit_privacy_roc.png"))
    print(text)
    if args.write:
        write_section(args.write, TITLE, text)


if __name__ == "__main__":
    main()
