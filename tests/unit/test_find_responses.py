"""The cached C-FIND Pending sender puts exactly pynetdicom's own P-DATA on the wire, and still tells EVT_DIMSE_SENT."""

from __future__ import annotations

from io import BytesIO
from types import SimpleNamespace
from typing import Any

import pytest
from pynetdicom.dimse_primitives import C_FIND, C_STORE

from tests.support.fake_assoc import FakeAssoc as _FakeAssoc
from xdsi.dimse.find_responses import PendingSender, install

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"


def _describe(message: Any) -> tuple[Any, ...]:
    return (message.__class__.__name__, message.command_set.Status, message.command_set.MessageIDBeingRespondedTo)


def FakeAssoc(max_pdu: int) -> _FakeAssoc:  # noqa: N802 - the stand-in this module's tests build
    return _FakeAssoc(max_pdu, _describe)


def _rsp(msg_id: int, status: int, identifier: bytes | None) -> C_FIND:
    rsp = C_FIND()
    rsp.MessageIDBeingRespondedTo = msg_id
    rsp.AffectedSOPClassUID = STUDY_ROOT_FIND
    rsp.Status = status
    rsp.Identifier = BytesIO(identifier) if identifier is not None else None
    return rsp


def _wire(pdatas: list[Any]) -> list[list[tuple[int, bytes]]]:
    return [list(p.presentation_data_value_list) for p in pdatas]


def _responses() -> list[tuple[C_FIND, int]]:
    ident = bytes(range(256)) * 3  # 768 bytes: several fragments at a small maximum PDU
    return [
        (_rsp(7, 0xFF00, ident), 1),
        (_rsp(7, 0xFF00, ident[:301]), 1),
        (_rsp(7, 0xFF01, ident[:17]), 1),  # another status: another command set
        (_rsp(8, 0xFF00, ident[:50]), 3),  # another request and context
        (_rsp(8, 0x0000, None), 3),  # final: pynetdicom's own path
    ]


@pytest.mark.parametrize("max_pdu", [0, 64, 200, 16382])
def test_pending_responses_match_pynetdicom_byte_for_byte(max_pdu: int) -> None:
    reference, fast = FakeAssoc(max_pdu), FakeAssoc(max_pdu)
    install(fast)  # type: ignore[arg-type]
    assert isinstance(fast.dimse.send_msg, PendingSender)
    for (rsp, cx), (rsp2, _) in zip(_responses(), _responses()):
        reference.dimse.send_msg(rsp, cx)
        fast.dimse.send_msg(rsp2, cx)
    assert len(fast.sent) == len(reference.sent)
    if max_pdu == 64:
        assert len(fast.sent) > 20  # fragmented: command and identifier both split
    assert _wire(fast.sent) == _wire(reference.sent)
    assert fast.events == reference.events
    assert [s for _, s, _ in fast.events] == [0xFF00, 0xFF00, 0xFF01, 0xFF00, 0x0000]


def test_other_messages_use_pynetdicom_and_install_is_idempotent() -> None:
    fast = FakeAssoc(16382)
    install(fast)  # type: ignore[arg-type]
    sender = fast.dimse.send_msg
    install(fast)  # type: ignore[arg-type]
    assert fast.dimse.send_msg is sender
    reference = FakeAssoc(16382)
    for assoc in (reference, fast):
        store = C_STORE()
        store.MessageIDBeingRespondedTo = 3
        store.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        store.AffectedSOPInstanceUID = "1.2.3.4"
        store.Status = 0x0000
        assoc.dimse.send_msg(store, 5)
        assoc.dimse.send_msg(_rsp(9, 0xFF00, b""), 5)  # an empty identifier: pynetdicom's own handling
    assert _wire(fast.sent) == _wire(reference.sent)
    assert fast.events == reference.events


def test_stream_pending_stops_at_a_cancel() -> None:
    """A C-CANCEL noticed while streaming: nothing more is sent after it, and the caller is told "cancelled"."""
    import queue

    from xdsi.dimse.find_responses import stream_pending

    assoc = FakeAssoc(16382)
    assoc.dul.to_provider_queue = queue.Queue()
    assoc.is_established = True
    consumed = []
    event = SimpleNamespace(assoc=assoc, context=SimpleNamespace(context_id=1),
                            request=SimpleNamespace(AffectedSOPClassUID=STUDY_ROOT_FIND, MessageID=7), is_cancelled=False)

    def identifiers():  # type: ignore[no-untyped-def]
        for i in range(900):
            if i == 3:
                event.is_cancelled = True  # the DUL has read a C-CANCEL while the third match was sent
            consumed.append(i)
            yield b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY "

    assert stream_pending(event, identifiers()) == "cancelled"
    assert len(assoc.sent) == 3 and consumed == [0, 1, 2, 3]  # the fourth is read from the cursor, never sent
    assoc2 = FakeAssoc(16382)
    assoc2.dul.to_provider_queue = queue.Queue()
    assoc2.is_established = True
    event2 = SimpleNamespace(assoc=assoc2, context=SimpleNamespace(context_id=1),
                             request=SimpleNamespace(AffectedSOPClassUID=STUDY_ROOT_FIND, MessageID=7), is_cancelled=False)
    assert stream_pending(event2, iter([b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY "] * 5)) == "done"
    assert len(assoc2.sent) == 5
