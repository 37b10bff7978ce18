"""What one DICOM peer may cost: PDU sizes read, time to associate, association slots, idle time.

Measured before this module (issue 9): pynetdicom reads a PDU whole, as long as
its length field says, so an 800 MB A-ASSOCIATE-RQ was buffered before any
association existed; every accepted TCP connection counted against
``maximum_associations`` for ``acse_timeout`` (30 s) even if it never sent a
byte or was already closed, so 40 silent sockets or a connect/close storm
locked every peer out; and nothing stopped one peer from taking every slot.

:class:`ConnectionGovernor` closes these through pynetdicom's public events
(``EVT_CONN_OPEN``, ``EVT_REQUESTED``, ``EVT_CONN_CLOSE``, ``EVT_DIMSE_RECV``,
``EVT_DIMSE_SENT``) plus a few documented attributes, and one private read
pattern, checked at start-up by :func:`check_pynetdicom_reader`:

* ``DULServiceProvider._read_pdu_data`` reads a PDU as ``socket.recv(6)`` (the
  header), then ``socket.recv(pdu_length)``, on ``dul.socket`` (the
  :class:`~pynetdicom.transport.AssociationSocket`), and turns an ``OSError``
  from either into Evt17 (transport closed).  :class:`PduGuard` replaces that
  object's ``recv`` (an instance attribute, set in ``EVT_CONN_OPEN`` before the
  DUL thread starts) and refuses an oversize PDU after its 6-byte header:
  A-ASSOCIATE-RJ for an A-ASSOCIATE-RQ, A-ABORT for anything else, then close.
* ``Association.acse_timeout`` (setter also sets the DUL's ARTIM timer) bounds the
  wait for the A-ASSOCIATE-RQ; we shorten it to ``associate_timeout`` on accept
  and restore it once the request is in.
* ``dul.to_user_queue``: an acceptor waits on it for the A-ASSOCIATE-RQ; a
  ``None`` put there when the connection closes first ends that wait at once
  instead of after ``acse_timeout`` (what pynetdicom does when the wait times out).
* ``acse.send_reject`` then ``Association.kill`` from ``EVT_REQUESTED``, as pynetdicom's own
  ``maximum_associations`` check does (pynetdicom then skips negotiation).
* ``AE.make_server(server_class=...)`` (public) gives the listener
  :class:`xdsi.dimse.server.GovernedAssociationServer`: a 512-deep listen backlog and
  socketserver's ``verify_request`` hook, which drops a connection the peer already closed
  before pynetdicom spends two threads and a deep copy of every presentation context on it.

pynetdicom's ``maximum_associations`` is set out of the way (it counts every
acceptor thread, silent and closed connections included); the governor counts.
"""

from __future__ import annotations

import inspect
import logging
import os
import socket
import ssl
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from pynetdicom import evt
from pynetdicom.dul import DULServiceProvider

from xdsi.config import DimseLimits

log = logging.getLogger(__name__)

A_ASSOCIATE_RQ = 0x01
P_DATA_TF = 0x04
# A-ASSOCIATE-RJ (PS3.8 9.3.4): result, source, reason
REJECT_PERMANENT, REJECT_TRANSIENT = 0x01, 0x02
SOURCE_PRESENTATION = 0x03
LOCAL_LIMIT_EXCEEDED = 0x02
# A-ABORT (PS3.8 9.3.8): source 2 = service provider, reason 6 = invalid PDU parameter value
ABORT_PROVIDER, INVALID_PDU_PARAMETER = 0x02, 0x06
PENDING_STATUSES = (0xFF00, 0xFF01)
# bytes a read allocates before they arrive (the default 1 MiB PDU, its PDV header and the next PDU's header): a
# larger PDU's buffer grows as its bytes come, so a declared length alone never makes us allocate more than this
READ_AHEAD_ALLOCATION = (1 << 20) + 16


class PduTooLarge(OSError):
    """Raised from ``recv`` so pynetdicom's DUL treats the refused connection as closed (Evt17)."""


def check_pynetdicom_reader() -> None:
    """Refuse to start if pynetdicom no longer reads PDUs the way :class:`PduGuard` relies on.

    Without the guard an oversize PDU would be buffered whole again; a clear
    start-up error is better than a silently missing limit after an upgrade.
    """
    try:
        src = inspect.getsource(DULServiceProvider._read_pdu_data)
    except (OSError, TypeError, AttributeError) as exc:  # pragma: no cover - unusual installs
        raise RuntimeError(f"cannot check pynetdicom's PDU reader ({exc}); PDU size limits would not hold") from None
    needed = ("self.socket.recv(6)", "self.socket.recv(pdu_length)", '">BBL"')
    missing = [n for n in needed if n not in src]
    if missing:
        raise RuntimeError(
            "pynetdicom's DULServiceProvider._read_pdu_data no longer reads a PDU as recv(6) then "
            f"recv(pdu_length) (missing {missing}); xdsi.dimse.limits.PduGuard must be adapted"
        )


class PduGuard:
    """Replaces one ``AssociationSocket.recv``: bounded PDU lengths, a deadline for the A-ASSOCIATE-RQ.

    Reads go straight to the wrapped ``socket.socket`` with a timeout, so a peer
    that stalls mid-PDU cannot hold the DUL thread forever (pynetdicom's accepted
    sockets are blocking without timeout).
    """

    def __init__(self, assoc_socket: Any, limits: DimseLimits, network_timeout: float | None) -> None:
        self.raw: socket.socket = assoc_socket.socket
        self.limits = limits
        self.network_timeout = network_timeout
        self.deadline: float | None = time.monotonic() + limits.associate_timeout  # until the A-ASSOCIATE-RQ is in
        self.last_activity = time.monotonic()
        self.refused: str | None = None
        self._header: tuple[int, int] | None = None
        assoc_socket.recv = self.recv

    def limit_for(self, pdu_type: int) -> int:
        if pdu_type == P_DATA_TF:
            # the PDU length counts the PDV items' 6 header bytes on top of what we advertised (PS3.8 9.3.5)
            return self.limits.max_pdu_size + 6
        return self.limits.max_associate_rq

    def recv(self, nr_bytes: int) -> bytearray:
        """pynetdicom's ``AssociationSocket.recv`` contract: up to ``nr_bytes``, fewer only if the peer closed."""
        header, self._header = self._header, None
        if header is not None:
            pdu_type, length = header
            limit = self.limit_for(pdu_type)
            if length > limit:
                self._refuse(pdu_type, length, limit)
        data = self._read(nr_bytes)
        if header is None and nr_bytes == 6 and len(data) == 6:
            pdu_type, _, length = struct.unpack(">BBL", data)
            self._header = (pdu_type, length)
            self.last_activity = time.monotonic()
        return data

    def header_read(self, pdu_type: int, length: int) -> None:
        """A PDU header another reader took (with :meth:`recv_upto`): its length checked as :meth:`recv` checks one.

        Raises ``PduTooLarge`` (having answered and closed) when it is over the limit.
        """
        limit = self.limit_for(pdu_type)
        if length > limit:
            self._refuse(pdu_type, length, limit)
        self.last_activity = time.monotonic()

    def recv_upto(self, need: int, most: int) -> bytearray:
        """At least ``need`` bytes (fewer only at the peer's close), and up to ``most`` if they are already there.

        For the direct C-STORE reader (xdsi.dimse.receive_direct): a PDU's body and the next PDU's header in one
        read when both have arrived, instead of a read for each.  Never waits for more than ``need``.  The caller
        checks each header it finds (:meth:`header_read`).
        """
        return self._read(need, most)

    def _read(self, n: int, most: int | None = None) -> bytearray:
        """Up to ``n`` bytes, fewer only at the peer's close; within the associate timeout, then the network timeout.

        Once associated, bytes already waiting are taken with one ``readv`` of the descriptor (a socket with
        a timeout is non-blocking underneath): Python's ``recv`` on such a socket always polls first, and
        setting the same timeout again before each read was a third system call.  A TCP C-STORE of a
        512 x 512 CT is some 60 reads at pynetdicom's and storescu's 16 KiB PDUs (issue 14).  TLS sockets
        and a read that would wait take ``recv_into`` with its timeout, as before.

        The bytes are read into the buffer returned, allocated once for the PDU (up to
        :data:`READ_AHEAD_ALLOCATION`, grown past it as bytes come): an ``os.read`` per read allocated a
        bytes object of the size asked for, the kernel filled part of it and the part was copied onto the
        end of a growing buffer; for a relayed 512 x 512 CT, received in one PDU, that was two copies and
        ~100 fresh pages to fault in per instance (issue 15).
        """
        most = n if most is None else max(n, most)
        buf = bytearray(min(most, READ_AHEAD_ALLOCATION))
        got = 0
        raw = self.raw
        while got < n:
            if got == len(buf):  # past the first allocation: double, never beyond what may still come
                buf += bytes(min(len(buf), most - len(buf)))
            want = min(len(buf) - got, 1 << 20)  # a whole PDU body in one read when it has arrived (bounded by most)
            direct = False  # read what is waiting without a poll: associated, with a timeout, not TLS
            if self.deadline is not None:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no complete A-ASSOCIATE-RQ within the associate timeout")
                raw.settimeout(left)
            else:
                timeout = self.network_timeout
                if raw.gettimeout() != timeout:
                    raw.settimeout(timeout)
                direct = timeout is not None and not isinstance(raw, ssl.SSLSocket)
            with memoryview(buf) as whole, whole[got : got + want] as view:
                count: int | None = None
                if direct:
                    try:
                        count = os.readv(raw.fileno(), [view])
                    except (BlockingIOError, InterruptedError):
                        count = None  # nothing waiting: recv_into below waits for it, with the timeout
                    except OSError:
                        count = None  # closed or failed: recv_into below raises what pynetdicom expects
                if count is None:
                    count = raw.recv_into(view, want)
            if not count:
                break
            got += count
        del buf[got:]
        return buf

    def _refuse(self, pdu_type: int, length: int, limit: int) -> None:
        """Answer without reading the body, close, and make the DUL see a closed transport."""
        if pdu_type == A_ASSOCIATE_RQ:
            answer = struct.pack(">BBLBBBB", 0x03, 0, 4, 0, REJECT_PERMANENT, SOURCE_PRESENTATION, LOCAL_LIMIT_EXCEEDED)
            what = "A-ASSOCIATE-RJ"
        else:
            answer = struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, ABORT_PROVIDER, INVALID_PDU_PARAMETER)
            what = "A-ABORT"
        self.refused = f"PDU type 0x{pdu_type:02X} of {length} bytes exceeds the limit of {limit}"
        log.warning("DICOM peer %s: %s; answered %s and closed", _peer(self.raw), self.refused, what)
        try:
            self.raw.settimeout(2.0)
            self.raw.sendall(answer)
            self.raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        raise PduTooLarge(self.refused)


def _peer(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except (OSError, ValueError, TypeError):  # closed, or not an IP socket
        return "?"


@dataclass(eq=False)
class _Conn:
    """What the governor knows about one accepted connection."""

    assoc: Any
    guard: PduGuard
    address: str
    opened: float = field(default_factory=time.monotonic)
    calling_ae: str | None = None  # set once the A-ASSOCIATE-RQ is in
    busy: int = 0  # DIMSE requests received and not yet finally answered
    last_dimse: float = field(default_factory=time.monotonic)

    @property
    def alive(self) -> bool:
        a = self.assoc
        return a.is_alive() and not (a.is_released or a.is_aborted or a.is_rejected)


class ConnectionGovernor:
    """Association slots, caps per peer, the A-ASSOCIATE-RQ deadline and the idle reaper for one listener.

    pynetdicom's own ``maximum_associations`` counts threads, including
    connections that never sent a request or have already closed; the
    governor counts only associations whose A-ASSOCIATE-RQ arrived, and keeps
    pre-association connections in a bounded pool of their own.
    """

    def __init__(self, limits: DimseLimits, max_associations: int, acse_timeout: float | None, network_timeout: float | None) -> None:
        check_pynetdicom_reader()
        self.limits = limits
        self.max_associations = max_associations
        self.acse_timeout = acse_timeout
        self.network_timeout = network_timeout
        self._lock = threading.Lock()
        self._pending: OrderedDict[int, _Conn] = OrderedDict()  # oldest first
        self._active: dict[int, _Conn] = {}
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None
        # xdsi.dimse.slots.SharedSlots when several worker processes serve this listener: the limits hold for
        # the node (checked after this process's own count, which it implies)
        self.shared: Any = None

    def handlers(self) -> list[tuple[Any, Any]]:
        return [
            (evt.EVT_CONN_OPEN, self.on_conn_open),
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_CONN_CLOSE, self.on_conn_close),
            (evt.EVT_DIMSE_RECV, self.on_dimse_recv),
            (evt.EVT_DIMSE_SENT, self.on_dimse_sent),
        ]

    # -- events ---------------------------------------------------------------------------

    def on_conn_open(self, event: Any) -> None:
        """Before the association's threads start: guard the socket, shorten the wait for the request."""
        assoc = event.assoc
        sock = getattr(assoc.dul, "socket", None)
        if sock is None or getattr(sock, "socket", None) is None:
            return
        guard = PduGuard(sock, self.limits, self.network_timeout)
        assoc.acse_timeout = self.limits.associate_timeout  # also the DUL's ARTIM timer
        address = str(event.address[0]) if event.address else "?"
        conn = _Conn(assoc, guard, address)
        evict: list[_Conn] = []
        with self._lock:
            self._prune()
            self._pending[id(assoc)] = conn
            while len(self._pending) > self.limits.max_pending:
                _, old = self._pending.popitem(last=False)
                evict.append(old)
        for old in evict:
            log.warning("DICOM: %d connections without an A-ASSOCIATE-RQ; closing the oldest, from %s", self.limits.max_pending + 1, old.address)
            self._close_pending(old)

    def on_requested(self, event: Any) -> None:
        """The A-ASSOCIATE-RQ is in: lift the deadline, then take a slot or answer A-ASSOCIATE-RJ (transient)."""
        assoc = event.assoc
        primitive = getattr(assoc.requestor, "primitive", None)
        calling = _ae(getattr(primitive, "calling_ae_title", None) or getattr(assoc.requestor, "ae_title", ""))
        with self._lock:
            conn = self._pending.pop(id(assoc), None)
            if conn is None:
                return  # not accepted by this listener (or evicted meanwhile)
            conn.guard.deadline = None
            conn.calling_ae = calling
            self._prune()
            live = [c for c in self._active.values() if c.alive]
            reason = None
            if len(live) >= self.max_associations:
                reason = f"{len(live)} associations open (max_associations {self.max_associations})"
            elif sum(c.calling_ae == calling for c in live) >= self.limits.max_associations_per_ae:
                reason = f"calling AE {calling!r} has {self.limits.max_associations_per_ae} associations open (max_associations_per_ae)"
            elif sum(c.address == conn.address for c in live) >= self.limits.max_associations_per_address:
                reason = f"{conn.address} has {self.limits.max_associations_per_address} associations open (max_associations_per_address)"
            elif self.shared is not None and (reason := self.shared.take(id(assoc), calling, conn.address)) is not None:
                pass
            else:
                self._active[id(assoc)] = conn
        if reason is None:
            assoc.acse_timeout = self.acse_timeout
            return
        log.warning("DICOM association from %s (%s) rejected: %s", calling, conn.address, reason)
        # as pynetdicom's own limit does: A-ASSOCIATE-RJ, then wait (at most the ARTIM timeout, still the
        # short associate timeout) until the DUL has sent it and the peer closed; pynetdicom then skips
        # negotiation because the association is rejected
        assoc.acse.send_reject(REJECT_TRANSIENT, SOURCE_PRESENTATION, LOCAL_LIMIT_EXCEEDED)
        assoc.kill()

    def on_conn_close(self, event: Any) -> None:
        """A connection closed before its request: wake the association thread instead of letting it wait."""
        assoc = event.assoc
        with self._lock:
            conn = self._pending.pop(id(assoc), None)
            if self.shared is not None and id(assoc) in self._active:
                self.shared.release(id(assoc))  # the association is over: its node-wide slots go back now
        if conn is not None:
            _wake(assoc)

    def on_dimse_recv(self, event: Any) -> None:
        conn = self._active.get(id(event.assoc))
        if conn is None:
            return
        name = type(event.message).__name__
        if name.endswith("_RQ") and name != "C_CANCEL_RQ":
            conn.busy += 1
        conn.last_dimse = time.monotonic()

    def on_dimse_sent(self, event: Any) -> None:
        conn = self._active.get(id(event.assoc))
        if conn is None:
            return
        msg = event.message
        if type(msg).__name__.endswith("_RSP"):
            status = getattr(msg, "xdsi_status", None)  # written directly (xdsi.dimse.direct): no command set decoded
            if status is None:
                status = getattr(getattr(msg, "command_set", None), "Status", None)
            if status not in PENDING_STATUSES:
                conn.busy = max(0, conn.busy - 1)
        conn.last_dimse = time.monotonic()

    # -- housekeeping -----------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self._reaper = threading.Thread(target=self._reap_loop, name="xdsi-dimse-idle", daemon=True)
        self._reaper.start()

    def stop(self) -> None:
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join(5)
            self._reaper = None

    def counts(self) -> dict[str, int]:
        """Pre-association connections and associations now (for logs and tests)."""
        with self._lock:
            self._prune()
            return {"pending": len(self._pending), "associations": sum(c.alive for c in self._active.values())}

    def _reap_loop(self) -> None:
        period = max(0.2, min(1.0, self.limits.idle_timeout / 4, self.limits.associate_timeout / 4))
        while not self._stop.wait(period):
            try:
                self._reap()
            except Exception:  # pragma: no cover - never let the reaper die
                log.exception("DICOM idle reaper failed")

    def _reap(self) -> None:
        now = time.monotonic()
        late: list[_Conn] = []
        idle: list[_Conn] = []
        with self._lock:
            self._prune()
            for key, conn in list(self._pending.items()):
                if now - conn.opened > self.limits.associate_timeout + 1.0:  # the guard's deadline did not fire
                    late.append(self._pending.pop(key))
            for conn in self._active.values():
                if not conn.assoc.is_established or conn.busy:
                    continue
                last = max(conn.last_dimse, conn.guard.last_activity)
                if now - last > self.limits.idle_timeout:
                    idle.append(conn)
        for conn in late:
            log.warning("DICOM connection from %s sent no A-ASSOCIATE-RQ within %.0fs; closed", conn.address, self.limits.associate_timeout)
            self._close_pending(conn)
        for conn in idle:
            log.warning("DICOM association from %s (%s) idle for %.0fs; aborting", conn.calling_ae, conn.address, self.limits.idle_timeout)
            conn.busy = -1  # not again while the abort runs
            # pynetdicom's abort waits until the peer closes (up to the ARTIM timeout): not on the reaper's time
            threading.Thread(target=conn.assoc.abort, name="xdsi-dimse-idle-abort", daemon=True).start()

    def _prune(self) -> None:
        """Forget associations whose thread ended (called with the lock held)."""
        for table in (self._pending, self._active):
            for key in [k for k, c in table.items() if _ended(c.assoc)]:
                del table[key]
                if self.shared is not None and table is self._active:
                    self.shared.release(key)

    @staticmethod
    def _close_pending(conn: _Conn) -> None:
        try:
            conn.guard.raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        _wake(conn.assoc)


def _ended(assoc: Any) -> bool:
    """The association thread ran and finished (a thread not yet started is not ended)."""
    return assoc.ident is not None and not assoc.is_alive()


def _wake(assoc: Any) -> None:
    """End an acceptor's wait for the A-ASSOCIATE-RQ (pynetdicom treats ``None`` as the wait timing out)."""
    try:
        if assoc.requestor.primitive is None and assoc.dul.to_user_queue.empty():
            assoc.dul.to_user_queue.put(None)
    except AttributeError:  # pragma: no cover
        pass


def _ae(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value or "").strip()
