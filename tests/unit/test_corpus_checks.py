"""The checks of the every-object acceptance test pass on right answers and fail, for the right reason, on wrong ones.

tests/integration/test_every_object.py is only as strict as
:mod:`tests.support.corpus`; here each check meets answers built by hand
(no server): the stored file itself, and the defects issue 8 measured
(unswapped big endian, a wrong label, YCbCr served as RGB, a new SOP Instance
UID, a changed byte, a deflate stream served as pixels).
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.support.corpus import (
    DEFLATED_LE,
    EXPLICIT_BE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    Answer,
    CorpusFile,
    Sent,
    check_instance,
    check_native_pixels,
    corpus,
    make_copy,
    part10,
    split_part10,
)


def by_name(name: str) -> CorpusFile:
    return next(f for f in corpus() if f.name == name)


def stored_copy(name: str, tmp_path: Path) -> Sent:
    s = make_copy(by_name(name), "stow", tmp_path)
    s.stored = s.data
    return s


def relabel(data: bytes, ts: str) -> bytes:
    meta, dataset = split_part10(data)
    return part10(dataset, ts, meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID)


def converted(s: Sent, *, as_rgb: bool = True, photometric: str | None = None) -> bytes:
    """``s`` decoded by pydicom into Explicit VR LE (what a correct converter produces, unless told otherwise)."""
    ds = dcmread(io.BytesIO(s.data))
    ds.pixel_array_options(as_rgb=as_rgb)
    arr = ds.pixel_array
    ds.PixelData = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    ds["PixelData"].VR = "OW" if ds.BitsAllocated > 8 else "OB"
    ds["PixelData"].is_undefined_length = False
    if ds.SamplesPerPixel == 3:
        ds.PhotometricInterpretation = photometric or ("RGB" if as_rgb else ds.PhotometricInterpretation)
        ds.PlanarConfiguration = 0
    if s.transfer_syntax in ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"):
        ds.LossyImageCompression = "01"
    ds.file_meta.TransferSyntaxUID = EXPLICIT_LE
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=False, little_endian=True, enforce_file_format=True)
    return buf.getvalue()


def test_every_decodable_file_passes_as_its_own_stored_answer(tmp_path: Path) -> None:
    for f in corpus():
        if f.skip:
            continue
        s = stored_copy(f.name, tmp_path)
        check_instance(Answer(s.data, label=s.transfer_syntax), s, expect_ts=s.transfer_syntax, whole_file=True)
        check_instance(Answer(s.data), s, whole_file=False)


def test_correct_conversion_passes_and_ycbcr_labelled_rgb_fails(tmp_path: Path) -> None:
    s = stored_copy("SC_rgb_dcmtk_+eb+cy+np.dcm", tmp_path)  # JPEG baseline, YBR_FULL_422
    check_instance(Answer(converted(s)), s, expect_ts=EXPLICIT_LE, whole_file=True)
    # decoded without the colour transform but labelled RGB: the teal false colours OHIF showed
    with pytest.raises(AssertionError, match="samples differ from pydicom's decoding of the original"):
        check_instance(Answer(converted(s, as_rgb=False, photometric="RGB")), s, whole_file=True)
    # decoded native YBR_FULL correctly labelled is still right: compared as RGB
    check_instance(Answer(converted(s, as_rgb=False, photometric="YBR_FULL")), s, whole_file=True)


def test_wrong_labels_fail(tmp_path: Path) -> None:
    be = stored_copy("MR_small_bigendian.dcm", tmp_path)
    with pytest.raises(AssertionError, match="byte order is not the labelled one"):
        check_instance(Answer(relabel(be.data, EXPLICIT_LE)), be, whole_file=True)
    le = stored_copy("CT_small.dcm", tmp_path)
    with pytest.raises(AssertionError, match="labelled Implicit VR Little Endian but the first element carries VR"):
        check_instance(Answer(relabel(le.data, IMPLICIT_LE)), le, whole_file=True)
    with pytest.raises(AssertionError, match="expected 1.2.840.10008.1.2 "):
        check_instance(Answer(le.data), le, expect_ts=IMPLICIT_LE, whole_file=True)
    with pytest.raises(AssertionError, match="answer labelled"):
        check_instance(Answer(le.data, label=IMPLICIT_LE), le, whole_file=True)
    dfl = stored_copy("image_dfl.dcm", tmp_path)
    meta, dataset = split_part10(dfl.data)
    inflated = zlib.decompressobj(-zlib.MAX_WBITS).decompress(dataset)
    with pytest.raises(AssertionError, match="does not inflate"):
        check_instance(Answer(part10(inflated, DEFLATED_LE, meta.MediaStorageSOPClassUID, dfl.sop)), dfl, whole_file=True)


def test_new_uid_or_changed_byte_fails(tmp_path: Path) -> None:
    s = stored_copy("CT_small.dcm", tmp_path)
    ds = dcmread(io.BytesIO(s.data))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with pytest.raises(AssertionError, match="SOP Instance UID changed"):
        check_instance(Answer(buf.getvalue()), s, whole_file=True)
    tampered = s.data.replace(b"CT_small", b"CT_SMALL") if b"CT_small" in s.data else s.data[:-1] + bytes([s.data[-1] ^ 1])
    assert tampered != s.data
    with pytest.raises(AssertionError):
        check_instance(Answer(tampered), s, whole_file=True)


def test_native_frames_unswapped_or_compressed_fail(tmp_path: Path) -> None:
    be = by_name("MR_small_bigendian.dcm")  # 16-bit
    raw = be.ds.PixelData  # big endian words, as stored
    swapped = np.frombuffer(raw, dtype=">u2").astype("<u2").tobytes()
    check_native_pixels(swapped, EXPLICIT_LE, be, [1])
    with pytest.raises(AssertionError, match="samples differ"):
        check_native_pixels(raw, EXPLICIT_LE, be, [1])  # the "unswapped but labelled little endian"
    with pytest.raises(AssertionError, match="not little endian"):
        check_native_pixels(swapped, EXPLICIT_BE, be, [1])
    dfl = by_name("image_dfl.dcm")
    check_native_pixels(dfl.ds.PixelData, EXPLICIT_LE, dfl, [1])
    deflate_stream = zlib.compress(dfl.ds.PixelData)
    with pytest.raises(AssertionError, match="expected for 1 native frame"):
        check_native_pixels(deflate_stream, EXPLICIT_LE, dfl, [1])
    ybr = by_name("examples_ybr_color.dcm")  # 30-frame JPEG baseline YBR_FULL_422: frames decoded to RGB
    check_native_pixels(ybr.pixels[2].tobytes(), EXPLICIT_LE, ybr, [3])
    with pytest.raises(AssertionError, match="samples differ"):
        check_native_pixels(ybr.pixels[3].tobytes(), EXPLICIT_LE, ybr, [3])  # another frame
