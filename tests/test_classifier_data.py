"""Rows and decoding for the classifier stage (train / evaluate), without Ray."""

import io

import numpy as np
import pytest
from PIL import Image

from realfake_ray import storage
import pyarrow as pa

from realfake_ray.data.labelled import decode_rows, set_digest, view_settings
from realfake_ray.data.sources import LabelledSet
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
    assert "skipped 3 unreadable image(s)" in printed and "corrupt.png" in printed and "truncated.png" in printed


def _set(urls, labels):
    items = pa.table({"image_id": urls, "url": urls, "label": pa.array(labels, pa.int64())})
    return LabelledSet("/d", "imagefolder", ["x", "y"], ["x", "y"], items=items)


def test_set_digest_ignores_order_and_sees_labels_and_shards():
    assert set_digest(_set(["a.png", "b.png"], [0, 1])) == set_digest(_set(["b.png", "a.png"], [1, 0]))
    assert set_digest(_set(["a.png", "b.png"], [0, 1])) != set_digest(_set(["a.png", "b.png"], [1, 1]))
    many = [f"{i}.png" for i in range(70_000)]  # more than one hashing slice
    assert set_digest(_set(many, [0] * 70_000)) == set_digest(_set(many[::-1], [0] * 70_000))

    def shards(names, rows):
        return LabelledSet("/d", "parquet", ["x"], ["x"], shards=pa.table({"url": names, "rows": pa.array(rows, pa.int64())}))

    assert set_digest(shards(["s3://b/a/x.parquet", "s3://b/a/y.parquet"], [3, 4])) == \
        set_digest(shards(["/other/y.parquet", "/other/x.parquet"], [4, 3]))  # names and sizes, not where
    assert set_digest(shards(["x.parquet"], [3])) != set_digest(shards(["x.parquet"], [4]))


def test_train_cache_fetches_a_remote_image_once_per_node_and_reads_local_files_in_place(tmp_path, monkeypatch):
    monkeypatch.setenv("REALFAKE_CACHE", str(tmp_path / "cache"))
    remote = "memory://realfake-test-cache/val/a.png"
    storage.write_bytes(remote, _png(10))
    local = storage.join(str(tmp_path), "b.png")
    storage.write_bytes(local, _png(30))
    reads, read = [], storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda url: reads.append(url) or read(url))
    batch = {"url": np.array([remote, local], dtype=object), "label": np.arange(2)}

    first = decode_rows(dict(batch), 16, "eval", view_settings(RunConfig()), cache=True)
    second = decode_rows(dict(batch), 16, "eval", view_settings(RunConfig()), cache=True)
    assert reads.count(remote) == 1 and reads.count(local) == 2  # the second epoch reads the node's copy
    np.testing.assert_array_equal(first["pixels"], second["pixels"])
    assert [p.name.split("-", 1)[1] for p in (tmp_path / "cache").rglob("*.png")] == ["a.png"]  # local files stay put
    decode_rows(dict(batch), 16, "eval", view_settings(RunConfig()))
    assert reads.count(remote) == 2  # without train.cache every epoch fetches


def test_train_per_class_draws_a_seeded_subset_of_each_class_in_listing_order(caplog):
    """The data-scarce regime's subset: k images of every class, the same for the same seed, another for another
    seed, every image of a class that has fewer; sharded train sets are refused by name."""
    from realfake_ray.config import ConfigError, load_config
    from realfake_ray.data.labelled import per_class_subset, real_train_set, repeated

    full = real_train_set(load_config(preset="tiny"))
    ten = real_train_set(load_config(preset="tiny", overrides=["data.train_per_class=10"]))
    assert full.num_images == 1437 and ten.num_images == 100 and list(ten.class_counts()) == [10] * 10
    ids = ten.items["image_id"].to_pylist()
    assert set(ids) <= set(full.items["image_id"].to_pylist())
    order = {i: n for n, i in enumerate(full.items["image_id"].to_pylist())}
    assert [order[i] for i in ids] == sorted(order[i] for i in ids)  # listing order kept
    again = real_train_set(load_config(preset="tiny", overrides=["data.train_per_class=10"]))
    other = real_train_set(load_config(preset="tiny", overrides=["data.train_per_class=10", "seed=7"]))
    assert again.items["image_id"].to_pylist() == ids != other.items["image_id"].to_pylist()
    assert per_class_subset(full, 1000, 0).num_images == 1437 and "kept whole" in caplog.text
    assert repeated(ten, 3).num_images == 300 and repeated(ten, 3).items["url"].to_pylist() == 3 * ten.items["url"].to_pylist()
    sharded = LabelledSet("/d", "parquet", ["x", "y"], ["x", "y"], shards=pa.table({"url": ["/d/a.parquet"], "rows": [5]}))
    with pytest.raises(ConfigError, match="data.train_per_class=10 needs a per-image train set"):
        per_class_subset(sharded, 10, 0)
