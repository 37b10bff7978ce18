"""The Imaging Document Source service without HTTP, on SQLite and PostgreSQL: rules, transcoding, cold tiers."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import JPEG2000, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, RLELossless
from sqlalchemy import select

from tests.conftest import make_settings
from xdsi.archive import Archive
from xdsi.ids import DocumentRequest, ImagingDocumentSource
from xdsi.index.models import FileCopy, Study
from xdsi.tools.synth import StudySpec, write_study
from xdsi.standards.constants import STATUS_FAILURE, STATUS_SUCCESS, XDS_REPOSITORY_ERROR

REPO = "1.2.3.4.5"


def _stored(archive: Archive, tmp_path: Path, **kw: object) -> tuple[StudySpec, list[Path]]:
    spec = StudySpec()
    files = write_study(tmp_path / "in", spec, series=1, per_series=2, **kw)  # type: ignore[arg-type]
    for f in files:
        assert archive.store.store_file(f).ok
    return spec, files


def _req(path: Path) -> DocumentRequest:
    ds = dcmread(path, stop_before_pixels=True)
    return DocumentRequest(ds.StudyInstanceUID, ds.SeriesInstanceUID, REPO, ds.SOPInstanceUID)


def _bytes(doc) -> bytes:  # type: ignore[no-untyped-def]
    return b"".join(doc.chunks())


def test_unchanged_when_stored_syntax_requested(archive: Archive, tmp_path: Path) -> None:
    _spec, files = _stored(archive, tmp_path)
    ids = ImagingDocumentSource(archive.retrieve, REPO)
    res = ids.retrieve_set([_req(f) for f in files], [JPEG2000Lossless, ExplicitVRLittleEndian])
    assert res.status == STATUS_SUCCESS and res.errors == []
    assert [_bytes(d) for d in res.documents] == [f.read_bytes() for f in files]
    assert {d.transfer_syntax for d in res.documents} == {ExplicitVRLittleEndian}


def _smooth(files: list[Path]) -> None:
    """Replace the synthetic noise by a smooth image, which a lossy codec can compress faithfully."""
    for f in files:
        ds = dcmread(f)
        y, x = np.mgrid[0 : ds.Rows, 0 : ds.Columns]
        ds.PixelData = (1000 + 800 * np.sin(x / 9.0) * np.cos(y / 13.0) + 10 * x).astype(np.uint16).tobytes()
        ds.save_as(f, enforce_file_format=True)


@pytest.mark.parametrize("target", [ImplicitVRLittleEndian, JPEG2000Lossless, RLELossless, JPEG2000])
def test_transcoding(archive: Archive, tmp_path: Path, target: str) -> None:
    files = write_study(tmp_path / "in", StudySpec(), series=1, per_series=1)
    _smooth(files)
    assert archive.store.store_file(files[0]).ok
    ids = ImagingDocumentSource(archive.retrieve, REPO)
    res = ids.retrieve_set([_req(files[0])], [target])
    assert res.status == STATUS_SUCCESS, res.errors
    out = dcmread(io.BytesIO(_bytes(res.documents[0])))
    src = dcmread(files[0])
    assert out.file_meta.TransferSyntaxUID == target
    for kw in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID", "PatientName", "PatientBirthDate"):
        assert out[kw].value == src[kw].value, kw
    a, b = out.pixel_array.astype(np.int32), src.pixel_array.astype(np.int32)
    if target == JPEG2000:
        assert out.LossyImageCompression == "01"
        assert np.abs(a - b).max() < 64  # lossy (ratio 10) but close: a 12-bit image within 1.5 %
    else:
        assert np.array_equal(a, b)


def test_compressed_store_is_decompressed_on_request(archive: Archive, tmp_path: Path) -> None:
    spec = StudySpec()
    src_files = write_study(tmp_path / "raw", spec, series=1, per_series=1)
    ds = dcmread(src_files[0])
    pixels = ds.pixel_array.copy()
    ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    f = tmp_path / "j2k.dcm"
    ds.save_as(f, enforce_file_format=True)
    assert archive.store.store_file(f).ok
    ids = ImagingDocumentSource(archive.retrieve, REPO)
    # stored J2K requested: unchanged
    res = ids.retrieve_set([_req(f)], [JPEG2000Lossless])
    assert _bytes(res.documents[0]) == f.read_bytes()
    # only explicit VR LE requested: decompressed, same pixels
    res = ids.retrieve_set([_req(f)], [ExplicitVRLittleEndian])
    out = dcmread(io.BytesIO(_bytes(res.documents[0])))
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(out.pixel_array, pixels)


def test_no_producible_syntax_is_an_error(archive: Archive, tmp_path: Path) -> None:
    _spec, files = _stored(archive, tmp_path)
    ids = ImagingDocumentSource(archive.retrieve, REPO)
    res = ids.retrieve_set([_req(files[0])], ["1.2.840.10008.1.2.4.50"])  # JPEG baseline: no encoder here
    assert res.status == STATUS_FAILURE
    assert [(e.error_code, e.location) for e in res.errors] == [(XDS_REPOSITORY_ERROR, _req(files[0]).document_unique_id)]


def test_instances_on_a_cold_tier_are_recalled_before_they_are_listed(tmp_path: Path, index_url: str) -> None:
    """Issue 8 item 5: a recalled instance exists on the hot tier before the response lists it."""
    archive = Archive.open(make_settings(tmp_path, index_url, tiers=2))
    try:
        _spec, files = _stored(archive, tmp_path)
        with archive.index.session() as s:
            study_pk = s.scalars(select(Study.pk)).one()
        assert not archive.policy.move_study(study_pk, archive.tiers.hot.name, "warm").errors
        with archive.index.session() as s:
            assert {c.tier for c in s.scalars(select(FileCopy))} == {"warm"}
        ids = ImagingDocumentSource(archive.retrieve, REPO)
        res = ids.retrieve_set([_req(f) for f in files], [ExplicitVRLittleEndian])
        with archive.index.session() as s:
            tiers = sorted((c.instance_fk, c.tier) for c in s.scalars(select(FileCopy)))
        assert sum(1 for _pk, t in tiers if t == "cache") == 2  # both recalled before anything is announced
        assert [_bytes(d) for d in res.documents] == [f.read_bytes() for f in files]
    finally:
        archive.close()
