"""Choosing and producing a transfer syntax for a retrieved instance (RAD-69, WADO).

Rules (RAD TF-3 4.69.4.2.3 as quoted by Gazelle RAD69-005/006): the instance
goes out unchanged when its stored transfer syntax was requested; otherwise
it is converted to the first requested syntax we can produce, in the order
the requester listed them; otherwise the request fails for that instance.
We produce Explicit and Implicit VR Little Endian (decompressing whatever
pydicom's installed decoders can read), JPEG 2000 lossless and lossy and
RLE Lossless (pylibjpeg-openjpeg / pydicom's RLE encoder).

The unchanged case streams the stored file.  A converted instance is built
in a spooled temporary file, so only one instance at a time is ever in
memory, and only up to the spool threshold.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from xdsi.storage.tiers import read_chunks

CHUNK = 256 * 1024
SPOOL_MEMORY = 8 * 1024 * 1024
NATIVE_TARGETS = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
COMPRESSED_TARGETS = (JPEG2000Lossless, JPEG2000, RLELossless)
J2K_LOSSY_RATIO = 10.0  # compression ratio for JPEG 2000 (lossy) output


class TranscodeError(ValueError):
    """The instance cannot be converted to the chosen transfer syntax."""


def is_known_transfer_syntax(uid: str) -> bool:
    return UID(uid).is_transfer_syntax


def can_decode(ts: str) -> bool:
    """pydicom (with the installed plugins) can decode pixel data stored in ``ts``."""
    if ts in NATIVE_TARGETS or ts == "1.2.840.10008.1.2.2":  # big endian is native too
        return True
    from pydicom.pixels import get_decoder

    try:
        return bool(get_decoder(ts).is_available)
    except (NotImplementedError, ValueError):
        return False


def can_encode(ts: str) -> bool:
    """``ts`` is a target we produce and its encoder is installed."""
    if ts in NATIVE_TARGETS:
        return True
    if ts not in COMPRESSED_TARGETS:
        return False
    from pydicom.pixels import get_encoder

    try:
        return bool(get_encoder(ts).is_available)
    except (NotImplementedError, ValueError):
        return False


@dataclass(frozen=True)
class Choice:
    """The transfer syntax an instance will be sent in; ``unchanged`` means the stored bytes as they are."""

    transfer_syntax: str
    unchanged: bool


def choose(stored_ts: str, requested: list[str], *, has_pixel_data: bool | None = None, samples_per_pixel: int = 1, bits_allocated: int = 16) -> Choice | None:
    """Pick the transfer syntax for one instance, or None when no requested one can be produced.

    ``has_pixel_data`` etc. come from the instance header; ``None`` means not
    read yet, in which case only the unchanged choice and native targets are
    considered (they need no knowledge of the pixels).
    """
    if stored_ts in requested:
        return Choice(stored_ts, True)
    for ts in requested:
        if ts in NATIVE_TARGETS:
            if has_pixel_data is False or can_decode(stored_ts):
                return Choice(ts, False)
        elif ts in COMPRESSED_TARGETS and has_pixel_data and can_encode(ts) and can_decode(stored_ts):
            if ts in (JPEG2000Lossless, JPEG2000) and (samples_per_pixel not in (1, 3) or bits_allocated > 16):
                continue
            return Choice(ts, False)
    return None


def header(path: Path) -> Dataset:
    return dcmread(path, stop_before_pixels=True)


def convert(ds: Dataset, target: str) -> None:
    """Re-encode ``ds`` in place; the SOP Instance UID never changes (the consumer asked for that instance)."""
    source = str(ds.file_meta.TransferSyntaxUID)
    has_pixels = "PixelData" in ds
    if has_pixels and UID(source).is_compressed:
        ds.decompress(generate_instance_uid=False)
    if target in NATIVE_TARGETS:
        ds.file_meta.TransferSyntaxUID = UID(target)
        return
    if not has_pixels:
        raise TranscodeError("the instance has no pixel data to compress")
    kwargs: dict[str, object] = {}
    if target == JPEG2000:
        kwargs["j2k_cr"] = [J2K_LOSSY_RATIO]
    ds.compress(target, generate_instance_uid=False, **kwargs)  # type: ignore[arg-type]
    if target == JPEG2000:
        # PS3.3 C.7.6.1.1.5: a lossy compressed image says so
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = [*list(ds.get("LossyImageCompressionRatio") or []), J2K_LOSSY_RATIO]
        ds.LossyImageCompressionMethod = [*list(ds.get("LossyImageCompressionMethod") or []), "ISO_15444_1"]


def converted(path: Path, target: str) -> Dataset:
    """The instance at ``path`` decoded and re-encoded in ``target``: one instance in memory."""
    try:
        ds = dcmread(path)
        convert(ds, target)
    except TranscodeError:
        raise
    except Exception as exc:  # pydicom/pylibjpeg raise many kinds for undecodable data
        raise TranscodeError(f"cannot convert to {target}: {exc.__class__.__name__}: {exc}") from exc
    return ds


def transcoded_chunks(path: Path, target: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
    """The instance at ``path`` re-encoded in ``target``, as a Part 10 file, in chunks."""
    ds = converted(path, target)
    with tempfile.SpooledTemporaryFile(SPOOL_MEMORY) as f:
        ds.save_as(f, enforce_file_format=True)
        del ds
        f.seek(0)
        while True:
            b = f.read(chunk_size)
            if not b:
                return
            yield b


file_chunks_of = read_chunks  # the stored file as it is, in chunks: the unchanged case


# ------------------------------------------------------------------------------------------------
# shim until conv lands: the CONTRACT.md names the retrieval service calls (conv's versions replace
# everything below; drop this block at merge).
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PixelFacts:  # shim until conv lands
    has_pixel_data: bool
    samples_per_pixel: int = 1
    bits_allocated: int = 16
    photometric_interpretation: str = ""
    number_of_frames: int = 1


def facts(path: Path) -> PixelFacts:  # shim until conv lands
    ds = header(path)
    return PixelFacts(
        has_pixel_data="Rows" in ds and "BitsAllocated" in ds,
        samples_per_pixel=int(ds.get("SamplesPerPixel", 1) or 1),
        bits_allocated=int(ds.get("BitsAllocated", 16) or 16),
        photometric_interpretation=str(ds.get("PhotometricInterpretation", "") or ""),
        number_of_frames=int(ds.get("NumberOfFrames", 1) or 1),
    )


_choose_keywords = choose  # shim until conv lands


def choose(stored_ts: str, accepted, facts: PixelFacts | None = None) -> Choice | None:  # type: ignore[no-redef,no-untyped-def]  # shim until conv lands
    if facts is None:
        return _choose_keywords(stored_ts, list(accepted))
    return _choose_keywords(
        stored_ts,
        list(accepted),
        has_pixel_data=facts.has_pixel_data,
        samples_per_pixel=facts.samples_per_pixel,
        bits_allocated=facts.bits_allocated,
    )


def write_converted(path: Path, target: str, out) -> None:  # type: ignore[no-untyped-def]  # shim until conv lands
    ds = converted(path, target)
    try:
        ds.save_as(out, enforce_file_format=True)
    except Exception as exc:
        raise TranscodeError(f"cannot write {target}: {exc.__class__.__name__}: {exc}") from exc
