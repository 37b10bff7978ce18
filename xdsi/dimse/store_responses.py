"""C-STORE Success responses encoded straight to bytes, not through a pydicom Dataset.

Why: for every C-STORE-RSP pynetdicom's ``DIMSEServiceProvider.send_msg``
builds the command set as a pydicom Dataset (``primitive_to_message``, which
encodes it once to learn the group length) and encodes it again in
``encode_msg``: ~8 % of the server's CPU per stored instance (py-spy, issue 14),
for seven fixed elements of which two change per instance.

:func:`install` gives one association's DIMSE provider a ``send_msg`` (an
instance attribute wrapping whatever ``send_msg`` it had, so the C-FIND
sender of :mod:`xdsi.dimse.find_responses` can sit beside it) that encodes a
Success C-STORE-RSP without optional elements directly in Implicit VR Little
Endian (PS3.7 6.3.1, E.1-1: Command Group Length, Affected SOP Class UID,
Command Field 8001H, Message ID Being Responded To, Command Data Set Type
0101H, Status, Affected SOP Instance UID), and sends it as the one command
fragment pynetdicom would send, flagged ``0x03`` (PS3.8 E.2).
``EVT_DIMSE_SENT`` is still triggered, with a ``C_STORE_RSP`` message whose
command set is these bytes, decoded only if a handler reads it
(:class:`SentSuccess`).  Every
other response (a warning or failure, one with an Error Comment or Offending
Element) goes through pynetdicom's own path.  tests/unit/test_store_responses.py
compares the P-DATA with pynetdicom's, byte for byte.

Two more things happen here (issue 14, ingest):

* the Success response is written to the socket by the association thread itself,
  through :class:`xdsi.dimse.direct.DirectWriter` ``write`` (under the guard the
  association got at ``EVT_CONN_OPEN``; only in Sta6 with nothing queued before it),
  instead of being queued for the DUL thread: one thread hand-off less per
  instance, on a machine where every hand-off may wait for a busy core.  When the
  association has no guard or the DUL has something queued, the PDUs are queued
  as before.
* work registered with :func:`after_response` (the metadata journal line of the
  instance just stored) runs right after the response is on its way, while the
  peer reads it and sends its next instance, instead of delaying the
  acknowledgement.  Only work that no durability promise depends on belongs
  there: the index commit and the fsyncs are done before the response.
"""

from __future__ import annotations

import logging
import struct
from typing import Any, Callable

from io import BytesIO

from pynetdicom import evt
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode
from pynetdicom.pdu_primitives import P_DATA

from xdsi.dimse import direct, receive_direct
from xdsi.dimse.find_responses import _fragments

log = logging.getLogger(__name__)

_MARK = "_xdsi_store_responses"
_AFTER = "_xdsi_after_response"  # on the association: callables to run once the next response is sent
_US = struct.Struct("<HHIH")  # group, element, length 2, value
_HEAD = struct.Struct("<HHI")  # group, element, length


def _ui(element: int, uid: str) -> bytes:
    value = uid.encode("ascii")
    if len(value) % 2:
        value += b"\x00"  # UI is padded with NUL to an even length (PS3.5 6.2)
    return _HEAD.pack(0x0000, element, len(value)) + value


def encode_success(sop_class_uid: str, message_id: int, sop_instance_uid: str) -> bytes:
    """The command set of a Success C-STORE-RSP without optional elements, Implicit VR Little Endian."""
    body = b"".join((
        _ui(0x0002, sop_class_uid),
        _US.pack(0x0000, 0x0100, 2, 0x8001),
        _US.pack(0x0000, 0x0120, 2, message_id),
        _US.pack(0x0000, 0x0800, 2, 0x0101),
        _US.pack(0x0000, 0x0900, 2, 0x0000),
        _ui(0x1000, sop_instance_uid),
    ))
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


def _plain_success(primitive: Any) -> bool:
    """A Success C-STORE-RSP without optional elements: the one response :func:`encode_success` encodes."""
    return bool(
        isinstance(primitive, C_STORE)
        and primitive.MessageIDBeingRespondedTo is not None
        and primitive.Status == 0x0000
        and primitive.ErrorComment is None
        and primitive.OffendingElement is None
        and primitive.AffectedSOPClassUID
        and primitive.AffectedSOPInstanceUID
    )


class SentSuccess(C_STORE_RSP):
    """The ``C_STORE_RSP`` that ``EVT_DIMSE_SENT`` is told of for a response :func:`encode_success` encoded.

    Its ``command_set`` is decoded from the bytes sent the first time a handler reads it (pynetdicom's own
    ``dsutils.decode``, so it holds what the wire holds).  Why (issue 14): filling a pydicom Dataset for every
    response, a validated UID per assignment, was ~7 % of the GIL time of a stored instance (py-spy, GIL
    samples), and the one handler xdsi binds (the association governor, :mod:`xdsi.dimse.limits`) reads
    ``xdsi_status`` instead.  pynetdicom's ``__init__`` (an empty Dataset with nine elements set) is not run:
    the attributes it sets are set here.
    """

    xdsi_status = 0x0000

    def __init__(self, command: bytes, context_id: int) -> None:  # noqa: D107 - see the class
        self.context_id = context_id
        self.encoded_command_set = BytesIO(command)
        self.data_set = None
        self._data_set_path = None
        self._data_set_file = None
        self._command: bytes | None = command

    @property  # type: ignore[override]
    def command_set(self) -> Any:
        cs = self.__dict__.get("_command_set")
        if cs is None:
            cs = self.__dict__["_command_set"] = decode(BytesIO(self._command or b""), True, True)
        return cs

    @command_set.setter
    def command_set(self, value: Any) -> None:
        self.__dict__["_command_set"] = value


# handlers, pynetdicom among them, tell a message by its class name ("..._RSP", "C_STORE_RSP"): keep pynetdicom's
SentSuccess.__name__ = SentSuccess.__qualname__ = C_STORE_RSP.__name__


class SuccessSender:
    """``send_msg`` for one association: Success C-STORE responses encoded by :func:`encode_success`."""

    def __init__(self, assoc: Any, original: Callable[[Any, int], None]) -> None:
        self.assoc = assoc
        self.original = original
        self._writer: direct.DirectWriter | None = None

    def __call__(self, primitive: Any, context_id: int) -> None:
        plain = _plain_success(primitive)
        # the peer's next request, if it comes at once, is read by this thread (xdsi.dimse.receive_direct);
        # the DUL reads nothing from before this response is sent until then
        g = receive_direct.claim(self.assoc) if plain else None
        try:
            try:
                self._send(primitive, context_id, plain)
            finally:
                run_after_response(self.assoc)
            if g is not None:
                try:
                    receive_direct.take_next(self.assoc, g)
                except Exception:  # unknown state half-way through a message: end the association rather than guess
                    log.exception("reading the next C-STORE directly failed; ending the association")
                    self.assoc.dul.event_queue.put("Evt17")
        finally:
            if g is not None:
                receive_direct.release(g)

    def _send(self, primitive: Any, context_id: int, plain: bool) -> None:
        """Send the response: a plain Success C-STORE-RSP by this module, anything else by pynetdicom's path."""
        if not plain:
            self.original(primitive, context_id)
            return
        sop_class, sop_instance = str(primitive.AffectedSOPClassUID), str(primitive.AffectedSOPInstanceUID)
        msg_id = int(primitive.MessageIDBeingRespondedTo)
        command = encode_success(sop_class, msg_id, sop_instance)
        evt.trigger(self.assoc, evt.EVT_DIMSE_SENT, {"message": SentSuccess(command, context_id)})
        dimse = self.assoc.dimse
        if self._write_direct(context_id, command):
            return
        pieces = list(_fragments(command, dimse.maximum_pdu_size))
        for i, piece in enumerate(pieces):
            pdata = P_DATA()
            pdata.presentation_data_value_list.append((context_id, (b"\x03" if i == len(pieces) - 1 else b"\x01") + piece))
            dimse.dul.send_pdu(pdata)

    def _write_direct(self, context_id: int, command: bytes) -> bool:
        """The response's PDUs written by this thread (True), or False: the DUL must send them (no guard, or busy)."""
        guard = getattr(getattr(self.assoc, "dul", None), direct._GUARD, None)
        if guard is None:
            return False
        writer = self._writer
        if writer is None:
            writer = self._writer = direct.DirectWriter(self.assoc, guard, self.original)
        try:
            return writer.write(context_id, command, b"", None)
        except ConnectionError as exc:  # the DUL has been told (Evt17) or is aborting: the association ends
            log.info("C-STORE response not sent: %s", exc)
            return True


def after_response(assoc: Any, work: Callable[[], None]) -> None:
    """Run ``work`` on this thread right after the association's next response is sent (or its sending failed)."""
    pending = getattr(assoc, _AFTER, None)
    if pending is None:
        pending = []
        setattr(assoc, _AFTER, pending)
    pending.append(work)


def run_after_response(assoc: Any) -> None:
    """Run (and forget) what :func:`after_response` registered; a failure is logged, never raised."""
    pending = getattr(assoc, _AFTER, None)
    while pending:
        work = pending.pop(0)
        try:
            work()
        except Exception:
            log.exception("work after a C-STORE response failed")


def install(assoc: Any) -> None:
    """Route this association's Success C-STORE responses through a :class:`SuccessSender` (idempotent)."""
    dimse = assoc.dimse
    if getattr(dimse, _MARK, False):
        return
    dimse.send_msg = SuccessSender(assoc, dimse.send_msg)
    setattr(dimse, _MARK, True)
