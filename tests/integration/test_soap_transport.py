"""SOAP/MTOM/WS-Addressing behaviour of the Imaging Document Source endpoint with real HTTP.

Covers the interoperability points real consumers tripped on: MTOM requests
(root part with an XML declaration, percent-encoded Content-IDs), answers
always multipart with the action in the Content-Type, ``wsse:Security``
with mustUnderstand accepted and logged, faults that carry RelatesTo, a
hardened parser, large request bodies, and ``?wsdl`` loadable by zeep in
strict mode.
"""

from __future__ import annotations

import time
import uuid

import requests
from lxml import etree

from tests.support.ids import (
    NIST_REPOSITORY,
    IdsServer,
    assert_valid,
    ids_server,  # noqa: F401  (fixture)
    post_raw,
    registry_errors,
    status_of,
)
from xdsi.standards.constants import ACTION_FAULT, ACTION_RAD69, ACTION_RAD69_RESPONSE, NS_SOAP12, STATUS_SUCCESS

IHE_NS = "urn:ihe:iti:xds-b:2007"


def envelope(server: IdsServer, *, action: str | None = ACTION_RAD69, extra_headers: str = "", body: str | None = None, msg_id: str | None = None, declaration: bool = True) -> tuple[bytes, str]:
    st = server.studies[0]
    series_uid, items = next(iter(st.series.items()))
    msg_id = msg_id or f"urn:uuid:{uuid.uuid4()}"
    if body is None:
        body = (
            f'<iherad:RetrieveImagingDocumentSetRequest xmlns:iherad="urn:ihe:rad:xdsi-b:2009" xmlns:ihe="{IHE_NS}">'
            f'<iherad:StudyRequest studyInstanceUID="{st.uid}"><iherad:SeriesRequest seriesInstanceUID="{series_uid}">'
            f"<ihe:DocumentRequest><ihe:RepositoryUniqueId>{NIST_REPOSITORY}</ihe:RepositoryUniqueId>"
            f"<ihe:DocumentUniqueId>{items[0][0]}</ihe:DocumentUniqueId></ihe:DocumentRequest>"
            f"</iherad:SeriesRequest></iherad:StudyRequest>"
            f"<iherad:TransferSyntaxUIDList><iherad:TransferSyntaxUID>1.2.840.10008.1.2.1</iherad:TransferSyntaxUID></iherad:TransferSyntaxUIDList>"
            f"</iherad:RetrieveImagingDocumentSetRequest>"
        )
    act = f'<wsa:Action s:mustUnderstand="1">{action}</wsa:Action>' if action else ""
    xml = (
        ('<?xml version="1.0" encoding="UTF-8"?>' if declaration else "")
        + f'<s:Envelope xmlns:s="{NS_SOAP12}" xmlns:wsa="http://www.w3.org/2005/08/addressing"><s:Header>{act}'
        f"<wsa:MessageID>{msg_id}</wsa:MessageID><wsa:ReplyTo><wsa:Address>http://www.w3.org/2005/08/addressing/anonymous</wsa:Address></wsa:ReplyTo>"
        f"<wsa:To>{server.url}</wsa:To>{extra_headers}</s:Header><s:Body>{body}</s:Body></s:Envelope>"
    )
    return xml.encode(), msg_id


def mtom_request(root: bytes, *, start: str, root_cid_header: str, boundary: str = "uuid:0bd2c0ea-aaaa-bbbb-cccc-2d5b1e8f0c33", action: str = ACTION_RAD69, extra_parts: list[tuple[str, bytes]] = ()) -> tuple[bytes, str]:  # type: ignore[assignment]
    """A multipart/related MTOM request laid out the way Axis2/.NET clients send it."""
    parts = [
        f"--{boundary}\r\nContent-Type: application/xop+xml; charset=UTF-8; type=\"application/soap+xml\"\r\n"
        f"Content-Transfer-Encoding: binary\r\nContent-ID: {root_cid_header}\r\n\r\n".encode()
        + root
        + b"\r\n"
    ]
    for cid, data in extra_parts:
        parts.append(f"--{boundary}\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\nContent-ID: {cid}\r\n\r\n".encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    ct = (
        f'multipart/related; type="application/xop+xml"; boundary="{boundary}"; start="{start}"; '
        f'start-info="application/soap+xml"; action="{action}"'
    )
    return body, ct


def assert_fault(resp, code: str, msg_id: str | None = None, subcode: str | None = None) -> None:  # type: ignore[no-untyped-def]
    assert etree.QName(resp.body).localname == "Fault", etree.tostring(resp.body)
    assert resp.body.findtext(f"{{{NS_SOAP12}}}Code/{{{NS_SOAP12}}}Value").endswith(":" + code)
    if subcode:
        assert resp.body.findtext(f"{{{NS_SOAP12}}}Code/{{{NS_SOAP12}}}Subcode/{{{NS_SOAP12}}}Value").endswith(":" + subcode)
    assert resp.header("Action").text == ACTION_FAULT
    if msg_id:
        assert resp.header("RelatesTo").text == msg_id
    assert resp.http.status_code in (400, 500)
    assert f'action="{ACTION_FAULT}"' in resp.http.headers["Content-Type"]


def test_plain_request_gets_multipart_mtom_answer(ids_server: IdsServer) -> None:
    data, msg_id = envelope(ids_server)
    resp = post_raw(ids_server.url, data)
    ct = resp.http.headers["Content-Type"]
    assert ct.startswith("multipart/related") and 'type="application/xop+xml"' in ct and 'start-info="application/soap+xml"' in ct
    assert f'action="{ACTION_RAD69_RESPONSE}"' in ct
    assert status_of(resp.body) == STATUS_SUCCESS and len(resp.attachments) == 1
    assert resp.header("RelatesTo").text == msg_id


def test_mtom_request_with_declaration_and_percent_encoded_start(ids_server: IdsServer) -> None:
    """Root part starting with an XML declaration; the start parameter percent-encoded, the Content-ID not."""
    data, msg_id = envelope(ids_server)
    body, ct = mtom_request(data, start="<root.message%40cxf.apache.org>", root_cid_header="<root.message@cxf.apache.org>")
    resp = post_raw(ids_server.url, body, content_type=ct)
    assert status_of(resp.body) == STATUS_SUCCESS, etree.tostring(resp.body)
    assert resp.header("RelatesTo").text == msg_id
    assert_valid(resp.body, "ihe")


def test_mtom_request_with_an_unused_attachment(ids_server: IdsServer) -> None:
    data, _ = envelope(ids_server, declaration=False)
    body, ct = mtom_request(data, start="<0.urn:uuid:1@apache.org>", root_cid_header="<0.urn:uuid:1@apache.org>", extra_parts=[("<1.urn:uuid:2@apache.org>", b"\x00\r\n--not-a-boundary\r\n" * 1000)])
    resp = post_raw(ids_server.url, body, content_type=ct)
    assert status_of(resp.body) == STATUS_SUCCESS


def test_ws_security_must_understand_is_accepted_and_logged(ids_server: IdsServer) -> None:
    subject = f"UnitTest^Subject^{uuid.uuid4().hex[:6]}"
    security = (
        '<wsse:Security s:mustUnderstand="true" xmlns:wsse="http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd">'
        '<saml2:Assertion xmlns:saml2="urn:oasis:names:tc:SAML:2.0:assertion" ID="_a1" Version="2.0" IssueInstant="2024-01-01T00:00:00Z">'
        "<saml2:Issuer>https://idp.example.org</saml2:Issuer>"
        f"<saml2:Subject><saml2:NameID>{subject}</saml2:NameID></saml2:Subject>"
        '<saml2:AttributeStatement><saml2:Attribute Name="urn:oasis:names:tc:xspa:1.0:subject:purposeofuse">'
        '<saml2:AttributeValue><PurposeOfUse xmlns="urn:hl7-org:v3" code="TREATMENT" codeSystem="2.16.840.1.113883.3.18.7.1"/></saml2:AttributeValue>'
        "</saml2:Attribute></saml2:AttributeStatement></saml2:Assertion></wsse:Security>"
    )
    data, _ = envelope(ids_server, extra_headers=security)
    resp = post_raw(ids_server.url, data)
    assert status_of(resp.body) == STATUS_SUCCESS
    deadline = time.time() + 5
    while subject not in ids_server.proc.output() and time.time() < deadline:
        time.sleep(0.05)
    log = ids_server.proc.output()
    assert subject in log and "https://idp.example.org" in log and "TREATMENT" in log


def test_unknown_must_understand_header_is_a_must_understand_fault(ids_server: IdsServer) -> None:
    data, msg_id = envelope(ids_server, extra_headers='<x:Custom xmlns:x="urn:example" s:mustUnderstand="true">1</x:Custom>')
    resp = post_raw(ids_server.url, data)
    assert_fault(resp, "MustUnderstand", msg_id)
    nu = resp.header("NotUnderstood")
    assert nu is not None and nu.get("qname").endswith(":Custom")


def test_missing_action_is_a_fault(ids_server: IdsServer) -> None:
    data, msg_id = envelope(ids_server, action=None)
    assert_fault(post_raw(ids_server.url, data), "Sender", msg_id, "MessageAddressingHeaderRequired")


def test_unknown_action_is_action_not_supported(ids_server: IdsServer) -> None:
    data, msg_id = envelope(ids_server, action="urn:example:Nope")
    assert_fault(post_raw(ids_server.url, data), "Sender", msg_id, "ActionNotSupported")


def test_action_body_mismatch_is_a_fault(ids_server: IdsServer) -> None:
    data, msg_id = envelope(ids_server, body=f'<ihe:RetrieveDocumentSetRequest xmlns:ihe="{IHE_NS}"/>')
    assert_fault(post_raw(ids_server.url, data), "Sender", msg_id)


def test_schema_invalid_request_is_a_sender_fault(ids_server: IdsServer) -> None:
    body = '<iherad:RetrieveImagingDocumentSetRequest xmlns:iherad="urn:ihe:rad:xdsi-b:2009"><iherad:Bogus/></iherad:RetrieveImagingDocumentSetRequest>'
    data, msg_id = envelope(ids_server, body=body)
    resp = post_raw(ids_server.url, data)
    assert_fault(resp, "Sender", msg_id)
    assert resp.http.status_code == 400
    assert "schema" in resp.body.findtext(f".//{{{NS_SOAP12}}}Text")


def test_soap11_is_version_mismatch(ids_server: IdsServer) -> None:
    data = b'<e:Envelope xmlns:e="http://schemas.xmlsoap.org/soap/envelope/"><e:Body><x/></e:Body></e:Envelope>'
    resp = post_raw(ids_server.url, data)
    assert_fault(resp, "VersionMismatch")


def test_entities_are_refused_not_expanded(ids_server: IdsServer) -> None:
    bomb = (
        b'<?xml version="1.0"?><!DOCTYPE s:Envelope [<!ENTITY a "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa">'
        b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">'
        b'<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        b'<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope"><s:Body><y>&c;&x;</y></s:Body></s:Envelope>'
    )
    resp = post_raw(ids_server.url, bomb)
    assert_fault(resp, "Sender")
    assert b"root:" not in resp.http.content


def test_garbage_and_truncated_mtom_are_sender_faults(ids_server: IdsServer) -> None:
    assert_fault(post_raw(ids_server.url, b"this is not xml"), "Sender")
    data, _ = envelope(ids_server)
    body, ct = mtom_request(data, start="<r@x>", root_cid_header="<r@x>")
    assert_fault(post_raw(ids_server.url, body[: len(body) // 2], content_type=ct), "Sender")


def test_large_request_body(ids_server: IdsServer) -> None:
    """A 20,000-document request (~3 MB, past werkzeug's 500 KB form default) is read and answered."""
    st = ids_server.studies[0]
    series_uid, items = next(iter(st.series.items()))
    docs = "".join(
        f"<ihe:DocumentRequest><ihe:RepositoryUniqueId>{NIST_REPOSITORY}</ihe:RepositoryUniqueId><ihe:DocumentUniqueId>1.2.3.{i}</ihe:DocumentUniqueId></ihe:DocumentRequest>"
        for i in range(20000)
    )
    docs += f"<ihe:DocumentRequest><ihe:RepositoryUniqueId>{NIST_REPOSITORY}</ihe:RepositoryUniqueId><ihe:DocumentUniqueId>{items[0][0]}</ihe:DocumentUniqueId></ihe:DocumentRequest>"
    body = (
        f'<iherad:RetrieveImagingDocumentSetRequest xmlns:iherad="urn:ihe:rad:xdsi-b:2009" xmlns:ihe="{IHE_NS}">'
        f'<iherad:StudyRequest studyInstanceUID="{st.uid}"><iherad:SeriesRequest seriesInstanceUID="{series_uid}">{docs}'
        f"</iherad:SeriesRequest></iherad:StudyRequest><iherad:TransferSyntaxUIDList><iherad:TransferSyntaxUID>1.2.840.10008.1.2.1</iherad:TransferSyntaxUID>"
        f"</iherad:TransferSyntaxUIDList></iherad:RetrieveImagingDocumentSetRequest>"
    )
    data, _ = envelope(ids_server, body=body)
    assert len(data) > 3_000_000
    resp = post_raw(ids_server.url, data)
    assert status_of(resp.body) == "urn:ihe:iti:2007:ResponseStatusType:PartialSuccess"
    assert len(registry_errors(resp.body)) == 20000 and len(resp.attachments) == 1


def test_wsdl_loads_in_zeep_strict_mode(ids_server: IdsServer) -> None:
    import zeep

    client = zeep.Client(ids_server.url + "?wsdl", settings=zeep.Settings(strict=True))
    ops = {}
    for svc in client.wsdl.services.values():
        for port in svc.ports.values():
            assert port.binding_options["address"] == ids_server.url
            for name, op in port.binding._operations.items():
                ops[name] = op.soapaction
    assert ops == {
        "ImagingDocumentSource_RetrieveImagingDocumentSet": "urn:ihe:rad:2009:RetrieveImagingDocumentSet",
        "ImagingDocumentSource_RetrieveRenderedImagingDocumentSet": "urn:dicom:wado:ws:2011:RetrieveRenderedImagingDocumentSet",
        "ImagingDocumentSource_RetrieveImagingDocumentSetInformation": "urn:wado:2011:RetrieveImagingDocumentSetInformation",
    }
    # and the served WSDL works end to end: a RAD-69 call through it
    st = ids_server.studies[0]
    series_uid, items = next(iter(st.series.items()))
    res = client.service.ImagingDocumentSource_RetrieveImagingDocumentSet(
        StudyRequest=[{"studyInstanceUID": st.uid, "SeriesRequest": [{"seriesInstanceUID": series_uid, "DocumentRequest": [{"RepositoryUniqueId": NIST_REPOSITORY, "DocumentUniqueId": items[0][0]}]}]}],
        TransferSyntaxUIDList={"TransferSyntaxUID": ["1.2.840.10008.1.2.1"]},
    )
    assert res.RegistryResponse.status == STATUS_SUCCESS and res.DocumentResponse[0].Document == items[0][1].read_bytes()


def test_schema_paths_cannot_escape(ids_server: IdsServer) -> None:
    for bad in ("../../config.py", "/etc/passwd", "IHE/../../envelope.py", "ebRS/rim.xsd/../../../validation.py"):
        r = requests.get(ids_server.url, params={"xsd": bad}, timeout=10)
        assert r.status_code == 404, bad
    r = requests.get(ids_server.url, params={"xsd": "ebRS/rs.xsd"}, timeout=10)
    assert r.status_code == 200 and b"RegistryResponse" in r.content
