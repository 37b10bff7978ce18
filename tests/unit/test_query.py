"""C-FIND matching (PS3.4 C.2.2.2) at service level, on SQLite and PostgreSQL.

A small archive with deliberately awkward data (``%`` and ``_`` in IDs, a
non-ASCII name, an empty study date, a study with two modalities) is queried
with real pydicom identifiers at every level of both information models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from xdsi.archive import Archive
from xdsi.archive.query import QueryError
from xdsi.archive.store import Outcome
from xdsi.tools.synth import StudySpec, ct_instance
from xdsi.uids import new_uid


@dataclass
class Data:
    """UIDs of what was stored, for assertions."""

    study: dict[str, str]  # label -> Study Instance UID
    series: dict[str, list[str]]  # label -> Series Instance UIDs in order stored
    sops: dict[str, list[str]]  # series uid -> SOP Instance UIDs


def _store(archive: Archive, tmp: Path, spec: StudySpec, modality: str, n: int, series_number: int, **extra: Any) -> tuple[str, list[str]]:
    series_uid = new_uid()
    sops = []
    for i in range(n):
        ds = ct_instance(spec, series_uid, i + 1, rows=8, columns=8, series_number=series_number)
        ds.Modality = modality
        for k, v in extra.items():
            setattr(ds, k, v)
        p = tmp / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(p, enforce_file_format=True)
        r = archive.store.store_file(p)
        assert r.outcome is Outcome.STORED, r.reason
        sops.append(ds.SOPInstanceUID)
    return series_uid, sops


@pytest.fixture
def data(archive: Archive, tmp_path: Path) -> Data:
    tmp = tmp_path / "in"
    tmp.mkdir()
    d = Data(study={}, series={}, sops={})

    def add(label: str, spec: StudySpec, series: list[tuple[str, int]], **extra: Any) -> None:
        d.study[label] = spec.study_uid
        d.series[label] = []
        for number, (modality, n) in enumerate(series, start=1):
            se, sops = _store(archive, tmp, spec, modality, n, number, **extra)
            d.series[label].append(se)
            d.sops[se] = sops

    p1 = dict(patient_id="PAT_1", patient_name="DOE^JANE", birth_date="19700101", sex="F")
    add("A", StudySpec(**p1, study_date="20240115", study_time="101500", accession="ACC001", description="CT CHEST"),
        [("CT", 2), ("CT", 2), ("MR", 1)])
    add("B", StudySpec(**p1, study_date="20240220", study_time="140000", accession="ACC002", description="CT HEAD"),
        [("CT", 1)])
    add("C", StudySpec(patient_id="PATX1", patient_name="DOEMAN^JOHN", birth_date="19550505", sex="M",
                       study_date="20231231", study_time="235959", accession="ACC_3", description="MR KNEE"),
        [("MR", 2)], ReferringPhysicianName="JONES^MARY")
    add("D", StudySpec(patient_id="100%", patient_name="MÜLLER^ANNA", birth_date="19800808", sex="F",
                       study_date="", study_time="083000", accession="ACC%4", description="SR NOTE"),
        [("SR", 1)], ReferringPhysicianName="çelik^özge")
    add("E", StudySpec(patient_id="100X", patient_name="ROE^RICHARD", birth_date="19900909", sex="M",
                       study_date="20240301", study_time="0900", accession="ACCX4", description="ct chest"),
        [("CT", 1)])
    return d


def q(level: str, **keys: Any) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def find(archive: Archive, level: str, model: str = "STUDY", **keys: Any) -> list[Dataset]:
    return list(archive.query.find(q(level, **keys), model=model))


def studies(archive: Archive, data: Data, **keys: Any) -> set[str]:
    """Labels of the studies a Study Root STUDY-level query returns."""
    by_uid = {v: k for k, v in data.study.items()}
    return {by_uid[r.StudyInstanceUID] for r in find(archive, "STUDY", **keys)}


def keywords(ds: Dataset) -> set[str]:
    return {e.keyword for e in ds}


# -- single value, wildcards, literal % and _ ---------------------------------------------------


def test_single_value_is_exact_and_case_sensitive(archive: Archive, data: Data) -> None:
    assert studies(archive, data, AccessionNumber="ACC001") == {"A"}
    assert studies(archive, data, AccessionNumber="acc001") == set()
    assert studies(archive, data, StudyDescription="CT CHEST") == {"A"}  # not the lower-case "ct chest"
    # trailing padding is not significant
    assert studies(archive, data, AccessionNumber="ACC002 ") == {"B"}


def test_wildcards(archive: Archive, data: Data) -> None:
    assert studies(archive, data, AccessionNumber="ACC00*") == {"A", "B"}
    assert studies(archive, data, AccessionNumber="ACC00?") == {"A", "B"}
    assert studies(archive, data, AccessionNumber="?CC*") == {"A", "B", "C", "D", "E"}
    assert studies(archive, data, AccessionNumber="ACC?") == set()
    assert studies(archive, data, StudyDescription="*CHEST") == {"A"}
    assert studies(archive, data, AccessionNumber="*") == {"A", "B", "C", "D", "E"}  # universal


def test_wildcard_matching_is_case_sensitive_except_pn(archive: Archive, data: Data) -> None:
    # PS3.4 C.2.2.2.4: case sensitive for every VR but PN (SQLite's LIKE is not, by default)
    assert studies(archive, data, StudyDescription="ct*") == {"E"}
    assert studies(archive, data, StudyDescription="CT*") == {"A", "B"}
    assert studies(archive, data, AccessionNumber="acc*") == set()
    assert studies(archive, data, PatientName="doe*") == {"A", "B", "C"}


def test_percent_and_underscore_in_data_are_literal(archive: Archive, data: Data) -> None:
    pids = lambda **k: {r.PatientID for r in find(archive, "PATIENT", "PATIENT", **k)}  # noqa: E731
    assert pids(PatientID="PAT_1") == {"PAT_1"}  # not PATX1
    assert pids(PatientID="PAT_*") == {"PAT_1"}
    assert pids(PatientID="PAT?1") == {"PAT_1", "PATX1"}
    assert pids(PatientID="100%") == {"100%"}  # not 100X
    assert pids(PatientID="100%*") == {"100%"}
    assert pids(PatientID="100*") == {"100%", "100X"}
    assert pids(PatientID="%") == set()
    assert pids(PatientID="_*") == set()
    assert studies(archive, data, AccessionNumber="ACC%?") == {"D"}
    assert studies(archive, data, AccessionNumber="ACC_*") == {"C"}


# -- PN ------------------------------------------------------------------------------------------


def test_person_name_matching(archive: Archive, data: Data) -> None:
    names = lambda v: {str(r.PatientName) for r in find(archive, "PATIENT", "PATIENT", PatientName=v)}  # noqa: E731
    assert names("DOE^JANE") == {"DOE^JANE"}
    assert names("doe^jane") == {"DOE^JANE"}
    assert names("doe") == {"DOE^JANE"}  # family name alone; not DOEMAN
    assert names("DOE*") == {"DOE^JANE", "DOEMAN^JOHN"}
    assert names("*john") == {"DOEMAN^JOHN"}
    assert names("d?e^jane") == {"DOE^JANE"}
    assert names("müller") == {"MÜLLER^ANNA"}  # case folding beyond ASCII
    assert names("MÜL*") == {"MÜLLER^ANNA"}
    assert names("SMITH") == set()
    assert studies(archive, data, ReferringPhysicianName="jones") == {"C"}
    assert studies(archive, data, ReferringPhysicianName="SMITH^*") == {"A", "B", "E"}
    assert studies(archive, data, ReferringPhysicianName="ÇELIK") == {"D"}  # case folding beyond ASCII, both backends
    assert studies(archive, data, ReferringPhysicianName="*ÖZGE") == {"D"}


def test_non_ascii_result_declares_character_set(archive: Archive, data: Data) -> None:
    [r] = find(archive, "PATIENT", "PATIENT", PatientID="100%", PatientName="")
    assert r.PatientName == "MÜLLER^ANNA"
    assert r.SpecificCharacterSet == "ISO_IR 192"
    [r] = find(archive, "PATIENT", "PATIENT", PatientID="PAT_1", PatientName="")
    assert "SpecificCharacterSet" not in r  # a later ASCII-only response does not inherit it


# -- dates and times -----------------------------------------------------------------------------


def test_date_single_and_ranges(archive: Archive, data: Data) -> None:
    assert studies(archive, data, StudyDate="20240115") == {"A"}
    assert studies(archive, data, StudyDate="20240101-20240131") == {"A"}
    assert studies(archive, data, StudyDate="20240115-20240220") == {"A", "B"}  # inclusive at both ends
    assert studies(archive, data, StudyDate="-20231231") == {"C"}  # not D, which has no date
    assert studies(archive, data, StudyDate="20240201-") == {"B", "E"}
    assert studies(archive, data, StudyDate="") == {"A", "B", "C", "D", "E"}
    assert studies(archive, data, StudyDate="20250101-") == set()
    pats = {r.PatientID for r in find(archive, "PATIENT", "PATIENT", PatientBirthDate="19600101-19851231")}
    assert pats == {"PAT_1", "100%"}


def test_time_single_and_ranges(archive: Archive, data: Data) -> None:
    assert studies(archive, data, StudyTime="101500") == {"A"}
    assert studies(archive, data, StudyTime="1015") == {"A"}  # coarser precision
    assert studies(archive, data, StudyTime="1000-1100") == {"A"}
    assert studies(archive, data, StudyTime="2300-") == {"C"}
    assert studies(archive, data, StudyTime="-0900") == {"D", "E"}  # E's "0900" is 09:00, inside
    assert studies(archive, data, StudyTime="0830-1400") == {"A", "B", "D", "E"}  # inclusive at both ends
    assert studies(archive, data, StudyTime="1400-1400") == {"B"}


def test_date_and_time_together(archive: Archive, data: Data) -> None:
    assert studies(archive, data, StudyDate="20240101-", StudyTime="-1200") == {"A", "E"}


# -- UIDs ----------------------------------------------------------------------------------------


def test_uid_single_and_list(archive: Archive, data: Data) -> None:
    assert studies(archive, data, StudyInstanceUID=data.study["C"]) == {"C"}
    assert studies(archive, data, StudyInstanceUID=[data.study["A"], data.study["C"]]) == {"A", "C"}
    assert studies(archive, data, StudyInstanceUID=new_uid()) == set()


@pytest.mark.parametrize("bad", ["1.2.abc", "1.02.3", "1..2", "1.2.3*", "x" * 10, "1.2.3\\1.2.%"])
def test_invalid_uid_is_a_query_error(archive: Archive, data: Data, bad: str) -> None:
    with pytest.raises(QueryError, match="UID"):
        find(archive, "STUDY", StudyInstanceUID=bad)


def test_invalid_uid_at_image_level(archive: Archive, data: Data) -> None:
    with pytest.raises(QueryError):
        find(archive, "IMAGE", StudyInstanceUID=data.study["A"], SeriesInstanceUID=data.series["A"][0], SOPInstanceUID="../etc")


# -- ModalitiesInStudy ---------------------------------------------------------------------------


def test_modalities_in_study(archive: Archive, data: Data) -> None:
    assert studies(archive, data, ModalitiesInStudy="MR") == {"A", "C"}
    assert studies(archive, data, ModalitiesInStudy="CT") == {"A", "B", "E"}
    assert studies(archive, data, ModalitiesInStudy=["SR", "MR"]) == {"A", "C", "D"}
    assert studies(archive, data, ModalitiesInStudy="XA") == set()
    [a] = find(archive, "STUDY", StudyInstanceUID=data.study["A"], ModalitiesInStudy="MR")
    assert list(a.ModalitiesInStudy) == ["CT", "MR"]  # the study's modalities, not only the matched one


def test_modalities_in_study_at_series_level_keeps_every_series(archive: Archive, data: Data) -> None:
    """A study-level key at SERIES level selects studies; it must not filter the series themselves."""
    rows = find(archive, "SERIES", StudyInstanceUID=data.study["A"], ModalitiesInStudy="MR", Modality="")
    assert sorted(r.Modality for r in rows) == ["CT", "CT", "MR"]


# -- counts and levels ---------------------------------------------------------------------------


def test_patient_level_patient_root_counts_and_keys(archive: Archive, data: Data) -> None:
    [r] = find(
        archive, "PATIENT", "PATIENT", PatientID="PAT_1", PatientName="", PatientSex="",
        NumberOfPatientRelatedStudies=None, NumberOfPatientRelatedSeries=None, NumberOfPatientRelatedInstances=None,
    )
    assert r.PatientName == "DOE^JANE" and r.PatientSex == "F"
    assert (r.NumberOfPatientRelatedStudies, r.NumberOfPatientRelatedSeries, r.NumberOfPatientRelatedInstances) == (2, 4, 6)
    assert keywords(r) == {
        "QueryRetrieveLevel", "RetrieveAETitle", "PatientID", "PatientName", "PatientSex",
        "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries", "NumberOfPatientRelatedInstances",
    }
    assert r.QueryRetrieveLevel == "PATIENT" and r.RetrieveAETitle == archive.settings.ae_title


def test_study_level_counts(archive: Archive, data: Data) -> None:
    rows = find(
        archive, "STUDY", PatientID="PAT_1", NumberOfStudyRelatedSeries=None, NumberOfStudyRelatedInstances=None,
    )
    got = {r.StudyInstanceUID: (r.NumberOfStudyRelatedSeries, r.NumberOfStudyRelatedInstances) for r in rows}
    assert got == {data.study["A"]: (3, 5), data.study["B"]: (1, 1)}


def test_study_root_study_level_returns_only_requested_keys(archive: Archive, data: Data) -> None:
    [r] = find(archive, "STUDY", StudyInstanceUID=data.study["B"], StudyDate="", AccessionNumber="")
    assert keywords(r) == {"QueryRetrieveLevel", "RetrieveAETitle", "StudyInstanceUID", "StudyDate", "AccessionNumber"}
    assert (r.StudyDate, r.AccessionNumber) == ("20240220", "ACC002")


def test_study_root_study_level_patient_keys(archive: Archive, data: Data) -> None:
    rows = find(archive, "STUDY", PatientName="doe^jane", PatientID="", PatientBirthDate="", StudyDescription="")
    assert {r.StudyDescription for r in rows} == {"CT CHEST", "CT HEAD"}
    assert all(r.PatientID == "PAT_1" and r.PatientBirthDate == "19700101" for r in rows)
    assert all(keywords(r) == {
        "QueryRetrieveLevel", "RetrieveAETitle", "StudyInstanceUID", "PatientName", "PatientID",
        "PatientBirthDate", "StudyDescription",
    } for r in rows)


def test_patient_root_study_level(archive: Archive, data: Data) -> None:
    rows = find(archive, "STUDY", "PATIENT", PatientID="PATX1", StudyDate="")
    assert [(r.PatientID, r.StudyInstanceUID, r.StudyDate) for r in rows] == [("PATX1", data.study["C"], "20231231")]
    assert keywords(rows[0]) == {"QueryRetrieveLevel", "RetrieveAETitle", "PatientID", "StudyInstanceUID", "StudyDate"}


@pytest.mark.parametrize("model", ["PATIENT", "STUDY"])
def test_series_level(archive: Archive, data: Data, model: str) -> None:
    keys: dict[str, Any] = dict(StudyInstanceUID=data.study["A"], Modality="CT", SeriesNumber="", NumberOfSeriesRelatedInstances=None)
    if model == "PATIENT":
        keys["PatientID"] = "PAT_1"
    rows = find(archive, "SERIES", model, **keys)
    assert sorted((r.SeriesNumber, r.SeriesInstanceUID, r.NumberOfSeriesRelatedInstances) for r in rows) == [
        (1, data.series["A"][0], 2), (2, data.series["A"][1], 2),
    ]
    expected = {"QueryRetrieveLevel", "RetrieveAETitle", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
                "SeriesNumber", "NumberOfSeriesRelatedInstances"}
    if model == "PATIENT":
        expected.add("PatientID")
    assert all(keywords(r) == expected for r in rows)
    assert [r.SeriesNumber for r in find(archive, "SERIES", model, **{**keys, "SeriesNumber": "2"})] == [2]


@pytest.mark.parametrize("model", ["PATIENT", "STUDY"])
def test_image_level(archive: Archive, data: Data, model: str) -> None:
    se = data.series["A"][1]
    keys: dict[str, Any] = dict(StudyInstanceUID=data.study["A"], SeriesInstanceUID=se, InstanceNumber="", SOPClassUID="")
    if model == "PATIENT":
        keys["PatientID"] = "PAT_1"
    rows = find(archive, "IMAGE", model, **keys)
    assert sorted((r.InstanceNumber, r.SOPInstanceUID) for r in rows) == [(1, data.sops[se][0]), (2, data.sops[se][1])]
    assert all(r.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" for r in rows)
    expected = {"QueryRetrieveLevel", "RetrieveAETitle", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                "InstanceNumber", "SOPClassUID"}
    if model == "PATIENT":
        expected.add("PatientID")
    assert all(keywords(r) == expected for r in rows)
    # list of SOP Instance UIDs, across series
    other = data.sops[data.series["A"][0]][0]
    rows = find(archive, "IMAGE", model, **{**keys, "SeriesInstanceUID": "", "SOPInstanceUID": [data.sops[se][1], other]})
    assert {r.SOPInstanceUID for r in rows} == {data.sops[se][1], other}


# -- bad requests --------------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["", "FOO", "INSTANCE", "STUDY\\SERIES"])
def test_invalid_level_is_a_query_error(archive: Archive, data: Data, level: str) -> None:
    with pytest.raises(QueryError, match="QueryRetrieveLevel"):
        find(archive, level, PatientID="PAT_1")


def test_missing_level_is_a_query_error(archive: Archive, data: Data) -> None:
    ds = Dataset()
    ds.PatientID = "PAT_1"
    with pytest.raises(QueryError):
        list(archive.query.find(ds, model="STUDY"))


def test_patient_level_is_not_in_study_root(archive: Archive, data: Data) -> None:
    with pytest.raises(QueryError):
        find(archive, "PATIENT", "STUDY", PatientID="PAT_1")


def test_undecodable_key_is_a_query_error(archive: Archive, data: Data) -> None:
    """As received over the network: raw bytes that pydicom can only decode when they are read."""
    ds = q("SERIES", StudyInstanceUID=data.study["A"])
    tag = Tag("SeriesNumber")
    ds[tag] = RawDataElement(tag, "IS", 2, b"1*", 0, True, True)
    with pytest.raises(QueryError, match="SeriesNumber"):
        list(archive.query.find(ds, model="STUDY"))


def test_higher_level_counts_at_lower_levels_count_the_whole_entity(archive: Archive, data: Data) -> None:
    rows = find(archive, "SERIES", StudyInstanceUID=data.study["A"], NumberOfStudyRelatedInstances=None,
                NumberOfStudyRelatedSeries=None, NumberOfSeriesRelatedInstances=None)
    assert sorted((r.NumberOfStudyRelatedSeries, r.NumberOfStudyRelatedInstances, r.NumberOfSeriesRelatedInstances)
                  for r in rows) == [(3, 5, 1), (3, 5, 2), (3, 5, 2)]
    rows = find(archive, "STUDY", PatientID="PAT_1", NumberOfPatientRelatedStudies=None, NumberOfPatientRelatedInstances=None)
    assert [(r.NumberOfPatientRelatedStudies, r.NumberOfPatientRelatedInstances) for r in rows] == [(2, 6), (2, 6)]
