import os

import pytest

from realfake_ray import storage


def test_memory_round_trip_and_listing():
    root = "memory://storage-test"
    storage.write_text(storage.join(root, "a", "x.txt"), "hello")
    storage.write_json(storage.join(root, "b.json"), {"k": 1})
    assert storage.read_text(f"{root}/a/x.txt") == "hello"
    assert storage.read_json(f"{root}/b.json") == {"k": 1}
    assert storage.find(root) == [f"{root}/a/x.txt", f"{root}/b.json"]
    assert storage.listdir(root) == [("a", True), ("b.json", False)]
    assert storage.relative(f"{root}/a/x.txt", root) == "a/x.txt"


def test_join_keeps_scheme_and_plain_paths():
    assert storage.join("s3://b/run", "latents", "train") == "s3://b/run/latents/train"
    assert storage.join("/tmp/run/", "/x/") == "/tmp/run/x"
    assert storage.protocol("gs://b/x") == "gs" and storage.protocol("/tmp") == "file"


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = str(tmp_path / "out.bin")
    with pytest.raises(RuntimeError):
        with storage.atomic_open(target) as f:
            f.write(b"partial")
            raise RuntimeError("killed mid-write")
    assert os.listdir(tmp_path) == []
    storage.write_bytes(target, b"full")
    assert os.listdir(tmp_path) == ["out.bin"]


def test_temporary_files_are_invisible(tmp_path):
    (tmp_path / ".tmp-123-part.parquet").write_bytes(b"x")
    (tmp_path / "real.txt").write_text("y")
    assert [os.path.basename(u) for u in storage.find(str(tmp_path))] == ["real.txt"]


@pytest.mark.parametrize(
    "name",
    ["../../etc/passwd", "..", "/abs/path", "a/b", "Café crème", "名前", "", "con:tab\t"],
)
def test_safe_name_never_escapes(name):
    safe = storage.safe_name(name)
    assert safe and "/" not in safe and "\\" not in safe and safe not in (".", "..")
    assert not safe.startswith(".")
    assert safe.isascii()


def test_safe_name_keeps_distinct_inputs_distinct():
    assert storage.safe_name("n01440764") == "n01440764"
    assert storage.safe_name("a b") != storage.safe_name("a_b")


def test_embedded_urls_resolve_locally():
    files = storage.find("embedded:digits/val")
    assert len(files) == 360 and files[0].startswith("embedded:digits/val/")
    assert storage.read_bytes(files[0])[:8] == b"\x89PNG\r\n\x1a\n"
