"""The conversion layer against every pydicom bundled test file with pixel data (files nobody here wrote).

For each file and each target we produce: the converted file re-reads, keeps
its SOP Instance UID, has the transfer syntax asked for, and its pixels equal
pydicom's own decode of the original (colour compared as RGB, as pydicom's
``pixel_array`` gives it).  A target our encoders cannot take for those pixels
must be refused by the policy and by the converter (a clear TranscodeError,
never wrong pixels).  Frames and bulk data are checked the same way.
"""

from __future__ import annotations

import io
import subprocess
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.pixels import pixel_array
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)

from xdsi.archive import content, transcode

TARGETS = (
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless, RLELossless, JPEG2000,
)  # fmt: skip
DCMDUMP = Path("/usr/bin/dcmdump")
DCMCONV = Path("/usr/bin/dcmconv")


def _pixel_files() -> list[Path]:
    out = []
    for f in sorted(get_testdata_files()):
        try:
            ds = dcmread(f, defer_size=64)
        except Exception:
            continue
        if "PixelData" in ds:
            out.append(Path(f))
    return out


FILES = _pixel_files()
IDS = [f"{f.parent.name}/{f.name}" if f.parent.name != "test_files" else f.name for f in FILES]


@lru_cache(maxsize=None)
def original(path: Path) -> tuple[Dataset, np.ndarray | None, str]:
    """pydicom's decode of the original (the oracle), or why it cannot decode it."""
    ds = dcmread(path)
    try:
        return ds, ds.pixel_array, ""
    except Exception as exc:  # pydicom/pylibjpeg raise many kinds
        return ds, None, f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:120]}"


def decoded_or_skip(path: Path) -> tuple[Dataset, np.ndarray]:
    ds, arr, why = original(path)
    if arr is None:
        pytest.skip(f"pydicom itself cannot decode {path.name}: {why}")
    return ds, arr


def stored_ts(ds: Dataset) -> str:
    return transcode.source_transfer_syntax(ds)


_dumped: set[tuple[str, str, str]] = set()


def _dcmdump_sample(ds: Dataset, target: str, data: bytes, tmp: Path) -> None:
    """dcmtk parses the output: once per (source syntax, photometric, target)."""
    key = (stored_ts(ds), str(ds.get("PhotometricInterpretation", "")), target)
    if key in _dumped or not DCMDUMP.exists():
        return
    _dumped.add(key)
    f = tmp / "out.dcm"
    f.write_bytes(data)
    # dcmdump prints values in the data set's own character set (examples_overlay.dcm: ISO 8859-1)
    r = subprocess.run([str(DCMDUMP), str(f)], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=60)
    assert r.returncode == 0, r.stderr
    assert "E:" not in r.stderr and "W: DcmItem: Length of element" not in r.stderr, r.stderr


@pytest.mark.parametrize("target", TARGETS, ids=[UID(t).keyword or t for t in TARGETS])
@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_write_converted(path: Path, target: str, tmp_path: Path) -> None:
    ds, want = decoded_or_skip(path)
    facts = transcode.facts(path)
    choice = transcode.choose(stored_ts(ds), [target], facts)
    out = io.BytesIO()
    if target != stored_ts(ds) and not transcode.can_encode_pixels(target, facts):
        # refused by the policy and by the converter: never wrong pixels
        assert choice is None
        with pytest.raises(transcode.TranscodeError):
            transcode.write_converted(path, target, out)
        return
    assert choice is not None and choice.transfer_syntax == target
    assert choice.unchanged == (target == stored_ts(ds))
    transcode.write_converted(path, target, out)
    data = out.getvalue()
    got = dcmread(io.BytesIO(data))
    assert got.file_meta.TransferSyntaxUID == target
    assert got.SOPInstanceUID == ds.SOPInstanceUID
    if choice.unchanged:
        assert data == path.read_bytes()  # the stored syntax: byte-identical, nothing decoded
        return
    assert got.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    arr = got.pixel_array
    assert arr.shape == want.shape
    if target == ExplicitVRBigEndian:
        assert arr.dtype.byteorder in (">", "|")  # pydicom decodes big-endian words
    else:
        assert arr.dtype.byteorder in ("<", "=", "|")  # little endian (native on this machine)
    source_compressed = UID(stored_ts(ds)).is_compressed and stored_ts(ds) != DeflatedExplicitVRLittleEndian
    if target == JPEG2000:
        assert got.LossyImageCompression == "01"
        assert "ISO_15444_1" in list(_multi(got.LossyImageCompressionMethod))
        assert float(_multi(got.LossyImageCompressionRatio)[-1]) == transcode.J2K_LOSSY_RATIO
        # lossy: close to the original, not equal
        span = float(want.max()) - float(want.min()) or 1.0
        assert float(np.mean(np.abs(arr.astype(np.float64) - want.astype(np.float64)))) < 0.05 * span
    else:
        assert np.array_equal(arr, want), f"pixels differ after {stored_ts(ds)} -> {target}"
    if source_compressed and int(ds.get("SamplesPerPixel", 1)) == 3 and target in transcode.NATIVE_TARGETS:
        # decompressed colour is RGB, pixel-interleaved (PS3.5 8.2)
        assert got.PhotometricInterpretation == "RGB"
        assert got.PlanarConfiguration == 0
    if ds.get("LossyImageCompression") == "01" or stored_ts(ds) == JPEGBaseline8Bit:
        assert got.LossyImageCompression == "01"  # PS3.3 C.7.6.1.1.5: once lossy, always says so
    for kw in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
        if kw in ds:
            assert list(_multi(got[kw].value))[: len(_multi(ds[kw].value))] == list(_multi(ds[kw].value))
    _dcmdump_sample(ds, target, data, tmp_path)
    if target in (ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian):
        _check_there_and_back(path, ds, target, data, want, tmp_path)


def _elements(ds: Dataset, prefix: str = "") -> dict[str, tuple[str, Any]]:
    """Every element value, recursively (Pixel Data left to the pixel comparisons)."""
    out: dict[str, tuple[str, Any]] = {}
    for elem in ds:
        if elem.VR == "SQ":
            for i, item in enumerate(elem.value or []):
                out.update(_elements(item, f"{prefix}{elem.tag}[{i}]."))
        elif not (prefix == "" and elem.tag == 0x7FE00010):
            out[prefix + str(elem.tag)] = (elem.VR, elem.value)
    return out


def _check_there_and_back(path: Path, ds: Dataset, target: str, data: bytes, want: np.ndarray, tmp: Path) -> None:
    """Big endian / deflated output converts back to Explicit VR LE with the values of the direct conversion."""
    direct = io.BytesIO()
    transcode.write_converted(path, ExplicitVRLittleEndian, direct)
    src = tmp / "there.dcm"
    src.write_bytes(data)
    back = io.BytesIO()
    transcode.write_converted(src, ExplicitVRLittleEndian, back)
    got = dcmread(io.BytesIO(back.getvalue()))
    assert np.array_equal(got.pixel_array, want), f"pixels differ after {stored_ts(ds)} -> {target} -> Explicit VR LE"
    assert _elements(got) == _elements(dcmread(io.BytesIO(direct.getvalue())))
    if target == DeflatedExplicitVRLittleEndian:
        # PS3.5 A.5: the file meta group is not deflated, the data set after it is (raw deflate)
        fp = io.BytesIO(data)
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
        assert meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
        assert zlib.decompress(fp.read(), -zlib.MAX_WBITS)
    _dcmconv_sample(ds, target, data, want, got, tmp)


_converted_by_dcmtk: set[tuple[str, str, str]] = set()


def _dcmconv_sample(ds: Dataset, target: str, data: bytes, want: np.ndarray, ours_le: Dataset, tmp: Path) -> None:
    """A real peer reads our output: dcmtk's Explicit VR LE copy has pydicom's pixels and our values.

    Once per (source syntax, photometric, bits allocated, target)."""
    key = (stored_ts(ds), f"{ds.get('PhotometricInterpretation', '')}/{ds.get('BitsAllocated', '')}", target)
    if key in _converted_by_dcmtk or not DCMCONV.exists():
        return
    _converted_by_dcmtk.add(key)
    src, dst = tmp / "ours.dcm", tmp / "dcmtk-le.dcm"
    src.write_bytes(data)
    r = subprocess.run([str(DCMCONV), "+te", str(src), str(dst)], capture_output=True, timeout=60, env={"TCP_NODELAY": "1"})
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    theirs = dcmread(dst)
    assert theirs.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(theirs.pixel_array, want), f"dcmtk reads our {UID(target).name} of {stored_ts(ds)} differently"
    mine, dcmtk = _elements(ours_le), _elements(theirs)
    assert {k: v[1] for k, v in mine.items() if k in dcmtk} == {k: v[1] for k, v in dcmtk.items() if k in mine}
    assert set(mine) <= set(dcmtk)


def _multi(v: Any) -> list[Any]:
    if v is None or v == "":
        return []
    return list(v) if not isinstance(v, (str, bytes, float, int)) else [v]


UNDECODABLE_COMPRESSED = [
    p for p in FILES if original(p)[1] is None and UID(stored_ts(original(p)[0]) or "1.2.3").is_compressed
]


@pytest.mark.parametrize("path", UNDECODABLE_COMPRESSED, ids=[p.name for p in UNDECODABLE_COMPRESSED])
def test_undecodable_is_a_clear_refusal(path: Path) -> None:
    """What pydicom cannot decode is refused with TranscodeError before anything is written."""
    out = io.BytesIO()
    with pytest.raises(transcode.TranscodeError):
        transcode.write_converted(path, ExplicitVRLittleEndian, out)
    with pytest.raises(content.CannotConvert):
        list(content.native_frames(path, [1]))


def _dtype(ds: Dataset) -> np.dtype:
    bits = int(ds.BitsAllocated)
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    return np.dtype(f"<{'i' if signed else 'u'}{max(bits // 8, 1)}")


def _stored_bits_equal(a: np.ndarray, b: np.ndarray, bits_stored: int) -> bool:
    """Compare the stored bits only: pydicom sign-extends BitsStored < BitsAllocated, the stored bytes need not."""
    mask = (1 << bits_stored) - 1
    ua = a.astype(np.int64) & mask
    ub = b.astype(np.int64) & mask
    return bool(np.array_equal(ua, ub))


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_frames(path: Path) -> None:
    ds, want = decoded_or_skip(path)
    info = content.pixel_info(path)
    numbers = list(range(1, info.frames + 1))
    native = list(content.native_frames(path, numbers))
    stored = list(content.stored_frames(path, numbers))
    assert len(native) == len(stored) == info.frames
    rows, cols, spp = int(ds.Rows), int(ds.Columns), int(ds.get("SamplesPerPixel", 1))
    frames = want.reshape((info.frames, *want.shape[-3 if spp > 1 else -2 :]))
    ts = stored_ts(ds)
    if info.encapsulated:
        assert content.frame_media_type(ts) is not None
        assert stored == list(generate_frames(ds.PixelData, number_of_frames=info.frames))
        for i, f in enumerate(native):
            if int(ds.BitsAllocated) == 1:
                got = np.unpackbits(np.frombuffer(f, "u1"), bitorder="little")[: rows * cols].reshape(rows, cols)
            else:
                got = np.frombuffer(f, _dtype(ds)).reshape(frames[i].shape)
            assert np.array_equal(got, frames[i]), f"frame {i + 1}"
        return
    assert content.frame_media_type(ts) is None
    assert native == stored  # native syntaxes: the stored layout, little endian
    planar = int(ds.get("PlanarConfiguration", 0) or 0)
    pi = str(ds.PhotometricInterpretation)
    raw_frames = np.asarray(pixel_array(ds, as_rgb=False)).reshape(frames.shape)  # the stored samples, not RGB
    for i, f in enumerate(native):
        if int(ds.BitsAllocated) == 1:
            got = np.unpackbits(np.frombuffer(f, "u1"), bitorder="little")[: rows * cols].reshape(rows, cols)
            assert np.array_equal(got, raw_frames[i]), f"frame {i + 1}"
            continue
        if pi == "YBR_FULL_422":
            assert len(f) == rows * cols * 2 * int(ds.BitsAllocated) // 8  # subsampled as stored
            continue
        vals = np.frombuffer(f, _dtype(ds))
        if spp > 1 and planar == 1:
            vals = vals.reshape(spp, rows, cols).transpose(1, 2, 0)
        got = vals.reshape(raw_frames[i].shape)
        assert _stored_bits_equal(got, raw_frames[i], int(ds.BitsStored)), f"frame {i + 1}"


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_bulk_pixel_data(path: Path) -> None:
    ds, want = decoded_or_skip(path)
    info = content.pixel_info(path)
    if info.encapsulated:
        with pytest.raises(content.CannotConvert):
            content.bulk_value(path, content.PIXEL_DATA)
        return
    total, chunks = content.bulk_value(path, content.PIXEL_DATA)
    value = b"".join(chunks)
    assert len(value) == total
    assert total >= info.frames * info.frame_bits // 8
    if stored_ts(ds) in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        assert value == ds.PixelData  # the stored value, from the file
    elif int(ds.BitsAllocated) >= 8 and str(ds.PhotometricInterpretation) != "YBR_FULL_422":
        # big endian / deflated: little-endian native values equal to pydicom's decode
        le = dcmread(path)
        le.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        le.PixelData = value
        le._pixel_array = None
        le._pixel_id = {}
        assert np.array_equal(pixel_array(le), want)
    # a range is a slice of the whole
    n = min(total, 10)
    t2, part = content.bulk_value(path, content.PIXEL_DATA, start=3, end=3 + n)
    assert t2 == total and b"".join(part) == value[3 : 3 + n]


LE_TWINS = [
    ("MR_small_bigendian.dcm", "MR_small.dcm"),
    ("MR_small_expb.dcm", "MR_small.dcm"),
    ("rtdose_expb.dcm", "rtdose.dcm"),
    ("rtdose_expb_1frame.dcm", "rtdose_1frame.dcm"),
    ("SC_rgb_small_odd_big_endian.dcm", "SC_rgb_small_odd.dcm"),
    ("liver_expb_1frame.dcm", "liver_1frame.dcm"),
]


@pytest.mark.parametrize("be,le", LE_TWINS)
def test_big_endian_equals_its_little_endian_twin(be: str, le: str) -> None:
    """Independent of our swap rules: a converted big-endian file has the values of the same image stored LE."""
    out = io.BytesIO()
    transcode.write_converted(Path(get_testdata_file(be)), ExplicitVRLittleEndian, out)
    got = dcmread(io.BytesIO(out.getvalue()))
    twin = dcmread(get_testdata_file(le))
    assert got.PixelData[: len(twin.PixelData)] == twin.PixelData
    compared = 0
    for elem in twin:
        if elem.tag in got and elem.VR != "SQ" and elem.tag.group != 0x7FE0:
            if got[elem.tag].VR in ("US", "SS", "UL", "SL", "FL", "FD", "OW", "OF", "OB", "AT", "DS", "IS"):
                assert got[elem.tag].value == elem.value, elem.keyword
                compared += 1
    assert compared >= 5
    frames = list(content.native_frames(Path(get_testdata_file(be)), [1]))
    one = content.pixel_info(Path(get_testdata_file(le)))
    assert frames[0] == twin.PixelData[: one.frame_length]
    total, chunks = content.bulk_value(Path(get_testdata_file(be)), 0x00280010)  # Rows, US
    assert b"".join(chunks) == int(twin.Rows).to_bytes(2, "little") and total == 2


def test_big_endian_ow_elements_are_swapped() -> None:
    """Every byte value a big-endian file stores in 16-bit words (OW) comes out little endian."""
    ds = dcmread(get_testdata_file("MR_small.dcm"))
    ds.add_new(0x00091010, "OW", np.arange(6, dtype="<u2").tobytes())  # private OW
    ds.add_new(0x00091011, "OL", np.arange(3, dtype="<u4").tobytes())
    ds.add_new(0x00091012, "US", [1, 513])
    ds.add_new(0x00091013, "FD", 3.25)
    buf = io.BytesIO()
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    from pydicom.filewriter import dcmwrite

    # build a big-endian file with pydicom: swap the byte values it writes as they are
    be = dcmread(get_testdata_file("MR_small.dcm"))
    for tag, v in ((0x00091010, np.arange(6, dtype=">u2").tobytes()), (0x00091011, np.arange(3, dtype=">u4").tobytes())):
        be.add_new(tag, ds[tag].VR, v)
    be.add_new(0x00091012, "US", [1, 513])
    be.add_new(0x00091013, "FD", 3.25)
    be.PixelData = ds.pixel_array.astype(">i2").tobytes()
    be.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    dcmwrite(buf, be, implicit_vr=False, little_endian=False)
    src = Path(__file__).parent / "_be_tmp.dcm"
    try:
        src.write_bytes(buf.getvalue())
        assert dcmread(src).pixel_array.dtype.byteorder == ">"
        out = io.BytesIO()
        transcode.write_converted(src, ExplicitVRLittleEndian, out)  # explicit: the private VRs survive
    finally:
        src.unlink()
    got = dcmread(io.BytesIO(out.getvalue()))
    assert got[0x00091010].value == np.arange(6, dtype="<u2").tobytes()
    assert got[0x00091011].value == np.arange(3, dtype="<u4").tobytes()
    assert list(got[0x00091012].value) == [1, 513]
    assert got[0x00091013].value == 3.25
    assert np.array_equal(got.pixel_array, ds.pixel_array)


# --- the one policy ---------------------------------------------------------------------------


def test_choose_policy() -> None:
    mono16 = transcode.PixelFacts(True, 1, 16, "MONOCHROME2", 1, 12, 0, "", False, 64, 64)
    one_bit = transcode.PixelFacts(True, 1, 1, "MONOCHROME2", 1, 1, 0, "", False, 64, 64)
    jpeg = str(JPEGBaseline8Bit)
    # stored syntax listed: unchanged, wherever it is in the list (RAD-69)
    assert transcode.choose(jpeg, [ExplicitVRLittleEndian, jpeg], mono16) == transcode.Choice(jpeg, True)
    # else the first we can produce, in the requester's order
    assert transcode.choose(jpeg, ["1.2.840.10008.1.2.4.80", RLELossless, ExplicitVRLittleEndian], mono16) == transcode.Choice(RLELossless, False)
    # no facts: only unchanged/native
    assert transcode.choose(jpeg, [RLELossless, ImplicitVRLittleEndian]) == transcode.Choice(ImplicitVRLittleEndian, False)
    # pixels no encoder takes: skip to the next acceptable one, or nothing
    assert transcode.choose(ExplicitVRLittleEndian, [RLELossless, JPEG2000Lossless], one_bit) is None
    assert transcode.choose(ExplicitVRLittleEndian, [RLELossless, ImplicitVRLittleEndian], one_bit) == transcode.Choice(ImplicitVRLittleEndian, False)
    # an undecodable stored syntax: no native target unless there are no pixels
    private = "1.2.3.4.5.6.7"
    assert transcode.choose(private, [ExplicitVRLittleEndian]) is None
    assert transcode.choose(private, [ExplicitVRLittleEndian], transcode.PixelFacts(False)) == transcode.Choice(ExplicitVRLittleEndian, False)
    # big endian and deflated sources are decodable: a native target is offered
    for ts in (ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian):
        assert transcode.choose(ts, [ImplicitVRLittleEndian]) == transcode.Choice(ImplicitVRLittleEndian, False)
    # YBR JPEG decodes to RGB, which J2K takes
    ybr = transcode.PixelFacts(True, 3, 8, "YBR_FULL_422", 1, 8, 0, jpeg, False, 100, 100)
    assert transcode.choose(jpeg, [JPEG2000Lossless], ybr) == transcode.Choice(JPEG2000Lossless, False)


def test_frame_media_types() -> None:
    assert content.frame_media_type("1.2.840.10008.1.2.4.50") == "image/jpeg"
    assert content.frame_media_type("1.2.840.10008.1.2.4.80") == "image/jls"
    assert content.frame_media_type("1.2.840.10008.1.2.4.90") == "image/jp2"
    assert content.frame_media_type("1.2.840.10008.1.2.4.201") == "image/jphc"
    assert content.frame_media_type("1.2.840.10008.1.2.5") == "image/dicom-rle"
    assert content.frame_media_type(ExplicitVRLittleEndian) is None
    assert content.frame_media_type(ExplicitVRBigEndian) is None


def test_frame_errors() -> None:
    path = Path(get_testdata_file("MR_small.dcm"))
    with pytest.raises(content.NoSuchPart):
        list(content.native_frames(path, [2]))
    with pytest.raises(content.NoSuchPart):
        content.bulk_value(path, 0x00091099)
    with pytest.raises(content.RangeNotSatisfiable):
        content.bulk_value(path, content.PIXEL_DATA, start=10**6)


@pytest.mark.parametrize("be,le", [("MR_small_bigendian.dcm", "MR_small.dcm"), ("image_dfl.dcm", None), ("examples_ybr_color.dcm", None)])
def test_render_reads_big_endian_and_deflated(be: str, le: str | None) -> None:
    from PIL import Image

    from xdsi.render import renderer

    path = Path(get_testdata_file(be))
    ds, arr, _ = original(path)
    img = Image.open(io.BytesIO(_render(renderer, path)))
    assert img.size == (int(ds.Columns), int(ds.Rows))
    if le is not None:
        assert _render(renderer, path) == _render(renderer, Path(get_testdata_file(le)))


def _render(renderer: Any, path: Path) -> bytes:
    return renderer.render(path, content_type=renderer.PNG)


def _synthetic(tmp: Path, name: str, build: Any, ts: str) -> Path:
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import dcmwrite
    from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    build(ds)
    path = tmp / name
    dcmwrite(path, ds, implicit_vr=UID(ts).is_implicit_VR, little_endian=UID(ts).is_little_endian, enforce_file_format=True)
    return path


def test_one_bit_frames_not_on_byte_boundaries(tmp_path: Path) -> None:
    """1-bit frames of 3x3 pixels (9 bits each): each comes back bit-packed, re-based on its first bit."""
    from pydicom.pixels import pack_bits

    rng = np.random.default_rng(8)
    arr = rng.integers(0, 2, size=(3, 3, 3), dtype=np.uint8)

    def build(ds: Dataset) -> None:
        ds.Rows = ds.Columns = 3
        ds.NumberOfFrames = 3
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 1
        ds.HighBit, ds.PixelRepresentation = 0, 0
        ds.PixelData = pack_bits(arr)
        ds["PixelData"].VR = "OB"

    for ts in (ExplicitVRLittleEndian, ExplicitVRBigEndian):
        path = _synthetic(tmp_path, f"bits-{ts}.dcm", build, ts)
        frames = list(content.native_frames(path, [1, 2, 3]))
        assert frames == list(content.stored_frames(path, [1, 2, 3]))
        for i, f in enumerate(frames):
            assert len(f) == 2  # 9 bits, zero-padded to whole bytes
            got = np.unpackbits(np.frombuffer(f, "u1"), bitorder="little")[:9].reshape(3, 3)
            assert np.array_equal(got, pixel_array(dcmread(path), index=i)), (ts, i)
            assert np.array_equal(got, arr[i])


def test_float_pixel_data_big_endian(tmp_path: Path) -> None:
    """Float Pixel Data (OF) from a big-endian file: frames and bulk data as little-endian floats."""
    values = np.linspace(-1.5, 2.5, 2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)

    def build(ds: Dataset) -> None:
        ds.Rows = ds.Columns = 4
        ds.NumberOfFrames = 2
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = 32
        ds.FloatPixelData = values.astype(">f4").tobytes()

    path = _synthetic(tmp_path, "float-be.dcm", build, ExplicitVRBigEndian)
    frames = list(content.native_frames(path, [1, 2]))
    for i, f in enumerate(frames):
        assert np.array_equal(np.frombuffer(f, "<f4").reshape(4, 4), values[i])
    total, chunks = content.bulk_value(path, 0x7FE00008)
    assert total == values.nbytes and b"".join(chunks) == values.astype("<f4").tobytes()
    out = io.BytesIO()
    transcode.write_converted(path, ExplicitVRLittleEndian, out)
    got = dcmread(io.BytesIO(out.getvalue()))
    assert np.array_equal(np.frombuffer(got.FloatPixelData, "<f4").reshape(2, 4, 4), values)


def test_one_bit_ow_big_endian_is_refused(tmp_path: Path) -> None:
    """dcmtk and pydicom disagree on 1-bit OW big-endian bit order: a clear refusal, not a guess."""
    from pydicom.pixels import pack_bits

    def build(ds: Dataset) -> None:
        ds.Rows = ds.Columns = 4
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 1
        ds.HighBit, ds.PixelRepresentation = 0, 0
        ds.PixelData = pack_bits(np.eye(4, dtype=np.uint8))
        ds["PixelData"].VR = "OW"

    path = _synthetic(tmp_path, "bits-ow-be.dcm", build, ExplicitVRBigEndian)
    with pytest.raises(transcode.TranscodeError):
        transcode.write_converted(path, ExplicitVRLittleEndian, io.BytesIO())
    with pytest.raises(content.CannotConvert):
        list(content.native_frames(path, [1]))
    with pytest.raises(content.CannotConvert):
        content.bulk_value(path, content.PIXEL_DATA)
