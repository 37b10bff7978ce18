"""DIMSE messages written as P-DATA-TF PDUs straight to the association's socket, by the thread that sends them.

Why: pynetdicom (3.0) sends a message by putting one ``P_DATA`` primitive per
fragment on the DUL's queue; its reactor thread takes them one per loop, runs
each through the state machine (Sta6 + Evt9 -> DT-1), builds a
``P_DATA_TF`` PDU object, encodes it and writes it, and reads a stored
file 16 KB at a time.  A 512x512 CT sent to a peer with dcmtk's default
maximum PDU (16 KB) is 33 such PDUs: measured (bench/dimse_retrieve.py) that
loop made our C-GET/C-MOVE 0.22-0.30 of Orthanc's MB/s, with two threads
passing the GIL back and forth for every 16 KB.

Here the sending thread writes the same bytes itself: the PDU and PDV item
headers for a run of fragments and the fragments read from the file into one
buffer, in one ``sendmsg`` (scatter/gather; TLS sockets, which have no
``sendmsg``, get one ``sendall`` per run).  The PDUs are byte for byte what
``DIMSEMessage.encode_msg`` + ``P_DATA_TF.encode`` produce (PS3.8 9.3.5 and
Annex E: each PDV at most the peer's Maximum Length Received, command
fragments flagged 0x01/0x03, data set fragments 0x00/0x02);
tests/unit/test_dimse_direct.py compares them.

The DUL state machine stays correct because a direct write is the DT-1
action (Sta6 + P-DATA request -> send P-DATA-TF, stay in Sta6) done in
another thread, under one lock that also serialises everything the DUL does:

* :func:`guard` (at ``EVT_CONN_OPEN``, before the association's threads run
  anything else) wraps the association's ``state_machine.do_action`` and its
  ``AssociationSocket.send`` in a re-entrant lock.  Every DUL write (a queued
  P-DATA, A-RELEASE, A-ABORT; the reactor's emergency A-ABORT) and every state
  change happens under it.
* A message is written directly only while holding the lock, with the state
  machine in Sta6 and the DUL's provider queue empty: nothing sent before it
  is still waiting, no other message's fragments can come between its
  fragments (PS3.8 9.3.1 / Annex E), and the order of messages is the order
  of the ``send_msg`` calls.  Otherwise it goes through pynetdicom's queue, as
  before.  A C-STORE data set waits (briefly) for the queue to drain first.
* A failed write puts Evt17 (transport closed) on the DUL's event queue,
  exactly as ``AssociationSocket.send`` does, so the DUL ends the
  association; the sub-operation fails with ``ConnectionError``.

:func:`enable` gives one association this ``send_msg`` (an instance attribute:
nothing process-wide changes); the C-GET handler enables it on the requesting
association, the C-MOVE handler on the requesting association and on the
sub-association it opens.  ``EVT_DIMSE_SENT`` is still triggered for every
message (the association governor counts on it); ``EVT_PDU_SENT`` and
``EVT_DATA_SENT``, which nothing in xdsi binds, are not for directly written
PDUs.
"""

from __future__ import annotations

import logging
import os
import ssl
import struct
import threading
import time
from io import BytesIO
from pathlib import Path
from typing import Any, Callable

from pynetdicom import evt
from pynetdicom.dimse import _RQ_TO_MESSAGE, _RSP_TO_MESSAGE  # type: ignore[attr-defined]
from pynetdicom.dimse_messages import C_GET_RSP, C_MOVE_RSP, C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_GET, C_MOVE, C_STORE
from pynetdicom.dsutils import decode, encode

log = logging.getLogger(__name__)

PDU_HEADER = struct.Struct(">BBLLBB")  # P-DATA-TF type 04, reserved, PDU length, PDV item length, context ID, control
P_DATA_TF = 0x04
COMMAND_MORE, COMMAND_LAST, DATA_MORE, DATA_LAST = 0x01, 0x03, 0x00, 0x02
# one sendmsg call per run of fragments: about a megabyte (fewer syscalls), at most 500 fragments (2 iovecs each + the command; IOV_MAX is 1024)
RUN_BYTES = 1 << 20
MAX_RUN_FRAGMENTS = 500
UNLIMITED_FRAGMENT = 1 << 20  # peer's maximum PDU length 0 (no limit): fragment size we choose
QUEUE_DRAIN_WAIT = 5.0  # seconds a C-STORE waits for messages queued before it to be sent by the DUL

_GUARD = "_xdsi_direct_lock"
_ENABLED = "_xdsi_direct"


def guard(assoc: Any) -> threading.RLock | None:
    """Serialise the DUL's state machine and socket writes with direct writes (idempotent; call before the DUL runs).

    Returns the lock, or None when the association has no socket yet.
    """
    dul = getattr(assoc, "dul", None)
    sock = getattr(dul, "socket", None)
    if dul is None or sock is None:
        return None
    lock = getattr(dul, _GUARD, None)
    if lock is not None:
        return lock
    lock = threading.RLock()
    machine = dul.state_machine
    do_action = machine.do_action
    send = sock.send

    def locked_do_action(event: str) -> None:
        with lock:
            do_action(event)

    def locked_send(data: bytes) -> None:
        with lock:
            send(data)

    machine.do_action = locked_do_action
    sock.send = locked_send
    setattr(dul, _GUARD, lock)
    return lock


def on_conn_open(event: Any) -> None:
    """``EVT_CONN_OPEN`` handler: :func:`guard` every association before its threads send anything."""
    guard(event.assoc)


def fragment_size(max_pdu: int) -> int:
    """Bytes of message per PDV: the peer's maximum PDU length less the 6-byte PDV item header (0: no limit)."""
    return UNLIMITED_FRAGMENT if max_pdu == 0 else max_pdu - 6


def command_pdus(context_id: int, command: bytes, max_pdu: int) -> bytes:
    """The command set's P-DATA-TF PDUs (a command set is small: built in memory)."""
    size = fragment_size(max_pdu) if max_pdu else len(command)
    out = bytearray()
    for offset in range(0, len(command), size):
        piece = command[offset : offset + size]
        flag = COMMAND_LAST if offset + size >= len(command) else COMMAND_MORE
        out += PDU_HEADER.pack(P_DATA_TF, 0, len(piece) + 6, len(piece) + 2, context_id, flag)
        out += piece
    return bytes(out)


# -- command sets encoded without pydicom --------------------------------------------------------------------
#
# pynetdicom builds each command set as a pydicom Dataset (every element validated on assignment) and
# encodes it twice (once for the group length): ~0.3 ms per C-STORE sub-operation and again per Pending
# C-GET/C-MOVE response, about a third of the C-GET's CPU once the PDUs were written directly.  A command
# set is a handful of group 0000 elements in Implicit VR Little Endian (PS3.7 6.3.1, E.1): for the three
# messages a retrieve sends per instance they are packed here, byte for byte as pynetdicom encodes them
# (tests/unit/test_dimse_direct.py); any other message, or one of these carrying an Error Comment,
# Offending Element or identifier, takes pynetdicom's encoder.

_US = struct.Struct("<HHLH")  # group, element, length 2, value
_UL = struct.Struct("<HHLL")
_TEXT_HEAD = struct.Struct("<HHL")
STORE_RQ, GET_RSP, MOVE_RSP = 0x0001, 0x8010, 0x8021
NO_DATA_SET, DATA_SET_PRESENT = 0x0101, 0x0001


def _text(element: int, value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii")
    if len(raw) % 2:
        raw += pad
    return _TEXT_HEAD.pack(0, element, len(raw)) + raw


def encode_command(items: list[tuple[int, str, Any]]) -> bytes:
    """(element, VR, value) of group 0000 in ascending order, None values left out, Command Group Length first."""
    body = bytearray()
    for element, vr, value in items:
        if value is None:
            continue
        if vr == "US":
            body += _US.pack(0, element, 2, value)
        elif vr == "UI":
            body += _text(element, value, b"\0")
        else:  # AE
            body += _text(element, value, b" ")
    return _UL.pack(0, 0, 4, len(body)) + bytes(body)


def fast_command(primitive: Any) -> tuple[bytes, type[DIMSEMessage]] | None:
    """The encoded command set of a C-STORE-RQ from a file or of a Pending C-GET/C-MOVE-RSP; None for anything else."""
    cls = primitive.__class__
    if cls is C_STORE and primitive.MessageIDBeingRespondedTo is None and getattr(primitive, "_dataset_path", None):
        if primitive.DataSet is not None:
            return None
        return encode_command([
            (0x0002, "UI", str(primitive.AffectedSOPClassUID)),
            (0x0100, "US", STORE_RQ),
            (0x0110, "US", primitive.MessageID),
            (0x0700, "US", primitive.Priority),
            (0x0800, "US", DATA_SET_PRESENT),
            (0x1000, "UI", str(primitive.AffectedSOPInstanceUID)),
            (0x1030, "AE", primitive.MoveOriginatorApplicationEntityTitle),
            (0x1031, "US", primitive.MoveOriginatorMessageID),
        ]), C_STORE_RQ
    if (cls is C_GET or cls is C_MOVE) and primitive.MessageIDBeingRespondedTo is not None:
        if primitive.Identifier is not None or primitive.Status not in (0xFF00, 0xFF01) or primitive.ErrorComment is not None:
            return None
        if getattr(primitive, "OffendingElement", None) is not None:
            return None
        uid = primitive.AffectedSOPClassUID
        return encode_command([
            (0x0002, "UI", None if uid is None else str(uid)),
            (0x0100, "US", GET_RSP if cls is C_GET else MOVE_RSP),
            (0x0120, "US", primitive.MessageIDBeingRespondedTo),
            (0x0800, "US", NO_DATA_SET),
            (0x0900, "US", primitive.Status),
            (0x1020, "US", primitive.NumberOfRemainingSuboperations),
            (0x1021, "US", primitive.NumberOfCompletedSuboperations),
            (0x1022, "US", primitive.NumberOfFailedSuboperations),
            (0x1023, "US", primitive.NumberOfWarningSuboperations),
        ]), (C_GET_RSP if cls is C_GET else C_MOVE_RSP)
    return None


_LAZY: dict[type, type] = {}


def sent_message(cls: type[DIMSEMessage], command: bytes, context_id: int, data_set: Any, path: Any) -> DIMSEMessage:
    """The message for ``EVT_DIMSE_SENT``: the class pynetdicom would pass, its command set decoded only if read."""
    lazy = _LAZY.get(cls)
    if lazy is None:

        def get(self: Any) -> Any:
            ds = self.__dict__.get("_xdsi_command_set")
            if ds is None:
                ds = self.__dict__["_xdsi_command_set"] = decode(BytesIO(self._xdsi_command), True, True)
            return ds

        def put(self: Any, value: Any) -> None:
            self.__dict__["_xdsi_command_set"] = value

        lazy = _LAZY[cls] = type(cls.__name__, (cls,), {"command_set": property(get, put), "__module__": __name__})
    message = lazy.__new__(lazy)
    message._xdsi_command = command
    message.context_id = context_id
    message.encoded_command_set = BytesIO()
    message.data_set = data_set
    message._data_set_path = path
    message._data_set_file = None
    return message


class DirectWriter:
    """Writes one association's messages to its socket (see the module docstring)."""

    def __init__(self, assoc: Any, lock: threading.RLock, fallback: Callable[[Any, int], None]) -> None:
        self.assoc = assoc
        self.dul = assoc.dul
        self.lock = lock
        self.fallback = fallback  # pynetdicom's send_msg (through the DUL's queue)
        self._buffer = bytearray()
        self.direct_messages = 0  # for tests and the bench: how many went the direct way
        self.queued_messages = 0

    # -- the DIMSE provider's send_msg --------------------------------------------------------------------

    def send_msg(self, primitive: Any, context_id: int) -> None:
        """``DIMSEServiceProvider.send_msg``: encode once, then write directly when allowed, else queue."""
        fast = fast_command(primitive)
        if fast is not None:
            command, cls = fast
            path = getattr(primitive, "_dataset_path", None)
            if path is not None:
                self._await_empty_queue()
            message = sent_message(cls, command, context_id, None, path)
            evt.trigger(self.assoc, evt.EVT_DIMSE_SENT, {"message": message})
            if self.write(context_id, command, b"", path):
                self.direct_messages += 1
                return
            self.queued_messages += 1
            message.command_set = decode(BytesIO(command), True, True)  # pynetdicom's encoder reads the Dataset
            for pdata in message.encode_msg(context_id, self.max_pdu):
                self.dul.send_pdu(pdata)
            return
        if primitive.MessageIDBeingRespondedTo is None:
            message = _RQ_TO_MESSAGE[primitive.__class__]()
        else:
            message = _RSP_TO_MESSAGE[primitive.__class__]()
        message.primitive_to_message(primitive)
        message.context_id = context_id
        path = getattr(message, "_data_set_path", None)
        data = b""
        if path is None and message.data_set is not None:
            data = message.data_set.getvalue()
        elif path is not None:  # a C-STORE from a file: wait for what was queued before it, then write
            self._await_empty_queue()
        evt.trigger(self.assoc, evt.EVT_DIMSE_SENT, {"message": message})
        command = encode(message.command_set, True, True)  # PS3.7 6.3.1: Implicit VR Little Endian
        if self.write(context_id, command, data, path):
            self.direct_messages += 1
            return
        self.queued_messages += 1
        for pdata in message.encode_msg(context_id, self.max_pdu):
            self.dul.send_pdu(pdata)

    @property
    def max_pdu(self) -> int:
        return int(self.assoc.dimse.maximum_pdu_size or 0)

    def _ready(self) -> bool:
        """Under the lock: the association is established (Sta6) and nothing waits in the DUL's queue."""
        dul = self.dul
        return (
            dul.state_machine.current_state == "Sta6"
            and not dul.to_provider_queue.queue
            and not dul._kill_thread
            and getattr(dul.socket, "socket", None) is not None
        )

    def _await_empty_queue(self) -> None:
        deadline = time.monotonic() + QUEUE_DRAIN_WAIT
        while self.dul.to_provider_queue.queue and time.monotonic() < deadline:
            if self.dul.state_machine.current_state != "Sta6":
                return
            time.sleep(0.0001)

    # -- writing ------------------------------------------------------------------------------------------

    def write(self, context_id: int, command: bytes, data: bytes, path: tuple[Path, int] | None) -> bool:
        """The message's PDUs on the wire (True), or nothing written because the DUL must send it (False).

        Raises ``ConnectionError`` when the transport fails part-way (the DUL has been told: Evt17).
        """
        max_pdu = self.max_pdu
        head = command_pdus(context_id, command, max_pdu)
        with self.lock:
            if not self._ready():
                return False
            sock = self.dul.socket.socket
            try:
                if path is not None:
                    self._write_file(sock, context_id, head, path, max_pdu)
                elif data:
                    self._write_bytes(sock, context_id, head, memoryview(data), max_pdu)
                else:
                    _send_all(sock, [head])
            except OSError as exc:
                self.dul.event_queue.put("Evt17")  # what AssociationSocket.send does: transport closed
                raise ConnectionError(f"sending to the peer failed: {exc}") from exc
        return True

    def _runs(self, total: int, max_pdu: int) -> tuple[int, int]:
        size = fragment_size(max_pdu)
        per_run = max(1, min(MAX_RUN_FRAGMENTS, RUN_BYTES // size))
        return size, per_run

    def _write_bytes(self, sock: Any, context_id: int, head: bytes, data: memoryview, max_pdu: int) -> None:
        size, per_run = self._runs(len(data), max_pdu)
        parts: list[Any] = [head]
        total = len(data)
        for n, offset in enumerate(range(0, total, size), 1):
            piece = data[offset : offset + size]
            flag = DATA_LAST if offset + size >= total else DATA_MORE
            parts.append(PDU_HEADER.pack(P_DATA_TF, 0, len(piece) + 6, len(piece) + 2, context_id, flag))
            parts.append(piece)
            if n % per_run == 0:
                _send_all(sock, parts)
                parts = []
        if parts:
            _send_all(sock, parts)

    def _write_file(self, sock: Any, context_id: int, head: bytes, path: tuple[Path, int], max_pdu: int) -> None:
        """The data set from ``path[1]`` to the end of the file, in runs read into one reused buffer."""
        file_path, start = path
        size, per_run = self._runs(0, max_pdu)
        with open(file_path, "rb", buffering=0) as f:
            total = os.fstat(f.fileno()).st_size - start
            f.seek(start)
            if total <= 0:  # pynetdicom sends one empty last fragment for an empty data set
                _send_all(sock, [head, PDU_HEADER.pack(P_DATA_TF, 0, 6, 2, context_id, DATA_LAST)])
                return
            run = size * per_run
            if len(self._buffer) < min(run, total):
                self._buffer = bytearray(min(run, total))
            view = memoryview(self._buffer)
            parts: list[Any] = [head]
            sent = 0
            while sent < total:
                want = min(run, total - sent)
                got = _read_exactly(f, view[:want])
                if got != want:
                    raise OSError(f"{file_path} ended {total - sent - got} bytes early")
                for offset in range(0, want, size):
                    piece = view[offset : min(offset + size, want)]
                    flag = DATA_LAST if sent + offset + size >= total else DATA_MORE
                    parts.append(PDU_HEADER.pack(P_DATA_TF, 0, len(piece) + 6, len(piece) + 2, context_id, flag))
                    parts.append(piece)
                _send_all(sock, parts)
                parts = []
                sent += want


def _read_exactly(f: Any, view: memoryview) -> int:
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _send_all(sock: Any, parts: list[Any]) -> None:
    """Every byte of ``parts``, in order: ``sendmsg`` (gathering, partial writes resumed), or ``sendall`` over TLS."""
    if isinstance(sock, ssl.SSLSocket):
        sock.sendall(b"".join(parts))
        return
    views = [memoryview(p).cast("B") for p in parts]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if views and sent:
            views[0] = views[0][sent:]


def enable(assoc: Any) -> DirectWriter | None:
    """Give ``assoc``'s DIMSE provider the direct ``send_msg`` (idempotent); None if it was never :func:`guard`-ed."""
    dimse = getattr(assoc, "dimse", None)
    dul = getattr(assoc, "dul", None)
    if dimse is None or dul is None:
        return None
    writer = getattr(dimse, _ENABLED, None)
    if writer is not None:
        return writer
    lock = getattr(dul, _GUARD, None)
    if lock is None:  # not guarded from the start: a direct write could race the DUL's, keep pynetdicom's path
        return None
    writer = DirectWriter(assoc, lock, dimse.send_msg)
    dimse.send_msg = writer.send_msg
    setattr(dimse, _ENABLED, writer)
    return writer


__all__ = ["DirectWriter", "command_pdus", "enable", "guard", "on_conn_open"]
