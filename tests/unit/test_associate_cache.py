"""A-ASSOCIATE-RQs decoded once: the primitive handed out for a request seen before is pynetdicom's own, fresh each time.

Requests are built and decoded by pynetdicom itself (every kind of user information item a requestor may send),
and each primitive the memo hands out is compared, field by field all the way down, with pynetdicom decoding the
same bytes.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    SOPClassCommonExtendedNegotiation,
    SOPClassExtendedNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.presentation import AllStoragePresentationContexts, build_context

from xdsi.dimse import associate_cache
from xdsi.dimse.associate_cache import RequestMemo, same


def request_bytes(calling: str = "GETSCU", called: str = "XDSI", contexts: int = 100, user: bool = False) -> bytes:
    """An A-ASSOCIATE-RQ as a C-GET requestor sends it: many storage contexts, a role item for each, and extras
    (``user``: a User Identity with user name and password)."""
    p = A_ASSOCIATE()
    p.application_context_name = "1.2.840.10008.3.1.1.1"
    p.calling_ae_title = calling
    p.called_ae_title = called
    for n, cx in enumerate(AllStoragePresentationContexts[:contexts]):
        p.presentation_context_definition_list.append(
            build_context(cx.abstract_syntax, [JPEG2000Lossless, ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        )
        p.presentation_context_definition_list[-1].context_id = 2 * n + 1
    ml = MaximumLengthNotification()
    ml.maximum_length_received = 16384
    ic = ImplementationClassUIDNotification()
    ic.implementation_class_uid = "1.2.276.0.7230010.3.0.3.6.7"
    iv = ImplementationVersionNameNotification()
    iv.implementation_version_name = "OFFIS_DCMTK_367"
    aw = AsynchronousOperationsWindowNegotiation()
    aw.maximum_number_operations_invoked = 1
    aw.maximum_number_operations_performed = 1
    identity = UserIdentityNegotiation()
    identity.user_identity_type = 2
    identity.primary_field = b"alice"
    identity.secondary_field = b"secret"
    ext = SOPClassExtendedNegotiation()
    ext.sop_class_uid = "1.2.840.10008.5.1.4.1.2.2.2"
    ext.service_class_application_information = b"\x01"
    common = SOPClassCommonExtendedNegotiation()
    common.sop_class_uid = "1.2.840.10008.5.1.4.1.1.2"
    common.service_class_uid = "1.2.840.10008.4.2"
    common.related_general_sop_class_identification = ["1.2.840.10008.5.1.4.1.1.2.1"]
    items: list[Any] = [ml, ic, iv, aw, *([identity] if user else []), ext, common]
    for cx in AllStoragePresentationContexts[:contexts]:
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid = cx.abstract_syntax
        role.scu_role = False
        role.scp_role = True
        items.append(role)
    p.user_information = items
    return A_ASSOCIATE_RQ(p).encode()


def pynetdicom_primitive(raw: bytes) -> Any:
    pdu = A_ASSOCIATE_RQ()
    pdu.decode(raw)
    return pdu.to_primitive()


@pytest.fixture(scope="module")
def assoc() -> Association:
    return Association(AE(), "acceptor")


def decoder(memo: RequestMemo, assoc: Association) -> Any:
    def original(bytestream: bytearray) -> tuple[Any, str]:
        pdu = A_ASSOCIATE_RQ()
        pdu.decode(bytes(bytestream))
        return pdu, "Evt6"

    return memo._decoder(assoc, original)


def test_second_request_is_served_from_the_memo_equal_to_pynetdicom(assoc: Association) -> None:
    memo = RequestMemo()
    decode = decoder(memo, assoc)
    first = request_bytes()
    pdu, event = decode(bytearray(first))
    assert event == "Evt6" and type(pdu) is A_ASSOCIATE_RQ  # a miss: pynetdicom's own decoding
    assert same(pdu.to_primitive(), pynetdicom_primitive(first))
    assert (memo.hits, memo.misses) == (0, 1)

    second = request_bytes(calling="OTHER", called="PARTITION")  # same request, other AE titles
    pdu, event = decode(bytearray(second))
    assert event == "Evt6" and type(pdu) is A_ASSOCIATE_RQ and memo.hits == 1
    reference = A_ASSOCIATE_RQ()
    reference.decode(second)
    assert (pdu.protocol_version, pdu.called_ae_title, pdu.calling_ae_title) == (1, "PARTITION", "OTHER")
    primitive = pdu.to_primitive()
    assert primitive.calling_ae_title == "OTHER" and primitive.called_ae_title == "PARTITION"
    assert same(primitive, pynetdicom_primitive(second))
    assert not same(primitive, pynetdicom_primitive(first))  # the AE titles are the request's, not the first one's
    # the items, for anything that reads them (pynetdicom's standard logging handler), are pynetdicom's decoding
    assert same(pdu.variable_items, reference.variable_items)
    assert pdu.encode() == second


def test_requests_with_credentials_are_never_kept(assoc: Association) -> None:
    memo = RequestMemo()
    decode = decoder(memo, assoc)
    with_user = request_bytes(contexts=3, user=True)
    assert associate_cache.carries_user_identity(with_user)
    for _ in range(2):
        pdu, _ = decode(bytearray(with_user))
        assert same(pdu.to_primitive(), pynetdicom_primitive(with_user))
    assert not memo._entries and memo.hits == 0
    assert not associate_cache.carries_user_identity(request_bytes(contexts=3))
    assert associate_cache.carries_user_identity(with_user[:-3])  # cut short: not walked, not kept


def test_each_primitive_is_a_fresh_copy(assoc: Association) -> None:
    memo = RequestMemo()
    decode = decoder(memo, assoc)
    raw = request_bytes(contexts=5)
    decode(bytearray(raw))[0].to_primitive()
    a = decode(bytearray(raw))[0].to_primitive()
    a.presentation_context_definition_list[0].transfer_syntax = [ImplicitVRLittleEndian]  # as negotiation does
    a.presentation_context_definition_list[0].result = 0
    a.user_information[0].maximum_length_received = 1
    a.presentation_context_definition_list.pop()
    b = decode(bytearray(raw))[0].to_primitive()
    assert same(b, pynetdicom_primitive(raw))


def test_different_requests_are_kept_apart_and_the_memo_is_bounded(assoc: Association) -> None:
    memo = RequestMemo(max_entries=2)
    decode = decoder(memo, assoc)
    requests = [request_bytes(contexts=n) for n in (3, 4, 5)]
    for raw in requests:
        decode(bytearray(raw))[0].to_primitive()
    assert len(memo._entries) == 2 and memo.get(RequestMemo.key(requests[0])) is None  # least recently used dropped
    for raw in requests[1:]:
        pdu = decode(bytearray(raw))[0]
        assert "to_primitive" in pdu.__dict__  # served from the memo
        assert same(pdu.to_primitive(), pynetdicom_primitive(raw))


def test_other_pdus_and_undecodable_requests_take_pynetdicoms_path(assoc: Association) -> None:
    memo = RequestMemo()
    calls: list[bytes] = []

    def original(bytestream: bytearray) -> tuple[Any, str]:
        calls.append(bytes(bytestream))
        raise ValueError("invalid")

    decode = memo._decoder(assoc, original)
    release = bytes([5, 0, 0, 0, 0, 4, 0, 0, 0, 0])
    broken = bytearray(request_bytes(contexts=2))
    for _ in range(2):
        for raw in (release, bytes(broken)):
            with pytest.raises(ValueError):
                decode(bytearray(raw))
    assert len(calls) == 4 and not memo._entries  # nothing kept from a request pynetdicom could not decode


def test_installed_at_conn_open_for_acceptors_only() -> None:
    acceptor = Association(AE(), "acceptor")
    requestor = Association(AE(), "requestor")
    for a in (acceptor, requestor):
        associate_cache.on_conn_open(evt.Event(a, evt.EVT_CONN_OPEN, {"address": ("127.0.0.1", 0)}))
    assert getattr(acceptor.dul, "_xdsi_request_memo", False)
    assert not getattr(requestor.dul, "_xdsi_request_memo", False)
