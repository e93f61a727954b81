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


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    target = str(tmp_path / "out.bin")
    fs, _ = storage.filesystem(target)

    def killed_mid_rename(*_args, **_kwargs):
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(type(fs), "mv", killed_mid_rename)
    with pytest.raises(RuntimeError):
        storage.write_bytes(target, b"partial")
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    storage.write_bytes(target, b"full")
    assert os.listdir(tmp_path) == ["out.bin"]


def test_object_store_writes_are_one_upload_without_temporary_objects(s3_bucket, s3_server, tmp_path):
    """On S3 a write is one PUT (an object appears only when it completes): no temp object, copy or delete."""
    before = {m: s3_server.requests(m) for m in ("PUT", "POST", "DELETE")}
    storage.write_bytes(f"{s3_bucket}/run/a.bin", b"x" * 1000)
    storage.write_json(f"{s3_bucket}/run/b.json", {"k": 1})
    local = tmp_path / "c.bin"
    local.write_bytes(b"y" * 5000)
    storage.upload_file(str(local), f"{s3_bucket}/run/c.bin")
    assert s3_server.requests("PUT") - before["PUT"] == 3
    assert (s3_server.requests("POST"), s3_server.requests("DELETE")) == (before["POST"], before["DELETE"])
    assert storage.find(f"{s3_bucket}/run") == [f"{s3_bucket}/run/{n}" for n in ("a.bin", "b.json", "c.bin")]
    assert storage.read_bytes(f"{s3_bucket}/run/c.bin") == b"y" * 5000


def test_object_store_listings_see_other_writers(s3_bucket):
    """Stages list what Ray workers (other processes, other clients) just wrote: no cached listing."""
    import fsspec

    storage.write_bytes(f"{s3_bucket}/parts/part-0.parquet", b"0")
    assert storage.listdir(f"{s3_bucket}/parts") == [("part-0.parquet", False)]
    assert storage.find(f"{s3_bucket}/parts") == [f"{s3_bucket}/parts/part-0.parquet"]
    other_process = fsspec.filesystem("s3", skip_instance_cache=True)
    other_process.pipe_file(f"{s3_bucket[5:]}/parts/part-1.parquet", b"1")
    assert storage.listdir(f"{s3_bucket}/parts") == [("part-0.parquet", False), ("part-1.parquet", False)]
    assert storage.find(f"{s3_bucket}/parts") == [f"{s3_bucket}/parts/part-{i}.parquet" for i in (0, 1)]


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


def test_an_unreachable_object_store_is_named_before_any_work(monkeypatch):
    """A wrong endpoint fails in seconds with the URL in the message, not after minutes of client retries."""
    import socket

    import s3fs

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(storage.StorageError, match=r"s3://nowhere/run: storage (did not answer|refused)"):
            storage.check_reachable("/tmp/local-is-not-probed", "s3://nowhere/run", timeout_s=5)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_a_reachable_object_store_passes_the_check(s3_bucket):
    storage.check_reachable(f"{s3_bucket}/run", "embedded:digits/train", timeout_s=30)


def test_reading_an_object_is_one_request(s3_bucket, s3_server):
    """Encode, train and the report read every image once: one GET, no HEAD before it."""
    storage.write_bytes(f"{s3_bucket}/img/a.jpg", b"\xff\xd8" + b"x" * 3000)
    before = s3_server.requests()
    assert storage.read_bytes(f"{s3_bucket}/img/a.jpg")[:2] == b"\xff\xd8"
    assert s3_server.requests() - before == 1


def test_the_s3_servers_request_recording_stays_beside_its_log(s3_bucket, s3_server):
    """moto's recorder is off; switched on, it records into the test's temporary folder, never a
    ``moto_recording`` file in the working directory (one was committed once)."""
    import urllib.request
    from pathlib import Path

    def recorder(action: str) -> None:
        urllib.request.urlopen(urllib.request.Request(f"{s3_server.endpoint}/moto-api/recorder/{action}", method="POST"))

    storage.write_bytes(f"{s3_bucket}/before.txt", b"x")
    assert not os.path.exists(s3_server.recording_path)  # off by default
    recorder("start-recording")
    try:
        storage.write_bytes(f"{s3_bucket}/recorded.txt", b"x")
    finally:
        recorder("stop-recording")
    with open(s3_server.recording_path) as log:
        assert "/recorded.txt" in log.read()
    repo = Path(__file__).resolve().parents[1]
    assert not os.path.exists("moto_recording") and not (repo / "moto_recording").exists()


def test_object_store_extras_have_the_fsspec_floor(pyproject):
    """Without a floor, a fresh resolve picks s3fs 0.4.2 (pre-aiobotocore, no max_concurrency): it happened in CI."""
    from packaging.requirements import Requirement

    project = pyproject["project"]
    fsspec_floor = next(Requirement(r) for r in project["dependencies"] if r.startswith("fsspec")).specifier
    backends = [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    backends = [r for r in backends if r.name in ("s3fs", "gcsfs", "adlfs")]
    assert {r.name for r in backends} >= {"s3fs", "gcsfs"}
    for requirement in backends:
        assert str(requirement.specifier) == str(fsspec_floor), requirement


def test_a_copy_streams_each_file_in_ranged_reads_in_parallel_never_whole(counting_fs, tmp_path):
    """A file of 4.5 chunks arrives byte-identical from 5 ranged reads of at most one chunk each (nothing read
    whole); two reads are in flight at once (a barrier both must reach, which serial reads never pass)."""
    import threading

    big, small = bytes(range(256)) * 18 + b"tail", b"{}"  # 4612 bytes
    storage.write_bytes("countmem://model/unet/weights.safetensors", big)
    storage.write_bytes("countmem://model/unet/config.json", small)
    together = threading.Barrier(2, timeout=30)
    counting_fs.before_read = lambda path, start, end: together.wait() if start in (0, 1024) and "weights" in path else None
    copied = storage.copy_tree_to_local("countmem://model", str(tmp_path), chunk_bytes=1024, workers=3)
    assert copied == ["unet/config.json", "unet/weights.safetensors"]
    assert (tmp_path / "unet" / "weights.safetensors").read_bytes() == big
    assert (tmp_path / "unet" / "config.json").read_bytes() == small
    ranges = sorted((s, e) for p, s, e in counting_fs.reads if p.endswith("weights.safetensors"))
    assert ranges == [(0, 1024), (1024, 2048), (2048, 3072), (3072, 4096), (4096, 4612)]


def test_a_copy_takes_only_the_paths_asked_for_and_names_missing_ones(counting_fs, tmp_path):
    storage.write_bytes("countmem://m/a.json", b"1")
    storage.write_bytes("countmem://m/big.ckpt", b"x" * 100)
    assert storage.copy_tree_to_local("countmem://m", str(tmp_path), paths=["a.json"]) == ["a.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    assert not any(p.endswith("big.ckpt") for p, _, _ in counting_fs.reads)
    with pytest.raises(storage.StorageError, match=r"countmem://m: no such file\(s\) to copy: b.json"):
        storage.copy_tree_to_local("countmem://m", str(tmp_path), paths=["b.json"])


def test_a_copy_from_an_object_store_is_one_ranged_get_per_chunk(s3_bucket, s3_server, tmp_path):
    data = bytes(range(256)) * 10_000  # 2.44 chunks of 1 MiB
    storage.write_bytes(f"{s3_bucket}/model/unet/w.safetensors", data)
    before = s3_server.by_method()
    storage.copy_tree_to_local(f"{s3_bucket}/model", str(tmp_path), chunk_bytes=1 << 20)
    after = s3_server.by_method()
    assert (tmp_path / "unet" / "w.safetensors").read_bytes() == data
    assert after["GET"] - before["GET"] == 1 + 3 and after["HEAD"] == before["HEAD"]  # the listing, 3 ranges
