"""Ray Train runs that survive a lost worker the way a resubmitted job does: through the driver.

finetune and train seed every epoch's data order from the epoch a run starts at (Ray Data reseeds per
execution, counting from there). A restart inside Ray Train (``FailureConfig.max_failures``, and node
preemptions, which Ray Train 2.60 retries without limit) re-runs the datasets from the epoch the driver
planned, so a worker restored from a later checkpoint would train on another epoch's order — and skip the
wrong batches when it resumes inside an epoch. So:

- Ray Train gets ``max_failures=0``: a failed worker group comes back to the driver;
- a worker that Ray Train restores from a checkpoint newer than the one the driver planned refuses to
  train (:class:`RestoreFromDriver`, raised by ``checkpoints.resume_checkpoint``);
- :func:`fit_with_restarts` then re-plans from the newest complete checkpoint and fits again, up to
  ``max_restarts`` times — for lost workers only (a dead actor or node, a failed health check, a refused
  in-run restore); an error in the training code fails at once.

A restarted run therefore trains on exactly the data an undisturbed run would have, and ends at the same
step.

Example:
    >>> result, restarts = fit_with_restarts(lambda restart: make_trainer().fit(), 3, "finetune")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import TypeVar

from realfake_ray import storage
from realfake_ray.plots import plot_curves

__all__ = [
    "T", "RestoreFromDriver", "is_lost_worker", "lost_workers", "fit_with_restarts", "all_reduce_sum",
    "all_gather_objects", "write_metrics", "read_metrics", "write_curves", "ordered_data_config",
    "count_epochs_from",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


class RestoreFromDriver(RuntimeError):
    """Raised in a Ray Train worker that was restored from a checkpoint the driver did not plan with."""


def is_lost_worker(error: BaseException) -> bool:
    """Whether one worker's failure means its process or node went away (worth a restart), as opposed to an
    error in the training code (which would fail again)."""
    from ray.exceptions import NodeDiedError, RayActorError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    return isinstance(error, (RestoreFromDriver, RayActorError, NodeDiedError, WorkerHealthCheckFailedError))


def lost_workers(error: BaseException) -> list[int]:
    """Ranks whose failure in a Ray Train ``WorkerGroupError`` is a lost worker; [] for any other error."""
    from ray.train.v2.api.exceptions import WorkerGroupError

    if not isinstance(error, WorkerGroupError):
        return []
    return sorted(rank for rank, failure in error.worker_failures.items() if is_lost_worker(failure))


def fit_with_restarts(fit: Callable[[int], T], max_restarts: int, what: str) -> tuple[T, int]:
    """``fit(restart)`` (restart 0 = the first fit; every later one must plan from the newest checkpoint),
    called again after a lost worker, at most ``max_restarts`` times (-1: without limit); returns its result
    and the restarts used. Any other error propagates at once."""
    restarts = 0
    while True:
        try:
            return fit(restarts), restarts
        except Exception as error:
            ranks = lost_workers(error)
            if not ranks or restarts == max_restarts:
                raise
            restarts += 1
            limit = "unlimited" if max_restarts < 0 else max_restarts
            log.warning(f"lost worker(s) {ranks}; restarting from the newest checkpoint ({restarts}/{limit})",
                        extra={"tag": what})


# ------------------------------------------------------------------ helpers both Ray Train loops share


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(values):
    """A tensor summed over every worker of the group (itself outside a multi-worker group)."""
    import torch.distributed as dist

    if _distributed():
        values = values.clone()
        dist.all_reduce(values)
    return values


def all_gather_objects(obj) -> list:
    """``obj`` of every worker, in rank order (``[obj]`` outside a multi-worker group)."""
    import torch.distributed as dist

    if not _distributed():
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def write_metrics(url: str, rows: list[dict]) -> None:
    """``rows`` as JSON lines at ``url`` (an atomic rewrite)."""
    storage.write_text(url, "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))


def read_metrics(url: str) -> list[dict]:
    """The rows of a JSON-lines file written by :func:`write_metrics`; [] when there is none yet."""
    if not storage.exists(url):
        return []
    return [json.loads(line) for line in storage.read_text(url).splitlines() if line.strip()]


def write_curves(url: str, rows: list[dict], x: str, keys: list[str], title: str, logy: bool = False) -> str:
    """A PNG of ``keys`` over ``x`` from metric rows, written to ``url``."""

    with storage.written_from_local(url) as local:
        plot_curves(rows, x, keys, local, title=title, logy=logy)
    return url


def ordered_data_config(dataset: str = "train"):
    """A Ray Train ``DataConfig`` that keeps ``dataset``'s order: each epoch's seeded permutation is split
    between the workers the same way every time (no reordering by task completion), so a run is reproducible
    and a resumed run sees what an uninterrupted one sees."""
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    options = ExecutionOptions()
    options.preserve_order = True
    return DataConfig(execution_options={dataset: options})


def count_epochs_from(ds, first_epoch: int):
    """``ds`` with Ray Data's execution count starting at ``first_epoch``: its ``reseed_after_execution``
    draws are seeded from (seed, execution index), so epoch e of a run resumed at e draws what epoch e of an
    uninterrupted run draws. Returns ``ds``."""
    ds.context._execution_idx = first_epoch  # Ray's counter; no public setter in Ray 2.60
    return ds
