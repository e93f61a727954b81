"""The one place that knows storage URLs.

Every input and output location is an fsspec URL: a plain path, ``file://``, ``s3://``, ``gs://``,
``memory://`` … Stages never touch ``os``/``open`` for data; they call these helpers, which also make
every write atomic (write to a temporary name beside the target, then rename).

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
import unicodedata
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs

_TMP_MARK = ".tmp-"
EMBEDDED_SCHEME = "embedded:"


def cache_dir(*parts: str) -> str:
    """Local per-node cache (``$REALFAKE_CACHE``, default ``~/.cache/realfake_ray``)."""
    root = os.environ.get("REALFAKE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "realfake_ray")
    return os.path.join(root, *parts)


def resolve_embedded(url: str) -> str:
    """Local path of an ``embedded:<name>/<sub/path>`` URL (materialising the dataset if needed)."""
    from realfake_ray.data import embedded

    name, _, sub = url[len(EMBEDDED_SCHEME) :].partition("/")
    root = embedded.materialise(name)
    return os.path.join(root, *sub.split("/")) if sub else root


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(fs, path)`` for a URL; plain paths become absolute local paths.

    ``embedded:<name>/...`` URLs name a dataset built into the package; it is materialised once per
    node into the local cache (deterministically), so every worker resolves it to the same files.
    """
    if url.startswith(EMBEDDED_SCHEME):
        url = resolve_embedded(url)
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


def protocol(url: str) -> str:
    """``"file"`` for plain paths, ``file://`` and ``embedded:``; the scheme otherwise."""
    if url.startswith(EMBEDDED_SCHEME):
        return "file"
    return url.split("://", 1)[0] if "://" in url else "file"


def is_local(url: str) -> bool:
    return protocol(url) in ("file", "local")


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


@contextmanager
def atomic_open(url: str, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of ``url`` for writing; rename it into place only on success."""
    fs, path = filesystem(url)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = posixpath.join(parent, f"{_TMP_MARK}{uuid.uuid4().hex}-{posixpath.basename(path)}")
    try:
        with fs.open(tmp, mode) as handle:
            yield handle
        fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


def write_bytes(url: str, data: bytes) -> None:
    with atomic_open(url, "wb") as handle:
        handle.write(data)


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def write_json(url: str, obj: Any) -> None:
    write_text(url, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def upload_file(local: str, url: str) -> None:
    """Copy a local file to ``url`` atomically."""
    with open(local, "rb") as src:
        write_bytes(url, src.read())


def remove(url: str, recursive: bool = False) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def copy_tree_to_local(url: str, local_dir: str) -> None:
    """Download every file below ``url`` into ``local_dir`` (keeping the relative layout)."""
    for file_url in find(url):
        rel = relative(file_url, url)
        target = os.path.join(local_dir, *rel.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as out:
            out.write(read_bytes(file_url))


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
