"""The process environment for a subprocess, copied safely from any thread."""

from __future__ import annotations

import os


def environ_with(**extra: str) -> dict[str, str]:
    """``os.environ`` plus ``extra``, copied so that a change made meanwhile by another thread cannot break it.

    pytest sets and deletes ``PYTEST_CURRENT_TEST`` in the main thread at every test boundary; a copy
    taken at that moment in a background thread (test_every_object fetches through a thread pool)
    found the key listed and then gone: ``KeyError: 'PYTEST_CURRENT_TEST'``.  The copy is taken again.
    """
    for _ in range(100):
        try:
            return {**os.environ, **extra}
        except (KeyError, RuntimeError):  # a key deleted, or the mapping resized, while it was read
            continue
    raise RuntimeError("os.environ kept changing while it was copied")
