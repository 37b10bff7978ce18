"""xdsi.gateway.headscan reads the six identifying values exactly as pydicom does, or declines (None)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pydicom.data
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from xdsi.gateway import headscan, identity

KEYS = identity.KEYWORDS


def _as_pydicom(path: Path) -> dict[str, str]:
    ds = identity.read_identity(path)
    return {k: str(ds.get(k, "") or "").strip() for k in KEYS}


def _as_scan(found: dict[str, str]) -> dict[str, str]:
    return {k: str(found.get(k, "") or "").strip() for k in KEYS}


def _testdata() -> list[str]:
    """pydicom's bundled test files (``get_testdata_files`` also asks pydicom-data's remote store: 15 s)."""
    return sorted(str(p) for p in (Path(pydicom.data.__file__).parent / "test_files").glob("*.dcm"))


def test_same_values_as_pydicom_over_pydicoms_test_files() -> None:
    """Every file the scanner answers for gets pydicom's values; it answers for the plainly encoded majority."""
    answered = declined = 0
    for name in _testdata():
        path = Path(name)
        found = headscan.scan_file(path)
        if found is None:
            declined += 1
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                expected = _as_pydicom(path)
        except Exception:  # pydicom cannot read it: the scanner must not have answered for it either
            pytest.fail(f"{name}: scanned, but pydicom cannot read it")
        assert _as_scan(found) == expected, name
        answered += 1
    assert answered >= 30, (answered, declined)


def _write(tmp_path: Path, ds: Dataset, syntax: str, name: str) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    ds.file_meta = meta
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


def _dataset(patient_id: str = "PID-1") -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyDate = "20261130"
    inner = Dataset()
    inner.CodeValue = "X"
    deeper = Dataset()
    deeper.ReferencedSOPClassUID = CTImageStorage
    deeper.ReferencedSOPInstanceUID = generate_uid()
    inner.ReferencedImageSequence = Sequence([deeper])
    ds.ProcedureCodeSequence = Sequence([inner, Dataset()])
    ds.PatientName = "DOE^JANE"
    ds.PatientID = patient_id
    ds.IssuerOfPatientID = "HOSP"
    ds.OtherPatientIDsSequence = Sequence([Dataset()])
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.InstanceNumber = 1
    return ds


def _undefined_lengths(ds: Dataset) -> None:
    """Sequences and items of undefined length, nested: what the scanner must walk item by item."""
    for elem in ds.iterall():
        if elem.VR == "SQ":
            elem.is_undefined_length = True
            for item in elem.value:
                item.is_undefined_length_sequence_item = True


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
@pytest.mark.parametrize("undefined", [False, True])
def test_sequences_before_the_identity_are_walked(tmp_path: Path, syntax: str, undefined: bool) -> None:
    ds = _dataset()
    if undefined:
        _undefined_lengths(ds)
    path = _write(tmp_path, ds, syntax, "seq.dcm")
    found = headscan.scan_file(path)
    assert found is not None
    assert _as_scan(found) == _as_pydicom(path)
    assert found["PatientID"] == "PID-1" and found["StudyInstanceUID"] == ds.StudyInstanceUID


@pytest.mark.parametrize("patient_id", ["A\\B", "M\u00fcller", ""])
def test_values_it_cannot_read_exactly_are_left_to_pydicom(tmp_path: Path, patient_id: str) -> None:
    """Several values, non-ASCII bytes (their meaning depends on the character set): None. Empty: read."""
    path = _write(tmp_path, _dataset(patient_id), ExplicitVRLittleEndian, "v.dcm")
    found = headscan.scan_file(path)
    if patient_id == "":
        assert found is not None and _as_scan(found) == _as_pydicom(path)
    else:
        assert found is None


def test_encodings_it_does_not_read_are_left_to_pydicom(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        big = _write(tmp_path, _dataset(), ExplicitVRBigEndian, "big.dcm")
    assert headscan.scan_file(big) is None
    path = _write(tmp_path, _dataset(), ExplicitVRLittleEndian, "vr.dcm")
    raw = bytearray(path.read_bytes())
    tag = b"\x10\x00\x20\x00LO"  # (0010,0020) Patient ID, Explicit VR: claim another VR
    at = raw.index(tag, 132 + 12)
    raw[at + 4 : at + 6] = b"SH"
    path.write_bytes(bytes(raw))
    assert headscan.scan_file(path) is None
    truncated = tmp_path / "short.dcm"
    truncated.write_bytes(bytes(raw[: at + 3]))
    assert headscan.scan_file(truncated) is None
    assert headscan.scan_file(tmp_path / "missing.dcm") is None


def test_out_of_order_elements_are_left_to_pydicom(tmp_path: Path) -> None:
    """A data set whose elements are not ascending could hold a second Patient ID later: not scanned."""
    ds = _dataset()
    path = _write(tmp_path, ds, ImplicitVRLittleEndian, "order.dcm")
    raw = path.read_bytes()
    start = raw.index(b"\x10\x00\x20\x00")  # (0010,0020), implicit: tag then 4-byte length
    length = int.from_bytes(raw[start + 4 : start + 8], "little")
    element = raw[start : start + 8 + length]
    swapped = raw[:start] + raw[start + 8 + length :]
    end = swapped.index(b"\x20\x00\x0e\x00")  # after the Series Instance UID
    end += 8 + int.from_bytes(swapped[end + 4 : end + 8], "little")
    moved = tmp_path / "moved.dcm"
    moved.write_bytes(swapped[:end] + element + swapped[end:])
    assert headscan.scan_file(moved) is None


def test_check_refuses_the_same_with_either_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """identity.check: another study is refused whether the scanner or pydicom read the file."""
    ds = _dataset()
    path = _write(tmp_path, ds, ExplicitVRLittleEndian, "c.dcm")
    asked = identity.Expected(study_uids=(generate_uid(),))
    right = identity.Expected(study_uids=(ds.StudyInstanceUID,), patient_ids=("PID-1",))
    scanned = [identity.check(e, path, CTImageStorage, ds.SOPInstanceUID)[0] for e in (asked, right)]
    monkeypatch.setattr(headscan, "scan_file", lambda p: None)
    read = [identity.check(e, path, CTImageStorage, ds.SOPInstanceUID)[0] for e in (asked, right)]
    assert scanned == read
    assert scanned[0] is not None and "StudyInstanceUID" in scanned[0] and scanned[1] is None
    assert dcmread(path).PatientID == "PID-1"
