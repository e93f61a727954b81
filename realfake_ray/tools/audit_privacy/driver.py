"""``realfake audit-privacy``: does a classifier trained on the synthetic data leak less about the real
training images than one trained on the real images? A shadow-model membership-inference audit.

For each arm (``real``, ``synthetic``) K shadow runs each see a random half of the real train set
(:func:`~realfake_ray.tools.audit_privacy.lira.shadow_masks`): the real arm trains the quick classifier on that half; the
synthetic arm runs the *whole* pipeline on it — a bank of only that half, fine-tuning (the finetune stage),
generation (the generate stage, 1x) and the quick classifier on the generated images. Every shadow's
classifier is then queried on every real train image; the offline likelihood-ratio attack
(:func:`~realfake_ray.tools.audit_privacy.lira.lira_offline`) scores membership, each shadow in turn being the target.
Generator side: CLIP-space distances of synthetic images to their source image and to the closest other
real image, at each ``generate.strength`` of ``audit_privacy.strengths``.

The quick classifiers train in parallel as Ray tasks; the stages use Ray as they always do. Every shadow
stores its result as it finishes (``<out>/audit_privacy/<arm>/shadow_<k>.npz``) and every stage of a
synthetic shadow resumes, so a rerun continues where the last one stopped. Outputs: ``summary.json``,
``audit.md``, ``roc.png`` under ``<out>/audit_privacy/``; an existing run report is rewritten with an
"Audit" section.

Example:
    $ realfake audit-privacy --preset tiny --out runs/tiny     # after `realfake encode` (and finetune) of runs/tiny
"""

from __future__ import annotations

import logging
import io
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from realfake_ray import storage
from realfake_ray._internal.cluster import init_ray
from realfake_ray._internal.lease import takes_run_lease
from realfake_ray._internal.shards import part_files, read_parts, tensor_column
from realfake_ray.bank import read_bank, read_meta, write_train_subset
from realfake_ray.config import ConfigError, RunConfig
from realfake_ray.data.imagefolder import open_rgb
from realfake_ray.data.labelled import images_in_memory, real_set, synthetic_set
from realfake_ray.data.sources import detect_layout, read_images_by_id
from realfake_ray.method.embeddings import ClipEmbedder
from realfake_ray.stages.finetune.driver import run_finetune
from realfake_ray.stages.generate.driver import run_generate
from realfake_ray.stages.generate.plan import find_lora
from realfake_ray.layout import RunLayout
from realfake_ray.plots import markdown_table, roc_plot
from realfake_ray.tools.audit_privacy.lira import attack_summary, copy_distances, copy_summary, lira_offline, roc_points, shadow_masks
from realfake_ray.tools.quick_classifier import margins, top1, train_quick
from realfake_ray.tools.report import write_report
from realfake_ray.seeds import derive_seed
from realfake_ray.stages.generate.workers import generate_in_process

__all__ = ["run_audit_privacy"]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ data
def _bank(cfg: RunConfig) -> tuple[dict, pa.Table]:
    """The bank's meta and its whole train split (row order = the audit's example order)."""
    meta, _ = read_bank(cfg.out)
    return meta, read_parts(RunLayout(cfg.out).bank_dir("train"))


def _real_train_images(cfg: RunConfig, meta: dict, image_ids: list[str]) -> np.ndarray:
    data = cfg.require_data()
    try:
        found = read_images_by_id(data.train, detect_layout(data.train, data.train_labels), image_ids)
    except FileNotFoundError:
        found = {}
    missing = [i for i in image_ids if i not in found]
    if missing:
        raise FileNotFoundError(f"{len(missing)} bank images are not in data.train={cfg.data.train} (e.g. {missing[0]}): "
                                "audit the run with the dataset it was encoded from")
    images = [np.array(open_rgb(found[i])) for i in image_ids]
    if len({im.shape for im in images}) != 1:
        raise ValueError("audit-privacy needs train images of one size (the quick classifier batches them in memory)")
    return np.stack(images)


def _val(cfg: RunConfig, meta: dict) -> tuple[list[np.ndarray], np.ndarray]:
    if not cfg.data.val:
        raise ConfigError("audit-privacy reports each arm's val accuracy: set data.val")
    return images_in_memory(real_set(cfg.data.val, cfg, meta["class_dirs"], cfg.data.val_labels))


# ---------------------------------------------------------------------------------------------- shadows
def _shadow_url(cfg: RunConfig, arm: str, k: int) -> str:
    return RunLayout(cfg.out).audit_dir(arm, f"shadow_{k}.npz")


def _save(url: str, **arrays) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    storage.write_bytes(url, buffer.getvalue())


def _load(url: str) -> dict:
    with np.load(io.BytesIO(storage.read_bytes(url))) as data:
        return {k: data[k] for k in data.files}


def _judge(train_images, train_labels, real_images, real_labels, val_images, val_labels, train_cfg, num_classes,
           budget, seed) -> dict:
    """Ray task body: the quick classifier on one shadow's images → φ on every real train image, val top-1."""
    model = train_quick(train_images, train_labels, train_cfg, num_classes, budget, seed)
    return {"phi": margins(model, real_images, real_labels, train_cfg),
            "val_top1": np.float64(top1(model, val_images, val_labels, train_cfg))}


def _shadow_cfg(cfg: RunConfig, k: int) -> RunConfig:
    """The config of synthetic shadow ``k``: its own run folder and seed, mult 1, the run's other settings."""
    out = RunLayout(cfg.out).audit_dir("synthetic", f"shadow_{k}")
    generate = cfg.generate.model_copy(update={"mult": 1})
    return cfg.model_copy(update={"out": out, "seed": derive_seed(cfg.seed, "audit-shadow", k) % 2**31,
                                  "generate": generate})


def _write_shadow_bank(cfg: RunConfig, shadow: RunConfig, bank: pa.Table, mask: np.ndarray) -> None:
    """``<shadow>/latents``: the bank's rows in ``mask`` (train) — the only real data the shadow pipeline sees."""
    if part_files(RunLayout(shadow.out).bank_dir("train")) and storage.exists(RunLayout(shadow.out).meta_url()):
        return
    write_train_subset(cfg.out, shadow.out, bank, mask)


def _synthetic_set(shadow: RunConfig) -> tuple[np.ndarray, np.ndarray]:
    """Fine-tune and generate in the shadow's folder (both stages resume / skip), then load its images."""
    if shadow.generate.use_lora:
        run_finetune(shadow)
    run_generate(shadow)
    meta = read_meta(shadow.out)
    images, labels = images_in_memory(synthetic_set(shadow, meta["class_dirs"], meta["class_names"]))
    return np.stack(images), labels


def _run_arm(cfg: RunConfig, arm: str, masks: np.ndarray, bank: pa.Table, real: tuple, val: tuple,
             num_classes: int) -> list[dict]:
    """Every shadow of ``arm`` (stored ones are read back); quick classifiers as parallel Ray tasks."""
    import ray
    from tqdm.auto import tqdm

    ap = cfg.audit_privacy
    real_images, real_labels = real
    pending = [k for k in range(len(masks)) if not storage.exists(_shadow_url(cfg, arm, k))]
    log.info(f"{arm}: {len(masks)} shadows, {len(masks) - len(pending)} stored, {len(pending)} to run")
    if pending:
        init_ray(cfg.ray)
        judge = ray.remote(num_cpus=ap.cpus_per_task)(_judge)
        shared = [ray.put(x) for x in (real_images, real_labels, val[0], val[1])]
        futures = {}
        for k in pending:
            if arm == "real":
                images, labels = real_images[masks[k]], real_labels[masks[k]]
            else:
                shadow = _shadow_cfg(cfg, k)
                _write_shadow_bank(cfg, shadow, bank, masks[k])
                images, labels = _synthetic_set(shadow)
            seed = derive_seed(cfg.seed, "audit-classifier", arm, k) % 2**31
            futures[judge.remote(images, labels, *shared, cfg.train, num_classes, ap.classifier_budget_images, seed)] = k
        remaining = list(futures)
        with tqdm(total=len(remaining), desc=f"audit {arm} classifiers", disable=not os.isatty(1)) as bar:
            while remaining:
                done, remaining = ray.wait(remaining, num_returns=1)
                result = ray.get(done[0])
                _save(_shadow_url(cfg, arm, futures[done[0]]), **result)
                bar.update(1)
    return [_load(_shadow_url(cfg, arm, k)) for k in range(len(masks))]


# ------------------------------------------------------------------------------------ generator side
def _strength_study(cfg: RunConfig, meta: dict, bank: pa.Table) -> list[dict]:
    """Distances of generated images to their source and to the closest other real image, per strength."""
    ap = cfg.audit_privacy
    files = part_files(RunLayout(cfg.out).bank_dir("train"))
    lengths = [pq.ParquetFile(storage.open_file(f)).metadata.num_rows for f in files]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    rows = np.sort(np.random.default_rng(derive_seed(cfg.seed, "audit-strength") % 2**63)
                   .permutation(bank.num_rows)[: ap.strength_rows])
    units = []
    for f, url in enumerate(files):
        local = rows[(rows >= offsets[f]) & (rows < offsets[f + 1])] - offsets[f]
        if len(local):
            units.append({"file": url, "copy_idx": 0, "rows": local.astype(np.int32).tobytes()})
    lora_url, lora_sha = find_lora(cfg)
    spec = {"lora_url": lora_url, "lora_sha256": lora_sha, "latent_shape": meta["latent_shape"], "class_means": None}
    real_embeddings, embedder, out = tensor_column(bank, "clip_embed"), ClipEmbedder(cfg), []
    for strength in ap.strengths:
        scfg = cfg.model_copy(update={"generate": cfg.generate.model_copy(update={"strength": strength})})
        images = generate_in_process(scfg, spec, units).images
        synthetic = embedder.embed(images, batch_size=256)
        distances = copy_distances(synthetic.astype(np.float32), rows, real_embeddings)
        out.append({"strength": strength, "images": len(images), "lora": bool(lora_url),
                    **copy_summary(distances, ap.near_copy_threshold)})
        log.info(f"strength {strength}: {out[-1]}")
    return out


# ---------------------------------------------------------------------------------------------- driver
def _check(cfg: RunConfig) -> None:
    ap = cfg.audit_privacy
    if ap.shadows % 2:
        raise ConfigError(f"audit_privacy.shadows={ap.shadows}: must be even (every image in exactly half the shadows)")
    if not ap.arms:
        raise ConfigError("audit_privacy.arms is empty: give real, synthetic or both")


@takes_run_lease
def run_audit_privacy(cfg: RunConfig) -> dict:
    """Run (or resume) the audit; write ``summary.json``, ``audit.md`` and ``roc.png``; return the summary.

    Example:
        >>> run_audit_privacy(load_config(preset="tiny", out="runs/tiny"))["arms"]["real"]["auc"]  # doctest: +SKIP
        0.53
    """
    _check(cfg)
    started = time.time()
    ap = cfg.audit_privacy
    meta, bank = _bank(cfg)
    if ap.strengths:
        find_lora(cfg)  # the strength study samples the run's LoRA: a missing one is an error now, not at the end
    image_ids = bank.column("image_id").to_pylist()
    real = (_real_train_images(cfg, meta, image_ids), pc.cast(bank.column("label"), pa.int64()).to_numpy())
    val = _val(cfg, meta)
    masks = shadow_masks(bank.num_rows, ap.shadows, derive_seed(cfg.seed, "audit-masks") % 2**32)
    num_classes = len(meta["class_dirs"])
    arms, curves = {}, {}
    for arm in ap.arms:
        shadows = _run_arm(cfg, arm, masks, bank, real, val, num_classes)
        scores, members = lira_offline(np.stack([s["phi"] for s in shadows]), masks)
        val_top1 = [float(s["val_top1"]) for s in shadows]
        arms[arm] = {**attack_summary(scores, members), "val_top1_mean": float(np.mean(val_top1)),
                     "val_top1_min": float(np.min(val_top1)), "shadows": ap.shadows}
        curves[arm] = roc_points(scores, members)
    strengths = _strength_study(cfg, meta, bank) if ap.strengths else []
    summary = {"arms": arms, "strengths": strengths, "examples": bank.num_rows, "shadows_per_arm": ap.shadows,
               "near_copy_threshold": ap.near_copy_threshold, "wall_s": round(time.time() - started, 1)}
    return _write_outputs(cfg, summary, curves)


def _write_outputs(cfg: RunConfig, summary: dict, curves: dict) -> dict:
    with storage.written_from_local(RunLayout(cfg.out).audit_dir("roc.png")) as png:
        roc_plot(curves, png)
    storage.write_text(RunLayout(cfg.out).audit_dir("audit.md"), audit_markdown(summary) + "\n")
    storage.write_json(RunLayout(cfg.out).audit_dir("summary.json"), summary)
    if storage.exists(RunLayout(cfg.out).report_url("json")):
        write_report(cfg, {})  # the run's report gains its "Audit" section
    print(audit_markdown(summary), flush=True)
    return summary


def audit_markdown(summary: dict) -> str:
    """The audit's tables (attack per arm; generator-side distances per strength) as Markdown."""
    rows = [{"arm": arm, **{k: v for k, v in r.items() if k not in ("pairs", "members")}}
            for arm, r in summary["arms"].items()]
    text = (f"Membership inference (offline LiRA, {summary['shadows_per_arm']} shadow runs per arm, "
            f"{summary['examples']} real train images; TPR at low FPR is what matters):\n\n" + markdown_table(rows))
    if summary.get("strengths"):
        text += ("\n\nSynthetic images vs real train images in CLIP space (cosine distance; near-copy: to its "
                 f"source < {summary['near_copy_threshold']}):\n\n" + markdown_table(summary["strengths"]))
    return text
