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
