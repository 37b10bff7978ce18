"""C-FIND Pending responses sent with a command set encoded once per request, not once per match.

Why: for every Pending response pynetdicom's ``DIMSEServiceProvider.send_msg``
builds a C-FIND-RSP command set as a pydicom Dataset (``primitive_to_message``,
which encodes it once for the group length) and encodes it again in
``encode_msg``: ~230 µs of Python per match, about 40 % of the server's time
answering a 1,000-match C-FIND.  Yet every Pending response to one request
carries the same command set (Message ID Being Responded To, Affected SOP
Class UID, Command Data Set Type, Status FF00/FF01); only the identifier
differs.

:func:`install` gives one association's DIMSE provider a ``send_msg`` (an
instance attribute, so nothing process-wide changes) that sends such a
response as pynetdicom would, byte for byte: the command set fragment(s)
flagged ``0x01``/``0x03`` then the identifier fragment(s) flagged
``0x00``/``0x02``, each at most the peer's maximum PDU length minus the
6-byte PDV item header (PS3.8 Annex E; ``DIMSEMessage.encode_msg``), and
``EVT_DIMSE_SENT`` is still triggered with a C-FIND-RSP message carrying that
command set.  The final response without identifier or error comment (Success,
Cancel) goes the same way; every other message goes through pynetdicom's own
``send_msg``.  tests/unit/test_find_responses.py compares the P-DATA against
pynetdicom's.

For little endian requests the server does not hand Pending Datasets to
pynetdicom at all: :func:`stream_pending` (below) sends identifiers that
``QueryService.find_encoded`` encoded from the index rows.
"""

from __future__ import annotations

import struct
import time
from io import BytesIO
from typing import Any, Callable, Iterable, Iterator

from pynetdicom import evt
from pynetdicom.dimse_messages import C_FIND_RSP
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.dsutils import encode
from pynetdicom.pdu_primitives import P_DATA

PENDING = (0xFF00, 0xFF01)
_MARK = "_xdsi_find_responses"


def _fragments(data: bytes, max_pdu: int) -> Iterator[bytes]:
    """``DIMSEMessage._generate_pdv_fragments``: pieces of at most ``max_pdu - 6`` bytes (0: one piece)."""
    if max_pdu == 0:
        yield data
        return
    size = max_pdu - 6
    for offset in range(0, len(data), size):
        yield data[offset : offset + size]


def _pdatas(context_id: int, command: bytes, dataset: bytes | None, max_pdu: int) -> Iterator[P_DATA]:
    """pynetdicom's P-DATA for one message: one per fragment; no data set fragment when ``dataset`` is None."""
    parts = [(b"\x01", b"\x03", command)] + ([] if dataset is None else [(b"\x00", b"\x02", dataset)])
    for more, last, data in parts:
        pieces = list(_fragments(data, max_pdu))
        for i, piece in enumerate(pieces):
            pdata = P_DATA()
            pdata.presentation_data_value_list.append((context_id, (last if i == len(pieces) - 1 else more) + piece))
            yield pdata


# Encoded C-FIND-RSP command sets differ between requests only in Message ID Being Responded To
# (0000,0120), a US at a fixed offset: each (SOP class, status, data set present) is encoded once by
# pynetdicom and then copied with that value patched in.  The final response (Success, Cancel) takes
# the same path, so a small answer costs no pydicom encoding at all.
_MSG_ID_ELEMENT = b"\x00\x00\x20\x01\x02\x00\x00\x00"  # (0000,0120), implicit VR, length 2
_templates: dict[tuple[str, int, bool], tuple[bytes, int]] = {}  # shared: immutable bytes


class Commands:
    """C-FIND-RSP command sets for one association (the message objects are not shared between threads)."""

    def __init__(self) -> None:
        self._messages: dict[tuple[str, int, bool], C_FIND_RSP] = {}

    def __call__(self, sop_class_uid: str, status: int, with_identifier: bool, message_id: int) -> tuple[bytes, C_FIND_RSP]:
        """A C-FIND-RSP without Offending Element / Error Comment: its command set encoded as pynetdicom
        encodes it, and a C_FIND_RSP message carrying that command set (for EVT_DIMSE_SENT)."""
        key = (str(sop_class_uid), int(status), with_identifier)
        message = self._messages.get(key)
        found = _templates.get(key)
        if message is None or found is None:
            rsp = C_FIND()
            rsp.MessageIDBeingRespondedTo = 1
            rsp.AffectedSOPClassUID = sop_class_uid
            rsp.Status = status
            rsp.Identifier = BytesIO(b"\0") if with_identifier else None  # Command Data Set Type 0x0000 / 0x0101
            message = C_FIND_RSP()
            message.primitive_to_message(rsp)
            template = encode(message.command_set, True, True)  # PS3.7 6.3.1: always implicit VR LE
            found = (template, template.index(_MSG_ID_ELEMENT) + len(_MSG_ID_ELEMENT))
            if len(_templates) < 256:  # a handful of SOP classes and statuses; never grows without bound
                _templates[key] = found
            if len(self._messages) < 64:
                self._messages[key] = message
        template, at = found
        message.command_set.MessageIDBeingRespondedTo = message_id
        return template[:at] + struct.pack("<H", message_id) + template[at + 2 :], message


def _plain(primitive: Any) -> bool:
    """A C-FIND response :func:`command_set` encodes: no Offending Element, no Error Comment."""
    return (
        isinstance(primitive, C_FIND)
        and primitive.MessageIDBeingRespondedTo is not None
        and primitive.Status is not None
        and primitive.OffendingElement is None
        and primitive.ErrorComment is None
    )


class PendingSender:
    """``send_msg`` for one association: Pending C-FIND responses from a cached command set."""

    def __init__(self, assoc: Any, original: Callable[[Any, int], None]) -> None:
        self.assoc = assoc
        self.original = original
        self.commands = Commands()

    def __call__(self, primitive: Any, context_id: int) -> None:
        if not _plain(primitive):
            self.original(primitive, context_id)
            return
        dimse = self.assoc.dimse
        if primitive.Identifier is None and primitive.Status not in PENDING:
            # the final response (Success, Cancel, a failure without comment): a command set only
            command, message = self.commands(primitive.AffectedSOPClassUID, primitive.Status, False,
                                             primitive.MessageIDBeingRespondedTo)
            message.context_id = context_id
            message.data_set = None
            evt.trigger(self.assoc, evt.EVT_DIMSE_SENT, {"message": message})
            for piece in _pdatas(context_id, command, None, dimse.maximum_pdu_size):
                dimse.dul.send_pdu(piece)
            return
        if not (primitive.Status in PENDING and isinstance(primitive.Identifier, BytesIO)):
            self.original(primitive, context_id)
            return
        data = primitive.Identifier.getvalue()
        if not data:  # pynetdicom sends no data set fragment for an empty one; keep its own path
            self.original(primitive, context_id)
            return
        command, message = self.commands(primitive.AffectedSOPClassUID, primitive.Status, True,
                                         primitive.MessageIDBeingRespondedTo)
        message.context_id = context_id
        message.data_set = primitive.Identifier
        evt.trigger(self.assoc, evt.EVT_DIMSE_SENT, {"message": message})
        for pdata in _pdatas(context_id, command, data, dimse.maximum_pdu_size):
            dimse.dul.send_pdu(pdata)


def install(assoc: Any) -> None:
    """Route this association's C-FIND Pending responses through a :class:`PendingSender` (idempotent)."""
    dimse = assoc.dimse
    if getattr(dimse, _MARK, False):
        return
    dimse.send_msg = PendingSender(assoc, dimse.send_msg)
    setattr(dimse, _MARK, True)


# -- streaming pre-encoded identifiers -----------------------------------------------------------
#
# Why: with the identifiers already encoded from index rows (QueryService.find_encoded), what is
# left per match of pynetdicom's C-FIND loop (status validation, a C_FIND primitive, send_msg, a
# P-DATA for the command and another for the identifier, each a pass of the DUL reactor loop and a
# socket write) was most of an all-studies answer.  :func:`stream_pending` sends each Pending
# response itself: its command set is encoded once per request, and command and identifier travel
# as two PDVs of ONE P-DATA-TF PDU when they fit the peer's maximum PDU length (PS3.8 9.3.5: a
# P-DATA-TF carries one or more PDVs; pynetdicom and dcmtk read them in order).  PDVs of two
# different messages never share a PDU: pynetdicom's ``DIMSEMessage.decode_msg`` stops reading a
# P-DATA at the end of the first complete message.  The PDUs go through the association's DUL
# (``dul.send_pdu``), the one writer of its socket, so TLS and the state machine are untouched,
# and pynetdicom then sends the final response after them, in order.

# transfer syntax of the C-FIND presentation context -> implicit VR? (QueryService.find_encoded);
# other syntaxes (big endian, deflated) take pynetdicom's own path with Datasets
ENCODED_SYNTAXES = {"1.2.840.10008.1.2": True, "1.2.840.10008.1.2.1": False}
# P-DATA primitives waiting in the DUL's queue before the sender waits for it to drain: bounds the
# memory of a large answer to a slow reader.  It waits for an EMPTY queue, because pynetdicom's DUL
# reads the socket only when it has nothing to send: that is when a C-CANCEL gets in.
BACKLOG_HIGH = 128
SENT_EVENT_EVERY = 64  # EVT_DIMSE_SENT (the governor's activity clock) once per this many responses


def message_pdatas(context_id: int, command: bytes, dataset: bytes, max_pdu: int) -> list[P_DATA]:
    """One DIMSE message as few P-DATA primitives as the peer's maximum PDU length allows.

    Fragments are those of pynetdicom's ``encode_msg`` (at most ``max_pdu - 6`` bytes each,
    command flagged 0x01/0x03, data set 0x00/0x02); consecutive fragments share a P-DATA while the
    PDV items (6 bytes of item header each) fit in ``max_pdu`` (0: no limit).
    """
    pdvs: list[tuple[int, bytes]] = []
    for more, last, data in ((b"\x01", b"\x03", command), (b"\x00", b"\x02", dataset)):
        pieces = list(_fragments(data, max_pdu))
        for i, piece in enumerate(pieces):
            pdvs.append((context_id, (last if i == len(pieces) - 1 else more) + piece))
    out: list[P_DATA] = []
    current: P_DATA | None = None
    used = 0
    for pdv in pdvs:
        size = 5 + len(pdv[1])  # item length (4) + context ID (1) + control header and fragment
        if current is None or (max_pdu and used + size > max_pdu):
            current = P_DATA()
            out.append(current)
            used = 0
        current.presentation_data_value_list.append(pdv)
        used += size
    return out


def stream_pending(event: Any, identifiers: Iterable[bytes]) -> str:
    """Send each encoded identifier as a C-FIND Pending (FF00) response to ``event``'s request.

    Returns ``"done"`` when every identifier was sent, ``"cancelled"`` when the peer's C-CANCEL
    arrived first, ``"aborted"`` when the association ended.  The caller then yields the final
    status to pynetdicom (nothing for Success).  The identifiers must be encoded in the transfer
    syntax of the request's presentation context.
    """
    assoc = event.assoc
    context_id = event.context.context_id
    commands = getattr(assoc.dimse.send_msg, "commands", None) or Commands()  # the association's PendingSender's
    command, message = commands(event.request.AffectedSOPClassUID, 0xFF00, True, event.request.MessageID)
    message.context_id = context_id
    dimse = assoc.dimse
    dul = dimse.dul
    backlog = dul.to_provider_queue
    max_pdu = dimse.maximum_pdu_size
    sent = 0
    for data in identifiers:
        if event.is_cancelled:
            return "cancelled"
        if not assoc.is_established:
            return "aborted"
        for pdata in message_pdatas(context_id, command, data, max_pdu):
            dul.send_pdu(pdata)
        sent += 1
        if sent % SENT_EVENT_EVERY == 1:
            message.data_set = BytesIO(data)
            evt.trigger(assoc, evt.EVT_DIMSE_SENT, {"message": message})
        if backlog.qsize() > BACKLOG_HIGH:
            # hold the query's cursor rather than queue the whole answer in memory
            while backlog.qsize() and assoc.is_established and not event.is_cancelled:
                time.sleep(0.0005)
    return "done"
