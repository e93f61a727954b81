"""realfake_ray.data.sources: every dataset layout listed, labelled and read without Ray, on small fake trees."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from realfake_ray import storage
from realfake_ray.data import sources
from realfake_ray.data.imagefolder import DatasetError
from realfake_ray.data.sources import (
    check_readable,
    detect_layout,
    fetch_images,
    open_labelled_set,
    read_images_by_id,
    read_shard,
    read_with_retries,
    shard_image_ids,
)

SYNSETS = ["n01440764", "n01443537", "n01484850"]


def _jpeg(value: int, size=(12, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _flat_val(root, n=6) -> tuple[str, list[tuple[str, str]]]:
    """ImageNet's official val layout: flat JPEGs + LOC_val_solution.csv (first token of PredictionString)."""
    pairs = []
    for i in range(n):
        name = f"ILSVRC2012_val_{i + 1:08d}"
        (root / "val").mkdir(parents=True, exist_ok=True)
        (root / "val" / f"{name}.JPEG").write_bytes(_jpeg(20 * i))
        pairs.append((name, SYNSETS[i % 3]))
    lines = ["ImageId,PredictionString"] + [f"{n},{s} 10 20 100 200 {s} 5 5 50 50" for n, s in pairs]
    (root / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    return str(root / "val"), pairs


def test_imagefolder_is_listed_as_arrow_columns():
    s = open_labelled_set("embedded:digits/train", classes_file="embedded:digits/classes.json")
    assert s.layout == "imagefolder" and not s.sharded and s.num_images == 1437
    assert s.items.column_names == ["image_id", "url", "label"] and s.class_names[3] == "digit three"
    assert s.items["image_id"][0].as_py().startswith("digit_0/") and s.class_counts().sum() == 1437


def test_the_official_imagenet_val_layout_with_loc_val_solution(tmp_path):
    val, pairs = _flat_val(tmp_path)
    s = open_labelled_set(val, class_dirs=SYNSETS, labels_file=str(tmp_path / "LOC_val_solution.csv"))
    assert s.layout == "labels_file" and s.num_images == 6 and s.class_dirs == SYNSETS
    labels = dict(zip(s.items["image_id"].to_pylist(), s.items["label"].to_pylist()))
    assert labels == {f"{n}.JPEG": SYNSETS.index(c) for n, c in pairs}
    assert detect_layout(val, str(tmp_path / "LOC_val_solution.csv")) == "labels_file"


@pytest.mark.parametrize("text", ["file,label\na.png,1\nb.png,0\n", "a.png\t1\nb.png\t0\n", "a.png,n01443537\nb,n01440764\n"])
def test_a_plain_labels_file_csv_or_tsv_by_name_or_index(tmp_path, text):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "labels.txt").write_text(text)
    s = open_labelled_set(str(tmp_path), class_dirs=SYNSETS[:2], labels_file=str(tmp_path / "labels.txt"))
    assert dict(zip(s.items["image_id"].to_pylist(), s.items["label"].to_pylist())) == {"a.png": 1, "b.png": 0}


def test_a_labels_file_names_what_is_wrong(tmp_path):
    val, _ = _flat_val(tmp_path, n=3)
    labels = tmp_path / "l.csv"
    labels.write_text("file,label\nILSVRC2012_val_00000001,n99999999\n")
    with pytest.raises(DatasetError, match=r"l.csv: label\(s\) 'n99999999' are not among the 3 real classes"):
        open_labelled_set(val, class_dirs=SYNSETS, labels_file=str(labels))
    labels.write_text("ILSVRC2012_val_00000001,n01440764\nmissing.JPEG,n01440764\n")
    with pytest.raises(DatasetError, match=r"1 labelled file\(s\) are not images .*'missing.JPEG'"):
        open_labelled_set(val, class_dirs=SYNSETS, labels_file=str(labels))
    labels.write_text("ILSVRC2012_val_00000001,n01440764\n")
    with pytest.raises(DatasetError, match=r"2 image\(s\) have no label in .*l.csv"):
        open_labelled_set(val, class_dirs=SYNSETS, labels_file=str(labels))
    labels.write_text("only-one-column\n")
    with pytest.raises(DatasetError, match=r"l.csv, line 1: expected 'file,label'"):
        open_labelled_set(val, class_dirs=SYNSETS, labels_file=str(labels))


def test_folders_named_by_class_index_follow_the_class_order(tmp_path):
    for index in (0, 2):
        (tmp_path / str(index)).mkdir()
        (tmp_path / str(index) / "x.jpeg").write_bytes(_jpeg(50))
    assert detect_layout(str(tmp_path)) == "index_folders"
    s = open_labelled_set(str(tmp_path), class_dirs=SYNSETS)
    assert s.items["label"].to_pylist() == [0, 2] and s.class_counts().tolist() == [1, 0, 1]
    with pytest.raises(DatasetError, match=r"class index folder\(s\) \[2\] are outside the 2 classes"):
        open_labelled_set(str(tmp_path), class_dirs=SYNSETS[:2])


def _hf_parquet(root, names=("tench, Tinca tinca", "goldfish, Carassius auratus", "great white shark"), rows=5):
    """A Parquet dataset as the Hugging Face hub serves it, written by `datasets` itself."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(names))})
    data = {"image": [{"bytes": _jpeg(30 * i), "path": None} for i in range(rows)], "label": [i % 3 for i in range(rows)]}
    (root / "data").mkdir(parents=True)
    datasets.Dataset.from_dict(data, features=features).to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    return str(root)


def test_a_hugging_face_parquet_dataset_with_its_class_label_names(tmp_path):
    root = _hf_parquet(tmp_path)
    assert detect_layout(root) == "parquet"
    s = open_labelled_set(root)
    assert s.sharded and s.num_images == 5 and s.shards.num_rows == 1
    assert s.class_dirs == ["tench, Tinca tinca", "goldfish, Carassius auratus", "great white shark"]
    assert s.class_names == ["tench", "goldfish", "great white shark"]  # the first synonym names the class
    (url,) = s.shards["url"].to_pylist()
    rows = read_shard(url, "parquet", root)
    assert rows["image_id"].to_pylist() == shard_image_ids(url, root, 5) == [f"data/train-00000-of-00001.parquet#{i}"
                                                                             for i in range(5)]
    assert rows["label"].to_pylist() == [0, 1, 2, 0, 1] and rows["bytes"][2].as_py() == _jpeg(60)
    found = read_images_by_id(root, "parquet", ["data/train-00000-of-00001.parquet#3"])
    assert found == {"data/train-00000-of-00001.parquet#3": _jpeg(90)}


def test_a_parquet_set_read_with_another_sets_class_order_is_relabelled(tmp_path):
    root = _hf_parquet(tmp_path, names=("b", "a", "c"))
    s = open_labelled_set(root, class_dirs=["a", "b", "c", "d"])
    assert s.label_map == [1, 0, 2]
    assert read_shard(s.shards["url"][0].as_py(), "parquet", root, s.label_map)["label"].to_pylist() == [1, 0, 2, 1, 0]
    with pytest.raises(DatasetError, match=r"class\(es\) 'c' are not among the 2 real classes"):
        open_labelled_set(root, class_dirs=["a", "b"])


def test_parquet_without_class_names_needs_a_class_order(tmp_path):
    import pyarrow.parquet as pq

    (tmp_path / "x").mkdir()
    pq.write_table(pa.table({"image": [{"bytes": _jpeg(1), "path": "a.jpg"}], "label": [0]}), str(tmp_path / "x" / "p.parquet"))
    with pytest.raises(DatasetError, match="no class names .*give data.classes_file"):
        open_labelled_set(str(tmp_path / "x"))
    assert open_labelled_set(str(tmp_path / "x"), class_dirs=["only"]).num_images == 1
    pq.write_table(pa.table({"img": [b"x"]}), str(tmp_path / "x" / "p.parquet"))
    with pytest.raises(DatasetError, match=r"has no column\(s\) \['image', 'label'\]"):
        open_labelled_set(str(tmp_path / "x"), class_dirs=["only"])


def _tar(path, samples: list[tuple[str, bytes, int]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, data, label in samples:
            for name, content in ((f"{key}.jpg", data), (f"{key}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))


def test_webdataset_shards_with_and_without_a_wids_index(tmp_path):
    _tar(tmp_path / "shard-000.tar", [("s/a", _jpeg(10), 2), ("s/b", _jpeg(20), 0)])
    _tar(tmp_path / "shard-001.tar", [("s/c", _jpeg(30), 1)])
    assert detect_layout(str(tmp_path)) == "webdataset"
    s = open_labelled_set(str(tmp_path), class_dirs=SYNSETS)
    assert s.layout == "webdataset" and s.shards["rows"].to_pylist() == [2, 1] and s.num_images == 3
    rows = read_shard(s.shards["url"][0].as_py(), "webdataset", str(tmp_path))
    assert rows["image_id"].to_pylist() == ["shard-000.tar#0", "shard-000.tar#1"] == shard_image_ids(
        s.shards["url"][0].as_py(), str(tmp_path), 2)
    assert rows["label"].to_pylist() == [2, 0] and rows["bytes"][1].as_py() == _jpeg(20)
    (tmp_path / "index.json").write_text(json.dumps({"shardlist": [{"url": "shard-000.tar", "nsamples": 2},
                                                                   {"url": "shard-001.tar", "nsamples": 1}]}))
    counted = []
    original = sources._count_tar
    sources._count_tar = lambda url: counted.append(url) or original(url)
    try:
        assert open_labelled_set(str(tmp_path), class_dirs=SYNSETS).num_images == 3 and not counted  # sizes from the index
    finally:
        sources._count_tar = original


def test_unreadable_classes_are_named_before_any_work(tmp_path):
    for c in ("good", "broken"):
        (tmp_path / c).mkdir()
    (tmp_path / "good" / "a.png").write_bytes(_jpeg(3))
    (tmp_path / "broken" / "a.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=r"no readable image in class\(es\) 'broken'"):
        check_readable(open_labelled_set(str(tmp_path)))


def test_reads_are_retried_then_reported_per_image(tmp_path, monkeypatch):
    calls = []

    def flaky(url):
        calls.append(url)
        if len(calls) < 3:
            raise ConnectionError("SlowDown: reduce your request rate")
        return b"ok"

    assert read_with_retries("s3://b/x", attempts=3, backoff_s=0.0, reader=flaky) == b"ok" and len(calls) == 3
    with pytest.raises(FileNotFoundError):  # a missing file is not retried
        read_with_retries(str(tmp_path / "nope"), backoff_s=0.0)
    (tmp_path / "a.png").write_bytes(b"A")
    monkeypatch.setattr(sources.time, "sleep", lambda s: None)
    out = fetch_images({"url": np.array([str(tmp_path / "a.png"), str(tmp_path / "gone.png")], dtype=object)})
    assert out["bytes"][0] == b"A" and out["bytes"][1] == b"" and out["error"][0] == ""
    assert "gone.png: FileNotFoundError" in out["error"][1]


def test_storage_urls_work_for_sharded_sets(tmp_path):
    root = "memory://sources-test/wds"
    local = tmp_path / "s.tar"
    _tar(local, [("k", _jpeg(5), 1)])
    storage.write_bytes(f"{root}/s.tar", local.read_bytes())
    s = open_labelled_set(root, class_dirs=SYNSETS)
    assert s.num_images == 1 and read_shard(s.shards["url"][0].as_py(), "webdataset", root)["label"].to_pylist() == [1]


def test_a_glob_selects_one_split_of_a_hub_style_folder(tmp_path):
    root = _hf_parquet(tmp_path)
    other = tmp_path / "data" / "validation-00000-of-00001.parquet"
    other.write_bytes((tmp_path / "data" / "train-00000-of-00001.parquet").read_bytes())
    assert open_labelled_set(root).num_images == 10  # the whole folder: both splits
    train = open_labelled_set(f"{root}/data/train-*.parquet")
    assert train.num_images == 5 and train.url == f"{root}/data"
    (url,) = train.shards["url"].to_pylist()
    assert read_shard(url, "parquet", train.url)["image_id"][0].as_py() == "train-00000-of-00001.parquet#0"
    assert detect_layout(f"{root}/data/train-*.parquet") == "parquet"
