"""Parts of a stored instance for the retrieve paths: frames, bulk data, the decoded dataset.

Pure: a path in, bytes (or a dataset) out; no index.  The retrieval service
finds the path; the adapters never read offsets themselves.

Frames (PS3.18 8.7.3, 10.4.1.1.2):

- :func:`stored_frames` gives each frame *as stored*: for an encapsulated
  syntax the frame's compressed bitstream (media type from
  :func:`frame_media_type`); for a native syntax the frame's bytes in the
  stored pixel layout (planar configuration as stored), little endian:
  inflated for Deflated Explicit VR LE, byte-swapped for Explicit VR Big
  Endian (as pydicom's decoder reads it).  A little-endian file's native
  frames are byte ranges of the file, read without decoding anything.
- :func:`native_frames` gives each frame decoded to native little-endian
  bytes.  Native syntaxes: the same bytes as :func:`stored_frames` (the
  layout the instance's metadata describes).  Compressed syntaxes: pydicom's
  decode, colour as RGB pixel-interleaved (the metadata of a JPEG YBR_FULL_422
  instance describes the stored bitstream, so a requester that wants exactly
  that should ask for the stored frame, ``transfer-syntax=*``).
- Bits Allocated 1: frames are returned bit-packed as stored (not unpacked to
  a byte per pixel); a frame that does not start on a byte boundary is
  re-packed from its first bit, zero-padded to a whole byte.

Bulk data (:func:`bulk_value`) is a range of the file when the instance is
stored little endian uncompressed, so a range request on a large value reads
only that range; otherwise it comes from the decoded, little-endian dataset.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.pixels import pack_bits, pixel_array
from pydicom.tag import Tag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from xdsi.archive import transcode as transcode_service

CHUNK = 1 << 20
PIXEL_INFO_CACHE = 8192  # files whose pixel layout is kept (a few hundred bytes each); errors are not cached
PIXEL_DATA = 0x7FE00010
PIXEL_TAGS = {0x7FE00010: "PixelData", 0x7FE00008: "FloatPixelData", 0x7FE00009: "DoubleFloatPixelData"}
UNDEFINED_LENGTH = 0xFFFFFFFF
# stored as they are in the file: byte ranges of the file are little-endian values
FILE_RANGE_SYNTAXES = (ImplicitVRLittleEndian, ExplicitVRLittleEndian)

# PS3.18 Table 8.7.3-5 (and 8.7.3-4 for video): media type of a compressed frame / bulk pixel value
FRAME_MEDIA_TYPES: dict[str, tuple[str, ...]] = {  # the standard's type first, then legacy x- names we accept
    "1.2.840.10008.1.2.4.50": ("image/jpeg",),
    "1.2.840.10008.1.2.4.51": ("image/jpeg",),
    "1.2.840.10008.1.2.4.57": ("image/jpeg",),
    "1.2.840.10008.1.2.4.70": ("image/jpeg",),
    "1.2.840.10008.1.2.4.80": ("image/jls", "image/x-jls"),
    "1.2.840.10008.1.2.4.81": ("image/jls", "image/x-jls"),
    "1.2.840.10008.1.2.4.90": ("image/jp2",),
    "1.2.840.10008.1.2.4.91": ("image/jp2",),
    "1.2.840.10008.1.2.4.92": ("image/jpx",),
    "1.2.840.10008.1.2.4.93": ("image/jpx",),
    "1.2.840.10008.1.2.4.201": ("image/jphc",),
    "1.2.840.10008.1.2.4.202": ("image/jphc",),
    "1.2.840.10008.1.2.4.203": ("image/jphc",),
    "1.2.840.10008.1.2.4.110": ("image/jxl",),
    "1.2.840.10008.1.2.4.111": ("image/jxl",),
    "1.2.840.10008.1.2.4.112": ("image/jxl",),
    "1.2.840.10008.1.2.5": ("image/dicom-rle", "image/x-dicom-rle"),
    "1.2.840.10008.1.2.4.100": ("video/mpeg2",),
    "1.2.840.10008.1.2.4.101": ("video/mpeg2",),
    "1.2.840.10008.1.2.4.102": ("video/mp4",),
    "1.2.840.10008.1.2.4.103": ("video/mp4",),
    "1.2.840.10008.1.2.4.104": ("video/mp4",),
    "1.2.840.10008.1.2.4.105": ("video/mp4",),
    "1.2.840.10008.1.2.4.106": ("video/mp4",),
    "1.2.840.10008.1.2.4.107": ("video/H265",),
    "1.2.840.10008.1.2.4.108": ("video/H265",),
}


class ContentError(ValueError):
    """The requested part does not exist in the instance (HTTP 404) or cannot be produced (406)."""


class NoSuchPart(ContentError):
    """No such element or frame (HTTP 404)."""


class CannotConvert(ContentError):
    """The part exists but cannot be given in the form asked for (HTTP 406)."""


class RangeNotSatisfiable(ContentError):
    """A byte range outside the value (HTTP 416)."""


@dataclass(frozen=True)
class PixelInfo:
    """Where and how the pixels of one instance are stored."""

    transfer_syntax_uid: str
    frames: int
    frame_length: int  # bytes of one native frame as stored (0 when encapsulated; whole bytes for 1-bit)
    value_offset: int  # file offset of the Pixel Data value (meaningful only when ``in_file``)
    value_length: int
    encapsulated: bool
    in_file: bool = False  # native frames are little-endian byte ranges of the file
    rows: int = 0
    columns: int = 0
    samples_per_pixel: int = 1
    bits_allocated: int = 0
    photometric_interpretation: str = ""
    planar_configuration: int = 0
    keyword: str = "PixelData"
    frame_bits: int = 0  # bits of one native frame (1-bit data is packed across frame boundaries)


def _read(path: Path) -> Dataset:
    return dcmread(path, defer_size=256)


def transfer_syntax(ds: Dataset) -> str:
    return transcode_service.source_transfer_syntax(ds)


def dataset(path: Path) -> Dataset:
    """The whole instance, little-endian normalised: big-endian values swapped, deflated data inflated.

    pydicom decodes the pixels of the result with the usual calls; the SOP
    Instance UID and everything else is as stored.
    """
    ds = dcmread(path)
    ts = transfer_syntax(ds)
    if ts == ExplicitVRBigEndian or ds.original_encoding[1] is False:
        try:
            transcode_service.to_little_endian(ds)
        except transcode_service.TranscodeError as exc:
            raise CannotConvert(str(exc)) from None
    elif ts == DeflatedExplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


WHOLE_DATASET_SYNTAXES = (ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian)  # no frame can be read in place


def frame_array(path: Path, index: int, *, as_rgb: bool = True) -> np.ndarray:
    """pydicom's decode of one frame (0-based), reading only that frame; from the whole dataset when the file needs it.

    pydicom's file-level reader assumes the encoding the transfer syntax
    names; a dataset encoded otherwise (implicit VR under an explicit syntax,
    which pydicom's dataset reader detects) is decoded from the dataset.
    """
    try:
        return pixel_array(path, index=index, as_rgb=as_rgb)
    except Exception:
        ds = dcmread(path)
        if transfer_syntax(ds) in WHOLE_DATASET_SYNTAXES:
            ds = dataset(path)
        return pixel_array(ds, index=index, as_rgb=as_rgb)


def pixel_info(path: Path) -> PixelInfo:
    """Where and how the pixels of the file at ``path`` are stored; parsed once per file version.

    A frame request used to parse the header twice (negotiation, then the frames) and every
    viewer that opened the study again parsed it again.  The answer depends only on the file's
    bytes, so it is kept per (path, inode, size, mtime): a replaced or rewritten file is a new
    key and is parsed afresh.
    """
    st = os.stat(path)
    return _cached_pixel_info(str(path), st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=PIXEL_INFO_CACHE)
def _cached_pixel_info(path: str, _ino: int, _size: int, _mtime_ns: int) -> PixelInfo:
    return _pixel_info(_read(Path(path)))


def _pixel_info(ds: Dataset) -> PixelInfo:
    tag = next((t for t in PIXEL_TAGS if t in ds), None)
    if tag is None:
        raise NoSuchPart("the instance has no Pixel Data")
    keyword = PIXEL_TAGS[tag]
    raw = ds.get_item(tag, keep_deferred=True)
    ts = transfer_syntax(ds)
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        rows, cols = int(ds.Rows), int(ds.Columns)
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = {"FloatPixelData": 32, "DoubleFloatPixelData": 64}.get(keyword) or int(ds.BitsAllocated)
        planar = int(ds.get("PlanarConfiguration", 0) or 0)
    except (AttributeError, TypeError, ValueError) as exc:
        raise CannotConvert(f"the image pixel description is incomplete or invalid ({exc})") from None
    length = int(getattr(raw, "length", 0))
    encapsulated = length == UNDEFINED_LENGTH
    # native YBR_FULL_422 is stored subsampled: two samples a pixel (PS3.3 C.7.6.3.1.2)
    samples = 2 if str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422" and spp == 3 else spp
    frame_bits = rows * cols * samples * bits
    frame_length = 0 if encapsulated else (frame_bits + 7) // 8
    in_file = not encapsulated and ts in FILE_RANGE_SYNTAXES and getattr(raw, "value_tell", None) is not None
    return PixelInfo(
        transfer_syntax_uid=ts,
        frames=frames,
        frame_length=frame_length,
        value_offset=int(getattr(raw, "value_tell", 0) or 0),
        value_length=length,
        encapsulated=encapsulated,
        in_file=in_file,
        rows=rows,
        columns=cols,
        samples_per_pixel=spp,
        bits_allocated=bits,
        photometric_interpretation=str(ds.get("PhotometricInterpretation", "") or ""),
        planar_configuration=planar,
        keyword=keyword,
        frame_bits=frame_bits,
    )


def check_frames(info: PixelInfo, numbers: list[int]) -> None:
    if not numbers:
        raise NoSuchPart("no frame numbers were given")
    for n in numbers:
        if not 1 <= n <= info.frames:
            raise NoSuchPart(f"frame {n} does not exist (the instance has {info.frames})")
    if not info.encapsulated and info.value_length != UNDEFINED_LENGTH:
        needed = (info.frames * info.frame_bits + 7) // 8
        if info.in_file and info.value_length < needed:
            raise CannotConvert(f"the Pixel Data value is {info.value_length} bytes, {needed} are needed for {info.frames} frames")


def frame_media_type(ts: str) -> str | None:
    """PS3.18 Table 8.7.3-5: the media type of a frame stored in ``ts``; None for native (uncompressed) syntaxes."""
    types = FRAME_MEDIA_TYPES.get(str(ts))
    return types[0] if types else None


def _native_frame(value: bytes | memoryview, info: PixelInfo, n: int) -> bytes:
    """Frame ``n`` (1-based) of a native little-endian value."""
    if info.bits_allocated % 8 == 0:
        start = (n - 1) * info.frame_length
        data = bytes(value[start : start + info.frame_length])
    else:
        data = _bit_frame(value, info, n)
    if len(data) != info.frame_length:
        raise CannotConvert(f"frame {n} is truncated in the stored Pixel Data")
    return data


def _bit_frame(value: bytes | memoryview, info: PixelInfo, n: int) -> bytes:
    """A bit-packed frame, re-packed to start on a byte boundary (PS3.5 8.1.1: LSB first)."""
    first = (n - 1) * info.frame_bits
    if first % 8 == 0 and info.frame_bits % 8 == 0:
        return bytes(value[first // 8 : first // 8 + info.frame_length])
    lo, hi = first // 8, (first + info.frame_bits + 7) // 8
    bits = np.unpackbits(np.frombuffer(bytes(value[lo:hi]), dtype="u1"), bitorder="little")
    start = first - lo * 8
    return np.packbits(bits[start : start + info.frame_bits], bitorder="little").tobytes()


def stored_frames(path: Path, numbers: list[int]) -> Iterator[bytes]:
    """Each requested frame as stored: the compressed bitstream, or the native frame in little endian."""
    info = pixel_info(path)
    check_frames(info, numbers)
    if info.encapsulated:
        with open(path, "rb") as fh:
            for n in numbers:
                fh.seek(info.value_offset)
                try:
                    yield get_frame(fh, n - 1, number_of_frames=info.frames)
                except (ValueError, KeyError, EOFError) as exc:
                    raise CannotConvert(f"cannot locate frame {n} in the encapsulated Pixel Data: {exc}") from None
        return
    yield from _native_stored(path, info, numbers)


def _native_stored(path: Path, info: PixelInfo, numbers: list[int]) -> Iterator[bytes]:
    if info.in_file:
        with open(path, "rb") as fh:
            for n in numbers:
                if info.bits_allocated % 8 == 0:
                    fh.seek(info.value_offset + (n - 1) * info.frame_length)
                    data = fh.read(info.frame_length)
                    if len(data) != info.frame_length:
                        raise CannotConvert(f"frame {n} is truncated in the stored Pixel Data")
                    yield data
                else:
                    first = (n - 1) * info.frame_bits
                    lo, hi = first // 8, (first + info.frame_bits + 7) // 8
                    fh.seek(info.value_offset + lo)
                    chunk = fh.read(hi - lo)
                    yield _bit_frame_at(chunk, info, first - lo * 8)
        return
    ds = dataset(path)
    value = ds[info.keyword].value
    for n in numbers:
        yield _native_frame(value, info, n)


def _bit_frame_at(chunk: bytes, info: PixelInfo, bit_offset: int) -> bytes:
    if bit_offset == 0 and info.frame_bits % 8 == 0:
        data = chunk[: info.frame_length]
    else:
        bits = np.unpackbits(np.frombuffer(chunk, dtype="u1"), bitorder="little")
        data = np.packbits(bits[bit_offset : bit_offset + info.frame_bits], bitorder="little").tobytes()
    if len(data) != info.frame_length:
        raise CannotConvert("a frame is truncated in the stored Pixel Data")
    return data


def native_frames(path: Path, numbers: list[int]) -> Iterator[bytes]:
    """Each requested frame decoded to native little-endian bytes (compressed colour as RGB, pixel-interleaved)."""
    info = pixel_info(path)
    check_frames(info, numbers)
    if not info.encapsulated:
        yield from _native_stored(path, info, numbers)
        return
    if not transcode_service.can_decode(info.transfer_syntax_uid):
        raise CannotConvert(f"frames in {info.transfer_syntax_uid} cannot be decoded here")
    for n in numbers:
        try:
            arr = frame_array(path, n - 1)
        except Exception as exc:  # pydicom/pylibjpeg raise many kinds for undecodable data
            raise CannotConvert(f"cannot decode frame {n}: {exc.__class__.__name__}: {exc}") from None
        if info.bits_allocated == 1:
            yield pack_bits(arr)
        else:
            yield arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def bulk_value(path: Path, tag: int, start: int = 0, end: int | None = None) -> tuple[int, Iterator[bytes]]:
    """(total length, chunks of bytes ``start:end``) of a top-level element's value, in little-endian encoding.

    A file range when the instance is stored little endian uncompressed;
    otherwise encoded from the little-endian normalised dataset.  An
    encapsulated (compressed) Pixel Data value is refused: its frames are the
    retrievable parts.
    """
    tag = int(Tag(tag))
    ds = _read(path)
    if tag not in ds:
        raise NoSuchPart(f"no element ({tag >> 16:04X},{tag & 0xFFFF:04X}) in the instance")
    raw = ds.get_item(tag, keep_deferred=True)
    length = int(getattr(raw, "length", 0) or 0)
    if length == UNDEFINED_LENGTH or getattr(raw, "VR", None) == "SQ":
        raise CannotConvert("the value is a sequence or encapsulated; retrieve it through the frames or metadata resources")
    if transfer_syntax(ds) in FILE_RANGE_SYNTAXES and getattr(raw, "value_tell", None) is not None:
        s, e = _bounds(length, start, end)
        return length, file_range(path, int(raw.value_tell) + s, e - s)  # type: ignore[union-attr]
    value = _le_value(dataset(path), tag)
    s, e = _bounds(len(value), start, end)
    return len(value), iter([value[s:e]] if e > s else [])


def _le_value(ds: Dataset, tag: int) -> bytes:
    elem = ds[tag]
    if elem.VR == "SQ":
        raise CannotConvert("the value is a sequence; retrieve it through the metadata resource")
    if isinstance(elem.value, (bytes, bytearray)):
        return bytes(elem.value)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    write_data_element(fp, elem, ds.get("SpecificCharacterSet", "iso8859"))
    return fp.getvalue()[8:]  # implicit VR LE: tag (4) + length (4), then the value


def _bounds(total: int, start: int, end: int | None) -> tuple[int, int]:
    e = total if end is None else min(end, total)
    if start < 0 or e < start or (start >= total and total > 0):
        raise RangeNotSatisfiable(f"range {start}-{end} is not within a value of {total} bytes")
    return start, e


def file_range(path: Path, start: int, length: int) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        yield from _copy(fh, start, length)


def _copy(fh: BinaryIO, start: int, length: int) -> Iterator[bytes]:
    fh.seek(start)
    left = length
    while left > 0:
        chunk = fh.read(min(CHUNK, left))
        if not chunk:
            break
        left -= len(chunk)
        yield chunk


