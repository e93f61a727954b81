import contextlib
import io
import os
import signal
import subprocess
import sys
import threading

import pytest

from realfake_ray._internal import faults
from realfake_ray._internal.faults import DRIVER_PID_ENV, ENV, fault_at


def test_fault_spec_names_a_point_and_a_count():
    env = {"REALFAKE_FAULT": "generate.shard:3"}
    assert fault_at("generate.shard", env) == 3
    assert fault_at("finetune.checkpoint", env) is None
    assert fault_at("finetune.checkpoint", {}) is None


@pytest.mark.parametrize("spec", ["finetune.checkpoint", "finetune.checkpont:4", "generate.shard:x"])
def test_a_misspelt_fault_is_an_error_not_a_silent_no_op(spec):
    with pytest.raises(ValueError, match="REALFAKE_FAULT"):
        fault_at("finetune.checkpoint", {"REALFAKE_FAULT": spec})


def test_kill_driver_sigkills_the_given_process():
    code = "import os; from realfake_ray._internal.faults import kill_driver; kill_driver(os.getpid())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == -signal.SIGKILL and "killing the driver" in proc.stdout


def test_a_fault_reaches_the_workers_of_the_driver_that_has_it(monkeypatch):
    """The driver's init_ray hands the fault and its own pid to its workers' environment (read where the
    fault fires, not carried in a plan); without a fault the workers get nothing of it."""
    import ray

    from realfake_ray._internal import cluster

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs["runtime_env"]["env_vars"]))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    monkeypatch.setenv(ENV, "finetune.checkpoint:2")
    cluster.init_ray()
    monkeypatch.delenv(ENV)
    cluster.init_ray()
    assert calls[0][ENV] == "finetune.checkpoint:2" and calls[0][DRIVER_PID_ENV] == str(os.getpid())
    assert ENV not in calls[1] and DRIVER_PID_ENV not in calls[1]


def _worker(code: str, fault: str) -> subprocess.CompletedProcess:
    """``code`` in a process that is its own driver (its pid in DRIVER_PID_ENV) with ``REALFAKE_FAULT=fault``."""
    setup = f"import os; os.environ[{DRIVER_PID_ENV!r}] = str(os.getpid()); from realfake_ray._internal import faults; "
    return subprocess.run([sys.executable, "-c", setup + code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, ENV: fault, "PYTHONPATH": os.getcwd()})


def test_kill_driver_at_kills_the_named_driver_at_its_point_only():
    passed = _worker("faults.kill_driver_at('finetune.checkpoint', 1); print('passed 1')", "finetune.checkpoint:2")
    assert passed.returncode == 0 and "passed 1" in passed.stdout
    killed = _worker("faults.kill_driver_at('finetune.checkpoint', 2); print('passed 2')", "finetune.checkpoint:2")
    assert killed.returncode == -signal.SIGKILL and "passed 2" not in killed.stdout


def test_hold_at_returns_unless_its_point_is_reached(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert faults.hold_at("train.checkpoint_hold", 0) is None  # no fault set
    held = subprocess.Popen([sys.executable, "-c", "from realfake_ray._internal import faults; "
                             "faults.hold_at('train.checkpoint_hold', 1)"],
                            env={**os.environ, ENV: "train.checkpoint_hold:1", "PYTHONPATH": os.getcwd()},
                            stdout=subprocess.PIPE, text=True)
    assert "holding at train.checkpoint_hold:1" in held.stdout.readline()
    held.kill()
    held.wait()


def test_hold_while_driver_lives_holds_until_the_driver_is_gone_then_fails_the_task():
    driver = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    printed, released = _Printed(), threading.Event()

    def end_the_driver_once_held() -> None:
        printed.started.wait()
        released.set()
        driver.stdin.close()
        driver.wait()  # reaped: its pid is gone

    ender = threading.Thread(target=end_the_driver_once_held)
    ender.start()
    with pytest.raises(RuntimeError, match=f"driver .pid {driver.pid}. is gone"):
        with contextlib.redirect_stdout(printed):
            faults.hold_while_driver_lives("generate.shard_hold:1", driver.pid)
    ender.join()
    assert released.is_set() and "holding at generate.shard_hold:1 while the driver" in printed.getvalue()


class _Printed(io.StringIO):
    """A stdout that signals its first write."""

    def __init__(self) -> None:
        super().__init__()
        self.started = threading.Event()

    def write(self, text: str) -> int:
        self.started.set()
        return super().write(text)
