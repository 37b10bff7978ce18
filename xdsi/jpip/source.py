"""The codestream behind a JPIP target: the stored JPEG 2000 frame, or a verified lossless encoding of it.

Everything is read through the archive's :class:`RetrieveService` (this module
never opens a file).  An instance stored as JPEG 2000 (.90/.91) is served from
its own codestream when :mod:`xdsi.jpip.codestream` can cut it exactly; any
other JPIP-servable instance (the shared rule: Pixel Data whose pixels our
JPEG 2000 lossless encoder takes, ``transcode.can_encode_pixels``), and a
stored codestream the parser refuses (HTJ2K, POC, ...), is encoded losslessly
from the decoded frame with OpenJPEG (pylibjpeg-openjpeg), decoded again and
compared sample for sample before it is used: a JPIP client never sees pixels
that differ from pydicom's decoding of what we hold.  The encodings live in a
bounded, least-recently-used cache (by bytes); OpenJPEG's lossless encoding
is deterministic, so an evicted codestream comes back with the same bins and
the same target id.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
from pydicom.uid import JPEG2000, JPEG2000Lossless

from xdsi.archive import content, transcode
from xdsi.jpip.codestream import Codestream, Unsupported, explicit_precincts, parse

if TYPE_CHECKING:
    from xdsi.archive.retrieve import InstanceRef, RetrieveService

log = logging.getLogger(__name__)
J2K_STORED = (str(JPEG2000Lossless), str(JPEG2000))


class NoTarget(LookupError):
    """No instance with that SOP Instance UID, or it holds no image JPIP can serve (HTTP 404)."""


class NoStream(LookupError):
    """The instance has no frame with that codestream index (HTTP 404)."""


class EncodeFailed(RuntimeError):
    """The lossless encoding could not be made or did not decode to the same pixels (HTTP 503: refused, not guessed)."""


@dataclass(frozen=True)
class Served:
    """A parsed codestream and its target id (a digest: a client cache made from other bytes is not reused)."""

    codestream: Codestream
    tid: str
    stored: bool  # the stored codestream itself (not an encoding made here)
    frames: int


class CodestreamSource:
    def __init__(self, retrieve: "RetrieveService", cache_bytes: int) -> None:
        self.retrieve = retrieve
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[tuple[str, int], Served] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()

    def get(self, sop_uid: str, stream: int) -> Served:
        """The codestream of frame ``stream`` (0-based) of the instance; raises NoTarget, NoStream or EncodeFailed."""
        key = (sop_uid, stream)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        served = self._load(sop_uid, stream)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = served
                self._held += 2 * len(served.codestream.data)  # the codestream and its cut packets
                while self._held > self.cache_bytes and len(self._cache) > 1:
                    _k, old = self._cache.popitem(last=False)
                    self._held -= 2 * len(old.codestream.data)
        return served

    def _ref(self, sop_uid: str) -> "InstanceRef":
        refs = self.retrieve.select(sop_uids=[sop_uid])
        if not refs:
            raise NoTarget(f"no instance {sop_uid}")
        return refs[0]

    def _load(self, sop_uid: str, stream: int) -> Served:
        ref = self._ref(sop_uid)  # NotAvailable (no tier delivers it now) goes to the caller: 503, not 404
        try:
            info = self.retrieve.frame_info(ref)
        except content.NoSuchPart:
            raise NoTarget(f"instance {sop_uid} has no Pixel Data") from None
        except content.ContentError as exc:
            raise NoTarget(f"instance {sop_uid} cannot be read: {exc}") from None
        if not 0 <= stream < info.frames:
            raise NoStream(f"instance {sop_uid} has {info.frames} frame(s): stream {stream} does not exist")
        header = self.retrieve.header(ref)
        # the header is read without Pixel Data; frame_info has just found it
        facts = replace(transcode.facts_of(header), has_pixel_data=True)
        if info.transfer_syntax in J2K_STORED:
            stored = self._frame(ref, stream, stored=True)
            try:
                data = explicit_precincts(stored)
                cs = parse(data)
                _agrees(cs, facts)
                if data is not stored:
                    _same_pixels(stored, data)
                return Served(cs, _tid(data), True, info.frames)
            except Unsupported as exc:
                log.info("%s frame %d: stored codestream not cut (%s); serving a lossless re-encoding", sop_uid, stream, exc)
        if not transcode.can_encode_pixels(JPEG2000Lossless, facts) and info.transfer_syntax not in J2K_STORED:
            raise NoTarget(f"instance {sop_uid} holds pixels JPEG 2000 lossless cannot carry (not JPIP-servable)")
        pixels = _array(self._frame(ref, stream, stored=False), facts)
        data = _encode_verified(pixels, facts)
        try:
            return Served(parse(data), _tid(data), False, info.frames)
        except Unsupported as exc:  # our own encoder's output: never expected, refused rather than guessed
            raise EncodeFailed(f"the lossless encoding cannot be cut into JPIP bins: {exc}") from None

    def _frame(self, ref: "InstanceRef", stream: int, *, stored: bool) -> bytes:
        try:
            fs = self.retrieve.frames(ref, [stream + 1], stored=stored)
        except content.ContentError as exc:
            raise EncodeFailed(f"frame {stream + 1} of {ref.sop_instance_uid}: {exc}") from None
        try:
            return b"".join(b"".join(chunks) for _n, chunks in fs.parts())
        finally:
            fs.close()


def _tid(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def _array(frame: bytes, f: transcode.PixelFacts) -> np.ndarray:
    """The decoded frame (little endian, colour as RGB) as pydicom's pixel_array would give it."""
    if f.bits_allocated not in (8, 16):
        raise EncodeFailed(f"{f.bits_allocated}-bit samples are not encoded here")
    dtype = np.dtype(("<i" if f.pixel_representation else "<u") + str(f.bits_allocated // 8))
    spp = f.samples_per_pixel
    arr = np.frombuffer(frame, dtype=dtype)
    if arr.size != f.rows * f.columns * spp:
        raise EncodeFailed("the decoded frame does not have Rows x Columns x Samples per Pixel samples")
    arr = arr.reshape((f.rows, f.columns, spp) if spp > 1 else (f.rows, f.columns))
    stored = f.bits_stored or f.bits_allocated
    if stored < f.bits_allocated:  # what pydicom does: keep Bits Stored, sign-extended for signed pixels
        shift = f.bits_allocated - stored
        arr = (arr << shift) >> shift if f.pixel_representation else arr & ((1 << stored) - 1)
    return np.ascontiguousarray(arr)


def _encode_verified(pixels: np.ndarray, f: transcode.PixelFacts) -> bytes:
    from openjpeg import decode
    from openjpeg.utils import encode_array

    stored = f.bits_stored or f.bits_allocated
    rgb = f.samples_per_pixel == 3
    try:
        data = explicit_precincts(bytes(encode_array(pixels, bits_stored=stored, photometric_interpretation=1 if rgb else 0, use_mct=rgb)))
        back = np.asarray(decode(data))
    except Unsupported:
        raise
    except Exception as exc:  # openjpeg's own errors (RuntimeError, ValueError): this instance is refused
        raise EncodeFailed(f"JPEG 2000 lossless encoding failed: {exc.__class__.__name__}: {exc}") from None
    if back.shape != pixels.shape or not np.array_equal(back.astype(np.int64), pixels.astype(np.int64)):
        raise EncodeFailed("the JPEG 2000 lossless encoding does not decode to the same pixels: refused")
    return data


def _same_pixels(original: bytes, rewritten: bytes) -> None:
    """The precinct table written out changed no sample (OpenJPEG decodes both): else Unsupported, re-encode."""
    from openjpeg import decode

    try:
        same = np.array_equal(np.asarray(decode(original)), np.asarray(decode(rewritten)))
    except Exception as exc:  # a stored codestream OpenJPEG cannot decode: not served from its own bins
        raise Unsupported(f"OpenJPEG cannot decode it: {exc}") from None
    if not same:
        raise Unsupported("the codestream with explicit precincts decodes differently")


def _agrees(cs: Codestream, f: transcode.PixelFacts) -> None:
    """The codestream's samples are what the DICOM header says (else a client would read other values): Unsupported.

    A stored codestream whose SIZ differs from Pixel Representation / Bits Stored
    (some encoders wrote signed data as unsigned) is served as a re-encoding of
    pydicom's decoding, which applies the DICOM attributes.
    """
    if len(cs.samples) != f.samples_per_pixel:
        raise Unsupported(f"{len(cs.samples)} components for {f.samples_per_pixel} samples per pixel")
    stored = f.bits_stored or f.bits_allocated
    for depth, signed in cs.samples:
        if depth != stored or signed != bool(f.pixel_representation):
            raise Unsupported(f"codestream samples are {depth}-bit {'signed' if signed else 'unsigned'}, the header says "
                              f"{stored}-bit {'signed' if f.pixel_representation else 'unsigned'}")
