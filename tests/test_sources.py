"""realfake_ray.data.sources: every dataset layout listed, labelled and read without Ray, on small fake trees."""

from __future__ import annotations

import io
import json
import re
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
    display_name,
    fetch_images,
    load_class_names,
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


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6)).save(buffer, format="PNG")
    return buffer.getvalue()


def _folder(root, tree: dict[str, list[str]]) -> str:
    for folder, names in tree.items():
        for name in names:
            (root / folder / name).parent.mkdir(parents=True, exist_ok=True)
            (root / folder / name).write_bytes(_png())
    return str(root)


def test_an_imagefolder_with_odd_names_nested_files_and_stray_files(tmp_path):
    root = _folder(tmp_path, {"golden retriever": ["a.png", "sub/dir/b.jpg"], "n01.tench": ["c.PNG"], "Ünïcödé": ["d.png"]})
    (tmp_path / "n01.tench" / "notes.txt").write_text("hello")
    (tmp_path / "README.md").write_text("top-level file")
    s = open_labelled_set(root)
    assert s.class_dirs == ["golden retriever", "n01.tench", "Ünïcödé"] == s.class_names
    assert s.items["image_id"].to_pylist() == ["golden retriever/a.png", "golden retriever/sub/dir/b.jpg",
                                               "n01.tench/c.PNG", "Ünïcödé/d.png"]
    assert s.items["label"].to_pylist() == [0, 0, 1, 2] and sorted(s.ignored) == ["README.md", "n01.tench/notes.txt"]


def test_an_empty_set_an_empty_class_a_missing_root_and_an_unknown_class_are_named(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(DatasetError, match="empty"):
        open_labelled_set(str(tmp_path))
    _folder(tmp_path, {"b": ["x.png"]})
    with pytest.raises(DatasetError, match=r"class folder\(s\) with no image: 'a'"):
        open_labelled_set(str(tmp_path))
    with pytest.raises(DatasetError, match="not found"):
        open_labelled_set(str(tmp_path / "missing"))
    with pytest.raises(DatasetError, match="'zebra'"):
        open_labelled_set(_folder(tmp_path / "val", {"zebra": ["x.png"]}), class_dirs=["cat", "dog"])


def test_the_embedded_digits_split_is_stratified_and_fixed():
    train = open_labelled_set("embedded:digits/train", classes_file="embedded:digits/classes.json")
    val = open_labelled_set("embedded:digits/val", class_dirs=train.class_dirs)
    assert train.num_images + val.num_images == 1797 and train.class_names[3] == "digit three"
    counts = val.class_counts()
    assert counts.min() >= 34 and counts.max() <= 38  # ~20% of each class
    train_files, val_files = ({i.split("/")[1] for i in s.items["image_id"].to_pylist()} for s in (train, val))
    assert not train_files & val_files


def test_a_synset_mapping_names_each_class_by_its_first_synonym_or_all_of_them(tmp_path, capsys):
    root = _folder(tmp_path / "data", {"n01440764": ["x.png"], "n02012849": ["y.png"], "n03126707": ["z.png"]})
    mapping = tmp_path / "LOC_synset_mapping.txt"  # the official file's format
    mapping.write_text("n01440764 tench, Tinca tinca\nn02012849 crane\nn03126707 crane\n")
    assert open_labelled_set(root, classes_file=str(mapping)).class_names == ["tench", "crane", "crane"]
    assert "gives several classes the same name ('crane')" in capsys.readouterr().out
    open_labelled_set(root, classes_file=str(mapping), class_dirs=["n01440764", "n02012849", "n03126707"])
    assert capsys.readouterr().out == ""  # said once per classes file
    every = open_labelled_set(root, classes_file=str(mapping), class_name_style="all")
    assert every.class_names == ["tench, Tinca tinca", "crane", "crane"]
    assert load_class_names(str(mapping))["n01440764"] == "tench, Tinca tinca"  # names are read whole
    json_file = tmp_path / "classes.json"  # JSON names too: the same display as every other name
    json_file.write_text(json.dumps({"n01440764": "tench, a fish"}))
    assert load_class_names(str(json_file)) == {"n01440764": "tench, a fish"}
    assert open_labelled_set(root, classes_file=str(json_file)).class_names == ["tench", "n02012849", "n03126707"]
    with pytest.raises(ValueError, match="class name style 'last'"):
        open_labelled_set(root, class_name_style="last")
    assert display_name("tench, Tinca tinca", "all") == "tench, Tinca tinca"


def test_the_class_name_style_applies_to_parquet_class_label_names(tmp_path):
    root = _hf_parquet(tmp_path)
    assert open_labelled_set(root, class_name_style="all").class_names[:2] == ["tench, Tinca tinca",
                                                                               "goldfish, Carassius auratus"]


def test_the_shipped_imagenet1k_names_one_class_per_synset_once():
    names = {synset: display_name(name) for synset, name in load_class_names("imagenet1k").items()}
    assert len(names) == 1000 and len(set(names.values())) == 1000
    assert all(re.fullmatch(r"n\d{8}", synset) for synset in names)
    assert sorted(names) == list(names)  # the standard class order: sorted synsets
    assert all(name and name == name.strip() and "," not in name for name in names.values())
    assert (names["n01440764"], names["n02012849"], names["n03126707"]) == ("tench", "crane bird", "construction crane")
    assert load_class_names("imagenet1k") == names  # one name per synset: "all" is the same list


def test_the_shipped_class_lists_are_package_data(pyproject):
    import fnmatch
    import os

    from realfake_ray.data.class_lists import SHIPPED_CLASS_LISTS

    patterns = pyproject["tool"]["setuptools"]["package-data"]["realfake_ray.data"]
    for path in SHIPPED_CLASS_LISTS.values():
        assert os.path.isfile(path) and any(fnmatch.fnmatch(os.path.basename(path), p) for p in patterns)


def test_a_bad_or_missing_classes_file_is_named(tmp_path):
    bad = tmp_path / "classes.txt"
    bad.write_text("# synset name\nn01440764 tench\n\nn01443537\n")
    with pytest.raises(DatasetError, match=r"classes.txt, line 4: expected 'folder name', got 'n01443537'"):
        load_class_names(str(bad))
    bad.write_text("n01440764 , Tinca tinca\n")  # no first synonym
    with pytest.raises(DatasetError, match="line 1"):
        load_class_names(str(bad))
    with pytest.raises(DatasetError, match="not found"):
        load_class_names(str(tmp_path / "nope.json"))


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


def test_a_job_checks_each_set_s_readability_once(tmp_path, monkeypatch):
    """The job's preflight and then a stage (encode) both check the same set: inside the job's listing_cache()
    the images are read once (at ImageNet shape: one image per class, 1,000 GETs saved per stage)."""
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        (tmp_path / c / "x.png").write_bytes(_jpeg(3))
    reads = []
    real_read = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda url: reads.append(url) or real_read(url))
    lset = open_labelled_set(str(tmp_path))
    check_readable(lset), check_readable(lset)
    assert len(reads) == 4  # outside a job: every call checks
    reads.clear()
    with sources.listing_cache():
        check_readable(lset), check_readable(open_labelled_set(str(tmp_path)))
    assert len(reads) == 2


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
