"""``realfake tune-sampler``: which sampler settings give the most images per second without making the
synthetic data less useful to the classifier — a Ray Tune experiment, one trial per setting.

Round 1, every setting of the grid (``tune_sampler.axes``, see :class:`~realfake_ray.config.TuneSamplerConfig`):
generate ``proxy_rows`` images from the run's latent bank with the run's LoRA (the generate stage's own
actor code), time them, and measure KID and MMD² against the real val images in the run's CLIP space.
Round 2, the reference (the paper's settings) and up to ``finalists`` settings of the round-1 Pareto front
(faster than the reference): generate ``accuracy_rows`` images, train the quick classifier on them (the
``train`` recipe, in the trial) and score top-1 on the real val images. The recommendation is the fastest
finalist within ``tolerance`` of the reference's accuracy.

Outputs under ``<out>/tune_sampler/``: ``results.csv`` / ``results.md`` (every setting), ``pareto.png``,
``recommended.yaml`` (``--config``-ready), ``summary.json``, one JSON per finished trial in ``trials/``
(a rerun runs only the missing ones) and Ray Tune's own experiment folders in ``ray_tune/``.

Example:
    $ realfake tune-sampler --preset tiny --out runs/tiny           # after encode + finetune of runs/tiny
    $ realfake generate --preset tiny --out runs/tiny --config runs/tiny/tune_sampler/recommended.yaml
"""

from __future__ import annotations

import logging
import csv
import io
import time
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch

from realfake_ray import storage
from realfake_ray._internal.cluster import cluster_gpus, init_ray
from realfake_ray._internal.shards import part_files, read_parts, tensor_column
from realfake_ray._internal.lease import takes_run_lease
from realfake_ray.bank import class_mean_embeddings, read_bank
from realfake_ray.tools.sampler_bench import model_flops, sampler_flops
from realfake_ray.data.labelled import images_in_memory, real_set
from realfake_ray.config import ConfigError, GenerateConfig, RunConfig
from realfake_ray.method.embeddings import ClipEmbedder
from realfake_ray.tools.flops import mfu, peak_flops
from realfake_ray.stages.generate.plan import check_generate_config, check_vision_token_matches_lora, check_lora, find_lora
from realfake_ray.layout import RunLayout
from realfake_ray.method.metrics import set_distances
from realfake_ray.models import loading
from realfake_ray.plots import markdown_table, pareto_plot
from realfake_ray.tools.quick_classifier import classifier_accuracy
from realfake_ray.seeds import derive_seed
from realfake_ray.stages.generate.workers import generate_in_process
from realfake_ray.tools.tune_sampler.grid import (
    AXES,
    expand_grid,
    pick_finalists,
    recommend,
    recommendation_yaml,
    setting_id,
    setting_name,
)

__all__ = ["run_tune_sampler"]

log = logging.getLogger(__name__)

_COLUMNS = ("name", "reference", "images_per_s", "tflop_per_img", "mfu", "peak_mem_gib", "kid", "kid_std", "mmd2",
            "accuracy", "finalist", "recommended", "error", *AXES)  # fmt: skip


@dataclass
class TunePlan:
    """Everything a trial needs (shipped once through Ray's object store)."""
    cfg: dict  # the run config (JSON), generate section as the base of every setting
    lora_url: str | None
    lora_sha256: str | None
    latent_shape: list[int]
    class_means: np.ndarray | None
    proxy_units: list[dict]
    accuracy_units: list[dict]
    val_embeddings: np.ndarray
    val_images: list[np.ndarray]
    val_labels: np.ndarray
    num_classes: int
    context: dict  # what makes a stored trial result valid for this run (model, LoRA, sizes, seed)


# ------------------------------------------------------------------------------------------ planning
def grid_settings(cfg: RunConfig) -> tuple[list[dict], dict, list[str]]:
    """``(settings, reference, swept keys)``; every setting validated (ConfigError naming it) before any work."""
    ts, g = cfg.tune_sampler, cfg.generate
    unknown = sorted(set(ts.reference) - set(AXES))
    if unknown:
        raise ConfigError(f"tune_sampler.reference: unknown key(s) {unknown}; valid: {list(AXES)}")
    base = {**{k: getattr(g, k) for k in AXES}, **ts.reference}
    try:
        settings = expand_grid(ts.axes, base)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    reference = {**base, "reference": True}
    unique: dict[str, dict] = {}
    for setting in [reference, *settings]:
        _check_setting(g, setting)
        unique.setdefault(setting_id({k: setting[k] for k in AXES}), setting)
    return list(unique.values()), reference, list(ts.axes)


def _check_setting(g: GenerateConfig, setting: dict) -> None:
    values = {k: setting[k] for k in AXES}
    try:
        check_generate_config(GenerateConfig(**{**g.model_dump(), **values}))
    except (ConfigError, ValueError) as exc:
        raise ConfigError(f"tune-sampler setting {values}: {exc}") from None


def _select_rows(files: list[str], count: int, seed: int) -> list[dict]:
    """Load units (see ``generate.plan_units``) for ``count`` train-bank rows: files in a seeded order,
    a seeded subset of rows in each, until ``count`` (only the files needed are opened)."""
    rng = np.random.default_rng(derive_seed(seed, "tune-rows") % 2**63)
    units, left = [], count
    for f in rng.permutation(len(files)):
        if left <= 0:
            break
        rows = int(pq.ParquetFile(storage.open_file(files[f])).metadata.num_rows)
        take = np.sort(rng.permutation(rows)[:left]).astype(np.int32)
        units.append({"file": files[f], "copy_idx": 0, "rows": take.tobytes()})
        left -= len(take)
    return units


def _val_set(cfg: RunConfig, meta: dict) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Real val CLIP embeddings (from the bank) and real val images + labels (from ``data.val``)."""
    if not cfg.data.val or not part_files(RunLayout(cfg.out).bank_dir("val")):
        raise FileNotFoundError(
            f"tune-sampler scores settings against the real val set: set data.val and run `realfake encode` "
            f"so that {RunLayout(cfg.out).bank_dir('val')} exists"
        )
    embeds = tensor_column(read_parts(RunLayout(cfg.out).bank_dir("val"), ["clip_embed"]), "clip_embed")
    images, labels = images_in_memory(real_set(cfg.data.val, cfg, meta["class_dirs"], cfg.data.val_labels))
    return embeds, images, labels


def plan_tuning(cfg: RunConfig) -> TunePlan:
    """Validate the grid, the bank, the LoRA and the val set; no Ray."""
    ts = cfg.tune_sampler
    meta, files = read_bank(cfg.out)
    model_dir = loading.resolve_model_dir(cfg.model.pretrained, cfg.model.revision, cfg.model.hub_timeout_s)
    lora_url, lora_sha = find_lora(cfg)
    if lora_url:
        check_lora(model_dir, lora_url, lora_sha)
        check_vision_token_matches_lora(cfg)
    class_means = None
    if cfg.generate.vision_token == "class_mean":
        class_means = class_mean_embeddings(files, len(meta["class_dirs"]))
    val_embeddings, val_images, val_labels = _val_set(cfg, meta)
    bank_rows = int(meta["splits"]["train"]["rows"])
    accuracy_rows = min(ts.accuracy_rows or bank_rows, bank_rows)
    context = {"model": cfg.model.pretrained, "lora_sha256": lora_sha, "seed": cfg.seed, "mode": cfg.generate.mode,
               "vision_token": cfg.generate.vision_token, "proxy_rows": ts.proxy_rows, "accuracy_rows": accuracy_rows,
               "classifier_budget_images": ts.classifier_budget_images, "train": cfg.train.model_dump(mode="json")}
    return TunePlan(
        cfg=cfg.model_dump(mode="json"), lora_url=lora_url, lora_sha256=lora_sha, latent_shape=meta["latent_shape"],
        class_means=class_means, proxy_units=_select_rows(files, min(ts.proxy_rows, bank_rows), cfg.seed),
        accuracy_units=_select_rows(files, accuracy_rows, cfg.seed), val_embeddings=val_embeddings,
        val_images=val_images, val_labels=val_labels, num_classes=len(meta["class_dirs"]), context=context,
    )


# --------------------------------------------------------------------------------------------- trials
def _spec(plan: TunePlan) -> dict:
    return {"lora_url": plan.lora_url, "lora_sha256": plan.lora_sha256, "latent_shape": plan.latent_shape,
            "class_means": plan.class_means}


def measure(plan: TunePlan, setting: dict, phase: str) -> dict:
    """One trial: round 1 (``proxy``: images/s, KID, MMD²) or round 2 (``accuracy``: classifier top-1)."""
    cfg = RunConfig(**plan.cfg)
    cfg = cfg.model_copy(update={"generate": cfg.generate.model_copy(update={k: setting[k] for k in AXES})})
    if phase == "proxy":
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        made = generate_in_process(cfg, _spec(plan), plan.proxy_units)
        distances = set_distances(plan.val_embeddings, ClipEmbedder(cfg).embed(made.images, batch_size=256), seed=cfg.seed)
        return {"images_per_s": made.images_per_s, **_compute_columns(made), "kid": distances["kid"],
                "kid_std": distances["kid_std"], "mmd2": distances["mmd2"], "proxy_images": len(made.images)}
    images, labels, speed = generate_in_process(cfg, _spec(plan), plan.accuracy_units)[:3]
    accuracy = classifier_accuracy(images, labels, plan.val_images, plan.val_labels, cfg.train, plan.num_classes,
                                   cfg.tune_sampler.classifier_budget_images, derive_seed(cfg.seed, "tune-classifier"))
    return {"accuracy": accuracy, "accuracy_images": len(images), "accuracy_images_per_s": speed}


def _compute_columns(made) -> dict:
    """TFLOP per image (FLOP model of the UNet + VAE decode: an accelerator's skipped work still counts, so
    its MFU is an *effective* one), MFU (GPUs with a known peak) and peak GPU memory."""
    made.actor.undo_speedup()  # count the plain UNet (a cached one would replay a stale batch)
    sampler = made.actor.sampler
    device = sampler.device
    flops = sampler_flops(sampler.settings, model_flops(sampler.pipe, device, sampler.dtype))
    peak = peak_flops(device, sampler.settings.dtype)
    return {"tflop_per_img": flops / 1e12, "mfu": mfu(made.images_per_s, flops, peak) if peak else None,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


def _trial_url(out: str, phase: str, setting: dict, context: dict) -> str:
    key = setting_id({"setting": {k: setting[k] for k in AXES}, "context": context})
    return RunLayout(out).tune_dir("trials", f"{phase}-{key}.json")


def _trial(config: dict, plan: TunePlan) -> dict:
    """Ray Tune function trainable: measure, store the row (a failing setting stores its error), report."""
    setting, phase = config["setting"], config["phase"]
    url = _trial_url(plan.cfg["out"], phase, setting, plan.context)
    try:
        row = measure(plan, setting, phase)
    except Exception as exc:  # a setting that does not work here is a row saying so, not a crashed sweep
        row = {"error": f"{type(exc).__name__}: {exc}"[:400]}
    storage.write_json(url, {"phase": phase, "setting": setting, **row})
    shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
    log.info(f"{phase} {setting['name']}: {shown}")
    return {k: v for k, v in row.items() if isinstance(v, (int, float, str))}


def _trial_resources(cfg: RunConfig) -> dict:
    import ray

    ts = cfg.tune_sampler
    gpus = (1.0 if cluster_gpus() > 0 else 0.0) if ts.gpus_per_trial == "auto" else float(ts.gpus_per_trial)
    if ts.cpus_per_trial is not None:
        cpus = ts.cpus_per_trial
    elif gpus:
        cpus = 1.0
    else:  # timings must not share cores: one CPU trial per node, with all of its CPUs
        cpus = max(float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"])
    return {"cpu": cpus, "gpu": gpus}


def _run_round(cfg: RunConfig, plan: TunePlan, settings: list[dict], phase: str) -> dict[str, dict]:
    """Run the trials of ``phase`` that have no stored result (a Ray Tune experiment); return every row by id."""
    from ray import tune

    missing = [s for s in settings if not storage.exists(_trial_url(cfg.out, phase, s, plan.context))]
    log.info(f"{phase}: {len(settings)} settings, {len(settings) - len(missing)} stored, "
             f"{len(missing)} to run")
    if missing:
        init_ray(cfg.ray)
        fs, path = storage.arrow_filesystem(RunLayout(cfg.out).tune_dir("ray_tune"))
        name = f"{phase}-{time.strftime('%Y%m%d-%H%M%S')}"
        log.info(f"Ray Tune experiment {RunLayout(cfg.out).tune_dir('ray_tune', name)}")
        trainable = tune.with_resources(tune.with_parameters(_trial, plan=plan), _trial_resources(cfg))
        tuner = tune.Tuner(
            trainable,
            param_space={"phase": phase, "setting": tune.grid_search(missing)},
            run_config=tune.RunConfig(name=name, storage_path=path, storage_filesystem=fs,
                                      verbose=2 if cfg.ray.verbose else 0),  # else one line per trial (ours)
            tune_config=tune.TuneConfig(reuse_actors=True),
        )
        tuner.fit()
    rows = {}
    for s in settings:
        url = _trial_url(cfg.out, phase, s, plan.context)
        if not storage.exists(url):
            raise RuntimeError(f"tune-sampler: the {phase} trial of {s} stored no result (see {RunLayout(cfg.out).tune_dir('ray_tune')})")
        rows[setting_id({k: s[k] for k in AXES})] = storage.read_json(url)
    return rows


# --------------------------------------------------------------------------------------------- outputs
def _csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(_COLUMNS), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _write_outputs(cfg: RunConfig, rows: list[dict], best: dict | None, reference: dict) -> dict:
    ts = cfg.tune_sampler
    table = markdown_table([{k: r.get(k) for k in _COLUMNS if k not in AXES or k in ts.axes} for r in rows])
    storage.write_text(RunLayout(cfg.out).tune_dir("results.csv"), _csv(rows))
    storage.write_text(RunLayout(cfg.out).tune_dir("results.md"), table + "\n")
    with storage.written_from_local(RunLayout(cfg.out).tune_dir("pareto.png")) as png:
        pareto_plot(rows, png)
    summary = {"settings": len(rows), "finalists": sum(bool(r.get("finalist")) for r in rows),
               "reference": reference.get("name"), "recommended": best and best["name"],
               "tolerance": ts.tolerance, "results": RunLayout(cfg.out).tune_dir("results.md")}
    if best is not None:
        ref = next(r for r in rows if r.get("reference"))
        summary.update(speedup=round(best["images_per_s"] / ref["images_per_s"], 3),
                       accuracy=best["accuracy"], reference_accuracy=ref["accuracy"])
        comment = (f"realfake tune-sampler: {best['images_per_s']:.3g} images/s = {summary['speedup']:.2f}x the "
                   f"paper's settings, classifier top-1 {best['accuracy']:.4f} vs {ref['accuracy']:.4f} "
                   f"(tolerance {ts.tolerance}); model {cfg.model.pretrained}, out {cfg.out}")
        storage.write_text(RunLayout(cfg.out).tune_dir("recommended.yaml"), recommendation_yaml(best, comment) + "\n")
        summary["recommended_yaml"] = RunLayout(cfg.out).tune_dir("recommended.yaml")
    storage.write_json(RunLayout(cfg.out).tune_dir("summary.json"), summary)
    print("\n" + table, flush=True)
    return summary


@takes_run_lease
def run_tune_sampler(cfg: RunConfig) -> dict:
    """Run both rounds (stored trials are not rerun), write the table, the front and the recommendation.

    Example:
        >>> run_tune_sampler(load_config(preset="tiny", out="runs/tiny"))["recommended"]  # doctest: +SKIP
        'ddim/15/deepcache:3'
    """
    settings, reference, swept = grid_settings(cfg)
    plan = plan_tuning(cfg)
    for s in settings:
        s["name"] = ("reference: " if s.get("reference") else "") + setting_name(s, swept)
    proxy = _run_round(cfg, plan, settings, "proxy")
    rows = []
    for s in settings:
        stored = proxy[setting_id({k: s[k] for k in AXES})]
        rows.append({**s, **{k: v for k, v in stored.items() if k not in ("phase", "setting")}})
    if rows[0].get("error"):
        raise RuntimeError(f"tune-sampler: the reference setting failed: {rows[0]['error']}")
    finalists = pick_finalists([r for r in rows if not r.get("error")], cfg.tune_sampler.finalists)
    accuracy = _run_round(cfg, plan, finalists, "accuracy")
    for r in rows:
        stored = accuracy.get(setting_id({k: r[k] for k in AXES})) if r in finalists else None
        if stored is not None:
            r.update(finalist=True, accuracy=stored.get("accuracy"), error=r.get("error") or stored.get("error"))
    best = recommend([r for r in rows if not r.get("error")], cfg.tune_sampler.tolerance)
    if best is not None:
        best["recommended"] = True
    rows.sort(key=lambda r: (not r.get("reference"), -(r.get("images_per_s") or 0)))
    return _write_outputs(cfg, rows, best, reference)
