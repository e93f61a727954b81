"""The library's console: every module logs through ``logging.getLogger(__name__)``; this module gives the
``realfake_ray`` logger one handler that prints ``[<tag>] <message>`` to standard output, in the driver and in
every Ray worker (each process imports the package, so the format is the same in the job log).

The tag is the stage or tool (``[train]``, ``[generate]``, ``[audit-privacy]``), the pipeline's ``[realfake]``,
or the module's own name for the shared parts (``[lease]``, ``[tracking]``); warnings read ``[<tag>] warning:``.
``REALFAKE_LOG_LEVEL`` (default ``INFO``; forwarded to the workers) sets the level; a program that configures
logging itself can take the records over: clear ``logging.getLogger("realfake_ray").handlers`` and set its
``propagate`` back to True (the console handler turns it off so that lines are not printed twice).

Example:
    >>> import logging
    >>> record = logging.LogRecord("realfake_ray.stages.train.driver", logging.WARNING, "", 0, "few CPUs", None, None)
    >>> ConsoleFormatter().format(record)
    '[train] warning: few CPUs'
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["LEVEL_ENV", "ConsoleFormatter", "tag_of", "install_console"]

LEVEL_ENV = "REALFAKE_LOG_LEVEL"
ROOT = "realfake_ray"

# Modules whose tag is not the folder below stages/ or tools/, nor their own name.
_TAGS = {"stages.pipeline": "realfake", "devices": "device", "_internal.cluster": "ray", "_internal.faults": "fault",
         "data.labelled": "realfake"}


def tag_of(name: str) -> str:
    """The console tag of a logger name.

    Example:
        >>> [tag_of(n) for n in ("realfake_ray.stages.generate.workers", "realfake_ray.tools.tune_sampler.driver",
        ...                      "realfake_ray.stages.pipeline", "realfake_ray._internal.lease", "realfake_ray.data.sources")]
        ['generate', 'tune-sampler', 'realfake', 'lease', 'data']
    """
    inner = name[len(ROOT) + 1:] if name.startswith(ROOT + ".") else name
    if inner in _TAGS:
        return _TAGS[inner]
    parts = inner.split(".")
    if parts[0] in ("stages", "tools") and len(parts) > 1:
        return parts[1].replace("_", "-")
    return parts[-1] if parts[0] == "_internal" else parts[0]


class ConsoleFormatter(logging.Formatter):
    """``[<tag>] <message>``; ``[<tag>] warning: <message>`` (and ``error:``) above INFO. A record's ``tag`` extra
    (``log.info(..., extra={"tag": "finetune"})``) overrides the logger's."""

    def format(self, record: logging.LogRecord) -> str:
        tag = getattr(record, "tag", None) or tag_of(record.name)
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        text = f"[{tag}] {level}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _StdoutHandler(logging.StreamHandler):
    """Writes to ``sys.stdout`` as it is at each record (a redirect, pytest's capture), flushing every line."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:
        pass


def install_console() -> logging.Logger:
    """Give the ``realfake_ray`` logger its console handler (once per process) at ``$REALFAKE_LOG_LEVEL``."""
    logger = logging.getLogger(ROOT)
    if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(ConsoleFormatter())
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(os.environ.get(LEVEL_ENV, "INFO").upper())
    return logger
