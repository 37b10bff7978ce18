"""Index fidelity (issue 8, item 6) on SQLite and PostgreSQL.

* ACR-NEMA dates and times (``1997.04.24``, ``14:04:38``) are matched and answered in
  their DICOM form while the stored file stays byte-identical (pydicom's own
  ExplVR_BigEnd.dcm carries them, and a synthetic copy of a CT sets them everywhere).
* Studies without a Patient ID are never merged into one patient, and every patient
  attribute a study/series/image answer carries is that study's own.
* Values are stored whole: a maximal LO and a three-group PN round-trip unchanged, an
  over-long LO is kept, an absurd indexed value is refused with a reason.
* Migration 0003 upgrades an index written by 0002 without losing a row.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from sqlalchemy import inspect, select, text

from tests.conftest import make_settings
from xdsi.archive import Archive
from xdsi.archive.header import MAX_INDEXED_CHARS, normalize_da, normalize_tm
from xdsi.archive.store import Outcome
from xdsi.index.db import make_engine, upgrade
from xdsi.index.models import FileCopy, Instance, Patient, Study
from xdsi.tools.synth import StudySpec, ct_instance
from xdsi.uids import new_uid

LO_64 = "L" * 30 + " " + "O" * 33  # 64 characters, the LO maximum
PN_MAX = "=".join(
    [
        "A" * 31 + "^" + "B" * 32,  # each component group 64 characters (PS3.5 Table 6.2-1)
        "山" * 31 + "^" + "田" * 32,
        "や" * 31 + "^" + "ま" * 32,
    ]
)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def archive(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    """One archive per backend for the whole module: tests use studies of their own."""
    tmp = tmp_path_factory.mktemp(f"fidelity-{request.param}")
    if request.param == "sqlite":
        url = f"sqlite:///{tmp / 'index.sqlite'}"
    else:
        url = request.getfixturevalue("postgres").create_database(f"f_{uuid.uuid4().hex[:12]}")
    a = Archive.open(make_settings(tmp, url))
    try:
        yield a
    finally:
        a.close()


def _store_ds(archive: Archive, ds: Dataset, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(p, enforce_file_format=True)
    r = archive.store.store_file(p)
    assert r.outcome is Outcome.STORED, r.reason
    return p


def _instance(spec: StudySpec, **attrs: Any) -> Dataset:
    ds = ct_instance(spec, new_uid(), 1, rows=4, columns=4)
    for k, v in attrs.items():
        if v is None:
            delattr(ds, k)
        else:
            setattr(ds, k, v)
    return ds


def find(archive: Archive, level: str, model: str = "STUDY", **keys: Any) -> list[Dataset]:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(ds, k, v)
    return list(archive.query.find(ds, model=model))


def stored_bytes(archive: Archive, sop_uid: str) -> bytes:
    with archive.index.read_session() as s:
        c = s.scalars(select(FileCopy).join(Instance, FileCopy.instance_fk == Instance.pk).where(Instance.sop_instance_uid == sop_uid)).one()
        return archive.tiers[c.tier].abspath(c.rel_path).read_bytes()


# -- DA / TM -----------------------------------------------------------------------------------


def test_normalisers() -> None:
    assert normalize_da("1997.04.24") == "19970424"
    assert normalize_da("19970424") == "19970424"
    assert normalize_da(" 1997.04.24 ") == "19970424"
    assert normalize_da("24.04.1997") == "24.04.1997"  # not guessed at, kept whole
    assert normalize_tm("14:04:38") == "140438"
    assert normalize_tm("14:04") == "1404"
    assert normalize_tm("14:04:38.123456") == "140438.123456"
    assert normalize_tm("140438.12") == "140438.12"
    assert normalize_tm("14:4") == "14:4"  # not a legacy form: kept


def test_acr_nema_file_matches_and_stays_byte_identical(archive: Archive, tmp_path: Path) -> None:
    """pydicom's big-endian test file (written by an old modality) has StudyDate 1997.04.24, StudyTime 14:04:38."""
    src = Path(get_testdata_file("ExplVR_BigEnd.dcm"))
    raw = dcmread(src, stop_before_pixels=True)
    assert raw.StudyDate == "1997.04.24" and raw.StudyTime == "14:04:38"  # the premise
    f = tmp_path / "legacy.dcm"
    shutil.copyfile(src, f)
    assert archive.store.store_file(f).outcome is Outcome.STORED
    uid = raw.StudyInstanceUID

    for keys in (
        dict(StudyDate="19970424"),
        dict(StudyDate="19970101-19971231"),
        dict(StudyDate="19970424-"),
        dict(StudyDate="-19970424"),
        dict(StudyDate="1997.04.24"),  # a legacy-form key matches too
        dict(StudyTime="140438"),
        dict(StudyTime="1400-1500"),
        dict(StudyTime="14:04:38"),
        dict(StudyDate="19970424", StudyTime="1404-"),
    ):
        found = [r for r in find(archive, "STUDY", StudyInstanceUID="", **keys) if r.StudyInstanceUID == uid]
        assert len(found) == 1, keys
    for keys in (dict(StudyDate="19970425"), dict(StudyDate="19980101-"), dict(StudyTime="1405-1500")):
        assert [r for r in find(archive, "STUDY", **keys) if r.StudyInstanceUID == uid] == [], keys

    (answer,) = find(archive, "STUDY", StudyInstanceUID=uid, StudyDate="", StudyTime="")
    assert answer.StudyDate == "19970424"
    assert answer.StudyTime == "140438"
    assert stored_bytes(archive, raw.SOPInstanceUID) == src.read_bytes()


def test_legacy_forms_at_every_level(archive: Archive, tmp_path: Path) -> None:
    spec = StudySpec(patient_id=f"LEG-{uuid.uuid4().hex[:6]}", study_date="1997.04.24", study_time="14:04:38.5")
    ds = _instance(spec, PatientBirthDate="1950.12.01", SeriesDate="1997.04.24", SeriesTime="14:05",
                   ContentDate="1997.04.24", ContentTime="14:05:10")
    p = _store_ds(archive, ds, tmp_path)
    (r,) = find(archive, "IMAGE", StudyInstanceUID=spec.study_uid, SeriesInstanceUID=ds.SeriesInstanceUID,
                SOPInstanceUID="", SeriesDate="19970424", SeriesTime="1405", ContentDate="19970101-19971231",
                ContentTime="140510", PatientBirthDate="19501201", StudyTime="")
    assert (r.SeriesDate, r.SeriesTime, r.ContentDate, r.ContentTime) == ("19970424", "1405", "19970424", "140510")
    assert (r.PatientBirthDate, r.StudyTime) == ("19501201", "140438.5")
    (pt,) = find(archive, "PATIENT", "PATIENT", PatientID=spec.patient_id, PatientBirthDate="19500101-19501231")
    assert pt.PatientBirthDate == "19501201"
    assert stored_bytes(archive, ds.SOPInstanceUID) == p.read_bytes()


# -- patient identity ---------------------------------------------------------------------------


def test_studies_without_patient_id_are_separate_patients(archive: Archive, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:6].upper()
    a = StudySpec(patient_id="", patient_name=f"NOID{tag}^ALICE", birth_date="19600101", sex="F")
    b = StudySpec(patient_id="", patient_name=f"NOID{tag}^BOB", birth_date="19700202", sex="M")
    for spec in (a, b):
        for _ in range(2):  # two series each: the second instance must join the same patient
            _store_ds(archive, _instance(spec, PatientID=None, IssuerOfPatientID=None), tmp_path)

    with archive.index.read_session() as s:
        pks = {uid: s.scalar(select(Study.patient_fk).where(Study.study_uid == uid)) for uid in (a.study_uid, b.study_uid)}
    assert pks[a.study_uid] != pks[b.study_uid]

    want = {a.study_uid: a, b.study_uid: b}
    for level in ("STUDY", "SERIES", "IMAGE"):
        answers = find(archive, level, PatientName=f"NOID{tag}*", PatientBirthDate="", PatientSex="", PatientID="",
                       StudyInstanceUID="", SeriesInstanceUID="", SOPInstanceUID="")
        assert len(answers) == (2 if level == "STUDY" else 4), level
        for r in answers:
            spec = want[r.StudyInstanceUID]
            assert (str(r.PatientName), r.PatientBirthDate, r.PatientSex) == (spec.patient_name, spec.birth_date, spec.sex)
            assert not r.PatientID  # empty (pydicom gives None for an empty value)
    # matching picks the right study, never the other one's name
    assert [r.StudyInstanceUID for r in find(archive, "STUDY", PatientName=f"NOID{tag}^BOB")] == [b.study_uid]
    # patient root: two patients, one study each
    pts = find(archive, "PATIENT", "PATIENT", PatientName=f"NOID{tag}*", NumberOfPatientRelatedStudies="")
    assert sorted(str(p.PatientName) for p in pts) == sorted([a.patient_name, b.patient_name])
    assert [p.NumberOfPatientRelatedStudies for p in pts] == [1, 1]


def test_same_patient_id_other_name_keeps_each_studys_own(archive: Archive, tmp_path: Path) -> None:
    pid = f"SAME-{uuid.uuid4().hex[:6]}"
    first = StudySpec(patient_id=pid, patient_name="SMITH^JANE", birth_date="19800101")
    later = StudySpec(patient_id=pid, patient_name="SMITH-JONES^JANE", birth_date="19800101")
    _store_ds(archive, _instance(first), tmp_path)
    _store_ds(archive, _instance(later), tmp_path)

    with archive.index.read_session() as s:
        assert s.scalar(select(Patient.patient_name).where(Patient.patient_id == pid)) == "SMITH^JANE"  # one patient
    by_study = {r.StudyInstanceUID: str(r.PatientName) for r in find(archive, "STUDY", PatientID=pid, PatientName="")}
    assert by_study == {first.study_uid: "SMITH^JANE", later.study_uid: "SMITH-JONES^JANE"}  # nobody renamed
    assert [r.StudyInstanceUID for r in find(archive, "STUDY", PatientName="SMITH-JONES*")] == [later.study_uid]
    (pt,) = find(archive, "PATIENT", "PATIENT", PatientID=pid, PatientName="", NumberOfPatientRelatedStudies="")
    assert (str(pt.PatientName), pt.NumberOfPatientRelatedStudies) == ("SMITH^JANE", 2)


@pytest.mark.parametrize("change", [dict(PatientID="SOMEONE-ELSE"), dict(IssuerOfPatientID="OTHER"), dict(PatientID=None)])
def test_instance_naming_another_patient_is_refused(archive: Archive, tmp_path: Path, change: dict) -> None:
    spec = StudySpec(patient_id=f"OWN-{uuid.uuid4().hex[:6]}")
    _store_ds(archive, _instance(spec), tmp_path)
    ds = _instance(spec, **change)
    p = tmp_path / "other.dcm"
    ds.save_as(p, enforce_file_format=True)
    before = sorted(x for x in archive.tiers.hot.root.rglob("*.dcm"))
    r = archive.store.store_file(p)
    assert r.outcome is Outcome.REJECTED
    assert spec.study_uid in r.reason and "Patient ID" in r.reason
    assert sorted(x for x in archive.tiers.hot.root.rglob("*.dcm")) == before  # nothing left behind
    assert find(archive, "IMAGE", StudyInstanceUID=spec.study_uid, SOPInstanceUID=ds.SOPInstanceUID) == []


def test_instance_without_issuer_joins_the_same_patient_id(archive: Archive, tmp_path: Path) -> None:
    """A presentation state made on a workstation often leaves Issuer of Patient ID out: same ID, issuer not stated."""
    spec = StudySpec(patient_id=f"OWN-{uuid.uuid4().hex[:6]}", issuer="HOSP")
    _store_ds(archive, _instance(spec), tmp_path)
    ds = _instance(spec, IssuerOfPatientID=None)
    p = tmp_path / "no-issuer.dcm"
    ds.save_as(p, enforce_file_format=True)
    assert archive.store.store_file(p).ok
    (r,) = find(archive, "IMAGE", StudyInstanceUID=spec.study_uid, SOPInstanceUID=ds.SOPInstanceUID, IssuerOfPatientID="")
    assert r.IssuerOfPatientID == "HOSP"  # filed under the study's patient
    other = _instance(spec, IssuerOfPatientID="ELSEWHERE")  # a different stated issuer is another patient
    q = tmp_path / "other-issuer.dcm"
    other.save_as(q, enforce_file_format=True)
    assert archive.store.store_file(q).outcome is Outcome.REJECTED


def test_patient_level_retrieve_keeps_issuers_apart(archive: Archive, tmp_path: Path) -> None:
    """C-MOVE/C-GET at PATIENT level: the same Patient ID from two assigning authorities is two people."""
    pid = f"SAME-{uuid.uuid4().hex[:6]}"
    a, b = StudySpec(patient_id=pid, issuer="HOSP-A"), StudySpec(patient_id=pid, issuer="HOSP-B")
    _store_ds(archive, _instance(a), tmp_path)
    _store_ds(archive, _instance(b), tmp_path)
    ident = Dataset()
    ident.QueryRetrieveLevel = "PATIENT"
    ident.PatientID = pid
    ident.IssuerOfPatientID = "HOSP-A"
    assert {r.study_uid for r in archive.retrieve.select_by_identifier(ident)} == {a.study_uid}
    del ident.IssuerOfPatientID  # no issuer named: every patient with that ID, as before
    assert {r.study_uid for r in archive.retrieve.select_by_identifier(ident)} == {a.study_uid, b.study_uid}


def test_study_without_patient_id_refuses_an_instance_with_one(archive: Archive, tmp_path: Path) -> None:
    spec = StudySpec(patient_id="")
    _store_ds(archive, _instance(spec, PatientID=None), tmp_path)
    ds = _instance(spec, PatientID="NOW-KNOWN")
    p = tmp_path / "known.dcm"
    ds.save_as(p, enforce_file_format=True)
    assert archive.store.store_file(p).outcome is Outcome.REJECTED


# -- whole values --------------------------------------------------------------------------------


def test_maximal_values_round_trip_unchanged(archive: Archive, tmp_path: Path) -> None:
    over = "D" * 100  # an LO longer than PS3.5 allows: kept whole, not cut
    spec = StudySpec(patient_id="P" * 64, issuer="I" * 64, patient_name=PN_MAX, accession="A" * 16, description=LO_64)
    ds = _instance(spec, InstitutionName=LO_64, SeriesDescription=over, StationName="S" * 16,
                   ReferringPhysicianName=PN_MAX, StudyID="X" * 16)
    p = _store_ds(archive, ds, tmp_path)
    (r,) = find(archive, "SERIES", StudyInstanceUID=spec.study_uid, SeriesInstanceUID="", PatientID="", IssuerOfPatientID="",
                PatientName="", AccessionNumber="", StudyDescription="", InstitutionName="", SeriesDescription="",
                StationName="", ReferringPhysicianName="", StudyID="")
    assert r.PatientID == "P" * 64 and r.IssuerOfPatientID == "I" * 64
    assert str(r.PatientName) == PN_MAX and str(r.ReferringPhysicianName) == PN_MAX
    assert (r.AccessionNumber, r.StudyDescription, r.InstitutionName) == ("A" * 16, LO_64, LO_64)
    assert (r.SeriesDescription, r.StationName, r.StudyID) == (over, "S" * 16, "X" * 16)
    # and they match as themselves
    assert len(find(archive, "STUDY", PatientName=PN_MAX, StudyDescription=LO_64, PatientID="P" * 64)) == 1
    assert len(find(archive, "STUDY", PatientName="a" * 31 + "*", StudyInstanceUID=spec.study_uid)) == 1
    (pt,) = find(archive, "PATIENT", "PATIENT", PatientID="P" * 64, PatientName="")
    assert str(pt.PatientName) == PN_MAX
    assert stored_bytes(archive, ds.SOPInstanceUID) == p.read_bytes()


def test_absurd_indexed_value_is_refused_clearly(archive: Archive, tmp_path: Path) -> None:
    spec = StudySpec(patient_id=f"LONG-{uuid.uuid4().hex[:6]}", patient_name="N" * (MAX_INDEXED_CHARS + 1))
    ds = _instance(spec)
    p = tmp_path / "long.dcm"
    ds.save_as(p, enforce_file_format=True)
    r = archive.store.store_file(p)
    assert r.outcome is Outcome.REJECTED
    assert "PatientName" in r.reason and str(MAX_INDEXED_CHARS + 1) in r.reason
    assert find(archive, "STUDY", StudyInstanceUID=spec.study_uid) == []


# -- migration 0003 --------------------------------------------------------------------------------


def test_migration_0003_keeps_rows_and_splits_unidentified_patients(index_url: str) -> None:
    engine = make_engine(index_url)
    try:
        upgrade(engine, "0002")
        t0, t1 = "2024-01-01 10:00:00+00:00", "2024-02-01 10:00:00+00:00"
        with engine.begin() as c:
            ins = lambda sql, **kw: c.execute(text(sql), kw)  # noqa: E731
            ins("INSERT INTO patient (pk, patient_id, issuer_of_patient_id, patient_name, patient_name_norm, birth_date, sex, created_at) "
                "VALUES (1, 'P1', 'H', 'DOE^JANE', 'DOE^JANE', '19700101', 'F', :t), "
                "(2, '', '', 'FIRST^FILE', 'FIRST^FILE', '19600101', 'M', :t)", t=t0)
            ins("INSERT INTO study (pk, patient_fk, study_uid, study_date, study_time, accession_number, accession_issuer, study_id, "
                "study_description, referring_physician, procedure_code_value, procedure_code_scheme, procedure_code_meaning, "
                "modalities, created_at, updated_at) VALUES "
                "(1, 1, '1.2.1', '20240101', '14:04:38', 'A1', '', '', 'CT', '', '', '', '', 'CT', :t0, :t0), "
                "(2, 2, '1.2.2', '19970424', '1000', 'A2', '', '', 'MR', '', '', '', '', 'MR', :t0, :t0), "
                "(3, 2, '1.2.3', '19980101', '1100', 'A3', '', '', 'US', '', '', '', '', 'US', :t1, :t1)", t0=t0, t1=t1)
            for st in (1, 2, 3):
                ins("INSERT INTO series (pk, study_fk, series_uid, modality, series_description, body_part, series_date, series_time, "
                    "institution_name, station_name, created_at) VALUES (:p, :p, :u, 'CT', '', '', '', '09:30', '', '', :t)",
                    p=st, u=f"1.3.{st}", t=t0)
                ins("INSERT INTO instance (pk, series_fk, sop_instance_uid, sop_class_uid, transfer_syntax_uid, content_date, "
                    "content_time, source_ae_title, created_at) VALUES (:p, :p, :u, '1.2.840.10008.5.1.4.1.1.2', "
                    "'1.2.840.10008.1.2.1', '', '', '', :t)", p=st, u=f"1.4.{st}", t=t0)
                ins("INSERT INTO file_copy (instance_fk, tier, rel_path, size, sha256, transfer_syntax_uid, stored_at, last_read_at) "
                    "VALUES (:p, 'hot', :r, 10, 'x', '1.2.840.10008.1.2.1', :t, :t)", p=st, r=f"f{st}", t=t0)
            if engine.dialect.name == "postgresql":  # explicit keys above: move the sequences past them
                for table in ("patient", "study", "series", "instance"):
                    c.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'pk'), (SELECT max(pk) FROM {table}))"))
        before = _counts(engine)

        upgrade(engine)

        after = _counts(engine)
        assert after == {**before, "patient": before["patient"] + 1}  # nothing lost; one patient split off
        with engine.connect() as c:
            rows = c.execute(text(
                "SELECT s.study_uid, p.pk, p.patient_id, p.scope_study_uid, p.patient_name, s.patient_name, s.patient_birth_date "
                "FROM study s JOIN patient p ON p.pk = s.patient_fk ORDER BY s.pk")).all()
            by_uid = {r[0]: r[1:] for r in rows}
            assert by_uid["1.2.1"] == (1, "P1", "", "DOE^JANE", "DOE^JANE", "19700101")
            # the study whose instance created the merged row keeps its attributes
            assert by_uid["1.2.2"] == (2, "", "1.2.2", "FIRST^FILE", "FIRST^FILE", "19600101")
            # the other one gets a patient of its own and no name rather than another person's
            pk3 = by_uid["1.2.3"][0]
            assert pk3 not in (1, 2) and by_uid["1.2.3"][1:] == ("", "1.2.3", "", "", "")
            times = c.execute(text("SELECT study_time FROM study ORDER BY pk")).scalars().all()
            assert times == ["140438", "1000", "1100"]
            assert set(c.execute(text("SELECT series_time FROM series")).scalars().all()) == {"0930"}
            if engine.dialect.name == "sqlite":
                assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1  # restored after the migration
        types = {col["name"]: col["type"].__class__.__name__ for col in inspect(engine).get_columns("study")}
        assert types["study_date"].upper() == "TEXT" and types["accession_number"].upper() == "TEXT"
    finally:
        engine.dispose()


def _counts(engine) -> dict[str, int]:  # type: ignore[no-untyped-def]
    with engine.connect() as c:
        return {t: c.execute(text(f"SELECT count(*) FROM {t}")).scalar() for t in ("patient", "study", "series", "instance", "file_copy")}
