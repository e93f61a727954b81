"""realfake export's writers (no Ray): a synthetic shard as an ImageFolder or a WebDataset tar, round-tripped through
the dataset readers."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from helpers import fabricate_synthetic

from realfake_ray import storage
from realfake_ray.data.sources import open_labelled_set, read_shard
from realfake_ray.data.synthetic import list_shards
from realfake_ray.tools.export.writers import done_url, export_shard, wids_index

CLASS_DIRS = [f"digit_{i}" for i in range(10)]


@pytest.fixture
def shards(tmp_path):
    fabricate_synthetic(str(tmp_path / "run"), copies=2, per_class=2)
    return list_shards(str(tmp_path / "run" / "synthetic" / "data"))


def _rows(urls):
    tables = [pq.read_table(u) for u in urls]
    return {(r["image"]["path"]): (r["label"], r["image"]["bytes"]) for t in tables for r in t.to_pylist()}


def test_an_imagefolder_export_has_the_same_images_and_labels(shards, tmp_path):
    dest = str(tmp_path / "folder")
    assert [export_shard(u, dest, "imagefolder") for u in shards.urls] == [20, 20]
    exported = open_labelled_set(dest, class_dirs=CLASS_DIRS)
    expected = _rows(shards.urls)
    assert exported.num_images == 40
    for image_id, url, label in zip(*(exported.items[c].to_pylist() for c in ("image_id", "url", "label"))):
        assert (label, storage.read_bytes(url)) == expected[image_id]
    marker = done_url(dest, shards.urls[0], "imagefolder")
    assert storage.exists(marker)
    (tmp_path / "folder" / list(expected)[0]).unlink()  # a done shard is not written again
    export_shard(shards.urls[0], dest, "imagefolder")
    assert not (tmp_path / "folder" / list(expected)[0]).exists()


def test_a_webdataset_export_reads_back_with_its_index(shards, tmp_path):
    dest = str(tmp_path / "wds")
    for url in shards.urls:
        export_shard(url, dest, "webdataset")
    wids_index(dest, shards.urls, shards.rows)
    exported = open_labelled_set(dest, class_dirs=CLASS_DIRS)
    assert exported.layout == "webdataset" and exported.num_images == 40
    expected = sorted(v for v in _rows(shards.urls).values())
    got = []
    for url in exported.shards["url"].to_pylist():
        table = read_shard(url, "webdataset", dest)
        got += list(zip(table["label"].to_pylist(), table["bytes"].to_pylist()))
    assert sorted(got) == expected
    first = storage.read_bytes(done_url(dest, shards.urls[0], "webdataset"))
    storage.remove(done_url(dest, shards.urls[0], "webdataset"))
    export_shard(shards.urls[0], dest, "webdataset")
    assert storage.read_bytes(done_url(dest, shards.urls[0], "webdataset")) == first  # the same shard, the same tar


def test_an_unknown_format_is_an_error(shards, tmp_path):
    with pytest.raises(ValueError, match="format 'zip'"):
        export_shard(shards.urls[0], str(tmp_path), "zip")
