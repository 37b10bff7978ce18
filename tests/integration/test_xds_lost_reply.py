"""An answer lost after the registry committed: the outbox re-sends, and the registry's refusal proves it is there.

The registry double behaves as ITI-42 3.42.4.1.3.3 says (a re-sent DocumentEntry
with the same uniqueId, hash and size is no error; ``XDSDuplicateUniqueIdInRegistry``
only for the SubmissionSet); ``legacy_document_duplicates`` plays the older
registries that also answer it for the DocumentEntry.  Whatever the registry,
the study ends with exactly one Approved manifest and no second DocumentEntry.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import make_settings
from tests.support.registry import TestRegistry
from tests.support.xds import PATIENT_CX, ext_id, find_documents, xds_settings
from xdsi.archive import Archive
from xdsi.archive.remove import RemoveService
from xdsi.cli import main as cli_main
from xdsi.index.xds_models import DONE, PENDING
from xdsi.standards import constants as C
from xdsi.tools.synth import StudySpec, write_study
from xdsi.wire.ebrs import RegistryError, RegistryResult
from xdsi.xds.codes import CodeTable
from xdsi.xds.manifest import load_study
from xdsi.xds.outbox import utcnow
from xdsi.xds.publisher import Publisher
from xdsi.xds.recovery import proves_registered, publication_findings


@pytest.fixture(params=["ITI-42 conformant", "ITI-42 legacy duplicates"])
def registry(request: pytest.FixtureRequest) -> Iterator[TestRegistry]:
    with TestRegistry(CodeTable.load(), {PATIENT_CX}, legacy_document_duplicates="legacy" in request.param) as reg:
        yield reg


def open_archive(tmp_path: Path, index_in_data_dir: bool = False, **xds: object) -> Archive:
    x = xds_settings(**{"stability_delay": 0, "retry_initial": 0.2, "retry_max": 1.0, "timeout": 10, **xds})  # type: ignore[arg-type]
    return Archive.open(make_settings(tmp_path, None if index_in_data_dir else f"sqlite:///{tmp_path / 'index.sqlite'}", xds=x))


def store(archive: Archive, tmp_path: Path, spec: StudySpec, name: str, series: int = 1, per_series: int = 2) -> None:
    for p in write_study(tmp_path / name, spec, series=series, per_series=per_series):
        assert archive.store.store_file(p).ok


def later(seconds: float = 5) -> datetime:
    return utcnow() + timedelta(seconds=seconds)


def lose_then_resend(pub: Publisher, registry: TestRegistry, action: str) -> None:
    """One delivery whose answer is lost after the commit, then the re-send; both must end DONE."""
    sent = registry.count_actions(action)
    registry.lose_replies = 1
    [out] = pub.run_once()
    assert out.state == PENDING and out.status == "transport error" and "504" in out.errors, out
    [out] = pub.run_once(now=later())
    assert out.state == DONE, out
    assert registry.count_actions(action) == sent + 2
    # the re-send was refused for our own SubmissionSet uniqueId; a conformant registry never names the DocumentEntry
    duplicates = [e for e in out.errors.split("; ") if e.startswith(C.XDS_DUPLICATE_UNIQUE_ID)]
    assert any("SubmissionSet uniqueId" in e for e in duplicates), out
    if not registry.legacy_document_duplicates:
        assert all("SubmissionSet uniqueId" in e for e in duplicates), out
    assert pub.run_once(now=later(10)) == []  # nothing left to send


@pytest.mark.parametrize("mode", ["integrated", "repository"])
def test_lost_reply_then_resend_is_recognised(tmp_path: Path, registry: TestRegistry, mode: str) -> None:
    url = {"registry_url": registry.registry_url} if mode == "integrated" else {"repository_url": registry.repository_url}
    archive = open_archive(tmp_path, mode=mode, **url)
    try:
        spec = StudySpec()
        store(archive, tmp_path, spec, "a")
        pub = Publisher(archive)
        lose_then_resend(pub, registry, C.ACTION_ITI42 if mode == "integrated" else C.ACTION_ITI41)
        [doc] = find_documents(registry.registry_url, PATIENT_CX)
        kos_uid = ext_id(doc, C.DE_UNIQUE_ID)
        assert len(registry.all_by_unique_id(kos_uid)) == 1  # no second DocumentEntry for the re-send
        [row] = pub.outbox.for_study(spec.study_uid)
        assert row.state == DONE and row.attempts == 2 and row.entry_uuid == registry.by_unique_id(kos_uid).entry_uuid
        with archive.index.session() as s:
            from sqlalchemy import select

            from xdsi.index.xds_models import XdsManifest

            reg = s.scalars(select(XdsManifest).where(XdsManifest.study_uid == spec.study_uid)).one()
            assert reg.kos_sop_uid == kos_uid and reg.status == "approved"
    finally:
        archive.close()


def test_lost_reply_of_a_replacement_and_of_a_deprecation(tmp_path: Path, registry: TestRegistry) -> None:
    archive = open_archive(tmp_path, mode="integrated", registry_url=registry.registry_url)
    try:
        spec = StudySpec()
        store(archive, tmp_path, spec, "a")
        pub = Publisher(archive)
        [out] = pub.run_once()
        assert out.state == DONE
        [first] = find_documents(registry.registry_url, PATIENT_CX)
        first_uid = ext_id(first, C.DE_UNIQUE_ID)

        # RPLC whose answer is lost: the re-send also finds its target Deprecated (by itself); still recognised
        store(archive, tmp_path, spec, "b")
        lose_then_resend(pub, registry, C.ACTION_ITI42)
        [second] = find_documents(registry.registry_url, PATIENT_CX)
        second_uid = ext_id(second, C.DE_UNIQUE_ID)
        assert second_uid != first_uid and registry.by_unique_id(first_uid).status == C.STATUS_DEPRECATED
        assert len(registry.all_by_unique_id(second_uid)) == 1
        [finding] = publication_findings(archive, spec.study_uid)
        assert "earlier attempt whose answer was lost" in finding and second_uid in finding, finding

        # ITI-57 deprecation whose answer is lost
        snap = load_study(archive.index, spec.study_uid, pub.our_manifests(spec.study_uid))
        assert RemoveService(archive.index, archive.tiers).remove(snap.sop_uids) == 4
        lose_then_resend(pub, registry, C.ACTION_ITI57)
        assert find_documents(registry.registry_url, PATIENT_CX) == []
        assert registry.by_unique_id(second_uid).status == C.STATUS_DEPRECATED
    finally:
        archive.close()


SS = "2.25.111"
KOS = "1.2.840.99.7"


def result(*errors: RegistryError) -> RegistryResult:
    return RegistryResult(status=C.STATUS_FAILURE, errors=list(errors))


@pytest.mark.parametrize(
    ("errors", "proof"),
    [
        # a conformant registry: the SubmissionSet uniqueId, named in codeContext, plus the consequences of the re-send
        ([RegistryError(C.XDS_DUPLICATE_UNIQUE_ID, f"SubmissionSet uniqueId {SS} is not unique", "urn:uuid:x"),
          RegistryError(C.XDS_REGISTRY_METADATA_ERROR, "entryUUID urn:uuid:y is already registered", "urn:uuid:y"),
          RegistryError(C.XDS_REGISTRY_DEPRECATED_DOCUMENT_ERROR, "RPLC target urn:uuid:z is not Approved")], True),
        ([RegistryError(C.XDS_DUPLICATE_UNIQUE_ID, "not unique", SS)], True),  # named by location
        ([RegistryError(C.XDS_DUPLICATE_UNIQUE_ID, f"SubmissionSet uniqueId urn:oid:{SS}.")], True),  # end of a sentence
        ([RegistryError(C.XDS_DUPLICATE_UNIQUE_ID, f"DocumentEntry uniqueId {KOS} is already registered", KOS)], True),  # legacy registry
        # not ours: another uniqueId, one that merely starts like ours, no duplicate at all, a warning only
        ([RegistryError(C.XDS_DUPLICATE_UNIQUE_ID, "SubmissionSet uniqueId 2.25.222 is not unique")], False),
        ([RegistryError(C.XDS_DUPLICATE_UNIQUE_ID, f"SubmissionSet uniqueId {SS}1 is not unique")], False),
        ([RegistryError(C.XDS_DUPLICATE_UNIQUE_ID, f"SubmissionSet uniqueId {SS}.5 is not unique")], False),
        ([RegistryError(C.XDS_DUPLICATE_UNIQUE_ID, f"SubmissionSet uniqueId 1.{SS} is not unique")], False),
        ([RegistryError(C.XDS_UNKNOWN_PATIENT_ID, f"patient unknown in submission {SS}")], False),
        ([RegistryError(C.XDS_DUPLICATE_UNIQUE_ID, f"SubmissionSet uniqueId {SS}", None, C.SEVERITY_WARNING)], False),
        # the manifest's uniqueId registered with other bytes is never our earlier attempt
        ([RegistryError(C.XDS_DUPLICATE_UNIQUE_ID, f"SubmissionSet uniqueId {SS} is not unique"),
          RegistryError(C.XDS_NON_IDENTICAL_HASH, f"{KOS}: another hash")], False),
        ([RegistryError(C.XDS_NON_IDENTICAL_SIZE, f"{KOS}: another size", KOS)], False),
    ],
)
def test_what_proves_an_earlier_registration(errors: list[RegistryError], proof: bool) -> None:
    assert proves_registered(result(*errors), SS, KOS) is proof


def test_manifest_uid_is_no_proof_for_a_deprecation() -> None:
    """An ITI-57 row carries the registered manifest's uniqueId; only its own SubmissionSet uniqueId proves anything."""
    dup = RegistryError(C.XDS_DUPLICATE_UNIQUE_ID, f"DocumentEntry uniqueId {KOS} is already registered", KOS)
    assert not proves_registered(result(dup), SS, None)


def test_replacement_of_a_manifest_deprecated_by_someone_else_is_refused_and_explained(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """XDSRegistryDeprecatedDocumentError for our RPLC target, without a lost answer: not mistaken for one, and explained."""
    with TestRegistry(CodeTable.load(), {PATIENT_CX}) as registry:
        archive = open_archive(tmp_path, index_in_data_dir=True, mode="integrated", registry_url=registry.registry_url)
        try:
            spec = StudySpec()
            store(archive, tmp_path, spec, "a")
            pub = Publisher(archive)
            [out] = pub.run_once()
            assert out.state == DONE and publication_findings(archive, spec.study_uid) == []
            [first] = find_documents(registry.registry_url, PATIENT_CX)
            entry = registry.by_unique_id(ext_id(first, C.DE_UNIQUE_ID))
            entry.status = C.STATUS_DEPRECATED  # another actor deprecated our manifest in the registry
            store(archive, tmp_path, spec, "b")
            [out] = pub.run_once()
            assert out.state == PENDING and C.XDS_REGISTRY_DEPRECATED_DOCUMENT_ERROR in out.errors, out
            assert registry.find_by_patient(PATIENT_CX) == []  # nothing Approved was registered
            [finding] = publication_findings(archive, spec.study_uid)
            assert entry.entry_uuid in finding and "deprecated or replaced it" in finding, finding
        finally:
            archive.close()
    # and `xdsi status --study` prints it
    assert cli_main(["status", "--data-dir", str(tmp_path / "data"), "--study", spec.study_uid]) == 0
    assert f"finding:    {finding}" in capsys.readouterr().out.splitlines()
