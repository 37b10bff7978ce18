"""Publishing through the outbox on SQLite and PostgreSQL: integrated (ITI-42 + our ITI-43) and repository (ITI-41) modes."""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import pytest
from pydicom import dcmread
from werkzeug.serving import make_server

from tests.conftest import make_settings
from tests.support.registry import TestRegistry
from tests.support.xds import PATIENT_CX, ext_id, find_documents, xds_settings
from xdsi.archive import Archive
from xdsi.archive.remove import RemoveService
from xdsi.config import XdsSettings
from xdsi.index.xds_models import DONE, PENDING, SUPERSEDED
from xdsi.tools.synth import StudySpec, write_study
from xdsi.app import make_app
from xdsi.standards import constants as C
from xdsi.xds.codes import DEFAULT_CODES_FILE
from xdsi.xds.client import RepositoryClient
from xdsi.xds.codes import CodeTable
from xdsi.xds.manifest import load_study
from xdsi.xds.outbox import utcnow
from xdsi.xds.publisher import Publisher


@pytest.fixture
def registry() -> Iterator[TestRegistry]:
    with TestRegistry(CodeTable.load(), {PATIENT_CX}) as reg:
        yield reg


def open_archive(tmp_path: Path, index_url: str, **xds: object) -> Archive:
    # identifiers generated per data dir (issue 11); the synthetic patient PAT001 of HOSP mapped, as a site must
    mapped = {"patient_ids": xds_settings().patient_ids, "issuer_oids": xds_settings().issuer_oids}
    x = XdsSettings(**{"stability_delay": 0, "retry_initial": 0.2, "retry_max": 1.0, "timeout": 10, **mapped, **xds})  # type: ignore[arg-type]
    return Archive.open(make_settings(tmp_path, index_url, xds=x))


def store_study(archive: Archive, tmp_path: Path, spec: StudySpec, name: str, series: int = 2, per_series: int = 2) -> list[Path]:
    paths = write_study(tmp_path / name, spec, series=series, per_series=per_series)
    for p in paths:
        assert archive.store.store_file(p).ok
    return paths


def test_integrated_publish_rplc_deprecate_and_iti43(tmp_path: Path, index_url: str, registry: TestRegistry) -> None:
    archive = open_archive(tmp_path, index_url, mode="integrated", registry_url=registry.registry_url)
    try:
        spec = StudySpec()
        store_study(archive, tmp_path, spec, "a")
        pub = Publisher(archive)
        [out] = pub.run_once()
        assert out.state == DONE and out.transaction == "ITI-42", out
        assert pub.run_once() == []  # nothing changed: nothing sent again
        docs = find_documents(registry.registry_url, PATIENT_CX)
        assert len(docs) == 1
        kos_uid = ext_id(docs[0], C.DE_UNIQUE_ID)
        # the manifest is an archived instance of the study (C-FIND / RAD-69 see it)
        [ref] = archive.retrieve.select(study_uids=[spec.study_uid], sop_uids=[kos_uid])
        stored = archive.retrieve.path(ref).read_bytes()
        assert dcmread(archive.retrieve.path(ref)).Modality == "KO"
        entry = registry.by_unique_id(kos_uid)
        assert entry.repository_unique_id == archive.settings.xds.repository_unique_id and entry.size == len(stored)

        # ITI-43 at /xdsi/DocumentRepository, through zeep from the official WSDL: byte-identical to the stored KOS
        http = make_server("127.0.0.1", 0, make_app(archive), threaded=True)
        t = threading.Thread(target=http.serve_forever, daemon=True)
        t.start()
        try:
            url = f"http://127.0.0.1:{http.server_port}/xdsi/DocumentRepository"
            client = RepositoryClient(url, timeout=10)
            result, got = client.retrieve(archive.settings.xds.repository_unique_id, [kos_uid])
            assert result.success, result.error_text()
            assert got[kos_uid] == ("application/dicom", stored)
            result, got = client.retrieve(archive.settings.xds.repository_unique_id, [kos_uid, "1.2.3.4"])
            assert result.status == C.STATUS_PARTIAL_SUCCESS and [e.error_code for e in result.errors] == [C.XDS_DOCUMENT_UNIQUE_ID_ERROR]
            assert result.errors[0].location == "1.2.3.4" and list(got) == [kos_uid]
            result, got = client.retrieve("1.2.3", [kos_uid])
            assert result.status == C.STATUS_FAILURE and result.errors[0].error_code == C.XDS_UNKNOWN_REPOSITORY_ID and not got
            image = next(r for r in archive.retrieve.select(study_uids=[spec.study_uid]) if r.sop_instance_uid != kos_uid)
            result, got = client.retrieve(archive.settings.xds.repository_unique_id, [image.sop_instance_uid])
            assert result.status == C.STATUS_FAILURE and not got  # images are RAD-69's, not ITI-43 documents
        finally:
            http.shutdown()

        # the study changes: a replacement manifest with RPLC; the old entry is Deprecated
        store_study(archive, tmp_path, spec, "b", series=1, per_series=1)
        [out] = pub.run_once()
        assert out.state == DONE
        [new] = find_documents(registry.registry_url, PATIENT_CX)
        new_uid = ext_id(new, C.DE_UNIQUE_ID)
        assert new_uid != kos_uid
        assert registry.by_unique_id(kos_uid).status == C.STATUS_DEPRECATED
        subs = pub.outbox.for_study(spec.study_uid)
        assert subs[-1].replaces_entry_uuid == entry.entry_uuid
        [new_ref] = archive.retrieve.select(sop_uids=[new_uid])
        assert len(dcmread(archive.retrieve.path(new_ref)).ContentSequence) == 5

        # every instance deleted: the manifest is deprecated (ITI-57), nothing Approved is left
        snap = load_study(archive.index, spec.study_uid, pub.our_manifests(spec.study_uid))
        assert RemoveService(archive.index, archive.tiers).remove(snap.sop_uids) == 5
        [out] = pub.run_once()
        assert out.state == DONE and out.transaction == "ITI-57"
        assert find_documents(registry.registry_url, PATIENT_CX) == []
        assert registry.by_unique_id(new_uid).status == C.STATUS_DEPRECATED
    finally:
        archive.close()


def test_repository_mode_iti41_and_retrieve(tmp_path: Path, index_url: str, registry: TestRegistry) -> None:
    archive = open_archive(tmp_path, index_url, mode="repository", repository_url=registry.repository_url)
    try:
        spec = StudySpec()
        store_study(archive, tmp_path, spec, "a")
        [out] = Publisher(archive).run_once()
        assert out.state == DONE and out.transaction == "ITI-41", out
        assert registry.count_actions(C.ACTION_ITI41) == 1
        assert registry.requests[-1].content_type.startswith("multipart/related")
        [doc] = find_documents(registry.registry_url, PATIENT_CX)
        kos_uid = ext_id(doc, C.DE_UNIQUE_ID)
        [ref] = archive.retrieve.select(sop_uids=[kos_uid])
        result, got = RepositoryClient(registry.repository_url).retrieve(registry.repository_unique_id, [kos_uid])
        assert result.success and got[kos_uid][1] == archive.retrieve.path(ref).read_bytes()
    finally:
        archive.close()


def test_repository_mode_replacement_is_an_rplc_over_iti41(tmp_path: Path, index_url: str, registry: TestRegistry) -> None:
    """Document Replacement as an XDS.b Document Source: the changed study's manifest goes by ITI-41 with RPLC."""
    archive = open_archive(tmp_path, index_url, mode="repository", repository_url=registry.repository_url)
    try:
        spec = StudySpec()
        store_study(archive, tmp_path, spec, "a")
        pub = Publisher(archive)
        [out] = pub.run_once()
        assert out.state == DONE and out.transaction == "ITI-41", out
        [first] = find_documents(registry.registry_url, PATIENT_CX)
        old_uid = ext_id(first, C.DE_UNIQUE_ID)
        old_entry = registry.by_unique_id(old_uid).entry_uuid
        store_study(archive, tmp_path, spec, "b", series=1, per_series=1)
        [out] = pub.run_once()
        assert out.state == DONE and out.transaction == "ITI-41", out
        assert registry.count_actions(C.ACTION_ITI41) == 2
        [new] = find_documents(registry.registry_url, PATIENT_CX)
        assert ext_id(new, C.DE_UNIQUE_ID) != old_uid
        assert registry.by_unique_id(old_uid).status == C.STATUS_DEPRECATED
        assert pub.outbox.for_study(spec.study_uid)[-1].replaces_entry_uuid == old_entry
    finally:
        archive.close()


def test_registry_down_queued_then_delivered_after_restart(tmp_path: Path, index_url: str, registry: TestRegistry) -> None:
    archive = open_archive(tmp_path, index_url, mode="integrated", registry_url=registry.registry_url)
    spec = StudySpec()
    store_study(archive, tmp_path, spec, "a")
    registry.down = True
    [out] = Publisher(archive).run_once()
    assert out.state == PENDING and "503" in out.errors
    registry.stop()  # now not even listening
    outs = Publisher(archive).run_once(now=utcnow() + timedelta(seconds=5))
    assert [o.state for o in outs] == [PENDING] and "ConnectionError" in outs[0].errors
    [row] = Publisher(archive).outbox.for_study(spec.study_uid)
    assert row.attempts == 2 and row.state == PENDING and row.last_error
    archive.close()

    # xdsi "restarts" (a new process opens the same index); the registry is back on the same port
    registry.down = False
    registry.start()
    archive = open_archive(tmp_path, index_url, mode="integrated", registry_url=registry.registry_url)
    try:
        outs = Publisher(archive).run_once(now=utcnow() + timedelta(seconds=5))
        assert [o.state for o in outs] == [DONE]
        assert len(find_documents(registry.registry_url, PATIENT_CX)) == 1
        assert registry.count_actions(C.ACTION_ITI42) == 1  # the 503 was never a registration
    finally:
        archive.close()


def test_rejected_then_retried_after_the_config_is_fixed(tmp_path: Path, index_url: str, registry: TestRegistry) -> None:
    # the registry's affinity domain does not list the practice setting code xdsi is configured with
    domain = tmp_path / "domain-codes.xml"
    domain.write_text(DEFAULT_CODES_FILE.read_text().replace('code="R-3027B"', 'code="R-3027B-RETIRED"'))
    registry.codes = CodeTable.load(domain)
    archive = open_archive(tmp_path, index_url, mode="integrated", registry_url=registry.registry_url)
    spec = StudySpec()
    store_study(archive, tmp_path, spec, "a")
    try:
        [out] = Publisher(archive).run_once()
        assert out.state == PENDING and out.status == C.STATUS_FAILURE
        assert C.XDS_REGISTRY_METADATA_ERROR in out.errors and "practiceSettingCode 'R-3027B'" in out.errors
        [row] = Publisher(archive).outbox.for_study(spec.study_uid)
        assert "R-3027B" in row.last_response and "XDSRegistryMetadataError" in row.last_response  # the registry's own text
        kos_uid = row.kos_sop_uid
    finally:
        archive.close()
    # the site fixes its configuration; `xdsi publish` retries the same submission at once
    archive = open_archive(tmp_path, index_url, mode="integrated", registry_url=registry.registry_url, practice_setting_code="Practice-A")
    try:
        out = Publisher(archive).publish_now(spec.study_uid, wait=10)
        assert out is not None and out.state == DONE, out
        [row] = Publisher(archive).outbox.for_study(spec.study_uid)
        assert row.kos_sop_uid == kos_uid and row.attempts == 2  # same KOS, same submission, nothing else re-sent
        assert registry.count_actions(C.ACTION_ITI42) == 2
        [doc] = find_documents(registry.registry_url, PATIENT_CX)
        assert ext_id(doc, C.DE_UNIQUE_ID) == kos_uid
    finally:
        archive.close()


def test_change_while_queued_supersedes_the_unsent_manifest(tmp_path: Path, index_url: str, registry: TestRegistry) -> None:
    archive = open_archive(tmp_path, index_url, mode="integrated", registry_url=registry.registry_url)
    try:
        spec = StudySpec()
        store_study(archive, tmp_path, spec, "a")
        registry.down = True
        pub = Publisher(archive)
        pub.run_once()
        store_study(archive, tmp_path, spec, "b", series=1, per_series=1)
        registry.down = False
        [out] = pub.run_once(now=utcnow() + timedelta(seconds=5))
        assert out.state == DONE
        states = [s.state for s in pub.outbox.for_study(spec.study_uid)]
        assert states == [SUPERSEDED, DONE]
        [doc] = find_documents(registry.registry_url, PATIENT_CX)
        assert registry.by_unique_id(ext_id(doc, C.DE_UNIQUE_ID)) is not None
        assert not pub.outbox.for_study(spec.study_uid)[-1].replaces_entry_uuid  # never an RPLC of an unregistered entry
    finally:
        archive.close()


@pytest.mark.postgres
def test_several_processes_never_send_twice(tmp_path: Path, postgres, registry: TestRegistry) -> None:  # type: ignore[no-untyped-def]
    """Four publishers (each its own engine, as separate processes would be) drain one PostgreSQL outbox."""
    import uuid

    url = postgres.create_database(f"t_{uuid.uuid4().hex[:12]}")
    # four processes of one deployment: one PostgreSQL index, the same storage tiers
    archives = [open_archive(tmp_path, url, mode="integrated", registry_url=registry.registry_url) for i in range(4)]
    try:
        studies = []
        for n in range(6):
            spec = StudySpec(accession=f"ACC{n}")
            store_study(archives[0], tmp_path, spec, f"s{n}", series=1, per_series=1)
            studies.append(spec.study_uid)
        # queue them all first (a single preparer), then race the deliveries
        pub0 = Publisher(archives[0])
        pub0.x = replace(pub0.x, auto_publish=True)
        for s in studies:
            pub0.prepare(s)
        barrier = threading.Barrier(4)
        results: list[list[object]] = [[] for _ in archives]

        def drain(i: int) -> None:
            p = Publisher(archives[i])
            barrier.wait()
            for _ in range(5):
                results[i] += [(o.pk, o.state) for o in (p.deliver(c) for c in p.outbox.claim_due(limit=2))]

        threads = [threading.Thread(target=drain, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        delivered = [pk for r in results for (pk, state) in r if state == DONE]
        assert sorted(delivered) == sorted(set(delivered)) and len(delivered) == 6
        assert registry.count_actions(C.ACTION_ITI42) == 6
        assert len(find_documents(registry.registry_url, PATIENT_CX)) == 6
    finally:
        for a in archives:
            a.close()
