"""Resuming Ray Train runs from their newest complete checkpoint, even after the driver was killed.

Ray Train restores ``ray.train.get_checkpoint()`` from the controller's snapshot of *registered*
checkpoints, which is written some reports behind the checkpoint folders themselves. A driver killed
early (a preempted head, a cancelled job) then leaves complete checkpoint folders that the next run would
not see, and training would start again from zero. So the driver looks for the newest folder whose files
all load (:func:`newest_complete`, a half-copied folder fails that), plans the run from it, and every worker
resumes from exactly that folder (:func:`resume_checkpoint`).

Example:
    >>> newest_complete("runs/tiny/finetune/finetune", "checkpoint_", ("state.pt",))  # doctest: +SKIP
    'runs/tiny/finetune/finetune/checkpoint_00000040'
"""

from __future__ import annotations

import io
import json
import re

from realfake_ray import storage
from realfake_ray._internal.trainer import RestoreFromDriver

__all__ = ["checkpoint_number", "numbered_folders", "newest_complete", "prune_checkpoints", "resume_checkpoint"]


def checkpoint_number(url: str, prefix: str) -> int | None:
    """``12`` for ``.../<prefix>00000012``; None for another name."""
    match = re.fullmatch(re.escape(prefix) + r"(\d+)", url.rstrip("/").rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def _loads(url: str) -> bool:
    """Whether the file at ``url`` reads back whole (torch ``.pt`` with weights_only, safetensors, JSON)."""
    import torch
    from safetensors.torch import load

    try:
        data = storage.read_bytes(url)
        if url.endswith(".pt"):
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        elif url.endswith(".safetensors"):
            load(data)
        elif url.endswith(".json"):
            json.loads(data)
        return len(data) > 0
    except Exception:  # a truncated or missing file: this folder is not a complete checkpoint
        return False


def numbered_folders(run_dir: str, prefix: str) -> list[str]:
    """URLs of the ``<prefix><number>`` folders below ``run_dir``, oldest first ([] when there is none)."""
    if not storage.isdir(run_dir):
        return []
    folders = [storage.join(run_dir, name) for name, is_dir in storage.listdir(run_dir) if is_dir]
    numbered = sorted((n, url) for url in folders if (n := checkpoint_number(url, prefix)) is not None)
    return [url for _, url in numbered]


def newest_complete(run_dir: str, prefix: str, required: tuple[str, ...]) -> str | None:
    """URL of the newest ``<prefix><number>`` folder below ``run_dir`` whose ``required`` files all load."""
    for url in reversed(numbered_folders(run_dir, prefix)):
        if all(_loads(storage.join(url, name)) for name in required):
            return url
    return None


def prune_checkpoints(run_dir: str, prefix: str, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` ``<prefix><number>`` folders below ``run_dir``; returns those deleted.
    Called after a run ends: a run restarted after a lost worker knows only the checkpoints in Ray's snapshot,
    so its ``num_to_keep`` misses the ones written after the snapshot."""
    stale = numbered_folders(run_dir, prefix)[:-keep] if keep > 0 else []
    for url in stale:
        storage.remove(url, recursive=True)
    return stale


def resume_checkpoint(planned: str | None, prefix: str):
    """In a Ray Train worker: the checkpoint the driver planned to resume from (a folder URL from
    :func:`newest_complete`; None: a fresh start). Raises ``RestoreFromDriver`` when Ray Train restored this
    worker from a newer checkpoint than that: the run's datasets were planned for the older one (see
    ``_internal.trainer``)."""
    import ray.train

    registered = ray.train.get_checkpoint()
    planned_number = checkpoint_number(planned, prefix) if planned else -1
    if registered is not None and (checkpoint_number(registered.path, prefix) or 0) > planned_number:
        raise RestoreFromDriver(f"restored by Ray Train from {registered.path}, planned from {planned}: "
                                "the driver restarts the run from there")
    if planned is None:
        return None
    fs, path = storage.arrow_filesystem(planned)
    return ray.train.Checkpoint(path=path, filesystem=fs)
