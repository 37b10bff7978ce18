"""QIDO-RS results encoded as DICOM JSON straight from index rows equal pydicom's JSON of the Dataset path.

``JsonRowEncoder`` (what QIDO-RS answers) must give, for every match, exactly ``result_json`` of the Dataset
``QueryService.find`` yields for it: every level, every key the index answers and keys it does not, names
and descriptions in UTF-8, multi-valued attributes, counts, limit/offset and fuzzy matching.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import pytest
from pydicom.dataset import Dataset

from tests.conftest import make_settings
from tests.unit.test_query_encoded import STUDY_KEYS, identifier, load_studies, queries
from xdsi.archive import Archive
from xdsi.web.qido import JsonRowEncoder, result_json, uid_of


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    tmp = tmp_path_factory.mktemp("qido-rows")
    archive = Archive.open(make_settings(tmp, f"sqlite:///{tmp / 'index.sqlite'}"))
    load_studies(archive, tmp / "in", b_name="MÜLLER^ANNA=ミュラー^アンナ", c_description="odd\\two")
    try:
        yield archive
    finally:
        archive.close()


def url(d: dict) -> str:  # type: ignore[type-arg]
    return "http://x/studies/" + uid_of(d, "0020000D")


def both(archive: Archive, ds: Dataset, model: str = "STUDY", **kw: Any) -> tuple[list[dict], list[dict]]:  # type: ignore[type-arg]
    datasets = list(archive.query.find(ds, model, **kw))
    expected = [result_json(d, "http://x/studies/" + str(d.StudyInstanceUID)) for d in datasets]
    fields, rows = archive.query.find_rows(ds, model, **kw)
    encoder = JsonRowEncoder(fields)
    got = [encoder.encode(r, url) for r in rows]
    return got, expected


@pytest.mark.parametrize("case", range(len(queries())))
def test_rows_encode_as_pydicoms_json(loaded: Archive, case: int) -> None:
    model, ds = queries()[case]
    if model == "PATIENT":
        pytest.skip("QIDO-RS queries the Study Root model only")
    got, expected = both(loaded, ds, model)
    assert expected, "every query of this test matches something"
    assert got == expected
    # the same text on the wire, in the same key order
    assert [json.dumps(g, ensure_ascii=False) for g in got] == [json.dumps(e, ensure_ascii=False) for e in expected]


@pytest.mark.parametrize("match", [
    {"PatientName": "müller*"}, {"PatientID": "PB"}, {"StudyDescription": "odd*"}, {"ModalitiesInStudy": "MR"},
])
def test_rows_encode_utf8_names_lists_and_matches(loaded: Archive, match: dict[str, str]) -> None:  # type: ignore[type-arg]
    ds = identifier("STUDY", STUDY_KEYS + ("SpecificCharacterSet", "RetrieveURL", "RetrieveAETitle"), **match)
    for kw in ({"fuzzy": True}, {"limit": 1, "offset": 0}, {}):
        got, expected = both(loaded, ds, **kw)
        assert got == expected and [list(g) for g in got] == [list(e) for e in expected]


def test_limit_and_offset(loaded: Archive) -> None:
    ds = identifier("IMAGE", ("SOPInstanceUID", "InstanceNumber"))
    got, expected = both(loaded, ds, limit=2, offset=3)
    assert len(got) == 2 and got == expected
