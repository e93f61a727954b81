"""What an evaluation reads, planned without Ray: the labelled sets a classifier is scored on (the real val
split and every ``evaluate.extra_sets`` entry, mapped onto the real class indices) and the inputs of the
synthetic-vs-real distribution metrics. The evaluate stage runs on them; the train stage checks them before
it trains, so that a bad extra set fails in seconds rather than after training.

Example:
    >>> names, sets, subsets = plan_sets(cfg, class_dirs)  # doctest: +SKIP
    >>> names  # doctest: +SKIP
    ['val', 'sketch']
"""

from __future__ import annotations

import numpy as np

from realfake_ray import storage
from realfake_ray.bank import read_meta
from realfake_ray.config import ConfigError, RunConfig
from realfake_ray.data.imagefolder import DatasetError
from realfake_ray.data.labelled import real_set, synthetic_set
from realfake_ray.data.sources import LabelledSet
from realfake_ray.layout import RunLayout

__all__ = ["VAL_SET", "extra_set", "plan_sets", "distribution_inputs"]

VAL_SET = "val"


def extra_set(name: str, url: str, class_dirs: list[str], cfg: RunConfig) -> tuple[LabelledSet, list[int] | None]:
    """One extra labelled set (any layout), labelled with the *real* class indices, and its class subset
    (``None`` when it covers every real class, or when its labels are inside its shards). A class that is not a
    real class is an error naming the set."""
    try:
        lset = real_set(url, cfg, class_dirs)
    except DatasetError as exc:
        raise DatasetError(f"evaluate.extra_sets[{name!r}]: {exc}") from None
    counts = lset.class_counts()
    covered = sorted(np.flatnonzero(counts).tolist()) if counts is not None else sorted(set(lset.label_map or []))
    return lset, (covered if covered and len(covered) < len(class_dirs) else None)


def plan_sets(cfg: RunConfig, class_dirs: list[str]) -> tuple[list[str], list[LabelledSet], list[list[int] | None]]:
    """``(set names, sets, class subsets)`` of the val split and the extra sets."""
    if VAL_SET in cfg.evaluate.extra_sets:
        raise ConfigError(f"evaluate.extra_sets: the name {VAL_SET!r} is reserved for data.val")
    names, sets, subsets = [], [], []
    if cfg.data.val:
        names.append(VAL_SET)
        sets.append(real_set(cfg.data.val, cfg, class_dirs, cfg.data.val_labels))
        subsets.append(None)
    for name, url in cfg.evaluate.extra_sets.items():
        lset, subset = extra_set(name, url, class_dirs, cfg)
        names.append(name)
        sets.append(lset)
        subsets.append(subset)
    return names, sets, subsets


def distribution_inputs(cfg: RunConfig, class_dirs: list[str]) -> tuple[str | None, dict | None, LabelledSet | None]:
    """``(reason skipped, bank meta, synthetic set)``: checks that the bank and synthetic set exist."""

    if not cfg.evaluate.distribution_metrics:
        return "evaluate.distribution_metrics is false", None, None
    meta = read_meta(cfg.out)
    if meta is None:
        return f"no latent bank at {RunLayout(cfg.out).bank_dir()} (run `realfake encode`)", None, None
    if list(meta["class_dirs"]) != list(class_dirs):
        raise DatasetError(f"the latent bank at {cfg.out}/latents has other classes than the classifier")
    root = cfg.train.synthetic or RunLayout(cfg.out).synthetic_dir()
    if not storage.exists(root):
        return f"no synthetic set at {root}", meta, None
    return None, meta, synthetic_set(cfg, class_dirs, meta.get("class_names"))
