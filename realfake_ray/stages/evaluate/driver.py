"""Evaluate stage: accuracy of the trained classifier and distribution metrics of the synthetic set.

Accuracy: top-1/top-5 and per-class accuracy on the real val split (``data.val``) and on every
``evaluate.extra_sets`` entry (name → labelled ImageFolder URL). A set whose folders cover only some
of the real classes (ImageNet-R/A style) is mapped by folder name onto the real class indices and
scored with the logits restricted to those classes; a folder that is not a real class is an error.
One Ray Data pipeline does it all: rows → CPU decode tasks → an actor pool holding the model.

Distribution metrics: CLIP embeddings of the real train images (from the latent bank) against the
synthetic images embedded by the same CLIP vision model (:class:`~realfake_ray.method.embeddings.ClipEmbedder`
actors) → :func:`realfake_ray.method.metrics.distribution_report` (MMD² overall and per class, nearest-real-
neighbour memorisation count).

Writes ``<out>/classifier/metrics.json`` and ``metrics.md``.

Example:
    >>> from realfake_ray.config import load_config
    >>> from realfake_ray.stages.evaluate.driver import run_evaluate
    >>> report = run_evaluate(load_config(preset="tiny", out="runs/tiny"))  # doctest: +SKIP
    >>> report["sets"]["val"]["top1"], report["distribution"]["mmd2"]  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import threading

import numpy as np

from realfake_ray import storage
from realfake_ray._internal.cluster import actor_pool_kwargs, init_ray
from realfake_ray._internal.lease import takes_run_lease
from realfake_ray._internal.shards import read_parts
from realfake_ray.config import RunConfig
from realfake_ray.data.evaluation import distribution_inputs, plan_sets
from realfake_ray.data.labelled import decoded_dataset, output_dir, rows_dataset, set_digest
from realfake_ray.data.sources import LabelledSet
from realfake_ray.devices import torch_device
from realfake_ray.layout import RunLayout
from realfake_ray.method.classifier import evaluate_batches, merge_evaluations, to_model_input
from realfake_ray.method.classifier_file import load_classifier, model_url, read_classifier_info
from realfake_ray.method.embeddings import ClipEmbedder
from realfake_ray.method.metrics import distribution_report, subsample
from realfake_ray.plots import markdown_table

__all__ = ["run_evaluate"]

# One evaluation's actor pools at a time per driver: two classifiers trained side by side (the job's real
# baseline) must not each hold actors while the other's decode tasks wait for a CPU.
_ACTOR_POOLS = threading.Lock()


class ClassifierActor:
    """Actor: holds the classifier; scores decoded rows of several sets (``set_idx``), one row of counts
    per set present in a batch (see :func:`realfake_ray.method.classifier.evaluate_batches`)."""

    def __init__(self, url: str, subsets: list[list[int] | None]):
        import torch

        model, self.info = load_classifier(url)
        self.device = torch_device()
        self.model = model.to(self.device)
        self.autocast = torch.bfloat16 if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else None
        self.subsets = subsets

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        keys = ("correct1", "correct5", "count", "k", "per_class_correct", "per_class_count")
        out: dict[str, list] = {k: [] for k in ("set_idx", *keys)}
        for s in np.unique(batch["set_idx"]):
            mask = batch["set_idx"] == s
            x = to_model_input(torch.from_numpy(np.ascontiguousarray(batch["pixels"][mask])).to(self.device))
            y = torch.from_numpy(np.asarray(batch["label"][mask], dtype=np.int64))
            r = evaluate_batches(self.model, [(x, y)], len(self.info["class_dirs"]), self.subsets[int(s)], self.autocast)
            out["set_idx"].append(int(s))
            for key in keys:
                out[key].append(np.asarray(r[key]))
        return {k: np.stack(v) for k, v in out.items()}


# ------------------------------------------------------------------------------------ execution
def _set_result(merged: dict, lset: LabelledSet, subset: list[int] | None, class_dirs: list[str],
                scored_by: str = "evaluate") -> dict:
    """A set's entry of the report from its merged evaluation (:func:`~realfake_ray.method.classifier.merge_evaluations`)."""
    per_class = {d: a for d, a in zip(class_dirs, merged["per_class"]) if a is not None}
    return {
        "top1": merged["top1"], "top5": merged["top5"], "k": None if merged["k"] is None else int(merged["k"]),
        "count": int(merged["count"]), "skipped": lset.num_images - merged["count"],
        "classes": None if subset is None else len(subset), "per_class": per_class, "scored_by": scored_by,
    }


def evaluate_sets(cfg: RunConfig, url: str, names: list[str], sets: list[LabelledSet], subsets: list, info: dict) -> dict:
    """Run the read → decode → classifier-actor pipeline over every set; merged result per set name."""

    parts = [decoded_dataset(rows_dataset(lset, cfg, columns={"set_idx": i}), info["image_size"], cfg, view="eval")
             for i, lset in enumerate(sets)]
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    ds = ds.map_batches(
        ClassifierActor, batch_size=cfg.evaluate.batch_size, fn_constructor_args=(url, subsets),
        **actor_pool_kwargs(cfg.evaluate.actors, "evaluate.actors"),
    )
    found: dict[int, list[dict]] = {}
    for r in ds.take_all():
        found.setdefault(int(r["set_idx"]), []).append(r)
    empty = {"top1": None, "top5": None, "count": 0, "k": None, "per_class": []}
    return {name: _set_result(merge_evaluations(found[i]) if i in found else empty, sets[i], subsets[i], info["class_dirs"])
            for i, name in enumerate(names)}


def _bank_embeddings(out: str) -> tuple[np.ndarray, np.ndarray]:
    """The bank's real train CLIP embeddings (float32 ``[N, D]``) and labels."""
    import pyarrow as pa

    table = read_parts(RunLayout(out).bank_dir("train"), ["label", "clip_embed"])
    column = table.column("clip_embed").combine_chunks()
    if isinstance(column, pa.ExtensionArray):  # Ray's tensor extension type: a list array underneath
        column = column.storage
    emb = column.flatten().to_numpy(zero_copy_only=False)
    return emb.reshape(table.num_rows, -1).astype(np.float32), np.array(table.column("label").to_numpy())


def _embedding_config(cfg: RunConfig, meta: dict) -> RunConfig:
    """``cfg`` with the model section the bank was encoded with (same CLIP vision model)."""
    update = {"pretrained": meta["model"]["pretrained"]}
    if meta["model"].get("clip_vision") not in (None, "image_encoder"):
        update["clip_vision"] = meta["model"]["clip_vision"]
    return cfg.model_copy(update={"model": cfg.model.model_copy(update=update)})


def _synthetic_sample(synth: LabelledSet, max_images: int, seed: int) -> LabelledSet:
    """A seeded subset of the synthetic set of about ``max_images`` images: whole shards in a seeded order
    until there are enough (sharded sets), or a seeded subset of the listing (per-image sets)."""
    if not synth.sharded:
        keep = subsample(synth.num_images, max_images, seed)
        return LabelledSet(synth.url, synth.layout, synth.class_dirs, synth.class_names, items=synth.items.take(keep))
    order = np.random.default_rng(seed).permutation(synth.shards.num_rows)
    rows = np.cumsum(synth.shards["rows"].to_numpy()[order])
    chosen = np.sort(order[: int(np.searchsorted(rows, max_images)) + 1])
    return LabelledSet(synth.url, synth.layout, synth.class_dirs, synth.class_names, shards=synth.shards.take(chosen),
                       label_map=synth.label_map)


def distribution_metrics(cfg: RunConfig, meta: dict, synth: LabelledSet, class_dirs: list[str]) -> dict:
    """CLIP embeddings of a seeded subset of synthetic images vs the bank → ``distribution_report``."""

    ev = cfg.evaluate
    sample = _synthetic_sample(synth, ev.distribution_max_images, cfg.seed)
    ds = decoded_dataset(rows_dataset(sample, cfg), int(meta["resolution"]), cfg)
    ds = ds.map_batches(ClipEmbedder, batch_size=ev.batch_size, fn_constructor_args=(_embedding_config(cfg, meta),),
                        **actor_pool_kwargs(ev.actors, "evaluate.actors"))
    batch = ds.select_columns(["label", "clip_embed"]).take_batch(sample.num_images, batch_format="numpy")
    keep = subsample(len(batch["label"]), ev.distribution_max_images, cfg.seed)
    real, real_labels = _bank_embeddings(cfg.out)
    report = distribution_report(
        real, real_labels, np.asarray(batch["clip_embed"], dtype=np.float32)[keep], np.array(batch["label"])[keep],
        kernel=ev.mmd_kernel, nn_threshold=ev.nn_threshold, max_samples=ev.max_samples, seed=cfg.seed,
    )
    report["per_class_mmd2"] = {class_dirs[int(c)]: v for c, v in report["per_class_mmd2"].items()}
    report["synthetic_embedded"] = len(keep)
    return report


def shared_distribution(cfg: RunConfig, meta: dict, synth: LabelledSet, digest: str, class_dirs: list[str]) -> dict:
    """:func:`distribution_metrics`, or the report a classifier of another tag already got from the same synthetic
    set, bank and settings (``<out>/classifier/distribution.json``): the job's real-only baseline and its
    synthetic classifier share one synthetic set, so its CLIP pass runs once per job."""
    ev = cfg.evaluate
    bank = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()
    inputs = {"synthetic": [synth.url, synth.num_images, digest], "bank_meta_sha256": bank, "seed": cfg.seed,
              "model": cfg.model.model_dump(mode="json"),
              "settings": ev.model_dump(mode="json", include={"mmd_kernel", "nn_threshold", "max_samples",
                                                               "distribution_max_images"})}
    url = RunLayout(cfg.out).distribution_url()
    if storage.exists(url) and (stored := storage.read_json(url)).get("inputs") == inputs:
        return stored["report"]
    report = distribution_metrics(cfg, meta, synth, class_dirs)
    storage.write_json(url, {"inputs": inputs, "report": report})
    return report


# ------------------------------------------------------------------------------------ reports
def _markdown(report: dict) -> str:
    sets = report["sets"]
    lines = [f"# Classifier evaluation\n\nsource: `{report['source']}`, arch: `{report['arch']}`, "
             f"{report['num_classes']} classes, {report['image_size']} px\n", "## Accuracy\n"]
    lines.append(markdown_table([{"set": n, "images": s["count"], "classes": s["classes"] or report["num_classes"],
                                  "top1": s["top1"], "top5": s["top5"], "k": s["k"]} for n, s in sets.items()]))
    per_class = [{"class": d, **{n: s["per_class"].get(d) for n, s in sets.items()}} for d in report["class_dirs"]]
    lines += ["\n## Per-class top-1\n", markdown_table(per_class)]
    dist = report["distribution"]
    lines.append("\n## Synthetic vs real (CLIP embeddings)\n")
    if "skipped" in dist:
        lines.append(f"skipped: {dist['skipped']}")
    else:
        nn = dist["nn"]
        lines.append(markdown_table([{"real": dist["n_real"], "synthetic": dist["n_synth"], "kernel": dist["kernel"],
                                      "mmd2": dist["mmd2"], "mean_class_mmd2": dist["mean_class_mmd2"],
                                      "nn_count": nn["count"], "nn_fraction": nn["fraction"], "nn_threshold": nn["threshold"],
                                      "nn_label_agreement": nn["label_agreement"]}]))
        lines += ["", markdown_table([{"class": c, "mmd2": v} for c, v in dist["per_class_mmd2"].items()])]
    return "\n".join(lines) + "\n"


def _score_sets(cfg: RunConfig, url: str, planned: tuple[list, list, list], info: dict, scored: dict[str, dict]) -> dict:
    """:func:`evaluate_sets` over the ``planned`` ``(names, sets, subsets)`` that ``scored`` does not already hold
    whole: a pass of the training workers can miss a few rows (Ray Train cuts val into equal shards)."""
    names, labelled, subsets = planned
    whole = {n: r for n, r in scored.items() if n in names and r["count"] == labelled[names.index(n)].num_images}
    todo = [i for i, name in enumerate(names) if name not in whole]
    sets = evaluate_sets(cfg, url, *([seq[i] for i in todo] for seq in planned), info) if todo else {}
    return {name: sets[name] if name in sets else _set_result(whole[name], labelled[i], subsets[i], info["class_dirs"],
                                                              "train")
            for i, name in enumerate(names)}


def _inputs(cfg: RunConfig, model_bytes: bytes, synth: LabelledSet | None, digest: str | None) -> dict:
    """What a report depends on: a rerun with the same inputs returns the stored report."""
    return {
        "model_sha256": hashlib.sha256(model_bytes).hexdigest(), "seed": cfg.seed, "val": cfg.data.val,
        "evaluate": cfg.evaluate.model_dump(mode="json", exclude={"actors", "batch_size"}),
        "synthetic": [synth.url, synth.num_images, digest] if synth else None,
    }


@takes_run_lease
def run_evaluate(cfg: RunConfig, scored: dict[str, dict] | None = None) -> dict:
    """Score ``<out>/classifier[/<tag>]/model.safetensors`` on every set, add distribution metrics, write
    ``metrics.json`` / ``metrics.md`` beside it; returns the report (``skipped`` when inputs are unchanged).
    ``scored``: sets already scored with these very weights (name → merged evaluation; the train stage passes its
    last epoch's val pass), taken instead of scored again when they cover every image of the set."""

    cdir = output_dir(cfg)
    url = model_url(cdir)
    if not storage.exists(url):
        raise FileNotFoundError(f"no trained classifier at {url} (run `realfake train` first)")
    model_bytes = storage.read_bytes(url)
    info = read_classifier_info(model_bytes)
    class_dirs = info["class_dirs"]
    names, labelled, subsets = plan_sets(cfg, class_dirs)
    skipped, meta, synth = distribution_inputs(cfg, class_dirs)
    digest = set_digest(synth) if synth else None
    inputs, report_url = _inputs(cfg, model_bytes, synth, digest), storage.join(cdir, "metrics.json")
    if storage.exists(report_url) and storage.read_json(report_url).get("inputs") == inputs:
        return {**storage.read_json(report_url), "skipped": True}
    with _ACTOR_POOLS:
        init_ray(cfg.ray)
        sets = _score_sets(cfg, url, (names, labelled, subsets), info, scored or {})
        distribution = {"skipped": skipped} if skipped else shared_distribution(cfg, meta, synth, digest, class_dirs)
    report = {
        "source": info["source"], "arch": info["arch"], "image_size": info["image_size"], "epochs": info.get("epochs"),
        "num_classes": len(class_dirs), "class_dirs": class_dirs, "class_names": info["class_names"],
        "sets": sets, "distribution": distribution, "inputs": inputs,
    }
    storage.write_json(report_url, report)
    storage.write_text(storage.join(cdir, "metrics.md"), _markdown(report))
    return report
