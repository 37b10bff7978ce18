"""The next C-STORE of an association read from its socket by the association thread itself.

Why (issue 14, ingest): pynetdicom (3.0) receives a C-STORE on the association's DUL thread: each
P-DATA-TF PDU is read, decoded into PDU and primitive objects, run through the state machine (Sta6 +
Evt10 -> DT-2) and written to the spool file fragment by fragment; the finished message is put on a
queue for the association thread, which sleeps until it notices it.  With a peer that waits for each
response before it sends the next instance (storescu, most modalities) every instance is handed from
one thread to the other and back, and on a busy machine each hand-off can wait for a core.  After the
association thread has written a Success response (:mod:`xdsi.dimse.store_responses`) the peer's next
request is the next thing to happen on the association, so that thread now waits for it on the socket
and, if it is a plain C-STORE-RQ, reads it itself: PDUs straight into the spool file with large reads,
the command set decoded by a small strict parser (:func:`xdsi.dimse.direct.parse_command`), the File
Meta packed as bytes (:func:`xdsi.gateway.receive.start_store`, byte for byte pynetdicom's).

What is taken here, and what is left to pynetdicom:

* only while the DUL has nothing in flight (Sta6, its queues empty, no message half received, nothing
  given back), holding the direct guard's ``read_lock`` so the DUL reads nothing meanwhile (the same
  discipline as :meth:`xdsi.dimse.direct.DirectWriter._read_response`), and only for :data:`WAIT`
  seconds after the response: an idle association goes back to the DUL;
* a PDU is consumed only when it is a P-DATA-TF whose every PDV is understood: the first one a whole
  C-STORE-RQ command set (control header 0x03) announcing a data set, on an accepted context, with
  valid SOP Class and Instance UIDs; every further one a data set fragment on that same context, the
  last one flagged last and nothing after it.  Any other PDU (A-RELEASE-RQ, A-ABORT, C-ECHO, C-CANCEL,
  a command split over PDVs, a fragment on another context) is given back unread for the DUL, with
  the message received so far left as pynetdicom's ``DIMSEServiceProvider.message``, the state
  pynetdicom itself would be in after the PDUs consumed here; pynetdicom then goes on (or refuses) as
  it always does.  A message is never split between the two readers in any other way;
* the finished message takes pynetdicom's own last steps: ``EVT_DIMSE_RECV`` (the association governor
  counts it), ``message_to_primitive`` and the DIMSE message queue, from which the association
  thread serves it next, with the same handlers.  ``EVT_PDU_RECV`` / ``EVT_DATA_RECV`` (bound by
  nothing in xdsi) are not triggered for the PDUs read here;
* a failed read tells the DUL the transport closed (Evt17), as pynetdicom's socket does; the spool
  keeper then removes the partial spool file (it is ``dimse.message``'s from the first fragment on).

The spool file holds exactly what pynetdicom writes: preamble, File Meta, then every data set fragment
in order (tests/integration/test_receive_direct.py compares stored bytes with dcmtk's storescu input).
The gateway (xdsi/gateway, issue 15): the storage association a remote opens to deliver what a relay
asked for answers through ``store_responses.SuccessSender`` as well (``relay._receive_fast``), so its
next C-STOREs are read here too (the message queued is the one ``xdsi.gateway.receive.start_store``
builds, which that module also uses for the C-STOREs the DUL still reads).  Only our own C-GET
association to a remote (a requestor: its thread also waits for the C-GET responses) is left to
pynetdicom's reader.
"""

from __future__ import annotations

import hashlib
import logging
import select
import ssl
import struct
import time
from typing import Any

from pynetdicom import _config, evt
from pynetdicom.pdu_primitives import P_DATA

from xdsi.dimse import direct
from xdsi.gateway.headscan import HEAD_BYTES
from xdsi.gateway.receive import start_store
from xdsi.storage import early_sync

log = logging.getLogger(__name__)

WAIT = 0.05  # seconds the association thread waits on the socket for the next request after a response
_BE_LENGTH = struct.Struct(">L")
P_DATA_TF = 0x04
_MARK = "_xdsi_receive_direct"  # counter on the association: messages read here (for tests)
WRITTEN = "_xdsi_written"  # on a C-STORE request read here: its spool file's early_sync.Written
# on a C-STORE request read here for a relay (a remote's storage association): its spool file's first HEAD_BYTES
# (bytes, the whole file when shorter), what xdsi.gateway.headscan.scan_file would read from it
HEAD = "_xdsi_head"


# process-wide counts, for tests and diagnostics: C-STOREs read here, and times a PDU was given back to the DUL
stats = {"taken": 0, "given_back": 0}


def taken(assoc: Any) -> int:
    """How many C-STOREs this association's thread has read itself."""
    return int(getattr(assoc, _MARK, 0))


def claim(assoc: Any) -> Any:
    """Take the association's ``read_lock`` before its Success response goes out: the guard, or None.

    Held from before the response is written until :func:`take_next` is done, so the DUL does not read
    the peer's next request meanwhile (it arrives while the work after the response runs); the DUL
    waits on its wake-up pair instead of the socket while the lock is held (:mod:`xdsi.dimse.wakeup`).
    The caller releases it with :func:`release`.
    """
    if not _config.STORE_RECV_CHUNKED_DATASET:
        return None
    dul = getattr(assoc, "dul", None)
    g = getattr(dul, direct._GUARD, None)
    dimse = getattr(assoc, "dimse", None)
    if g is None or dimse is None or (getattr(dimse, "_xdsi_relay_receive", False) and assoc.is_requestor):
        return None  # not guarded from the start, or our C-GET to a remote (its thread waits for the C-GET responses)
    if not g.read_lock.acquire(timeout=0.05):  # the DUL holds it only while it reads one PDU
        return None
    return g


QUIET = "_xdsi_quiet_release"  # on a guard: the next release() need not wake the DUL (set by take_next)


def release(g: Any) -> None:
    """Give ``read_lock`` back; the DUL is woken (``release_read``) unless :func:`take_next` said it has nothing to read."""
    if getattr(g, QUIET, False):
        setattr(g, QUIET, False)
        g.read_lock.release()
        return
    g.release_read()


def take_next(assoc: Any, g: Any, wait: float = WAIT) -> bool:
    """With ``g.read_lock`` held (:func:`claim`): read the next C-STORE here if it is a plain one.

    True when a message was put on the DIMSE queue for serving.  Called on the association thread right
    after it wrote a Success C-STORE response and ran the work registered for after it.
    """
    dul, dimse = assoc.dul, assoc.dimse
    with g.lock:
        if not direct.reader_idle(g, dul, dimse):
            return False
    if not _readable(dul.socket.socket, dul, wait):
        return False
    took = _receive(assoc, g, dul, dimse)
    if took and not g.pushback:
        # the whole request was read here and is on the DIMSE queue, nothing was given back, and the peer waits for our
        # response, so the DUL has nothing to read; it is not woken for this release (one wake-up, a drain of its
        # wake-up pair and a GIL hand-off less per instance: issue 15 for a relay's remote, issue 14 for every
        # C-STORE) and looks again within wakeup.READER_WAIT (10 ms) as it does while the lock is held
        setattr(g, QUIET, True)
    return took


def _readable(raw: Any, dul: Any, wait: float) -> bool:
    """Whether the peer has sent something within ``wait`` seconds (an abort or a send request ends the wait)."""
    deadline = time.monotonic() + wait
    while True:
        if isinstance(raw, ssl.SSLSocket) and raw.pending():
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            readable, _, _ = select.select([raw], [], [], min(left, 0.01))
        except (OSError, ValueError):  # closed under us: the DUL finds out
            return False
        if readable:
            return True
        if dul.to_provider_queue.queue or dul.state_machine.current_state != "Sta6" or dul._kill_thread:
            return False


def _pdvs(body: bytes | bytearray) -> list[tuple[int, int, memoryview]] | None:
    """(context ID, control header, fragment) of each PDV item of a P-DATA-TF body; None if malformed (PS3.8 9.3.5)."""
    out = []
    view = memoryview(body)
    pos, end = 0, len(body)
    while pos < end:
        if pos + 6 > end:
            return None
        length = _BE_LENGTH.unpack_from(body, pos)[0]
        if length < 2 or pos + 4 + length > end:
            return None
        out.append((body[pos + 4], body[pos + 5], view[pos + 6 : pos + 4 + length]))
        pos += 4 + length
    return out or None


def _receive(assoc: Any, g: Any, dul: Any, dimse: Any) -> bool:
    """Read PDUs of one C-STORE-RQ until it is complete (True) or something is given back to the DUL (False)."""
    message = None
    context_id = -1
    digest: Any = None  # sha256 of the spool file as it is written, handed on with the request (WRITTEN)
    size = 0
    kept: bytearray | None = None  # a relayed request's spool file head (HEAD), as it is written
    # the governor's PduGuard, when it can read a PDU's body and the next one's header at once (recv_upto): one read
    # per PDU instead of two once the bytes have arrived (issues 14 and 15: every read is a GIL hand-off)
    pdu_guard = getattr(g.raw_recv, "__self__", None)
    upto = getattr(pdu_guard, "recv_upto", None)
    ahead = bytearray()  # bytes read past the PDU in hand: the start of the next one
    while True:
        try:
            if upto is None:
                header = g.recv(6)  # through the governor's PduGuard: its limits hold for what is read here
            else:
                header, ahead = ahead[:6], ahead[6:]
                if len(header) < 6:
                    header += upto(6 - len(header), 6 - len(header))
            if len(header) < 6 or header[0] != P_DATA_TF:
                g.pushback += header + ahead  # not a P-DATA-TF (or the peer closed): the DUL reads the rest
                return False
            length = _BE_LENGTH.unpack_from(header, 2)[0]
            if upto is None:
                body = g.recv(length)
            else:
                pdu_guard.header_read(P_DATA_TF, length)  # over the limit: answered, closed and raised, as recv would
                body = upto(length, length + 6)
                if len(body) > length:
                    ahead = body[length:]
                    del body[length:]
        except Exception:  # what the DUL does when reading fails (the PduGuard has answered an oversize PDU)
            dul.event_queue.put("Evt17")
            return False
        if len(body) != length:  # the peer closed part-way: give back what came, the DUL sees the close
            g.pushback += header + body
            return False
        dul._idle_timer.restart()
        items = _pdvs(body)
        started = None
        if items is not None and message is None:
            cx, control, fragment = items[0]
            if control == 0x03:
                primitive = P_DATA()
                primitive.presentation_data_value_list.append((cx, b"\x03" + bytes(fragment)))
                if _data_only(items[1:], cx):
                    started = start_store(assoc, primitive)
            if started is None:
                items = None
        elif items is not None and not _data_only(items, context_id):
            items = None
        if items is None:  # not understood here: the DUL reads this PDU as if it had just arrived
            g.pushback += header + body + ahead
            stats["given_back"] += 1
            return False
        if started is not None:
            message = dimse.message = started  # the spool keeper removes its file if the transfer fails
            context_id = started.context_id
            items = items[1:]
            head = started._xdsi_spool_head
            # a remote's storage association to a relay: what it delivers is relayed, not stored here (a C-STORE on it
            # that no relay takes is archived without a digest, so the tier hashes the file itself); sha256 of a
            # 512x512 CT was ~0.3 ms CPU per relayed instance (issue 15)
            relayed = getattr(dimse, "_xdsi_relay_receive", False)
            digest, size = (None if relayed else hashlib.sha256(head)), len(head)
            kept = bytearray(head[:HEAD_BYTES]) if relayed else None
        spool = message._data_set_file
        spool_io = getattr(spool, "file", spool)  # past NamedTemporaryFile's per-call attribute wrapper
        write = spool_io.write
        last = False
        try:
            for _, control, fragment in items:
                write(fragment)
                if digest is not None:
                    digest.update(fragment)
                elif kept is not None and len(kept) < HEAD_BYTES:
                    kept += fragment[: HEAD_BYTES - len(kept)]
                size += len(fragment)
                last = bool(control & 0x02)
            spool.flush()
        except (OSError, ValueError) as exc:  # disk full, or the spool keeper closed it: the association goes
            log.error("C-STORE spool write failed: %s", exc)
            dul.event_queue.put("Evt17")
            return False
        if last and ahead:  # the peer sent on before our response (the start of its next PDU): the DUL reads it
            g.pushback += ahead
        if last:
            # the file's fsync starts now, while the association thread parses the header (early_sync); not on a
            # remote's storage association to a relay: what it delivers is relayed, not stored (or stored by a cache
            # that syncs it itself)
            synced = None if digest is None else early_sync.start(message._data_set_path, spool_io.fileno())
            _complete(assoc, dimse, message, None if digest is None else early_sync.Written(size, digest.hexdigest(), synced),
                      None if kept is None else bytes(kept))
            return True


def _data_only(items: list[tuple[int, int, memoryview]], context_id: int) -> bool:
    """Every PDV a data set fragment on ``context_id``, and none after the last one."""
    for i, (cx, control, _) in enumerate(items):
        if cx != context_id or control & 0x01 or control & ~0x03 or (control & 0x02 and i != len(items) - 1):
            return False
    return True


def _complete(assoc: Any, dimse: Any, message: Any, written: early_sync.Written | None, head: bytes | None = None) -> None:
    """pynetdicom's ``DIMSEServiceProvider.receive_primitive`` for a finished C-STORE-RQ.

    ``written`` (the spool file's size and sha256, hashed as its bytes were written, and its fsync, already
    started) goes with the request as :data:`WRITTEN`: the store path makes the file durable without
    reading it again to hash it, waiting for that fsync instead of running its own.
    """
    evt.trigger(assoc, evt.EVT_DIMSE_RECV, {"message": message})
    context_id = message.context_id
    primitive = message.message_to_primitive()
    if written is not None:  # None: not hashed (relayed); the store path then hashes what it keeps itself
        setattr(primitive, WRITTEN, written)
    if head is not None:  # the relay checks the delivered instance's identity from these, not by reading the file again
        setattr(primitive, HEAD, head)
    dimse.message = None
    setattr(assoc, _MARK, taken(assoc) + 1)
    stats["taken"] += 1
    dimse.msg_queue.put((context_id, primitive))


__all__ = ["HEAD", "HEAD_BYTES", "WAIT", "WRITTEN", "stats", "claim", "release", "take_next", "taken"]
