import os
import signal
import subprocess
import sys

import pytest

from realfake_ray._internal.faults import fault_at


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
