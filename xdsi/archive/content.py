"""Reading parts of a stored instance for the web retrieve paths: frames, bulk data, transcoding.

Called with a path from :meth:`RetrieveService.path`.  Frames of native
(uncompressed) Pixel Data are byte ranges of the file, read without decoding
anything; compressed frames are sent as stored or decoded one at a time.
Bulk data is located from the element's file offset, so a range request on a
large value reads only that range.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.pixels import pixel_array
from pydicom.uid import ExplicitVRLittleEndian

from xdsi.archive import transcode as transcode_service
from xdsi.storage.tiers import read_chunks

CHUNK = 1 << 20
PIXEL_DATA = 0x7FE00010
UNDEFINED_LENGTH = 0xFFFFFFFF


class ContentError(ValueError):
    """The requested part does not exist in the instance (HTTP 404) or cannot be produced (406)."""


class NoSuchPart(ContentError):
    pass


class CannotConvert(ContentError):
    pass


@dataclass(frozen=True)
class PixelInfo:
    transfer_syntax_uid: str
    frames: int
    frame_length: int  # bytes of one native frame (0 when encapsulated)
    value_offset: int  # file offset of the Pixel Data value
    value_length: int
    encapsulated: bool


def _read(path: Path) -> Dataset:
    return dcmread(path, defer_size=256)


def transfer_syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    return str(ts) if ts else ("1.2.840.10008.1.2" if ds.is_implicit_VR else str(ExplicitVRLittleEndian))


def pixel_info(path: Path) -> PixelInfo:
    ds = _read(path)
    if PIXEL_DATA not in ds:
        raise NoSuchPart("the instance has no Pixel Data")
    raw = ds.get_item(PIXEL_DATA, keep_deferred=True)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    length = int(raw.length)  # type: ignore[union-attr]
    encapsulated = length == UNDEFINED_LENGTH
    frame_length = 0
    if not encapsulated:
        rows, cols = int(ds.Rows), int(ds.Columns)
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.BitsAllocated)
        if bits % 8:
            raise CannotConvert("bit-packed Pixel Data (BitsAllocated not a multiple of 8) is not served as frames")
        frame_length = rows * cols * spp * bits // 8
    return PixelInfo(transfer_syntax(ds), frames, frame_length, int(raw.value_tell), length, encapsulated)  # type: ignore[union-attr]


def check_frames(info: PixelInfo, numbers: list[int]) -> None:
    for n in numbers:
        if not 1 <= n <= info.frames:
            raise NoSuchPart(f"frame {n} does not exist (the instance has {info.frames})")


def iter_frames(path: Path, numbers: list[int], *, as_stored: bool) -> Iterator[bytes]:
    """Each requested frame: as stored (compressed bitstream or native bytes) or decoded to native little-endian bytes."""
    info = pixel_info(path)
    check_frames(info, numbers)
    if not info.encapsulated:
        with open(path, "rb") as fh:
            for n in numbers:
                fh.seek(info.value_offset + (n - 1) * info.frame_length)
                yield fh.read(info.frame_length)
        return
    if as_stored:
        with open(path, "rb") as fh:
            for n in numbers:
                fh.seek(info.value_offset)
                yield get_frame(fh, n - 1, number_of_frames=info.frames)
        return
    if not can_decode(info.transfer_syntax_uid):
        raise CannotConvert(f"frames in {info.transfer_syntax_uid} cannot be decoded here")
    for n in numbers:
        try:
            arr = pixel_array(path, index=n - 1, as_rgb=False)
        except Exception as exc:
            raise CannotConvert(f"cannot decode frame {n}: {exc}") from None
        yield arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


can_decode = transcode_service.can_decode


def can_transcode(source_ts: str, target_ts: str) -> bool:
    """Only to Explicit VR Little Endian: from any syntax pydicom can read and decode."""
    return source_ts == target_ts or (target_ts == ExplicitVRLittleEndian and can_decode(source_ts))


def transcode(path: Path, target_ts: str) -> bytes:
    """A Part 10 file in ``target_ts`` (Explicit VR Little Endian), by the archive's one converter."""
    if target_ts != ExplicitVRLittleEndian:
        raise CannotConvert(f"transcoding to {target_ts} is not supported")
    try:
        return b"".join(transcode_service.transcoded_chunks(path, target_ts))
    except transcode_service.TranscodeError as exc:
        raise CannotConvert(str(exc)) from None


def bulk_range(path: Path, tag: int) -> tuple[int, int]:
    """(file offset, length) of the value of a top-level element with a defined length."""
    ds = _read(path)
    if tag not in ds:
        raise NoSuchPart(f"no element ({tag >> 16:04X},{tag & 0xFFFF:04X}) in the instance")
    raw = ds.get_item(tag, keep_deferred=True)
    length = int(getattr(raw, "length", 0))
    if length == UNDEFINED_LENGTH:
        raise CannotConvert("the value is encapsulated; retrieve it through the frames resource")
    return int(raw.value_tell), length  # type: ignore[union-attr]


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


file_chunks = read_chunks  # the stored file, unchanged
