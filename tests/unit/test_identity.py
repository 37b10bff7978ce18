"""Issue 11 items 3 and 5: the patient identity policy, per-installation identifiers and [server] public_url."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import pytest

from xdsi.archive import Archive
from xdsi.config import ConfigError, PatientIdMapping, Settings, XdsSettings, load_settings
from xdsi.installation import FILE_NAME, InstallationError, load, load_or_create, new_uid_under
from xdsi.standards.constants import DEFAULT_REPOSITORY_UNIQUE_ID
from xdsi.uids import is_valid_uid
from xdsi.xds.manifest import InstanceRow, SeriesRow, StudySnapshot
from xdsi.xds.patients import PatientNotPublishable, patient_ids

AFFINITY = "1.3.6.1.4.1.21367.13.20.1000"
HOSP_OID = "1.2.840.99999.1"


# -- per-installation identifiers -------------------------------------------------------------------


def _ids(settings: Settings) -> tuple[str, str, str, str]:
    a = Archive.open(settings)
    try:
        x = a.settings.xds
        return x.repository_unique_id, x.source_id, x.uid_root, x.accession_authority
    finally:
        a.close()


def test_generated_identifiers_are_stable_across_opens_and_unique_per_data_dir(tmp_path: Path) -> None:
    first = _ids(Settings(data_dir=tmp_path / "a"))
    again = _ids(Settings(data_dir=tmp_path / "a"))
    other = _ids(Settings(data_dir=tmp_path / "b"))
    assert first == again  # the second open reads the stored root back
    assert len(set(first)) == 4 and all(is_valid_uid(v) and v.startswith("2.25.") for v in first)
    assert DEFAULT_REPOSITORY_UNIQUE_ID not in first  # no install answers to the shared test id by default
    assert not set(first) & set(other)  # another installation, other identifiers
    stored = load(tmp_path / "a")
    assert stored is not None and first[0] == stored.repository_unique_id
    assert first[0] in (tmp_path / "a" / FILE_NAME).read_text()


def test_configured_identifiers_win_and_the_rest_is_generated(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path, xds=XdsSettings(repository_unique_id=DEFAULT_REPOSITORY_UNIQUE_ID, source_id="1.2.3.4"))
    repo, source, root, _acc = _ids(s)
    assert (repo, source) == (DEFAULT_REPOSITORY_UNIQUE_ID, "1.2.3.4")
    assert root == load(tmp_path).uid_root  # type: ignore[union-attr]


def test_a_damaged_installation_file_stops_the_start_and_is_not_replaced(tmp_path: Path) -> None:
    load_or_create(tmp_path)
    path = tmp_path / FILE_NAME
    path.write_text('root = "1.2.3"\n')
    with pytest.raises(InstallationError, match="restore"):
        Archive.open(Settings(data_dir=tmp_path))
    assert path.read_text() == 'root = "1.2.3"\n'
    path.write_text("root = \n")
    with pytest.raises(InstallationError, match="cannot read"):
        load_or_create(tmp_path)


def test_concurrent_first_use_agrees_on_one_identity(tmp_path: Path) -> None:
    barrier = threading.Barrier(8)
    got: list[str] = []

    def first_use() -> None:
        barrier.wait()
        got.append(load_or_create(tmp_path).root)

    threads = [threading.Thread(target=first_use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8 and len(set(got)) == 1
    assert [p.name for p in tmp_path.iterdir()] == [FILE_NAME]  # no temporary file left behind


def test_uids_under_the_installation_root(tmp_path: Path) -> None:
    root = load_or_create(tmp_path).uid_root
    uids = {new_uid_under(root) for _ in range(2000)}
    assert len(uids) == 2000
    assert all(is_valid_uid(u) and u.startswith(root + ".") and len(u) <= 64 for u in uids)


# -- configuration ------------------------------------------------------------------------------------


def _toml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "x.toml"
    p.write_text(text)
    return p


def test_unmapped_patients_setting(tmp_path: Path) -> None:
    assert load_settings(env={}).xds.unmapped_patients == "refuse"  # the default
    s = load_settings(_toml(tmp_path, '[xds]\nunmapped_patients = "local-authority"\n'), env={})
    assert s.xds.unmapped_patients == "local-authority"
    with pytest.raises(ConfigError, match="unmapped_patients must be one of refuse, local-authority"):
        load_settings(_toml(tmp_path, '[xds]\nunmapped_patients = "publish"\n'), env={})
    # the old switch: false (publish unmapped patients under the domain's authority) is refused, true is "refuse"
    with pytest.raises(ConfigError, match="known_patient_ids_only is replaced by unmapped_patients"):
        load_settings(_toml(tmp_path, "[xds]\nknown_patient_ids_only = false\n"), env={})
    with pytest.raises(ConfigError, match="known_patient_ids_only is replaced"):
        load_settings(_toml(tmp_path, '[xds]\nknown_patient_ids_only = true\nunmapped_patients = "local-authority"\n'), env={})
    assert load_settings(_toml(tmp_path, "[xds]\nknown_patient_ids_only = true\n"), env={}).xds.unmapped_patients == "refuse"


def test_public_url_setting(tmp_path: Path) -> None:
    s = load_settings(_toml(tmp_path, '[server]\npublic_url = "https://imaging.example.org/pacs/"\n'), env={})
    assert s.public_url == "https://imaging.example.org/pacs"
    assert load_settings(env={"XDSI_PUBLIC_URL": "http://h.example.org:8080"}).public_url == "http://h.example.org:8080"
    for bad in ("imaging.example.org", "ftp://imaging.example.org", "https://imaging.example.org/?a=1", "http://0.0.0.0:8080"):
        with pytest.raises(ConfigError, match="public_url"):
            load_settings(_toml(tmp_path, f'[server]\npublic_url = "{bad}"\n'), env={})


def test_wildcard_bind_address_without_public_url_is_refused_when_publishing(tmp_path: Path) -> None:
    xds = '[xds]\nmode = "integrated"\nregistry_url = "http://registry.example.org/xds"\n'
    with pytest.raises(ConfigError, match="wildcard bind address.*public_url"):
        load_settings(_toml(tmp_path, '[server]\nhost = "0.0.0.0"\n' + xds), env={})
    with pytest.raises(ConfigError, match="public_url"):  # a flag is validated the same way
        load_settings(_toml(tmp_path, xds), env={}).with_overrides(host="0.0.0.0")
    ok = load_settings(_toml(tmp_path, '[server]\nhost = "0.0.0.0"\npublic_url = "https://imaging.example.org"\n' + xds), env={})
    assert ok.public_url == "https://imaging.example.org"
    assert load_settings(_toml(tmp_path, '[server]\nhost = "0.0.0.0"\n'), env={}).host == "0.0.0.0"  # publishing off: nothing published


# -- patient identity ---------------------------------------------------------------------------------


def snap(patient_id: str = "PAT001", issuer: str = "HOSP") -> StudySnapshot:
    return StudySnapshot(
        patient_id=patient_id, issuer_of_patient_id=issuer, patient_name="DOE^JANE", birth_date="19700101", sex="F",
        study_uid="1.2.3.4", study_date="20240115", study_time="101500", accession_number="ACC001", accession_issuer="",
        study_id="1", study_description="", referring_physician="", procedure_code=None,
        series=(SeriesRow("1.2.3.4.1", "CT", "CHEST", (InstanceRow("1.2.3.4.1.1", "1.2.840.10008.5.1.4.1.1.2"),)),),
    )


def test_an_unmapped_patient_is_refused_by_default_with_the_row_to_add() -> None:
    with pytest.raises(PatientNotPublishable) as err:
        patient_ids(snap(), XdsSettings())
    text = str(err.value)
    assert "'PAT001'" in text and 'unmapped_patients = "refuse"' in text
    assert '[[xds.patient_ids]]\nlocal_id = "PAT001"\nlocal_issuer = "HOSP"\naffinity_id = ' in text
    assert f'affinity_authority = "{AFFINITY}"' in text
    # a row for the same ID from another issuer does not match
    x = XdsSettings(patient_ids=(PatientIdMapping("PAT001", "OTHERHOSP", "IHERED-1", AFFINITY),), issuer_oids={"HOSP": HOSP_OID})
    with pytest.raises(PatientNotPublishable):
        patient_ids(snap(), x)


def test_a_mapped_patient_and_its_source_patient_id() -> None:
    row = PatientIdMapping("PAT001", "HOSP", "IHERED-994", AFFINITY)
    ids = patient_ids(snap(), XdsSettings(patient_ids=(row,), issuer_oids={"HOSP": HOSP_OID}))
    assert ids.mapped and ids.affinity == f"IHERED-994^^^&{AFFINITY}&ISO" and ids.source == f"PAT001^^^&{HOSP_OID}&ISO"
    # an issuer that is itself an OID needs no [xds.issuer_oids] entry
    ids = patient_ids(snap(issuer=HOSP_OID), XdsSettings(patient_ids=(replace(row, local_issuer=HOSP_OID),)))
    assert ids.source == f"PAT001^^^&{HOSP_OID}&ISO"
    # no OID known for the local issuer: refused, no invented issuer OID in sourcePatientId
    with pytest.raises(PatientNotPublishable, match=r'no issuer OID is invented.*\[xds.issuer_oids\] "HOSP"'):
        patient_ids(snap(), XdsSettings(patient_ids=(row,)))
    ids = patient_ids(snap(), XdsSettings(patient_ids=(row,), source_patient_authority=HOSP_OID))
    assert ids.source == f"PAT001^^^&{HOSP_OID}&ISO"


def test_an_exact_issuer_row_wins_and_conflicting_rows_are_refused() -> None:
    wildcard = PatientIdMapping("PAT001", "", "IHERED-1", AFFINITY)
    exact = PatientIdMapping("PAT001", "HOSP", "IHERED-2", AFFINITY)
    x = XdsSettings(patient_ids=(wildcard, exact), issuer_oids={"HOSP": HOSP_OID})
    assert patient_ids(snap(), x).affinity == f"IHERED-2^^^&{AFFINITY}&ISO"
    assert patient_ids(snap(issuer="ELSEWHERE"), replace(x, source_patient_authority=HOSP_OID)).affinity == f"IHERED-1^^^&{AFFINITY}&ISO"
    twice = replace(x, patient_ids=(exact, replace(exact, affinity_id="IHERED-3")))
    with pytest.raises(PatientNotPublishable, match="2 different rows"):
        patient_ids(snap(), twice)


def test_local_authority_policy() -> None:
    x = XdsSettings(unmapped_patients="local-authority")
    ids = patient_ids(snap(), x)
    assert not ids.mapped and ids.affinity == ids.source == f"PAT001^^^&{AFFINITY}&ISO"
    assert patient_ids(snap(issuer=AFFINITY), x).affinity == f"PAT001^^^&{AFFINITY}&ISO"
    # an issuer known to be another domain: its local ID is not an affinity-domain ID, even under local-authority
    with pytest.raises(PatientNotPublishable, match=f"its issuer is {HOSP_OID}, not the affinity domain"):
        patient_ids(snap(), replace(x, issuer_oids={"HOSP": HOSP_OID}))
    with pytest.raises(PatientNotPublishable, match="not the affinity domain"):
        patient_ids(snap(issuer=HOSP_OID), x)


def test_metadata_is_not_built_without_our_identifiers() -> None:
    """A bare XdsSettings() has no identifiers (Archive.open fills them): no sourceId-less submission is built."""
    from datetime import datetime, timezone

    from xdsi.xds.codes import CodeTable
    from xdsi.xds.metadata import DocumentInfo, MetadataError, build_submission, new_entry_uuid, oid_uid

    doc = DocumentInfo("1.2.3.4.9", new_entry_uuid(), 10, "0" * 40, datetime.now(timezone.utc))
    x = XdsSettings(unmapped_patients="local-authority")
    with pytest.raises(MetadataError, match="source_id, repository_unique_id, accession_authority not set"):
        build_submission(snap(), doc, x, CodeTable.load(), submission_set_uid=oid_uid(), include_repository=True)
    ids = {"source_id": "1.2.3.1", "repository_unique_id": "1.2.3.2", "accession_authority": "1.2.3.3"}
    sub = build_submission(snap(), doc, replace(x, **ids), CodeTable.load(), submission_set_uid=oid_uid(), include_repository=True)
    assert sub.patient_id == f"PAT001^^^&{AFFINITY}&ISO"
