"""The console (``realfake_ray/_internal/log.py``): the tags, the format, where lines go, and the rule that
library code logs instead of printing."""

from __future__ import annotations

import ast
import logging
import os
import subprocess
import sys
from pathlib import Path

from realfake_ray._internal.log import LEVEL_ENV, tag_of

PACKAGE = Path(__file__).resolve().parents[1] / "realfake_ray"

# print() is a command's result on stdout (a config dump, a JSON summary, a table), never a progress line.
RESULT_PRINTS = {"cli.py", "tools/sampler_bench.py", "tools/plan.py", "tools/tune_sampler/driver.py",
                 "tools/audit_privacy/driver.py"}


def test_every_stage_and_tool_has_its_own_tag():
    assert tag_of("realfake_ray.stages.finetune.driver") == "finetune"
    assert tag_of("realfake_ray.stages.generate.workers") == "generate"
    assert tag_of("realfake_ray.tools.audit_privacy.driver") == "audit-privacy"
    assert tag_of("realfake_ray.stages.pipeline") == "realfake"
    assert tag_of("realfake_ray._internal.lease") == "lease"
    assert tag_of("realfake_ray.models.loading") == "models"


def test_lines_reach_the_stdout_of_the_moment_with_their_tag_and_level(capsys):
    log = logging.getLogger("realfake_ray.stages.train.driver")
    log.info("epoch 1/2 loss 0.50")
    log.warning("few CPUs")
    logging.getLogger("realfake_ray._internal.trainer").warning("lost worker(s) [0]", extra={"tag": "finetune"})
    logging.getLogger("realfake_ray.stages.train.driver").debug("not shown at INFO")
    assert capsys.readouterr().out.splitlines() == [
        "[train] epoch 1/2 loss 0.50", "[train] warning: few CPUs", "[finetune] warning: lost worker(s) [0]"]


def test_a_fresh_process_prints_at_the_level_of_its_environment():
    code = ("import logging, realfake_ray; log = logging.getLogger('realfake_ray.stages.encode.driver');"
            "log.info('shown at INFO'); log.warning('always shown')")
    lines = {level: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                   env={**os.environ, LEVEL_ENV: level}).stdout.splitlines()
             for level in ("INFO", "WARNING")}
    assert lines == {"INFO": ["[encode] shown at INFO", "[encode] warning: always shown"],
                     "WARNING": ["[encode] warning: always shown"]}


def test_library_code_logs_and_prints_only_a_commands_result():
    printing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print" and rel not in RESULT_PRINTS:
                printing.append(f"{rel}:{node.lineno}")
    assert not printing, "use logging.getLogger(__name__) (see realfake_ray/_internal/log.py): " + ", ".join(printing)


# Lines from the console of a `make demo` run (2026-12-05), as the driver received them from Ray's processes.
_RAY_NOISE_SEEN = [
    "[2026-12-05 10:52:52,009 E 6416 6447] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and ID: "
    "'452c55245e0a6d6af4d9759801000000' has constructor arguments in the object store and max_restarts > 0. If the "
    "arguments in the object store go out of scope or are lost, the actor restart will fail.",
    "[2026-12-05 10:53:23,339 E 5408 5408] (gcs_server) gcs_actor_scheduler.cc:538: Failed to kill actor "
    "f3cf2360cb519bd13484a97301000000, return status: Invalid: KillActor RPC failed for actor "
    "f3cf2360cb519bd13484a97301000000: RpcError: RPC error: Socket closed rpc_code: 14",
    "WARNING: 8 PYTHON worker processes have been started on node: 0a8859a780f60dc7ef6f4e9812a83cd70d7b7f5c6106107437a"
    "31467 with address: 127.0.0.1, which is 4x the maximum expected startup concurrency (2).",
    "Progress bars disabled. To enable, set `ray.data.DataContext.get_current().enable_progress_bars = True`.",
    "[2026-12-06 03:37:41,656 E 26935 26935] core_worker.cc:2465: Actor with class name: 'MapWorker(MapBatches(Latent"
    "Encoder))' and ID: '8a2a7a66826aeeb0694fbb2801000000' has constructor arguments in the object store and "
    "max_restarts > 0.",
]
_RAY_ERRORS = [
    "[2026-12-05 10:52:52,009 E 6416 6447] core_worker.cc:1123: Unhandled error (suppress with 'RAY_IGNORE_UNHANDLED"
    "_ERRORS=1'): ray::SynthesisActor.submit() (pid=6485) RuntimeError: CUDA out of memory",
    "[2026-12-05 10:53:23,339 E 5408 5408] (gcs_server) gcs_actor_scheduler.cc:538: Failed to create actor, "
    "return status: RpcError",
    "A worker died or was killed while executing a task by an unexpected system error.",
    "[finetune] step 100: loss 0.0697 (denoise 0.0657, mmd 1.348), 38 samples/s, checkpoint saved",
]


def test_ray_s_non_error_lines_are_dropped_from_the_console_and_its_errors_are_not():
    """Through Ray's own log deduplicator, with the skip pattern a quiet run (no --verbose) sets."""
    from ray._private.ray_logging import LogDeduplicator

    from realfake_ray._internal.quiet import QUIET_ENV

    dedup = LogDeduplicator(5, None, QUIET_ENV["RAY_DEDUP_LOGS_SKIP_REGEX"], _timesource=lambda: 0.0)
    batch = {"ip": "127.0.0.1", "pid": 6416, "job": "01", "is_err": True, "lines": _RAY_NOISE_SEEN + _RAY_ERRORS}
    printed = [line for out in dedup.deduplicate(batch) for line in out["lines"]]
    assert printed == _RAY_ERRORS


def test_ray_s_token_authentication_notice_is_dropped_and_its_token_errors_are_not():
    from realfake_ray._internal.quiet import quiet_libraries

    quiet_libraries()
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    notice = "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out."
    error = "Token authentication is enabled but no authentication token was found"
    records = [logging.LogRecord(logger.name, logging.WARNING, "", 0, message, None, None) for message in (notice, error)]
    assert [bool(logger.filter(r)) for r in records] == [False, True]


def test_a_quiet_command_sets_the_skip_pattern_and_verbose_leaves_it_unset(monkeypatch, capsys):
    """The CLI sets it before it imports Ray (cli.py imports no Ray: test_imports' layer rule), where Ray reads it."""
    from realfake_ray import cli

    for flags, expected in (([], True), (["--verbose"], False)):
        monkeypatch.delenv("RAY_DEDUP_LOGS_SKIP_REGEX", raising=False)
        assert cli.main(["train", "--preset", "tiny", "--print-config", *flags]) == 0
        assert ("RAY_DEDUP_LOGS_SKIP_REGEX" in os.environ) is expected
    capsys.readouterr()
