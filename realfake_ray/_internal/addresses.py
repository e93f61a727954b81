"""Addresses on this machine: whether a Ray address points here, a free local port (no Ray import: config
validation uses it).

Example:
    >>> is_remote_address("ray://10.0.0.5:10001"), is_remote_address("127.0.0.1:6379"), is_remote_address("auto")
    (True, False, False)
"""

from __future__ import annotations

import socket
from functools import cache
from urllib.parse import urlparse

__all__ = ["is_loopback_address", "free_port", "is_remote_address"]


@cache
def _this_host() -> frozenset[str]:
    names = {"localhost", socket.gethostname(), socket.getfqdn()}
    try:
        names |= set(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:  # an unresolvable host name: loopback and the names above still count as local
        pass
    return frozenset(names)


def _host(address: str) -> str:
    return urlparse(address if "://" in address else f"//{address}").hostname or ""


def is_loopback_address(address: str) -> bool:
    """``127.x.x.x:port`` / ``localhost:port`` / ``::1`` (optionally with a scheme)."""
    host = _host(address)
    return host == "localhost" or host.startswith("127.") or host == "::1"


def free_port(preferred: int = 0) -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now: ``preferred`` when it is free, else any."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_remote_address(address: str | None) -> bool:
    """True for a Ray address (``host:port``, ``ray://host:port``, ``http://host:port``) on another machine;
    False for none, ``auto``, ``local`` and loopback or this machine's own names and addresses."""
    if not address or address in ("auto", "local"):
        return False
    if not _host(address) or is_loopback_address(address):
        return False
    return _host(address) not in _this_host()
