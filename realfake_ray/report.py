"""The run report: ``<out>/report.md`` + ``report.json`` + pictures, rebuilt from what the stages wrote.

The report reads each stage's own output files (bank meta, fine-tune metrics, synthesis summary and
manifest, classifier metrics), so a resubmitted job whose stages all skip still reports everything.
Per-stage wall times of the runs that did the work are kept in ``<out>/_stages.json``.
"""

from __future__ import annotations

import io
import os
import tempfile

import numpy as np

from realfake_ray import storage
from realfake_ray.config import RunConfig, dump_config
from realfake_ray.flops import img2img_flops

IMAGENET_TRAIN_IMAGES = 1_281_167
H100_BF16_PEAK = 989e12
GRID_PER_CLASS = 4
GRID_MAX_CLASSES = 10


def _read_json(url: str) -> dict | None:
    return storage.read_json(url) if storage.exists(url) else None


def _stage_times(cfg: RunConfig, summary: dict) -> dict:
    """Merge this run's stage timings into ``_stages.json`` (skipped stages keep the earlier timing)."""
    url = storage.join(cfg.out, "_stages.json")
    times = _read_json(url) or {}
    for stage, info in summary.items():
        if not info["skipped"] or stage not in times:
            times[stage] = {"seconds": info["seconds"], "skipped": info["skipped"]}
        else:
            times[stage]["skipped_last_run"] = True
    storage.write_json(url, times)
    return times


def _thumbnail(url: str, size: int) -> np.ndarray:
    from realfake_ray.data.imagefolder import decode_image

    return decode_image(storage.read_bytes(url), size)[0]


def _sample_grid(cfg: RunConfig, meta: dict, local_dir: str) -> str | None:
    """Per class: a few real images then a few synthetic images of the same class."""
    from realfake_ray._internal.shards import read_parts
    from realfake_ray.data.imagefolder import scan_image_folder
    from realfake_ray.plots import image_grid

    manifest = read_parts(storage.join(cfg.out, "synthetic", "_manifest"), ["path", "label"])
    if manifest is None:
        return None
    real = scan_image_folder(cfg.data.train, check_readable=False, class_dirs=meta["class_dirs"])
    size = min(cfg.encode.resolution, 128)
    rows, labels = [], []
    synth_paths = manifest["path"].to_pylist()
    synth_labels = manifest["label"].to_pylist()
    for label, name in list(enumerate(meta["class_names"]))[:GRID_MAX_CLASSES]:
        reals = [r.url for r in real.records if r.label == label][:GRID_PER_CLASS]
        fakes = sorted(p for p, lab in zip(synth_paths, synth_labels) if lab == label)[:GRID_PER_CLASS]
        cells = [_thumbnail(u, size) for u in reals]
        cells += [_thumbnail(storage.join(cfg.out, "synthetic", "train", p), size) for p in fakes]
        if cells:
            rows.append(cells)
            labels.append(name)
    cols = [f"real {i + 1}" for i in range(GRID_PER_CLASS)] + [f"synthetic {i + 1}" for i in range(GRID_PER_CLASS)]
    return image_grid(rows, os.path.join(local_dir, "samples.png"), row_labels=labels, col_labels=cols)


def gpu_hours_estimate(cfg: RunConfig, mfu: float = 0.4) -> dict:
    """GPU-hours to synthesise ImageNet-1K × mult with SD v1.5 on H100 at an assumed MFU.

    FLOPs per image follow the method notes (UNet step with CFG ≈ 1.61 TFLOP, VAE decode ≈ 2.5 TFLOP).
    """
    g = cfg.generate
    per_image = img2img_flops(g.steps, g.strength if g.mode == "img2img" else 1.0, cfg=g.guidance_scale > 1.0)
    images = IMAGENET_TRAIN_IMAGES * g.mult
    seconds = images * per_image / (H100_BF16_PEAK * mfu)
    return {
        "images": images,
        "tflop_per_image": round(per_image / 1e12, 2),
        "assumed_mfu": mfu,
        "h100_gpu_hours": round(seconds / 3600, 1),
    }


def _upload_png(local: str | None, cfg: RunConfig, name: str) -> str | None:
    if not local or not os.path.exists(local):
        return None
    storage.upload_file(local, storage.join(cfg.out, name))
    return name


def _accuracy_rows(cfg: RunConfig) -> list[dict]:
    rows = []
    for url in storage.find(storage.join(cfg.out, "classifier")):
        if not url.endswith("/metrics.json"):
            continue
        m = storage.read_json(url)
        for set_name, res in (m.get("sets") or {}).items():
            rows.append({"source": m.get("source"), "arch": m.get("arch"), "set": set_name,
                         "top1": res.get("top1"), "top5": res.get("top5"), "count": res.get("count")})
    return rows


def _mmd_rows(cfg: RunConfig) -> list[dict]:
    rows = []
    for url in storage.find(storage.join(cfg.out, "classifier")):
        if url.endswith("/metrics.json"):
            dist = storage.read_json(url).get("distribution")
            if dist:
                nn = dist.get("nn", {})
                rows.append({"kernel": dist.get("kernel"), "mmd2": dist.get("mmd2"),
                             "mean_class_mmd2": dist.get("mean_class_mmd2"),
                             "near_copies": nn.get("count"), "nn_threshold": nn.get("threshold")})
    return rows


def _bank_summary(meta: dict) -> dict:
    return {
        "resolution": meta["resolution"],
        "latent_shape": meta["latent_shape"],
        "splits": {s: {"rows": v["rows"], "skipped": v["skipped"]} for s, v in meta["splits"].items()},
    }


def write_report(cfg: RunConfig, summary: dict) -> dict:
    """Write ``report.md``/``report.json`` (and PNGs) below ``cfg.out``; returns the JSON report."""
    from realfake_ray.plots import markdown_table

    times = _stage_times(cfg, summary)
    meta = _read_json(storage.join(cfg.out, "latents", "_meta.json"))
    finetune_done = _read_json(storage.join(cfg.out, "finetune", "_done.json"))
    synth = _read_json(storage.join(cfg.out, "synthetic", "_summary.json"))
    report = {
        "out": cfg.out,
        "stages": times,
        "latent_bank": _bank_summary(meta) if meta else None,
        "finetune": finetune_done,
        "synthesis": synth,
        "accuracy": _accuracy_rows(cfg),
        "distribution": _mmd_rows(cfg),
        "imagenet_estimate": gpu_hours_estimate(cfg),
        "pictures": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        if meta and synth:
            report["pictures"]["samples"] = _upload_png(_sample_grid(cfg, meta, tmp), cfg, "samples.png")
    if storage.exists(storage.join(cfg.out, "finetune", "loss.png")):
        report["pictures"]["finetune_loss"] = "finetune/loss.png"
    storage.write_json(storage.join(cfg.out, "report.json"), report)
    storage.write_text(storage.join(cfg.out, "report.md"), _markdown(cfg, report, markdown_table))
    return report


def _markdown(cfg: RunConfig, report: dict, table) -> str:
    lines = [f"# realfake-ray run report\n\nRun: `{cfg.out}`\n", "## Stages\n"]
    lines.append(table([{"stage": k, **v} for k, v in report["stages"].items()], ["stage", "seconds", "skipped"]))
    if report["latent_bank"]:
        bank = report["latent_bank"]
        lines += [f"\n## Latent bank\n\n{bank['resolution']} px, latents {bank['latent_shape']}\n",
                  table([{"split": s, **v} for s, v in bank["splits"].items()])]
    if report["finetune"]:
        cols = ["step", "final_loss", "samples_per_s", "train_seconds", "num_workers", "resumed_from"]
        lines += ["\n## Fine-tuning\n", table([report["finetune"]], cols)]
        if "finetune_loss" in report["pictures"]:
            lines.append("\n![fine-tuning loss](finetune/loss.png)\n")
    if report["synthesis"]:
        cols = ["count", "expected", "generated_now", "already_present", "failed", "images_per_s", "wall_s", "mult"]
        lines += ["\n## Synthesis\n", table([report["synthesis"]], cols)]
    if report["pictures"].get("samples"):
        lines.append("\n![real vs synthetic samples per class](samples.png)\n")
    if report["accuracy"]:
        lines += ["\n## Accuracy\n", table(report["accuracy"])]
    if report["distribution"]:
        lines += ["\n## Real vs synthetic distribution (CLIP space)\n", table(report["distribution"])]
    est = report["imagenet_estimate"]
    lines += [
        "\n## Cost at ImageNet-1K scale (estimate)\n",
        f"{est['images']:,} images × {est['tflop_per_image']} TFLOP (SD v1.5, this run's sampler settings) "
        f"at {est['assumed_mfu']:.0%} MFU on H100 (989 TFLOP/s bf16) ≈ **{est['h100_gpu_hours']} GPU-hours**.\n",
        "\n## Resolved config\n\n```yaml\n" + dump_config(cfg) + "```\n",
    ]
    return "\n".join(lines)
