"""The audit-dimse pieces without a DICOM network: what a retrieve, a delete, a migration, a refused
association and a settings change put into the (real, on-disk) audit spool, each message valid
against the PS3.15 schema; the C-STORE response classification; the [dimse] AE title settings.
"""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset

from tests.support.audit_schema import check_audit_message
from tests.support.objects import secondary_capture
from xdsi.audit import messages as m
from xdsi.audit.configuration import changed_settings, digests, kind_of
from xdsi.audit.dimse import DimseAudit, RetrieveAudit
from xdsi.audit.syslog import BOM
from xdsi.audit.trail import AuditTrail
from xdsi.config import AuditSettings, Settings, TlsSettings
from xdsi.dimse.sending import stored_by_peer

REPO = "udp://127.0.0.1:9"  # never started: the messages stay in the spool, where the test reads them
SC = "1.2.840.10008.5.1.4.1.1.7"
CT = "1.2.840.10008.5.1.4.1.1.2"


def make_trail(tmp: Path) -> AuditTrail:
    return AuditTrail(replace(Settings(data_dir=tmp), audit=AuditSettings(repositories=(REPO,), audit_source_id="UNIT")))


def spooled(trail: AuditTrail) -> list[Any]:
    assert trail.spool is not None
    return [check_audit_message(body.split(BOM, 1)[1]) for _seq, body in trail.spool.pending(REPO, limit=1000)]


def event_of(root: Any) -> tuple[str, str, str]:
    ev = root.find("EventIdentification")
    return ev.find("EventID").get("csd-code"), ev.get("EventActionCode"), ev.get("EventOutcomeIndicator")


def sop_classes(root: Any) -> dict[str, str]:
    study = [o for o in root.findall("ParticipantObjectIdentification") if o.get("ParticipantObjectTypeCodeRole") == "3"][0]
    return {sc.get("UID"): sc.get("NumberOfInstances") for sc in study.iter("SOPClass")}


def status(code: int, comment: str | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment
    return ds


def test_stored_by_peer_reads_the_c_store_response() -> None:
    assert stored_by_peer(status(0x0000)) == (True, None)
    assert stored_by_peer(status(0xB000)) == (True, None)  # warning: coerced, but stored (PS3.4 B.2.3)
    assert stored_by_peer(status(0xA700, "disk full")) == (False, "C-STORE status 0xA700 (disk full)")
    assert stored_by_peer(status(0xC123)) == (False, "C-STORE status 0xC123")
    assert stored_by_peer(Dataset())[0] is False  # no response at all: aborted


US = m.Participant("XDSI", False, network_access_point="192.0.2.1")
DEST = m.Participant("DEST", False, network_access_point="192.0.2.2")
MOVER = m.Participant("MOVER", True, network_access_point="192.0.2.3")


def ref(study: str, sop_class: str, n: int) -> Any:
    return SimpleNamespace(study_uid=study, sop_class_uid=sop_class, sop_instance_uid=f"1.2.3.{n}")


def test_retrieve_audit_compares_intended_and_sent_per_study(tmp_path: Path) -> None:
    trail = make_trail(tmp_path)
    refs = [ref("1.2.1", CT, 1), ref("1.2.1", CT, 2), ref("1.2.1", SC, 3), ref("1.2.2", CT, 4)]
    audit = RetrieveAudit(trail, {"1.2.1": "PID-1", "1.2.2": "PID-2"}.__getitem__, US, DEST, [MOVER], refs)
    audit.begin()
    audit.sent(refs[0], True)
    audit.sent(refs[1], False, "C-STORE status 0xA700")
    audit.sent(refs[2], True)
    audit.note = "cancelled by the requestor (C-CANCEL)"  # refs[3] never went
    audit.end()
    audit.end()  # a second end (cancel, then the generator closed) records nothing more
    got = spooled(trail)
    assert [event_of(r) for r in got] == [("110102", "E", "0"), ("110102", "E", "0"), ("110104", "R", "4"), ("110104", "R", "4")]
    assert [sop_classes(r) for r in got] == [{CT: "2", SC: "1"}, {CT: "1"}, {CT: "1", SC: "1"}, {}]
    why = [r.find("EventIdentification/EventOutcomeDescription").text for r in got[2:]]
    assert why == ["1 of 3 instance(s) not sent to DEST: 1 x C-STORE status 0xA700",
                   "1 of 1 instance(s) not sent to DEST: 1 not attempted: cancelled by the requestor (C-CANCEL)"]
    for r, patient in zip(got, ["PID-1", "PID-2", "PID-1", "PID-2"]):
        assert [o.get("ParticipantObjectID") for o in r.findall("ParticipantObjectIdentification")][1] == patient
        assert [(a.get("UserID"), a.get("UserIsRequestor")) for a in r.findall("ActiveParticipant")] == [("XDSI", "false"), ("DEST", "false"), ("MOVER", "true")]


def test_refused_association_alerts_are_rate_limited(tmp_path: Path) -> None:
    trail = make_trail(tmp_path)
    audit = DimseAudit(trail, lambda archive, uid: "")
    for _ in range(trail.alerts.per_key + 2):  # per_key alerts, then 2 counted
        audit.refused(US, "192.0.2.9", "STRANGER", "XDSI", "calling AE title 'STRANGER' not recognised")
    audit.refused(US, "192.0.2.9", "OTHER", "XDSI", "calling AE title 'OTHER' not recognised")  # another peer: its own alert
    start, sent, quiet = trail.alerts._last[("association", "192.0.2.9", "STRANGER", "XDSI")]
    assert (sent, quiet) == (trail.alerts.per_key, 2)
    trail.alerts._last[("association", "192.0.2.9", "STRANGER", "XDSI")] = (-1e9, sent, quiet)  # as if the interval had passed
    audit.refused(US, "192.0.2.9", "STRANGER", "XDSI", "calling AE title 'STRANGER' not recognised", subject="CN=stranger")
    got = spooled(trail)
    n = trail.alerts.per_key
    assert [event_of(r) for r in got] == [("110113", "E", "4")] * (n + 2)
    texts = [r.find("EventIdentification/EventOutcomeDescription").text for r in got]
    assert all("STRANGER" in t and "not alerted" not in t for t in texts[:n])
    assert "OTHER" in texts[n] and "(2 more such refusal(s) not alerted separately)" in texts[n + 1]
    last = [(a.get("UserID"), a.get("AlternativeUserID")) for a in got[n + 1].findall("ActiveParticipant")]
    assert last == [("XDSI", None), ("STRANGER", None), ("CN=stranger", "AETITLES=STRANGER")]
    trail.alerts._tokens["association"] = (0.0, float("inf"))  # the budget for refused associations spent: a new peer is counted
    audit.refused(US, "192.0.2.10", "THIRD", "XDSI", "x")
    assert len(spooled(trail)) == n + 2 and trail.alerts._held_overall == 1


# -- delete and migration through the services ----------------------------------------------------------------------


@pytest.fixture
def archive(tmp_path: Path):  # type: ignore[no-untyped-def]
    from xdsi.archive import Archive
    from xdsi.config import StorageSettings, TierSettings

    tiers = StorageSettings(tiers=(TierSettings(name="hot", path=tmp_path / "hot", migrate_after_days=0), TierSettings(name="cold", path=tmp_path / "cold")))
    a = Archive.open(replace(Settings(data_dir=tmp_path / "data", storage=tiers), audit=AuditSettings(repositories=(REPO,), audit_source_id="UNIT")))
    yield a
    a.close()


def store(archive: Any, tmp: Path, patient: str, n: int) -> tuple[str, list[str], list[str]]:
    """``n`` instances of one study in ``n`` series; (study UID, SOP Instance UIDs, series UIDs)."""
    study, sops, series = pydicom.uid.generate_uid(), [], []
    for i in range(n):
        data, sop = secondary_capture(patient_id=patient)
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.StudyInstanceUID = study
        path = tmp / f"{sop}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert archive.store.store_file(path).ok
        sops.append(sop)
        series.append(str(ds.SeriesInstanceUID))
    return study, sops, series


def test_remove_audits_part_of_a_study_then_the_whole_study(archive: Any, tmp_path: Path) -> None:
    study, sops, _ = store(archive, tmp_path, "DEL-7", 3)
    assert archive.remove.remove(sops[:1]) == 1  # no trail on the archive yet: nothing recorded, nothing collected
    archive.audit = make_trail(tmp_path / "t")
    person = m.Participant("op@example.org", True)
    assert archive.remove.remove(sops[1:2], actors=[person]) == 1
    assert archive.remove.remove(sops[2:]) == 1
    got = spooled(archive.audit)
    assert [event_of(r) for r in got] == [("110103", "D", "0"), ("110105", "D", "0")]
    for r in got:
        ids = [o.get("ParticipantObjectID") for o in r.findall("ParticipantObjectIdentification")]
        assert ids == [study, "DEL-7"] and sop_classes(r) == {SC: "1"}
    assert [a.get("UserID") for a in got[0].findall("ActiveParticipant")] == ["op@example.org"]
    proc = got[1].find("ActiveParticipant")  # the default actor: this process
    assert (proc.get("UserID").isdigit(), proc.get("AlternativeUserID"), proc.get("UserIsRequestor")) == (True, "AETITLES=UNIT", "true")


def test_migration_is_instances_accessed_update_with_the_tiers(archive: Any, tmp_path: Path) -> None:
    import base64

    study, _, _ = store(archive, tmp_path, "MIG-7", 2)
    archive.audit = make_trail(tmp_path / "t")
    report = archive.policy.run_once()
    assert (report.moved_studies, report.moved_files, report.errors) == (1, 2, [])
    (r,) = spooled(archive.audit)
    assert event_of(r) == ("110103", "U", "0") and sop_classes(r) == {SC: "2"}
    study_obj = r.find("ParticipantObjectIdentification")
    assert study_obj.get("ParticipantObjectID") == study
    assert {d.get("type"): base64.b64decode(d.get("value")) for d in study_obj.iter("ParticipantObjectDetail")} == {"MigratedFrom": b"hot", "MigratedTo": b"cold"}
    assert archive.policy.run_once().moved_studies == 0 and len(spooled(archive.audit)) == 1  # nothing moved: nothing recorded


# -- settings change --------------------------------------------------------------------------------------------------


def test_settings_digest_names_what_changed_and_its_kind(tmp_path: Path) -> None:
    cert = tmp_path / "node.pem"
    cert.write_text("one")
    base = Settings(data_dir=tmp_path, tls=TlsSettings(certificate=cert))
    before = digests(base)
    assert changed_settings(before, digests(Settings(data_dir=tmp_path, tls=TlsSettings(certificate=cert)))) == {}
    cert.write_text("renewed")  # same path, new certificate: a security configuration change
    assert changed_settings(before, digests(base)) == {"security_configuration": ["tls.certificate"]}
    cert.write_text("one")
    moved = replace(base, dicom_port=11113, log_level="DEBUG", dimse_policy=replace(base.dimse_policy, accept_unknown_peers=False))
    assert changed_settings(before, digests(moved)) == {
        "network_configuration": ["dicom_port"], "security_configuration": ["dimse_policy.accept_unknown_peers"], "software_configuration": ["log_level"]}
    assert kind_of("peers.PACS") == "network_configuration" and kind_of("audit.repositories") == "security_configuration"


def test_configuration_changed_records_an_alert_only_against_a_previous_start(tmp_path: Path) -> None:
    from xdsi.audit.configuration import configuration_changed, digest_path

    settings = replace(Settings(data_dir=tmp_path), audit=AuditSettings(repositories=(REPO,), audit_source_id="UNIT"))
    trail = make_trail(tmp_path)
    configuration_changed(trail, settings, US)
    assert spooled(trail) == [] and digest_path(settings).exists()
    configuration_changed(trail, settings, US)
    assert spooled(trail) == []
    configuration_changed(trail, replace(settings, host="0.0.0.0", http_port=8081), US)
    (r,) = spooled(trail)
    assert r.find("EventIdentification/EventTypeCode").get("csd-code") == "110128"
    assert r.find("EventIdentification/EventOutcomeDescription").text.endswith("host, http_port")
    assert "0.0.0.0" not in digest_path(settings).read_text(), "digests only, never the values"


def test_pynetdicom_own_ae_title_refusal_is_alerted(tmp_path: Path) -> None:
    """EVT_REJECTED: an AE that uses pynetdicom's require_calling_aet (not xdsi's [dimse] check) is audited too."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    trail = make_trail(tmp_path)
    scp = AE(ae_title="GUARDED")
    scp.add_supported_context(Verification)
    scp.require_calling_aet = ["KNOWN"]
    server = scp.start_server(("127.0.0.1", 0), block=False, evt_handlers=DimseAudit(trail, lambda a, uid: "").handlers())
    try:
        scu = AE(ae_title="STRANGER")
        scu.add_requested_context(Verification)
        assoc = scu.associate("127.0.0.1", server.server_address[1], ae_title="GUARDED")
        assert assoc.is_rejected
        known = AE(ae_title="KNOWN")
        known.add_requested_context(Verification)
        ok = known.associate("127.0.0.1", server.server_address[1], ae_title="GUARDED")
        assert ok.is_established
        ok.release()
    finally:
        server.shutdown()
    (r,) = spooled(trail)
    assert event_of(r) == ("110113", "E", "4")
    assert "calling AE title 'STRANGER' not recognised" in r.find("EventIdentification/EventOutcomeDescription").text
    assert [(a.get("UserID"), a.get("UserIsRequestor")) for a in r.findall("ActiveParticipant")] == [("GUARDED", "false"), ("STRANGER", "true")]
