"""Shared fixtures: an isolated model/dataset cache and one local Ray cluster per test session."""

from __future__ import annotations

import os
import tempfile

import pytest

# Before anything imports Ray or builds a preset: every process of this session shares this cache.
os.environ.setdefault("REALFAKE_CACHE", tempfile.mkdtemp(prefix="realfake-cache-"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


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
    from realfake_ray.encode import run_encode

    out = str(tmp_path_factory.mktemp("bank"))
    run_encode(load_config(preset="tiny", out=out))
    return out


def forbid_ray_work(mp: pytest.MonkeyPatch) -> None:
    """Make any start of Ray fail the test: bad input is reported, and a complete stage returns its
    stored result, before any Ray work."""

    def boom(*_args, **_kwargs):
        raise AssertionError("Ray work started (expected: an error before any work, or the stored result)")

    mp.setattr("realfake_ray._internal.cluster.init_ray", boom)


@pytest.fixture
def no_ray(monkeypatch):
    """Fail loudly if the test reaches Ray (see :func:`forbid_ray_work`)."""
    forbid_ray_work(monkeypatch)
