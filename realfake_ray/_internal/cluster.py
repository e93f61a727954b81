"""Connecting to Ray and sizing actor pools."""

from __future__ import annotations

import logging
import os

import ray

from realfake_ray import storage
from realfake_ray._internal.quiet import QUIET_ENV
from realfake_ray.config import ActorPool, ConfigError, RayConfig

# Environment every worker needs to resolve per-node caches and presets the same way as the driver.
_FORWARDED_ENV = ("REALFAKE_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "HF_ENDPOINT")


def init_ray(cfg: RayConfig | None = None) -> None:
    """Connect to ``cfg.address`` / ``$RAY_ADDRESS``, or start a local cluster bound to 127.0.0.1.

    Inside ``ray job submit`` the job's driver is already attached to its cluster via ``RAY_ADDRESS``.
    Without an address a new local cluster always starts (``ray.address: auto`` joins a running one).
    """
    cfg = cfg or RayConfig()
    quiet_data(cfg.verbose)
    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    env.setdefault("REALFAKE_CACHE", storage.cache_dir())
    # Ray Train v2 turns a worker's print() into a log record *and* a print: every line reached the driver twice.
    env.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if not cfg.verbose:
        env.update({k: v for k, v in QUIET_ENV.items() if k not in os.environ})
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    common = dict(runtime_env={"env_vars": env}, logging_level=logging.WARNING, log_to_driver=True)
    if address:
        ray.init(address=address, **common)
    else:
        ray.init(
            address="local",  # a new local cluster: never attach to (or wait on) one another session left behind
            num_cpus=cfg.num_cpus,
            # The dashboard serves Ray's State API, which Ray Train's placement-group cleaner polls every second
            # (without it: a warning per second in the job log). It listens on 127.0.0.1 only.
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            _node_ip_address="127.0.0.1",
            **common,
        )


def quiet_data(verbose: bool = False) -> None:
    """Ray Data's progress bars and per-execution log lines only when ``verbose``: in a job log (no
    terminal) every bar update is a new line, thousands per run. Our stages print their own progress."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.enable_operator_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    ctx.enable_auto_log_stats = verbose
    logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.WARNING)


def train_logging(verbose: bool = False):
    """Ray Train's own log lines (worker group set-up, every report) only with ``--verbose``."""
    import ray.train

    return ray.train.LoggingConfig(log_level="INFO" if verbose else "WARNING")


def quiet_train_worker(verbose: bool = False) -> None:
    """In a Ray Train worker: the INFO line per ``report`` ("Reporting training result ...") only with
    ``--verbose``. Ray logs it under its context module's file path, outside ``LoggingConfig``'s reach."""
    if verbose:
        return
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


def gpus_per_actor(pool: ActorPool) -> float:
    """``auto``: one GPU per actor when the cluster has GPUs now; set 1 explicitly on clusters that
    autoscale GPU nodes from zero (the cluster has none until the pool asks for them)."""
    if pool.gpus_per_actor == "auto":
        return 1.0 if cluster_gpus() > 0 else 0.0
    return float(pool.gpus_per_actor)


def fit_cpu_pool(pool: ActorPool, cluster_cpus: float, reserve_cpus: float, field: str) -> ActorPool:
    """A CPU-only pool shrunk to what ``cluster_cpus`` hold next to ``reserve_cpus`` for the stage's tasks.

    Ray Data waits for ``min_size`` actors; if they took every CPU, the stage's read and write tasks
    would never be scheduled and the stage would hang. Raises ``ConfigError`` when not even one fits.

    Example:
        >>> fit_cpu_pool(ActorPool(min_size=2, max_size=2, cpus_per_actor=0.75), 2.0, 0.5, "generate.actors").max_size
        2
    """
    if pool.cpus_per_actor <= 0:
        return pool
    fit = int((cluster_cpus - reserve_cpus) // pool.cpus_per_actor)
    if fit >= pool.max_size:
        return pool
    if fit < 1:
        raise ConfigError(
            f"{field}.cpus_per_actor={pool.cpus_per_actor:g}: the cluster has {cluster_cpus:g} CPUs and the "
            f"stage's other tasks need {reserve_cpus:g}; lower {field}.cpus_per_actor"
        )
    print(f"[ray] {field}: {pool.max_size} actors x {pool.cpus_per_actor:g} CPU would leave no CPU for the "
          f"stage's other tasks on this {cluster_cpus:g}-CPU cluster; using {fit}", flush=True)
    return pool.model_copy(update={"min_size": min(pool.min_size, fit), "max_size": fit})


def actor_pool_kwargs(pool: ActorPool, field: str, reserve_cpus: float = 0.0) -> dict:
    """``map_batches`` keyword arguments for a callable-class stage on an actor pool (``field``: its
    config key, for messages). A CPU-only pool is fitted to the cluster (:func:`fit_cpu_pool`)."""
    from ray.data import ActorPoolStrategy

    gpus = gpus_per_actor(pool)
    if gpus == 0:
        pool = fit_cpu_pool(pool, float(ray.cluster_resources().get("CPU", 0.0)), reserve_cpus, field)
    return dict(
        compute=ActorPoolStrategy(min_size=pool.min_size, max_size=pool.max_size),
        num_gpus=gpus,
        num_cpus=pool.cpus_per_actor,
    )
