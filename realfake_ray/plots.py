"""Report figures and tables for every stage: pure matplotlib (Agg canvas), no Ray, no pydantic.

Figures are drawn on a private ``Figure`` + ``FigureCanvasAgg`` (no pyplot global state, safe in
Ray workers and threads, no display needed). PNGs are written atomically to a *local* path: a
temporary file in the same directory, then ``os.replace``. Callers upload with ``storage``.

Example:
    >>> import numpy as np, tempfile, os
    >>> from realfake_ray import plots
    >>> d = tempfile.mkdtemp()
    >>> rows = [{"step": 1, "loss": 0.9}, {"step": 2, "loss": 0.5, "mmd": 0.1}]
    >>> os.path.basename(plots.plot_curves(rows, "step", ["loss", "mmd"], os.path.join(d, "loss.png")))
    'loss.png'
    >>> img = np.zeros((32, 32, 3), np.uint8)
    >>> os.path.basename(plots.image_grid([[img, img]], os.path.join(d, "grid.png"), ["cls0"], ["real", "synthetic"]))
    'grid.png'
    >>> print(plots.markdown_table([{"mult": 1, "top1": 0.71234}]))
    | mult | top1 |
    | ---: | ---: |
    | 1 | 0.7123 |
"""

from __future__ import annotations

import numbers
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

from realfake_ray.tools.tune_sampler.grid import pareto_front

__all__ = ["plot_curves", "pareto_plot", "timeline_plot", "roc_plot", "image_grid", "markdown_table"]

_TMP_PREFIX = ".tmp-"  # same marker as storage.atomic_open, so listings skip half-written files
_DPI = 100
_CELL_INCHES = 1.6


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas
    return fig


def _save_png(fig: Figure, path: str) -> str:
    """Render ``fig`` to ``path`` atomically (temp file beside it, then ``os.replace``)."""
    path = os.fspath(path)
    if "://" in path:
        raise ValueError(f"plots write local paths only, got {path!r}; upload the file with realfake_ray.storage")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".png", dir=parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.canvas.print_png(fh)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def plot_curves(
    rows: list[dict], x: str, ys: list[str], path: str, title: str = "", logy: bool = False, logx: bool = False
) -> str:
    """Plot metric records as one line per key in ``ys`` against key ``x``; write a PNG; return ``path``.

    Rows missing ``x`` or a ``y`` key (or holding a non-numeric value there) are skipped for that
    curve; points are sorted by ``x``. With no plottable points the PNG says so instead of failing,
    so a report can always be rendered. ``logy``/``logx`` use log axes (non-positive values are masked).

    Example:
        >>> rows = [{"epoch": e, "train_loss": 1 / (e + 1), "val_top1": 0.1 * e} for e in range(5)]
        >>> plot_curves(rows, "epoch", ["train_loss"], "/tmp/loss.png", title="ResNet-50", logy=True)
        '/tmp/loss.png'
    """
    if isinstance(ys, str):
        raise TypeError(f"ys must be a list of keys, got the string {ys!r}")
    fig = _new_figure(6.4, 4.0)
    ax = fig.add_subplot()
    plotted = 0
    for key in ys:
        points = sorted(
            (row[x], row[key]) for row in rows if _is_number(row.get(x)) and _is_number(row.get(key))
        )
        if not points:
            continue
        xs, vals = zip(*points)
        ax.plot(xs, vals, marker="." if len(points) < 50 else None, label=key)
        plotted += 1
    if plotted:
        ax.legend(loc="best")
        if logy:
            ax.set_yscale("log")
        if logx:
            ax.set_xscale("log")
    else:
        ax.text(0.5, 0.5, f"no data for {', '.join(ys) or '(no keys)'}", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(x)
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save_png(fig, path)


def pareto_plot(rows: list[dict], path: str, title: str = "realfake tune-sampler") -> str:
    """Two panels of sampler-tuning rows: images/s vs KID for every setting (round 1, lower KID better),
    images/s vs classifier top-1 for the finalists (round 2). The reference is a black square, the
    recommendation a star; the Pareto fronts are drawn as steps. Writes a PNG; returns ``path``.

    Example:
        >>> rows = [{"name": "ref", "reference": True, "images_per_s": 1.0, "kid": 0.02, "accuracy": 0.8},
        ...         {"name": "fast", "images_per_s": 3.0, "kid": 0.03, "accuracy": 0.79, "recommended": True}]
        >>> pareto_plot(rows, "/tmp/pareto.png")
        '/tmp/pareto.png'
    """

    fig = _new_figure(11.0, 4.2)
    for i, (y, better) in enumerate((("kid", "lower"), ("accuracy", "higher"))):
        ax = fig.add_subplot(1, 2, i + 1)
        points = [r for r in rows if _is_number(r.get("images_per_s")) and _is_number(r.get(y))]
        if not points:
            ax.text(0.5, 0.5, f"no {y} measured", ha="center", va="center", transform=ax.transAxes)
        ax.scatter([r["images_per_s"] for r in points], [r[y] for r in points], s=18, color="tab:blue", alpha=0.7)
        front = pareto_front(points, "images_per_s", y, higher_y_is_better=better == "higher")
        if front:
            ax.step([r["images_per_s"] for r in front], [r[y] for r in front], where="post", color="tab:orange",
                    label="Pareto front")
        for r in points:
            if r.get("reference"):
                ax.scatter([r["images_per_s"]], [r[y]], marker="s", s=60, color="black", label="reference (paper)")
            if r.get("recommended"):
                ax.scatter([r["images_per_s"]], [r[y]], marker="*", s=160, color="tab:red", label="recommended")
            if r in front or r.get("reference"):
                ax.annotate(str(r.get("name", "")).replace("reference: ", ""), (r["images_per_s"], r[y]),
                            fontsize=6, xytext=(3, 3), textcoords="offset points")
        if any(r["images_per_s"] > 0 for r in points):
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("images/s (log)")
        ax.set_ylabel(f"{y} ({better} is better)")
        ax.grid(True, alpha=0.3)
        ax.set_title(("round 1: every setting" if i == 0 else "round 2: classifier on the finalists"), fontsize=9)
        if points:
            ax.legend(loc="best", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save_png(fig, path)


def timeline_plot(points: list[dict], path: str, title: str = "generate: cluster and throughput",
                  first_batches: list[float] | None = None) -> str:
    """A stage's scaling timeline: alive nodes and actors (steps, left axis) and images/s between samples
    (right axis) over seconds; ``first_batches``: when each actor finished its first batch (ticks: how long a
    fresh actor took to start working). ``points``: ``{"t", "images", "nodes", "actors"}`` dicts. Writes a PNG.

    Example:
        >>> timeline_plot([{"t": 0, "images": 0, "nodes": 1, "actors": 1},
        ...                {"t": 10, "images": 40, "nodes": 3, "actors": 2}], "/tmp/timeline.png")
        '/tmp/timeline.png'
    """
    t = np.array([p["t"] for p in points], dtype=float)
    fig = _new_figure(6.4, 3.6)
    ax = fig.add_subplot()
    ax.step(t, [p["nodes"] for p in points], where="post", label="nodes alive", color="tab:blue")
    if all(p.get("actors") is not None for p in points):
        ax.step(t, [p["actors"] for p in points], where="post", label="actors alive", color="tab:orange")
    if first_batches:
        ax.plot(first_batches, [0] * len(first_batches), linestyle="none", marker="|", markersize=14,
                color="tab:red", label="an actor's first batch")
    ax.set_xlabel("seconds since the stage started")
    ax.set_ylabel("count")
    ax.set_ylim(bottom=0)
    rates = ax.twinx()
    images = np.array([p["images"] for p in points], dtype=float)
    if len(t) > 1:
        rate = np.diff(images) / np.maximum(np.diff(t), 1e-9)
        rates.plot((t[1:] + t[:-1]) / 2, rate, color="tab:green", marker=".", label="images/s")
    rates.set_ylabel("images/s", color="tab:green")
    rates.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()
    extra = rates.get_legend_handles_labels()
    ax.legend(lines[0] + extra[0], lines[1] + extra[1], loc="upper left", fontsize="small")
    ax.set_title(title)
    fig.tight_layout()
    return _save_png(fig, path)


def roc_plot(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str, title: str = "membership inference") -> str:
    """ROC curves ``{name: (fpr, tpr)}`` on log-log axes (the low-FPR region is what matters for privacy),
    with the chance diagonal. Writes a PNG; returns ``path``.

    Example:
        >>> roc_plot({"real": (np.array([0, 0.01, 1.0]), np.array([0, 0.05, 1.0]))}, "/tmp/roc.png")
        '/tmp/roc.png'
    """
    fig = _new_figure(5.0, 4.4)
    ax = fig.add_subplot()
    floor = 1e-4
    grid = np.logspace(np.log10(floor), 0, 50)
    ax.plot(grid, grid, linestyle="--", color="grey", label="chance")
    for name, (fpr, tpr) in curves.items():
        ax.plot(np.maximum(fpr, floor), np.maximum(tpr, floor), label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(floor, 1)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title)
    fig.tight_layout()
    return _save_png(fig, path)


def _check_image(img: Any, r: int, c: int) -> np.ndarray:
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        desc = f"{type(img).__name__}" if not isinstance(img, np.ndarray) else f"{img.dtype} array of shape {img.shape}"
        raise ValueError(f"image_grid: images[{r}][{c}] must be a uint8 HxWx3 array, got {desc}")
    return img


def image_grid(
    images: list[list[np.ndarray]],
    path: str,
    row_labels: list[str] | None = None,
    col_labels: Sequence[str] | None = None,
) -> str:
    """Write a grid of uint8 HxWx3 images (``images[row][col]``) to a PNG; return ``path``.

    Rows may have different lengths, and a cell may be None (missing cells stay blank). Labels, when given,
    must match the number of rows / the widest row.

    Example:
        >>> real, fake = np.zeros((64, 64, 3), np.uint8), np.full((64, 64, 3), 255, np.uint8)
        >>> image_grid([[real, fake], [real, fake]], "/tmp/grid.png", ["tench", "goldfish"], ["real", "synthetic"])
        '/tmp/grid.png'
    """
    if not images or not any(img is not None for row in images for img in row):
        raise ValueError("image_grid: images is empty")
    n_rows, n_cols = len(images), max(len(row) for row in images)
    cells = [[None if img is None else _check_image(img, r, c) for c, img in enumerate(row)] for r, row in enumerate(images)]
    if row_labels is not None and len(row_labels) != n_rows:
        raise ValueError(f"image_grid: {len(row_labels)} row_labels for {n_rows} rows")
    if col_labels is not None and len(col_labels) != n_cols:
        raise ValueError(f"image_grid: {len(col_labels)} col_labels for {n_cols} columns")
    fig = _new_figure(n_cols * _CELL_INCHES + (0.6 if row_labels else 0), n_rows * _CELL_INCHES)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for r in range(n_rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(cells[r]) and cells[r][c] is not None:
                ax.imshow(cells[r][c], interpolation="nearest")
            else:
                ax.set_axis_off()
            if row_labels is not None and c == 0:
                ax.set_ylabel(str(row_labels[r]), fontsize=9)
            if col_labels is not None and r == 0:
                ax.set_title(str(col_labels[c]), fontsize=9)
    fig.tight_layout(pad=0.3)
    return _save_png(fig, path)


def _cell(value: Any, floatfmt: str) -> str:
    if value is None:
        return ""
    if _is_number(value) and not isinstance(value, numbers.Integral):
        return format(float(value), floatfmt)
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict], columns: list[str] | None = None, floatfmt: str = ".4g") -> str:
    """Render records as a GitHub-flavoured Markdown table (no trailing newline).

    ``columns`` defaults to every key in order of first appearance. Floats use ``floatfmt``;
    missing keys and ``None`` give empty cells; ``|`` is escaped. Columns whose present values are
    all numbers are right-aligned. No columns gives an empty string.

    Example:
        >>> print(markdown_table([{"stage": "gen", "imgs_per_s": 412.5}, {"stage": "train"}]))
        | stage | imgs_per_s |
        | --- | ---: |
        | gen | 412.5 |
        | train |  |
    """
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    if not columns:
        return ""
    numeric = {
        col: any(col in row and row[col] is not None for row in rows)
        and all(_is_number(row[col]) for row in rows if row.get(col) is not None)
        for col in columns
    }
    lines = [
        "| " + " | ".join(_cell(col, floatfmt) for col in columns) + " |",
        "| " + " | ".join("---:" if numeric[col] else "---" for col in columns) + " |",
    ]
    lines += ["| " + " | ".join(_cell(row.get(col), floatfmt) for col in columns) + " |" for row in rows]
    return "\n".join(lines)
