"""Connecting to Ray and sizing actor pools."""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager, nullcontext

import ray

from realfake_ray import storage
from realfake_ray._internal.addresses import free_port, is_loopback_address
from realfake_ray._internal.faults import worker_env
from realfake_ray._internal.quiet import QUIET_ENV
from realfake_ray.config import ActorPool, ConfigError, RayConfig

__all__ = [
    "init_ray", "state_api_address", "quiet_data", "train_logging", "quiet_train_worker", "cluster_gpus",
    "resolve_use_gpu",
    "gpus_per_actor", "node_types", "check_fits_a_node", "fit_cpu_pool", "actor_pool_kwargs",
    "ClusterTimeline",
]

log = logging.getLogger(__name__)

# Ray's switch for a single-machine cluster: its processes take 127.0.0.1 as the node address and bind their
# servers to it (otherwise Ray swaps 127.0.0.1 for the host's reachable address and listens on all interfaces).
_LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

# Environment every worker needs to resolve per-node caches and presets the same way as the driver.
_FORWARDED_ENV = ("REALFAKE_CACHE", "REALFAKE_LOG_LEVEL", "HF_HOME", "HF_HUB_OFFLINE", "HF_ENDPOINT")

# Where Ray's State API calls go. Without it a process finds "the" cluster by discovery — the newest one
# started on this machine, not the one it belongs to. With two clusters on one machine (two local runs, a
# test's cluster), Ray Train's placement-group cleaner then looked up its controller in the other
# cluster, found nothing, and removed the live run's placement group: the training workers died. So a
# local cluster's workers get the variable in their runtime environment (attached to a given GCS address,
# they get RAY_ADDRESS, which the State API resolves the same way); the driver's own State API calls name
# the address (state_api_address()). The driver's os.environ is left alone: a process it
# starts (another Ray cluster, a job) must not inherit an address of this cluster.
_STATE_API_ENV = "RAY_API_SERVER_ADDRESS"


def init_ray(cfg: RayConfig | None = None) -> None:
    """Connect to ``cfg.address`` / ``$RAY_ADDRESS``, or start a local cluster bound to 127.0.0.1.

    Inside ``ray job submit`` the job's driver is already attached to its cluster via ``RAY_ADDRESS``.
    Without an address a new local cluster always starts (``ray.address: auto`` joins a running one).
    """
    global _started_here
    cfg = cfg or RayConfig()
    quiet_data(cfg.verbose)
    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    env.setdefault("REALFAKE_CACHE", storage.cache_dir())
    env.update(worker_env())  # tests only: the fault this driver was started with, read where it fires
    # Ray Train v2 turns a worker's print() into a log record *and* a print: every line reached the driver twice.
    env.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if not cfg.verbose:
        env.update({k: v for k, v in QUIET_ENV.items() if k not in os.environ})
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    common = dict(runtime_env={"env_vars": env}, logging_level=logging.WARNING, log_to_driver=True)
    if address:
        if "://" not in address and address not in ("auto", "local"):
            env["RAY_ADDRESS"] = address  # the workers' State API calls find this cluster's dashboard through it
        # A cluster on this machine's loopback (another realfake process's, a test's): attach as a loopback
        # process too, or Ray swaps 127.0.0.1 for the host address, where that cluster does not listen.
        with _loopback_only() if is_loopback_address(address) else nullcontext():
            ray.init(address=address, **common)
    else:
        dashboard_port = free_port(preferred=8265)  # Ray's usual port unless another cluster holds it
        env[_STATE_API_ENV] = f"http://127.0.0.1:{dashboard_port}"
        with _loopback_only():
            ray.init(
                address="local",  # a new local cluster: never attach to (or wait on) one another session left behind
                num_cpus=cfg.num_cpus,
                # The dashboard serves Ray's State API, which Ray Train's placement-group cleaner polls every
                # second (without it: a warning per second in the job log).
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                dashboard_port=dashboard_port,
                _node_ip_address="127.0.0.1",
                **common,
            )
        _started_here = True


def state_api_address() -> str | None:
    """The State API (dashboard) URL of the cluster this process is connected to; None without one.
    Pass it as ``address=`` to ``ray.util.state`` calls (see ``_STATE_API_ENV``)."""
    url = ray._private.worker.get_dashboard_url() if ray.is_initialized() else None
    return "http://" + url.removeprefix("http://") if url else None


@contextmanager
def _loopback_only():
    """While a new local cluster starts: every Ray process of it (GCS, raylet, agents, workers, this driver)
    takes 127.0.0.1 as its node address and listens on loopback only. Ray reads the switch when a process
    imports it: the processes ray.init starts inherit the variable (workers inherit it from the raylet),
    this already-imported driver gets the constant. Both are restored afterwards, so a later connection to
    a real cluster from this process is unaffected."""
    from ray._private import ray_constants

    saved_env, saved_constant = os.environ.get(_LOOPBACK_ONLY_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_LOOPBACK_ONLY_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_constant
        if saved_env is None:
            os.environ.pop(_LOOPBACK_ONLY_ENV, None)
        else:
            os.environ[_LOOPBACK_ONLY_ENV] = saved_env


def quiet_data(verbose: bool = False) -> None:
    """Ray Data's progress bar when the console is a terminal or ``verbose``; its per-operator bars and
    per-execution log lines only when ``verbose``: in a job log (no terminal) every bar update is a new line,
    thousands per run, and our stages print their own progress lines there."""
    import sys

    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose or sys.stdout.isatty()
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


def resolve_use_gpu(setting: bool | str) -> bool:
    """A stage's ``use_gpu``: ``auto`` means GPUs when the cluster has them now."""
    return cluster_gpus() > 0 if setting == "auto" else bool(setting)


def gpus_per_actor(pool: ActorPool) -> float:
    """``auto``: one GPU per actor when the cluster has GPUs now; set 1 explicitly on clusters that
    autoscale GPU nodes from zero (the cluster has none until the pool asks for them)."""
    if pool.gpus_per_actor == "auto":
        return 1.0 if cluster_gpus() > 0 else 0.0
    return float(pool.gpus_per_actor)


_V1_AUTOSCALER_STATUS_KEY = b"__autoscaling_status"  # written by the v1 monitor every update


_started_here = False  # whether init_ray started this process's cluster (a local one: no autoscaler)


def _static_cluster() -> bool:
    """Whether the cluster's nodes are all it will ever have: one this process started, or one whose
    monitor runs read-only (a plain ``ray start`` head: the monitor then names every node type after its
    node, ``node_<id>``). A v1 autoscaler's report maps nodes to the type names of its cluster config; no
    report yet (a head that just started) is not taken as evidence either way."""
    import json

    from ray.autoscaler._private.util import format_readonly_node_type
    from ray.experimental.internal_kv import _internal_kv_get

    if _started_here:
        return True
    raw = _internal_kv_get(_V1_AUTOSCALER_STATUS_KEY)
    mapping = (json.loads(raw).get("autoscaler_report") or {}).get("node_type_mapping") if raw else None
    return bool(mapping) and all(name == format_readonly_node_type(node) for node, name in mapping.items())


def node_types() -> dict[str, dict[str, float]] | None:
    """The node shapes this cluster can ever have: ``{name: resources}``.

    With an autoscaler v2 (KubeRay, ``RAY_enable_autoscaler_v2=1``): its node types, launched or not. On a
    static cluster: the nodes alive now. None when that is unknown — a v1 autoscaler runs (Ray does not
    publish its node types and reports an infeasible request itself) or the head has not reported yet.
    """
    from ray._private.state import state

    config = state.get_cluster_config()
    if config is not None and config.node_group_configs:
        return {g.name or f"type {i}": {k: float(v) for k, v in g.resources.items()}
                for i, g in enumerate(config.node_group_configs) if g.max_count != 0}
    if not _static_cluster():
        return None
    shapes: dict[str, dict[str, float]] = {}
    for node in ray.nodes():
        if node.get("Alive"):
            res = {k: float(v) for k, v in node["Resources"].items() if k in ("CPU", "GPU") or k.startswith("accelerator_type")}
            shapes.setdefault(f"node {node.get('NodeManagerAddress', '?')}", res)
    return shapes


def check_fits_a_node(request: dict[str, float], field: str) -> None:
    """Refuse, before a stage starts, a per-actor / per-worker ``request`` (e.g. ``{"GPU": 2, "CPU": 1}``)
    that no node type of the cluster can ever hold: Ray would wait for it forever.

    Example:
        >>> check_fits_a_node({"GPU": 8}, "generate.actors.gpus_per_actor")  # doctest: +SKIP
        ConfigError: generate.actors.gpus_per_actor: one actor needs {GPU: 8} but no node type of this cluster ...
    """
    if not request.get("GPU"):
        return  # CPU-only pools are fitted to the cluster (fit_cpu_pool)
    types = node_types()
    if types is None or any(all(res.get(k, 0.0) >= v for k, v in request.items()) for res in types.values()):
        return
    listing = "; ".join(f"{name}: {_fmt(res)}" for name, res in types.items()) or "none"
    raise ConfigError(
        f"{field}: one {'actor' if 'actors' in field else 'worker'} needs {_fmt(request)} but no node type of this "
        f"cluster has that much ({listing}); lower {field} or add a node type that has it"
    )


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items()) if v) + "}"


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
    log.info(f"{field}: {pool.max_size} actors x {pool.cpus_per_actor:g} CPU would leave no CPU for the "
             f"stage's other tasks on this {cluster_cpus:g}-CPU cluster; using {fit}")
    return pool.model_copy(update={"min_size": min(pool.min_size, fit), "max_size": fit})


def actor_pool_kwargs(pool: ActorPool, field: str, reserve_cpus: float = 0.0) -> dict:
    """``map_batches`` keyword arguments for a callable-class stage on an actor pool (``field``: its
    config key, for messages). A CPU-only pool is fitted to the cluster (:func:`fit_cpu_pool`).

    A GPU pool asks for all its ``max_size`` actors at once (Ray Data's ``initial_size``): on an autoscaling
    cluster their pending resources make the autoscaler launch the GPU nodes together, and the pool's live
    actors grow as the nodes join. Started at ``min_size`` instead, Ray Data's cluster autoscaler still
    launched nodes up to the pool's maximum while the pool stayed at its one actor (measured:
    cluster/README.md), so nodes were paid for and idle. A CPU pool starts at ``min_size`` (Ray's default).
    """
    from ray.data import ActorPoolStrategy

    gpus = gpus_per_actor(pool)
    check_fits_a_node({"GPU": gpus, "CPU": pool.cpus_per_actor}, f"{field}.gpus_per_actor")
    if gpus == 0:
        pool = fit_cpu_pool(pool, float(ray.cluster_resources().get("CPU", 0.0)), reserve_cpus, field)
    initial = pool.max_size if gpus > 0 else None
    return dict(
        compute=ActorPoolStrategy(min_size=pool.min_size, max_size=pool.max_size, initial_size=initial),
        num_gpus=gpus,
        num_cpus=pool.cpus_per_actor,
        # tests only: a fault set in this driver after its cluster started still reaches this pool's actors
        **({"runtime_env": {"env_vars": worker_env()}} if worker_env() else {}),
    )


class ClusterTimeline:
    """Samples, every ``every_s`` seconds on a background thread while a stage runs, the cluster's alive
    nodes, the stage's actors of ``actor_class`` alive and still pending (waiting for a node, or in their
    constructor; Ray's State API, None without a dashboard) and ``progress()`` (e.g. images written).
    ``stop()`` returns the points: ``{"t", "images", "nodes", "actors", "actors_pending"}``.
    """

    def __init__(self, progress, actor_class: str = "SynthesisActor", every_s: float = 2.0) -> None:
        import threading

        self._progress, self._actor_class, self._every_s = progress, actor_class, every_s
        self._started = time.time()
        self._job = ray.get_runtime_context().get_job_id()
        self.points: list[dict] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="cluster-timeline")
        self._thread.start()

    def _run(self) -> None:
        while True:
            self.points.append(self._sample())
            if self._done.wait(self._every_s):
                return

    def _sample(self) -> dict:
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        try:
            from ray.util.state import list_actors

            listed = list_actors(filters=[("state", "!=", "DEAD"), ("job_id", "=", self._job)], limit=10_000,
                                 raise_on_missing_output=False, timeout=5, address=state_api_address())
            ours = [a.state for a in listed if self._actor_class in (a.class_name or "")]
            actors, pending = ours.count("ALIVE"), sum(1 for state in ours if state != "ALIVE")
        except Exception:  # no dashboard (State API) on this cluster: the node count still tells the story
            actors = pending = None
        return {"t": round(time.time() - self._started, 1), "images": int(self._progress()), "nodes": nodes,
                "actors": actors, "actors_pending": pending}

    def stop(self) -> list[dict]:
        self._done.set()
        self._thread.join()
        self.points.append(self._sample())
        return self.points
