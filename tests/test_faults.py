import contextlib
import io
import os
import signal
import subprocess
import sys
import threading

import pytest

from realfake_ray._internal.faults import fault_at, hold_while_alive


def test_fault_spec_names_a_point_and_a_count():
    env = {"REALFAKE_FAULT": "generate.manifest_part:3"}
    assert fault_at("generate.manifest_part", env) == 3
    assert fault_at("finetune.checkpoint", env) is None
    assert fault_at("finetune.checkpoint", {}) is None


@pytest.mark.parametrize("spec", ["finetune.checkpoint", "finetune.checkpont:4", "generate.manifest_part:x"])
def test_a_misspelt_fault_is_an_error_not_a_silent_no_op(spec):
    with pytest.raises(ValueError, match="REALFAKE_FAULT"):
        fault_at("finetune.checkpoint", {"REALFAKE_FAULT": spec})


def test_kill_driver_sigkills_the_given_process():
    code = "import os; from realfake_ray._internal.faults import kill_driver; kill_driver(os.getpid())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == -signal.SIGKILL and "killing the driver" in proc.stdout


def test_hold_while_alive_holds_until_the_driver_is_gone_then_fails_the_task():
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
            hold_while_alive(driver.pid, "manifest part 1")
    ender.join()
    assert released.is_set() and "holding at manifest part 1 while the driver" in printed.getvalue()


class _Printed(io.StringIO):
    """A stdout that signals its first write."""

    def __init__(self) -> None:
        super().__init__()
        self.started = threading.Event()

    def write(self, text: str) -> int:
        self.started.set()
        return super().write(text)
