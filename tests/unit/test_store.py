"""The store service on SQLite and PostgreSQL: durable placement, index rows, bad input, duplicates."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from sqlalchemy import select

from tests.conftest import make_settings
from xdsi.archive import Archive
from xdsi.archive.store import Outcome
from xdsi.index.models import FileCopy, Instance, Patient, Study
from xdsi.storage.tiers import sha256_file
from xdsi.tools.synth import StudySpec, write_study


def test_store_indexes_and_keeps_bytes(archive: Archive, tmp_path: Path) -> None:
    spec = StudySpec(patient_name="MÜLLER^ANNA")
    files = write_study(tmp_path / "in", spec, series=2, per_series=2)
    for f in files:
        r = archive.store.store_file(f)
        assert r.outcome is Outcome.STORED, r.reason
    with archive.index.session() as s:
        assert s.scalar(select(Patient.patient_name).where(Patient.patient_id == spec.patient_id)) == "MÜLLER^ANNA"
        study = s.scalars(select(Study)).one()
        assert study.study_uid == spec.study_uid and study.modalities == "CT" and study.accession_number == "ACC001"
        copies = s.scalars(select(FileCopy)).all()
        assert len(copies) == 4
        for c in copies:
            path = archive.tiers[c.tier].abspath(c.rel_path)
            assert sha256_file(path) == (c.size, c.sha256)
    # the stored file is the file we were given, byte for byte
    first = dcmread(files[0])
    stored = [archive.tiers["cache"].abspath(c.rel_path) for c in copies]
    match = [p for p in stored if p.name == f"{first.SOPInstanceUID}.dcm"]
    assert match and match[0].read_bytes() == files[0].read_bytes()


def test_truncated_and_garbage_are_rejected_and_nothing_indexed(archive: Archive, tmp_path: Path) -> None:
    f = write_study(tmp_path / "in", StudySpec(), per_series=1)[0]
    data = f.read_bytes()
    trunc = tmp_path / "trunc.dcm"
    trunc.write_bytes(data[: len(data) - 100])
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"this is not DICOM at all" * 10)
    for bad in (trunc, garbage):
        r = archive.store.store_file(bad)
        assert r.outcome is Outcome.REJECTED, bad
        assert r.reason
    with archive.index.session() as s:
        assert s.scalars(select(Instance)).all() == []
    assert not any(p.is_file() for p in archive.tiers.hot.root.rglob("*") if ".tmp" not in p.parts)


def test_duplicate_keep_first(archive: Archive, tmp_path: Path) -> None:
    f = write_study(tmp_path / "in", StudySpec(), per_series=1)[0]
    assert archive.store.store_file(f).outcome is Outcome.STORED
    ds = dcmread(f)
    ds.PatientName = "CHANGED^NAME"
    f2 = tmp_path / "dup.dcm"
    ds.save_as(f2)
    r = archive.store.store_file(f2)
    assert r.outcome is Outcome.DUPLICATE
    with archive.index.session() as s:
        c = s.scalars(select(FileCopy)).one()
        assert archive.tiers[c.tier].abspath(c.rel_path).read_bytes() == f.read_bytes()


def test_duplicate_replace(tmp_path: Path, index_url: str) -> None:
    a = Archive.open(make_settings(tmp_path, index_url, duplicate_policy="replace"))
    try:
        f = write_study(tmp_path / "in", StudySpec(), per_series=1)[0]
        assert a.store.store_file(f).outcome is Outcome.STORED
        ds = dcmread(f)
        ds.InstanceNumber = 99
        f2 = tmp_path / "dup.dcm"
        ds.save_as(f2)
        assert a.store.store_file(f2).outcome is Outcome.REPLACED
        with a.index.session() as s:
            inst = s.scalars(select(Instance)).one()
            assert inst.instance_number == 99
            c = s.scalars(select(FileCopy)).one()
            assert a.tiers[c.tier].abspath(c.rel_path).read_bytes() == f2.read_bytes()
        files = [p for p in a.tiers.hot.root.rglob("*.dcm")]
        assert len(files) == 1, files  # the superseded file is gone
    finally:
        a.close()


def test_invalid_uid_never_reaches_a_path(archive: Archive, tmp_path: Path) -> None:
    f = write_study(tmp_path / "in", StudySpec(), per_series=1)[0]
    ds = dcmread(f)
    ds.SOPInstanceUID = "../../etc/passwd"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3"
    bad = tmp_path / "bad.dcm"
    ds.save_as(bad)
    r = archive.store.store_file(bad)
    assert r.outcome is Outcome.REJECTED and "SOP Instance UID" in r.reason


@pytest.mark.parametrize("tag", [0x00000000, 0x00000800, 0x00010010, 0x00070010])
def test_command_or_illegal_group_in_the_data_set_is_refused(archive: Archive, tmp_path: Path, tag: int) -> None:
    """Group 0000 (DIMSE command) and the reserved odd groups 0001-0007 never belong in a data set (found by the fuzzer)."""
    f = write_study(tmp_path / "in", StudySpec(), per_series=1)[0]
    ds = dcmread(f)
    ds.add_new(tag, "UL" if tag >> 16 == 0 else "LO", 0 if tag >> 16 == 0 else "X")
    fp = DicomBytesIO()
    fp.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(fp, ds.file_meta, enforce_standard=True)
    fp.is_little_endian, fp.is_implicit_VR = True, ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
    write_dataset(fp, ds)  # dcmwrite() itself refuses group 0000: a peer's bytes are what is tested
    bad = tmp_path / "stray.dcm"
    bad.write_bytes(fp.getvalue())
    r = archive.store.store_file(bad)
    assert r.outcome is Outcome.REJECTED and "does not belong in a data set" in r.reason
    with archive.index.read_session() as s:
        assert s.scalars(select(Instance)).all() == []


def test_bare_dataset_gets_file_meta(archive: Archive, tmp_path: Path) -> None:
    f = write_study(tmp_path / "in", StudySpec(), per_series=1)[0]
    ds = dcmread(f)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    write_dataset(fp, ds)  # no preamble, no File Meta Information: a bare implicit VR dataset
    bare = tmp_path / "bare.dcm"
    bare.write_bytes(fp.getvalue())
    r = archive.store.store_file(bare)
    assert r.outcome is Outcome.STORED, r.reason
    with archive.index.session() as s:
        c = s.scalars(select(FileCopy)).one()
        stored = dcmread(archive.tiers[c.tier].abspath(c.rel_path))
    assert stored.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
    assert stored.SOPInstanceUID == ds.SOPInstanceUID


def test_file_meta_written_by_the_archive_names_pydicom(archive: Archive, tmp_path: Path) -> None:
    """A file stored without File Meta gets pydicom's Implementation Class UID and the calling AE as Source AE Title."""
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

    f = write_study(tmp_path / "in", StudySpec(), per_series=1)[0]
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    write_dataset(fp, dcmread(f))
    bare = tmp_path / "bare2.dcm"
    bare.write_bytes(fp.getvalue())
    r = archive.store.store_file(bare, source_ae="STOWER")
    assert r.outcome is Outcome.STORED, r.reason
    with archive.index.session() as s:
        c = s.scalars(select(FileCopy).order_by(FileCopy.pk.desc())).first()
        assert c is not None
        meta = dcmread(archive.tiers[c.tier].abspath(c.rel_path), stop_before_pixels=True).file_meta
    assert meta.ImplementationClassUID == PYDICOM_IMPLEMENTATION_UID
    assert meta.SourceApplicationEntityTitle == "STOWER"
