"""Index fidelity over the wire: dcmtk storescu/findscu and QIDO-RS against a running ``xdsi serve``.

The unit tests (tests/unit/test_index_fidelity.py) cover matching on both backends;
this checks what a real peer and a viewer see: an ACR-NEMA dated object (pydicom's own
ExplVR_BigEnd.dcm, StudyDate 1997.04.24) answered as 19970424, and two studies without
Patient ID each answered with their own name.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from tests.integration.dimse_support import dcmtk_available, storescu
from tests.integration.test_dimse_dcmtk import findscu
from tests.support.server import XdsiProcess
from xdsi.tools.synth import StudySpec, ct_instance
from xdsi.uids import new_uid

pytestmark = pytest.mark.dcmtk

LEGACY = Path(get_testdata_file("ExplVR_BigEnd.dcm"))
NO_ID = [StudySpec(patient_id="", patient_name=n) for n in ("NOIDWIRE^ALICE", "NOIDWIRE^BOB")]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[XdsiProcess]:
    if not dcmtk_available():
        pytest.skip("Debian's dcmtk tools are not installed in /usr/bin")
    tmp = tmp_path_factory.mktemp("wire")
    files = []
    for spec in NO_ID:
        ds = ct_instance(spec, new_uid(), 1, rows=4, columns=4)
        del ds.PatientID
        files.append(tmp / f"{spec.patient_name}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    proc = XdsiProcess(tmp / "data").start()
    try:
        storescu(proc.host, proc.dicom_port, [LEGACY, *files])
        yield proc
    finally:
        proc.stop()


def qido(server: XdsiProcess, query: str) -> list[dict]:
    with urllib.request.urlopen(f"http://{server.host}:{server.http_port}/dicomweb/studies?{query}", timeout=30) as r:
        body = r.read()
    return json.loads(body) if body else []


def test_findscu_matches_and_answers_the_legacy_date(server: XdsiProcess, tmp_path: Path) -> None:
    uid = str(dcmread(LEGACY, stop_before_pixels=True).StudyInstanceUID)
    for i, date in enumerate(("19970424", "19970101-19971231")):
        keys = {"QueryRetrieveLevel": "STUDY", "StudyDate": date, "StudyTime": "", "StudyInstanceUID": ""}
        (r,) = findscu(server, tmp_path / f"r{i}", "-S", keys)
        assert (r.StudyInstanceUID, r.StudyDate, r.StudyTime) == (uid, "19970424", "140438")


def test_qido_matches_and_answers_the_legacy_date(server: XdsiProcess) -> None:
    (study,) = qido(server, "StudyDate=19970101-19971231&includefield=StudyTime")
    assert study["00080020"]["Value"] == ["19970424"]
    assert study["00080030"]["Value"] == ["140438"]


def test_studies_without_patient_id_answer_their_own_name(server: XdsiProcess, tmp_path: Path) -> None:
    for i, spec in enumerate(NO_ID):
        keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": spec.study_uid, "PatientName": "", "PatientID": ""}
        (r,) = findscu(server, tmp_path / f"s{i}", "-S", keys)
        assert str(r.PatientName) == spec.patient_name
    pts = findscu(server, tmp_path / "p", "-P", {"QueryRetrieveLevel": "PATIENT", "PatientName": "NOIDWIRE*", "PatientID": ""})
    assert sorted(str(p.PatientName) for p in pts) == sorted(s.patient_name for s in NO_ID)
    by_uid = {s["0020000D"]["Value"][0]: s["00100010"]["Value"][0]["Alphabetic"] for s in qido(server, "PatientName=NOIDWIRE*")}
    assert by_uid == {s.study_uid: s.patient_name for s in NO_ID}
