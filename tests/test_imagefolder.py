import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from realfake_ray.data.imagefolder import (
    DatasetError,
    decode_image,
    load_captions,
    load_class_names,
    scan_image_folder,
    stem,
)


def _png(mode: str, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    if mode == "I;16":
        Image.fromarray(np.full(size[::-1], 40000, dtype=np.uint16)).save(buf, format="PNG")
    elif mode == "CMYK":
        Image.new("CMYK", size, (0, 128, 255, 0)).save(buf, format="JPEG")
    elif mode == "P":
        Image.new("RGB", size, (10, 200, 30)).convert("P", palette=Image.ADAPTIVE).save(buf, format="PNG")
    else:
        Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "P", "RGBA", "CMYK", "I;16", "1"])
def test_every_mode_becomes_rgb_at_resolution(mode):
    pixels, width, height = decode_image(_png(mode), 16)
    assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8
    assert (width, height) == (40, 30)


def test_sixteen_bit_is_scaled_not_clipped():
    pixels, _, _ = decode_image(_png("I;16"), 8)
    assert 150 < pixels.mean() < 160  # 40000/65535*255 ≈ 155.6


def test_transparent_pixels_composite_on_white():
    buf = io.BytesIO()
    Image.new("RGBA", (10, 10), (0, 0, 0, 0)).save(buf, format="PNG")
    pixels, _, _ = decode_image(buf.getvalue(), 10)
    assert pixels.min() == 255


def test_centre_crop_keeps_the_middle():
    image = np.zeros((20, 60, 3), dtype=np.uint8)
    image[:, 20:40] = 255  # white centre band of a wide image
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    pixels, _, _ = decode_image(buf.getvalue(), 20)
    assert pixels[:, 3:17].mean() > 250


def test_corrupt_bytes_raise():
    with pytest.raises((OSError, ValueError)):
        decode_image(b"not an image", 8)


def _make_folder(root, layout: dict[str, dict[str, bytes]]):
    for cls, files in layout.items():
        for name, data in files.items():
            path = root / cls / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)


def test_scan_odd_names_nested_files_and_labels(tmp_path):
    _make_folder(
        tmp_path,
        {
            "golden retriever": {"a.png": _png("RGB"), "sub/dir/b.jpg": _png("CMYK")},
            "n01.tench": {"c.PNG": _png("L"), "notes.txt": b"hello"},
            "Ünïcödé": {"d.png": _png("P")},
        },
    )
    (tmp_path / "README.md").write_text("top-level file")
    index = scan_image_folder(str(tmp_path))
    assert index.class_dirs == ["golden retriever", "n01.tench", "Ünïcödé"]
    assert [r.image_id for r in index.records] == [
        "golden retriever/a.png", "golden retriever/sub/dir/b.jpg", "n01.tench/c.PNG", "Ünïcödé/d.png",
    ]
    assert [r.label for r in index.records] == [0, 0, 1, 2]
    assert index.class_names == ["golden retriever", "n01.tench", "Ünïcödé"]
    assert sorted(index.ignored_files) == ["README.md", "n01.tench/notes.txt"]


def test_classes_file_and_captions(tmp_path):
    _make_folder(tmp_path / "data", {"n01440764": {"x.png": _png("RGB")}, "n02102040": {"y.png": _png("RGB")}})
    classes = tmp_path / "classes.txt"
    classes.write_text("n01440764 tench\nn02102040 English springer\n")
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"image_id": "n01440764/x.png", "caption": "a fish on grass"}) + "\n")
    index = scan_image_folder(str(tmp_path / "data"), classes_file=str(classes), captions_file=str(captions))
    assert index.class_names == ["tench", "English springer"]
    assert [r.caption for r in index.records] == ["a fish on grass", ""]
    assert index.caption_match == 0.5
    assert load_class_names(str(classes))["n02102040"] == "English springer"


def test_synset_mapping_gives_the_first_synonym_or_all_of_them(tmp_path, capsys):
    _make_folder(tmp_path / "data", {"n01440764": {"x.png": _png("RGB")}, "n02012849": {"y.png": _png("RGB")},
                                     "n03126707": {"z.png": _png("RGB")}})
    mapping = tmp_path / "LOC_synset_mapping.txt"  # the official file's format
    mapping.write_text("n01440764 tench, Tinca tinca\nn02012849 crane\nn03126707 crane\n")
    first = scan_image_folder(str(tmp_path / "data"), classes_file=str(mapping))
    assert first.class_names == ["tench", "crane", "crane"]
    assert "gives several classes the same name ('crane')" in capsys.readouterr().out  # said once per file
    load_class_names(str(mapping))
    assert capsys.readouterr().out == ""
    every = scan_image_folder(str(tmp_path / "data"), classes_file=str(mapping), class_name_style="all")
    assert every.class_names == ["tench, Tinca tinca", "crane", "crane"]
    assert load_class_names(str(mapping), "all")["n01440764"] == "tench, Tinca tinca"
    json_file = tmp_path / "classes.json"  # JSON names are taken whole
    json_file.write_text(json.dumps({"n01440764": "tench, a fish"}))
    assert load_class_names(str(json_file)) == {"n01440764": "tench, a fish"}
    with pytest.raises(ValueError, match="class name style 'last'"):
        load_class_names(str(mapping), "last")


def test_shipped_imagenet1k_names_one_class_per_synset_once():
    names = load_class_names("imagenet1k")
    assert len(names) == 1000 and len(set(names.values())) == 1000
    assert all(re.fullmatch(r"n\d{8}", synset) for synset in names)
    assert sorted(names) == list(names)  # the standard class order: sorted synsets
    assert all(name and name == name.strip() and "," not in name for name in names.values())
    assert (names["n01440764"], names["n02012849"], names["n03126707"]) == ("tench", "crane bird", "construction crane")
    assert load_class_names("imagenet1k", "all") == names


def test_the_shipped_class_lists_are_package_data(pyproject):
    import fnmatch
    import os

    from realfake_ray.data.class_lists import SHIPPED_CLASS_LISTS

    patterns = pyproject["tool"]["setuptools"]["package-data"]["realfake_ray.data"]
    for path in SHIPPED_CLASS_LISTS.values():
        assert os.path.isfile(path) and any(fnmatch.fnmatch(os.path.basename(path), p) for p in patterns)


def test_a_bad_classes_line_is_named_with_its_line_number(tmp_path):
    bad = tmp_path / "classes.txt"
    bad.write_text("# synset name\nn01440764 tench\n\nn01443537\n")
    with pytest.raises(DatasetError, match=r"classes.txt, line 4: expected 'folder name', got 'n01443537'"):
        load_class_names(str(bad))
    bad.write_text("n01440764 , Tinca tinca\n")  # no first synonym
    with pytest.raises(DatasetError, match="line 1"):
        load_class_names(str(bad))


def test_captions_file_for_another_dataset_is_refused_with_its_match_rate(tmp_path):
    _make_folder(tmp_path / "data", {"a": {f"{i}.png": _png("RGB") for i in range(3)}})
    captions = tmp_path / "captions.jsonl"
    # Keys without the class folder (a common mistake) match no image: refused, not silently empty captions.
    captions.write_text("".join(json.dumps({"image_id": f"{i}.png", "caption": "x"}) + "\n" for i in range(3)))
    with pytest.raises(DatasetError, match=r"only 0 of 3 images .* have a caption \(0% < 50%\).*'a/0.png'"):
        scan_image_folder(str(tmp_path / "data"), captions_file=str(captions))
    assert scan_image_folder(str(tmp_path / "data")).caption_match is None


def test_empty_dataset_and_empty_class_are_errors(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(DatasetError, match="empty"):
        scan_image_folder(str(tmp_path))
    _make_folder(tmp_path, {"b": {"x.png": _png("RGB")}})
    with pytest.raises(DatasetError, match="'a'"):
        scan_image_folder(str(tmp_path))


def test_class_with_only_corrupt_files_is_an_error(tmp_path):
    _make_folder(tmp_path, {"good": {"x.png": _png("RGB")}, "bad": {"y.png": b"garbage", "z.jpg": b"\xff\xd8junk"}})
    with pytest.raises(DatasetError, match="no readable image.*'bad'"):
        scan_image_folder(str(tmp_path))


def test_one_corrupt_file_is_not_fatal_at_scan(tmp_path):
    _make_folder(tmp_path, {"c": {"x.png": _png("RGB"), "y.png": b"garbage"}})
    assert len(scan_image_folder(str(tmp_path)).records) == 2  # counted and skipped at encode time


def test_missing_root_and_val_with_unknown_class(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        scan_image_folder(str(tmp_path / "missing"))
    _make_folder(tmp_path / "val", {"zebra": {"x.png": _png("RGB")}})
    with pytest.raises(DatasetError, match="'zebra'"):
        scan_image_folder(str(tmp_path / "val"), class_dirs=["cat", "dog"])


def test_bad_side_files(tmp_path):
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"image": 1}\n')
    with pytest.raises(DatasetError, match="line 1"):
        load_captions(str(bad))
    with pytest.raises(DatasetError, match="not found"):
        load_class_names(str(tmp_path / "nope.json"))


def test_stem_is_traversal_free():
    assert stem("n01/img_1.JPEG") == "img_1"
    assert stem("cls/sub/img.png").startswith("sub_img-")
    assert stem("cls/sub/img.png") != stem("cls/sub_img.png")
    s = stem("cls/../../etc/passwd.png")
    assert "/" not in s and ".." not in s


def test_embedded_digits_split_is_stratified_and_fixed():
    train = scan_image_folder("embedded:digits/train", classes_file="embedded:digits/classes.json")
    val = scan_image_folder("embedded:digits/val", class_dirs=train.class_dirs)
    assert len(train.records) + len(val.records) == 1797
    assert train.class_names[3] == "digit three"
    counts = np.bincount([r.label for r in val.records])
    assert counts.min() >= 34 and counts.max() <= 38  # ~20% of each class
    assert not {r.image_id.split("/")[1] for r in train.records} & {r.image_id.split("/")[1] for r in val.records}
