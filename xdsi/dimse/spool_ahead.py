"""Spool files created ahead of the C-STOREs that will fill them, by a thread of their own.

Why (issue 14): the direct C-STORE reader creates a spool file for every incoming instance, between
the request's first PDU and its data, on the association thread.  Creating a file allocates an
inode, and on ext4 that also waits for the journal while another thread's fsync is committing it.
On the bench machine that was 15-290 µs of CPU and up to 0.5 ms of wall time per instance,
depending on the block group the data folder landed in: up to a seventh of an instance's time on
one association (``bench/ingest.py``, in-process stage timings).  Here a thread keeps a few empty
spool files made in advance; the association thread takes one (no system call but an ``fstat``)
and only creates its own when none is ready.

What stays as it was: each file is created exclusively (``O_EXCL``, mode 0600), in
``tempfile.gettempdir()`` (the data folder's ``tmp``, set by the DICOM server before anything is
received) under the spool keeper's pattern (``tmp*.dcm``), so a process that dies leaves only
empty files the keeper sweeps.  The keeper removes a file nobody has written for ``max_age``
seconds (another worker's keeper too: the workers share the folder); a file waits here at most half
that (:meth:`SpoolAhead.configure`) before it is replaced, and one that is gone anyway (its link count
is 0) is never handed out.  A file made for another directory (the temporary directory changed) is
removed, not used.  A forked child gets none of its parent's files: it makes its own.  The files
still waiting are removed when the DICOM server stops and when the process exits normally.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import tempfile
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass

from xdsi.process_tag import process_tag

__all__ = ["AHEAD", "MARK", "SpoolAhead", "configure", "drain", "waiting", "take"]

log = logging.getLogger(__name__)

AHEAD = 8  # files kept ready: a burst larger than this creates its own until the thread catches up
MARK = "-a"  # in the name of a file made here (tmp<process tag>-a<n>.dcm)
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW


@dataclass(frozen=True)
class _Made:
    path: str
    fd: int
    directory: str
    at: float  # time.monotonic() when made


class SpoolAhead:
    """Empty spool files made ahead by a daemon thread; :meth:`take` hands one out (path, open descriptor)."""

    def __init__(self, ahead: int = AHEAD, max_age: float = 60.0) -> None:
        self.ahead = ahead
        self.max_age = max_age  # the spool keeper's: a file is replaced once it has waited half of it
        self.made = 0  # files made, and handed out, for tests and benchmarks
        self.taken = 0
        self._names = itertools.count()
        self._reset()
        _instances.add(self)

    def _reset(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._ready: deque[_Made] = deque()
        self._thread: threading.Thread | None = None
        self._draining = False

    def configure(self, max_age: float) -> None:
        """Keep no file longer than half the spool keeper's ``max_age`` (the shortest asked for wins)."""
        with self._cond:
            self.max_age = min(self.max_age, max_age)
            self._cond.notify()

    def take(self) -> tuple[str, int] | None:
        """A ready file in the temporary directory: (path, descriptor open for writing), or None (the caller creates one)."""
        stale: list[_Made] = []
        made: _Made | None = None
        with self._cond:
            self._draining = False
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="xdsi-spool-ahead", daemon=True)
                self._thread.start()
            limit = time.monotonic() - self.max_age / 2
            current = tempfile.gettempdir()
            while self._ready:
                candidate = self._ready.popleft()
                if candidate.at > limit and candidate.directory == current:
                    made = candidate
                    break
                stale.append(candidate)  # too old, or made for a temporary directory no longer in use
            self._cond.notify()  # one fewer: make the next
        _discard(stale)
        if made is None:
            return None
        try:
            alive = os.fstat(made.fd).st_nlink > 0  # removed by someone (the keeper, a test): not handed out
        except OSError:
            alive = False
        if not alive:
            _discard([made], unlink=False)
            return None
        self.taken += 1
        return made.path, made.fd

    def drain(self) -> None:
        """Remove the files made ahead and let the thread end (the DICOM server stops); :meth:`take` starts it again."""
        with self._cond:
            ready, self._ready = list(self._ready), deque()
            self._draining = True
            self._cond.notify()
        _discard(ready)

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._draining:
                        self._thread = None
                        return
                    limit = time.monotonic() - self.max_age / 2
                    stale = [m for m in self._ready if m.at <= limit]
                    if stale or len(self._ready) < self.ahead:
                        break
                    self._cond.wait(self.max_age / 4)
                for m in stale:
                    self._ready.remove(m)
                directory = tempfile.gettempdir()
            _discard(stale)
            if stale:
                continue
            path = os.path.join(directory, f"tmp{process_tag()}{MARK}{next(self._names)}.dcm")
            try:
                fd = os.open(path, _FLAGS, 0o600)
            except FileExistsError:
                continue
            except OSError as exc:  # the folder is gone or full: the receive path creates its own and says why
                log.debug("spool file not made ahead in %s: %s", directory, exc)
                with self._cond:
                    self._cond.wait(1.0)
                continue
            with self._cond:
                self.made += 1
                if self._draining:  # made while draining: not kept
                    stale = [_Made(path, fd, directory, 0.0)]
                else:
                    self._ready.append(_Made(path, fd, directory, time.monotonic()))
                    stale = []
            _discard(stale)

    def _after_fork(self) -> None:
        """In a forked child: the parent's files and thread are the parent's; close our copies of the descriptors."""
        ready = list(self._ready)
        self._reset()
        _discard(ready, unlink=False)


def waiting(name: str, size: int) -> bool:
    """A file made here and not yet written (spool capacity, not data): what ``xdsi status`` does not count."""
    return size == 0 and name.startswith("tmp") and MARK in name


def _discard(made: list[_Made], unlink: bool = True) -> None:
    for m in made:
        try:
            os.close(m.fd)
        except OSError:
            pass
        if unlink:
            try:
                os.unlink(m.path)
            except OSError:
                pass


def _after_fork() -> None:
    for pool in list(_instances):
        pool._after_fork()


_instances: "weakref.WeakSet[SpoolAhead]" = weakref.WeakSet()
os.register_at_fork(after_in_child=_after_fork)
_AHEAD = SpoolAhead()
atexit.register(_AHEAD.drain)  # a process that ends normally (a CLI command, a test run) leaves none of them behind


def take() -> tuple[str, int] | None:
    return _AHEAD.take()


def configure(max_age: float) -> None:
    _AHEAD.configure(max_age)


def drain() -> None:
    _AHEAD.drain()
