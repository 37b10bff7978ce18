"""An association receiving C-STOREs: its two pynetdicom loops wake for the next message instead of on a timer.

Now only the fallback: C-STORE associations use :mod:`xdsi.dimse.wakeup` (the one mechanism, shared
with C-FIND), and this module is installed only when wakeup does not recognise pynetdicom's loops
(``wakeup.check_pynetdicom()`` false).  Same C-STORE rate, less CPU per instance, and a third of the
idle CPU of open associations (issue 14, measured with bench/ingest.py).

Why: pynetdicom (3.0) runs each association as two polling loops.  The DUL
thread sleeps ``_run_loop_delay`` (1 ms) whenever a pass found nothing to do,
both before it sends a response the handler queued and before it reads the
next PDU; the reactor thread sleeps 1 ms, then looks for a decoded message
without waiting.  A C-STORE exchange crosses these loops three times (request
complete → handler, response queued → socket, next request → DUL), so about
1.5 ms of every instance was spent asleep: ~15 % of xdsi's time per instance
once the store path itself had been made cheaper (issue 14).

:func:`install` changes both, for one association, through the two knobs
pynetdicom reads on every pass:

* the reactor's ``_reactor_checkpoint`` becomes a :class:`MessageCheckpoint`:
  still the pause gate pynetdicom uses it as (``clear()`` pauses the reactor,
  ``wait()`` blocks while paused), and then it waits (at most
  :data:`MESSAGE_WAIT` seconds, so release, abort and timeouts are still
  noticed at once or within that bound) until the DIMSE provider holds a
  decoded message, waking the moment the DUL queues one;
* the DUL's ``_run_loop_delay`` drops to :data:`FAST_LOOP_DELAY` while
  messages keep arriving, and goes back to pynetdicom's own delay after
  :data:`IDLE_AFTER` seconds without one, so an association kept open but
  idle does not keep a core busy.
"""

from __future__ import annotations

import threading
import time
from typing import Any

FAST_LOOP_DELAY = 0.0001  # seconds the DUL sleeps on an idle pass while the peer is sending
MESSAGE_WAIT = 0.005  # longest a reactor pass waits for a message before its other checks
IDLE_AFTER = 0.25  # seconds without a message after which the DUL polls at pynetdicom's pace again
_MARK = "_xdsi_store_polling"


class MessageCheckpoint(threading.Event):
    """The reactor's pause gate, which also waits for the next decoded DIMSE message (bounded)."""

    def __init__(self, assoc: Any, slow_delay: float) -> None:
        super().__init__()
        self.assoc = assoc
        self.slow_delay = slow_delay
        self.last_message = time.monotonic()

    def wait(self, timeout: float | None = None) -> bool:
        if not super().wait(timeout):  # paused (cleared) by pynetdicom: honour it as the Event would
            return False
        dimse = getattr(self.assoc, "dimse", None)
        queue = getattr(dimse, "msg_queue", None)
        if queue is None:
            return super().wait(timeout)
        with queue.not_empty:
            if not queue._qsize():
                queue.not_empty.wait(MESSAGE_WAIT)
            waiting = queue._qsize()
        dul = getattr(self.assoc, "dul", None)
        now = time.monotonic()
        if waiting:
            self.last_message = now
            if dul is not None:
                dul._run_loop_delay = min(getattr(dul, "_run_loop_delay", FAST_LOOP_DELAY), FAST_LOOP_DELAY)
        elif dul is not None and now - self.last_message > IDLE_AFTER:
            dul._run_loop_delay = self.slow_delay
        # paused while we waited (pynetdicom clears the gate, sees ``_is_paused`` and then uses the DIMSE
        # queue itself, e.g. the commitment report sent on this association): stay paused until it is done
        return super().wait(timeout)


def install(assoc: Any) -> None:
    """Give an acceptor association receiving C-STOREs the message-driven reactor (idempotent)."""
    if getattr(assoc, _MARK, False):
        return
    current = getattr(assoc, "_reactor_checkpoint", None)
    dul = getattr(assoc, "dul", None)
    if current is None or dul is None or type(current) is not threading.Event:
        return  # not pynetdicom's own gate (a sub-association's held checkpoint): leave it alone
    checkpoint = MessageCheckpoint(assoc, getattr(dul, "_run_loop_delay", 0.001))
    if current.is_set():
        threading.Event.set(checkpoint)
    assoc._reactor_checkpoint = checkpoint
    dul._run_loop_delay = FAST_LOOP_DELAY
    setattr(assoc, _MARK, True)
