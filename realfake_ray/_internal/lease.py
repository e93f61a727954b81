"""One job per run URL at a time: a lease at ``<out>/_lease.json`` (owner + heartbeat).

Two jobs writing below one ``--out`` at once would generate the same images and record them twice, so every
stage entry point (and the tools that write below a run) holds the run's lease while it works
(:func:`takes_run_lease`). Taking it:

- no lease, or a stale one → this job writes its own and goes on. Stale: the heartbeat is older than
  ``$REALFAKE_LEASE_TIMEOUT_S`` (default 60 s), or the owner ran on this machine and its process is gone
  (a crashed or killed driver). Taking over a stale lease prints whose it was and how old its heartbeat was.
- a fresh lease of another job → :class:`LeaseHeldError` at once, naming that job (host, pid, Ray job,
  command, since when), the lease URL and what to do.

Two jobs starting together: on local disks the lease is created with a hard link, which only one process can
win; elsewhere (object stores, ``memory://``) each writes its lease, waits ``$REALFAKE_LEASE_SETTLE_S``
(default 1 s) and reads it back: the one whose token is stored goes on, the other fails as above. A
background thread rewrites the heartbeat every ``timeout / 12`` seconds (5 s by default); leaving the
``with`` block (also by an exception) stops it and deletes the lease. The lease is re-entrant within one
process: the pipeline holds it while its stages, which take it too, run.

Example:
    >>> with run_lease("memory://lease-demo/run", LeaseSettings(settle_s=0)) as lease:
    ...     storage.read_json(lease.url)["owner"]["pid"] == os.getpid()
    True
    >>> storage.exists("memory://lease-demo/run/_lease.json")
    False
"""

from __future__ import annotations

import logging
import functools
import json
import os
import secrets
import shlex
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from realfake_ray import storage
from realfake_ray.layout import RunLayout

__all__ = ["TIMEOUT_ENV", "SETTLE_ENV", "LeaseSettings", "LeaseHeldError", "LeaseLostError", "RunLease",
           "run_lease", "takes_run_lease", "this_process"]

log = logging.getLogger(__name__)

TIMEOUT_ENV = "REALFAKE_LEASE_TIMEOUT_S"
SETTLE_ENV = "REALFAKE_LEASE_SETTLE_S"
_FORMAT = 1
_F = TypeVar("_F", bound=Callable[..., Any])


class LeaseHeldError(RuntimeError):
    """Another job holds the run's lease (the message names it and says what to do)."""


class LeaseLostError(RuntimeError):
    """This job's lease was taken over (or deleted) while it ran: another job may have written below the run."""


@dataclass(frozen=True)
class LeaseSettings:
    """``timeout_s``: a heartbeat older than this is stale; ``settle_s``: the pause between writing a lease and
    reading it back where no exclusive create exists. The heartbeat runs every ``timeout_s / 12``."""

    timeout_s: float = 60.0
    settle_s: float = 1.0

    @property
    def heartbeat_s(self) -> float:
        return self.timeout_s / 12

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LeaseSettings:
        """Settings from ``$REALFAKE_LEASE_TIMEOUT_S`` / ``$REALFAKE_LEASE_SETTLE_S`` (defaults where unset).

        Example:
            >>> LeaseSettings.from_env({"REALFAKE_LEASE_TIMEOUT_S": "120"})
            LeaseSettings(timeout_s=120.0, settle_s=1.0)
        """
        env = os.environ if environ is None else environ
        return cls(timeout_s=_seconds(env, TIMEOUT_ENV, cls.timeout_s, minimum=1.0),
                   settle_s=_seconds(env, SETTLE_ENV, cls.settle_s, minimum=0.0))


def _seconds(env: Mapping[str, str], name: str, default: float, minimum: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value >= minimum:
        raise ValueError(f"{name}={raw!r}: expected a number of seconds >= {minimum:g}")
    return value


def this_process() -> dict:
    """Who holds a lease taken here: host, pid, the process scope (boot id + pid namespace: where the pid
    means this process), the Ray job id and job submission id when there are any, and the command."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "scope": _process_scope(),
            "ray_job_id": os.environ.get("RAY_JOB_ID"), "ray_submission_id": _submission_id(),
            "command": shlex.join(sys.argv)[:500]}


def _process_scope() -> str:
    """Two processes whose scopes are equal (and non-empty) see each other's pids: same boot, same pid
    namespace (containers on one host share the boot id and hostname, not the pid namespace)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            boot = handle.read().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


def _submission_id() -> str | None:
    """The id of ``ray job submit``'s job: its supervisor hands the driver the job's metadata."""
    try:
        return json.loads(os.environ["RAY_JOB_CONFIG_JSON_ENV_VAR"])["metadata"]["job_submission_id"]
    except (KeyError, TypeError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _describe(owner: Mapping) -> str:
    if not owner:
        return "an owner this version cannot read"
    parts = [f"host {owner.get('host')}", f"pid {owner.get('pid')}"]
    if owner.get("ray_submission_id"):
        parts.append(f"Ray job submission {owner['ray_submission_id']}")
    if owner.get("ray_job_id"):
        parts.append(f"Ray job {owner['ray_job_id']}")
    return ", ".join(parts) + (f", command {owner['command']!r}" if owner.get("command") else "")


class RunLease:
    """The lease of one run URL, taken by :meth:`acquire` and given back by :meth:`release` (or as a context
    manager). Not re-entrant: :func:`run_lease` is. ``clock`` / ``sleep`` are for tests."""

    def __init__(self, out: str, settings: LeaseSettings | None = None, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.out = out
        self.url = RunLayout(out).lease_url()
        self.settings = settings or LeaseSettings.from_env()
        self.token = secrets.token_hex(16)
        self.owner = this_process()
        self.lost: dict | None = None  # what the heartbeat found instead of this lease
        self._clock, self._sleep = clock, sleep
        self._acquired_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RunLease:
        self.acquire()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release(raise_if_lost=exc_type is None)

    def acquire(self) -> None:
        """Take the lease or raise :class:`LeaseHeldError`; start the heartbeat."""
        storage.check_reachable(self.url)
        current = self._read()
        stale = self._stale_reason(current) if current is not None else None
        if current is not None and stale is None:
            raise LeaseHeldError(self._held_message(current))
        self._acquired_at = self._clock()
        if not (current is None and self._create_exclusive()):
            self._write_and_check()
        if current is not None:
            log.info(f"took over {self.url} from {_describe(current.get('owner') or {})}: {stale}")
        self._thread = threading.Thread(target=self._beat, name=f"lease-heartbeat {self.url}", daemon=True)
        self._thread.start()

    def release(self, raise_if_lost: bool = True) -> None:
        """Stop the heartbeat and delete the lease if it is still this job's; then, if it was lost on the way
        and ``raise_if_lost``, raise :class:`LeaseLostError`."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            stored = self._read() if self.lost is None else self.lost
            if stored is not None and stored.get("token") == self.token:
                storage.remove(self.url)
            else:
                self.lost = stored or {}
        except Exception as exc:
            if raise_if_lost:
                raise
            log.warning(f"could not delete {self.url} ({type(exc).__name__}: {exc}): it goes stale after "
                        f"{self.settings.timeout_s:g} s")
            return
        if self.lost is not None:
            if raise_if_lost:
                raise LeaseLostError(self._lost_message())
            log.warning(self._lost_message())

    def _record(self) -> bytes:
        now = self._clock()
        return json.dumps({"format": _FORMAT, "token": self.token, "owner": self.owner,
                           "acquired_at": self._acquired_at, "acquired_utc": _utc(self._acquired_at),
                           "heartbeat_at": now, "heartbeat_utc": _utc(now), "heartbeat_s": self.settings.heartbeat_s},
                          indent=2).encode()

    def _read(self) -> dict | None:
        """The stored lease; None when there is none; ``{}`` when it is not a lease this code can read."""
        try:
            record = json.loads(storage.read_bytes(self.url))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}
        return record if isinstance(record, dict) else {}

    def _stale_reason(self, record: dict) -> str | None:
        """Why ``record`` may be taken over, or None while its owner counts as alive."""
        owner = record.get("owner") or {}
        heartbeat = record.get("heartbeat_at")
        if not isinstance(heartbeat, (int, float)) or not isinstance(owner.get("pid"), int):
            return "it is not a lease this version can read"
        age = f"its last heartbeat was {self._clock() - heartbeat:.0f} s old"
        if owner.get("scope") and owner["scope"] == self.owner["scope"] and not _pid_alive(owner["pid"]):
            return f"its process (pid {owner['pid']} on this machine) is gone; {age}"
        # A holder beats every heartbeat_s of its own settings: never call it stale before three are missed.
        their_beat = record.get("heartbeat_s")
        timeout = max(self.settings.timeout_s, 3 * their_beat if isinstance(their_beat, (int, float)) else 0)
        if self._clock() - heartbeat > timeout:
            return f"{age} (timeout {timeout:g} s, {TIMEOUT_ENV})"
        return None

    def _create_exclusive(self) -> bool:
        """On local disks: create the lease where none is (True), or fail naming the job that just did."""
        if not storage.is_local(self.url):
            return False
        try:
            created = storage.create_local(self.url, self._record())
        except OSError:  # no hard links on this filesystem: write and read back instead
            return False
        if not created:
            raise LeaseHeldError(self._held_message(self._read() or {}))
        return True

    def _write_and_check(self) -> None:
        """Write this lease, wait ``settle_s``, read it back: another job that wrote after us holds it."""
        storage.write_bytes(self.url, self._record())
        self._sleep(self.settings.settle_s)
        stored = self._read()
        if stored is None or stored.get("token") != self.token:
            raise LeaseHeldError(self._held_message(stored or {}))

    def _beat(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_s):
            try:
                stored = self._read()
                if stored is None or stored.get("token") != self.token:
                    self.lost = stored or {}
                    log.warning(f"LOST {self.url}: {self._lost_message()}")
                    return
                storage.write_bytes(self.url, self._record())
            except Exception as exc:  # a storage hiccup: the next beat tries again, well within the timeout
                log.warning(f"heartbeat of {self.url} failed ({type(exc).__name__}: {exc}); retrying")

    def _held_message(self, record: dict) -> str:
        owner = record.get("owner") or {}
        since = record.get("acquired_at")
        heartbeat = record.get("heartbeat_at")
        when = f" since {_utc(since)}" if isinstance(since, (int, float)) else ""
        beat = (f" (last heartbeat {max(0.0, self._clock() - heartbeat):.0f} s ago)"
                if isinstance(heartbeat, (int, float)) else "")
        return (f"{self.out} is in use by another job ({_describe(owner)}){when}{beat}; "
                f"its lease is {self.url}. Two jobs on one run would write the same files and record them twice. "
                f"Wait for that job to end, or give this one another --out. If you are sure that job is dead, delete "
                f"{self.url}; a lease whose heartbeat is older than {self.settings.timeout_s:g} s ({TIMEOUT_ENV}) "
                "is taken over by the next job on its own.")

    def _lost_message(self) -> str:
        owner = (self.lost or {}).get("owner")
        by = f"taken over by {_describe(owner)}" if owner else "deleted by someone else"
        return (f"the lease {self.url} of this job ({_describe(self.owner)}) was {by} while it ran (its heartbeat "
                f"stalled past the timeout?): another job may have written below {self.out} at the same time; "
                "check that no other job runs, then rerun this one to complete what is missing")


_HELD: dict[tuple[str, str], list] = {}  # (protocol, path) → [RunLease, depth]
_HELD_LOCK = threading.RLock()


def _key(out: str) -> tuple[str, str]:
    return storage.protocol(out), storage.filesystem(out)[1].rstrip("/")


@contextmanager
def run_lease(out: str, settings: LeaseSettings | None = None) -> Iterator[RunLease]:
    """Hold the lease of run URL ``out`` for the block (re-entrant within this process: an inner block on the
    same run joins the outer one's lease). See the module docstring."""
    key = _key(out)
    with _HELD_LOCK:
        if key not in _HELD:
            lease = RunLease(out, settings)
            lease.acquire()
            _HELD[key] = [lease, 0]
        _HELD[key][1] += 1
        lease = _HELD[key][0]
    failed = True
    try:
        yield lease
        failed = False
    finally:
        with _HELD_LOCK:
            _HELD[key][1] -= 1
            if not _HELD[key][1]:
                del _HELD[key]
                lease.release(raise_if_lost=not failed)


def takes_run_lease(func: _F) -> _F:
    """Decorator for an entry point ``func(cfg, ...)`` that writes below ``cfg.out``: it runs holding that
    run's lease (:func:`run_lease`)."""

    @functools.wraps(func)
    def holding_the_lease(cfg, *args, **kwargs):
        with run_lease(cfg.out):
            return func(cfg, *args, **kwargs)

    return holding_the_lease  # type: ignore[return-value]
