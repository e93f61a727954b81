"""What an evaluation reads, planned without Ray: the labelled sets a classifier is scored on (the real val
split and every ``evaluate.extra_sets`` entry, mapped onto the real class indices) and the inputs of the
synthetic-vs-real distribution metrics. The evaluate stage runs on them; the train stage checks them before
it trains, so that a bad extra set fails in seconds rather than after training.

Example:
    >>> names, rows, subsets = plan_sets(cfg, class_dirs)  # doctest: +SKIP
    >>> names  # doctest: +SKIP
    ['val', 'sketch']
"""

from __future__ import annotations

from realfake_ray import storage
from realfake_ray.bank import read_meta
from realfake_ray.config import ConfigError, RunConfig
from realfake_ray.data.imagefolder import DatasetError
from realfake_ray.data.labelled import real_rows, scan_mapped_folder, synthetic_root, synthetic_rows
from realfake_ray.layout import RunLayout

__all__ = ["VAL_SET", "extra_set_rows", "plan_sets", "distribution_inputs"]

VAL_SET = "val"


def extra_set_rows(name: str, url: str, class_dirs: list[str], cfg: RunConfig) -> tuple[list[dict], list[int] | None]:
    """Rows of one extra labelled set, labelled with the *real* class indices, and its class subset
    (``None`` when it covers every real class). A folder that is not a real class is an error."""
    where = f"evaluate.extra_sets[{name!r}] {url}"
    found = scan_mapped_folder(url, class_dirs, cfg, where, f"evaluate.extra_sets[{name!r}]: not a directory: {url}")
    rows = [{"url": u, "label": label} for u, label in found]
    covered = sorted({r["label"] for r in rows})
    return rows, (covered if len(covered) < len(class_dirs) else None)


def plan_sets(cfg: RunConfig, class_dirs: list[str]) -> tuple[list[str], list[dict], list[list[int] | None]]:
    """``(set names, rows with set_idx, class subsets)`` of the val split and the extra sets."""
    if VAL_SET in cfg.evaluate.extra_sets:
        raise ConfigError(f"evaluate.extra_sets: the name {VAL_SET!r} is reserved for data.val")
    names, rows, subsets = [], [], []
    sources = ([(VAL_SET, None)] if cfg.data.val else []) + list(cfg.evaluate.extra_sets.items())
    for i, (name, url) in enumerate(sources):
        if url is None:
            set_rows, subset = real_rows(cfg.data.val, cfg, class_dirs)[1], None
        else:
            set_rows, subset = extra_set_rows(name, url, class_dirs, cfg)
        names.append(name)
        subsets.append(subset)
        rows += [{**r, "set_idx": i} for r in set_rows]
    return names, rows, subsets


def distribution_inputs(cfg: RunConfig, class_dirs: list[str]) -> tuple[str | None, dict | None, list[dict]]:
    """``(reason skipped, bank meta, synthetic rows)``: checks that the bank and synthetic set exist."""

    if not cfg.evaluate.distribution_metrics:
        return "evaluate.distribution_metrics is false", None, []
    meta = read_meta(cfg.out)
    if meta is None:
        return f"no latent bank at {RunLayout(cfg.out).bank_dir()} (run `realfake encode`)", None, []
    if list(meta["class_dirs"]) != list(class_dirs):
        raise DatasetError(f"the latent bank at {cfg.out}/latents has other classes than the classifier")
    if not storage.exists(synthetic_root(cfg)):
        return f"no synthetic set at {synthetic_root(cfg)}", meta, []
    return None, meta, synthetic_rows(cfg, class_dirs)
