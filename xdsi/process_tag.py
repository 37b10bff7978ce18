"""A token naming this process, for file names no other process makes (with a counter of the caller's).

Why: ``os.getpid()`` and ``os.urandom`` (or ``uuid4``) are a system call each, and the receive, relay and
storage paths named a file or two per instance with them (issues 14 and 15: each system call of a busy
thread is also a GIL hand-off under load).  The token is drawn once per process, and again in a forked
child (``xdsi serve --workers`` forks its workers).
"""

from __future__ import annotations

import os

_TAG: list[str] = []


def process_tag() -> str:
    """This process's ID and a random token drawn once for it: ``<pid>r<8 hex digits>``."""
    if not _TAG:
        _TAG.append(f"{os.getpid()}r{os.urandom(4).hex()}")
    return _TAG[0]


os.register_at_fork(after_in_child=_TAG.clear)

__all__ = ["process_tag"]
