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
