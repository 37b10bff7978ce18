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
* A write waits for a peer that does not read in 50 ms slices; when the DUL
  waits for the lock to act on an abort (Evt15 local A-ABORT, Evt16 A-ABORT
  received, Evt17 transport closed) or the association is being killed, the
  message is cut (:class:`Aborted`) and the A-ABORT goes out next.
* The C-STORE response of a sub-operation is read by the same thread
  (:meth:`DirectWriter._read_response`) under the guard's ``read_lock``, only
  when the DUL has nothing read and unprocessed; any PDU other than the plain
  response awaited is given back (``Guard.pushback``) and the DUL reads it
  next, in order, as if it had just arrived.

:func:`enable` gives one association this ``send_msg`` (an instance attribute:
nothing process-wide changes); the C-GET handler enables it on the requesting
association, the C-MOVE handler on the requesting association and on the
sub-association it opens.  ``EVT_DIMSE_SENT`` is still triggered for every
message and ``EVT_DIMSE_RECV`` for every response read here (the association
governor counts on them; their command sets are decoded only if a handler
reads them); ``EVT_PDU_SENT``/``EVT_PDU_RECV`` and ``EVT_DATA_SENT``/
``EVT_DATA_RECV``, which nothing in xdsi binds, are not triggered for them.

Measured (bench/dimse_retrieve.py, 200 x 512x512 CT, getscu/movescu, one run
against the base tree): server CPU 2.7 -> 0.6 ms per instance, C-GET 2.7x and
C-MOVE 3.8x the MB/s.  An upstream note for pynetdicom: a DUL that writes
P-DATA in the calling thread (or accepts a pre-encoded message) would make
this module unnecessary.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import ssl
import struct
import threading
import time
from io import BytesIO
from pathlib import Path
from typing import Any, Callable

from pynetdicom import evt
from pynetdicom.dimse import _RQ_TO_MESSAGE, _RSP_TO_MESSAGE  # type: ignore[attr-defined]
from pynetdicom.dimse_messages import C_GET_RSP, C_MOVE_RSP, C_STORE_RQ, C_STORE_RSP, DIMSEMessage
from pynetdicom.dimse_primitives import C_GET, C_MOVE, C_STORE
from pynetdicom.dsutils import decode, encode
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

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
# A-ABORT request from the local user, A-ABORT PDU received, transport closed (PS3.8 9.2.1)
ABORT_EVENTS = frozenset(("Evt15", "Evt16", "Evt17"))
_ENABLED = "_xdsi_direct"


class Guard:
    """The locks and the read-back buffer shared by one association's DUL thread and its direct writer/reader.

    ``lock`` (re-entrant) is held by every DUL state-machine action and socket write and by a direct
    write.  ``read_lock`` is held by the DUL while it reads a PDU (``_is_transport_event``; it skips
    reading when a direct reader holds it, and goes on sending) and by a direct reader waiting for a
    C-STORE response.  ``pushback``: bytes a direct reader took off the socket but did not consume (any
    PDU other than the plain C-STORE-RSP it waited for); the DUL's next reads get them first, so it sees
    every PDU in order.
    """

    def __init__(self, dul: Any) -> None:
        self.lock = threading.RLock()
        self.read_lock = threading.Lock()
        self.pushback = bytearray()
        # True from the DUL reading a PDU until its state machine has acted on every event queued: a PDU
        # the DUL has read but not yet passed on is invisible in its queues for a moment (event taken,
        # action waiting for ``lock``), and a direct reader must not start reading after it
        self.unprocessed = False
        self.waiting_event: str | None = None  # the event the DUL's state machine waits for ``lock`` to act on
        # called after a direct reader gives ``read_lock`` back (:meth:`release_read`): xdsi.dimse.wakeup sets it to
        # wake the DUL, which then waits for that instead of looking again every millisecond
        self.on_read_release: Callable[[], None] | None = None
        self.dul = dul
        sock = dul.socket
        machine = dul.state_machine
        do_action, send, recv, transport_event = machine.do_action, sock.send, sock.recv, dul._is_transport_event
        self.raw_recv: Callable[[int], bytearray] = recv  # the governor's PduGuard.recv on accepted associations
        lock, read_lock, pushback = self.lock, self.read_lock, self.pushback

        def locked_do_action(event: str) -> None:
            self.waiting_event = event  # a direct write in progress cuts its message short for an abort
            with lock:
                try:
                    do_action(event)
                finally:
                    self.waiting_event = None
                    if not dul.event_queue.queue:
                        self.unprocessed = False

        def locked_send(data: bytes) -> None:
            with lock:
                send(data)

        def recv_after_pushback(nr_bytes: int) -> bytearray:
            if not pushback:
                return recv(nr_bytes)
            out = bytearray(pushback[:nr_bytes])
            del pushback[: len(out)]
            if len(out) < nr_bytes:
                out += recv(nr_bytes - len(out))
            return out

        def is_transport_event() -> bool:
            if not read_lock.acquire(blocking=False):
                return False  # a direct reader has the socket; the DUL goes on sending what is queued
            try:
                if pushback:  # a PDU a direct reader gave back: read it as if it had just arrived
                    dul._read_pdu_data()
                    self.unprocessed = True
                    return True
                if transport_event():
                    self.unprocessed = True
                    return True
                return False
            finally:
                read_lock.release()

        machine.do_action = locked_do_action
        sock.send = locked_send
        sock.recv = self.recv = recv_after_pushback
        dul._is_transport_event = is_transport_event

    def release_read(self) -> None:
        """Give ``read_lock`` back (a direct reader is done) and tell the DUL, which may read the socket again."""
        self.read_lock.release()
        wake = self.on_read_release
        if wake is not None:
            wake()


def guard(assoc: Any) -> Guard | None:
    """:class:`Guard` the association's DUL (idempotent; call before the DUL runs: ``EVT_CONN_OPEN``).

    Returns the guard, or None when the association has no socket yet.
    """
    dul = getattr(assoc, "dul", None)
    sock = getattr(dul, "socket", None)
    if dul is None or sock is None:
        return None
    found = getattr(dul, _GUARD, None)
    if found is None:
        found = Guard(dul)
        setattr(dul, _GUARD, found)
    return found


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


# -- where a Part 10 file's data set starts ------------------------------------------------------------------

_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"))
_GROUP_ELEMENT = struct.Struct("<HH")
_SHORT_LENGTH = struct.Struct("<H")
_LONG_LENGTH = struct.Struct("<L")
HEAD_BYTES = 8192


def dataset_offset(head: bytes) -> int | None:
    """Offset of the data set in a Part 10 file starting with ``head``: after the preamble and group 0002.

    What ``pynetdicom.dsutils.split_dataset`` finds with pydicom (~60 us per file), by walking the
    File Meta elements (always Explicit VR Little Endian, PS3.10 7.1).  None when the file does not
    start with a preamble and 'DICM', or its File Meta does not end within ``head``: the caller then
    asks pydicom.
    """
    if len(head) < 132 or head[128:132] != b"DICM":
        return None
    pos = 132
    while pos + 8 <= len(head):
        group, _ = _GROUP_ELEMENT.unpack_from(head, pos)
        if group != 2:
            return pos
        vr = head[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > len(head):
                return None
            length = _LONG_LENGTH.unpack_from(head, pos + 8)[0]
            if length == 0xFFFFFFFF:
                return None
            pos += 12 + length
        else:
            pos += 8 + _SHORT_LENGTH.unpack_from(head, pos + 6)[0]
    return pos if pos == len(head) else None


_ELEMENT_HEAD = struct.Struct("<HHL")
_BE_LENGTH = struct.Struct(">L")  # PDU and PDV item lengths are big endian (PS3.8 9.3.1)
STORE_RSP = 0x8001
_STATUS = Tag(0x00000900)
# the elements of a C-STORE-RSP that carries nothing but its status: read here; anything else (Error Comment,
# Offending Element, ...) and pynetdicom decodes the response
_PLAIN_STORE_RSP = frozenset((0x0000, 0x0002, 0x0100, 0x0120, 0x0800, 0x0900, 0x1000))


class PlainStatus(Dataset):
    """What ``_check_received_status`` gives for a plain C-STORE-RSP: a Dataset holding the Status only, raw until read.

    ``Status`` is answered from the two bytes read, without pydicom's keyword lookup and conversion: the sender
    of a sub-operation and pynetdicom's C-GET/C-MOVE loop each read it once per instance (13 us for the two
    through pydicom, 5 us this way; issue 15).  Anything else (``ds[tag]``, ``get``, ``in``, iteration, a
    value set) is pydicom's, on the element kept in the data set; once that element is no longer the one
    read here (converted by ``ds[tag]``, or set: ``Dataset.__setattr__`` handles keywords), ``Status`` is pydicom's too.
    """

    def __init__(self, raw_status: bytes) -> None:
        super().__init__()
        raw = RawDataElement(_STATUS, "US", 2, raw_status, 0, True, True)
        self._dict[_STATUS] = raw
        object.__setattr__(self, "_xdsi_raw", raw)
        object.__setattr__(self, "_xdsi_status", int.from_bytes(raw_status, "little"))

    @property
    def Status(self) -> Any:  # noqa: N802 - the DICOM keyword
        if self._dict.get(_STATUS) is self._xdsi_raw:
            return self._xdsi_status
        return Dataset.__getattr__(self, "Status")


_SOP_CLASS_UID, _SOP_INSTANCE_UID = Tag(0x00080016), Tag(0x00080018)


def put_identity(ds: Dataset, sop_class_uid: str, sop_instance_uid: str) -> None:
    """Put a sub-operation placeholder's SOP Class and Instance UIDs in ``ds`` as raw UI elements, converted only if read.

    Why: set as attributes, pydicom looks both keywords up and validates both UIDs for every C-GET/C-MOVE
    sub-operation (~13 us each, issues 14 and 15), and pynetdicom reads them only for a failed one.  The
    placeholders of local retrieves (``xdsi.dimse.server.Placeholder``) and of relays
    (``xdsi.gateway.relay.RelayedInstance``) both use this.  A UID that is not ASCII (never a valid
    one) is set through ``setattr``, as before.
    """
    raw = []
    for value in (sop_class_uid, sop_instance_uid):
        try:
            encoded = value.encode("ascii")
        except UnicodeEncodeError:
            ds.SOPClassUID = sop_class_uid
            ds.SOPInstanceUID = sop_instance_uid
            return
        raw.append(encoded + b"\0" if len(encoded) & 1 else encoded)
    ds._dict[_SOP_CLASS_UID] = RawDataElement(_SOP_CLASS_UID, "UI", len(raw[0]), raw[0], 0, False, True)
    ds._dict[_SOP_INSTANCE_UID] = RawDataElement(_SOP_INSTANCE_UID, "UI", len(raw[1]), raw[1], 0, False, True)


def parse_command(command: bytes) -> dict[int, bytes] | None:
    """Group 0000 elements of an Implicit VR Little Endian command set: element number -> value bytes.

    None if it is not a well-formed run of group 0000 elements (the caller lets pynetdicom decide).
    """
    out: dict[int, bytes] = {}
    pos = 0
    while pos < len(command):
        if pos + 8 > len(command):
            return None
        group, element, length = _ELEMENT_HEAD.unpack_from(command, pos)
        pos += 8
        if group != 0 or pos + length > len(command):
            return None
        out[element] = command[pos : pos + length]
        pos += length
    return out


def _us(value: bytes | None) -> int | None:
    return _SHORT_LENGTH.unpack(value)[0] if value is not None and len(value) == 2 else None


_LAZY: dict[type, type] = {}


def sent_message(
    cls: type[DIMSEMessage], command: bytes, context_id: int, data_set: Any, path: Any, status: int | None = None
) -> DIMSEMessage:
    """The message for ``EVT_DIMSE_SENT``: the class pynetdicom would pass, its command set decoded only if read.

    ``status``: a response's Status, also kept as ``xdsi_status`` so a handler that needs only that
    (the association governor, for every Pending C-GET/C-MOVE-RSP) does not make pydicom decode the
    command set: that decode and the Status lookup were ~30 % of a C-MOVE's CPU (py-spy, --gil).
    """
    message = lazy_message(cls, command, context_id)
    message.encoded_command_set = BytesIO()
    message.data_set = data_set
    message._data_set_path = path
    message.xdsi_status = status
    return message


def lazy_message(cls: type[DIMSEMessage], command: bytes, context_id: int) -> DIMSEMessage:
    """A ``cls`` message (a subclass of the same name) whose ``command_set`` is decoded from ``command`` only if read.

    Made without ``DIMSEMessage.__init__`` (two BytesIO and a Dataset that would be replaced at once): what
    pynetdicom reads of a message is set here (context, File Meta spool, data set) or by the caller.
    """
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
    message._data_set_path = None
    message._data_set_file = None
    return message


class Prefetched:
    """A stored file read ahead: its path, identity (:func:`_file_key`) and bytes, where its data set starts."""

    __slots__ = ("path", "key", "buffer", "length", "offset")

    def __init__(self, path: str, key: tuple[int, ...], buffer: bytearray, length: int, offset: int) -> None:
        self.path, self.key, self.buffer, self.length, self.offset = path, key, buffer, length, offset


def _file_key(st: os.stat_result) -> tuple[int, ...]:
    """What changes when a file is replaced or rewritten: device, inode, size, modification and change times.

    The archive never rewrites a stored file in place (a new copy is written and renamed over), so
    a new inode says it all; the times also catch an in-place rewrite by someone else.
    """
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class DirectWriter:
    """Writes one association's messages to its socket (see the module docstring)."""

    def __init__(self, assoc: Any, guard: Guard, fallback: Callable[[Any, int], None]) -> None:
        self.assoc = assoc
        self.dul = assoc.dul
        self.guard = guard
        self.lock = guard.lock
        self.fallback = fallback  # pynetdicom's send_msg (through the DUL's queue)
        self._buffer = bytearray()
        self._contexts: dict[tuple[str, str], Any] = {}
        self.direct_messages = 0  # for tests: how many went the direct way
        self.queued_messages = 0
        self.direct_responses = 0  # C-STORE responses read here, not by the DUL
        self.dul_responses = 0
        # the stored file of the instance to be sent next (set by the C-GET/C-MOVE handler), read ahead
        self.upcoming: Callable[[], Path | None] | None = None
        self._prefetched: Prefetched | None = None
        self._spare = bytearray()
        self.prefetch_hits = 0
        self.prefetch_misses = 0
        # C-MOVE: this (requesting) association's Pending responses are held until the sub-association has
        # written its next C-STORE (``after_send`` there is our ``flush``), or until we send anything else.
        # Why: pynetdicom sends each Pending response between one sub-operation's C-STORE response and the
        # next C-STORE request, on the way from the one to the other; the requestor gets it a moment later
        # instead, in the order sent, while the destination already has the next instance
        self.hold_pending = False
        self._held: tuple[Any, bytes, int, int | None] | None = None
        self.after_send: Callable[[], None] | None = None

    # -- the DIMSE provider's send_msg --------------------------------------------------------------------

    def send_msg(self, primitive: Any, context_id: int) -> None:
        """``DIMSEServiceProvider.send_msg``: encode once, then write directly when allowed, else queue."""
        fast = fast_command(primitive)
        self.flush()  # a held Pending response goes first: messages leave in the order they were sent
        if fast is not None:
            command, cls = fast
            status = primitive.Status if primitive.MessageIDBeingRespondedTo is not None else None
            if self.hold_pending and cls is C_MOVE_RSP:  # fast_command: a Pending response without identifier
                self._held = (cls, command, context_id, status)
                return
            self._send(cls, command, context_id, getattr(primitive, "_dataset_path", None), status)
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

    def flush(self) -> None:
        """Send the Pending C-MOVE response held back by :attr:`hold_pending`, if any."""
        held, self._held = self._held, None
        if held is not None:
            cls, command, context_id, status = held
            self._send(cls, command, context_id, None, status)

    def send_c_store(
        self, path: Path, sop_class: str, sop_instance: str, transfer_syntax: str, msg_id: int = 1, priority: int = 2,
        originator_aet: str | None = None, originator_id: int | None = None, content: Any = None,
    ) -> Dataset | None:
        """``Association.send_c_store`` of a Part 10 file in ``transfer_syntax``, sent directly; its status Dataset.

        What pynetdicom's does (3.0, ``STORE_SEND_CHUNKED_DATASET``): the accepted context for the
        class and syntax with us as SCU, the association's reactor paused while we wait for the
        response, an empty Dataset when none comes (the DIMSE timeout aborts), else the response's
        status elements, but without pydicom reading the File Meta or building the command set.
        None: the File Meta is unusual (no preamble, very long); the caller uses pynetdicom's.
        ``content``: the Part 10 file's bytes when they are only in memory (a relayed instance,
        xdsi.gateway.receive.InstanceBytes): sent from there, and no file is read (none exists at ``path``); its
        ``views_from(offset)`` gives the data set in the pieces it arrived in, gathered into our PDUs, never joined.
        """
        assoc = self.assoc
        if not assoc.is_established:
            raise RuntimeError("The association with a peer SCP must be established before sending a C-STORE request")
        context = self._context(sop_class, transfer_syntax)
        data: memoryview | list[memoryview]
        if content is not None:
            offset = dataset_offset(bytes(content[:HEAD_BYTES]))
            if offset is None or offset >= len(content):
                return None
            data = content.views_from(offset)
        else:
            ready = self._claim(path)
            if ready is None:  # not read ahead (e.g. a relayed instance that arrived after the last response): read it now
                ready = self._read_small(path)
            if ready is not None:
                offset, data = ready.offset, memoryview(ready.buffer)[ready.offset : ready.length]
            else:
                with open(path, "rb") as f:
                    offset = dataset_offset(f.read(HEAD_BYTES))
                if offset is None:
                    return None
                data = memoryview(b"")
        context_id = int(context.context_id)
        command = encode_command([
            (0x0002, "UI", sop_class),
            (0x0100, "US", STORE_RQ),
            (0x0110, "US", msg_id),
            (0x0700, "US", priority),
            (0x0800, "US", DATA_SET_PRESENT),
            (0x1000, "UI", sop_instance),
            (0x1030, "AE", originator_aet),
            (0x1031, "US", originator_id),
        ])
        assoc._reactor_checkpoint.clear()
        try:
            while not assoc._is_paused:  # a requestor's reactor must not take our response off the queue
                time.sleep(0.0001)
            self._send(C_STORE_RQ, command, context_id, (Path(path), offset), data=data, in_memory=content is not None)
            if isinstance(data, memoryview):
                data.release()
            if self.after_send is not None:  # e.g. the C-MOVE requestor's Pending response for the previous instance
                try:
                    self.after_send()
                except Exception:  # noqa: BLE001 - that association's failure is its own (its DUL was told), not this C-STORE's
                    log.debug("sending after a C-STORE failed", exc_info=True)
            self._prefetch_next()  # while the peer takes this one in and answers
            read, status = self._read_response(msg_id, context_id)
            if not read:
                self.dul_responses += 1
                _, rsp = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
        if read:
            self.direct_responses += 1
            if status is None:  # nothing within the DIMSE timeout
                assoc._handle_no_response()
                return Dataset()
            return status
        if rsp is None:
            assoc._handle_no_response()
            return Dataset()
        return assoc._check_received_status(rsp)

    # -- reading the C-STORE response --------------------------------------------------------------------

    def _read_response(self, msg_id: int, context_id: int) -> tuple[bool, Dataset | None]:
        """The C-STORE-RSP to ``msg_id`` read by this thread: (True, its status), (True, None) if none came in time.

        Why: through the DUL a response waits for its reactor's next poll, then passes through the state
        machine, pydicom's decoder and two queues before this thread wakes; measured that as the largest
        part of a sub-operation after the writes were direct.  Here the thread that waits blocks on the
        socket itself.  Only when nothing is in flight (DUL in Sta6, its event and provider queues empty,
        no message half received, none waiting to be taken) and only while holding the guard's
        ``read_lock``, so the DUL reads nothing meanwhile.  A PDU that is not exactly a one-PDV C-STORE-RSP
        to ``msg_id`` on ``context_id`` with nothing but status in it (an A-ABORT, A-RELEASE-RQ, C-CANCEL,
        a response with an Error Comment) is put back for the DUL, which then reads it as if it had just
        arrived: (False, None), and the caller waits for the DUL as pynetdicom does.  Waiting is cut into
        50 ms slices; a request to send anything (an abort from another thread) or the association
        leaving Sta6 hands the socket back to the DUL.
        """
        g, dul, assoc = self.guard, self.dul, self.assoc
        dimse = assoc.dimse
        if not g.read_lock.acquire(timeout=1.0):  # the DUL holds it only while it reads one PDU
            return False, None
        quiet = False
        try:
            with g.lock:
                if not reader_idle(g, dul, dimse):
                    return False, None
            raw = dul.socket.socket
            timeout = dimse.dimse_timeout
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                left = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
                if left <= 0:
                    return True, None
                if isinstance(raw, ssl.SSLSocket) and raw.pending():
                    break
                try:
                    readable, _, _ = select.select([raw], [], [], left)
                except (OSError, ValueError):  # closed under us: the DUL finds out
                    return False, None
                if readable:
                    break
                if dul.to_provider_queue.queue or dul.state_machine.current_state != "Sta6" or dul._kill_thread:
                    return False, None
            taken = self._take_response(msg_id, context_id)
            if taken[0] and taken[1] is not None and not g.pushback:
                # the awaited response consumed, nothing given back, and the peer waits for our next request: the DUL
                # has nothing to read and is not woken (it looks again within wakeup.READER_WAIT, as while the lock is
                # held); one wake-up and GIL hand-off less per sub-operation (issue 15)
                quiet = True
            return taken
        finally:
            if quiet:
                g.read_lock.release()
            else:
                g.release_read()

    def _take_response(self, msg_id: int, context_id: int) -> tuple[bool, Dataset | None]:
        """Read one PDU; consume it if it is the plain C-STORE-RSP awaited, else give it back to the DUL."""
        g, dul = self.guard, self.dul
        try:
            header = g.recv(6)  # through the governor's PduGuard: its limits hold for what we read
            if len(header) < 6 or header[0] != P_DATA_TF or _BE_LENGTH.unpack_from(header, 2)[0] > 4096:
                g.pushback += header  # not a small P-DATA-TF (or the peer closed): the DUL reads the rest
                return False, None
            length = _BE_LENGTH.unpack_from(header, 2)[0]
            body = g.recv(length)
        except Exception:  # what the DUL does when reading fails (the PduGuard has answered an oversize PDU)
            dul.event_queue.put("Evt17")
            return False, None
        pdu = bytes(header + body)
        fields = None
        if len(body) == length >= 6 and _BE_LENGTH.unpack_from(body, 0)[0] == length - 4 and body[4] == context_id and body[5] == COMMAND_LAST:
            command = bytes(body[6:])
            fields = parse_command(command)
        if (
            fields is None
            or _us(fields.get(0x0100)) != STORE_RSP
            or _us(fields.get(0x0120)) != msg_id
            or _us(fields.get(0x0800)) != NO_DATA_SET
            or _us(fields.get(0x0900)) is None
        ):
            g.pushback += pdu
            return False, None
        dul._idle_timer.restart()
        message = sent_message(C_STORE_RSP, command, context_id, None, None, _us(fields[0x0900]))
        evt.trigger(self.assoc, evt.EVT_DIMSE_RECV, {"message": message})
        if not fields.keys() <= _PLAIN_STORE_RSP:  # status comment, offending element...: pynetdicom's reading
            return True, self.assoc._check_received_status(message.message_to_primitive())
        return True, PlainStatus(fields[0x0900])

    def _context(self, sop_class: str, transfer_syntax: str) -> Any:
        """pynetdicom's ``_get_valid_context(sop_class, syntax, "scu", allow_conversion=False)``, once per pair."""
        key = (sop_class, transfer_syntax)
        cx = self._contexts.get(key)
        if cx is None:
            for candidate in self.assoc.accepted_contexts:  # in context ID order
                if (
                    candidate.abstract_syntax == sop_class
                    and candidate.as_scu is True
                    and candidate.transfer_syntax[0] == transfer_syntax
                ):
                    cx = self._contexts[key] = candidate
                    break
            else:
                raise ValueError(
                    f"No presentation context for '{sop_class}' has been accepted by the peer with "
                    f"'{transfer_syntax}' transfer syntax for the SCU role"
                )
        return cx

    def _send(
        self, cls: type[DIMSEMessage], command: bytes, context_id: int, path: tuple[Path, int] | None, status: int | None = None,
        data: memoryview | bytes | list[memoryview] = b"", in_memory: bool = False,
    ) -> None:
        """One message whose command set is encoded: ``EVT_DIMSE_SENT``, then written directly or queued.

        ``data``: the data set of the file ``path`` already read (:meth:`_prefetch_next`); written from
        memory when written directly, while the DUL, if it must send the message, reads the file.
        ``in_memory``: there is no file at ``path`` (``data`` is all there is): the DUL is given a copy.
        """
        if path is not None:
            self._await_empty_queue()
        message = sent_message(cls, command, context_id, None, None if in_memory else path, status)
        evt.trigger(self.assoc, evt.EVT_DIMSE_SENT, {"message": message})
        if self.write(context_id, command, data, None if data else path):
            self.direct_messages += 1
            return
        self.queued_messages += 1
        if in_memory:
            message.data_set = BytesIO(b"".join(data))  # in memory: the pieces of InstanceBytes.views_from
        message.command_set = decode(BytesIO(command), True, True)  # pynetdicom's encoder reads the Dataset
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

    # -- the next instance read while the peer answers this one ------------------------------------------

    def expect(self, upcoming: Callable[[], Path | None] | None) -> None:
        """From now on ``upcoming()`` names the stored file of the instance sent next (None: stop reading ahead)."""
        self.upcoming = upcoming
        self._prefetched = None
        self.prefetch_hits = self.prefetch_misses = 0

    def _prefetch_next(self) -> None:
        """Read the next instance's stored file (``upcoming()``) into memory, unless it is large or unusual.

        Why: between our C-STORE's last byte and the peer's response (a getscu writing the file, a
        storescp taking it in) this thread only waits; reading the next file then (~0.1 ms for a 512x512
        CT) takes that read out of the time from one response to the next request, which is all of
        the sending side's share of a sub-operation.  Nothing is announced: :meth:`_claim` uses the
        bytes only if the instance sent next is this very file, unchanged since (same inode, size,
        modification and change times); otherwise it is read again as before.  Any error here is
        ignored: the sub-operation itself finds and reports it in its turn.
        """
        upcoming = self.upcoming
        if upcoming is None:
            return
        self._prefetched = None
        try:
            path = upcoming()
        except Exception:  # noqa: BLE001 - the sub-operation reports its own failure when it is sent
            return
        if path is not None:
            self._prefetched = self._read_small(path)

    def _read_small(self, path: Any) -> "Prefetched | None":
        """``path`` read whole into the reused buffer with one open and one read, unless it is large or unusual (None).

        Also what :meth:`send_c_store` does with a file not read ahead: the head read to find the data set and
        then the file opened again to send it (two opens, three ``fstat``, two seeks, two reads) were the
        sending thread's largest share of system calls when the relay's next instance had not yet arrived at
        the time of the read-ahead (issue 15).  Any error: None, and the caller reads the file as before.
        """
        try:
            with open(path, "rb", buffering=0) as f:
                st = os.fstat(f.fileno())
                if st.st_size > RUN_BYTES or st.st_size <= HEAD_BYTES:
                    return None
                if len(self._spare) < st.st_size:
                    self._spare = bytearray(st.st_size)
                view = memoryview(self._spare)
                try:
                    length = _read_exactly(f, view[: st.st_size])
                finally:
                    view.release()
            offset = dataset_offset(bytes(self._spare[:HEAD_BYTES]))
        except Exception:  # noqa: BLE001 - the sub-operation reports its own failure when it is sent
            return None
        if offset is None or length != st.st_size or offset >= length:
            return None
        return Prefetched(str(path), _file_key(st), self._spare, length, offset)

    def _claim(self, path: Any) -> "Prefetched | None":
        """The prefetched bytes of ``path`` if they are its current content, else None (and the prefetch is dropped)."""
        ready, self._prefetched = self._prefetched, None
        if ready is None:
            return None
        if ready.path == str(path):
            try:
                if _file_key(os.stat(path)) == ready.key:
                    self.prefetch_hits += 1
                    return ready
            except OSError:
                pass
        self.prefetch_misses += 1
        if self.prefetch_misses >= 3 and not self.prefetch_hits:  # the instances are produced elsewhere (converted): stop guessing
            self.upcoming = None
        return None

    # -- writing ------------------------------------------------------------------------------------------

    def write(self, context_id: int, command: bytes, data: bytes | memoryview | list[memoryview], path: tuple[Path, int] | None) -> bool:
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
                elif isinstance(data, list):  # a data set in pieces (InstanceBytes.views_from): gathered, not joined
                    self._write_bytes(sock, context_id, head, data, max_pdu)
                elif data:
                    self._write_bytes(sock, context_id, head, [memoryview(data).cast("B")], max_pdu)
                else:
                    self._send_all(sock, [head])
            except Aborted:
                raise  # the DUL is about to act on the abort; the rest of the message is not sent
            except OSError as exc:
                self.dul.event_queue.put("Evt17")  # what AssociationSocket.send does: transport closed
                raise ConnectionError(f"sending to the peer failed: {exc}") from exc
        return True

    def _send_all(self, sock: Any, parts: list[Any]) -> None:
        _send_all(sock, parts, self._aborting, self.assoc.network_timeout)

    def _aborting(self) -> bool:
        """The association is going: we abort it, the DUL waits to act on an A-ABORT or a closed connection, or it is killed."""
        assoc = self.assoc
        return bool(assoc._sent_abort or assoc._kill or self.dul._kill_thread or self.guard.waiting_event in ABORT_EVENTS)

    def _runs(self, total: int, max_pdu: int) -> tuple[int, int]:
        size = fragment_size(max_pdu)
        per_run = max(1, min(MAX_RUN_FRAGMENTS, RUN_BYTES // size))
        return size, per_run

    def _write_bytes(self, sock: Any, context_id: int, head: bytes, chunks: list[memoryview], max_pdu: int) -> None:
        """The data set ``chunks`` (byte views, in order) as PDVs of at most ``max_pdu - 6`` bytes each.

        A PDV whose bytes lie in two chunks is written from both (one PDU header, two buffers of the ``sendmsg``):
        what a relayed instance arrived in (the remote's PDUs, 128 KB from dcmqrscp) is sent to the requester in its
        PDUs (16 KB from getscu) without joining it first (a copy of the whole data set; issue 15).
        """
        total = sum(c.nbytes for c in chunks)
        size, per_run = self._runs(total, max_pdu)
        parts: list[Any] = [head]
        index, at, done, n = 0, 0, 0, 0
        while done < total:
            want = min(size, total - done)
            header = len(parts)
            parts.append(b"")
            got = 0
            while got < want:
                chunk = chunks[index]
                take = min(want - got, chunk.nbytes - at)
                parts.append(chunk[at : at + take])
                got += take
                at += take
                if at == chunk.nbytes:
                    index, at = index + 1, 0
            done += want
            parts[header] = PDU_HEADER.pack(P_DATA_TF, 0, want + 6, want + 2, context_id, DATA_LAST if done >= total else DATA_MORE)
            n += 1
            if n % per_run == 0:
                self._send_all(sock, parts)
                parts = []
        if parts:
            self._send_all(sock, parts)

    def _write_file(self, sock: Any, context_id: int, head: bytes, path: tuple[Path, int], max_pdu: int) -> None:
        """The data set from ``path[1]`` to the end of the file, in runs read into one reused buffer."""
        file_path, start = path
        size, per_run = self._runs(0, max_pdu)
        with open(file_path, "rb", buffering=0) as f:
            total = os.fstat(f.fileno()).st_size - start
            f.seek(start)
            if total <= 0:  # pynetdicom sends one empty last fragment for an empty data set
                self._send_all(sock, [head, PDU_HEADER.pack(P_DATA_TF, 0, 6, 2, context_id, DATA_LAST)])
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
                self._send_all(sock, parts)
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


class Aborted(ConnectionError):
    """The association is being aborted (by us, by the peer, or its connection closed) while a message is written."""


def _send_all(sock: Any, parts: list[Any], stop: Callable[[], bool] = lambda: False, timeout: float | None = None) -> None:
    """Every byte of ``parts``, in order: ``sendmsg`` (gathering, partial writes resumed), or ``sendall`` over TLS.

    A peer that stops reading would block a plain blocking send, and with it every DUL action waiting
    for the guard's lock, an A-ABORT included.  So the socket is written only when ``select`` says it
    takes bytes (``MSG_DONTWAIT``), and while it does not, ``stop()`` is asked every 50 ms: when it says
    the association is being aborted the message is cut (:class:`Aborted`: the A-ABORT goes out next,
    PS3.8 allows it at any time).  ``timeout`` (the network timeout): this long without a byte taken
    raises ``TimeoutError``.
    """
    if isinstance(sock, ssl.SSLSocket):  # TLS records cannot be written partially by sendmsg: the socket's own timeout
        sock.sendall(b"".join(parts))
        return
    views = parts  # bytes, or byte views (format "B"): what writev takes as they are; a view made only to resume
    first = 0
    last_progress = time.monotonic()
    # a socket with a timeout is non-blocking underneath: ``writev`` of its descriptor is ``sendmsg(MSG_DONTWAIT)``
    # without the poll() Python's sendmsg makes first on such a socket (one system call, and one GIL hand-off
    # under load, less per message: issue 15); a blocking socket (no timeout) keeps sendmsg with MSG_DONTWAIT
    fd = sock.fileno() if sock.gettimeout() is not None else -1
    while first < len(views):
        pending = views[first:] if first else views
        try:
            sent = os.writev(fd, pending) if fd >= 0 else sock.sendmsg(pending, [], socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            sent = 0
        if not sent:
            if stop():
                raise Aborted("the association is being aborted")
            if timeout is not None and time.monotonic() - last_progress > timeout:
                raise TimeoutError(f"the peer took no data for {timeout:g} s")
            select.select([], [sock], [], 0.05)
            continue
        last_progress = time.monotonic()
        while first < len(views) and sent >= _nbytes(views[first]):
            sent -= _nbytes(views[first])
            first += 1
        if first < len(views) and sent:
            if views is parts:
                views = list(parts)  # the caller's list is left as it was given
            views[first] = memoryview(views[first]).cast("B")[sent:]


def _nbytes(part: Any) -> int:
    return part.nbytes if isinstance(part, memoryview) else len(part)


def writer_of(assoc: Any) -> DirectWriter | None:
    """The association's :class:`DirectWriter`, if :func:`enable` gave it one."""
    return getattr(getattr(assoc, "dimse", None), _ENABLED, None)


def enable(assoc: Any) -> DirectWriter | None:
    """Give ``assoc``'s DIMSE provider the direct ``send_msg`` (idempotent); None if it was never :func:`guard`-ed."""
    dimse = getattr(assoc, "dimse", None)
    dul = getattr(assoc, "dul", None)
    if dimse is None or dul is None:
        return None
    writer = getattr(dimse, _ENABLED, None)
    if writer is not None:
        return writer
    found = getattr(dul, _GUARD, None)
    if found is None:  # not guarded from the start: a direct write could race the DUL's, keep pynetdicom's path
        return None
    writer = DirectWriter(assoc, found, dimse.send_msg)
    dimse.send_msg = writer.send_msg
    setattr(dimse, _ENABLED, writer)
    return writer


def on_released(event: Any) -> None:
    """``EVT_RELEASED`` handler of associations we request: return once the DUL has closed the connection (Sta1).

    Why: pynetdicom's requestor gets the A-RELEASE confirmation from AR-3 *before* AR-3 closes the
    connection and the state machine reaches Sta1; ``Association.kill()`` right after then finds
    the DUL still in Sta7 and sleeps 10 ms before looking again (pynetdicom 3.0).  That sleep was
    11 of the ~50 ms a one-instance C-MOVE took (the sub-association's release, before the final
    C-MOVE response).  AR-3 runs under the guard's lock (every state-machine action does), so
    taking the lock once waits exactly until it is done; ``kill()`` then stops the DUL at once.
    """
    found = getattr(getattr(event.assoc, "dul", None), _GUARD, None)
    if found is not None:
        with found.lock:
            pass


__all__ = ["DirectWriter", "command_pdus", "dataset_offset", "enable", "guard", "on_conn_open", "on_released", "writer_of"]


def reader_idle(g: Any, dul: Any, dimse: Any) -> bool:
    """Under the guard's lock: the DUL has nothing in flight, so another thread may read the next PDU itself.

    Shared by the C-STORE-RSP reader here and :mod:`xdsi.dimse.receive_direct`: an association in
    Sta6, no event, primitive, message or pushed-back bytes waiting, the DUL not being stopped, and
    the socket's ``recv`` still the guard's.
    """
    return bool(
        dul.state_machine.current_state == "Sta6"
        and not dul.event_queue.queue
        and not dul.to_provider_queue.queue
        and dimse.message is None
        and not dimse.msg_queue.queue
        and not g.pushback
        and not g.unprocessed
        and not dul._kill_thread
        and getattr(dul.socket, "recv", None) is g.recv
    )
