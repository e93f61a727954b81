"""What "quiet" means for a run without ``--verbose`` (no Ray import: the CLI reads it before any).

Example:
    >>> "DIFFUSERS_VERBOSITY" in QUIET_ENV
    True
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["QUIET_ENV", "RAY_NOISE", "quiet_libraries"]

# Lines Ray's processes print at error or warning level that are not a problem of the run, dropped from the
# console (not from Ray's log files) through Ray's own switch, RAY_DEDUP_LOGS_SKIP_REGEX, which the driver reads
# when it imports Ray. Each is narrow: a real error of the same component still prints.
RAY_NOISE = (
    # Ray Train's controller starts its PreemptionWatcher actor, Ray Data its MapWorker actor pools, with arguments in
    # the object store
    r"core_worker\.cc:\d+: Actor with class name: '[^']+' and ID: '\w+' has constructor arguments in the object store",
    # the GCS asked a worker that had already exited to stop (actor pools and Ray Train at their end)
    r"gcs_actor_scheduler\.cc:\d+: Failed to kill actor \w+, return status: Invalid: KillActor RPC failed",
    # fractional-CPU actors and tasks start more worker processes than the raylet's rule of thumb
    r"PYTHON worker processes have been started on node: \w+ with address: [\d.]+, which is \d+x the maximum",
    # Ray Data's own notice in its coordinator actors that the progress bars are off, as they are on purpose
    r"Progress bars disabled\. To enable, set",
)

# No model-loading progress bars, advisory logs, deprecation notices or per-execution Ray Data info lines
# from the libraries, in the driver and in every worker (one copy per actor and per Ray Train worker in the
# job log); warnings that matter and errors still print.
QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning",
    "RAY_DATA_LOG_LEVEL": "WARNING",
    "RAY_DEDUP_LOGS_SKIP_REGEX": "|".join(RAY_NOISE),
}


class _DropMessages(logging.Filter):
    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_libraries() -> None:
    """In this process: diffusers/transformers progress bars and notices off, deprecation warnings off, and
    Ray's notices that its progress bars are off and that token authentication is on (both on purpose) dropped."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    logging.getLogger("ray.data._internal.progress").addFilter(_DropMessages("Progress bars"))
    # A local cluster starts with token authentication (Ray's default, kept on purpose: README "Security"); Ray's
    # notice of it suggests turning it off.
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
        _DropMessages("Token authentication is enabled for this Ray cluster"))
