"""A requestor association's reactor really paused before its thread sends and waits for a response.

Why: pynetdicom (3.0) pauses an association's reactor thread around every ``send_c_*`` so that the reactor
does not take the response off the DIMSE queue: the sender clears ``_reactor_checkpoint`` and waits until
``_is_paused``.  But the reactor sets ``_is_paused = True`` before *every* ``wait()`` of its 1 ms loop and
back to False only when it runs again; after one send has set the checkpoint and the next clears it, the
reactor, woken by the set but not yet scheduled, still shows ``_is_paused`` from before.  The second send
goes out at once, the reactor then runs its iteration, finds the response on the queue and drops it
("Received unexpected C-ECHO service message"), and the sender waits out its DIMSE timeout.  The faster
the peer answers and the busier the machine, the likelier: seen in CI with xdsi answering back-to-back
C-STORE and C-ECHO requests of a pynetdicom client (tests/integration/test_receive_direct.py).

:func:`install` makes ``clear()`` of that one association's checkpoint return only once the reactor is
blocked on it after this clear (both steps under the Event's own lock, so neither can slip between the
other's), or once the reactor thread has ended.  A clear from the reactor thread itself (pynetdicom's
release after a network timeout) is left as it was.  Nothing process-wide changes.  The race and this
remedy are pynetdicom's to take upstream.
"""

from __future__ import annotations

import threading
import time
from typing import Any

_MARK = "_xdsi_reactor_pause"
POLL = 0.0001  # what pynetdicom's own wait for ``_is_paused`` sleeps between looks


def install(assoc: Any) -> None:
    """Make ``assoc``'s reactor pause reliable (idempotent; a stand-in without pynetdicom's checkpoint is left)."""
    checkpoint = getattr(assoc, "_reactor_checkpoint", None)
    cond = getattr(checkpoint, "_cond", None)
    if checkpoint is None or cond is None or getattr(checkpoint, _MARK, False):
        return
    state = {"cleared": 0, "parked": -1}  # clears so far; the clear the reactor is blocked after (-1: none)

    def clear() -> None:
        with cond:
            checkpoint._flag = False
            state["cleared"] += 1
            mine = state["cleared"]
        if threading.current_thread() is assoc:
            return  # the reactor pausing itself: it is not in its loop
        while state["parked"] < mine and checkpoint._flag is False:
            if not assoc.is_alive() or getattr(assoc, "_kill", False):
                return  # no reactor to wait for
            time.sleep(POLL)

    def wait(timeout: float | None = None) -> bool:
        with cond:
            if checkpoint._flag:
                return True
            state["parked"] = state["cleared"]
            return bool(cond.wait(timeout))

    checkpoint.clear = clear
    checkpoint.wait = wait
    setattr(checkpoint, _MARK, True)


__all__ = ["install"]
