"""Fault injection for the kill and node-loss tests: ``REALFAKE_FAULT=<point>:<n>`` stops a stage at an exact
point, so a test interrupts a run where it means to instead of racing a timer.

Points:

- ``finetune.checkpoint:<step>`` — rank 0 of the Ray Train run kills the driver right after the checkpoint of
  ``<step>`` is persisted, then waits to die with the job (no further step is checkpointed).
- ``finetune.checkpoint_hold:<step>``, ``train.checkpoint_hold:<epoch>`` — rank 0 of the Ray Train run stops
  (sleeps) right after the checkpoint of ``<step>`` / ``<epoch>`` is persisted, so a test can remove its
  node while it is known to be there; a run restored from that checkpoint never reaches it again.
- ``generate.manifest_part:<n>`` — the writer task that finds ``n`` manifest parts written kills the driver
  (tasks already running may add a few parts before Ray reaps them).
- ``generate.manifest_part_hold:<n>`` — every writer task that finds ``n`` manifest parts written waits there
  while the driver lives: the driver stays alive, holding the run's lease, in the middle of generating. Once a
  test kills the driver, the waiting tasks fail and free their CPUs.
- ``generate.sampler_error:<copy>`` — the generate actor's sampler raises on every batch of copy ``<copy>``
  (as a CUDA OOM would), so those images are failed rows that a rerun retries.

Unset (production), every check is one environment lookup.

Example:
    >>> fault_at("finetune.checkpoint", {"REALFAKE_FAULT": "finetune.checkpoint:8"})
    8
    >>> fault_at("generate.manifest_part", {"REALFAKE_FAULT": "finetune.checkpoint:8"}) is None
    True
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Mapping
from typing import NoReturn

__all__ = ["ENV", "POINTS", "fault_at", "kill_driver", "hold", "hold_while_alive"]

ENV = "REALFAKE_FAULT"
POINTS = ("finetune.checkpoint", "finetune.checkpoint_hold", "train.checkpoint_hold", "generate.manifest_part",
          "generate.manifest_part_hold", "generate.sampler_error")


def fault_at(point: str, environ: Mapping[str, str] | None = None) -> int | None:
    """The ``n`` of ``REALFAKE_FAULT=<point>:<n>`` when it names ``point``; None otherwise."""
    spec = (os.environ if environ is None else environ).get(ENV, "")
    if not spec:
        return None
    name, _, count = spec.rpartition(":")
    if name not in POINTS or not count.isdigit():
        raise ValueError(f"{ENV}={spec!r}: expected <point>:<n> with point one of {', '.join(POINTS)}")
    return int(count) if name == point else None


def kill_driver(pid: int) -> NoReturn:
    """SIGKILL the driver process ``pid`` (possibly this one) and never return: a Ray worker calling this
    dies with the job instead of making more progress."""
    print(f"[fault] {ENV}: killing the driver (pid {pid})", flush=True)
    os.kill(pid, signal.SIGKILL)
    while True:
        time.sleep(60)


def hold(point: str) -> NoReturn:
    """Stop here until this process is killed from outside (a test removes its node)."""
    print(f"[fault] {ENV}: holding at {point} until this worker is killed", flush=True)
    while True:
        time.sleep(60)


def hold_while_alive(pid: int, point: str) -> NoReturn:
    """Stop here while the driver process ``pid`` lives (a test kills it); then fail this task."""
    print(f"[fault] {ENV}: holding at {point} while the driver (pid {pid}) lives", flush=True)
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            raise RuntimeError(f"[fault] {ENV}: the driver (pid {pid}) is gone") from None
        time.sleep(0.2)
