"""The web/XDS audit builders and the per-response Transfer bookkeeping, read back from the real spool (no network).

The Transfer tests use a real archive (SQLite index, a stored study) for the patient look-up and a real
AuditTrail whose spool is read directly: what a repository would receive, each message validated
against the PS3.15 A.5.1 schema.
"""

from __future__ import annotations

import base64
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import pytest
from lxml import etree

from tests.conftest import make_settings
from tests.support.audit_schema import check_audit_message
from xdsi.archive import Archive
from xdsi.audit import http as audit_http
from xdsi.audit import messages as m
from xdsi.audit.trail import AuditTrail
from xdsi.config import AuditSettings
from xdsi.tools.synth import StudySpec, write_study

REPO = "udp://127.0.0.1:9"  # never started: the messages stay in the spool, where the test reads them
SRC = m.AuditSource("XDSI-UNIT")
US = m.Participant("XDSI", False, network_access_point="127.0.0.1", alternative_user_id="4242")
PEER = m.Participant("CN=viewer", True, network_access_point="127.0.0.2")
CT = "1.2.840.10008.5.1.4.1.1.2"


def _check(event: m.AuditEvent) -> etree._Element:
    return check_audit_message(m.build(event))


def test_builders_are_schema_valid_and_carry_the_prescribed_codes() -> None:
    begin = _check(m.with_transaction(m.begin_transferring(SRC, US, PEER, "1.2.3", "P1", [(CT, 3)]), m.TRANSACTION["RAD-69"]))
    assert [(t.get("csd-code"), t.get("codeSystemName")) for t in begin.iter("EventTypeCode")] == [("RAD-69", "IHE Transactions")]
    assert begin.find("EventIdentification").attrib["EventActionCode"] == "E"
    assert [r.get("csd-code") for r in begin.iter("RoleIDCode")] == ["110153", "110152"]

    sent = _check(m.with_transaction(m.instances_sent(SRC, US, PEER, "1.2.3", "P1", [(CT, 2)], outcome="4", outcome_description="1 of 3 not sent"), m.TRANSACTION["RAD-55"]))
    ev = sent.find("EventIdentification")
    assert (ev.get("EventActionCode"), ev.get("EventOutcomeIndicator"), ev.findtext("EventOutcomeDescription")) == ("R", "4", "1 of 3 not sent")

    q = _check(m.query(SRC, PEER, US, m.STUDY_ROOT_FIND, b"/dicomweb/studies?PatientID=P1", event_type=m.TRANSACTION["RAD-129"], patient_id="P1"))
    obj = q.find("ParticipantObjectIdentification")
    assert obj.get("ParticipantObjectTypeCodeRole") == "24" and base64.b64decode(obj.findtext("ParticipantObjectQuery")) == b"/dicomweb/studies?PatientID=P1"
    assert [a.get("UserIsRequestor") for a in q.findall("ActiveParticipant")] == ["true", "false"]

    exp = _check(m.documents_exported(SRC, US, PEER, [("1.2.4", "1.3.6", "urn:oid:1.9")], "P1"))
    doc = exp.find("ParticipantObjectIdentification")
    assert doc.find("ParticipantObjectIDTypeCode").get("csd-code") == "9"
    assert {d.get("type"): base64.b64decode(d.get("value")) for d in doc.findall("ParticipantObjectDetail")} == {
        "Repository Unique ID": b"1.3.6", "ihe:homeCommunityID": b"urn:oid:1.9"}
    assert [(t.get("csd-code"), t.get("codeSystemName")) for t in exp.iter("EventTypeCode")] == [("ITI-43", "IHE Transactions")]

    sub = _check(m.submission_exported(SRC, US, PEER, ["ITI-57"], "1.2.9", "P1^^^&1.2&ISO", "8", "refused", action="U"))
    ss = [o for o in sub.findall("ParticipantObjectIdentification") if o.get("ParticipantObjectTypeCodeRole") == "20"][0]
    t = ss.find("ParticipantObjectIDTypeCode")
    assert (t.get("csd-code"), t.get("codeSystemName"), t.get("originalText")) == (
        "urn:uuid:a54d6aa5-d40d-43f9-88c5-b4633d873bdd", "IHE XDS Metadata", "submission set classificationNode")
    assert sub.find("EventIdentification").get("EventActionCode") == "U"
    assert [a.get("UserIsRequestor") for a in sub.findall("ActiveParticipant")] == ["false", "false"]  # as given; RoleIDCode decides


@pytest.fixture
def spooled(tmp_path: Path) -> Iterator[tuple[Archive, AuditTrail, StudySpec]]:
    settings = replace(make_settings(tmp_path, f"sqlite:///{tmp_path / 'index.sqlite'}"), audit=AuditSettings(repositories=(REPO,), audit_source_id="XDSI-UNIT"))
    archive = Archive.open(settings)
    spec = StudySpec(patient_id="UNIT-PID")
    for p in write_study(tmp_path / "in", spec, series=1, per_series=3):
        assert archive.store.store_file(p).ok
    trail = archive.audit = AuditTrail(settings)
    try:
        yield archive, trail, spec
    finally:
        archive.close()
        trail.stop(drain_seconds=0)


def _messages(trail: AuditTrail) -> list[etree._Element]:
    assert trail.spool is not None
    audit_http.drain(trail)  # recorded off the response path: wait for the worker
    return [check_audit_message(body.split(b"\xef\xbb\xbf", 1)[1]) for _seq, body in trail.spool.pending(REPO)]


def _summary(r: etree._Element) -> tuple[str, str, dict[str, str]]:
    ev = r.find("EventIdentification")
    classes = {s.get("UID"): s.get("NumberOfInstances") for s in r.iter("SOPClass")}
    return ev.find("EventID").get("csd-code"), ev.get("EventOutcomeIndicator"), classes


ENV = {"REMOTE_ADDR": "127.0.0.2", "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8080", "wsgi.url_scheme": "http", "PATH_INFO": "/x"}


def test_transfer_counts_what_was_taken_and_records_once(spooled: tuple[Archive, AuditTrail, StudySpec]) -> None:
    archive, trail, spec = spooled
    t = audit_http.transfer(archive, ENV, None, "WADO-RS")
    assert t is not None
    for _ in range(3):
        t.intend(spec.study_uid, CT)
    body = [list(t.track([b"a", b"b"], spec.study_uid, CT)) for _ in range(2)]  # two of three written whole
    assert body == [[b"a", b"b"], [b"a", b"b"]]
    half = t.track([b"a", b"b"], spec.study_uid, CT)
    next(half)  # the third: the client went away in the middle of it
    t.close()
    t.close()  # idempotent: the server and the error path may both close
    begin, done = _messages(trail)
    assert _summary(begin) == ("110102", "0", {CT: "3"})
    assert _summary(done) == ("110104", "4", {CT: "2"})
    assert "2 of 3 instance(s) sent" in done.findtext("EventIdentification/EventOutcomeDescription")
    pids = [o.get("ParticipantObjectID") for o in done.findall("ParticipantObjectIdentification") if o.get("ParticipantObjectTypeCodeRole") == "1"]
    assert pids == ["UNIT-PID"]  # looked up through the index


def test_transfer_of_an_unknown_study_discloses_nothing(spooled: tuple[Archive, AuditTrail, StudySpec]) -> None:
    archive, trail, _spec = spooled
    t = audit_http.transfer(archive, ENV, m.TRANSACTION["RAD-69"], "RAD-69", endpoint=True)
    assert t is not None
    t.omit("1.2.826.0.1.3680043.8.498.1", "no such document")
    t.close()
    assert _messages(trail) == []


def test_nothing_is_tracked_when_auditing_is_off(tmp_path: Path) -> None:
    archive = Archive.open(make_settings(tmp_path, f"sqlite:///{tmp_path / 'index.sqlite'}"))
    try:
        assert audit_http.transfer(archive, ENV, None, "WADO-RS") is None
        assert audit_http.document_export(archive, ENV) is None
        audit_http.qido_query(archive, ENV, "P1")  # returns at once, nothing to record into
    finally:
        archive.close()


def test_a_huge_query_is_kept_by_its_start_and_its_size(spooled: tuple[Archive, AuditTrail, StudySpec]) -> None:
    archive, trail, spec = spooled
    envelope = b"<Envelope>" + b"x" * (audit_http.MAX_QUERY_BYTES * 3) + b"</Envelope>"
    audit_http.information_query(archive, ENV, "urn:dicom:wado:ws:2011:RetrieveImagingDocumentSetInformation", envelope, [spec.study_uid])
    [msg] = _messages(trail)
    q = [o for o in msg.findall("ParticipantObjectIdentification") if o.get("ParticipantObjectTypeCodeRole") == "24"][0]
    assert base64.b64decode(q.findtext("ParticipantObjectQuery")) == envelope[: audit_http.MAX_QUERY_BYTES]
    assert {d.get("type"): base64.b64decode(d.get("value")) for d in q.findall("ParticipantObjectDetail")} == {"QueryTruncatedFrom": str(len(envelope)).encode()}
    assert [o.get("ParticipantObjectID") for o in msg.findall("ParticipantObjectIdentification") if o.get("ParticipantObjectTypeCodeRole") == "1"] == ["UNIT-PID"]


def test_an_authenticated_user_is_named_as_human_requestor(spooled: tuple[Archive, AuditTrail, StudySpec]) -> None:
    """A bearer/Basic/XUA identity becomes a third ActiveParticipant; a TLS-only identity does not (it is the node)."""
    from xdsi.security.principal import ENVIRON_KEY, Principal

    archive, trail, spec = spooled
    env = {**ENV, ENVIRON_KEY: Principal("dr.who@example.org", frozenset({"read"}), "bearer")}
    t = audit_http.transfer(archive, env, None, "WADO-RS")
    assert t is not None
    t.intend(spec.study_uid, CT)
    list(t.track([b"x"], spec.study_uid, CT))
    t.close()
    audit_http.qido_query(archive, {**ENV, ENVIRON_KEY: Principal("CN=node", frozenset(), "tls")}, None)
    begin, done, query = _messages(trail)
    for msg in (begin, done):
        people = [(a.get("UserID"), a.get("UserIsRequestor"), a.find("RoleIDCode") is not None) for a in msg.findall("ActiveParticipant")]
        assert people == [("XDSI", "false", True), ("127.0.0.2", "true", True), ("dr.who@example.org", "true", False)]
    assert [a.get("UserID") for a in query.findall("ActiveParticipant")] == ["127.0.0.2", "XDSI"]
