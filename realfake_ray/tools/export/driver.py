"""``realfake export``: write a run's sharded synthetic set as an ImageFolder (``<class_dir>/<file>.jpg``, the
same JPEG bytes) or as WebDataset tars (one per shard, plus a ``wids.json`` index), one Ray task per shard.
Resumable: shards already exported are skipped.

Example:
    >>> run_export(load_config(preset="tiny", out="runs/demo"), fmt="imagefolder", dest="/tmp/synthetic")  # doctest: +SKIP
    {'format': 'imagefolder', 'images': 1437, 'shards': 3, 'exported_now': 3, ...}
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa

from realfake_ray import storage
from realfake_ray._internal.cluster import init_ray
from realfake_ray.config import ConfigError, RunConfig
from realfake_ray.data.synthetic import list_shards
from realfake_ray.layout import RunLayout
from realfake_ray.tools.export.writers import FORMATS, done_url, export_shard, wids_index

__all__ = ["run_export"]

log = logging.getLogger(__name__)


def _export_batch(batch: dict[str, np.ndarray], *, dest: str, fmt: str) -> dict[str, np.ndarray]:
    return {"images": np.array([export_shard(str(u), dest, fmt) for u in batch["url"]], dtype=np.int64)}


def run_export(cfg: RunConfig, fmt: str | None = None, dest: str | None = None) -> dict:
    """Export ``<out>/synthetic`` (copies ``< train.synthetic_mult`` when set) to ``dest`` in ``fmt``."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if not dest:
        raise ConfigError("--dest: where to write the exported set (a local path or a storage URL)")
    dest = storage.anchor(dest)
    shards = list_shards(RunLayout(cfg.out).shards_dir()).below_copy(cfg.train.synthetic_mult)
    if not shards.urls:
        raise FileNotFoundError(f"no synthetic shards at {RunLayout(cfg.out).shards_dir()} (run `realfake generate` first)")
    storage.check_reachable(dest)
    pending = [u for u in shards.urls if not storage.exists(done_url(dest, u, fmt))]
    started = time.time()
    if pending:
        import ray.data

        init_ray(cfg.ray)
        table = pa.table({"url": pending})
        ds = ray.data.from_arrow([table.slice(i, 1) for i in range(table.num_rows)])
        ds.map_batches(_export_batch, batch_size=1, fn_kwargs={"dest": dest, "fmt": fmt}, num_cpus=0.5).materialize()
    if fmt == "webdataset":
        wids_index(dest, shards.urls, shards.rows)
    summary = {"format": fmt, "dest": dest, "images": shards.images, "shards": len(shards.urls),
               "exported_now": len(pending), "seconds": round(time.time() - started, 2)}
    log.info(f"{shards.images} images of {len(shards.urls)} shards as {fmt} at {dest} "
             f"({len(pending)} shards written now)")
    return summary
