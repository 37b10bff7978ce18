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
command set.  Every other message goes through pynetdicom's own ``send_msg``.
tests/unit/test_find_responses.py compares the P-DATA against pynetdicom's.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any, Callable, Iterator

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


def _pdatas(context_id: int, command: bytes, dataset: bytes, max_pdu: int) -> Iterator[P_DATA]:
    for more, last, data in ((b"\x01", b"\x03", command), (b"\x00", b"\x02", dataset)):
        pieces = list(_fragments(data, max_pdu))
        for i, piece in enumerate(pieces):
            pdata = P_DATA()
            pdata.presentation_data_value_list.append((context_id, (last if i == len(pieces) - 1 else more) + piece))
            yield pdata


class PendingSender:
    """``send_msg`` for one association: Pending C-FIND responses from a cached command set."""

    def __init__(self, assoc: Any, original: Callable[[Any, int], None]) -> None:
        self.assoc = assoc
        self.original = original
        self._key: tuple[Any, ...] | None = None
        self._message: C_FIND_RSP | None = None
        self._command = b""

    def __call__(self, primitive: Any, context_id: int) -> None:
        if not (
            isinstance(primitive, C_FIND)
            and primitive.MessageIDBeingRespondedTo is not None
            and primitive.Status in PENDING
            and isinstance(primitive.Identifier, BytesIO)
        ):
            self.original(primitive, context_id)
            return
        data = primitive.Identifier.getvalue()
        if not data:  # pynetdicom sends no data set fragment for an empty one; keep its own path
            self.original(primitive, context_id)
            return
        key = (primitive.MessageIDBeingRespondedTo, primitive.AffectedSOPClassUID, primitive.Status, context_id)
        if key != self._key or self._message is None:
            message = C_FIND_RSP()
            message.primitive_to_message(primitive)
            message.context_id = context_id
            self._command = encode(message.command_set, True, True)  # PS3.7 6.3.1: always implicit VR LE
            self._message, self._key = message, key
        message = self._message
        message.data_set = primitive.Identifier
        evt.trigger(self.assoc, evt.EVT_DIMSE_SENT, {"message": message})
        dimse = self.assoc.dimse
        for pdata in _pdatas(context_id, self._command, data, dimse.maximum_pdu_size):
            dimse.dul.send_pdu(pdata)


def install(assoc: Any) -> None:
    """Route this association's C-FIND Pending responses through a :class:`PendingSender` (idempotent)."""
    dimse = assoc.dimse
    if getattr(dimse, _MARK, False):
        return
    dimse.send_msg = PendingSender(assoc, dimse.send_msg)
    setattr(dimse, _MARK, True)
