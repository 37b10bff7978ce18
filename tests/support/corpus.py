"""pydicom's bundled test files as a corpus nobody on this project wrote, and the checks every retrieval must pass.

The reference for every pixel is pydicom's own decoding of the ORIGINAL
bundled file (colour as RGB); the reference for every byte is what the archive
stored.  The checks read the answers with pydicom and numpy only, never with
xdsi code, so an xdsi mistake cannot hide behind itself.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np
import pydicom
from pydicom import dcmread
from pydicom.data import get_testdata_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, generate_uid

IMPLICIT_LE = UID("1.2.840.10008.1.2")
EXPLICIT_LE = UID("1.2.840.10008.1.2.1")
DEFLATED_LE = UID("1.2.840.10008.1.2.1.99")
EXPLICIT_BE = UID("1.2.840.10008.1.2.2")
NATIVE = {IMPLICIT_LE, EXPLICIT_LE, DEFLATED_LE, EXPLICIT_BE}
LOSSY_DCT = {UID("1.2.840.10008.1.2.4.50"), UID("1.2.840.10008.1.2.4.51")}  # always lossy (PS3.5 8.2.1)

# PS3.18 Table 8.7.3-5: the media type of a frame in each compressed transfer syntax
FRAME_MEDIA_TYPES = {
    **dict.fromkeys(["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70"], "image/jpeg"),
    **dict.fromkeys(["1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"], "image/jls"),
    **dict.fromkeys(["1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"], "image/jp2"),
    **dict.fromkeys(["1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.93"], "image/jpx"),
    **dict.fromkeys(["1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"], "image/jphc"),
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}
EXPLICIT_VRS = {
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"OB", b"OD", b"OF", b"OL",
    b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM", b"UC", b"UI", b"UL", b"UN", b"UR", b"US",
    b"UT", b"UV",
}
PIXEL_MODULE = (
    "SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration", "Rows", "Columns", "BitsAllocated",
    "BitsStored", "HighBit", "PixelRepresentation",
)  # fmt: skip


def decode(src: bytes | Path) -> np.ndarray:
    """pydicom's decoding of a Part 10 file, every frame, colour as RGB (YBR_* converted; RGB, palette unchanged)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(io.BytesIO(src) if isinstance(src, bytes) else src)
        ds.pixel_array_options(as_rgb=True)
        return ds.pixel_array


@dataclass(frozen=True)
class CorpusFile:
    """One bundled file with Pixel Data; ``skip`` says why pydicom cannot decode it here."""

    path: Path
    skip: str | None

    @property
    def name(self) -> str:
        return self.path.name

    @cached_property
    def ds(self) -> Dataset:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dcmread(self.path)

    @property
    def transfer_syntax(self) -> UID:
        return UID(self.ds.file_meta.TransferSyntaxUID)

    @property
    def encapsulated(self) -> bool:
        return self.transfer_syntax not in NATIVE

    @property
    def frames(self) -> int:
        return int(self.ds.get("NumberOfFrames") or 1)

    @cached_property
    def pixels(self) -> np.ndarray:
        """All frames, shape (frames, rows, columns[, samples]), as pydicom decodes the original, colour as RGB."""
        arr = decode(self.path)
        return arr if self.frames > 1 else arr[np.newaxis]

    @cached_property
    def encapsulated_frames(self) -> list[bytes]:
        return list(generate_frames(self.ds.PixelData, number_of_frames=self.frames))


@lru_cache(maxsize=1)
def corpus() -> tuple[CorpusFile, ...]:
    """Every file directly in pydicom's ``test_files`` holding Pixel Data (the DICOMDIR trees are left out)."""
    out = []
    for f in sorted(get_testdata_files(), key=lambda p: Path(p).name):
        p = Path(f)
        if p.parent.name != "test_files" or not p.is_file():
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = dcmread(p, force=True, stop_before_pixels=False)
        except Exception:
            continue
        if "PixelData" not in ds:
            continue
        skip = None
        try:
            decode(p)
        except Exception as exc:
            skip = f"pydicom {pydicom.__version__} cannot decode it here: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        if skip is None and "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
            skip = "no Transfer Syntax UID in its File Meta"
        out.append(CorpusFile(p, skip))
    return tuple(out)


# -- the objects sent to the archive ------------------------------------------------------------------


@dataclass
class Sent:
    """One copy of a corpus file with new Study/Series/SOP Instance UIDs, as sent over ``route``."""

    source: CorpusFile
    route: str  # "cstore" or "stow"
    path: Path
    study: str = ""
    series: str = ""
    sop: str = ""
    sop_class: str = ""
    stored: bytes = b""  # the archived Part 10 file, read from the server's data directory after storing
    store_error: str | None = None

    @property
    def id(self) -> str:
        return f"{self.source.name}-{self.route}"

    @property
    def transfer_syntax(self) -> UID:
        return self.source.transfer_syntax

    @cached_property
    def data(self) -> bytes:
        return self.path.read_bytes()


def make_copy(src: CorpusFile, route: str, out_dir: Path) -> Sent:
    """Rewrite ``src`` with new Study/Series/SOP Instance UIDs (file meta too); everything else as pydicom read it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(src.path)
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    out = out_dir / f"{route}-{src.name}"
    ts = src.transfer_syntax
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # SC_rgb_jpeg.dcm is labelled explicit VR but encoded implicit VR: send it encoded as labelled
        for elem in ds.iterall():
            if elem.VR is None:
                elem.VR = pydicom.datadict.dictionary_VR(elem.tag)
        # same transfer syntax: BE stays BE, deflated is deflated again
        ds.save_as(out, implicit_vr=ts.is_implicit_VR, little_endian=ts.is_little_endian, enforce_file_format=True)
    sent = Sent(src, route, out, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), str(ds.SOPClassUID))
    # the rewrite itself must not touch the pixels or the encoding
    meta, _ = split_part10(sent.data)
    assert meta.TransferSyntaxUID == src.transfer_syntax, src.name
    again = decode(sent.data)
    assert np.array_equal(again if src.frames > 1 else again[np.newaxis], src.pixels), f"rewriting {src.name} changed its pixels"
    return sent


# -- reading answers ----------------------------------------------------------------------------------


def split_part10(data: bytes) -> tuple[FileMetaDataset, bytes]:
    """(File Meta, the data set bytes after it) of a Part 10 file; asserts the preamble and DICM prefix."""
    assert len(data) > 132 and data[128:132] == b"DICM", "not a DICOM Part 10 file (no DICM prefix)"
    pos = 132
    while pos + 8 <= len(data):
        group = struct.unpack_from("<H", data, pos)[0]
        if group != 0x0002:
            break
        vr = data[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV", b"SV", b"UV"):
            pos += 12 + struct.unpack_from("<I", data, pos + 8)[0]
        else:
            pos += 8 + struct.unpack_from("<H", data, pos + 6)[0]
    fp = io.BytesIO(data)
    pydicom.filereader.read_preamble(fp, False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta = pydicom.filereader._read_file_meta_info(fp)
    assert fp.tell() == pos, "File Meta group length disagrees with its elements"
    return meta, data[pos:]


def part10(dataset: bytes, transfer_syntax: str, sop_class: str, sop: str) -> bytes:
    """A Part 10 file around data set bytes received over DIMSE, labelled with the presentation context's syntax."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    buf = io.BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)  # type: ignore[arg-type]
    return buf.getvalue() + dataset


def assert_encoded_as(dataset: bytes, ts: str) -> None:
    """The data set bytes really are in ``ts``: byte order, VR form, deflate, read from its first element."""
    if ts == DEFLATED_LE:
        try:
            dataset = zlib.decompressobj(-zlib.MAX_WBITS).decompress(dataset)
        except zlib.error as exc:
            raise AssertionError(f"labelled {ts} (deflated) but the data set does not inflate: {exc}") from None
    assert len(dataset) >= 8, f"labelled {ts} but the data set has {len(dataset)} bytes"
    little = ts != EXPLICIT_BE
    group = struct.unpack_from("<H" if little else ">H", dataset, 0)[0]
    assert group == 0x0008, (
        f"labelled {ts} ({'little' if little else 'big'} endian) but the first element's group reads "
        f"{group:04X} (expected 0008): the byte order is not the labelled one"
    )
    looks_explicit = dataset[4:6] in EXPLICIT_VRS
    if ts == IMPLICIT_LE:
        assert not looks_explicit, f"labelled Implicit VR Little Endian but the first element carries VR {dataset[4:6]!r}"
    else:
        assert looks_explicit, f"labelled {ts} (explicit VR) but the first element has no VR: {dataset[:8].hex()}"


@dataclass
class Answer:
    """What one retrieval gave back for one object: a Part 10 file, or why there is none."""

    data: bytes | None = None  # Part 10 (DIMSE answers wrapped with the context's syntax by :func:`part10`)
    error: str | None = None
    label: str | None = None  # transfer syntax announced outside the file (multipart parameter), if any
    extra: dict = field(default_factory=dict)


def check_instance(
    answer: Answer,
    sent: Sent,
    *,
    expect_ts: str | None = None,
    whole_file: bool,
) -> None:
    """The acceptance checks for an instance answer.

    * it exists; the File Meta's (and any outer label's) transfer syntax is the real encoding;
    * SOP Instance, Series and Study UIDs unchanged;
    * in the stored syntax: byte-identical to what was stored (whole Part 10 file for web/SOAP answers,
      the data set after the File Meta for DIMSE, whose receiver writes its own meta);
    * pixels equal pydicom's decoding of the ORIGINAL bundled file, colour as RGB;
    * a DCT-JPEG original decompressed says Lossy Image Compression 01 (PS3.3 C.7.6.1.1.5).
    """
    assert answer.error is None, answer.error
    assert answer.data is not None
    meta, dataset = split_part10(answer.data)
    ts = UID(meta.TransferSyntaxUID)
    if answer.label is not None:
        assert answer.label == ts, f"answer labelled {answer.label} but its File Meta says {ts}"
    if expect_ts is not None:
        assert ts == expect_ts, f"answered in {ts} ({ts.name}), expected {expect_ts} ({UID(expect_ts).name})"
    assert_encoded_as(dataset, ts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.filterwarnings("error", message=r"Expected (explicit|implicit) VR")
        ds = dcmread(io.BytesIO(answer.data))
    assert ds.SOPInstanceUID == sent.sop, f"SOP Instance UID changed: {ds.SOPInstanceUID} != {sent.sop}"
    assert meta.MediaStorageSOPInstanceUID == sent.sop, "File Meta SOP Instance UID is not the instance's"
    assert (ds.StudyInstanceUID, ds.SeriesInstanceUID) == (sent.study, sent.series), "Study/Series Instance UID changed"
    if ts == sent.transfer_syntax:
        if whole_file:
            assert answer.data == sent.stored, "answer in the stored syntax is not byte-identical to the stored file"
        else:
            assert dataset == split_part10(sent.stored)[1], "data set in the stored syntax is not byte-identical to the stored one"
    else:
        assert "PixelData" in ds
        assert ds["PixelData"].is_undefined_length == (ts not in NATIVE), f"Pixel Data encapsulation does not match {ts}"
    got = decode(answer.data)
    assert_same_pixels(got if sent.source.frames > 1 else got[np.newaxis], sent.source.pixels, f"{ts.name} answer")
    if ts != sent.transfer_syntax and sent.transfer_syntax in LOSSY_DCT and ts in NATIVE:
        assert ds.get("LossyImageCompression") == "01", "decompressed lossy JPEG without Lossy Image Compression 01"


def assert_same_pixels(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.shape == want.shape, f"{what}: pixel array shape {got.shape} != original {want.shape}"
    if not np.array_equal(got, want):
        diff = got.astype(np.int64) != want.astype(np.int64)
        delta = np.abs(got.astype(np.int64) - want.astype(np.int64)).max()
        raise AssertionError(f"{what}: {int(diff.sum())} of {diff.size} samples differ from pydicom's decoding of the original (max |diff| {delta})")


def _pixel_dataset(src: CorpusFile, pixel_data: bytes, frames: int, *, decoded_colour: bool) -> bytes:
    """A minimal Explicit VR LE Part 10 file with ``src``'s Image Pixel module around received pixel bytes."""
    ds = Dataset()
    for kw in PIXEL_MODULE:
        if kw in src.ds:
            setattr(ds, kw, src.ds[kw].value)
    if decoded_colour and int(src.ds.SamplesPerPixel) == 3:
        ds.PhotometricInterpretation, ds.PlanarConfiguration = "RGB", 0
    ds.NumberOfFrames = frames
    ds.PixelData = pixel_data
    ds["PixelData"].VR = "OW" if int(src.ds.BitsAllocated) > 8 else "OB"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = EXPLICIT_LE
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.7")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def native_length(src: CorpusFile, frames: int) -> int:
    """Bytes of ``frames`` frames of ``src``'s pixels in a native syntax (bit-packed, YBR_FULL_422 subsampled)."""
    ds = Dataset()
    for kw in PIXEL_MODULE:
        if kw in src.ds:
            setattr(ds, kw, src.ds[kw].value)
    ds.NumberOfFrames = frames
    return int(pydicom.pixels.utils.get_expected_length(ds, unit="bytes"))


def check_native_pixels(data: bytes, label: str | None, src: CorpusFile, frame_numbers: list[int], *, whole_value: bool = False) -> None:
    """Native pixel bytes (frames or a whole Pixel Data value) equal the original's pixels.

    ``whole_value``: the bytes are the whole Pixel Data value (bulk data) rather than frames.
    Stored native: the bytes are the stored layout in little endian (inflated, byte-swapped), read with the
    original's Image Pixel module.  Stored compressed: decoded, little endian, colour RGB pixel-interleaved.
    """
    assert label in (None, EXPLICIT_LE, IMPLICIT_LE), f"native pixel bytes labelled {label}: not little endian"
    frames = len(frame_numbers)
    if src.encapsulated:
        want = src.pixels[[n - 1 for n in frame_numbers]]
        assert len(data) == want.nbytes, f"{len(data)} bytes, {want.nbytes} expected for decoded native pixels"
        got = np.frombuffer(data, dtype=want.dtype.newbyteorder("<")).reshape(want.shape)
        assert_same_pixels(got, want, "decoded native pixels")
        return
    # a whole Pixel Data value keeps any padding the file has; frames are exactly the frame's bytes
    expected = len(src.ds.PixelData) if whole_value else native_length(src, frames)
    what = "the whole Pixel Data value" if whole_value else f"{frames} native frame(s)"
    assert len(data) == expected, f"{len(data)} bytes, {expected} expected for {what}"
    got = decode(_pixel_dataset(src, data, frames, decoded_colour=False))
    assert_same_pixels(got if frames > 1 else got[np.newaxis], src.pixels[[n - 1 for n in frame_numbers]], "native pixels")


__all__ = [
    "Answer", "CorpusFile", "DEFLATED_LE", "EXPLICIT_BE", "EXPLICIT_LE", "FRAME_MEDIA_TYPES", "IMPLICIT_LE", "NATIVE",
    "Sent", "assert_encoded_as", "assert_same_pixels", "check_instance", "check_native_pixels", "corpus", "decode",
    "make_copy", "native_length", "part10", "split_part10",
]  # fmt: skip
