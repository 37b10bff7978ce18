"""The C-STORE Success sender puts exactly pynetdicom's own P-DATA on the wire, and still tells EVT_DIMSE_SENT."""

from __future__ import annotations

from typing import Any

import pytest
from pynetdicom.dimse_primitives import C_ECHO, C_STORE

from tests.support.fake_assoc import FakeAssoc as _FakeAssoc
from xdsi.dimse import find_responses
from xdsi.dimse.store_responses import SuccessSender, install

CT = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"  # even length: no padding


def _describe(message: Any) -> tuple[Any, ...]:
    cs = message.command_set
    return (message.__class__.__name__, cs.Status, cs.MessageIDBeingRespondedTo, cs.AffectedSOPInstanceUID,
            cs.AffectedSOPClassUID, cs.CommandGroupLength)


def FakeAssoc(max_pdu: int) -> _FakeAssoc:  # noqa: N802 - the stand-in this module's tests build
    return _FakeAssoc(max_pdu, _describe)


def _rsp(msg_id: int, status: int, sop_class: str, sop: str, comment: str | None = None) -> C_STORE:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = msg_id
    rsp.AffectedSOPClassUID = sop_class
    rsp.AffectedSOPInstanceUID = sop
    rsp.Status = status
    if comment is not None:
        rsp.ErrorComment = comment
    return rsp


def _responses() -> list[tuple[Any, int]]:
    return [
        (_rsp(1, 0x0000, CT, "1.2.3.4"), 1),  # even-length instance UID, odd-length class UID
        (_rsp(2, 0x0000, CT, "1.2.3.45"), 1),  # odd length: padded
        (_rsp(65535, 0x0000, ENHANCED_MR, "2.25.123456789012345678901234567890123456789"), 3),
        (_rsp(4, 0xA900, CT, "1.2.3.6", "data set does not match"), 1),  # failure: pynetdicom's path
        (_rsp(5, 0xB000, CT, "1.2.3.7"), 1),  # warning: pynetdicom's path
        (_rsp(6, 0x0000, CT, "1.2.3.8", "odd"), 1),  # success with a comment: pynetdicom's path
        (_rsp(7, 0x0000, CT, "1.2.3.9"), 5),
    ]


def _wire(pdatas: list[Any]) -> list[list[tuple[int, bytes]]]:
    return [list(p.presentation_data_value_list) for p in pdatas]


@pytest.mark.parametrize("max_pdu", [0, 40, 16382])
def test_success_responses_match_pynetdicom_byte_for_byte(max_pdu: int) -> None:
    reference, fast = FakeAssoc(max_pdu), FakeAssoc(max_pdu)
    install(fast)
    assert isinstance(fast.dimse.send_msg, SuccessSender)
    for (rsp, cx), (rsp2, _) in zip(_responses(), _responses()):
        reference.dimse.send_msg(rsp, cx)
        fast.dimse.send_msg(rsp2, cx)
    assert len(fast.sent) == len(reference.sent)
    if max_pdu == 40:
        assert len(fast.sent) > len(_responses())  # fragmented command sets
    assert _wire(fast.sent) == _wire(reference.sent)
    assert fast.events == reference.events


def test_beside_the_find_sender_and_idempotent() -> None:
    """Installed with the C-FIND sender in either order, each message still goes out once, as pynetdicom's."""
    for first, second in ((install, find_responses.install), (find_responses.install, install)):
        reference, fast = FakeAssoc(16382), FakeAssoc(16382)
        first(fast)
        second(fast)
        install(fast)
        echo = C_ECHO()
        echo.MessageIDBeingRespondedTo, echo.AffectedSOPClassUID, echo.Status = 9, "1.2.840.10008.1.1", 0
        for a in (reference, fast):
            a.dimse.send_msg(echo, 1)
            a.dimse.send_msg(_rsp(3, 0x0000, CT, "1.2.3.4"), 1)
        assert _wire(fast.sent) == _wire(reference.sent) and len(fast.sent) == 2


def test_work_after_the_response_runs_once_after_it_was_sent_even_if_sending_fails() -> None:
    """store_responses.after_response: the metadata journal line is written after the acknowledgement, never before."""
    from xdsi.dimse.store_responses import after_response

    fast = FakeAssoc(16382)
    install(fast)
    seen: list[int] = []
    after_response(fast, lambda: seen.append(len(fast.sent)))
    fast.dimse.send_msg(_rsp(1, 0x0000, CT, "1.2.3.4"), 1)
    assert seen == [1]  # the response's one P-DATA was already handed on when the work ran
    fast.dimse.send_msg(_rsp(2, 0x0000, CT, "1.2.3.5"), 1)
    assert seen == [1]  # run once only

    def broken(primitive: Any, context_id: int) -> None:
        raise ConnectionError("peer gone")

    failing = FakeAssoc(16382)
    failing.dimse.send_msg = broken
    install(failing)
    after_response(failing, lambda: seen.append(-1))
    with pytest.raises(ConnectionError):
        failing.dimse.send_msg(_rsp(3, 0xA900, CT, "1.2.3.6", "refused"), 1)  # pynetdicom's path, which fails
    assert seen == [1, -1]
