"""Fuzzing the SOAP/MTOM endpoint (RAD-69, ITI-43) of a running Imaging Document Source.

Starting from a valid RAD-69 request for a stored study (which the server
answers 200 with the documents), hypothesis mutates the envelope bytes, the
XML values, the MIME packaging (boundaries, part headers, Content-Transfer-
Encoding, base64 roots, xop:Include references) and the HTTP Content-Type.
Every answer must be a 2xx or 4xx, or a SOAP 1.2 fault that Part 2 7.5.1.2
sends as 500 (VersionMismatch, MustUnderstand) -- never a Receiver fault or
a 500 caused by the input; every fault must be a well-formed envelope; the
server log must show no traceback; memory must not grow with the examples;
and the valid request must still be answered afterwards.
"""

from __future__ import annotations

import base64
import uuid
from typing import Iterator
from xml.sax.saxutils import escape

import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st
from lxml import etree
from requests_toolbelt.multipart.decoder import MultipartDecoder

from tests.fuzz.fuzzing import RSS_GROWTH, Budget, assert_no_traceback, assert_running, mutated, rss, text_mutation
from tests.support.ids import ENDPOINT, NIST_REPOSITORY, IdsServer, make_study, start_ids
from xdsi.standards.constants import ACTION_ITI43, ACTION_RAD69, NS_SOAP12

pytestmark = pytest.mark.timeout(120)

SOAP_500_CODES = {"VersionMismatch", "MustUnderstand"}  # SOAP 1.2 Part 2 7.5.1.2, Table 20


@pytest.fixture(scope="module")
def ids(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IdsServer]:
    tmp = tmp_path_factory.mktemp("fuzzsoap")
    studies = [make_study(tmp / "s", series=1, per_series=2, rows=16, columns=16)]
    proc = start_ids(tmp, studies)
    try:
        yield IdsServer(proc, studies, NIST_REPOSITORY)
    finally:
        proc.stop()


def envelope(ids: IdsServer, *, study: str | None = None, series: str | None = None, sop: str | None = None, repo: str | None = None,
             ts: str = "1.2.840.10008.1.2.1", action: str = ACTION_RAD69, docs: int = 1) -> bytes:  # fmt: skip
    """A valid RAD-69 request (values XML-escaped, so a fuzzed value stays a value)."""
    s = ids.studies[0]
    series_uid, [(sop_uid, _), *_] = next(iter(s.series.items()))
    d = "".join(
        f"<ihe:DocumentRequest><ihe:RepositoryUniqueId>{escape(repo or ids.repository_unique_id)}</ihe:RepositoryUniqueId>"
        f"<ihe:DocumentUniqueId>{escape(sop or sop_uid)}</ihe:DocumentUniqueId></ihe:DocumentRequest>"
        for _ in range(docs)
    )
    body = (
        '<iherad:RetrieveImagingDocumentSetRequest xmlns:iherad="urn:ihe:rad:xdsi-b:2009" xmlns:ihe="urn:ihe:iti:xds-b:2007">'
        f'<iherad:StudyRequest studyInstanceUID="{escape(study or s.uid, {chr(34): "&quot;"})}"><iherad:SeriesRequest seriesInstanceUID="{escape(series or series_uid, {chr(34): "&quot;"})}">{d}'
        f"</iherad:SeriesRequest></iherad:StudyRequest><iherad:TransferSyntaxUIDList><iherad:TransferSyntaxUID>{escape(ts)}</iherad:TransferSyntaxUID>"
        "</iherad:TransferSyntaxUIDList></iherad:RetrieveImagingDocumentSetRequest>"
    )
    return (
        f'<?xml version="1.0" encoding="UTF-8"?><s:Envelope xmlns:s="{NS_SOAP12}" xmlns:wsa="http://www.w3.org/2005/08/addressing"><s:Header>'
        f'<wsa:Action s:mustUnderstand="1">{escape(action)}</wsa:Action><wsa:MessageID>urn:uuid:{uuid.uuid4()}</wsa:MessageID>'
        "<wsa:ReplyTo><wsa:Address>http://www.w3.org/2005/08/addressing/anonymous</wsa:Address></wsa:ReplyTo>"
        f"</s:Header><s:Body>{body}</s:Body></s:Envelope>"
    ).encode()


def plain_ct(action: str = ACTION_RAD69) -> str:
    return f'application/soap+xml; charset=UTF-8; action="{action}"'


def root_of(r: requests.Response) -> bytes | None:
    ct = r.headers.get("Content-Type", "")
    if ct.startswith("multipart/related"):
        return MultipartDecoder(r.content, ct).parts[0].content
    if "xml" in ct:
        return r.content
    return None


def check(ids: IdsServer, r: requests.Response) -> None:
    """2xx/4xx or a SOAP-1.2-sanctioned 500 fault; any SOAP answer a well-formed envelope; no traceback text."""
    assert b"Traceback" not in r.content[:1_000_000], r.content[:3000]
    assert r.status_code < 600
    root = root_of(r)
    code = None
    if root is not None:
        env = etree.fromstring(root)  # raises if the fault (or answer) is not well-formed XML
        assert env.tag == f"{{{NS_SOAP12}}}Envelope", root[:500]
        value = env.findtext(f".//{{{NS_SOAP12}}}Fault/{{{NS_SOAP12}}}Code/{{{NS_SOAP12}}}Value")
        code = value.rsplit(":", 1)[-1] if value else None
    if r.status_code >= 500:
        assert code in SOAP_500_CODES, (r.status_code, code, (root or r.content)[:3000])
    assert code != "Receiver", (root or b"")[:3000]


def post(ids: IdsServer, data: bytes, ct: str) -> requests.Response:
    return requests.post(ids.url, data=data, headers={"Content-Type": ct}, timeout=60)


def assert_valid_request_answered(ids: IdsServer) -> None:
    r = post(ids, envelope(ids), plain_ct())
    assert r.status_code == 200, r.text[:2000]
    parts = MultipartDecoder(r.content, r.headers["Content-Type"]).parts
    assert b"ResponseStatusType:Success" in parts[0].content and len(parts) == 2 and parts[1].content[128:132] == b"DICM"


@pytest.fixture(scope="module")
def checked(ids: IdsServer) -> Iterator[IdsServer]:
    """The server with its memory and log measured around each test, and the valid request checked after."""
    yield ids


def _around(ids: IdsServer, seconds: float):  # type: ignore[no-untyped-def]
    return Budget(seconds), rss(ids.proc), len(ids.proc.log)


def _after(ids: IdsServer, budget: Budget, before: int, log0: int, what: str) -> None:
    assert_running(ids.proc)
    assert_no_traceback(ids.proc, log0)
    assert_valid_request_answered(ids)
    assert rss(ids.proc) - before < RSS_GROWTH
    print(f"{what}: {budget.examples} examples")


def test_valid_request_is_answered(ids: IdsServer) -> None:
    assert_valid_request_answered(ids)  # the baseline the mutations start from


def test_mutated_envelope_bytes(ids: IdsServer) -> None:
    budget, before, log0 = _around(ids, 6)
    valid = envelope(ids)

    @given(data=mutated(valid, max_ops=6), action=st.sampled_from([ACTION_RAD69, ACTION_ITI43, "", "urn:x"]))
    def run(data: bytes, action: str) -> None:
        if budget.spent():
            return
        check(ids, post(ids, data, plain_ct(action)))

    run()
    _after(ids, budget, before, log0, "envelope bytes")


def test_mutated_envelope_values(ids: IdsServer) -> None:
    budget, before, log0 = _around(ids, 6)
    field = st.one_of(st.none(), text_mutation())

    @given(study=field, series=field, sop=field, repo=field, ts=st.one_of(st.just("1.2.840.10008.1.2.1"), text_mutation()), action=st.sampled_from([ACTION_RAD69, ACTION_ITI43]), docs=st.integers(0, 40))
    def run(study: str | None, series: str | None, sop: str | None, repo: str | None, ts: str, action: str, docs: int) -> None:
        if budget.spent():
            return
        try:
            data = envelope(ids, study=study, series=series, sop=sop, repo=repo, ts=ts, action=action, docs=docs)
        except UnicodeEncodeError:  # lone surrogates cannot be UTF-8: not a request anyone can send
            return
        check(ids, post(ids, data, plain_ct(action)))

    run()
    _after(ids, budget, before, log0, "envelope values")


@st.composite
def mtom_message(draw: st.DrawFn, root: bytes) -> tuple[bytes, str]:
    """An MTOM package of ``root`` with fuzzed boundary, part headers, encodings and attachments."""
    boundary = draw(st.one_of(st.just("uuid:7a1c-0"), st.text(alphabet=st.characters(codec="latin-1", exclude_characters='"\r\n'), min_size=0, max_size=80)))
    cte = draw(st.sampled_from(["binary", "8bit", "base64", "quoted-printable", "x-garbage", ""]))
    body_root = root
    if cte == "base64":
        body_root = base64.b64encode(root)
        if draw(st.booleans()):
            body_root = draw(mutated(body_root, max_ops=3))
    if draw(st.booleans()):
        body_root = body_root.replace(b"</ihe:DocumentUniqueId>", b'<xop:Include xmlns:xop="http://www.w3.org/2004/08/xop/include" href="cid:' + draw(st.sampled_from([b"p0@x", b"missing@x", b"", b"%ZZ", b"\xff"])) + b'"/></ihe:DocumentUniqueId>', 1)
    root_ct = draw(st.sampled_from(['application/xop+xml; charset=UTF-8; type="application/soap+xml"', "application/xop+xml", "text/plain", 'application/xop+xml; charset=x-nonsense; type="application/soap+xml"', ""]))
    extra_headers = draw(st.lists(st.tuples(st.sampled_from(["Content-ID", "Content-Type", "Content-Transfer-Encoding", "Content-Length", "X"]), st.text(alphabet=st.characters(codec="latin-1", exclude_characters="\r\n"), max_size=30)), max_size=3))
    b = boundary.encode("latin-1")
    head = f"Content-Type: {root_ct}\r\nContent-Transfer-Encoding: {cte}\r\nContent-ID: <root@x>\r\n".encode() + b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in extra_headers)
    parts = [b"--" + b + b"\r\n" + head + b"\r\n" + body_root + b"\r\n"]
    for i in range(draw(st.integers(0, 4))):
        content = draw(st.binary(max_size=64))
        parts.append(b"--" + b + f"\r\nContent-Type: application/octet-stream\r\nContent-ID: <p{i}@x>\r\n\r\n".encode() + content + b"\r\n")
    closing = draw(st.sampled_from([b"--" + b + b"--\r\n", b"", b"--" + b + b"\r\n", b"--" + b + b"--"]))
    msg = b"".join(parts) + closing
    if draw(st.booleans()):
        msg = draw(mutated(msg, max_ops=3))
    start = draw(st.sampled_from(['; start="<root@x>"', '; start="<nope@x>"', "", '; start="<"']))
    ct_boundary = draw(st.sampled_from([f'; boundary="{boundary}"', f"; boundary={boundary}", "", '; boundary=""']))
    ct = f'multipart/related; type="application/xop+xml"{ct_boundary}{start}; start-info="application/soap+xml"; action="{ACTION_RAD69}"'
    return msg, ct


def test_mutated_mtom_packaging(ids: IdsServer) -> None:
    budget, before, log0 = _around(ids, 8)

    @given(message=mtom_message(envelope(ids)))
    def run(message: tuple[bytes, str]) -> None:
        if budget.spent():
            return
        data, ct = message
        try:
            ct.encode("latin-1")
        except UnicodeEncodeError:
            return
        check(ids, post(ids, data, ct))

    run()
    _after(ids, budget, before, log0, "mtom")


def test_mutated_content_type(ids: IdsServer) -> None:
    budget, before, log0 = _around(ids, 4)
    valid = envelope(ids)

    @given(ct=st.one_of(text_mutation(), st.builds(lambda a, b: a + b, st.sampled_from(["application/soap+xml", "multipart/related", "text/xml", "application/xop+xml", "multipart/related; boundary=", ""]), text_mutation())))
    def run(ct: str) -> None:
        if budget.spent():
            return
        ct = "".join(c for c in ct if c.isprintable() or c == " ").strip(" ")  # what requests lets us send
        try:
            ct.encode("latin-1")
        except UnicodeEncodeError:
            ct = ct.encode("utf-8").decode("latin-1")
        check(ids, post(ids, valid, ct))

    run()
    _after(ids, budget, before, log0, "content-type")
