"""Fault injection for the kill and node-loss tests: ``REALFAKE_FAULT=<point>:<n>`` stops a stage at an exact
point, so a test interrupts a run where it means to instead of racing a timer.

Points:

- ``finetune.checkpoint:<step>`` — rank 0 of the Ray Train run kills the driver right after the checkpoint of
  ``<step>`` is persisted, then waits to die with the job (no further step is checkpointed).
- ``finetune.checkpoint_hold:<step>``, ``train.checkpoint_hold:<epoch>`` — rank 0 of the Ray Train run stops
  (sleeps) right after the checkpoint of ``<step>`` / ``<epoch>`` is persisted, so a test can remove its
  node while it is known to be there; a run restored from that checkpoint never reaches it again.
- ``generate.shard:<n>`` — the generate actor that finds ``n`` shards written (after writing one) kills the
  driver (actors still sampling may add a shard or two before Ray reaps them).
- ``generate.shard_hold:<n>`` — every generate actor that finds ``n`` shards written (after writing one) waits
  there while the driver lives: the driver stays alive, holding the run's lease, in the middle of generating.
  Once a test kills the driver, the waiting actors fail and free their resources.
- ``generate.sampler_error:<copy>`` — the generate actor's sampler raises on every batch of copy ``<copy>``
  (as a CUDA OOM would), so those images are failed rows that a rerun retries.

Unset (production), every check is one environment lookup. Each point is read where it fires (a Ray Train
worker, a writer task), never carried in a plan: the driver's :func:`~realfake_ray._internal.cluster.init_ray`
hands :func:`worker_env` (the spec and the driver's pid) to every worker of its job, and the workers of a
cluster started by a process that has the variable inherit it.

Example:
    >>> fault_at("finetune.checkpoint", {"REALFAKE_FAULT": "finetune.checkpoint:8"})
    8
    >>> fault_at("generate.shard", {"REALFAKE_FAULT": "finetune.checkpoint:8"}) is None
    True
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Mapping
from typing import NoReturn

__all__ = ["ENV", "DRIVER_PID_ENV", "POINTS", "fault_at", "worker_env", "kill_driver", "hold", "kill_driver_at",
           "hold_at", "hold_while_driver_lives"]

log = logging.getLogger(__name__)

ENV = "REALFAKE_FAULT"
DRIVER_PID_ENV = "REALFAKE_FAULT_DRIVER_PID"  # set for the workers by worker_env(): whom kill_driver() kills
POINTS = ("finetune.checkpoint", "finetune.checkpoint_hold", "train.checkpoint_hold", "generate.shard",
          "generate.shard_hold", "generate.sampler_error")


def fault_at(point: str, environ: Mapping[str, str] | None = None) -> int | None:
    """The ``n`` of ``REALFAKE_FAULT=<point>:<n>`` when it names ``point``; None otherwise."""
    spec = (os.environ if environ is None else environ).get(ENV, "")
    if not spec:
        return None
    name, _, count = spec.rpartition(":")
    if name not in POINTS or not count.isdigit():
        raise ValueError(f"{ENV}={spec!r}: expected <point>:<n> with point one of {', '.join(POINTS)}")
    return int(count) if name == point else None


def worker_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """What a driver's workers need to inject this process's fault: ``REALFAKE_FAULT`` and this process's pid
    (the driver to kill); empty when no fault is set (production).

    Example:
        >>> worker_env({})
        {}
    """
    spec = (os.environ if environ is None else environ).get(ENV, "")
    return {ENV: spec, DRIVER_PID_ENV: str(os.getpid())} if spec else {}


def kill_driver(pid: int | None = None) -> NoReturn:
    """SIGKILL the driver process ``pid`` (default: the one :func:`worker_env` named, else this process) and
    never return: a Ray worker calling this dies with the job instead of making more progress."""
    if pid is None:
        pid = int(os.environ.get(DRIVER_PID_ENV) or os.getpid())
    log.info(f"{ENV}: killing the driver (pid {pid})")
    os.kill(pid, signal.SIGKILL)
    while True:
        time.sleep(60)


def hold(point: str) -> NoReturn:
    """Stop here until this process is killed from outside (a test removes its node)."""
    log.info(f"{ENV}: holding at {point} until this worker is killed")
    while True:
        time.sleep(60)


def kill_driver_at(point: str, n: int) -> None:
    """:func:`kill_driver` when ``REALFAKE_FAULT`` is ``<point>:<n>``; otherwise return at once."""
    if fault_at(point) == n:
        kill_driver()


def hold_at(point: str, n: int) -> None:
    """:func:`hold` when ``REALFAKE_FAULT`` is ``<point>:<n>``; otherwise return at once."""
    if fault_at(point) == n:
        hold(f"{point}:{n}")


def hold_while_driver_lives(point: str, pid: int | None = None) -> NoReturn:
    """Stop here while the driver process ``pid`` (default: the one :func:`worker_env` named) lives; once a
    test kills it, fail this task or actor call."""
    if pid is None:
        pid = int(os.environ.get(DRIVER_PID_ENV) or os.getpid())
    log.info(f"{ENV}: holding at {point} while the driver (pid {pid}) lives")
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            raise RuntimeError(f"[fault] {ENV}: the driver (pid {pid}) is gone") from None
        time.sleep(0.2)
