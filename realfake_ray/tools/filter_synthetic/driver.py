"""``realfake filter-synthetic``: a synthetic set without the images a classifier trained on real images does not
label as their class (beyond the paper: label-agreement filtering). One classifier actor per shard at a time;
each filtered shard is written whole (same columns, kept rows, the counts in its metadata) below
``<out>/synthetic_filtered/<classifier sha256[:12]>/data``, a set ``train.synthetic`` takes as it is. Resumable:
shards already filtered are skipped; another classifier writes another set.

Example:
    >>> run_filter_synthetic(load_config(preset="tiny", out="runs/demo"))  # doctest: +SKIP
    {'kept': 1203, 'dropped': 234, 'dest': '.../synthetic_filtered/3f0c.../', 'per_class': {...}, ...}
"""

from __future__ import annotations

import hashlib
import io
import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from realfake_ray import storage
from realfake_ray._internal.cluster import actor_pool_kwargs, init_ray
from realfake_ray.config import ConfigError, RunConfig
from realfake_ray.data.sources import parquet_class_names
from realfake_ray.data.synthetic import list_shards, shard_bytes
from realfake_ray.devices import torch_device
from realfake_ray.layout import RunLayout
from realfake_ray.method.classifier_file import load_classifier, model_url, read_classifier_info
from realfake_ray.plots import markdown_table
from realfake_ray.tools.filter_synthetic.agreement import agreeing_rows, filter_counts, filtered_name, filtered_shard, source_key

__all__ = ["run_filter_synthetic"]

log = logging.getLogger(__name__)


class _ShardFilter:
    """Actor: the classifier, and per batch of shard URLs the filtered shards written (their kept-row counts out)."""

    def __init__(self, classifier: str, sha256: str, dest: str, crop_pct: float, interpolation: str, batch_size: int):
        model, info = load_classifier(classifier)
        self.device = torch_device()
        self.model, self.size = model.to(self.device), int(info["image_size"])
        self.sha256, self.dest, self.view, self.batch_size = sha256, dest, (crop_pct, interpolation), batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        kept = []
        for url in map(str, batch["url"]):
            table = pq.read_table(io.BytesIO(storage.read_bytes(url)))
            keep = agreeing_rows(table, self.model, self.size, *self.view, self.batch_size, self.device)
            out = filtered_shard(table, keep, url, self.sha256)
            storage.write_bytes(storage.join(self.dest, "data", filtered_name(url, out.num_rows)), shard_bytes(out))
            kept.append(out.num_rows)
        return {"kept": np.array(kept, np.int64)}


def _classifier(cfg: RunConfig, classifier: str | None) -> tuple[str, str, dict]:
    """The classifier's URL (default: this run's real-only baseline), its sha256 and its metadata."""
    url = classifier or model_url(RunLayout(cfg.out).classifier_dir("real"))
    if not storage.exists(url):
        raise FileNotFoundError(f"--classifier: no trained classifier at {url} (train the real-only baseline first: "
                                "`realfake train --source real --set train.tag=real`, or give --classifier URL)")
    data = storage.read_bytes(url)
    return url, hashlib.sha256(data).hexdigest(), read_classifier_info(data)


def _summary(dest: str, class_dirs: list[str], classifier: str, sha256: str) -> dict:
    """Kept / dropped per class, from the filtered shards' footers."""
    kept, dropped = np.zeros(len(class_dirs), np.int64), np.zeros(len(class_dirs), np.int64)
    for url in list_shards(storage.join(dest, "data")).urls:
        with storage.open_file(url) as f:
            counts = filter_counts(pq.read_schema(f))
        for totals, key in ((kept, "kept"), (dropped, "dropped")):
            for label, n in counts[key].items():
                totals[int(label)] += n
    per_class = {d: {"kept": int(k), "dropped": int(x), "kept_fraction": round(k / max(k + x, 1), 4)}
                 for d, k, x in zip(class_dirs, kept, dropped)}
    return {"classifier": classifier, "classifier_sha256": sha256, "dest": dest, "kept": int(kept.sum()),
            "dropped": int(dropped.sum()), "per_class": per_class}


def run_filter_synthetic(cfg: RunConfig, classifier: str | None = None) -> dict:
    """Filter ``<out>/synthetic`` by label agreement with ``classifier`` (default: ``<out>/classifier/real``'s);
    return the summary (also ``_summary.json`` and a per-class table ``summary.md`` beside the shards)."""
    source = list_shards(RunLayout(cfg.out).shards_dir())
    if not source.urls:
        raise FileNotFoundError(f"no synthetic shards at {RunLayout(cfg.out).shards_dir()} (run `realfake generate` first)")
    url, sha256, info = _classifier(cfg, classifier)
    with storage.open_file(source.urls[0]) as f:
        class_dirs = parquet_class_names(pq.read_schema(f))
    if class_dirs is not None and list(info["class_dirs"]) != list(class_dirs):
        raise ConfigError(f"--classifier {url}: its classes ({', '.join(info['class_dirs'][:5])}, ...) are not the "
                          f"synthetic set's ({', '.join(class_dirs[:5])}, ...) in the same order")
    dest = RunLayout(cfg.out).filtered_dir(sha256[:12])
    done = {source_key(u) for u in list_shards(storage.join(dest, "data")).urls}
    pending = [u for u in source.urls if source_key(u) not in done]
    started = time.time()
    if pending:
        import ray.data

        init_ray(cfg.ray)
        table = pa.table({"url": pending})
        ds = ray.data.from_arrow([table.slice(i, 1) for i in range(table.num_rows)])
        ds = ds.map_batches(_ShardFilter, batch_size=1, fn_constructor_args=(
            url, sha256, dest, cfg.train.eval_crop_pct, cfg.train.eval_interpolation, cfg.evaluate.batch_size),
            **actor_pool_kwargs(cfg.evaluate.actors, "evaluate.actors"))
        ds.materialize()
    summary = {**_summary(dest, list(info["class_dirs"]), url, sha256), "shards": len(source.urls),
               "filtered_now": len(pending), "seconds": round(time.time() - started, 2)}
    storage.write_json(storage.join(dest, "_summary.json"), summary)
    rows = [{"class": d, **v} for d, v in summary["per_class"].items()]
    storage.write_bytes(storage.join(dest, "summary.md"), markdown_table(rows).encode())
    log.info(f"kept {summary['kept']} of {summary['kept'] + summary['dropped']} synthetic images "
             f"({len(pending)} shards filtered now): train on them with --set train.synthetic={dest}")
    return summary
