"""Tests for realfake_ray.plots: PNGs exist, open with PIL at a plausible size, writes are atomic."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from realfake_ray import plots

ROWS = [
    {"step": 3, "loss": 0.30, "mmd": 0.02},
    {"step": 1, "loss": 0.90},  # no mmd: skipped for that curve
    {"step": 2, "loss": 0.50, "mmd": 0.05, "note": "text"},
    {"epoch": 1, "top1": 0.7},  # no step: skipped entirely
]


def assert_png(path: str, min_w: int = 200, min_h: int = 100) -> tuple[int, int]:
    assert os.path.isfile(path)
    assert os.path.getsize(path) > 1000
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
    with Image.open(path) as im:
        w, h = im.size
    assert w >= min_w and h >= min_h
    return w, h


def leftovers(directory) -> list[str]:
    return [n for n in os.listdir(directory) if n.startswith(".tmp-")]


def test_plot_curves_writes_png(tmp_path) -> None:
    out = str(tmp_path / "curves.png")
    assert plots.plot_curves(ROWS, "step", ["loss", "mmd", "absent"], out, title="fine-tune") == out
    assert_png(out)
    assert leftovers(tmp_path) == []


def test_plot_curves_logy_and_nested_dir(tmp_path) -> None:
    out = str(tmp_path / "a" / "b" / "log.png")
    plots.plot_curves(ROWS, "step", ["loss"], out, logy=True)
    assert_png(out)


def test_plot_curves_draws_only_present_points(tmp_path, monkeypatch) -> None:
    drawn = {}
    orig = plots.Figure.add_subplot

    def spy(self, *a, **k):
        ax = orig(self, *a, **k)
        drawn["ax"] = ax
        return ax

    monkeypatch.setattr(plots.Figure, "add_subplot", spy)
    plots.plot_curves(ROWS, "step", ["loss", "mmd", "note"], str(tmp_path / "c.png"))
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in drawn["ax"].get_lines()}
    assert lines == {"loss": ([1, 2, 3], [0.9, 0.5, 0.3]), "mmd": ([2, 3], [0.05, 0.02])}


def test_plot_curves_without_data_still_writes(tmp_path) -> None:
    out = str(tmp_path / "empty.png")
    plots.plot_curves([], "step", ["loss"], out)
    assert_png(out)


def test_plot_curves_rejects_string_ys_and_urls(tmp_path) -> None:
    with pytest.raises(TypeError, match="list of keys"):
        plots.plot_curves(ROWS, "step", "loss", str(tmp_path / "x.png"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="local paths only"):
        plots.plot_curves(ROWS, "step", ["loss"], "s3://bucket/x.png")


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch) -> None:
    out = tmp_path / "keep.png"
    out.write_bytes(b"old")

    def boom(self, fh, *a, **k):
        fh.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(plots.FigureCanvasAgg, "print_png", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        plots.plot_curves(ROWS, "step", ["loss"], str(out))
    assert out.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_image_grid_writes_png_sized_by_grid(tmp_path) -> None:
    rng = np.random.default_rng(0)
    imgs = [[rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(4)] for _ in range(3)]
    out = str(tmp_path / "grid.png")
    plots.image_grid(imgs, out, row_labels=["tench", "goldfish", "shark"], col_labels=["real", "s1", "s2", "s3"])
    w, h = assert_png(out)
    assert w > h  # 4 columns x 3 rows
    small = str(tmp_path / "one.png")
    plots.image_grid([[imgs[0][0]]], small)
    assert_png(small, min_w=100, min_h=100)
    assert os.path.getsize(small) < os.path.getsize(out)
    assert leftovers(tmp_path) == []


def test_image_grid_ragged_rows(tmp_path) -> None:
    img = np.zeros((32, 32, 3), np.uint8)
    out = plots.image_grid([[img, img, img], [img]], str(tmp_path / "ragged.png"), col_labels=["a", "b", "c"])
    assert_png(out)
    blanks = plots.image_grid([[img, None, img], [None, img]], str(tmp_path / "blanks.png"), col_labels=["a", "b", "c"])
    assert_png(blanks)
    with pytest.raises(ValueError, match="empty"):
        plots.image_grid([[None]], str(tmp_path / "none.png"))


@pytest.mark.parametrize(
    "images,kwargs,match",
    [
        ([], {}, "empty"),
        ([[np.zeros((8, 8, 3), np.float32)]], {}, r"images\[0\]\[0\] must be a uint8 HxWx3"),
        ([[np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8)]], {}, r"images\[0\]\[1\]"),
        ([[np.zeros((8, 8, 3), np.uint8)]], {"row_labels": ["a", "b"]}, "2 row_labels for 1 rows"),
        ([[np.zeros((8, 8, 3), np.uint8)]], {"col_labels": ["a", "b"]}, "2 col_labels for 1 columns"),
    ],
)
def test_image_grid_rejects_bad_input(tmp_path, images, kwargs, match) -> None:
    out = tmp_path / "bad.png"
    with pytest.raises(ValueError, match=match):
        plots.image_grid(images, str(out), **kwargs)
    assert not out.exists()


def test_markdown_table_formats_and_aligns() -> None:
    rows = [
        {"mult": 1, "top1": 0.712345, "name": "real"},
        {"mult": 10, "top1": np.float32(0.5), "name": "a|b", "extra": None},
        {"mult": 2, "name": "x\ny"},
    ]
    assert plots.markdown_table(rows) == (
        "| mult | top1 | name | extra |\n"
        "| ---: | ---: | --- | --- |\n"
        "| 1 | 0.7123 | real |  |\n"
        "| 10 | 0.5 | a\\|b |  |\n"
        "| 2 |  | x y |  |"
    )


def test_markdown_table_columns_and_floatfmt() -> None:
    rows = [{"a": 1.23456, "b": True, "c": "z"}]
    assert plots.markdown_table(rows, columns=["c", "a"], floatfmt=".2f") == "| c | a |\n| --- | ---: |\n| z | 1.23 |"
    assert plots.markdown_table(rows, columns=["b"]) == "| b |\n| --- |\n| True |"
    assert plots.markdown_table([]) == ""
    assert plots.markdown_table([], columns=["x"]) == "| x |\n| --- |"


def test_import_pulls_no_ray_pydantic_or_pyplot() -> None:
    code = "import sys, realfake_ray.plots; print(sorted(m for m in ('ray', 'pydantic', 'matplotlib.pyplot') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
