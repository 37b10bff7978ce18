"""Issue 11 items 3 and 5 end to end: unmapped patients are not published, generated identifiers survive
restarts of ``xdsi serve``, and the KOS Retrieve URL is built on [server] public_url (SQLite; PostgreSQL
adds nothing here: the policy runs before any index write, the identifiers live in the data dir)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
from pydicom import dcmread

from tests.conftest import make_settings
from tests.support.registry import TestRegistry
from tests.support.server import XdsiProcess
from tests.support.xds import HOSP_OID, PATIENT_CX, xds_settings
from xdsi.archive import Archive
from xdsi.config import XdsSettings
from xdsi.installation import FILE_NAME, load
from xdsi.soap.client import retrieve
from xdsi.standards import constants as C
from xdsi.tools.synth import StudySpec, write_study
from xdsi.xds.codes import CodeTable
from xdsi.xds.patients import PatientNotPublishable, publication_findings
from xdsi.xds.publisher import Publisher

MAPPED = {"patient_ids": xds_settings().patient_ids, "issuer_oids": xds_settings().issuer_oids}


@pytest.fixture(scope="module")
def registry() -> Iterator[TestRegistry]:
    with TestRegistry(CodeTable.load(), {PATIENT_CX}) as reg:
        yield reg


def open_archive(tmp_path: Path, public_url: str = "", **xds: object) -> Archive:
    x = XdsSettings(**{"stability_delay": 0, "retry_initial": 0.2, "retry_max": 1.0, "timeout": 10, **xds})  # type: ignore[arg-type]
    return Archive.open(make_settings(tmp_path, None, xds=x, public_url=public_url))


def store_study(archive: Archive, tmp_path: Path, spec: StudySpec) -> int:
    paths = write_study(tmp_path / "in", spec, series=2, per_series=2)
    for p in paths:
        assert archive.store.store_file(p).ok
    return len(paths)


def xdsi(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xdsi", *args], capture_output=True, text=True, timeout=120)


def test_an_unmapped_patient_is_not_published_until_mapped(tmp_path: Path, registry: TestRegistry) -> None:
    spec = StudySpec()  # PAT001 of issuer HOSP; the registry knows PAT001 in the affinity domain
    archive = open_archive(tmp_path, mode="integrated", registry_url=registry.registry_url)
    try:
        n = store_study(archive, tmp_path, spec)
        pub = Publisher(archive)
        sent_before = registry.count_actions(C.ACTION_ITI42)
        assert pub.run_once() == []
        with pytest.raises(PatientNotPublishable, match="not in \\[\\[xds.patient_ids\\]\\]"):
            pub.prepare(spec.study_uid)
        # nothing built, stored, queued or sent
        assert pub.outbox.for_study(spec.study_uid) == []
        assert len(archive.retrieve.select(study_uids=[spec.study_uid])) == n  # no KOS stored
        assert not (archive.settings.data_dir / "xds" / spec.study_uid).exists()
        assert registry.count_actions(C.ACTION_ITI42) == sent_before
        [finding, *_] = publication_findings(archive, spec.study_uid)
        assert finding.startswith("not published: patient 'PAT001' (Issuer of Patient ID 'HOSP')")
        assert '[[xds.patient_ids]]\nlocal_id = "PAT001"\nlocal_issuer = "HOSP"' in finding
    finally:
        archive.close()

    # the operator's view: `xdsi publish` refuses with the reason, `xdsi status --study` says which row to add
    cfg = tmp_path / "xdsi.toml"
    cfg.write_text(f'[xds]\nmode = "integrated"\nregistry_url = "{registry.registry_url}"\nauto_publish = false\ntimeout = 10\n')
    common = ("--data-dir", str(tmp_path / "data"), "--config", str(cfg))
    out = xdsi("publish", *common, spec.study_uid)
    assert out.returncode == 2 and "not in [[xds.patient_ids]]" in out.stderr, out.stdout + out.stderr
    out = xdsi("status", *common, "--study", spec.study_uid)
    assert out.returncode == 0, out.stderr
    assert "finding:    not published: patient 'PAT001'" in out.stdout and 'local_id = "PAT001"' in out.stdout
    assert registry.count_actions(C.ACTION_ITI42) == sent_before

    # mapped: published under the affinity-domain ID of the row, with the issuer's OID in sourcePatientId
    archive = open_archive(tmp_path, mode="integrated", registry_url=registry.registry_url, **MAPPED)
    try:
        pub = Publisher(archive)
        [outcome] = pub.run_once()
        assert outcome.state == "done", outcome
        entry = registry.by_unique_id(pub.outbox.for_study(spec.study_uid)[-1].kos_sop_uid)
        assert entry is not None and entry.patient_id == PATIENT_CX
        assert entry.repository_unique_id == archive.settings.xds.repository_unique_id  # generated for this data dir
        source = entry.element.find(f"{C.q('rim', 'Slot')}[@name='sourcePatientId']/{C.q('rim', 'ValueList')}/{C.q('rim', 'Value')}")
        assert source is not None and source.text == f"PAT001^^^&{HOSP_OID}&ISO"
        assert publication_findings(archive, spec.study_uid) == ["manifests carry no WADO-RS Retrieve URL: set [server] public_url (how consumers reach this server)"]
    finally:
        archive.close()


def _kos(archive: Archive, study_uid: str):  # type: ignore[no-untyped-def]
    row = Publisher(archive).prepare(study_uid)
    assert row is not None
    return dcmread(row.kos_path)


def test_kos_retrieve_url_from_public_url_and_uids_under_our_root(tmp_path: Path) -> None:
    spec = StudySpec()
    archive = open_archive(tmp_path / "a", public_url="https://imaging.example.org/pacs", mode="integrated",
                           registry_url="http://registry.invalid/xds", **MAPPED)
    try:
        store_study(archive, tmp_path / "a", spec)
        x = archive.settings.xds
        kos = _kos(archive, spec.study_uid)
        series = kos.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        assert len(series) == 2
        for s in series:
            assert s.RetrieveURL == f"https://imaging.example.org/pacs/dicomweb/studies/{spec.study_uid}/series/{s.SeriesInstanceUID}"
            assert s.RetrieveLocationUID == x.repository_unique_id == load(archive.settings.data_dir).repository_unique_id  # type: ignore[union-attr]
        assert kos.SOPInstanceUID.startswith(x.uid_root + ".") and kos.SeriesInstanceUID.startswith(x.uid_root + ".")
        # DICOMweb answers name the same public base
        from werkzeug.test import Client

        from xdsi.app import make_app

        r = Client(make_app(archive, {})).get(f"/dicomweb/studies?StudyInstanceUID={spec.study_uid}")
        assert r.status_code == 200, r.text
        assert r.json[0]["00081190"]["Value"] == [f"https://imaging.example.org/pacs/dicomweb/studies/{spec.study_uid}"]
    finally:
        archive.close()

    # no public_url: no Retrieve URL at all, rather than the bind address
    archive = open_archive(tmp_path / "b", mode="integrated", registry_url="http://registry.invalid/xds", **MAPPED)
    try:
        store_study(archive, tmp_path / "b", spec)
        kos = _kos(archive, spec.study_uid)
        for s in kos.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence:
            assert "RetrieveURL" not in s and s.RetrieveAETitle == "XDSI"
        assert b"127.0.0.1" not in Path(Publisher(archive).outbox.for_study(spec.study_uid)[-1].kos_path).read_bytes()
    finally:
        archive.close()


def _status_ids(data: Path) -> dict[str, str]:
    out = xdsi("status", "--data-dir", str(data))
    assert out.returncode == 0, out.stderr
    return {m.group(1): m.group(2) for m in re.finditer(r"^(repository|source id|uid root): +(\S+) \((.*)\)$", out.stdout, re.M)} | {
        "generated": str(out.stdout.count(f"generated for this installation, {data.resolve() / FILE_NAME}"))
    }


def _rad69_errors(proc: XdsiProcess, repository_unique_id: str, tmp_path: Path) -> list[str]:
    report = retrieve(f"http://127.0.0.1:{proc.http_port}/xdsi/ImagingDocumentSource", "1.2.3.4", {"1.2.3.4.1": ["1.2.3.4.1.1"]},
                      tmp_path / "rad69", repository_unique_id=repository_unique_id, timeout=30)
    assert report.fault is None, report.fault
    return [e.error_code for e in report.errors]


def test_generated_identifiers_are_stable_across_xdsi_serve_restarts(tmp_path: Path) -> None:
    data = tmp_path / "data"
    seen = []
    for _ in range(2):
        proc = XdsiProcess(data).start()
        try:
            ids = _status_ids(data)
            # the running server answers to the generated id, and not to the old shared default
            assert C.XDS_UNKNOWN_REPOSITORY_ID not in _rad69_errors(proc, ids["repository"], tmp_path)
            assert _rad69_errors(proc, C.DEFAULT_REPOSITORY_UNIQUE_ID, tmp_path) == [C.XDS_UNKNOWN_REPOSITORY_ID]
        finally:
            proc.stop()
        seen.append(ids)
    assert seen[0] == seen[1]
    assert seen[0]["generated"] == "3" and seen[0]["repository"].startswith("2.25.")
    assert seen[0]["repository"] != C.DEFAULT_REPOSITORY_UNIQUE_ID


def test_a_manifest_is_deprecated_under_its_registered_patient_after_the_mapping_is_gone(tmp_path: Path, registry: TestRegistry) -> None:
    from xdsi.archive.remove import RemoveService
    from xdsi.xds.manifest import load_study

    spec = StudySpec()
    archive = open_archive(tmp_path, mode="integrated", registry_url=registry.registry_url, **MAPPED)
    try:
        store_study(archive, tmp_path, spec)
        pub = Publisher(archive)
        [out] = pub.run_once()
        assert out.state == "done", out
        kos_uid = pub.outbox.for_study(spec.study_uid)[-1].kos_sop_uid
    finally:
        archive.close()
    # the row is removed from the table (unmapped: refused), then every instance is deleted
    archive = open_archive(tmp_path, mode="integrated", registry_url=registry.registry_url)
    try:
        pub = Publisher(archive)
        snap = load_study(archive.index, spec.study_uid, pub.our_manifests(spec.study_uid))
        assert RemoveService(archive.index, archive.tiers).remove(snap.sop_uids) == 4
        [out] = pub.run_once()
        assert out.state == "done" and out.transaction == "ITI-57", out
        entry = registry.by_unique_id(kos_uid)
        assert entry is not None and entry.status == C.STATUS_DEPRECATED and entry.patient_id == PATIENT_CX
    finally:
        archive.close()


# -- PIXm (ITI-83) -----------------------------------------------------------------------------------------


class PixManager:
    """A PIXm Patient Identifier Cross-reference Manager double: answers from ``known`` as ITI-83 says."""

    def __init__(self) -> None:
        self.known: dict[str, list[str]] = {}  # "urn:oid:OID|ID" -> affinity IDs
        self.status = 200
        self.requests: list[dict[str, str]] = []

    def __call__(self, environ, start_response):  # type: ignore[no-untyped-def]
        import json

        from werkzeug.wrappers import Request, Response

        req = Request(environ)
        self.requests.append(dict(req.args))
        if req.path != "/fhir/Patient/$ihe-pix" or self.status != 200:
            return Response("no", status=self.status if self.status != 200 else 404)(environ, start_response)
        target = req.args.get("targetSystem", "")
        ids = self.known.get(req.args.get("sourceIdentifier", ""))
        if ids is None:
            outcome = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-found"}]}
            return Response(json.dumps(outcome), status=404, content_type="application/fhir+json")(environ, start_response)
        params = [{"name": "targetIdentifier", "valueIdentifier": {"system": target, "value": v}} for v in ids]
        params.append({"name": "targetIdentifier", "valueIdentifier": {"system": "urn:oid:1.2.3.999", "value": "OTHER-DOMAIN"}})
        body = json.dumps({"resourceType": "Parameters", "parameter": params})
        return Response(body, content_type="application/fhir+json")(environ, start_response)


@pytest.fixture(scope="module")
def pix() -> Iterator[tuple[PixManager, str]]:
    import threading

    from werkzeug.serving import make_server

    app = PixManager()
    server = make_server("127.0.0.1", 0, app, threaded=True)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield app, f"http://127.0.0.1:{server.server_port}/fhir"
    finally:
        server.shutdown()


def test_pixm_lookup_of_an_unmapped_patient(pix: tuple[PixManager, str], tmp_path: Path) -> None:
    from tests.support.xds import AFFINITY
    from xdsi.xds.patients import patient_ids
    from xdsi.xds.manifest import InstanceRow, SeriesRow, StudySnapshot

    app, url = pix
    snap = StudySnapshot("PAT001", "HOSP", "DOE^JANE", "19700101", "F", "1.2.3.4", "20240115", "101500", "ACC001", "", "1", "", "", None,
                         (SeriesRow("1.2.3.4.1", "CT", "CHEST", (InstanceRow("1.2.3.4.1.1", "1.2.840.10008.5.1.4.1.1.2"),)),))
    x = XdsSettings(pix_url=url, issuer_oids={"HOSP": HOSP_OID}, timeout=5)
    source = f"urn:oid:{HOSP_OID}|PAT001"
    app.known = {source: ["IHERED-42"]}
    ids = patient_ids(snap, x)
    assert ids.mapped and ids.affinity == f"IHERED-42^^^&{AFFINITY}&ISO" and ids.source == f"PAT001^^^&{HOSP_OID}&ISO"
    assert app.requests[-1] == {"sourceIdentifier": source, "targetSystem": f"urn:oid:{AFFINITY}"}
    # a table row wins over PIX
    row = xds_settings().patient_ids[0]
    assert patient_ids(snap, XdsSettings(pix_url=url, patient_ids=(row,), issuer_oids={"HOSP": HOSP_OID})).affinity == PATIENT_CX
    app.known = {}  # 404: not known -> the unmapped policy
    with pytest.raises(PatientNotPublishable, match="nor known to the PIX Manager"):
        patient_ids(snap, x)
    assert patient_ids(snap, XdsSettings(pix_url=url, unmapped_patients="local-authority")).affinity == PATIENT_CX
    app.known = {source: ["IHERED-42", "IHERED-43"]}  # ambiguous
    with pytest.raises(PatientNotPublishable, match="2 different IDs"):
        patient_ids(snap, x)
    app.known, app.status = {source: ["IHERED-42"]}, 500  # an error is not "unknown": the study waits
    try:
        with pytest.raises(PatientNotPublishable, match="answered HTTP 500.*once the PIX Manager answers"):
            patient_ids(snap, replace_x(x, unmapped_patients="local-authority"))
    finally:
        app.status = 200
    with pytest.raises(PatientNotPublishable, match="unreachable"):
        patient_ids(snap, replace_x(x, pix_url="http://127.0.0.1:9/fhir", unmapped_patients="local-authority"))
    with pytest.raises(PatientNotPublishable, match="no issuer OID is invented"):  # PIX needs the source domain's OID
        patient_ids(snap, replace_x(x, issuer_oids={}))


def replace_x(x: XdsSettings, **kw: object) -> XdsSettings:
    from dataclasses import replace

    return replace(x, **kw)  # type: ignore[arg-type]


def test_published_under_the_pix_managers_id(pix: tuple[PixManager, str], tmp_path: Path, registry: TestRegistry) -> None:
    from tests.support.xds import AFFINITY

    app, url = pix
    app.known = {f"urn:oid:{HOSP_OID}|PAT002": ["IHERED-77"]}
    registry.known_patients.add(f"IHERED-77^^^&{AFFINITY}&ISO")
    spec = StudySpec(patient_id="PAT002")
    archive = open_archive(tmp_path, mode="integrated", registry_url=registry.registry_url, pix_url=url, issuer_oids={"HOSP": HOSP_OID})
    try:
        store_study(archive, tmp_path, spec)
        pub = Publisher(archive)
        [out] = pub.run_once()
        assert out.state == "done", out
        entry = registry.by_unique_id(pub.outbox.for_study(spec.study_uid)[-1].kos_sop_uid)
        assert entry is not None and entry.patient_id == f"IHERED-77^^^&{AFFINITY}&ISO"
    finally:
        archive.close()
