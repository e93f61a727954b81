#!/usr/bin/env python
"""The paper's ablation on the embedded digits: does each Real-Fake component make the synthetic data better?

Every row is a full run of the stages on the tiny preset's pretrained base (encode → fine-tune where it
applies → generate → train a classifier → evaluate on the 360 real val digits), repeated over seeds:

    real          the 1,437 real train digits (the baseline)
    txt2img       base model, "photo of digit k" from noise (plain SD: no latent prior, no LoRA, no token)
    +prior        base model, img2img at strength 0.75 from each real image's latent
    +lora         LoRA fine-tuned with λ = 0 (denoising loss only), img2img
    +mmd λ        LoRA + distribution matching, λ = 0.003 (the paper's) and the best λ of the sweep
    full Nx       + the CLIP guidance token (= Real-Fake) at 1×, 2×, 5×, 10× synthetic copies
    mix 1x        real + full Real-Fake 1×

Columns: synthetic images, val top-1 mean ± std over seeds, MMD² and KID between the synthetic images and
the real val images in the tiny CLIP's embedding space, and the wall time of each stage. Every classifier
trains on the same number of images (the ``digits-32px`` recipe's ``train.budget_images``: 30 epochs of the
real set), whatever its
set size. λ is chosen on a held-out fifth of the real *train* split (``--sweep``), never on the val digits.

    python benchmarks/effectiveness.py --write BENCHMARKS.md            # the full table (~3 h on 2 cores)
    python benchmarks/effectiveness.py --quick                          # 1 seed, 1x rows only (~25 min)
    python benchmarks/effectiveness.py --sweep 0,0.003,0.03,0.3,3       # λ on the hold-out split first
    python benchmarks/effectiveness.py --scarce 10,30                   # + the data-scarce rows (per class)
    python benchmarks/effectiveness.py --beyond                         # + the beyond-the-paper rows
    python benchmarks/effectiveness.py --mmd                            # + the MMD term's other forms

Runs land below ``--out`` (default ``runs/effectiveness``) and every stage resumes, so an interrupted
benchmark continues where it stopped; results accumulate in ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import time
from pathlib import Path

from _common import machine, write_section  # first: puts the repository on sys.path

from realfake_ray.config import GENERATE_RECIPES

SECTION = "## Effectiveness: the paper's ablation on the embedded digits (CPU, tiny base v2)"
DEFAULT_LAMBDA = 0.003


def variants(best_lambda: float, mults: tuple[int, ...]) -> list[dict]:
    """Rows of the table: a name, the run dir they share, the stage overrides and the classifier overrides."""
    no_token = ["finetune.vision_token=none", "generate.vision_token=none"]
    rows = [
        {"row": "real", "run": "real", "stages": [], "train": ["train.source=real"]},
        {"row": "txt2img (base)", "run": "txt2img", "stages": ["generate"],
         "set": ["generate.mode=txt2img", "generate.use_lora=false", "generate.vision_token=none"]},
        {"row": "+ latent prior", "run": "prior", "stages": ["generate"],
         "set": ["generate.use_lora=false", "generate.vision_token=none"]},
        {"row": "+ LoRA (λ=0)", "run": "lora", "stages": ["finetune", "generate"],
         "set": ["finetune.mmd_weight=0", *no_token]},
        {"row": f"+ MMD (λ={DEFAULT_LAMBDA:g})", "run": f"mmd-{DEFAULT_LAMBDA:g}", "stages": ["finetune", "generate"],
         "set": [f"finetune.mmd_weight={DEFAULT_LAMBDA}", *no_token]},
    ]
    if best_lambda not in (DEFAULT_LAMBDA, 0.0):  # λ = 0 is the "+ LoRA" row already
        rows.append({"row": f"+ MMD (λ={best_lambda:g}, swept)", "run": f"mmd-{best_lambda:g}",
                     "stages": ["finetune", "generate"], "set": [f"finetune.mmd_weight={best_lambda}", *no_token]})
    full = [f"finetune.mmd_weight={best_lambda}", f"generate.mult={max(mults)}"]
    for mult in mults:
        rows.append({"row": f"+ guidance token = Real-Fake {mult}x", "run": "full", "stages": ["finetune", "generate"],
                     "set": full, "train": [f"train.synthetic_mult={mult}"]})
    rows.append({"row": "real + Real-Fake 1x (mix)", "run": "full", "stages": ["finetune", "generate"], "set": full,
                 "train": ["train.source=mix", "train.synthetic_mult=1"]})
    return rows


# Every row samples with the paper's sampler (UniPC, CFG 2 with the reference's negative prompt) at the 10 steps the
# tiny preset used when the table was first measured, unless it sets its own sampler keys (which win).
PAPER_SAMPLER = ["generate.recipe=paper", "generate.steps=10"]
# The sampler `realfake tune-sampler --preset tiny` recommends (the `tiny-tuned` recipe at the paper's strength),
# key by key so that it wins over PAPER_SAMPLER
RECOMMENDED_SAMPLER = [f"generate.{k}={GENERATE_RECIPES['tiny-tuned'][k]}"
                       for k in ("scheduler", "steps", "guidance_scale", "speedup")]
# The tiny preset's default: the whole `tiny-tuned` recipe (the sampler above at its own strength)
DEFAULT_SAMPLER = [*RECOMMENDED_SAMPLER, f"generate.strength={GENERATE_RECIPES['tiny-tuned']['strength']}"]
EMA_DECAY = 0.99  # the weight-EMA row's: a ~100-step horizon, ~4.5 epochs of a 1x set at batch 64


def beyond_variants(best_lambda: float, mults: tuple[int, ...]) -> list[dict]:
    """Beyond the paper (issue 24, item 4): each a change to Real-Fake 1× — the sampler the tuning recommends,
    the empty negative prompt (the reference's names "blurry", what the real digits are), strength 0.5, both (the
    tuned sampler and both also at every larger multiple of ``mults``, from one generation at the largest), a
    larger LoRA, LoRA on the convolution and feed-forward layers too, the intra-class token (class-mean CLIP
    embedding), and label-agreement filtering by the seed's real-only classifier (of the paper's sampler's copies
    and of the default's); and the default's classifier scored with a weight EMA too."""
    base = [f"finetune.mmd_weight={best_lambda}"]
    one, mult = ["train.synthetic_mult=1"], max(mults)
    # the tiny preset's default sampler on the seed's Real-Fake LoRA: three rows train on this one run
    default_1x = {"run": "sampler-strength-0.5", "stages": ["finetune", "generate"], "set": [*base, *DEFAULT_SAMPLER],
                  "lora_from": "full"}
    wide = 'finetune.lora_targets=["to_q","to_k","to_v","to_out.0","proj_in","proj_out","ff.net.0.proj","ff.net.2","conv1","conv2"]'
    return [
        {"row": "Real-Fake 1x, tuned sampler", "run": "sampler", "stages": ["finetune", "generate"],
         "set": [*base, *RECOMMENDED_SAMPLER], "lora_from": "full"},
        *({"row": f"Real-Fake {m}x, tuned sampler", "run": f"sampler-{mult}x", "stages": ["finetune", "generate"],
           "set": [*base, *RECOMMENDED_SAMPLER, f"generate.mult={mult}"], "lora_from": "full",
           "train": [f"train.synthetic_mult={m}"]} for m in mults if m > 1),
        {"row": "Real-Fake 1x, empty negative prompt", "run": "negative-empty", "stages": ["finetune", "generate"],
         "set": [*base, "generate.negative_prompt="], "lora_from": "full"},
        {"row": "Real-Fake 1x, strength 0.5", "run": "strength-0.5", "stages": ["finetune", "generate"],
         "set": [*base, "generate.strength=0.5"], "lora_from": "full"},
        {**default_1x, "row": "Real-Fake 1x, tuned sampler, strength 0.5"},
        # the same classifier run, also scored with an EMA of its weights (item 2's option)
        {**default_1x, "row": "Real-Fake 1x, tuned sampler, strength 0.5, + weight EMA",
         "train": ["train.source=synthetic", f"train.ema_decay={EMA_DECAY}"]},
        *({"row": f"Real-Fake {m}x, tuned sampler, strength 0.5", "run": f"sampler-strength-0.5-{mult}x",
           "stages": ["finetune", "generate"],
           "set": [*base, *DEFAULT_SAMPLER, f"generate.mult={mult}"], "lora_from": "full",
           "train": [f"train.synthetic_mult={m}"]} for m in mults if m > 1),
        {"row": "Real-Fake 1x, LoRA rank 16", "run": "rank-16", "stages": ["finetune", "generate"],
         "set": [*base, "finetune.lora_rank=16"]},
        {"row": "Real-Fake 1x, LoRA on conv + feed-forward too", "run": "lora-wide", "stages": ["finetune", "generate"],
         "set": [*base, wide]},
        {"row": "Real-Fake 1x, class-mean token", "run": "class-mean", "stages": ["finetune", "generate"],
         "set": [*base, "finetune.vision_token=class_mean", "generate.vision_token=class_mean"]},
        {"row": "Real-Fake 1x, label-agreement filter", "run": "full", "stages": ["finetune", "generate"],
         "set": [*base, f"generate.mult={mult}"], "train": one, "filter": True},  # the "full" rows' run
        {**default_1x, "row": "Real-Fake 1x, tuned sampler, strength 0.5, label-agreement filter", "train": one,
         "filter": True},
    ]


def mmd_variants() -> list[dict]:
    """The MMD term's other forms (issue 24, item 5), each against its λ = 0 control: the Gaussian kernel, and the
    reference's per-GPU batch of 8 (the tiny preset's is 16 per worker) with the linear kernel."""
    no_token = ["finetune.vision_token=none", "generate.vision_token=none"]
    lam = f"finetune.mmd_weight={DEFAULT_LAMBDA}"
    b8 = ["finetune.batch_size=8"]
    return [
        {"row": f"+ MMD Gaussian kernel (λ={DEFAULT_LAMBDA:g})", "run": "mmd-gaussian", "stages": ["finetune", "generate"],
         "set": [lam, "finetune.mmd_kernel=gaussian", *no_token]},
        {"row": "+ LoRA (λ=0), batch 8 per worker", "run": "lora-b8", "stages": ["finetune", "generate"],
         "set": ["finetune.mmd_weight=0", *b8, *no_token]},
        {"row": f"+ MMD (λ={DEFAULT_LAMBDA:g}), batch 8 per worker", "run": "mmd-b8", "stages": ["finetune", "generate"],
         "set": [lam, *b8, *no_token]},
    ]


def scarce_variants(per_class: int, best_lambda: float, mult: int = 10) -> list[dict]:
    """The data-scarce regime (issue 24, item 6): every stage sees ``per_class`` real train digits of each class
    (``data.train_per_class``); real-only, Real-Fake ``mult``× synthetic-only, and both together (the union:
    every real and every synthetic image, ``train.mix_ratio`` = mult / (mult + 1)); the last two also with the
    tiny preset's default sampler on the same LoRA."""
    subset = [f"data.train_per_class={per_class}"]
    full = [*subset, f"finetune.mmd_weight={best_lambda}", f"generate.mult={mult}"]
    tuned = [*full, *DEFAULT_SAMPLER]
    run = f"full-{per_class}pc"
    mix = ["train.source=mix", f"train.mix_ratio={mult / (mult + 1):.6f}"]
    return [
        {"row": f"real, {per_class} per class", "run": run, "stages": [], "set": subset, "train": ["train.source=real"]},
        {"row": f"Real-Fake {mult}x, {per_class} per class", "run": run, "stages": ["finetune", "generate"], "set": full},
        {"row": f"real + Real-Fake {mult}x, {per_class} per class", "run": run, "stages": ["finetune", "generate"],
         "set": full, "train": mix},
        # the tiny preset's default sampler (tiny-tuned: the tuned sampler at strength 0.5) on the same LoRA
        {"row": f"Real-Fake {mult}x, {per_class} per class, tuned sampler, strength 0.5", "run": f"{run}-tuned",
         "stages": ["finetune", "generate"], "set": tuned, "lora_from": run},
        {"row": f"real + Real-Fake {mult}x, {per_class} per class, tuned sampler, strength 0.5", "run": f"{run}-tuned",
         "stages": ["finetune", "generate"], "set": tuned, "lora_from": run, "train": mix},
    ]


def _config(out: Path, seed: int, overrides: list[str], data: dict | None = None):
    from realfake_ray.config import load_config

    return load_config(preset="tiny", out=str(out), seed=seed, overrides=overrides, **(data or {}))


def _shared_bank(root: Path, data: dict | None) -> Path:
    """Encode the real set once (the bank does not depend on the seed); runs copy it."""
    from realfake_ray.stages.encode.driver import run_encode

    bank = root / "bank"
    record = run_encode(_config(bank, 0, [], data))
    (root / "encode.json").write_text(json.dumps({"seconds": record.get("last_run", {}).get("seconds")}))
    return bank


def _subset_bank(root: Path, per_class: int, seed: int) -> Path:
    """The bank of a data-scarce run: the seed draws the subset, so each seed encodes its own (seconds, not minutes)."""
    from realfake_ray.stages.encode.driver import run_encode

    bank = root / f"bank-{per_class}pc-seed{seed}"
    run_encode(_config(bank, seed, [f"data.train_per_class={per_class}"]))
    return bank


def _run_dir(root: Path, bank: Path, seed: int, run: str) -> Path:
    out = root / f"seed{seed}" / run
    if not (out / "latents").exists():
        out.mkdir(parents=True, exist_ok=True)
        shutil.copytree(bank / "latents", out / "latents")
    return out


def _reuse_lora(root: Path, seed: int, source_run: str, out: Path) -> None:
    """Copy the fine-tuning of ``source_run`` (same seed, same finetune settings) so ``out`` skips its own: a
    row that changes only the sampler measures the sampler on the same LoRA. ``run_finetune`` still refuses the
    copy if its settings differ from the row's."""
    from realfake_ray.layout import RunLayout

    source, dest = RunLayout(str(root / f"seed{seed}" / source_run)), RunLayout(str(out))
    if not Path(source.lora_dir()).exists() or Path(dest.finetune_dir()).exists():
        return
    for src, dst in ((source.finetune_dir(), dest.finetune_dir()), (source.lora_dir(), dest.lora_dir())):
        shutil.copytree(src, dst + ".tmp", dirs_exist_ok=True)
        os.replace(dst + ".tmp", dst)


def _run_variants(root: Path, results: dict, results_file: Path, seed: int, rows: list[dict], bank_of, val_embeddings,
                  extra: list[str]) -> None:
    """Each row of ``rows`` not in ``results`` yet, for ``seed`` (``bank_of()`` gives its bank), saved as it ends."""
    done = {(r["row"], r["seed"]) for r in results["rows"]}
    for variant in rows:
        if (variant["row"], seed) in done:
            continue
        row = run_row(root, bank_of(), variant, seed, None, val_embeddings, extra)
        print(f"[effectiveness] seed {seed} {row['row']}: top-1 {row['top1']:.4f}", flush=True)
        results["rows"].append(row)
        results_file.write_text(json.dumps(results, indent=1))


def _embed_pixels(cfg, pixels):
    """Tiny-CLIP embeddings of decoded images (the encoder's own embedder and preprocessing)."""
    import numpy as np

    from realfake_ray.method.embeddings import ClipEmbedder

    embedder = ClipEmbedder(cfg)
    return np.concatenate([embedder.embed(pixels[i : i + 512]) for i in range(0, len(pixels), 512)]).astype(np.float32)


def _distances(cfg, summary: dict, val_embeddings) -> dict:
    """MMD² and KID of (up to 2,000 of) the classifier's synthetic images vs the real val digits."""
    import numpy as np

    from realfake_ray.data.labelled import images_in_memory, synthetic_set
    from realfake_ray.method.metrics import set_distances, subsample

    if not summary["synthetic_images"]:
        return {}
    images, _ = images_in_memory(synthetic_set(cfg, summary_class_dirs(cfg)))
    keep = subsample(len(images), 2000, cfg.seed).tolist()
    return set_distances(val_embeddings, _embed_pixels(cfg, np.stack([images[i] for i in keep])), seed=cfg.seed)


def summary_class_dirs(cfg) -> list[str]:
    from realfake_ray.bank import read_meta

    return read_meta(cfg.out)["class_dirs"]


def _val_embeddings(bank: Path):
    from realfake_ray._internal.shards import read_parts, tensor_column
    from realfake_ray.layout import RunLayout

    return tensor_column(read_parts(RunLayout(str(bank)).bank_dir("val"), ["clip_embed"]), "clip_embed")


def run_row(root: Path, bank: Path, variant: dict, seed: int, data: dict | None, val_embeddings,
            extra: list[str] = ()) -> dict:
    """One row for one seed: the stages it needs (each skips itself when complete), then its classifier."""
    from realfake_ray.stages.finetune.driver import run_finetune
    from realfake_ray.stages.generate.driver import run_generate
    from realfake_ray.stages.train.driver import run_train

    out = _run_dir(root, bank, seed, variant["run"])
    # e.g. "synthetic_mult-1" (a bare "1" would be read as a number)
    tag = "_".join(o.removeprefix("train.").replace("=", "-") for o in variant.get("train", [])) or "synthetic"
    tag += "_filtered" if variant.get("filter") else ""
    overrides = [*PAPER_SAMPLER, *variant.get("set", []), f"train.tag={tag}",
                 *variant.get("train", ["train.source=synthetic"]), *extra]
    cfg = _config(out, seed, overrides, data)
    times, kept = {}, {}
    if variant.get("lora_from"):
        _reuse_lora(root, seed, variant["lora_from"], out)
    if "finetune" in variant["stages"]:
        times["finetune_s"] = run_finetune(cfg).get("wall_seconds")
    if "generate" in variant["stages"]:
        times["generate_s"] = run_generate(cfg).get("wall_s")
    if variant.get("filter"):  # by the real-only row's classifier of this seed (the "real" row runs first)
        from realfake_ray.method.classifier_file import model_url
        from realfake_ray.tools.filter_synthetic.driver import run_filter_synthetic

        judge = model_url(str(root / f"seed{seed}" / "real" / "classifier" / "source-real"))
        filtered = run_filter_synthetic(cfg, classifier=judge)
        kept = {"kept": filtered["kept"], "dropped": filtered["dropped"],
                "kept_per_class": {c: v["kept_fraction"] for c, v in filtered["per_class"].items()}}
        cfg = _config(out, seed, [*overrides, f"train.synthetic={filtered['dest']}"], data)
    began = time.time()
    summary = run_train(cfg)
    times["train_s"] = summary.get("seconds", round(time.time() - began, 1))
    val = summary["evaluation"]["sets"]["val"]
    return {"row": variant["row"], "seed": seed, "synthetic_images": summary["synthetic_images"],
            "real_images": summary["real_images"], "top1": val["top1"], "top1_last5": summary.get("val_top1_last5"),
            "top1_ema": summary.get("val_top1_ema"),
            "per_class": val["per_class"], **kept,
            **_distances(cfg, summary, val_embeddings), **times}


def _holdout_split(root: Path) -> dict:
    """A stratified 4/5 – 1/5 split of the real *train* digits as two ImageFolders (for choosing λ)."""
    import numpy as np

    from realfake_ray.storage import resolve_embedded

    source = Path(resolve_embedded("embedded:digits"))
    split = root / "holdout-split"
    if not (split / "_done").exists():
        shutil.rmtree(split, ignore_errors=True)
        rng = np.random.default_rng(0)
        for class_dir in sorted(os.listdir(source / "train")):
            files = sorted(os.listdir(source / "train" / class_dir))
            held = set(rng.choice(len(files), len(files) // 5, replace=False).tolist())
            for i, name in enumerate(files):
                target = split / ("holdout" if i in held else "train") / class_dir
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy(source / "train" / class_dir / name, target / name)
        (split / "_done").write_text("")
    return {"data__train": str(split / "train"), "data__val": str(split / "holdout"),
            "data__classes_file": str(source / "classes.json")}


def sweep(root: Path, lambdas: list[float], seed: int) -> dict:
    """Synthetic-only top-1 on the hold-out split for each λ (LoRA + MMD, no token, 1×)."""
    data = _holdout_split(root)
    sweep_root = root / "sweep"
    bank = _shared_bank(sweep_root, data)
    results = {}
    for lam in lambdas:
        variant = {"row": f"λ={lam:g}", "run": f"mmd-{lam:g}", "stages": ["finetune", "generate"],
                   "set": [f"finetune.mmd_weight={lam}", "finetune.vision_token=none", "generate.vision_token=none"]}
        row = run_row(sweep_root, bank, variant, seed, data, _val_embeddings(bank))
        results[f"{lam:g}"] = {k: row.get(k) for k in ("top1", "mmd2", "kid")}
        print(f"[sweep] λ={lam:g}: hold-out top-1 {row['top1']:.4f}", flush=True)
    return results


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean ± std over seeds, one line per row name, in first-seen order."""
    import numpy as np

    table = []
    for name in dict.fromkeys(r["row"] for r in rows):
        group = [r for r in rows if r["row"] == name]
        top1 = np.array([r["top1"] for r in group])

        def mean(key, digits=4):
            values = [r[key] for r in group if r.get(key) is not None]
            return round(float(np.mean(values)), digits) if values else None

        table.append({
            "row": name, "seeds": len(group), "synthetic images": group[0]["synthetic_images"],
            "val top-1": f"{top1.mean():.4f} ± {top1.std(ddof=1):.4f}" if len(top1) > 1 else f"{top1[0]:.4f}",
            "val top-1, last 5 epochs": _mean_std([r.get("top1_last5") for r in group]),
            "val top-1, weight EMA": _mean_std([r.get("top1_ema") for r in group]),
            "MMD² (CLIP)": mean("mmd2"), "KID (CLIP)": mean("kid"),
            "finetune s": mean("finetune_s", 0), "generate s": mean("generate_s", 0), "train s": mean("train_s", 0),
        })
    # a statistic no row measured (the weight EMA is an option, off in the reference recipe) gets no column
    empty = [k for k in ("val top-1, last 5 epochs", "val top-1, weight EMA") if all(t[k] is None for t in table)]
    return [{k: v for k, v in t.items() if k not in empty} for t in table]


_NO_EMA = (" The weight-EMA evaluation (`--set train.ema_decay=…`; off in the reference recipe) was not run for "
           "these rows, so it has no column.")


def _in_order(rows: list[dict], names: list[str]) -> list[dict]:
    """The rows named in ``names``, in that order (the variants' order, not the order they were run in)."""
    rank = {name: i for i, name in enumerate(dict.fromkeys(names))}
    return sorted((r for r in rows if r["row"] in rank), key=lambda r: (rank[r["row"]], r["seed"]))


def _mean_std(values: list) -> str | None:
    """``mean ± std`` over seeds (rows run before the statistic existed have none: None)."""
    import numpy as np

    found = np.array([v for v in values if v is not None], dtype=float)
    if not len(found):
        return None
    return f"{found.mean():.4f} ± {found.std(ddof=1):.4f}" if len(found) > 1 else f"{found[0]:.4f}"


def resolvable_difference(rows: list[dict], key: str, seeds: int) -> tuple[float, float, int] | None:
    """The smallest difference between two synthetic-only rows of ``seeds`` seeds each that a two-sided 95 %
    t-test on ``key`` resolves: ``t(0.975, df) · s · sqrt(2 / seeds)``, with ``s`` the seed std pooled over every
    synthetic-only row run on two seeds or more. Returns (difference, s, df), or None without such rows."""
    import numpy as np
    from scipy.stats import t

    groups: dict[str, list[float]] = {}
    for r in rows:
        if r.get(key) is not None and r["synthetic_images"] and not r["real_images"]:
            groups.setdefault(r["row"], []).append(float(r[key]))
    spread = [(len(v) - 1, np.var(v, ddof=1)) for v in groups.values() if len(v) > 1]
    df = sum(d for d, _ in spread)
    if not df:
        return None
    pooled = float(np.sqrt(sum(d * var for d, var in spread) / df))
    return float(t.ppf(0.975, df) * pooled * np.sqrt(2 / seeds)), pooled, df


def stage_minutes(rows: list[dict], names: list[str], seeds: list[int]) -> float:
    """Minutes of stage work behind the table (a run shared by several rows is counted once)."""
    seen, total = set(), 0.0
    for r in rows:
        if r["row"] not in names or r["seed"] not in seeds:
            continue
        for key in ("finetune_s", "generate_s"):
            run = (r["seed"], key, r.get(key))
            if r.get(key) and run not in seen:
                seen.add(run)
                total += r[key]
        total += r.get("train_s") or 0
    return total / 60


def bar_chart(table: list[dict], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [t["row"] for t in table]
    cells = [t["val top-1"].split(" ± ") for t in table]
    means = [float(c[0]) for c in cells]
    stds = [float(c[1]) if len(c) > 1 else 0.0 for c in cells]
    fig, ax = plt.subplots(figsize=(11, 1.5 + 0.22 * len(names)))
    colours = ["#555555" if n == "real" else "#1f77b4" for n in names]
    ax.barh(range(len(names)), means, xerr=stds, color=colours, capsize=3)
    ax.axvline(means[names.index("real")] if "real" in names else 0, color="#555555", ls="--", lw=1)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlim(min(means) - 0.05 if means else 0, 1.0)
    ax.set_xlabel("val top-1 on the 360 real val digits (mean ± std over seeds)")
    ax.set_title("Real-Fake ablation, embedded digits, tiny base")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _resolution_text(rows: list[dict], seeds: int) -> str:
    """What the table can tell apart, per statistic (item 2 of issue 24)."""
    parts = []
    for key, name in (("top1", "final-epoch top-1"), ("top1_last5", "last-5-epoch mean")):
        found = resolvable_difference(rows, key, seeds)
        if found:
            parts.append(f"{name}: {found[0]:.3f} (seed std {found[1]:.3f} pooled over the synthetic-only rows, "
                         f"{found[2]} degrees of freedom)")
    if not parts:
        return "\nResolution: one seed per row — no seed-to-seed spread to state what the table can tell apart.\n"
    return ("\nSmallest difference between two synthetic-only rows that a two-sided 95 % t-test resolves at "
            f"{seeds} seed{'s' if seeds > 1 else ''}: " + "; ".join(parts) + ".\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/effectiveness")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--quick", action="store_true", help="one seed, 1x rows only")
    parser.add_argument("--mults", default="1,2,5,10", help="the Real-Fake rows' synthetic multiples (--quick: 1)")
    parser.add_argument("--sweep", default="", help="comma list of λ to try on the hold-out split first")
    parser.add_argument("--lambda", dest="best_lambda", type=float, help="skip the sweep: use this λ for the full rows")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every row (e.g. train.ema_decay=0.999); results are kept per --out")
    parser.add_argument("--beyond", action="store_true", help="+ the beyond-the-paper rows (Real-Fake 1x variants)")
    parser.add_argument("--mmd", action="store_true", help="+ the MMD term's other forms (Gaussian kernel, batch 8)")
    parser.add_argument("--scarce", default="", help="comma list of real images per class: the data-scarce rows too")
    parser.add_argument("--rows", default="", metavar="REGEX",
                        help="run only the rows whose name matches (e.g. 'per class'); the table shows every row run")
    parser.add_argument("--write", metavar="BENCHMARKS.md", help="write the results as this script's section")
    args = parser.parse_args()

    import ray
    import torch

    from realfake_ray._internal.cluster import init_ray
    from realfake_ray.config import RayConfig
    from realfake_ray.plots import markdown_table

    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    results_file = root / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {"rows": [], "sweep": {}}
    init_ray(RayConfig())
    ray.data.DataContext.get_current().enable_progress_bars = False
    if args.sweep:
        results["sweep"] = sweep(root, [float(x) for x in args.sweep.split(",")], seed=0)
        results_file.write_text(json.dumps(results, indent=1))
    best = args.best_lambda
    if best is None:
        best = max(results["sweep"], key=lambda k: results["sweep"][k]["top1"]) if results["sweep"] else DEFAULT_LAMBDA
    best = float(best)
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    mults = (1,) if args.quick else tuple(int(m) for m in args.mults.split(","))
    bank = _shared_bank(root, None)
    val_embeddings = _val_embeddings(bank)
    scarce = [int(k) for k in args.scarce.split(",") if k]
    beyond = (beyond_variants(best, mults) if args.beyond else []) + (mmd_variants() if args.mmd else [])
    wanted = (lambda rows: [v for v in rows if re.search(args.rows, v["row"])]) if args.rows else (lambda rows: rows)
    for seed in seeds:
        _run_variants(root, results, results_file, seed, wanted(variants(best, mults) + beyond), lambda: bank,
                      val_embeddings, args.set)
        for k in scarce:
            _run_variants(root, results, results_file, seed, wanted(scarce_variants(k, best)),
                          lambda k=k, seed=seed: _subset_bank(root, k, seed), val_embeddings, args.set)
    budget = _config(root / "bank", 0, []).train.budget_images
    names = [v["row"] for v in variants(best, mults) + beyond]
    measured = [r for r in results["rows"] if r["seed"] in seeds]
    ours = _in_order(measured, names)
    table = aggregate(ours)
    chart = bar_chart(table, str(Path(__file__).with_name("effectiveness.png")))
    encode_s = json.loads((root / "encode.json").read_text()).get("seconds")
    sweep_text = ", ".join(f"λ={k}: {v['top1']:.4f}" for k, v in results["sweep"].items()) or "not run"
    text = (f"{SECTION}\n\nMachine: {machine()} (torch {torch.__version__}, Ray {ray.__version__}); "
            f"`python benchmarks/effectiveness.py{' --quick' if args.quick else ''}`, seeds {seeds}, "
            f"{stage_minutes(results['rows'], names, seeds):.0f} min of stage time for the rows (sum of their "
            f"fine-tune, generate and train times). Val = the 360 real val digits; every "
            f"classifier: the `digits-32px` recipe (budget {budget:,} images: the same images seen for every row). "
            f"Encode (shared by all rows): {encode_s} s. λ sweep on the hold-out fifth of the real train split "
            f"(synthetic-only top-1): {sweep_text}; λ used for the Real-Fake rows: {best:g}. MMD² and KID: "
            f"tiny-CLIP embeddings of up to 2,000 synthetic images vs the 360 real val digits."
            f"{'' if any('val top-1, weight EMA' in t for t in table) else _NO_EMA}\n\n"
            f"{markdown_table(table)}\n\n![ablation](benchmarks/{os.path.basename(chart)})\n")
    text += _resolution_text(ours, len(seeds))
    scarce_names = [v["row"] for k in scarce for v in scarce_variants(k, best)]
    if scarce_names:
        scarce_table = aggregate(_in_order(measured, scarce_names))
        text += (f"\n### The data-scarce regime: {', '.join(map(str, scarce))} real train digits per class\n\n"
                 "Every stage sees only the subset (`data.train_per_class`, drawn by the seed); each classifier the "
                 "same budget (a small set passes several times per epoch); the mix rows train on the union of the "
                 "real subset and its 10x synthetic set; the tuned-sampler rows sample the same LoRA with the tiny "
                 "preset's default (`generate.recipe: tiny-tuned`), the others with the paper's sampler.\n\n" + markdown_table(scarce_table) + "\n")
    print(text)
    if args.write:
        write_section(args.write, SECTION, text)


if __name__ == "__main__":
    main()
