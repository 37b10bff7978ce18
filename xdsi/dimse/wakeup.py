"""Wake an association's two pynetdicom threads on activity instead of on their next 1 ms poll.

Why: pynetdicom runs each association as two polling loops.  The DUL thread sleeps
``_run_loop_delay`` (1 ms) whenever it found nothing to do, then looks at its queue of PDUs to
send and at the socket; the association thread sleeps 1 ms (hard-coded) before each look at its
queue of received DIMSE messages.  A C-FIND request therefore waits for up to three such sleeps
(the DUL noticing the request, the association thread noticing the message, the DUL noticing the
responses): about 1.5 ms on average, when Orthanc answers a Patient ID query in ~2 ms in all
(bench/find.py, ``id`` row).

:func:`install` keeps both loops and their 1 ms period (so timers, idle and kill checks behave as
before) but lets activity end a sleep early:

* the DUL thread waits in ``select()`` on its socket and on a wake-up socket pair, which a put on
  its ``to_provider_queue`` (what ``dul.send_pdu`` does) writes a byte to;
* the association thread waits on an Event set by a put on the DIMSE message queue or on the
  DUL's ``to_user_queue`` (A-RELEASE / A-ABORT).

Because activity ends a wait at once, an idle wait can be longer than pynetdicom's 1 ms poll
(:data:`IDLE_WAIT`): what else the loops look at (the network and ARTIM timers, whole seconds) is
noticed within it, and ending the association (``Association.kill`` sets ``_kill``, then
``stop_dul`` sleeps until the DUL has gone) pokes the DUL and sleeps at pynetdicom's pace.  20 idle
associations, each of which had stored one instance, cost 34-42 % of a core with the former
store-polling module (reactor waits 5 ms) and 78-88 % with 1 ms waits (issue 14, measured).

Both loops call ``time.sleep`` through their module's global ``time``; those two modules' ``time``
is replaced (once, process-wide) by a proxy whose ``sleep`` looks for a waiter on the *current
thread* (the DUL and the Association are Thread objects) and otherwise sleeps as ``time.sleep``
does, so associations without :func:`install` and every other ``time`` use are unchanged.
:func:`check_pynetdicom` verifies at start-up that the loops still sleep the way this assumes.
"""

from __future__ import annotations

import inspect
import logging
import select
import socket
import ssl
import threading
import time
from typing import Any, Callable

log = logging.getLogger(__name__)

_MARK = "_xdsi_wakeup"
_WAIT = "_xdsi_wait"  # attribute on a Thread: its sleep(seconds) replacement
_REACTOR_SLEEP = 0.001  # Association._run_reactor's hard-coded poll
# the DUL's longest wait while another thread holds the socket for reading: sends wake it, and so does the reader
# giving the socket back (direct.Guard.release_read); was 1 ms, a wake-up and a GIL hand-off per millisecond
READER_WAIT = 0.01
IDLE_WAIT = 0.01  # longest wait of either loop when nothing happens: activity ends it at once
LAZY_WAIT = 0.05  # a DUL told to read lazily (read_lazily) looks at its socket this often; sends still wake it at once
_LAZY = "_xdsi_lazy"  # on a DUL: read_lazily's condition
_POKE = "_xdsi_poke"  # on a DUL: wakes it if it waits
_lock = threading.Lock()
_patched = False


class _TimeProxy:
    """The ``time`` module, except that ``sleep`` on a thread with a waiter is that waiter."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        wait = getattr(threading.current_thread(), _WAIT, None)
        if wait is None:
            time.sleep(seconds)
        else:
            wait(seconds)


def check_pynetdicom() -> bool:
    """Whether pynetdicom's loops still sleep where :func:`install` expects (else install does nothing)."""
    try:
        from pynetdicom import association, dul

        reactor = inspect.getsource(association.Association._run_reactor)
        dul_loop = inspect.getsource(dul.DULServiceProvider.run_reactor)
    except (ImportError, OSError, TypeError, AttributeError):
        return False
    return "time.sleep(0.001)" in reactor and "time.sleep(self._run_loop_delay)" in dul_loop


_SUPPORTED = check_pynetdicom()


def _patch_modules() -> None:
    global _patched
    with _lock:
        if _patched:
            return
        from pynetdicom import association, dul

        association.time = _TimeProxy()  # type: ignore[assignment]
        dul.time = _TimeProxy()  # type: ignore[assignment]
        _patched = True


def _signal_on_put(q: Any, signal: Callable[[], None]) -> None:
    """Make ``q.put`` (and so ``put_nowait``) call ``signal`` after each put; an instance attribute only."""
    put = q.put

    def put_and_signal(item: Any, block: bool = True, timeout: float | None = None) -> None:
        put(item, block, timeout)
        signal()

    q.put = put_and_signal


def install(assoc: Any) -> bool:
    """Let activity wake this association's DUL and reactor threads early (idempotent).

    Returns False (and changes nothing) when pynetdicom's loops are not the ones this module knows.
    """
    if not _SUPPORTED:
        return False
    if getattr(assoc, _MARK, False):
        return True
    dul = assoc.dul
    _patch_modules()

    # -- the DUL thread: select() on the peer's socket and on a wake-up pair ---------------------
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)

    # A poke is a system call: made only while the DUL thread is (about to be) in select().  The
    # DUL raises ``selecting`` before it looks at its queue one last time, a sender puts before it
    # looks at ``selecting``, so an item is either seen by that look or poked about.
    selecting = [False]
    to_provider = dul.to_provider_queue

    def poke() -> None:
        try:
            wake_w.send(b"\0")
        except (BlockingIOError, OSError):  # already full of pokes, or closed with the association
            pass

    def drain() -> None:
        try:
            while wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def wait_for_sends(seconds: float, reader: Any = None) -> None:
        selecting[0] = True
        try:
            if to_provider.qsize() or dul._kill_thread:
                return
            if reader is not None and not reader.read_lock.locked():
                return  # given back after the caller looked and before ``selecting``: its release_read saw no waiter
            select.select([wake_r], [], [], seconds)
        except (OSError, ValueError):
            time.sleep(seconds)
        finally:
            selecting[0] = False
        drain()

    def poke_if_selecting() -> None:
        if selecting[0]:
            poke()

    def dul_wait(seconds: float) -> None:
        sock = getattr(getattr(dul, "socket", None), "socket", None)
        if sock is None or wake_r.fileno() < 0:
            time.sleep(seconds)
            return
        reader = getattr(dul, "_xdsi_direct_lock", None)  # xdsi.dimse.direct's guard
        if reader is not None and reader.read_lock.locked():
            # another thread reads the socket (xdsi.dimse.receive_direct, direct's C-STORE-RSP reader): the
            # DUL may not, so waiting on the socket would return at once while the peer's bytes wait there;
            # the reader pokes when it gives the socket back
            if reader.on_read_release is None:
                reader.on_read_release = poke_if_selecting
            wait_for_sends(max(seconds, READER_WAIT), reader)
            return
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return  # decrypted data already buffered: select() would not see it
        lazy = getattr(dul, _LAZY, None)
        if lazy is not None and lazy():
            wait_for_sends(max(seconds, LAZY_WAIT))  # the peer's PDUs wait in the socket; ours go out at once
            return
        selecting[0] = True
        try:
            if to_provider.qsize() or dul._kill_thread:
                return
            select.select([sock, wake_r], [], [], max(seconds, IDLE_WAIT))
        except (OSError, ValueError):  # the socket was closed meanwhile
            time.sleep(seconds)
            return
        finally:
            selecting[0] = False
        drain()

    # -- the association thread: an Event set by every message or primitive for it -------------
    arrived = threading.Event()

    msg_queue = assoc.dimse.msg_queue
    to_user = dul.to_user_queue

    def reactor_wait(seconds: float) -> None:
        if seconds != _REACTOR_SLEEP:  # the other sleeps of association.py (send_* waits) stay as they are
            time.sleep(seconds)
            return
        if getattr(assoc, "_kill", False):  # ending: stop_dul waits here for the DUL, which must look now
            poke()
            time.sleep(seconds)
            return
        if msg_queue.qsize() or to_user.qsize():  # a put whose signal the last clear() swallowed
            return
        arrived.wait(IDLE_WAIT)
        arrived.clear()

    def closed(_event: Any = None) -> None:
        for s in (wake_r, wake_w):
            try:
                s.close()
            except OSError:
                pass

    guard = getattr(dul, "_xdsi_direct_lock", None)  # xdsi.dimse.direct's guard, made when the connection opened
    if guard is not None and guard.on_read_release is None:
        # a direct reader giving the socket back wakes the DUL from now on, not only once the DUL has happened to
        # wait while a reader held it (dul_wait): a PDU given back (pushback) is then read at once, not after
        # IDLE_WAIT, even when the DUL never got a turn while the reader held the socket (a busy machine)
        guard.on_read_release = poke_if_selecting
    _signal_on_put(dul.to_provider_queue, poke_if_selecting)
    _signal_on_put(msg_queue, arrived.set)
    _signal_on_put(to_user, arrived.set)
    setattr(dul, _WAIT, dul_wait)
    setattr(dul, _POKE, poke_if_selecting)
    setattr(assoc, _WAIT, reactor_wait)
    setattr(assoc, _MARK, True)
    # the pair is closed with the association (garbage collection would close it too)
    try:
        from pynetdicom import evt

        assoc.bind(evt.EVT_CONN_CLOSE, closed)
    except Exception:  # pragma: no cover - binding is best effort; the sockets are closed when collected
        log.debug("could not bind EVT_CONN_CLOSE for the wake-up pair", exc_info=True)
    poke()  # the DUL may be in a plain 1 ms sleep now; from its next one it selects
    return True


__all__ = ["install", "check_pynetdicom"]


def read_lazily(assoc: Any, while_: Callable[[], bool]) -> Callable[[], None] | None:
    """While ``while_()`` is true, this association's DUL (:func:`install`-ed) reads its socket only every
    :data:`LAZY_WAIT` seconds, all that waits there at once; what we send still wakes it at once.

    Why (issue 15): a remote sends a Pending C-MOVE response per sub-operation, and a relay needs none of them once
    it has the count (``xdsi.gateway.relay.skip_pending`` drops them); each still woke the DUL thread, which took the
    GIL from the two threads moving the instances (~0.1 ms of CPU per relayed instance).  Returns what wakes the DUL
    to look again at once (call it when ``while_()`` turns false), or None if the association was not installed.
    """
    dul = getattr(assoc, "dul", None)
    if dul is None or not getattr(assoc, _MARK, False):
        return None
    setattr(dul, _LAZY, while_)
    poke: Callable[[], None] = getattr(dul, _POKE)
    return poke
