"""Shared fixtures: an isolated model/dataset cache and one local Ray cluster per test session; and the rule
that a test starting Ray carries ``@pytest.mark.e2e``, so ``make test-fast`` (``-m "not e2e"``) runs exactly the
tests that need no Ray. Helper functions live in ``helpers.py``."""

from __future__ import annotations

import os
import tempfile

import pytest

# Before anything imports Ray or builds a preset: every process of this session shares this cache.
os.environ.setdefault("REALFAKE_CACHE", tempfile.mkdtemp(prefix="realfake-cache-"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Ray Train's controller polls its workers every 2 s, so each fit ends up to 2 s after its workers did (a
# trivial 1-worker fit: 12 s → 7-8 s here); the suite runs ~20 fits. Its preemption watcher (an extra actor
# process per fit) guards against spot-instance reclaims, which a test cluster never has.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

from helpers import forbid_ray_work  # noqa: E402  (after the environment above: it imports our modules)

# Fixtures that start (or share) a Ray cluster; a test using one, directly or through another fixture, is e2e.
RAY_FIXTURES = {"ray_cluster", "local_head"}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: every collected test is checked
def pytest_collection_modifyitems(config, items):
    """A test that uses a Ray fixture must be marked e2e, and a cluster_sim test e2e too (so that
    ``-m "not e2e"`` leaves out every test that starts Ray)."""
    wrong = []
    for item in items:
        marks = {mark.name for mark in item.iter_markers()}
        if "e2e" not in marks and (RAY_FIXTURES & set(getattr(item, "fixturenames", ())) or "cluster_sim" in marks):
            wrong.append(item.nodeid)
    if wrong:
        raise pytest.UsageError("these tests start Ray but are not marked @pytest.mark.e2e:\n  " + "\n  ".join(wrong))


@pytest.fixture(autouse=True)
def _ray_needs_the_e2e_mark(request, monkeypatch):
    """In a test not marked e2e, starting or joining Ray (ray.init, also through our init_ray or Ray Data's
    auto-init) fails the test, even while the session's cluster is up."""
    if request.node.get_closest_marker("e2e") is not None:
        return
    import ray

    def refuse(*_args, **_kwargs):
        raise AssertionError(f"{request.node.nodeid} starts Ray: mark it @pytest.mark.e2e (or keep it free of Ray)")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # a running session cluster is not joined silently


@pytest.fixture(scope="session")
def pyproject() -> dict:
    """The repository's parsed ``pyproject.toml``."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    with open(os.path.join(os.path.dirname(__file__), os.pardir, "pyproject.toml"), "rb") as fh:
        return tomllib.load(fh)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster (127.0.0.1) shared by every test that needs Ray."""
    import ray

    from realfake_ray._internal.cluster import init_ray
    from realfake_ray.config import RayConfig

    init_ray(RayConfig(num_cpus=4))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    """The tiny preset materialised in the session cache."""
    from realfake_ray.models.loading import resolve_model_dir

    return resolve_model_dir("preset:tiny")


@pytest.fixture(scope="session")
def tiny_bank(ray_cluster, tmp_path_factory) -> str:
    """A run directory whose latent bank holds the embedded digits (train + val), encoded once."""
    from realfake_ray.config import load_config
    from realfake_ray.stages.encode.driver import run_encode

    out = str(tmp_path_factory.mktemp("bank"))
    run_encode(load_config(preset="tiny", out=out))
    return out


@pytest.fixture
def no_ray(monkeypatch):
    """Fail loudly if the test reaches Ray (see :func:`forbid_ray_work`)."""
    forbid_ray_work(monkeypatch)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One local S3 server per session; this process's s3fs clients point at it while it runs."""
    from realfake_ray._internal.local_s3 import LocalS3

    server = LocalS3(str(tmp_path_factory.mktemp("s3") / "requests.log"))
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    yield server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request) -> str:
    """A fresh bucket on the session's S3 server, as ``s3://<name>``."""
    import re
    import uuid

    import fsspec

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir(name)
    return f"s3://{name}"


@pytest.fixture
def counting_fs():
    """A fresh in-memory fsspec filesystem under ``countmem://`` (not local: model URLs on it are copied) that
    records every read as ``(path, start, end)`` in ``.reads``; ``.before_read(path, start, end)``, when set,
    runs before each read (a test's gate or fault)."""
    import threading

    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class CountingMemoryFileSystem(MemoryFileSystem):
        protocol = ("countmem",)
        store: dict = {}
        pseudo_dirs = [""]
        reads: list = []
        before_read = None
        _reads_lock = threading.Lock()

        def cat_file(self, path, start=None, end=None, **kwargs):
            path = self._strip_protocol(path)
            with self._reads_lock:
                type(self).reads.append((path, start, end))
            if type(self).before_read is not None:
                type(self).before_read(path, start, end)
            return super().cat_file(path, start=start, end=end, **kwargs)

    fsspec.register_implementation("countmem", CountingMemoryFileSystem, clobber=True)
    yield CountingMemoryFileSystem
    CountingMemoryFileSystem.store.clear()
