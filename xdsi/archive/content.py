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


# ------------------------------------------------------------------------------------------------
# shim until conv lands: the CONTRACT.md names the retrieval service calls (conv's versions replace
# everything below; drop this block at merge).
# ------------------------------------------------------------------------------------------------

_NATIVE_LE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")


def dataset(path: Path) -> Dataset:  # shim until conv lands
    return dcmread(path)


def frame_media_type(ts: str) -> str | None:  # shim until conv lands
    from xdsi.web.media import FRAME_MEDIA_TYPES  # conv's table replaces this lookup

    types = FRAME_MEDIA_TYPES.get(ts)
    return types[0] if types else None


def stored_frames(path: Path, numbers: list[int]) -> Iterator[bytes]:  # shim until conv lands
    info = pixel_info(path)
    if info.encapsulated or info.transfer_syntax_uid in _NATIVE_LE:
        yield from iter_frames(path, numbers, as_stored=True)
        return
    yield from native_frames(path, numbers)


def native_frames(path: Path, numbers: list[int]) -> Iterator[bytes]:  # shim until conv lands
    info = pixel_info(path)
    check_frames(info, numbers)
    if not info.encapsulated and info.transfer_syntax_uid in _NATIVE_LE:
        yield from iter_frames(path, numbers, as_stored=True)
        return
    if not can_decode(info.transfer_syntax_uid):
        raise CannotConvert(f"frames in {info.transfer_syntax_uid} cannot be decoded here")
    source = path if info.encapsulated else dcmread(path)
    for n in numbers:
        try:
            arr = pixel_array(source, index=n - 1, as_rgb=True)
        except Exception as exc:
            raise CannotConvert(f"cannot decode frame {n}: {exc}") from None
        yield arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def bulk_value(path: Path, tag: int, start: int = 0, end: int | None = None) -> tuple[int, Iterator[bytes]]:  # shim until conv lands
    ts = transfer_syntax(_read(path))
    if ts in _NATIVE_LE:
        offset, length = bulk_range(path, tag)
        stop = length if end is None else min(end, length)
        return length, file_range(path, offset + start, max(0, stop - start))
    ds = dcmread(path)
    if tag not in ds:
        raise NoSuchPart(f"no element ({tag >> 16:04X},{tag & 0xFFFF:04X}) in the instance")
    if tag == PIXEL_DATA and ds.file_meta.TransferSyntaxUID.is_encapsulated:
        raise CannotConvert("the value is encapsulated; retrieve it through the frames resource")
    elem = ds[tag]
    value = elem.value
    if not isinstance(value, (bytes, bytearray)):
        raise CannotConvert(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) is not bulk data")
    if ds.original_encoding[1] is False and elem.VR in ("OW", "US or OW", "OL", "OF", "OD", "OV"):
        import numpy as np

        width = {"OW": 2, "US or OW": 2, "OL": 4, "OF": 4, "OD": 8, "OV": 8}[elem.VR]
        value = np.frombuffer(value, dtype=f">u{width}").astype(f"<u{width}").tobytes()
    data = bytes(value)
    stop = len(data) if end is None else min(end, len(data))
    return len(data), iter([data[start:stop]])
