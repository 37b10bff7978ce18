"""Every transcoding path (RAD-69, WADO-URI/WADO-RS, C-MOVE/C-GET) keeps the instance's identity and pixels.

pydicom 3's ``decompress()``/``compress()`` give the instance a new SOP Instance
UID unless told not to; a retrieved instance must be the one that was asked for.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from xdsi.archive.transcode import transcoded_chunks, write_converted
from xdsi.archive import Archive
from xdsi.tools.synth import StudySpec, write_study


@pytest.fixture
def compressed(tmp_path: Path) -> tuple[Path, str, np.ndarray]:
    f = write_study(tmp_path / "in", StudySpec(), per_series=1)[0]
    ds = dcmread(f)
    pixels = ds.pixel_array.copy()
    ds.compress(RLELossless, generate_instance_uid=False)
    out = tmp_path / "rle.dcm"
    ds.save_as(out, enforce_file_format=True)
    return out, str(ds.SOPInstanceUID), pixels


def _check(data: bytes | object, uid: str, pixels: np.ndarray, ts: str) -> None:
    ds = data if not isinstance(data, bytes) else dcmread(io.BytesIO(data))
    assert ds.SOPInstanceUID == uid  # type: ignore[union-attr]
    assert ds.file_meta.MediaStorageSOPInstanceUID == uid  # type: ignore[union-attr]
    assert ds.file_meta.TransferSyntaxUID == ts  # type: ignore[union-attr]
    assert np.array_equal(ds.pixel_array, pixels)  # type: ignore[union-attr]


def test_web_transcode_keeps_identity(compressed: tuple[Path, str, np.ndarray]) -> None:
    """WADO-URI and WADO-RS convert through the retrieval service's produce(), i.e. write_converted."""
    path, uid, pixels = compressed
    out = io.BytesIO()
    write_converted(path, ExplicitVRLittleEndian, out)
    _check(out.getvalue(), uid, pixels, ExplicitVRLittleEndian)


def test_soap_transcode_keeps_identity(compressed: tuple[Path, str, np.ndarray]) -> None:
    path, uid, pixels = compressed
    for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless):
        _check(b"".join(transcoded_chunks(path, ts)), uid, pixels, ts)


def test_dimse_transcode_keeps_identity(compressed: tuple[Path, str, np.ndarray], archive: Archive) -> None:
    """C-MOVE/C-GET send what ``archive.retrieve.produce`` spools, for the syntaxes the peer accepted."""
    path, uid, pixels = compressed
    assert archive.store.store_file(path).ok
    ref = archive.retrieve.select(sop_uids=[uid])[0]
    for accepted in ([ImplicitVRLittleEndian], [JPEG2000Lossless]):
        with archive.retrieve.produce(ref, accepted) as p:
            assert not p.unchanged
            _check(b"".join(p.chunks()), uid, pixels, accepted[0])
