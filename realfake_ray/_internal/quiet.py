"""What "quiet" means for a run without ``--verbose`` (no Ray import: the CLI reads it before any).

Example:
    >>> "DIFFUSERS_VERBOSITY" in QUIET_ENV
    True
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["QUIET_ENV", "quiet_libraries"]

# No model-loading progress bars, advisory logs, deprecation notices or per-execution Ray Data info lines
# from the libraries, in the driver and in every worker (one copy per actor and per Ray Train worker in the
# job log); warnings that matter and errors still print.
QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning",
    "RAY_DATA_LOG_LEVEL": "WARNING",
}


class _DropMessages(logging.Filter):
    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_libraries() -> None:
    """In this process: diffusers/transformers progress bars and notices off, deprecation warnings off, and
    Ray Data's notice that its progress bars are off (they are, on purpose) dropped."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    logging.getLogger("ray.data._internal.progress").addFilter(_DropMessages("Progress bars"))
