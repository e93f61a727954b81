"""Rows and decoding for the classifier stage (train / evaluate), without Ray."""

import io

import numpy as np
import pytest
from PIL import Image

from realfake_ray import storage
from realfake_ray.data.labelled import decode_rows, rows_digest, view_settings
from realfake_ray.config import RunConfig


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((20, 24, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("view", ["centre", "train", "eval"])
def test_bad_images_are_skipped_and_named_and_labels_stay_aligned(tmp_path, capsys, view):
    files = {"good0.png": _png(10), "corrupt.png": b"not an image", "truncated.png": _png(20)[:40],
             "good1.png": _png(30)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    urls = [storage.join(str(tmp_path), name) for name in files] + [storage.join(str(tmp_path), "missing.png")]
    batch = {"url": np.array(urls, dtype=object), "label": np.arange(5), "aug": np.linspace(0, 1, 5),
             "copy_idx": np.zeros(5, np.int64)}
    out = decode_rows(batch, 16, view, view_settings(RunConfig()))
    assert set(out) == {"label", "pixels"}  # url / aug / copy_idx dropped
    assert out["label"].tolist() == [0, 3] and out["pixels"].shape == (2, 16, 16, 3)
    assert out["pixels"][0].mean() < out["pixels"][1].mean()  # the 10-grey image, then the 30-grey one
    printed = capsys.readouterr().out
    assert "skipped 3 undecodable image(s)" in printed and "corrupt.png" in printed and "truncated.png" in printed


def test_rows_digest_ignores_order_and_sees_labels():
    rows = [{"url": "a.png", "label": 0}, {"url": "b.png", "label": 1}]
    assert rows_digest(rows) == rows_digest(rows[::-1])
    assert rows_digest(rows) != rows_digest([{"url": "a.png", "label": 1}, {"url": "b.png", "label": 1}])
