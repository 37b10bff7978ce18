"""RetrieveService.produce(), frames() and the render parser: bytes exist before anyone announces them.

On SQLite and PostgreSQL (the ``archive`` fixture); instances are synthetic
CT images and pydicom's own bundled JPEG colour file; pixels are compared
with pydicom's decoding of the original.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, get_frame
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit

from xdsi.archive import Archive
from xdsi.archive.retrieve import CannotProvide, InstanceRef, PresentationStateError
from xdsi.archive.transcode import TranscodeError
from xdsi.render import InvalidParameter, UnsupportedParameter
from xdsi.render.request import RenderRequest, parse_render_request
from xdsi.tools.synth import StudySpec, write_study
from xdsi.uids import new_uid


def _spools(archive: Archive) -> list[Path]:
    d = archive.settings.temp_dir
    return sorted(d.glob("*.spool")) if d.exists() else []


def _store(archive: Archive, path: Path) -> InstanceRef:
    r = archive.store.store_file(path)
    assert r.ok, r.reason
    return archive.retrieve.select(sop_uids=[r.sop_instance_uid])[0]


def _ct(tmp_path: Path) -> Path:
    return write_study(tmp_path / "in", StudySpec(), series=1, per_series=1)[0]


def corrupt_j2k(tmp_path: Path) -> Path:
    """A J2K Lossless CT whose codestream has its SIZ marker segment zeroed: no decoder can read it."""
    f = _ct(tmp_path)
    ds = dcmread(f)
    ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    ds.PixelData = encapsulate([frame[:4] + b"\x00" * 40 + frame[44:]])
    out = tmp_path / "corrupt-j2k.dcm"
    ds.save_as(out, enforce_file_format=True)
    return out


def jpeg_colour(tmp_path: Path) -> Path:
    """pydicom's YBR_FULL JPEG Baseline secondary capture (written by dcmtk), with fresh UIDs."""
    ds = dcmread(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = new_uid(), new_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = new_uid()
    ds.PatientID = ds.get("PatientID") or "JPEGCOLOUR"
    out = tmp_path / "jpeg-colour.dcm"
    ds.save_as(out, enforce_file_format=True)
    return out


def test_unchanged_is_the_stored_file_and_spools_nothing(archive: Archive, tmp_path: Path) -> None:
    f = _ct(tmp_path)
    ref = _store(archive, f)
    with archive.retrieve.produce(ref, [JPEG2000Lossless, ExplicitVRLittleEndian]) as p:
        assert p.unchanged and p.transfer_syntax == ExplicitVRLittleEndian and p.size == f.stat().st_size
        assert _spools(archive) == []
        assert b"".join(p.chunks(chunk_size=1000)) == f.read_bytes()


def test_converted_bytes_exist_before_return_and_the_spool_goes_after_streaming(archive: Archive, tmp_path: Path) -> None:
    f = _ct(tmp_path)
    ref = _store(archive, f)
    p = archive.retrieve.produce(ref, [ImplicitVRLittleEndian])
    spools = _spools(archive)
    assert len(spools) == 1 and spools[0].stat().st_size == p.size > 0  # fully written before produce returned
    assert not p.unchanged and p.transfer_syntax == ImplicitVRLittleEndian
    data = b"".join(p.chunks(chunk_size=4096))
    assert _spools(archive) == [], "the spool must be removed once its chunks were read"
    out, src = dcmread(io.BytesIO(data)), dcmread(f)
    assert out.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian and out.SOPInstanceUID == src.SOPInstanceUID
    assert np.array_equal(out.pixel_array, src.pixel_array)
    with pytest.raises(ValueError):
        next(p.chunks())  # a produced instance streams once


def test_close_removes_an_unread_spool(archive: Archive, tmp_path: Path) -> None:
    ref = _store(archive, _ct(tmp_path))
    p = archive.retrieve.produce(ref, [ImplicitVRLittleEndian])
    assert len(_spools(archive)) == 1
    it = p.chunks(chunk_size=100)
    next(it)  # a client that went away after the first chunk
    p.close()
    assert _spools(archive) == []
    with archive.retrieve.produce(ref, [ImplicitVRLittleEndian]):
        assert len(_spools(archive)) == 1
    assert _spools(archive) == []


def test_a_failed_conversion_raises_before_return_and_leaves_nothing(archive: Archive, tmp_path: Path) -> None:
    ref = _store(archive, corrupt_j2k(tmp_path))
    with pytest.raises(TranscodeError):
        archive.retrieve.produce(ref, [ExplicitVRLittleEndian])
    assert _spools(archive) == []
    # the stored syntax is still served unchanged
    with archive.retrieve.produce(ref, [JPEG2000Lossless]) as p:
        assert p.unchanged


def test_no_acceptable_syntax_is_cannot_provide(archive: Archive, tmp_path: Path) -> None:
    ref = _store(archive, _ct(tmp_path))
    with pytest.raises(CannotProvide):
        archive.retrieve.produce(ref, [JPEGBaseline8Bit])  # no JPEG encoder here
    with pytest.raises(CannotProvide):
        archive.retrieve.produce(ref, [])


def test_requester_order_is_kept_when_a_compressed_target_comes_first(archive: Archive, tmp_path: Path) -> None:
    f = _ct(tmp_path)
    ref = _store(archive, f)
    with archive.retrieve.produce(ref, [JPEG2000Lossless, ImplicitVRLittleEndian]) as p:
        assert p.transfer_syntax == JPEG2000Lossless
        out = dcmread(io.BytesIO(b"".join(p.chunks())))
    assert np.array_equal(out.pixel_array, dcmread(f).pixel_array)


def test_frames_of_a_colour_jpeg_as_stored_and_native(archive: Archive, tmp_path: Path) -> None:
    f = jpeg_colour(tmp_path)
    ref = _store(archive, f)
    src = dcmread(f)
    info = archive.retrieve.frame_info(ref)
    assert (info.transfer_syntax, info.encapsulated, info.media_types) == (JPEGBaseline8Bit, True, ("image/jpeg",))
    with archive.retrieve.frames(ref, [1], stored=True) as fs:
        assert (fs.transfer_syntax, fs.media_type) == (JPEGBaseline8Bit, "image/jpeg")
        [(n, chunks)] = list(fs.parts())
        assert n == 1 and b"".join(chunks) == get_frame(src.PixelData, 0, number_of_frames=1)
    assert _spools(archive) == []
    with archive.retrieve.frames(ref, [1], stored=False) as fs:
        assert fs.transfer_syntax == ExplicitVRLittleEndian and fs.media_type == "application/octet-stream"
        data = b"".join(b"".join(c) for _n, c in fs.parts())
    rgb = src.pixel_array  # pydicom converts YBR_FULL JPEG to RGB by default
    assert data == np.ascontiguousarray(rgb).tobytes()


def test_render_parser_is_one_for_every_front_door() -> None:
    p = parse_render_request(RenderRequest(content_types=("image/png",), rows="10", window_center="40", window_width="400"))
    assert (p.content_type, p.rows, p.window_center, p.window_width) == ("image/png", 10, 40.0, 400.0)
    for req, param, kind in [
        (RenderRequest(window_center="40"), "window_width", InvalidParameter),
        (RenderRequest(content_types=("image/png",), image_quality="50"), "image_quality", InvalidParameter),
        (RenderRequest(content_types=("application/pdf",)), "content_type", UnsupportedParameter),
        (RenderRequest(presentation_uid="1.2.3"), "presentation_uid", InvalidParameter),
        (RenderRequest(anonymize="yes"), "anonymize", UnsupportedParameter),
        (RenderRequest(viewport_source="1,2,3"), "region", InvalidParameter),
    ]:
        with pytest.raises(kind) as exc:
            parse_render_request(req)
        assert exc.value.parameter == param, req
    p = parse_render_request(RenderRequest(viewport_source="10,0,20,32"))
    assert p.resolved(64, 40).region == (0.25, 0.0, 0.75, 0.5)


def test_presentation_state_loader_refusals(archive: Archive, tmp_path: Path) -> None:
    ref = _store(archive, _ct(tmp_path))
    with pytest.raises(PresentationStateError) as exc:
        archive.retrieve.presentation_state(ref.study_uid, ref.series_uid, new_uid())
    assert exc.value.reason == "unknown"
    with pytest.raises(PresentationStateError) as exc:
        archive.retrieve.presentation_state(ref.study_uid, ref.series_uid, ref.sop_instance_uid)
    assert exc.value.reason == "sop_class"  # a CT image is not a presentation state
    with pytest.raises(PresentationStateError) as exc:
        archive.retrieve.presentation_state(ref.study_uid, new_uid(), ref.sop_instance_uid)
    assert exc.value.reason == "series"


@pytest.mark.parametrize("name,ts", [("image_dfl.dcm", "1.2.840.10008.1.2.1.99"), ("MR_small_bigendian.dcm", "1.2.840.10008.1.2.2")])
def test_deflated_and_big_endian_instances_render(archive: Archive, tmp_path: Path, name: str, ts: str) -> None:
    f = tmp_path / name
    shutil.copy(get_testdata_file(name), f)
    ref = _store(archive, f)
    assert ref.transfer_syntax_uid == ts
    data = archive.retrieve.render(ref, parse_render_request(RenderRequest(content_types=("image/png",))))
    from PIL import Image

    img = np.asarray(Image.open(io.BytesIO(data)))
    arr = dcmread(f).pixel_array.astype(np.float64)
    # the rendering is a monotonic window of the decoded pixels: unswapped or undeflated bytes would not correlate
    assert img.shape == arr.shape and np.corrcoef(img.ravel(), arr.ravel())[0, 1] > 0.99


def test_render_size_is_bounded_by_the_limit(tmp_path: Path, index_url: str) -> None:
    """[limits] max_render_size: a larger source is scaled down to fit it, a larger request is refused."""
    from PIL import Image

    from tests.conftest import make_settings
    from xdsi.config import LimitsSettings
    from xdsi.render import InvalidParameter

    archive = Archive.open(make_settings(tmp_path, index_url, limits=LimitsSettings(max_render_size=64)))
    try:
        ref = _store(archive, _ct(tmp_path))  # a 512 x 512 CT
        data = archive.retrieve.render(ref, parse_render_request(RenderRequest(content_types=("image/png",))))
        assert Image.open(io.BytesIO(data)).size == (64, 64)
        small = archive.retrieve.render(ref, parse_render_request(RenderRequest(content_types=("image/png",), rows="32")))
        assert Image.open(io.BytesIO(small)).size == (32, 32)
        with pytest.raises(InvalidParameter) as err:
            archive.retrieve.render(ref, parse_render_request(RenderRequest(content_types=("image/png",), columns="65")))
        assert err.value.parameter == "columns"
    finally:
        archive.close()


def test_bulk_values_of_deflated_and_little_endian_objects(archive: Archive, tmp_path: Path) -> None:
    f = tmp_path / "dfl.dcm"
    shutil.copy(get_testdata_file("image_dfl.dcm"), f)
    ref = _store(archive, f)
    pixels = dcmread(f).PixelData  # pydicom inflates the dataset
    value = archive.retrieve.bulk(ref, 0x7FE00010)
    assert value.length == len(pixels) and b"".join(value.chunks()) == pixels
    assert b"".join(archive.retrieve.bulk(ref, 0x7FE00010).chunks(100, 300)) == pixels[100:300]
    ct = _ct(tmp_path)
    ref = _store(archive, ct)
    raw = dcmread(ct).PixelData
    value = archive.retrieve.bulk(ref, 0x7FE00010)
    assert value.length == len(raw) and b"".join(value.chunks(10, 20)) == raw[10:20]


@pytest.mark.parametrize("name", ["MR_small_bigendian.dcm", "image_dfl.dcm"])
def test_frames_of_big_endian_and_deflated_objects_are_little_endian_pixels(archive: Archive, tmp_path: Path, name: str) -> None:
    f = tmp_path / name
    shutil.copy(get_testdata_file(name), f)
    ref = _store(archive, f)
    arr = dcmread(f).pixel_array
    expected = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    for stored in (True, False):
        with archive.retrieve.frames(ref, [1], stored=stored) as fs:
            assert fs.transfer_syntax == ExplicitVRLittleEndian
            assert b"".join(b"".join(c) for _n, c in fs.parts()) == expected, (name, stored)
