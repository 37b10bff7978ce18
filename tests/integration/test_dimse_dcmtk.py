"""xdsi serve against Debian's dcmtk tools: C-ECHO, C-STORE, C-FIND and C-GET as real peers send them."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless

from tests.integration.conftest import load
from tests.integration.dimse_support import (
    NON_ASCII_NAME,
    StudySet,
    cli_status,
    dataset_bytes,
    http_status,
    run,
    tool,
)
from tests.support.server import XdsiProcess

pytestmark = pytest.mark.dcmtk


def test_echo(xdsi_server: XdsiProcess) -> None:
    proc = run([tool("echoscu"), "-v", "-aec", "XDSI", xdsi_server.host, str(xdsi_server.dicom_port)])
    assert "Received Echo Response (Success)" in proc.stdout + proc.stderr


def test_store_study_with_storescu(tmp_path: Path, test_data: StudySet) -> None:
    server = XdsiProcess(tmp_path / "data").start()
    try:
        load(server, test_data)
        st = http_status(server)
        assert (st["patients"], st["studies"], st["series"], st["instances"]) == (2, 2, 5, 12)
        assert st["tiers"]["cache"]["files"] == 12
        stored = {p.stem: p for p in (server.data_dir / "storage").rglob("*.dcm")}
        assert st["tiers"]["cache"]["bytes"] == sum(p.stat().st_size for p in stored.values())
        # every instance is archived as storescu sent it, the JPEG 2000 one included
        for original in test_data.all_files:
            assert dataset_bytes(stored[original.stem]) == dataset_bytes(original), f"{original.name} not stored byte for byte"
    finally:
        server.stop_cleanly()
    fields = cli_status(tmp_path / "data")
    assert (fields["patients"], fields["studies"], fields["series"], fields["instances"]) == ("2", "2", "5", "12")
    # the compressed instance is archived as it was sent: JPEG 2000 lossless, same dataset bytes
    stored = list((tmp_path / "data").rglob(f"{test_data.j2k.stem}.dcm"))
    assert len(stored) == 1
    assert dcmread(stored[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert dataset_bytes(stored[0]) == dataset_bytes(test_data.j2k)


def test_store_reports_in_storescu_log(tmp_path: Path, test_data: StudySet) -> None:
    server = XdsiProcess(tmp_path / "data").start()
    try:
        proc = run([tool("storescu"), "-v", "-aec", "XDSI", server.host, str(server.dicom_port), *map(str, test_data.files_b)])
        log = proc.stdout + proc.stderr
        assert log.count("Received Store Response (Success)") == len(test_data.files_b)
    finally:
        server.stop()


# -- C-FIND -------------------------------------------------------------------------

CONTROL = {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle"}


def findscu(server: XdsiProcess, out: Path, model: str, keys: dict[str, str]) -> list:
    out.mkdir(parents=True, exist_ok=True)
    args = [tool("findscu"), "-v", model, "-aec", "XDSI", "-X", "-od", str(out)]
    for k, v in keys.items():
        args += ["-k", f"{k}={v}"]
    proc = run([*args, server.host, str(server.dicom_port)])
    log = proc.stdout + proc.stderr
    assert "Status: Success" in log or "(Success)" in log, log
    return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


Case = Callable[[StudySet], tuple[str, dict[str, str], str, set[str]]]


def _series_sorted(data: StudySet) -> list[str]:
    by_series = data.series_of(data.spec_a)
    # order by the file order in which the study was written (series 1..3 then the JPEG 2000 series)
    order = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): i for i, p in enumerate(data.all_files)}
    return sorted(by_series, key=lambda s: min(order[u] for u in by_series[s]))


FIND_CASES: dict[str, Case] = {
    "patient-root-patient-single": lambda d: ("-P", {"QueryRetrieveLevel": "PATIENT", "PatientID": "PAT001", "PatientName": "", "PatientSex": ""}, "PatientID", {"PAT001"}),
    "patient-root-patient-question-mark": lambda d: ("-P", {"QueryRetrieveLevel": "PATIENT", "PatientID": "PAT00?"}, "PatientID", {"PAT001", "PAT002"}),
    "patient-root-patient-star-non-ascii": lambda d: (
        "-P",
        {"QueryRetrieveLevel": "PATIENT", "SpecificCharacterSet": "ISO_IR 192", "PatientName": "MÜLLER*", "PatientID": ""},
        "PatientID",
        {"PAT001"},
    ),
    "patient-root-patient-universal": lambda d: ("-P", {"QueryRetrieveLevel": "PATIENT", "PatientID": ""}, "PatientID", {"PAT001", "PAT002"}),
    "patient-root-study": lambda d: ("-P", {"QueryRetrieveLevel": "STUDY", "PatientID": "PAT002", "StudyInstanceUID": "", "StudyDate": ""}, "StudyInstanceUID", {d.spec_b.study_uid}),
    "study-root-study-date-range": lambda d: (
        "-S",
        {"QueryRetrieveLevel": "STUDY", "StudyDate": "20240101-20240131", "StudyInstanceUID": "", "AccessionNumber": ""},
        "StudyInstanceUID",
        {d.spec_a.study_uid},
    ),
    "study-root-study-open-date-range": lambda d: ("-S", {"QueryRetrieveLevel": "STUDY", "StudyDate": "-20231231", "StudyInstanceUID": ""}, "StudyInstanceUID", {d.spec_b.study_uid}),
    "study-root-study-wildcard": lambda d: (
        "-S",
        {"QueryRetrieveLevel": "STUDY", "AccessionNumber": "ACC*", "StudyInstanceUID": "", "ModalitiesInStudy": "", "PatientName": ""},
        "StudyInstanceUID",
        {d.spec_a.study_uid, d.spec_b.study_uid},
    ),
    "study-root-study-uid-list": lambda d: (
        "-S",
        {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": f"{d.spec_a.study_uid}\\{d.spec_b.study_uid}"},
        "StudyInstanceUID",
        {d.spec_a.study_uid, d.spec_b.study_uid},
    ),
    "study-root-study-uid-single": lambda d: ("-S", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": d.spec_b.study_uid, "StudyDescription": ""}, "StudyInstanceUID", {d.spec_b.study_uid}),
    "study-root-series-universal": lambda d: (
        "-S",
        {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": d.spec_a.study_uid, "SeriesInstanceUID": "", "Modality": "", "SeriesNumber": ""},
        "SeriesInstanceUID",
        set(d.series_of(d.spec_a)),
    ),
    "study-root-series-uid-list": lambda d: (
        "-S",
        {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": d.spec_a.study_uid, "SeriesInstanceUID": "\\".join(_series_sorted(d)[:2])},
        "SeriesInstanceUID",
        set(_series_sorted(d)[:2]),
    ),
    "patient-root-series-wildcard": lambda d: (
        "-P",
        {"QueryRetrieveLevel": "SERIES", "PatientID": "PAT001", "StudyInstanceUID": d.spec_a.study_uid, "SeriesInstanceUID": "", "Modality": "C?"},
        "SeriesInstanceUID",
        set(d.series_of(d.spec_a)),
    ),
    "study-root-image-universal": lambda d: (
        "-S",
        {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": d.spec_a.study_uid, "SeriesInstanceUID": _series_sorted(d)[0], "SOPInstanceUID": "", "InstanceNumber": ""},
        "SOPInstanceUID",
        set(d.series_of(d.spec_a)[_series_sorted(d)[0]]),
    ),
    "patient-root-image-single": lambda d: (
        "-P",
        {
            "QueryRetrieveLevel": "IMAGE",
            "PatientID": "PAT001",
            "StudyInstanceUID": d.spec_a.study_uid,
            "SeriesInstanceUID": _series_sorted(d)[3],
            "SOPInstanceUID": d.series_of(d.spec_a)[_series_sorted(d)[3]][0],
            "SOPClassUID": "",
        },
        "SOPInstanceUID",
        {d.j2k.stem},
    ),
    "study-root-image-uid-list": lambda d: (
        "-S",
        {
            "QueryRetrieveLevel": "IMAGE",
            "StudyInstanceUID": d.spec_a.study_uid,
            "SeriesInstanceUID": _series_sorted(d)[1],
            "SOPInstanceUID": "\\".join(d.series_of(d.spec_a)[_series_sorted(d)[1]][:2]),
        },
        "SOPInstanceUID",
        set(d.series_of(d.spec_a)[_series_sorted(d)[1]][:2]),
    ),
}


@pytest.mark.parametrize("case", sorted(FIND_CASES))
def test_find_with_findscu(case: str, loaded_server: XdsiProcess, test_data: StudySet, tmp_path: Path) -> None:
    model, keys, unique, expected = FIND_CASES[case](test_data)
    responses = findscu(loaded_server, tmp_path / "rsp", model, keys)
    assert {str(r.get(unique)) for r in responses} == expected
    assert len(responses) == len(expected)
    requested = set(keys) - CONTROL
    for r in responses:
        returned = {e.keyword for e in r} - CONTROL
        assert returned == requested, f"returned keys {sorted(returned)} != requested {sorted(requested)}"
        assert r.QueryRetrieveLevel == keys["QueryRetrieveLevel"]


def test_find_non_ascii_name_round_trip(loaded_server: XdsiProcess, tmp_path: Path) -> None:
    keys = {"QueryRetrieveLevel": "PATIENT", "SpecificCharacterSet": "ISO_IR 192", "PatientName": NON_ASCII_NAME, "PatientID": ""}
    (r,) = findscu(loaded_server, tmp_path / "rsp", "-P", keys)
    assert r.SpecificCharacterSet == "ISO_IR 192"
    assert str(r.PatientName) == NON_ASCII_NAME
    assert r.PatientID == "PAT001"


# -- C-GET ----------------------------------------------------------------------------


def getscu(server: XdsiProcess, out: Path, keys: dict[str, str], *extra: str) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    args = [tool("getscu"), "-v", "-S", "-aec", "XDSI", "+B", "-od", str(out), *extra]
    for k, v in keys.items():
        args += ["-k", f"{k}={v}"]
    run([*args, server.host, str(server.dicom_port)])
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in out.iterdir() if p.is_file()}


def test_get_with_getscu_is_byte_identical(loaded_server: XdsiProcess, test_data: StudySet, tmp_path: Path) -> None:
    originals = test_data.by_sop()
    got = getscu(loaded_server, tmp_path / "get", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": test_data.spec_a.study_uid})
    assert set(got) == {u for uids in test_data.series_of(test_data.spec_a).values() for u in uids}
    for sop, path in got.items():
        if sop == test_data.j2k.stem:
            continue
        assert dataset_bytes(path) == dataset_bytes(originals[sop]), f"{sop} differs"
    # getscu proposed only uncompressed syntaxes: the JPEG 2000 instance arrives decoded, same pixels
    received = dcmread(got[test_data.j2k.stem])
    assert received.file_meta.TransferSyntaxUID in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    assert np.array_equal(received.pixel_array, dcmread(test_data.j2k).pixel_array)


def test_get_with_getscu_preferring_j2k(loaded_server: XdsiProcess, test_data: StudySet, tmp_path: Path) -> None:
    """getscu +xv proposes JPEG 2000 lossless first for every storage class and we honour its order.

    The stored JPEG 2000 instance goes byte for byte; the uncompressed ones
    arrive re-encoded losslessly, with the same pixel values.
    """
    originals = test_data.by_sop()
    got = getscu(loaded_server, tmp_path / "get", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": test_data.spec_a.study_uid}, "+xv")
    assert set(got) == {u for uids in test_data.series_of(test_data.spec_a).values() for u in uids}
    for sop, path in got.items():
        received = dcmread(path)
        assert received.file_meta.TransferSyntaxUID == JPEG2000Lossless
        if sop == test_data.j2k.stem:
            assert dataset_bytes(path) == dataset_bytes(test_data.j2k)
        else:
            assert received.SOPInstanceUID == sop
            assert np.array_equal(received.pixel_array, dcmread(originals[sop]).pixel_array)
