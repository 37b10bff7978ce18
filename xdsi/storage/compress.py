"""Lossless compression of a stored instance, verified pixel for pixel before it may replace the original.

Used by the tier policy (a tier with ``compress``, xdsi.archive.lifecycle) and by
the store (``[storage] compress_on_receive``).  Only uncompressed image
instances are compressed: objects without pixel data (SR, KOS, PR ...), and
instances already stored compressed (lossless: nothing to gain; lossy:
re-encoding the decoded pixels would only grow them) are left as they are, as
are pixels our encoders do not take (float pixels, more than 16 bits, ...).

Verification (the patient-safety rule: a wrong pixel is worse than a refusal):
the compressed file is read back with pydicom and decoded by pydicom's own
decoder (pylibjpeg-openjpeg for JPEG 2000 and HTJ2K, not the encoder that
wrote it); its stored sample values (``raw``: no colour conversion) must equal
pydicom's decoding of the original, frame for frame, in shape and type, and
the identifying attributes (patient, study, series, instance, class) must be
unchanged.  Any difference raises :class:`CompressionMismatch` and the
compressed file is discarded; the caller keeps the original.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import UID

from xdsi.config import COMPRESS_METHODS
from xdsi.storage.tiers import StorageError

log = logging.getLogger(__name__)
DEFLATED = "1.2.840.10008.1.2.1.99"

# what must never change when only the pixel encoding does
IDENTITY = (
    "SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID", "IssuerOfPatientID",
    "PatientName", "PatientBirthDate", "AccessionNumber", "Rows", "Columns", "SamplesPerPixel", "BitsAllocated",
    "BitsStored", "PixelRepresentation", "PhotometricInterpretation", "NumberOfFrames",
)  # fmt: skip


class CompressionMismatch(StorageError):
    """The compressed copy does not give back the original: it is discarded, the original stays."""


@dataclass(frozen=True)
class Compressed:
    """A verified compressed file (in the caller's temporary place) and what it replaced."""

    path: Path
    transfer_syntax: str
    original_size: int
    size: int


def target_syntax(method: str) -> str:
    """The transfer syntax a ``compress`` method stores (``COMPRESS_METHODS``)."""
    return COMPRESS_METHODS[method]


def why_not(path: Path, target: str) -> str | None:
    """None when the instance at ``path`` is to be compressed to ``target``, else why it stays as it is."""
    from xdsi.archive import transcode

    try:
        f = transcode.facts(path)
    except Exception as exc:  # a header pydicom cannot read: not ours to rewrite
        return f"header unreadable ({exc.__class__.__name__})"
    if not f.has_pixel_data:
        return "no pixel data"
    ts = f.transfer_syntax_uid
    if ts == target:
        return "already in the target syntax"
    if ts not in transcode.NATIVE_SOURCES or ts == DEFLATED:  # deflated: the whole data set is compressed already
        name = UID(ts).name if ts else "an unknown syntax"
        return f"already compressed ({name})"
    if not transcode.can_encode_pixels(target, f):
        return (
            f"pixels the {UID(target).name} encoder does not take ({f.photometric_interpretation}, {f.samples_per_pixel} samples,"
            f" {f.bits_allocated}/{f.bits_stored} bits{', float' if f.float_pixels else ''})"
        )
    return None


def squeeze(src: Path, target: str, out: Path) -> tuple[Compressed | None, str]:
    """``src`` compressed to ``out`` and verified, or (None, why it stays as it is).

    Stays as it is: anything :func:`why_not` names, an encoder refusal
    (``TranscodeError``, e.g. samples outside Bits Stored), or a result that is
    not smaller than the original (tiny images: the codestream headers outweigh
    the pixels).  :class:`CompressionMismatch` (and OSError) are raised: the
    caller keeps the original and reports it.
    """
    from xdsi.archive.transcode import TranscodeError

    why = why_not(src, target)
    if why is not None:
        return None, why
    try:
        c = compress_to(src, target, out)
    except TranscodeError as exc:
        return None, f"encoder refused: {exc}"
    if c.size >= c.original_size:
        out.unlink(missing_ok=True)
        return None, f"no saving ({c.original_size} -> {c.size} bytes)"
    return c, ""


def reason_key(why: str) -> str:
    """The kind of a :func:`squeeze` reason, for counting: the text before its details."""
    return why.split(" (")[0].split(":")[0]


def compress_to(src: Path, target: str, out: Path) -> Compressed:
    """Write ``src`` losslessly compressed in ``target`` to ``out`` (fsynced) and verify it; raises on any failure.

    ``out`` is removed on failure.  :class:`CompressionMismatch` when the result
    does not decode to the original; ``transcode.TranscodeError`` when the
    encoder refuses or fails.
    """
    from xdsi.archive import transcode

    try:
        with open(out, "wb") as fh:
            transcode.write_converted(src, target, fh)
            fh.flush()
            os.fsync(fh.fileno())
        verify(src, out, target)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return Compressed(out, target, src.stat().st_size, out.stat().st_size)


def verify(original: Path, compressed: Path, target: str) -> None:
    """Raise :class:`CompressionMismatch` unless ``compressed`` is ``target`` and decodes to ``original``'s pixels."""
    import numpy as np
    from pydicom.pixels import pixel_array

    try:
        a = dcmread(original)
        b = dcmread(compressed)
    except Exception as exc:
        raise CompressionMismatch(f"cannot read back for verification: {exc.__class__.__name__}: {exc}") from exc
    got_ts = str(b.file_meta.get("TransferSyntaxUID", ""))
    if got_ts != target:
        raise CompressionMismatch(f"compressed file is {got_ts or 'without a transfer syntax'}, not {target}")
    for kw in IDENTITY:
        if str(a.get(kw, "")) != str(b.get(kw, "")):
            raise CompressionMismatch(f"{kw} changed in compression ({a.get(kw)!r} -> {b.get(kw)!r})")
    try:
        want = pixel_array(a, raw=True)
        got = pixel_array(b, raw=True)
    except Exception as exc:
        raise CompressionMismatch(f"compressed pixels do not decode: {exc.__class__.__name__}: {exc}") from exc
    if want.shape != got.shape or want.dtype.kind != got.dtype.kind or want.dtype.itemsize != got.dtype.itemsize:
        raise CompressionMismatch(f"decoded pixels are {got.dtype}{got.shape}, the original {want.dtype}{want.shape}")
    if not np.array_equal(want, got):
        diff = int(np.count_nonzero(want != got))
        raise CompressionMismatch(f"{diff} decoded sample(s) differ from the original")
