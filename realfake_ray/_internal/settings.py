"""Settings records: a stage's output remembers what made it, and a rerun with other values is refused.

Example:
    >>> from realfake_ray._internal.settings import settings_changes
    >>> settings_changes({"lr": 1e-4, "rank": 4}, {"lr": 2e-4, "rank": 4})
    ['lr: 0.0001 → 0.0002']
"""

from __future__ import annotations

from collections.abc import Iterable

from realfake_ray import storage

__all__ = ["LEGACY_KEYS", "read_settings", "settings_changes", "refuse_changed_settings"]

# Records written before the keys were renamed: read under their new names.
LEGACY_KEYS = {"guidance": "vision_token", "negative_guidance_token": "negative_vision_token", "accelerator": "speedup"}


def read_settings(url: str) -> dict:
    """A settings record, with keys of older records under their current names (:data:`LEGACY_KEYS`)."""
    return {LEGACY_KEYS.get(k, k): v for k, v in storage.read_json(url).items()}


def settings_changes(before: dict, now: dict, keys: Iterable[str] | None = None) -> list[str]:
    """``key: old → new`` for every key (of ``keys``, default: of either side) whose value differs."""
    keys = list(keys) if keys is not None else list(dict.fromkeys([*before, *now]))
    return [f"{k}: {before.get(k)!r} → {now.get(k)!r}" for k in keys if before.get(k) != now.get(k)]


def refuse_changed_settings(url: str, settings: dict, what: str, keys: Iterable[str] | None = None) -> None:
    """ValueError when the record at ``url`` exists and differs from ``settings`` (on ``keys``, default all);
    ``what`` names the output in the message."""
    if not storage.exists(url):
        return
    changed = settings_changes(read_settings(url), settings, keys)
    if changed:
        raise ValueError(
            f"{what} was made with other settings ({'; '.join(changed)}); "
            "write to a new --out (or delete that folder) to run with these"
        )
