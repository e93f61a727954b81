"""Sampler tuning for training data: the grid, the accelerators, the Pareto front and the recommendation.

Pure torch + diffusers (no Ray): ``realfake tune-sampler`` (:mod:`realfake_ray.tools.tune_sampler.driver`) runs one Ray
Tune trial per setting on top of these. A *setting* is a flat dict of the generate keys in :data:`AXES`;
a measured *row* adds ``images_per_s``, the proxy quality (``kid``, ``mmd2``) and, for finalists, the
classifier ``accuracy``.

The rule: among the settings whose classifier accuracy is within ``tolerance`` of the reference (the
paper's settings), recommend the fastest.

Example:
    >>> rows = [
    ...     {"name": "ref", "reference": True, "images_per_s": 10.0, "accuracy": 0.80},
    ...     {"name": "fast", "images_per_s": 30.0, "accuracy": 0.795},
    ...     {"name": "fastest", "images_per_s": 50.0, "accuracy": 0.70},
    ... ]
    >>> [r["name"] for r in pareto_front(rows, "images_per_s", "accuracy")]
    ['fastest', 'fast', 'ref']
    >>> recommend(rows, tolerance=0.01)["name"]
    'fast'
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Sequence
from typing import Any

__all__ = [
    "AXES", "expand_grid", "setting_id", "setting_name", "pareto_front", "pick_finalists", "recommend",
    "recommendation_yaml",
]

# Generate keys a grid may vary (each is a `generate.<key>`; see GenerateConfig).
AXES = ("scheduler", "steps", "strength", "guidance_scale", "lora_scale", "batch_size", "dtype", "channels_last",
        "compile", "speedup")  # fmt: skip


# ---------------------------------------------------------------------------------------------- the grid
def expand_grid(axes: dict[str, Sequence[Any]], base: dict[str, Any]) -> list[dict[str, Any]]:
    """Every combination of the ``axes`` values on top of ``base`` (the settings not swept), in axis order.

    Example:
        >>> [(s["steps"], s["scheduler"]) for s in expand_grid({"steps": [30, 8], "scheduler": ["unipc"]}, {"strength": 0.75})]
        [(30, 'unipc'), (8, 'unipc')]
    """
    unknown = sorted(set(axes) - set(AXES))
    if unknown:
        raise ValueError(f"tune_sampler.axes: unknown key(s) {unknown}; valid: {list(AXES)}")
    empty = [k for k, values in axes.items() if not values]
    if empty:
        raise ValueError(f"tune_sampler.axes.{empty[0]} is empty: give at least one value")
    keys = list(axes)
    return [{**base, **dict(zip(keys, values))} for values in itertools.product(*(axes[k] for k in keys))]


def setting_id(setting: dict[str, Any]) -> str:
    """A short stable id of a setting (its trial result file name)."""
    return hashlib.sha256(json.dumps(setting, sort_keys=True, default=str).encode()).hexdigest()[:12]


def setting_name(setting: dict[str, Any], keys: Sequence[str]) -> str:
    """``ddim/15/deepcache:3``: the values of ``keys`` (the swept axes), for tables and plots."""
    return "/".join(str(setting[k]) for k in keys) or "base"


# ------------------------------------------------------------------------------------ front and choice
def pareto_front(rows: Sequence[dict], x: str, y: str, higher_y_is_better: bool = True) -> list[dict]:
    """Rows not dominated on (``x`` higher, ``y`` better), ordered by ``x`` descending; rows missing either
    value are ignored; equal pairs are all kept."""
    sign = 1.0 if higher_y_is_better else -1.0
    scored = sorted((r for r in rows if _finite(r.get(x)) and _finite(r.get(y))), key=lambda r: (-r[x], -sign * r[y]))
    front: list[dict] = []
    for row in scored:
        if not front or sign * row[y] > sign * front[-1][y] or (row[x], row[y]) == (front[-1][x], front[-1][y]):
            front.append(row)
    return front


def pick_finalists(rows: Sequence[dict], k: int, quality: str = "kid") -> list[dict]:
    """The reference plus at most ``k`` rows of the proxy front (images/s vs ``quality``, lower better) that
    are faster than the reference, spread evenly along the front (fastest and slowest kept)."""
    reference = next(r for r in rows if r.get("reference"))
    front = [r for r in pareto_front(rows, "images_per_s", quality, higher_y_is_better=False)
             if not r.get("reference") and r["images_per_s"] > reference["images_per_s"]]
    if k <= 0:
        return [reference]
    if len(front) > k:
        picks = sorted({round(i * (len(front) - 1) / max(k - 1, 1)) for i in range(k)})
        front = [front[i] for i in picks]
    return [reference, *front]


def recommend(rows: Sequence[dict], tolerance: float) -> dict | None:
    """The fastest row whose ``accuracy`` ≥ the reference's − ``tolerance`` (the reference itself when no
    faster one qualifies); None without a measured reference."""
    reference = next((r for r in rows if r.get("reference") and _finite(r.get("accuracy"))), None)
    if reference is None:
        return None
    good = [r for r in rows if _finite(r.get("accuracy")) and r["accuracy"] >= reference["accuracy"] - tolerance]
    return max(good, key=lambda r: (r["images_per_s"], r["accuracy"]))


def recommendation_yaml(row: dict, comment: str = "") -> str:
    """A ``generate:`` YAML snippet with the row's settings, usable with ``--config``.

    Example:
        >>> print(recommendation_yaml({"scheduler": "ddim", "steps": 15, "speedup": "none", "images_per_s": 9}))
        generate:
          scheduler: ddim
          steps: 15
          speedup: none
    """
    import yaml

    settings = {k: row[k] for k in AXES if k in row}
    head = "".join(f"# {line}\n" for line in comment.splitlines())
    return head + yaml.safe_dump({"generate": settings}, sort_keys=False).rstrip("\n")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
