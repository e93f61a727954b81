"""Caption stage: every training image → one caption (BLIP-2, as the reference) → ``<out>/captions/captions.jsonl``,
the captions file encode reads when no ``data.captions_file`` is given.

Ray Data pipeline: the training set's pending images planned on the driver (Arrow columns of any layout of
``realfake_ray.data.sources``, as encode plans them) → CPU read + decode tasks (each image squashed to
``caption.image_size``²) → a captioner actor pool (``caption.actors``; the model loaded once per actor) → Parquet
part files of (image_id, caption, error) under ``<out>/captions/_parts/``. A rerun captions only images without a
part row; the JSONL is rewritten from the parts at the end. Nothing to do, without Ray, when captions are given or
captioning is off.

Example:
    >>> from realfake_ray.config import load_config
    >>> from realfake_ray.stages.caption.driver import run_caption
    >>> run_caption(load_config(preset="tiny", out="memory://caption-demo"))["skipped"]  # tiny: no captioning
    [caption] nothing to do: caption.enabled is off
    True
"""

from __future__ import annotations

import logging
import time

import pyarrow as pa

from realfake_ray import storage
from realfake_ray._internal.cluster import actor_pool_kwargs, init_ray
from realfake_ray._internal.lease import takes_run_lease
from realfake_ray._internal.settings import refuse_changed_settings
from realfake_ray.config import RunConfig
from realfake_ray.data.captions import caption_stage_idle
from realfake_ray.data.labelled import pending_dataset, real_train_set
from realfake_ray.data.sources import LabelledSet, check_readable
from realfake_ray.layout import RunLayout
from realfake_ray.models.loading import ModelLoadError, model_location_problem
from realfake_ray.stages.caption.plan import caption_settings, pending_rows
from realfake_ray.stages.caption.workers import Captioner, decode_batch, write_caption_batch, write_captions_jsonl

__all__ = ["run_caption"]

log = logging.getLogger(__name__)


def build_pipeline(lset: LabelledSet, rows: pa.Table, cfg: RunConfig):
    """The Ray Data plan for the pending ``rows`` of ``lset`` (not executed)."""
    c = cfg.caption
    ds = pending_dataset(lset, rows, c.batch_size, c.decode_cpus)
    ds = ds.map_batches(decode_batch, batch_size=c.batch_size, num_cpus=c.decode_cpus, fn_kwargs={"size": c.image_size})
    ds = ds.map_batches(Captioner, batch_size=c.batch_size, fn_constructor_args=(cfg,),
                        **actor_pool_kwargs(c.actors, "caption.actors", reserve_cpus=c.decode_cpus))
    return ds.map_batches(write_caption_batch, batch_format="pyarrow", batch_size=c.rows_per_file,
                          fn_kwargs={"out": cfg.out})


def _check_model(cfg: RunConfig) -> None:
    problem = model_location_problem(cfg.caption.model, cfg.caption.revision, cfg.model.hub_timeout_s)
    if problem:
        raise ModelLoadError(f"caption.model {cfg.caption.model!r}: {problem}")


@takes_run_lease
def run_caption(cfg: RunConfig) -> dict:
    """Caption every training image that has no caption yet; write the captions JSONL and ``_summary.json``.

    Returns the summary (``"skipped": True`` when there was nothing to do). Raises before any Ray work on bad
    input (dataset, model location, or captions of this run made with another model / token limit / image size)."""
    reason = caption_stage_idle(cfg)
    if reason:
        log.info(f"nothing to do: {reason}")
        return {"skipped": True, "reason": reason}
    started, layout = time.time(), RunLayout(cfg.out)
    lset = real_train_set(cfg)
    check_readable(lset)
    settings_url, summary_url = layout.captions_dir("_settings.json"), layout.captions_dir("_summary.json")
    refuse_changed_settings(settings_url, caption_settings(cfg), f"the captions at {layout.captions_dir()}")
    rows = pending_rows(lset, cfg.out)
    if not rows.num_rows and storage.exists(summary_url) and storage.exists(layout.captions_url()):
        return {**storage.read_json(summary_url), "skipped": True}  # the record of the run that did the work
    log.info(f"{lset.num_images} training images: {lset.num_images - rows.num_rows} captioned, "
             f"{rows.num_rows} to caption with {cfg.caption.model}")
    if rows.num_rows:
        _check_model(cfg)
        storage.write_json(settings_url, caption_settings(cfg))
        init_ray(cfg.ray)
        build_pipeline(lset, rows, cfg).materialize()
        missing = pending_rows(lset, cfg.out)
        if missing.num_rows:  # materialize() raises when a task fails: this would be a bug, not bad input
            raise RuntimeError(f"caption: {missing.num_rows} images still have no caption row "
                               f"(e.g. {missing['image_id'][0].as_py()})")
    seconds = time.time() - started
    summary = {
        "images": lset.num_images,
        "captioned_now": rows.num_rows,
        **write_captions_jsonl(cfg.out),
        "captions_file": layout.captions_url(),
        "settings": caption_settings(cfg),
        "seconds": round(seconds, 2),
        "images_per_s": round(rows.num_rows / seconds, 2) if rows.num_rows else None,
        "complete": True,
    }
    storage.write_json(summary_url, summary)
    return {**summary, "skipped": False}
