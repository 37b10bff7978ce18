"""RAD-69's own request reader and DocumentResponse writer give exactly what spyne's generic ones give.

Both are shortcuts (xdsi.soap.protocol ``BODY_READERS`` and ``_document_responses``);
each request here is answered twice by the same in-process application, once
with the shortcuts and once with spyne doing all the work, and the two answers
must be the same message (after the per-message UUIDs and Content-IDs are
replaced by their order of appearance) with the same attachment bytes.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any, Iterator

import pytest
from lxml import etree
from werkzeug.test import Client

from xdsi.app import make_app
from xdsi.archive import Archive
from xdsi.config import Settings
from xdsi.soap import protocol
from xdsi.standards.constants import ACTION_RAD69, DEFAULT_REPOSITORY_UNIQUE_ID
from xdsi.tools.synth import StudySpec, write_study
from xdsi.wire.multipart import iter_events, PartData, PartStart
from xdsi.wire.media import parse_content_type

REPO = DEFAULT_REPOSITORY_UNIQUE_ID
SOAP = "http://www.w3.org/2003/05/soap-envelope"
RAD = "urn:ihe:rad:xdsi-b:2009"
XDS = "urn:ihe:iti:xds-b:2007"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Client, StudySpec, list[Any], Archive]]:
    work = tmp_path_factory.mktemp("rad69fast")
    spec = StudySpec()
    files = write_study(work / "in", spec, series=2, per_series=3, rows=8, columns=8)
    s = Settings(data_dir=work / "data")
    archive = Archive.open(replace(s, xds=replace(s.xds, repository_unique_id=REPO)))
    for f in files:
        archive.store.store_file(f, move=False)
    refs = archive.retrieve.select(study_uids=[spec.study_uid])
    try:
        yield Client(make_app(archive)), spec, refs, archive
    finally:
        archive.close()


def _doc(repo: str, sop: str, home: str | None = None) -> str:
    h = f"<x:HomeCommunityId>{home}</x:HomeCommunityId>" if home is not None else ""
    return f"<x:DocumentRequest>{h}<x:RepositoryUniqueId>{repo}</x:RepositoryUniqueId><x:DocumentUniqueId>{sop}</x:DocumentUniqueId></x:DocumentRequest>"


def _envelope(studies: str, syntaxes: list[str]) -> bytes:
    tsl = "".join(f"<r:TransferSyntaxUID>{t}</r:TransferSyntaxUID>" for t in syntaxes)
    return (
        f'<s:Envelope xmlns:s="{SOAP}" xmlns:a="http://www.w3.org/2005/08/addressing" xmlns:r="{RAD}" xmlns:x="{XDS}">'
        f'<s:Header><a:Action s:mustUnderstand="true">{ACTION_RAD69}</a:Action><a:MessageID>urn:uuid:0b3e4d2c-1111-4222-8333-944455556666</a:MessageID>'
        f"<a:ReplyTo><a:Address>http://www.w3.org/2005/08/addressing/anonymous</a:Address></a:ReplyTo></s:Header>"
        f"<s:Body><r:RetrieveImagingDocumentSetRequest>{studies}<r:TransferSyntaxUIDList>{tsl}</r:TransferSyntaxUIDList>"
        f"</r:RetrieveImagingDocumentSetRequest></s:Body></s:Envelope>"
    ).encode()


def _answer(client: Client, body: bytes) -> tuple[int, bytes, list[bytes]]:
    r = client.post("/xdsi/ImagingDocumentSource", data=body, headers={"Content-Type": f'application/soap+xml; charset=UTF-8; action="{ACTION_RAD69}"'})
    data = r.get_data()
    _, params = parse_content_type(r.headers["Content-Type"])
    parts: list[bytearray] = []
    import io

    for ev in iter_events(io.BytesIO(data), params["boundary"]):
        if isinstance(ev, PartStart):
            parts.append(bytearray())
        elif isinstance(ev, PartData):
            parts[-1] += ev.data
    envelope = etree.tostring(etree.fromstring(bytes(parts[0])), method="c14n", exclusive=True)  # namespace declarations where used
    seen: dict[str, str] = {}

    def number(m: re.Match[str]) -> str:
        return seen.setdefault(m.group(0), f"ID{len(seen)}")

    text = re.sub(r"urn:uuid:[0-9a-f-]{36}|cid:[0-9a-f]{32}@xdsi", number, envelope.decode())
    return r.status_code, text.encode(), [bytes(p) for p in parts[1:]]


def _both(client: Client, body: bytes, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    fast = _answer(client, body)
    with monkeypatch.context() as m:
        m.setattr(protocol, "BODY_READERS", {})
        m.setattr(protocol, "_take_streamed_documents", lambda ctx: None)
        slow = _answer(client, body)
    return fast, slow


def test_same_answer_as_spyne_for_documents_errors_and_home_community(env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    client, spec, refs, archive = env
    by_series: dict[str, list[str]] = {}
    for r in refs:
        by_series.setdefault(r.series_uid, []).append(r.sop_instance_uid)
    (s1, sops1), (s2, sops2) = list(by_series.items())
    studies = (
        f'<r:StudyRequest studyInstanceUID="{spec.study_uid}">'
        f'<r:SeriesRequest seriesInstanceUID="{s1}">{_doc(REPO, sops1[0], "urn:oid:1.2.3")}{_doc(REPO, sops1[1])}{_doc("1.2.999", sops1[2])}</r:SeriesRequest>'
        f'<r:SeriesRequest seriesInstanceUID="{s2}">{_doc(REPO, sops2[0], "")}{_doc(REPO, "1.2.3.4.5")}{_doc(REPO, sops1[0])}</r:SeriesRequest>'
        f"</r:StudyRequest>"
        f'<r:StudyRequest studyInstanceUID="1.2.3.999"><r:SeriesRequest seriesInstanceUID="{s2}">{_doc(REPO, sops2[1])}</r:SeriesRequest></r:StudyRequest>'
    )
    fast, slow = _both(client, _envelope(studies, ["1.2.840.10008.1.2.1"]), monkeypatch)
    assert fast == slow
    status, text, attachments = fast
    assert status == 200 and len(attachments) == 3 and b"DocumentResponse" in text and b"urn:oid:1.2.3" in text


def test_same_answer_as_spyne_when_no_syntax_fits(env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    client, spec, refs, archive = env
    r = refs[0]
    studies = f'<r:StudyRequest studyInstanceUID="{spec.study_uid}"><r:SeriesRequest seriesInstanceUID="{r.series_uid}">{_doc(REPO, r.sop_instance_uid)}</r:SeriesRequest></r:StudyRequest>'
    for syntaxes in (["1.2.3.4.5.6.7"], [""]):
        fast, slow = _both(client, _envelope(studies, syntaxes), monkeypatch)
        assert fast == slow
        assert b"RegistryError" in fast[1] and not fast[2]


def test_attachments_are_the_stored_files(env: Any) -> None:
    client, spec, refs, archive = env
    r = refs[0]
    studies = f'<r:StudyRequest studyInstanceUID="{spec.study_uid}"><r:SeriesRequest seriesInstanceUID="{r.series_uid}">{_doc(REPO, r.sop_instance_uid)}</r:SeriesRequest></r:StudyRequest>'
    _status, _text, attachments = _answer(client, _envelope(studies, [r.transfer_syntax_uid]))
    assert attachments == [archive.retrieve.path(r).read_bytes()]
