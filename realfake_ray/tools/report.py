"""The run report: ``<out>/report.md`` + ``report.json`` + pictures, rebuilt from what the stages wrote.

The report reads each stage's own output files (bank meta, fine-tune metrics, synthesis summary and a few
rows of its shards, classifier metrics), so a resubmitted job whose stages all skip still reports everything.
Per-stage wall times of the runs that did the work are kept in ``<out>/_stages.json``.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from realfake_ray import storage
from realfake_ray._internal.tracking import log_report
from realfake_ray.config import RunConfig, dump_config
from realfake_ray.data.imagefolder import decode_image
from realfake_ray.data.sources import detect_layout, read_images_by_id
from realfake_ray.data.synthetic import list_shards, sample_per_class
from realfake_ray.tools.flops import img2img_flops
from realfake_ray.layout import RunLayout
from realfake_ray.plots import image_grid, markdown_table, plot_curves, timeline_plot
from realfake_ray.stages.registry import COMMANDS

__all__ = ["write_report"]

IMAGENET_TRAIN_IMAGES = 1_281_167
H100_BF16_PEAK = 989e12
GRID_PER_CLASS = 4
GRID_MAX_CLASSES = 10


def _read_json(url: str) -> dict | None:
    return storage.read_json(url) if storage.exists(url) else None


def _stage_times(cfg: RunConfig, summary: dict) -> dict:
    """Merge this run's stage timings into ``_stages.json`` (skipped stages keep the earlier timing)."""
    url = RunLayout(cfg.out).file("_stages.json")
    times = _read_json(url) or {}
    for stage, info in summary.items():
        if not info["skipped"] or stage not in times:
            times[stage] = {"seconds": info["seconds"], "skipped": info["skipped"]}
        else:
            times[stage]["skipped_last_run"] = True
    storage.write_json(url, times)
    return times


def _thumbnail(data: bytes, size: int) -> np.ndarray:
    return decode_image(data, size)[0]


def _sample_grid(cfg: RunConfig, meta: dict, local_dir: str) -> str | None:
    """Per class: a few real images, then the synthetic images generated from them (column "synthetic i" is a
    copy of "real i"). A few row groups of the first shards name and hold them; the real ones are read by id."""

    shards = list_shards(RunLayout(cfg.out).shards_dir())
    fakes = sample_per_class(shards.below_copy(1) if 0 in shards.copies else shards, GRID_PER_CLASS, GRID_MAX_CLASSES)
    if not fakes:
        return None
    data = cfg.require_data()
    real = read_images_by_id(data.train, detect_layout(data.train, data.train_labels), [r["image_id"] for r in fakes])
    rows, labels, cols = _grid_cells(fakes, real, meta["class_names"], lambda data: _thumbnail(data, min(cfg.encode.resolution, 128)))
    return image_grid(rows, os.path.join(local_dir, "samples.png"), row_labels=labels, col_labels=cols) if rows else None


def _grid_cells(fakes: list[dict], real: dict[str, bytes], class_names: list[str], thumbnail) -> tuple[list, list, list]:
    """``(rows, row labels, column labels)`` of the sample grid: per class its real images, then their synthetic
    copies in the same order, as many columns of each as the class with most (a class with fewer leaves blanks,
    so that "synthetic i" always sits under the copy of "real i").

    Example:
        >>> fakes = [{"label": 0, "image_id": "a", "bytes": b"A'"}, {"label": 1, "image_id": "b", "bytes": b"B'"},
        ...          {"label": 1, "image_id": "c", "bytes": b"C'"}]
        >>> _grid_cells(fakes, {"a": b"A", "b": b"B", "c": b"C"}, ["zero", "one"], lambda data: data)
        ([[b'A', None, b"A'", None], [b'B', b'C', b"B'", b"C'"]], ['zero', 'one'], ['real 1', 'real 2', 'synthetic 1', 'synthetic 2'])
    """
    picked = {}
    for label in sorted({r["label"] for r in fakes}):
        found = [r for r in fakes if r["label"] == label and r["image_id"] in real]
        if found:
            picked[label] = found
    width = max((len(found) for found in picked.values()), default=0)
    pad = [None] * width
    rows = [([thumbnail(real[r["image_id"]]) for r in found] + pad)[:width] + ([thumbnail(r["bytes"]) for r in found] + pad)[:width]
            for found in picked.values()]
    cols = [f"real {i + 1}" for i in range(width)] + [f"synthetic {i + 1}" for i in range(width)]
    return rows, [class_names[label] for label in picked], cols


def gpu_hours_estimate(cfg: RunConfig, synthesis: dict | None = None, mfu: float = 0.4) -> dict:
    """GPU-hours to synthesise ImageNet-1K × ``generate.mult`` images.

    ``measured``: from this run's own per-GPU sampling rate (``sampler_images_per_s`` of a GPU run of a
    real model). ``flop_model``: always, from counted FLOPs per image at this run's sampler settings and at
    the paper's (30 UniPC steps at strength 0.75 = 22 CFG UNet calls ≈ 1.61 TFLOP each + VAE decode
    ≈ 2.5 TFLOP, SD v1.5 at 512²) on an H100 (989 TFLOP/s dense bf16) at an assumed ``mfu``.
    """
    g = cfg.generate
    images = IMAGENET_TRAIN_IMAGES * g.mult

    def hours(tflop: float) -> float:
        return round(images * tflop * 1e12 / (H100_BF16_PEAK * mfu) / 3600, 1)

    this_run = img2img_flops(g.steps, g.strength if g.mode == "img2img" else 1.0, cfg=g.guidance_scale > 1.0) / 1e12
    paper = img2img_flops(30, 0.75, cfg=True) / 1e12
    estimate = {
        "images": images,
        "flop_model": {"assumed_mfu": mfu, "tflop_per_image": round(this_run, 2), "h100_gpu_hours": hours(this_run),
                       "paper_tflop_per_image": round(paper, 2), "paper_h100_gpu_hours": hours(paper)},
        "measured": None,
    }
    rate, gpus = (synthesis or {}).get("sampler_images_per_s"), (synthesis or {}).get("gpus_per_actor")
    if rate and gpus and cfg.preset is None:
        estimate["measured"] = {"images_per_s_per_actor": rate, "gpus_per_actor": gpus,
                                "gpu_hours": round(images / rate * gpus / 3600, 1)}
    return estimate


def _upload_png(local: str | None, cfg: RunConfig, name: str) -> str | None:
    if not local or not os.path.exists(local):
        return None
    storage.upload_file(local, RunLayout(cfg.out).file(name))
    return name


def _classifiers(cfg: RunConfig) -> list[tuple[str, str, dict, dict]]:
    """``(name, directory, metrics.json, _done.json)`` of every evaluated classifier below ``<out>/classifier``
    (name: its ``train.tag``, or ``default`` for the untagged one)."""
    root = RunLayout(cfg.out).classifier_dir()
    found = []
    for url in storage.find(root):
        if url.endswith("/metrics.json"):
            cdir = url.rsplit("/", 1)[0]
            name = storage.relative(cdir, root)
            found.append(("default" if name == "." else name, cdir, storage.read_json(url),
                          _read_json(storage.join(cdir, "_done.json")) or {}))
    return sorted(found, key=lambda item: item[0])


def _accuracy_rows(classifiers: list[tuple[str, str, dict, dict]]) -> list[dict]:
    rows = []
    for name, _, metrics, done in classifiers:
        for set_name, res in (metrics.get("sets") or {}).items():
            rows.append({"classifier": name, "source": metrics.get("source"), "arch": metrics.get("arch"),
                         "real_images": done.get("real_images"), "synthetic_images": done.get("synthetic_images"),
                         "epochs": metrics.get("epochs"), "set": set_name,
                         "top1": res.get("top1"), "top5": res.get("top5"), "count": res.get("count"),
                         # the epoch-to-epoch steadier statistic: mean val top-1 of the last 5 epochs (train's run)
                         "val_top1_last5": done.get("val_top1_last5") if set_name == "val" else None})
    return rows


def _mmd_rows(classifiers: list[tuple[str, str, dict, dict]]) -> list[dict]:
    rows = []
    for name, _, metrics, _ in classifiers:
        dist = metrics.get("distribution")
        if dist and "skipped" not in dist:
            nn = dist.get("nn", {})
            rows.append({"classifier": name, "kernel": dist.get("kernel"), "mmd2": dist.get("mmd2"),
                         "mean_class_mmd2": dist.get("mean_class_mmd2"), "near_copies": nn.get("count"),
                         "nn_threshold": nn.get("threshold")})
    return rows


def _scaling_plot(accuracy: list[dict], local_dir: str) -> str | None:
    """Val top-1 against the training images of each classifier, one line per source (≥ 2 classifiers)."""

    points = [{"training images": (r["real_images"] or 0) + (r["synthetic_images"] or 0), r["source"]: r["top1"]}
              for r in accuracy if r["set"] == "val" and r["top1"] is not None]
    if len(points) < 2:
        return None
    sources = sorted({k for p in points for k in p if k != "training images"})
    return plot_curves(points, "training images", sources, os.path.join(local_dir, "scaling.png"),
                       title="val top-1 vs training images", logx=True)


def _throughput(captions: dict | None, meta: dict | None, finetune: dict | None, synthesis: dict | None,
                classifiers: list) -> list[dict]:
    rows = []
    if captions and captions.get("images_per_s"):
        rows.append({"stage": "caption", "rate": captions["images_per_s"], "unit": "images/s"})
    if meta and meta.get("last_run", {}).get("images_per_s"):
        rows.append({"stage": "encode", "rate": meta["last_run"]["images_per_s"], "unit": "images/s"})
    if finetune and finetune.get("samples_per_s"):
        rows.append({"stage": "finetune", "rate": finetune["samples_per_s"], "unit": "samples/s (all workers)"})
    if synthesis and synthesis.get("images_per_s"):
        rows.append({"stage": "generate", "rate": synthesis["images_per_s"], "unit": "images/s end to end"})
        if synthesis.get("sampler_images_per_s"):
            rows.append({"stage": "generate", "rate": synthesis["sampler_images_per_s"], "unit": "images/s per actor while sampling"})
    for name, _, _, done in classifiers:
        last = done.get("last_epoch") or {}
        if last.get("images_per_s"):
            rows.append({"stage": f"train ({name})", "rate": round(last["images_per_s"], 1),
                         "unit": f"images/s (last epoch, {last.get('workers')} workers)"})
    return rows


def _bank_summary(meta: dict) -> dict:
    return {
        "resolution": meta["resolution"],
        "latent_shape": meta["latent_shape"],
        "splits": {s: {"rows": v["rows"], "skipped": v["skipped"]} for s, v in meta["splits"].items()},
    }


def write_report(cfg: RunConfig, summary: dict) -> dict:
    """Write ``report.md``/``report.json`` (and PNGs) below ``cfg.out``; returns the JSON report."""

    times = _stage_times(cfg, summary)
    captions = _read_json(RunLayout(cfg.out).captions_dir("_summary.json"))
    meta = _read_json(RunLayout(cfg.out).meta_url())
    finetune_done = _read_json(storage.join(RunLayout(cfg.out).finetune_dir(), "_done.json"))
    synth = _read_json(RunLayout(cfg.out).synthetic_dir("_summary.json"))
    classifiers = _classifiers(cfg)
    report = {
        "out": cfg.out,
        "stages": times,
        "captions": {k: captions.get(k) for k in ("images", "captions", "unreadable", "settings")} if captions else None,
        "latent_bank": _bank_summary(meta) if meta else None,
        "finetune": finetune_done,
        "synthesis": synth,
        "throughput": _throughput(captions, meta, finetune_done, synth, classifiers),
        "accuracy": _accuracy_rows(classifiers),
        "distribution": _mmd_rows(classifiers),
        "imagenet_estimate": gpu_hours_estimate(cfg, synth),
        "audit": _read_json(RunLayout(cfg.out).audit_dir("summary.json")),  # realfake audit-privacy
        "pictures": {},
        "config": cfg.model_dump(mode="json"),
    }
    previous = _read_json(RunLayout(cfg.out).report_url("json")) or {}
    with tempfile.TemporaryDirectory() as tmp:
        if meta and synth:
            # the grid is drawn once per synthetic set (its count and settings), not at every report rewrite
            made_from = [synth.get("count"), synth.get("settings")]
            report["pictures"]["samples_of"] = made_from
            if previous.get("pictures", {}).get("samples_of") == made_from and storage.exists(RunLayout(cfg.out).file("samples.png")):
                report["pictures"]["samples"] = "samples.png"
            else:
                report["pictures"]["samples"] = _upload_png(_sample_grid(cfg, meta, tmp), cfg, "samples.png")
        report["pictures"]["scaling"] = _upload_png(_scaling_plot(report["accuracy"], tmp), cfg, "scaling.png")
        if synth and len(synth.get("timeline") or []) > 1:
            firsts = [a["first_batch_t"] for a in synth.get("actors") or [] if a.get("first_batch_t") is not None]
            local = timeline_plot(synth["timeline"], os.path.join(tmp, "synthesis_timeline.png"), first_batches=firsts)
            report["pictures"]["synthesis_timeline"] = _upload_png(local, cfg, "synthesis_timeline.png")
    if storage.exists(storage.join(RunLayout(cfg.out).finetune_dir(), "loss.png")):
        report["pictures"]["finetune_loss"] = "finetune/loss.png"
    for name, cdir, _, _ in classifiers:
        curves = storage.join(cdir, "curves.png")
        if storage.exists(curves):
            report["pictures"][f"curves_{name}"] = storage.relative(curves, cfg.out)
    storage.write_json(RunLayout(cfg.out).report_url("json"), report)
    storage.write_text(RunLayout(cfg.out).report_url("md"), _markdown(cfg, report, markdown_table))
    pictures = [storage.join(cfg.out, p) for p in report["pictures"].values() if isinstance(p, str) and p.endswith(".png")]
    log_report(cfg, [RunLayout(cfg.out).report_url("md"), *pictures])  # MLflow, if on
    return report


def _heading(command: str) -> str:
    """The heading of a command's section (its registry entry's ``report``)."""
    return f"\n## {COMMANDS[command].report}\n"


def _markdown(cfg: RunConfig, report: dict, table) -> str:
    lines = [f"# realfake-ray run report\n\nRun: `{cfg.out}`\n", "## Stages\n"]
    lines.append(table([{"stage": k, **v} for k, v in report["stages"].items()], ["stage", "seconds", "skipped"]))
    if report.get("captions"):
        made = report["captions"]
        lines += [_heading("caption") + f"\n{made['settings']['model']}, at most {made['settings']['max_tokens']} "
                  f"tokens per caption\n", table([made], ["images", "captions", "unreadable"])]
    if report["latent_bank"]:
        bank = report["latent_bank"]
        lines += [_heading("encode") + f"\n{bank['resolution']} px, latents {bank['latent_shape']}\n",
                  table([{"split": s, **v} for s, v in bank["splits"].items()])]
    if report["finetune"]:
        cols = ["step", "final_loss", "samples_per_s", "train_seconds", "num_workers", "resumed_from"]
        lines += [_heading("finetune"), table([report["finetune"]], cols)]
        if "finetune_loss" in report["pictures"]:
            lines.append("\n![fine-tuning loss](finetune/loss.png)\n")
    if report["synthesis"]:
        cols = ["count", "expected", "generated_now", "already_present", "failed", "images_per_s", "wall_s", "mult"]
        lines += [_heading("generate"), table([report["synthesis"]], cols)]
        if report["pictures"].get("synthesis_timeline"):
            lines.append("\n![nodes, actors and images/s while generating](synthesis_timeline.png)\n")
    if report["pictures"].get("samples"):
        lines.append("\n![real vs synthetic samples per class](samples.png)\n")
    if report["throughput"]:
        lines += ["\n## Throughput (this run's hardware)\n", table(report["throughput"])]
    if report["accuracy"]:
        lines += [_heading("train"), table(report["accuracy"])]
        if report["pictures"].get("scaling"):
            lines.append("\n![val top-1 vs training images](scaling.png)\n")
        for key, path in report["pictures"].items():
            if key.startswith("curves_"):
                lines.append(f"\n![{key[7:]} classifier curves]({path})\n")
    if report["distribution"]:
        lines += [_heading("evaluate"), table(report["distribution"])]
    audit_md = RunLayout(cfg.out).audit_dir("audit.md")
    if report.get("audit") and storage.exists(audit_md):
        lines += [_heading("audit-privacy"), storage.read_text(audit_md).rstrip(),
                  "\n![ROC](audit_privacy/roc.png)\n"]
    lines += ["\n## Cost at ImageNet-1K scale (estimate)\n", _cost_text(report["imagenet_estimate"])]
    lines.append("\n## Resolved config\n\n```yaml\n" + dump_config(cfg) + "```\n")
    return "\n".join(lines)


def _cost_text(est: dict) -> str:
    flops = est["flop_model"]
    text = (
        f"{est['images']:,} images (ImageNet-1K × mult). FLOP model, SD v1.5 at 512² on H100 (989 TFLOP/s dense "
        f"bf16) at an assumed {flops['assumed_mfu']:.0%} MFU: **{flops['h100_gpu_hours']} GPU-hours** at this run's "
        f"sampler settings ({flops['tflop_per_image']} TFLOP/image), {flops['paper_h100_gpu_hours']} GPU-hours at the "
        f"paper's ({flops['paper_tflop_per_image']} TFLOP/image).\n"
    )
    measured = est.get("measured")
    if measured:
        text += (f"\nMeasured in this run: {measured['images_per_s_per_actor']} images/s per actor "
                 f"({measured['gpus_per_actor']:g} GPU each) → **{measured['gpu_hours']} GPU-hours**.\n")
    else:
        text += "\nNo measured figure: this run's synthesis did not run a real model on GPUs.\n"
    return text
