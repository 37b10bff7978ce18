"""C-FIND identifiers encoded straight from index rows are pydicom's own bytes; aggregates stay true.

``QueryService.find_encoded`` (what C-FIND sends) must put on the wire exactly what pydicom writes
for the Dataset ``QueryService.find`` yields (what QIDO-RS and the Dataset path answer), for every
level and model, every key the index answers, keys it does not, non-ASCII values and both little
endian syntaxes.  The study/series counts are columns kept in step at ingest, replace and delete
(migration 0004 fills them for existing rows): after each of those they must equal a count of
the instance rows.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from pydicom.dataset import Dataset
from pynetdicom.dsutils import encode
from sqlalchemy import func, select, text

from tests.conftest import make_settings
from xdsi.archive import Archive
from xdsi.archive.store import Outcome
from xdsi.index.db import make_engine, upgrade
from xdsi.index.models import Instance, Series, Study
from xdsi.tools.synth import StudySpec, ct_instance
from xdsi.uids import new_uid


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def archive(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    tmp = tmp_path_factory.mktemp(f"encoded-{request.param}")
    if request.param == "sqlite":
        url = f"sqlite:///{tmp / 'index.sqlite'}"
    else:
        url = request.getfixturevalue("postgres").create_database(f"e_{uuid.uuid4().hex[:12]}")
    a = Archive.open(make_settings(tmp, url, duplicate_policy="replace"))
    try:
        yield a
    finally:
        a.close()


def store(archive: Archive, folder: Path, spec: StudySpec, series_uid: str, number: int, modality: str = "CT",
          sop_uid: str | None = None, **extra: Any) -> str:
    ds = ct_instance(spec, series_uid, number, rows=8, columns=8, series_number=number)
    ds.Modality = modality
    if sop_uid:
        ds.SOPInstanceUID = sop_uid
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    for k, v in extra.items():
        setattr(ds, k, v)
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / f"{ds.SOPInstanceUID}-{uuid.uuid4().hex[:6]}.dcm"
    ds.save_as(p, enforce_file_format=True)
    r = archive.store.store_file(p)
    assert r.outcome in (Outcome.STORED, Outcome.REPLACED), r.reason
    return str(ds.SOPInstanceUID)


def load_studies(archive: Archive, folder: Path, *, b_name: str = "MÜLLER^ANNA", c_description: str = "odd") -> None:
    """Three patients' studies: PA (a CT series of 3 and an MR of 1, procedure code), PB (one SR, non-ASCII
    name, description and referring physician, empty dates), PC (one CT).  Also the QIDO row tests' corpus
    (tests/unit/test_qido_rows.py), which gives PB a name with ideographic groups and PC a two-valued text."""
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "CTCHEST", "99X", "CT chest"
    a = StudySpec(patient_id="PA", patient_name="DOE^JANE", birth_date="19700101", sex="F", study_date="20240115",
                  study_time="101500", accession="ACC1", description="CT CHEST")
    for n, (mod, k) in enumerate([("CT", 3), ("MR", 1)], start=1):
        se = new_uid()
        for _ in range(k):
            store(archive, folder, a, se, n, mod, ProcedureCodeSequence=[code])
    b = StudySpec(patient_id="PB", patient_name=b_name, birth_date="", sex="", study_date="", study_time="0830",
                  accession="", description="ÉTUDE")
    store(archive, folder, b, new_uid(), 1, "SR", ReferringPhysicianName="çelik^özge")
    c = StudySpec(patient_id="PC", patient_name="ROE^RI", birth_date="19900909", sex="M", study_date="20240301",
                  study_time="0900", accession="ACC3", description=c_description)
    store(archive, folder, c, new_uid(), 1, "CT")


@pytest.fixture(scope="module")
def loaded(archive: Archive, tmp_path_factory: pytest.TempPathFactory) -> Archive:
    load_studies(archive, tmp_path_factory.mktemp("in"))
    return archive


STUDY_KEYS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "AccessionNumber",
              "StudyID", "StudyDescription", "ReferringPhysicianName", "ModalitiesInStudy", "StudyInstanceUID",
              "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "IssuerOfPatientID")


def identifier(level: str, keys: tuple[str, ...], **match: Any) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for kw in keys:
        setattr(ds, kw, None)
    for kw, v in match.items():
        setattr(ds, kw, v)
    return ds


def queries() -> list[tuple[str, Dataset]]:
    ident = identifier
    out = [
        ("STUDY", ident("STUDY", STUDY_KEYS)),
        ("STUDY", ident("STUDY", STUDY_KEYS, PatientName="M*")),
        ("STUDY", ident("STUDY", STUDY_KEYS + ("InstanceAvailability", "ProcedureCodeSequence", "OtherPatientIDs",
                                                "SOPInstanceUID", "ImageComments"))),
        ("STUDY", ident("STUDY", ("StudyInstanceUID",), PatientID="PA")),
        ("STUDY", ident("SERIES", ("Modality", "SeriesNumber", "SeriesDescription", "BodyPartExamined", "SeriesDate",
                                   "SeriesTime", "NumberOfSeriesRelatedInstances", "StudyInstanceUID", "SeriesInstanceUID",
                                   "PatientName", "InstitutionName", "StationName", "NumberOfStudyRelatedInstances"))),
        ("STUDY", ident("IMAGE", ("SOPInstanceUID", "SOPClassUID", "InstanceNumber", "Rows", "Columns", "NumberOfFrames",
                                  "ContentDate", "ContentTime", "AvailableTransferSyntaxUID", "InstanceAvailability",
                                  "PatientName", "Modality"))),
        ("PATIENT", ident("PATIENT", ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                                      "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                                      "NumberOfPatientRelatedInstances"))),
        ("PATIENT", ident("STUDY", ("StudyInstanceUID", "StudyDate", "NumberOfPatientRelatedInstances"), PatientID="PB")),
    ]
    return out


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "explicit"])
@pytest.mark.parametrize("case", range(len(queries())))
def test_encoded_identifiers_are_pydicoms_bytes(loaded: Archive, case: int, implicit: bool) -> None:
    model, ds = queries()[case]
    datasets = list(loaded.query.find(ds, model=model))
    encoded = list(loaded.query.find_encoded(ds, model=model, implicit_vr=implicit))
    assert datasets, "every query of this test matches something"
    assert encoded == [encode(d, implicit, True) for d in datasets]


def test_non_ascii_response_carries_utf8_character_set(loaded: Archive) -> None:
    ds = identifier("STUDY", STUDY_KEYS, PatientID="PB")
    (raw,) = loaded.query.find_encoded(ds, implicit_vr=False)
    assert raw.startswith(b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 192")
    assert "MÜLLER^ANNA".encode() in raw and "ÉTUDE".encode() in raw


def test_counts_are_the_rows_after_ingest(loaded: Archive) -> None:
    _assert_aggregates_true(loaded)
    ds = identifier("STUDY", ("NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"), PatientID="PA")
    (r,) = loaded.query.find(ds)
    assert (int(r.NumberOfStudyRelatedSeries), int(r.NumberOfStudyRelatedInstances)) == (2, 4)


def _assert_aggregates_true(archive: Archive) -> None:
    with archive.index.read_session() as s:
        for pk, n in s.execute(select(Series.pk, Series.num_instances)).all():
            assert n == s.scalar(select(func.count()).select_from(Instance).where(Instance.series_fk == pk)), f"series {pk}"
        for pk, ns, ni in s.execute(select(Study.pk, Study.num_series, Study.num_instances)).all():
            real_series = s.scalar(select(func.count()).select_from(Series).where(Series.study_fk == pk))
            real_instances = s.scalar(
                select(func.count()).select_from(Instance).join(Series, Instance.series_fk == Series.pk).where(Series.study_fk == pk)
            )
            assert (ns, ni) == (real_series, real_instances), f"study {pk}"


def test_counts_follow_replace_and_delete(archive: Archive, tmp_path: Path) -> None:
    spec = StudySpec(patient_id="PD", patient_name="DEL^ME", birth_date="", sex="", study_date="20200101",
                     study_time="1200", accession="ACCD", description="D")
    s1, s2 = new_uid(), new_uid()
    sops = [store(archive, tmp_path, spec, s1, 1) for _ in range(3)] + [store(archive, tmp_path, spec, s2, 2)]
    _assert_aggregates_true(archive)
    # the same SOP Instance UID again, now in the second series (duplicate_policy "replace"): it moves
    store(archive, tmp_path, spec, s2, 2, sop_uid=sops[0])
    _assert_aggregates_true(archive)
    # and into a series of its own: a new series of the same study
    store(archive, tmp_path, spec, new_uid(), 3, "MR", sop_uid=sops[1])
    _assert_aggregates_true(archive)
    archive.remove.remove([sops[2]])  # the first series is now empty: pruned
    _assert_aggregates_true(archive)
    archive.remove.remove([sops[3]])
    _assert_aggregates_true(archive)
    ds = identifier("STUDY", ("NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "ModalitiesInStudy"),
                    AccessionNumber="ACCD")
    (r,) = archive.query.find(ds)
    assert (int(r.NumberOfStudyRelatedSeries), int(r.NumberOfStudyRelatedInstances)) == (2, 2)
    assert list(r.ModalitiesInStudy) == ["CT", "MR"]


def test_migration_fills_counts_of_existing_rows(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'old.sqlite'}")
    try:
        upgrade(engine, "0003")
        with engine.begin() as c:
            c.execute(text("INSERT INTO patient (pk, patient_id, issuer_of_patient_id, scope_study_uid, patient_name, "
                           "patient_name_norm, birth_date, sex, created_at) VALUES (1, 'P', '', '', '', '', '', '', CURRENT_TIMESTAMP)"))
            for st in (1, 2):
                c.execute(text("INSERT INTO study (pk, patient_fk, study_uid, study_date, study_time, accession_number, "
                               "accession_issuer, study_id, study_description, referring_physician, procedure_code_value, "
                               "procedure_code_scheme, procedure_code_meaning, modalities, created_at, updated_at) "
                               f"VALUES ({st}, 1, '1.2.{st}', '', '', '', '', '', '', '', '', '', '', '', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))
            for se, st in ((1, 1), (2, 1), (3, 2)):
                c.execute(text("INSERT INTO series (pk, study_fk, series_uid, modality, series_description, body_part, "
                               "series_date, series_time, institution_name, station_name, created_at) "
                               f"VALUES ({se}, {st}, '1.3.{se}', 'CT', '', '', '', '', '', '', CURRENT_TIMESTAMP)"))
            for i, se in enumerate((1, 1, 1, 2, 3, 3), start=1):
                c.execute(text("INSERT INTO instance (pk, series_fk, sop_instance_uid, sop_class_uid, transfer_syntax_uid, "
                               "content_date, content_time, source_ae_title, created_at) "
                               f"VALUES ({i}, {se}, '1.4.{i}', '1.2.840.10008.5.1.4.1.1.2', '1.2.840.10008.1.2.1', '', '', '', CURRENT_TIMESTAMP)"))
        upgrade(engine)
        with engine.connect() as c:
            assert c.execute(text("SELECT pk, num_instances FROM series ORDER BY pk")).all() == [(1, 3), (2, 1), (3, 2)]
            assert c.execute(text("SELECT pk, num_series, num_instances FROM study ORDER BY pk")).all() == [(1, 2, 4), (2, 1, 2)]
    finally:
        engine.dispose()
