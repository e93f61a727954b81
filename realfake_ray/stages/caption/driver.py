"""Caption stage: every training image → one caption (BLIP-2, as the reference) → ``<out>/captions/captions.jsonl``,
the captions file encode reads when no ``data.captions_file`` is given.

Ray Data pipeline: rows planned on the driver → CPU decode tasks (each image squashed to ``caption.image_size``²)
→ a captioner actor pool (``caption.actors``; the model loaded once per actor) → Parquet part files of
(image_id, caption, error) under ``<out>/captions/_parts/``. A rerun captions only images without a part row;
the JSONL is rewritten from the parts at the end. Skipped, without Ray, when captions are given or off.

Example:
    >>> from realfake_ray.config import load_config
    >>> from realfake_ray.stages.caption.driver import run_caption
    >>> run_caption(load_config(preset="tiny"))["skipped"]  # the tiny preset turns captioning off
    [caption] nothing to do: caption.enabled is off
    True
"""

from __future__ import annotations

import time

from realfake_ray import storage
from realfake_ray._internal.cluster import actor_pool_kwargs, init_ray
from realfake_ray._internal.settings import refuse_changed_settings
from realfake_ray.config import RunConfig
from realfake_ray.data.imagefolder import scan_image_folder
from realfake_ray.layout import RunLayout
from realfake_ray.stages.caption.workers import (
    Captioner,
    caption_settings,
    decode_batch,
    pending_rows,
    skip_reason,
    write_caption_batch,
    write_captions_jsonl,
)

__all__ = ["run_caption"]


def _build_pipeline(rows: list[dict], cfg: RunConfig):
    """The Ray Data plan for ``rows`` (not executed)."""
    import ray.data

    c = cfg.caption
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // c.batch_size, 200)))
    ds = ds.map_batches(decode_batch, batch_size=c.batch_size, num_cpus=c.decode_cpus, fn_kwargs={"size": c.image_size})
    ds = ds.map_batches(Captioner, batch_size=c.batch_size, fn_constructor_args=(cfg,),
                        **actor_pool_kwargs(c.actors, "caption.actors", reserve_cpus=c.decode_cpus))
    return ds.map_batches(write_caption_batch, batch_format="pyarrow", batch_size=c.rows_per_file,
                          fn_kwargs={"out": cfg.out})


def run_caption(cfg: RunConfig) -> dict:
    """Caption every training image that has no caption yet; write the captions JSONL and ``_summary.json``.

    Returns the summary (``"skipped": True`` when there was nothing to do). Raises before any Ray work on bad
    input (dataset, or captions of this run made with another model / token limit / image size)."""
    reason = skip_reason(cfg)
    if reason:
        print(f"[caption] nothing to do: {reason}", flush=True)
        return {"skipped": True, "reason": reason}
    started, layout = time.time(), RunLayout(cfg.out)
    index = scan_image_folder(cfg.require_data().train, extensions=cfg.data.extensions)
    settings_url, summary_url = layout.captions_dir("_settings.json"), layout.captions_dir("_summary.json")
    refuse_changed_settings(settings_url, caption_settings(cfg), f"the captions at {layout.captions_dir()}")
    rows = pending_rows(index, cfg.out)
    if not rows and storage.exists(summary_url) and storage.exists(layout.captions_url()):
        return {**storage.read_json(summary_url), "skipped": True}  # the record of the run that did the work
    print(f"[caption] {len(index.records)} training images: {len(index.records) - len(rows)} captioned, "
          f"{len(rows)} to caption with {cfg.caption.model}", flush=True)
    if rows:
        storage.write_json(settings_url, caption_settings(cfg))
        init_ray(cfg.ray)
        _build_pipeline(rows, cfg).materialize()
        missing = pending_rows(index, cfg.out)
        if missing:  # materialize() raises when a task fails: this would be a bug, not bad input
            raise RuntimeError(f"caption: {len(missing)} images still have no caption row (e.g. {missing[0]['image_id']})")
    seconds = time.time() - started
    summary = {
        "images": len(index.records),
        "captioned_now": len(rows),
        **write_captions_jsonl(cfg.out),
        "captions_file": layout.captions_url(),
        "settings": caption_settings(cfg),
        "seconds": round(seconds, 2),
        "images_per_s": round(len(rows) / seconds, 2) if rows else None,
        "complete": True,
    }
    storage.write_json(summary_url, summary)
    return {**summary, "skipped": False}
