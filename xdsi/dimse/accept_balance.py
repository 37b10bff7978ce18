"""Load-aware accept: connections arriving together spread evenly over the workers of one node.

Why (issue 14): the workers of ``xdsi serve --workers N`` share one listening socket (pre-fork, see
:mod:`xdsi.supervisor`), and whichever worker calls ``accept`` first takes the connection.  A worker
that has just accepted one is often the first to look again, so 4 associations requested at once
landed 3+1 (or 4+0) on 2 workers in about a third of the tries (``bench/workers.py``), and the
loaded worker's core did the work of three while the other idled.

Here each worker publishes how many accepted connections it holds (still open), and before it
accepts it looks at the others: a worker holding *more* than the least loaded live worker leaves
the connection to that one for a moment (:data:`DEFER` seconds at most).  It accepts anyway when:

* the connection is still waiting after that moment (the other worker is busy, stopped, or slow to
  wake): a connection is never left unserved because another worker ought to take it;
* no other worker is alive: a worker that died holds its counter's record lock no more, and is not
  waited for at all (its counter may be stale; it is ignored until a new worker takes the slot).

What is shared, in one file beside the slots (``<data>/.workers/accept-load``), no memory and no
supervisor bookkeeping:

* one 8-byte counter per worker index, in a shared memory map (each worker writes only its own;
  the others read it; a torn or stale read can only cost one bounded deferral or one uneven accept);
* one 8-byte deadline per worker index (``time.monotonic_ns()``, one clock for every process of the
  machine) until which that worker expects to be called back, 0 when it does not;
* one byte per worker index held with a POSIX record lock (``fcntl.lockf``) while that worker's
  DICOM listeners serve: the kernel drops it when the process dies, so "alive" needs no heartbeat.
  Another worker tests it with a non-blocking lock it releases at once.

A worker that is about to be called back (a relay's C-MOVE whose destination is our own AE title:
the remote opens a storage association to us, :mod:`xdsi.gateway.relay`) says so for a few seconds
(:meth:`AcceptBalance.expect`); while it does, it accepts at once whatever its load, and the other
workers leave waiting connections to it as they would to a lighter one.  Why (issue 15): a worker
that holds the requester's association is the heavier one, so the remote's association landed on the
other worker, and every instance went through the relay's inbox (a file written, moved, listed, read
and removed) instead of straight from one association to the other in memory: measured with
``bench/gateway.py`` (5 rounds each, one run), C-GET via C-MOVE at 0.73 of a direct C-GET with
``--workers 1`` and 0.56 with ``--workers 2``, xdsi's CPU 1.05 against 1.65 ms per relayed
instance.  The expectation ends when the relay's first instance arrives (wherever it was accepted)
or the relay ends, and lapses by itself after :data:`EXPECT` seconds; any connection accepted
meanwhile is still served, only perhaps by the other worker than the balance of loads would pick.

The counter counts connections, not associations: an accepted socket is counted from ``accept``
until it is closed (pynetdicom closes it when the association ends, socketserver when a connection
is dropped before it), recounted at every accept decision and published again when a connection
closes (``EVT_CONN_CLOSE``) and on the server loop's idle ticks.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import select
import socket
import struct
import threading
import time
import weakref
from pathlib import Path
from typing import Callable

__all__ = ["DEFER", "EXPECT", "EXPECT_DEFER", "AcceptBalance", "configure", "current"]

log = logging.getLogger(__name__)

DEFER = 0.1  # seconds a worker holding more connections than a live peer leaves a waiting connection to it
POLL = 0.001  # how often the deferring worker looks again (the peer took it? loads changed?)
EXPECT = 5.0  # seconds an expectation of being called back lasts at most (the relay's remote connects at once)
EXPECT_DEFER = 0.5  # seconds a worker leaves a waiting connection to a peer that expects to be called back
MAX_WORKERS = 512  # counters in the file; config allows far fewer workers
_COUNTER = struct.Struct("<q")
_SIZE = MAX_WORKERS * _COUNTER.size
_EXPECT_BASE = _SIZE  # the expectation deadlines lie after the counters
_MAP_SIZE = 2 * _SIZE
_LIVE_BASE = _MAP_SIZE  # the liveness bytes lie after both (locks do not need the bytes to exist)


class AcceptBalance:
    """This worker's side of the node's accept balance: its counter, its liveness lock, the peers' loads."""

    def __init__(self, path: Path, index: int, workers: int, defer: float = DEFER, expect_defer: float = EXPECT_DEFER) -> None:
        if not 0 <= index < workers <= MAX_WORKERS:
            raise ValueError(f"worker {index} of {workers} (at most {MAX_WORKERS})")
        self.path = path
        self.index = index
        self.workers = workers
        self.defer = defer
        self.expect_defer = expect_defer
        # one descriptor for the life of the process: closing any descriptor of the file would drop our lock (POSIX)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if os.fstat(self._fd).st_size < _MAP_SIZE:
            os.ftruncate(self._fd, _MAP_SIZE)  # growing only: every worker asks for the same size
        self._map = mmap.mmap(self._fd, _MAP_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._expecting: dict[int, int] = {}  # this worker's open expectations: token -> deadline (ns)
        self._tokens = 0
        self._lock = threading.Lock()  # this process's sockets, listeners and lockf calls
        self._sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._listeners = 0
        self.deferred = 0  # connections this worker left to a peer that took them (for tests and logs)
        self.overridden = 0  # connections it accepted after waiting DEFER for a peer that did not take them
        self._publish(0)
        self._publish_expectation()

    # -- this worker -----------------------------------------------------------------------

    def serving(self) -> None:
        """A listener of this worker serves: say so (the first one takes the liveness lock; blocking only
        for the moment a peer tests it)."""
        with self._lock:
            self._listeners += 1
            if self._listeners == 1:
                self._take_liveness()

    def _take_liveness(self, patience: float = 2.0) -> None:
        """The liveness lock, waiting only for a peer's brief test of it; a holder that keeps it (a worker of
        this index that has not died yet) leaves this worker serving unseen by its peers rather than hung."""
        deadline = time.monotonic() + patience
        while True:
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _LIVE_BASE + self.index)
                return
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAGAIN) or time.monotonic() > deadline:
                    log.warning("worker %d: liveness lock of %s not taken (%s); peers will not wait for it",
                                self.index, self.path, exc)
                    return
            time.sleep(0.01)

    def stopped(self) -> None:
        """A listener of this worker stopped; with the last one, peers no longer wait for this worker."""
        with self._lock:
            self._listeners = max(0, self._listeners - 1)
            if self._listeners == 0:
                fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, _LIVE_BASE + self.index)

    def accepted(self, sock: socket.socket) -> None:
        """A connection was accepted: counted (and published) before this worker decides on the next one."""
        with self._lock:
            self._sockets.add(sock)
            self._publish(self._count())

    def refresh(self) -> int:
        """Recount the open connections (closed ones drop out) and publish; the count."""
        with self._lock:
            n = self._count()
            self._publish(n)
            return n

    def _count(self) -> int:
        return sum(1 for s in list(self._sockets) if s.fileno() >= 0)

    def _publish(self, n: int) -> None:
        _COUNTER.pack_into(self._map, self.index * _COUNTER.size, n)

    def expect(self, seconds: float = EXPECT) -> Callable[[], None]:
        """This worker is about to be called back (it asked a remote to connect to us): for at most ``seconds``,
        it accepts at once and its live peers leave waiting connections to it.  Returns the call that ends
        this expectation (idempotent); others of this worker go on until theirs end."""
        deadline = time.monotonic_ns() + int(seconds * 1e9)
        with self._lock:
            self._tokens += 1
            token = self._tokens
            self._expecting[token] = deadline
            self._publish_expectation()

        def done() -> None:
            with self._lock:
                if self._expecting.pop(token, None) is not None:
                    self._publish_expectation()

        return done

    def _publish_expectation(self) -> None:
        """This worker's latest open deadline, or 0 (under ``_lock``, or before any other thread can know us)."""
        _COUNTER.pack_into(self._map, _EXPECT_BASE + self.index * _COUNTER.size, max(self._expecting.values(), default=0))

    def expects(self, index: int) -> bool:
        """Whether worker ``index`` expects to be called back now (its deadline has not passed)."""
        return int(_COUNTER.unpack_from(self._map, _EXPECT_BASE + index * _COUNTER.size)[0]) > time.monotonic_ns()

    # -- the peers ---------------------------------------------------------------------------

    def load(self, index: int) -> int:
        return int(_COUNTER.unpack_from(self._map, index * _COUNTER.size)[0])

    def alive(self, index: int) -> bool:
        """Whether worker ``index`` holds its liveness lock (a listener of it serves); for this worker, whether one of ours does."""
        if index == self.index:
            return self._listeners > 0
        with self._lock:
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _LIVE_BASE + index)
            except OSError as exc:
                if exc.errno in (errno.EACCES, errno.EAGAIN):
                    return True
                raise
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, _LIVE_BASE + index)
            return False

    def expecting_peer(self) -> int | None:
        """The index of a live worker (not this one) that expects to be called back, or None."""
        for i in range(self.workers):
            if i != self.index and self.expects(i) and self.alive(i):
                return i
        return None

    def lighter_peer(self, mine: int) -> int | None:
        """The index of a live worker holding fewer connections than ``mine``, or None."""
        lighter = sorted((self.load(i), i) for i in range(self.workers) if i != self.index and self.load(i) < mine)
        for _load, i in lighter:
            if self.alive(i):
                return i
        return None

    def turn(self, listener: socket.socket) -> None:
        """Return when this worker should try to accept the connection waiting on ``listener``.

        At once if this worker expects to be called back (:meth:`expect`), or unless a live peer
        expects to be, or holds fewer connections; then when that changes, when the connection is
        gone (taken by the peer: the caller's non-blocking ``accept`` fails and it waits for the next
        one), or after :attr:`defer` seconds (accept it anyway); :attr:`expect_defer` for a peer that
        expects to be called back, which accepts at once unless it is stopped or starved: the relay's
        instances then stay in one process even on a loaded machine.
        """
        started = time.monotonic()
        while True:
            mine = self.refresh()
            if self.expects(self.index):
                return
            peer, patience = self.expecting_peer(), self.expect_defer
            if peer is None:
                peer, patience = self.lighter_peer(mine), self.defer
            if peer is None:
                return
            if time.monotonic() - started >= patience:
                self.overridden += 1
                log.debug("worker %d: accepting a connection worker %d left waiting %.0f ms", self.index, peer, patience * 1000)
                return
            time.sleep(POLL)
            if not _pending(listener):
                self.deferred += 1
                return

    def close(self) -> None:
        with self._lock:
            self._map.close()
            os.close(self._fd)  # drops the liveness lock, as the process's death would


def _pending(listener: socket.socket) -> bool:
    """A connection waits in the listen queue (the listening socket is readable)."""
    try:
        readable, _, _ = select.select([listener], [], [], 0)
    except (OSError, ValueError):  # closed: nothing more to accept here
        return False
    return bool(readable)


_current: AcceptBalance | None = None


def configure(data_dir: Path, index: int, workers: int, supervisor: int | None = None) -> AcceptBalance | None:
    """This process is worker ``index`` of ``workers`` of the node at ``data_dir``: balance its accepts.

    One worker has no peer to balance with: None (and nothing is shared).  ``supervisor`` (its pid) names the
    node's file, ``accept-load-<pid>``: a second ``xdsi serve`` started on the same data folder (a mistake,
    or a test) has workers of the same indexes, which must neither wait for the first one's liveness locks
    nor read its loads as their peers'.  Files of supervisors no longer running are removed.
    """
    global _current
    if workers < 2:
        _current = None
        return None
    node = data_dir / ".workers"
    node.mkdir(parents=True, exist_ok=True)
    if supervisor is None:
        path = node / "accept-load"
    else:
        path = node / f"accept-load-{supervisor}"
        _remove_stale(node, supervisor)
    _current = AcceptBalance(path, index, workers)
    return _current


def _remove_stale(node: Path, supervisor: int) -> None:
    for old in node.glob("accept-load-*"):
        try:
            pid = int(old.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid == supervisor:
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            old.unlink(missing_ok=True)
        except OSError:  # alive (another user's) or not ours to judge: left
            pass


def current() -> AcceptBalance | None:
    """The process's balance (:func:`configure`), or None in a single ``xdsi serve`` or a test process."""
    return _current
