"""The MTOM reader and writer: boundaries split anywhere, percent-encoded cids, inline base64, bounded memory."""

from __future__ import annotations

import base64
import io
import os

import pytest
from lxml import etree

from tests.support.streams import Trickle
from xdsi.wire.soap import SoapFault, build_envelope, parse_envelope
from xdsi.wire.mtom import (
    MtomError,
    MtomWriter,
    OutgoingAttachment,
    binary_content,
    normalize_cid,
    read_message,
    resolve_xop,
    xop_include,
)
from xdsi.standards.constants import NS_XDS, NS_SOAP12


def _message(payloads: list[bytes]) -> tuple[bytes, str, list[str]]:
    body = etree.Element(f"{{{NS_XDS}}}ProvideAndRegisterDocumentSetRequest")
    cids = []
    atts = []
    for i, p in enumerate(payloads):
        d = etree.SubElement(body, f"{{{NS_XDS}}}Document", id=f"doc{i}")
        cid = f"{i}.urn:uuid:{os.urandom(4).hex()}@example.org"
        xop_include(d, cid)
        cids.append(cid)
        atts.append(OutgoingAttachment(cid, (lambda p=p: iter([p[: len(p) // 2], p[len(p) // 2 :]]))))
    w = MtomWriter(build_envelope(body), atts, action="urn:example:Action")
    return b"".join(w), w.content_type, cids


@pytest.mark.parametrize("read_size", [1, 7, 64, 65536])
def test_round_trip_with_boundaries_split_anywhere(read_size: int) -> None:
    payloads = [os.urandom(5000), b"", b"\r\n--MIMEBoundary_fake\r\n" * 50, bytes(range(256)) * 3]
    data, ct, cids = _message(payloads)
    assert ct.startswith("multipart/related") and 'action="urn:example:Action"' in ct
    msg = read_message(Trickle(data, read_size), ct)  # type: ignore[arg-type]
    assert msg.mtom and msg.action_param == "urn:example:Action"
    env = parse_envelope(msg.envelope)
    resolved = resolve_xop(env.body, msg.attachments)
    docs = env.body.findall(f"{{{NS_XDS}}}Document")
    assert [binary_content(d, resolved).read() for d in docs] == payloads
    assert all(d.text is None and len(d) == 0 for d in docs)  # Includes gone: the body now validates as base64Binary


def test_percent_encoded_cid_in_href_matches_plain_content_id() -> None:
    cid = "part1=weird@example.org"
    boundary = "b1"
    root = (
        f'<s:Envelope xmlns:s="{NS_SOAP12}"><s:Body><ihe:Document xmlns:ihe="{NS_XDS}">'
        f'<xop:Include xmlns:xop="http://www.w3.org/2004/08/xop/include" href="cid:part1%3Dweird%40example.org"/>'
        f"</ihe:Document></s:Body></s:Envelope>"
    ).encode()
    data = (
        f"--{boundary}\r\nContent-Type: application/xop+xml\r\nContent-ID: <root%40x>\r\n\r\n".encode()
        + root
        + f"\r\n--{boundary}\r\nContent-Type: application/dicom\r\nContent-ID: <{cid}>\r\n\r\n".encode()
        + b"DICM-bytes"
        + f"\r\n--{boundary}--".encode()
    )
    msg = read_message(io.BytesIO(data), f'multipart/related; boundary={boundary}; start="<root@x>"; type="application/xop+xml"')
    env = parse_envelope(msg.envelope)
    resolved = resolve_xop(env.body, msg.attachments)
    assert binary_content(env.body, resolved).read() == b"DICM-bytes"
    assert normalize_cid("cid:a%40b") == normalize_cid("<a@b>") == "a@b"


def test_inline_base64_accepted() -> None:
    payload = os.urandom(3000)
    env = (
        f'<s:Envelope xmlns:s="{NS_SOAP12}"><s:Body><ihe:Document xmlns:ihe="{NS_XDS}">\n'
        + base64.encodebytes(payload).decode()
        + "</ihe:Document></s:Body></s:Envelope>"
    ).encode()
    msg = read_message(io.BytesIO(env), "application/soap+xml; charset=utf-8")
    e = parse_envelope(msg.envelope)
    assert binary_content(e.body, resolve_xop(e.body, msg.attachments)).read() == payload


def test_unknown_cid_and_truncation_are_errors() -> None:
    data, ct, _ = _message([b"abc"])
    msg = read_message(io.BytesIO(data), ct)
    env = parse_envelope(msg.envelope)
    with pytest.raises(MtomError):
        resolve_xop(env.body, {})
    with pytest.raises(MtomError):
        read_message(io.BytesIO(data[:-20]), ct)
    with pytest.raises(MtomError):
        read_message(io.BytesIO(b"x" * 100), "multipart/related; boundary=zzz")


def test_root_part_is_capped() -> None:
    data, ct, _ = _message([b"abc"])
    with pytest.raises(MtomError):
        read_message(io.BytesIO(data), ct, max_root_bytes=100)


def test_large_attachment_is_spooled_not_held() -> None:
    """A 20 MiB attachment goes to a temporary file; the reader's own buffer stays small."""
    payload = os.urandom(1 << 20) * 20
    data, ct, _ = _message([payload])
    msg = read_message(io.BytesIO(data), ct, spool_memory=1 << 20)
    (att,) = msg.attachments.values()
    assert att.size == len(payload)
    assert att.file._rolled  # type: ignore[attr-defined]  # SpooledTemporaryFile went to disk
    assert att.read() == payload


def test_writer_always_multipart_even_without_attachments() -> None:
    w = MtomWriter(b"<x/>", (), action="urn:a")
    body = b"".join(w)
    assert w.content_type.startswith("multipart/related")
    assert body.count(w.boundary.encode()) == 2 and body.rstrip().endswith(f"--{w.boundary}--".encode())


def test_writer_produces_attachments_lazily() -> None:
    opened = []

    def src(i: int):  # type: ignore[no-untyped-def]
        def f():  # type: ignore[no-untyped-def]
            opened.append(i)
            yield b"x"

        return f

    w = iter(MtomWriter(b"<x/>", [OutgoingAttachment(f"{i}@x", src(i)) for i in range(3)]))
    next(w)
    assert opened == []
    next(w), next(w)
    assert opened == [0]


def test_envelope_rules() -> None:
    with pytest.raises(SoapFault) as e:
        parse_envelope(f'<s:Envelope xmlns:s="{NS_SOAP12}"><s:Body><a/><b/></s:Body></s:Envelope>'.encode())
    assert e.value.code == "Sender"
    with pytest.raises(SoapFault):
        parse_envelope(f'<s:Envelope xmlns:s="{NS_SOAP12}"><s:Body/><s:Header/></s:Envelope>'.encode())
    two_actions = (
        f'<s:Envelope xmlns:s="{NS_SOAP12}" xmlns:wsa="http://www.w3.org/2005/08/addressing"><s:Header>'
        "<wsa:Action>a</wsa:Action><wsa:Action>b</wsa:Action></s:Header><s:Body><a/></s:Body></s:Envelope>"
    )
    with pytest.raises(SoapFault):
        parse_envelope(two_actions.encode())


# -- on the shared wire reader and writer (xdsi.wire.multipart) --------------------------------------------


def test_more_parts_than_allowed_is_mtom_too_large_413() -> None:
    from xdsi.wire.errors import RequestTooLarge
    from xdsi.wire.mtom import MtomTooLarge

    data, ct, _ = _message([b"a", b"b", b"c"])
    assert len(read_message(io.BytesIO(data), ct, max_parts=4).attachments) == 3
    with pytest.raises(MtomTooLarge) as exc:
        read_message(io.BytesIO(data), ct, max_parts=3)
    assert isinstance(exc.value, RequestTooLarge) and exc.value.status == 413


def test_bare_lf_framing_and_base64_root_are_read() -> None:
    root = f'<s:Envelope xmlns:s="{NS_SOAP12}"><s:Body><ihe:Document xmlns:ihe="{NS_XDS}"/></s:Body></s:Envelope>'.encode()
    data = b"--b\nContent-Type: application/xop+xml\nContent-Transfer-Encoding: base64\nContent-ID: <r@x>\n\n" + base64.b64encode(root) + b"\n--b\nContent-ID: <a@x>\n\nATT\n--b--\n"
    for n in (1, 3, 1 << 16):
        msg = read_message(Trickle(data, n), 'multipart/related; boundary=b; start="<r@x>"')  # type: ignore[arg-type]
        assert msg.envelope == root and msg.attachments["a@x"].read() == b"ATT"


def test_content_type_round_trips_through_the_one_parser() -> None:
    from xdsi.wire.media import parse_content_type
    from xdsi.standards.constants import MIME_SOAP12, MIME_XOP

    w = MtomWriter(b"<x/>", (), action="urn:ihe:iti:2007:RetrieveDocumentSet")
    media, params = parse_content_type(w.content_type)
    assert media == "multipart/related" and params["boundary"] == w.boundary and params["type"] == MIME_XOP
    assert params["start"] == f"<{w.root_cid}>" and params["start-info"] == MIME_SOAP12 and params["action"] == "urn:ihe:iti:2007:RetrieveDocumentSet"
    assert b"".join(w) == b"".join(w)  # iterating twice gives the same framing


def test_malformed_framing_is_an_mtom_error_with_the_reason() -> None:
    with pytest.raises(MtomError, match="malformed MIME header line"):
        read_message(io.BytesIO(b"--b\r\nno colon\r\n\r\nx\r\n--b--"), "multipart/related; boundary=b")
    with pytest.raises(MtomError, match="boundary"):
        read_message(io.BytesIO(b"--b\r\n\r\nx\r\n--b--"), "multipart/related")
