"""The one place that knows storage URLs.

Every input and output location is an fsspec URL: a plain path, ``file://``, ``s3://``, ``gs://``,
``memory://`` … Stages never touch ``os``/``open`` for data; they call these helpers, which also make
every write atomic: on disks a temporary name beside the target, then a rename; on object stores one
upload, since an object appears only when its upload completes (a rename there is copy + delete).

Example:
    >>> from realfake_ray import storage
    >>> storage.write_text("memory://demo/hello.txt", "hi")
    >>> storage.read_text(storage.join("memory://demo", "hello.txt"))
    'hi'
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import tempfile
import time
import unicodedata
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs

from realfake_ray.data import embedded

__all__ = [
    "EMBEDDED_SCHEME", "OBJECT_STORES", "StorageError", "cache_dir", "resolve_embedded", "filesystem", "anchor",
    "arrow_filesystem", "check_reachable", "protocol", "is_local", "is_object_store", "local_path", "join",
    "relative", "exists", "isdir", "makedirs", "find", "glob", "listdir", "open_file", "read_bytes", "read_text",
    "read_json", "write_bytes", "write_text", "write_json", "create_local", "upload_file", "written_from_local", "remove",
    "COPY_CHUNK_BYTES", "COPY_WORKERS", "copy_tree_to_local", "safe_name",
]

_TMP_MARK = ".tmp-"
EMBEDDED_SCHEME = "embedded:"
# Object stores: whole-object uploads are atomic, renames are not, and listings change under other writers.
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})
# s3fs reads a whole object with a HEAD (its size, to split large ones into concurrent ranges) and then a
# GET; our reads are images and small files, so one GET each (2 → 1 request per image read).
# s3fs >= 2024.6 (the extra's floor) knows max_concurrency; older releases hand it to botocore and fail.
_CLIENT_OPTIONS = {"s3": {"max_concurrency": 1}, "s3a": {"max_concurrency": 1}}


class StorageError(OSError):
    """A storage location that cannot be used (unreachable, refused, not found), named in the message."""


def cache_dir(*parts: str) -> str:
    """Local per-node cache (``$REALFAKE_CACHE``, default ``~/.cache/realfake_ray``)."""
    root = os.environ.get("REALFAKE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "realfake_ray")
    return os.path.join(root, *parts)


def resolve_embedded(url: str) -> str:
    """Local path of an ``embedded:<name>/<sub/path>`` URL (materialising the dataset if needed)."""
    name, _, sub = url[len(EMBEDDED_SCHEME) :].partition("/")
    root = embedded.materialise(name, cache_dir("datasets"))
    return os.path.join(root, *sub.split("/")) if sub else root


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(fs, path)`` for a URL; plain paths become absolute local paths.

    ``embedded:<name>/...`` URLs name a dataset built into the package; it is materialised once per
    node into the local cache (deterministically), so every worker resolves it to the same files.
    """
    if url.startswith(EMBEDDED_SCHEME):
        url = resolve_embedded(url)
    if is_object_store(url):
        # fsspec caches listings per process; stages list what other processes (Ray workers) just wrote.
        return url_to_fs(url, use_listings_cache=False, **_CLIENT_OPTIONS.get(protocol(url), {}))
    return url_to_fs(anchor(url))


def anchor(url: str) -> str:
    """A plain relative path made absolute against this process's working directory (``~`` expanded);
    any other URL unchanged. Ray workers run in other directories, so the driver anchors every local
    location of a config once (see :class:`realfake_ray.config.RunConfig`).

    Example:
        >>> anchor("s3://bucket/run"), anchor("/data/run"), anchor("runs/demo") == os.path.abspath("runs/demo")
        ('s3://bucket/run', '/data/run', True)
    """
    if "://" in url or url.startswith(EMBEDDED_SCHEME):
        return url
    return os.path.abspath(os.path.expanduser(url))


def arrow_filesystem(url: str):
    """``(pyarrow filesystem or None, path)`` for Ray APIs (Ray Train storage, Ray Data readers).

    Local URLs give ``(None, absolute path)``; other schemes wrap this module's fsspec filesystem, so
    Ray reaches exactly the storage the rest of the package does.
    """
    fs, path = filesystem(url)
    if is_local(url):
        return None, path
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fs)), path


def check_reachable(*urls: str, timeout_s: float = 20.0) -> None:
    """Fail fast, naming the URL, when a remote location does not answer or refuses us (a wrong endpoint, no
    network, no credentials): object-store clients would otherwise retry for minutes inside a stage.
    Local paths are not probed. All URLs are probed at once; a probe still waiting after ``timeout_s`` fails.

    Example:
        >>> check_reachable("/tmp", "memory://x")
    """
    import threading

    remote = list(dict.fromkeys(u for u in urls if u and not is_local(u)))
    errors: dict[str, BaseException] = {}

    def probe(url: str) -> None:
        try:
            fs, path = filesystem(url)
            fs.exists(path)
        except BaseException as exc:  # reported below, with the URL
            errors[url] = exc

    threads = {url: threading.Thread(target=probe, args=(url,), daemon=True) for url in remote}
    for thread in threads.values():
        thread.start()
    deadline = time.monotonic() + timeout_s
    for url, thread in threads.items():
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            raise StorageError(f"{url}: storage did not answer within {timeout_s:g} s (endpoint, network or "
                               "credentials?); nothing was started")
        if url in errors:
            exc = errors[url]
            raise StorageError(f"{url}: storage refused the first request: {type(exc).__name__}: {exc}") from exc


def protocol(url: str) -> str:
    """``"file"`` for plain paths, ``file://`` and ``embedded:``; the scheme otherwise."""
    if url.startswith(EMBEDDED_SCHEME):
        return "file"
    return url.split("://", 1)[0] if "://" in url else "file"


def is_local(url: str) -> bool:
    return protocol(url) in ("file", "local")


def is_object_store(url: str) -> bool:
    """``s3://``, ``gs://``, ``az://`` …: written with one upload per object, never temp + rename."""
    return protocol(url) in OBJECT_STORES


def local_path(url: str) -> str:
    """The local filesystem path of a ``file://`` or plain-path URL."""
    if not is_local(url):
        raise ValueError(f"{url!r} is not a local path")
    return filesystem(url)[1]


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL with ``/`` (keeps the scheme)."""
    out = url.rstrip("/") if url not in ("/", "") else url
    for part in parts:
        part = str(part).strip("/")
        if part:
            out = f"{out}/{part}" if out else part
    return out


def relative(url: str, root: str) -> str:
    """Path of ``url`` below ``root`` (both as the filesystem sees them), with ``/`` separators."""
    _, path = filesystem(url)
    _, base = filesystem(root)
    return posixpath.relpath(path, base)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def isdir(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.isdir(path)


def makedirs(url: str) -> None:
    fs, path = filesystem(url)
    fs.makedirs(path, exist_ok=True)


def find(url: str) -> list[str]:
    """All files below ``url`` as full URLs of the same scheme, sorted; temporary files are skipped."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return []
    files = sorted(fs.find(path))
    return [_unstrip(url, fs, f) for f in files if _TMP_MARK not in posixpath.basename(f)]


def glob(pattern: str) -> list[str]:
    """Files matching a glob pattern (``s3://b/data/train-*.parquet``) as full URLs of the same scheme, sorted.

    Example:
        >>> write_text("memory://glob-demo/a-1.txt", "x"); write_text("memory://glob-demo/b-1.txt", "y")
        >>> glob("memory://glob-demo/a-*.txt")
        ['memory://glob-demo/a-1.txt']
    """
    fs, path = filesystem(pattern)
    root = pattern[: pattern.index("*")].rsplit("/", 1)[0] if "*" in pattern else pattern.rsplit("/", 1)[0]
    base = filesystem(root)[1]
    found = sorted(fs.glob(path))
    return [root.rstrip("/") + "/" + posixpath.relpath(f, base) for f in found if _TMP_MARK not in posixpath.basename(f)]


def listdir(url: str) -> list[tuple[str, bool]]:
    """Immediate children of a directory as ``(name, is_dir)``, sorted by name."""
    fs, path = filesystem(url)
    entries = fs.ls(path, detail=True)
    out = [(posixpath.basename(e["name"].rstrip("/")), e["type"] == "directory") for e in entries]
    return sorted(o for o in out if o[0] and _TMP_MARK not in o[0])


def _unstrip(url: str, fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Express a filesystem path found below ``url`` in the caller's own spelling of ``url``."""
    return url.rstrip("/") + "/" + posixpath.relpath(path, filesystem(url)[1])


def open_file(url: str, mode: str = "rb") -> IO:
    fs, path = filesystem(url)
    return fs.open(path, mode)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return fs.cat_file(path)


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def read_json(url: str) -> Any:
    return json.loads(read_text(url))


def write_bytes(url: str, data: bytes) -> None:
    """Write ``data`` to ``url`` so that readers see the old object or the whole new one, never a part.

    Object stores: one upload (a single PUT for small objects, a multipart upload completed at the end
    for large ones). Disks and other filesystems: a temporary sibling, then a rename.
    """
    fs, path = filesystem(url)
    if is_object_store(url):
        fs.pipe_file(path, data)
        return
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = posixpath.join(parent, f"{_TMP_MARK}{uuid.uuid4().hex}-{posixpath.basename(path)}")
    try:
        with fs.open(tmp, "wb") as handle:
            handle.write(data)
        fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def write_json(url: str, obj: Any) -> None:
    write_text(url, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def create_local(url: str, data: bytes) -> bool:
    """Create the local file ``url`` holding ``data`` unless something is already there (then False).

    Of two processes creating the same file at once exactly one gets True: the data goes to a temporary
    sibling that is then hard-linked into place (a link never replaces a file). Readers see no file or the
    whole one. Local disks only; a filesystem without hard links raises its ``OSError``.

    Example:
        >>> import tempfile; target = os.path.join(tempfile.mkdtemp(), "lock.json")
        >>> create_local(target, b"first"), create_local(target, b"second"), read_text(target)
        (True, False, 'first')
    """
    path = local_path(url)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f"{_TMP_MARK}{uuid.uuid4().hex}-{os.path.basename(path)}")
    try:
        with open(tmp, "xb") as handle:
            handle.write(data)
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def upload_file(local: str, url: str) -> None:
    """Copy a local file to ``url`` atomically (one upload on object stores)."""
    if is_object_store(url):
        fs, path = filesystem(url)
        fs.put_file(local, path)
        return
    with open(local, "rb") as src:
        write_bytes(url, src.read())


@contextmanager
def written_from_local(url: str) -> Iterator[str]:
    """A local temporary path to write (a plot, an archive); uploaded to ``url`` when the block ends
    without an error (atomically, see :func:`upload_file`).

    Example:
        >>> with written_from_local("memory://run/plot.txt") as path:
        ...     _ = open(path, "w").write("hello")
        >>> read_text("memory://run/plot.txt")
        'hello'
    """
    with tempfile.TemporaryDirectory(prefix="realfake-") as tmp:
        local = os.path.join(tmp, posixpath.basename(url.rstrip("/")) or "file")
        yield local
        upload_file(local, url)


def remove(url: str, recursive: bool = False) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


COPY_CHUNK_BYTES = 64 << 20  # one ranged read (one ranged GET on object stores)
COPY_WORKERS = 4  # ranged reads in flight at once: at most COPY_WORKERS x COPY_CHUNK_BYTES in memory


def copy_tree_to_local(url: str, local_dir: str, paths: Iterable[str] | None = None,
                       chunk_bytes: int = COPY_CHUNK_BYTES, workers: int = COPY_WORKERS) -> list[str]:
    """Download the files below ``url`` — all of them, or the relative ``paths`` — into ``local_dir``, keeping
    the relative layout; returns the relative paths copied.

    Every file streams in ranged reads of ``chunk_bytes``, ``workers`` of them at a time across all files, each
    written at its offset: a large file (a 3.4 GB UNet) arrives in parallel ranges and is never held whole in
    memory. The listing gives the sizes (no request per file before its reads).

    Example:
        >>> write_bytes("memory://src/a/b.bin", b"x" * 10)
        >>> copy_tree_to_local("memory://src", tempfile.mkdtemp(), chunk_bytes=4)
        ['a/b.bin']
    """
    fs, root = filesystem(url)
    sizes = {posixpath.relpath(path, root): int(info["size"]) for path, info in fs.find(root, detail=True).items()
             if _TMP_MARK not in posixpath.basename(path)}
    wanted = sorted(sizes) if paths is None else sorted(paths)
    missing = [rel for rel in wanted if rel not in sizes]
    if missing:
        raise StorageError(f"{url}: no such file(s) to copy: {', '.join(missing[:5])}")
    ranges = []
    for rel in wanted:
        target = os.path.join(local_dir, *rel.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as out:
            out.truncate(sizes[rel])
        ranges += [(posixpath.join(root, rel), target, start, min(start + chunk_bytes, sizes[rel]))
                   for start in range(0, sizes[rel], chunk_bytes)]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(lambda r: _copy_range(fs, *r), ranges))
    return wanted


def _copy_range(fs: fsspec.AbstractFileSystem, path: str, target: str, start: int, end: int) -> None:
    data = fs.cat_file(path, start=start, end=end)
    if len(data) != end - start:
        raise StorageError(f"{path}: read {len(data)} bytes at offset {start}, expected {end - start} (changed while copied?)")
    fd = os.open(target, os.O_WRONLY)
    try:
        view = memoryview(data)
        while view:
            view = view[os.pwrite(fd, view, start + len(data) - len(view)):]
    finally:
        os.close(fd)


_UNSAFE = re.compile(r"[^A-Za-z0-9._\-]+")


def safe_name(name: str, max_len: int = 120) -> str:
    """A file-name component derived from data: no separators, no ``..``, ASCII, never empty.

    >>> safe_name("n01440764")
    'n01440764'
    >>> safe_name("../../etc/passwd")
    'etc_passwd-936d7c04'
    """
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    cleaned = _UNSAFE.sub("_", ascii_name).strip("._-")
    cleaned = re.sub(r"_+", "_", cleaned)
    cleaned = re.sub(r"\.{2,}", ".", cleaned)[:max_len]
    if not cleaned or cleaned != name:  # keep distinct inputs distinct ("a b" vs "a_b")
        cleaned = f"{cleaned}-{hashlib.sha1(name.encode('utf-8')).hexdigest()[:8]}".lstrip("-")
    return cleaned
