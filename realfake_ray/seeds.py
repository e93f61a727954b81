"""Seeds derived from config: every random choice in the project is keyed here, stable across processes.

Example:
    >>> derive_seed(42, "digit_0/0001.png", 0) == derive_seed(42, "digit_0/0001.png", 0)
    True
    >>> derive_seed(42, "rank", 0) != derive_seed(42, "rank", 1)
    True
"""

from __future__ import annotations

import hashlib

__all__ = ["derive_seed"]


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from the run seed and labels (image id, copy, rank, epoch …): blake2b of their repr.

    Python's ``hash()`` is salted per process, so it is never used for seeds.
    """
    text = "\x1f".join(repr(p) if not isinstance(p, str) else p for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1
