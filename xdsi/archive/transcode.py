"""Choosing and producing a transfer syntax for a retrieved instance: the archive's one conversion layer.

Pure: paths in, bytes out; no index, no tiers.  Every retrieve path (RAD-69,
ITI-43, WADO-URI, WADO-RS, C-GET/C-MOVE) uses :func:`choose` for the policy
and :func:`write_converted` for the bytes.

Policy (RAD TF-3 4.69.4.2.3 as quoted by Gazelle RAD69-005/006): the instance
goes out unchanged when its stored transfer syntax was requested; otherwise
it is converted to the first requested syntax we can produce, in the order
the requester listed them; otherwise the request fails for that instance.
We produce Explicit and Implicit VR Little Endian, Explicit VR Big Endian and
Deflated Explicit VR Little Endian (from every syntax pydicom and the
installed plugins decode), JPEG 2000 lossless and lossy and RLE Lossless
(pylibjpeg-openjpeg / pydicom's RLE encoder) for the pixel layouts pydicom's
encoders accept, and HTJ2K (.201 Lossless, .202 Lossless RPCL, .203, always a
reversible codestream) through the encoder :mod:`xdsi.archive.htj2k` adds to
pydicom.  Big endian and deflated are produced because a C-GET
requester may accept one of them for a whole SOP class: every instance of
that class on the association must then go out in it, whatever it is stored
in.

Conversion rules (PS3.5 8.2, PS3.3 C.7.6.1.1.5):

- Big endian -> little endian: pydicom re-encodes every decoded value (US, UL,
  FL, AT ...) itself when asked to write another encoding; the byte values
  (OW, OL, OF, OD, OV) it writes as they are, so :func:`to_little_endian`
  swaps them first.  Pixel Data is swapped by Bits Allocated (16 -> 2-byte,
  32 -> 4-byte words; 8-bit data encoded as OW pairwise), exactly as
  pydicom's own decoder reads it; OB is never swapped.  1-bit Pixel Data as
  OW is refused: dcmtk and pydicom disagree on its bit order.  Big-endian element
  values of VR UN (unknown private data) cannot be swapped without knowing
  their VR and are left as they are.
- Little endian -> big endian is the same swap (a byte reversal is its own
  inverse), after ambiguous VRs are resolved from the little-endian values.
  Pixel Data with Bits Allocated <= 8 is written as OB (PS3.5 A.3 allows OB
  or OW; OB needs no swap, so 8-bit and 1-bit pixels have one reading in
  pydicom and dcmtk alike).  Pixel Data (OW) of more than 16 bits allocated
  is refused in big endian: dcmtk swaps its 16-bit words, pydicom its 32-bit
  words.  Element values of VR UN stay as they are, as in
  the other direction.
- Deflated: the Explicit VR Little Endian dataset, deflated by pydicom's
  ``dcmwrite`` (PS3.5 A.5; the file meta group stays uncompressed).
- Decompressed colour becomes RGB (PhotometricInterpretation RGB,
  PlanarConfiguration 0): pydicom's ``decompress(as_rgb=True)``.
- Once lossy, always says so: LossyImageCompression "01" and its ratio/method
  are kept; an image decoded from a lossy-only process (JPEG baseline or
  extended) without the attribute gets "01" and method ISO_10918_1; lossy
  JPEG 2000 output adds "01", our ratio and ISO_15444_1.
- The SOP Instance UID never changes (pydicom 3's decompress()/compress()
  would generate a new one unless told not to).

A converted instance is built in memory one instance at a time and written
to a spool file the caller owns; any decoder or encoder failure is raised as
:class:`TranscodeError` before a byte is written.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Iterator, Sequence

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filewriter import correct_ambiguous_vr, dcmwrite
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    RLELossless,
)

if TYPE_CHECKING:
    from xdsi.archive.coercion import Identity  # issue 15: patient attributes coerced on retrieve

from xdsi.archive import htj2k  # registers the HTJ2K encoders with pydicom (Dataset.compress, get_encoder)


CHUNK = 256 * 1024
SPOOL_MEMORY = 8 * 1024 * 1024
# uncompressed targets: produced from every decodable instance, no pixel encoder needed
NATIVE_TARGETS = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian)
# HTJ2K: every codestream we write is reversible (xdsi.archive.htj2k), so .203 output is lossless too
HTJ2K_TARGETS = htj2k.SYNTAXES  # (HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K)
COMPRESSED_TARGETS = (JPEG2000Lossless, JPEG2000, RLELossless, *HTJ2K_TARGETS)
# uncompressed syntaxes we read without a pixel decoder (pydicom parses them itself)
NATIVE_SOURCES = (ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian)
J2K_LOSSY_RATIO = 10.0  # compression ratio for JPEG 2000 (lossy) output
J2K_MIN_SIZE = 32  # openjpeg's default 6 resolution levels need 2**5 pixels in each direction
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# decoding these always loses information (DCT processes of ISO 10918-1)
LOSSY_ONLY_SOURCES = {
    JPEGBaseline8Bit: "ISO_10918_1",
    JPEGExtended12Bit: "ISO_10918_1",
}
# byte-valued VRs and the width of the words a big-endian file stores them in
SWAP_WIDTH = {"OW": 2, "OL": 4, "OF": 4, "OD": 8, "OV": 8}


class TranscodeError(ValueError):
    """The instance cannot be converted to the chosen transfer syntax."""


def is_known_transfer_syntax(uid: str) -> bool:
    try:
        return UID(uid).is_transfer_syntax
    except (TypeError, ValueError):
        return False


def can_decode(ts: str) -> bool:
    """pydicom (with the installed plugins) can decode pixel data stored in ``ts``."""
    if ts in NATIVE_SOURCES:
        return True
    from pydicom.pixels import get_decoder

    try:
        return bool(get_decoder(ts).is_available)
    except (NotImplementedError, ValueError):
        return False


def can_encode(ts: str) -> bool:
    """``ts`` is a target we produce and its encoder is installed (for some pixels: see :func:`can_encode_pixels`)."""
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
class PixelFacts:
    """What the policy needs to know about an instance's pixels, from its header alone."""

    has_pixel_data: bool
    samples_per_pixel: int = 1
    bits_allocated: int = 16
    photometric_interpretation: str = "MONOCHROME2"
    number_of_frames: int = 1
    bits_stored: int | None = None
    pixel_representation: int = 0
    transfer_syntax_uid: str = ""
    float_pixels: bool = False  # Float/Double Float Pixel Data: no encoder takes them
    rows: int = 0  # 0: not known
    columns: int = 0

    def decoded_photometric(self) -> str:
        """The photometric interpretation after decoding: compressed YCbCr colour comes out RGB."""
        pi = self.photometric_interpretation
        ts = self.transfer_syntax_uid
        if self.samples_per_pixel == 3 and ts and ts not in NATIVE_SOURCES and pi.startswith("YBR"):
            return "RGB"
        return pi


def facts(path: Path) -> PixelFacts:
    """The pixel facts of the instance at ``path``, from its header (large values are not read)."""
    ds = dcmread(path, defer_size=1024)
    return facts_of(ds)


def facts_of(ds: Dataset) -> PixelFacts:
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""
    has_px = any(k in ds for k in PIXEL_KEYWORDS)

    def _int(keyword: str, default: int) -> int:
        try:
            v = ds.get(keyword)
            return int(v) if v not in (None, "") else default
        except (TypeError, ValueError):
            return default

    bits_allocated = _int("BitsAllocated", 0)
    return PixelFacts(
        has_pixel_data=has_px,
        samples_per_pixel=_int("SamplesPerPixel", 1),
        bits_allocated=bits_allocated,
        photometric_interpretation=str(ds.get("PhotometricInterpretation", "") or "").strip(),
        number_of_frames=_int("NumberOfFrames", 1) or 1,
        bits_stored=_int("BitsStored", bits_allocated),
        pixel_representation=_int("PixelRepresentation", 0),
        transfer_syntax_uid=ts,
        float_pixels="PixelData" not in ds and has_px,
        rows=_int("Rows", 0),
        columns=_int("Columns", 0),
    )


def can_encode_pixels(target: str, f: PixelFacts) -> bool:
    """Our encoder for ``target`` takes these pixels (pydicom's encoding profiles, checked from the header)."""
    if target in NATIVE_TARGETS:
        return target != ExplicitVRBigEndian or not _big_endian_ambiguous(f)
    if not f.has_pixel_data or f.float_pixels or not can_encode(target):
        return False
    from pydicom.pixels.encoders.base import ENCODING_PROFILES

    pi = f.decoded_photometric()
    bits_stored = f.bits_stored or f.bits_allocated
    if target in (JPEG2000Lossless, JPEG2000) and (f.bits_allocated > 16 or bits_stored > 16):
        # openjpeg's encoder (through pylibjpeg) is limited to 16-bit samples here
        return False
    if target in (JPEG2000Lossless, JPEG2000) and 0 < min(f.rows or J2K_MIN_SIZE, f.columns or J2K_MIN_SIZE) < J2K_MIN_SIZE:
        # openjpeg encodes 6 resolution levels (not configurable through pydicom): 32 pixels a side at least
        return False
    for profile_pi, spp, reps, allocs, stored in ENCODING_PROFILES.get(UID(target), []):
        if (
            profile_pi == pi
            and spp == f.samples_per_pixel
            and f.pixel_representation in reps
            and f.bits_allocated in allocs
            and bits_stored in stored
        ):
            return True
    return False


def _big_endian_ambiguous(f: PixelFacts) -> bool:
    """Pixel Data (OW) with more than 16 bits allocated has no agreed big-endian reading.

    OW is a stream of 16-bit words (PS3.5 7.3): dcmtk swaps each 16-bit word,
    pydicom's decoder reads 32-bit pixels as 4-byte big-endian words.  An image
    one of them reads wrong is refused rather than sent.  Float and Double
    Float Pixel Data (OF, OD) have one reading and are produced.
    """
    return f.has_pixel_data and not f.float_pixels and f.bits_allocated > 16


def depends_on_pixels(ts: str) -> bool:
    """Whether we can produce ``ts`` only for some pixels: the header must be read before choosing it."""
    return ts == ExplicitVRBigEndian or (ts not in NATIVE_TARGETS and can_encode(ts))


@dataclass(frozen=True)
class Choice:
    """The transfer syntax an instance will be sent in; ``unchanged`` means the stored bytes as they are."""

    transfer_syntax: str
    unchanged: bool


def preference(accepted: Sequence[str]) -> list[str]:
    """The requester's order, except that JPEG 2000 lossless goes before JPEG 2000 (lossy) when both are listed.

    A requester listing both accepts the image without loss; producing the lossy
    one first would throw information away that the requester could have had
    (issue 11 item 7).  Every other syntax keeps its place.
    """
    order = [str(t) for t in accepted]
    if JPEG2000 in order and JPEG2000Lossless in order and order.index(JPEG2000) < order.index(JPEG2000Lossless):
        order.remove(JPEG2000Lossless)
        order.insert(order.index(JPEG2000), JPEG2000Lossless)
    return order


def choose(stored_ts: str, accepted: Sequence[str], facts: PixelFacts | None = None) -> Choice | None:
    """THE transfer-syntax policy: the syntax to send one instance in, or None when none accepted can be produced.

    The stored syntax, when accepted, means unchanged (no conversion, no loss);
    otherwise the first accepted syntax, in the requester's order (JPEG 2000 lossless
    before lossy when both are listed, :func:`preference`), that we can
    produce: a native target when there are no pixels or we can decode the
    stored syntax (big endian not for Pixel Data of more than 16 bits, see
    :func:`_big_endian_ambiguous`); a compressed target only when we can
    decode the stored pixels and encode these pixels.  ``facts=None`` means
    the header has not been read: only the unchanged and native choices are
    considered (big endian included; :func:`write_converted` refuses the
    pixels it cannot write, before anything is sent).
    """
    accepted = preference(accepted)
    if stored_ts in accepted:
        return Choice(stored_ts, True)
    for ts in accepted:
        if ts in NATIVE_TARGETS:
            if facts is not None and not facts.has_pixel_data:
                return Choice(ts, False)
            if can_decode(stored_ts) and (facts is None or can_encode_pixels(ts, facts)):
                return Choice(ts, False)
        elif ts in COMPRESSED_TARGETS and facts is not None and can_decode(stored_ts):
            f = facts if facts.transfer_syntax_uid else _with_ts(facts, stored_ts)
            if can_encode_pixels(ts, f):
                return Choice(ts, False)
    return None


def _with_ts(f: PixelFacts, ts: str) -> PixelFacts:
    from dataclasses import replace

    return replace(f, transfer_syntax_uid=ts)


def source_transfer_syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts:
        return str(ts)
    implicit, little = ds.original_encoding
    if little is False:
        return str(ExplicitVRBigEndian)
    return str(ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian)


def _swap(value: bytes, width: int) -> bytes:
    """Reverse the bytes of each ``width``-byte word: big -> little endian, and (its own inverse) little -> big."""
    import numpy as np

    if width < 2 or not value:
        return value
    pad = (-len(value)) % width
    arr = np.frombuffer(bytes(value) + b"\x00" * pad, dtype=f">u{width}")
    return arr.astype(f"<u{width}").tobytes()[: len(value)]


def _pixel_swap_width(ds: Dataset, keyword: str, vr: str) -> int:
    """How a big-endian file stores this pixel element: the word width pydicom's decoder reads it with."""
    if keyword == "FloatPixelData":
        return 4
    if keyword == "DoubleFloatPixelData":
        return 8
    if vr == "OB":
        return 1
    bits = int(ds.get("BitsAllocated", 16) or 16)
    if bits == 1:
        # readers disagree: dcmtk swaps the 16-bit words, pydicom's decoder reads them unswapped.
        # A refusal is safer than an image that may be scrambled (no pydicom test file has this case).
        raise TranscodeError(
            "1-bit Pixel Data encoded as OW in Explicit VR Big Endian has no agreed bit order (dcmtk swaps 16-bit words,"
            " pydicom does not); refused rather than risk a wrong image"
        )
    if bits <= 8:
        return 2  # 8-bit data as OW: pairwise, as pydicom's decoder reads it
    return bits // 8


def to_little_endian(ds: Dataset) -> None:
    """Swap every byte-valued element of a dataset read from a big-endian file, in place, recursively.

    pydicom re-encodes decoded values (US, SL, FD, AT ...) in the encoding it
    writes; OB/OW/OL/OF/OD/OV values are bytes it writes as they are, so they
    must be swapped here.  The caller then writes with a little-endian
    transfer syntax.
    """
    _swap_dataset(ds, top=True)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID") == ExplicitVRBigEndian:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds._pixel_array = None  # type: ignore[attr-defined]
    ds._pixel_id = {}  # type: ignore[attr-defined]


def to_big_endian(ds: Dataset) -> None:
    """Swap every byte-valued element of a little-endian dataset to big endian, in place, recursively.

    The inverse of :func:`to_little_endian`, by the same rules (the swap is
    its own inverse).  Ambiguous VRs (``US or SS``, ``OB or OW`` from an
    implicit VR file) are resolved first, from the little-endian values, so
    each value is swapped by the VR it is written with.  Pixel Data with Bits
    Allocated <= 8 becomes OB: nothing to swap, no disagreement among readers
    about 1-bit OW.  The caller then writes with Explicit VR Big Endian.
    """
    if _big_endian_ambiguous(facts_of(ds)):
        raise TranscodeError(
            f"Pixel Data with {ds.get('BitsAllocated')} bits allocated as OW has no agreed Explicit VR Big Endian"
            " reading (dcmtk swaps 16-bit words, pydicom 32-bit words); refused rather than risk a wrong image"
        )
    correct_ambiguous_vr(ds, is_little_endian=True)
    if "PixelData" in ds and not ds["PixelData"].is_undefined_length and int(ds.get("BitsAllocated", 16) or 16) <= 8:
        ds["PixelData"].VR = "OB"
    _swap_dataset(ds, top=True)
    ds._pixel_array = None  # type: ignore[attr-defined]
    ds._pixel_id = {}  # type: ignore[attr-defined]


def _swap_dataset(ds: Dataset, top: bool, swap: bool = True) -> None:
    for elem in ds:  # iterating parses raw elements with their own (big-endian) encoding
        if elem.VR == "SQ":
            for item in elem.value or []:
                _swap_dataset(item, top=False, swap=swap)
            continue
        if not swap or not isinstance(elem.value, (bytes, bytearray)) or elem.is_undefined_length:
            continue
        if top and elem.keyword in PIXEL_KEYWORDS:
            width = _pixel_swap_width(ds, elem.keyword, elem.VR)
        else:
            width = SWAP_WIDTH.get(elem.VR, 1)
        if width > 1:
            elem.value = _swap(elem.value, width)


def _mark_lossy(ds: Dataset, source: str) -> None:
    """PS3.3 C.7.6.1.1.5: an image decoded from a lossy-only process says it was lossy compressed."""
    method = LOSSY_ONLY_SOURCES.get(UID(source))
    if method and str(ds.get("LossyImageCompression", "") or "") != "01":
        ds.LossyImageCompression = "01"
        if "LossyImageCompressionMethod" not in ds:
            ds.LossyImageCompressionMethod = method


def convert(ds: Dataset, target: str) -> None:
    """Re-encode ``ds`` in place for ``target``; the SOP Instance UID never changes (the consumer asked for that instance)."""
    source = source_transfer_syntax(ds)
    has_pixels = any(k in ds for k in PIXEL_KEYWORDS)
    if ds.original_encoding[1] is False or source == ExplicitVRBigEndian:
        to_little_endian(ds)
    else:
        # parse every element now (VR from the dictionary where the file had none): a file whose
        # dataset is implicit VR under an explicit syntax would otherwise be written without VRs
        _swap_dataset(ds, top=True, swap=False)
    if source == DeflatedExplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = UID(ExplicitVRLittleEndian)
    if "PixelData" in ds and UID(source).is_compressed and source != DeflatedExplicitVRLittleEndian:
        if not can_decode(source):
            raise TranscodeError(f"no decoder is installed for pixel data in {UID(source).name}")
        ds.decompress(generate_instance_uid=False, as_rgb=True)
        _mark_lossy(ds, source)
    if target in NATIVE_TARGETS:
        if target == ExplicitVRBigEndian:
            to_big_endian(ds)
        ds.file_meta.TransferSyntaxUID = UID(target)  # deflated: dcmwrite deflates the LE dataset
        return
    if target not in COMPRESSED_TARGETS:
        raise TranscodeError(f"{target} is not a transfer syntax we produce")
    if not has_pixels or "PixelData" not in ds:
        raise TranscodeError("the instance has no (integer) pixel data to compress")
    f = facts_of(ds)
    if not can_encode_pixels(target, f):
        raise TranscodeError(
            f"no installed encoder for {UID(target).name} takes {f.photometric_interpretation} pixels"
            f" ({f.samples_per_pixel} samples, {f.bits_allocated}/{f.bits_stored} bits, representation {f.pixel_representation})"
        )
    if f.samples_per_pixel > 1 and int(ds.get("PlanarConfiguration", 0) or 0) == 1:
        # pydicom's encoders read native bytes as pixel-interleaved: hand them the interleaved pixels
        ds.PixelData = ds.pixel_array.tobytes()
        ds.PlanarConfiguration = 0
        ds._pixel_array = None  # type: ignore[attr-defined]
        ds._pixel_id = {}  # type: ignore[attr-defined]
    kwargs: dict[str, object] = {}
    if target == JPEG2000:
        kwargs["j2k_cr"] = [J2K_LOSSY_RATIO]
    ds.compress(target, generate_instance_uid=False, **kwargs)  # type: ignore[arg-type]
    if target == JPEG2000:
        # PS3.3 C.7.6.1.1.5: a lossy compressed image says so, with every lossy step's ratio and method
        ds.LossyImageCompression = "01"
        ratios = [float(r) for r in (_multi(ds.get("LossyImageCompressionRatio")))]
        methods = [str(m) for m in (_multi(ds.get("LossyImageCompressionMethod")))]
        ds.LossyImageCompressionRatio = [*ratios, J2K_LOSSY_RATIO]
        ds.LossyImageCompressionMethod = [*methods, "ISO_15444_1"]


def _multi(value: object) -> list[object]:
    if value in (None, ""):
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return list(value)  # type: ignore[call-overload]
    return [value]


def converted(path: Path, target: str) -> Dataset:
    """The instance at ``path`` decoded and re-encoded in ``target``: one instance in memory.

    Kept for xdsi/dimse/sending.py until the retrieval service lands; new callers use :func:`write_converted`.
    """
    try:
        ds = dcmread(path)
        convert(ds, target)
    except TranscodeError:
        raise
    except Exception as exc:  # pydicom/pylibjpeg raise many kinds for undecodable data
        raise TranscodeError(f"cannot convert to {target}: {exc.__class__.__name__}: {exc}") from exc
    return ds


def write_dataset(ds: Dataset, out: BinaryIO) -> None:
    """Write a converted dataset as a Part 10 file in the transfer syntax its file meta names.

    ``dcmwrite`` (not ``save_as``, which refuses to change endianness) re-encodes
    every element from the dataset's original encoding to the target one, and
    deflates the dataset when the file meta says Deflated Explicit VR Little
    Endian.  Byte values must already be in the target's byte order
    (:func:`convert` swaps them).
    """
    ts = UID(ds.file_meta.TransferSyntaxUID)
    dcmwrite(out, ds, implicit_vr=ts.is_implicit_VR, little_endian=ts.is_little_endian, enforce_file_format=True)


def write_converted(path: Path, target: str, out: BinaryIO, identity: "Identity | None" = None) -> None:
    """The instance at ``path`` re-encoded as a Part 10 file in ``target``, written to ``out`` (the caller's spool).

    ``identity``: the patient attributes to send instead of the stored ones (a
    study HL7 changed after storage, :mod:`xdsi.archive.coercion`); then even
    the stored syntax is written anew, never copied as it is.
    Raises :class:`TranscodeError` for anything that goes wrong (reading,
    decoding, encoding); the caller announces nothing until this returns, and
    discards its spool on an error.
    """
    try:
        stored = source_transfer_syntax(dcmread(path, stop_before_pixels=True))
    except Exception as exc:
        raise TranscodeError(f"cannot read the instance: {exc.__class__.__name__}: {exc}") from exc
    if identity is not None:
        _write_with_identity(path, stored, target, out, identity)
        return
    if stored == target:
        # already in the syntax asked for: the stored file is that Part 10 file (nothing decoded, nothing lost)
        with open(path, "rb") as fh:
            for chunk in read_chunks_of(fh):
                out.write(chunk)
        return
    ds = converted(path, target)
    try:
        write_dataset(ds, out)
    except Exception as exc:
        raise TranscodeError(f"cannot encode the converted instance: {exc.__class__.__name__}: {exc}") from exc


def _write_with_identity(path: Path, stored: str, target: str, out: BinaryIO, identity: "Identity") -> None:
    """:func:`write_converted` for an object whose patient attributes are coerced (issue 15, patient updates)."""
    from xdsi.archive import coercion

    if stored == target:
        try:
            coercion.write_coerced(path, out, identity)  # header rewritten, pixels copied byte for byte
        except Exception as exc:
            raise TranscodeError(f"cannot write the updated patient attributes: {exc.__class__.__name__}: {exc}") from exc
        return
    ds = converted(path, target)
    try:
        coercion.apply(ds, identity)
        write_dataset(ds, out)
    except Exception as exc:
        raise TranscodeError(f"cannot encode the converted instance: {exc.__class__.__name__}: {exc}") from exc


def transcoded_chunks(path: Path, target: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
    """The instance at ``path`` re-encoded in ``target``, as a Part 10 file, in chunks (through a spool)."""
    with tempfile.SpooledTemporaryFile(SPOOL_MEMORY) as f:
        write_converted(path, target, f)  # type: ignore[arg-type]
        f.seek(0)
        while True:
            b = f.read(chunk_size)
            if not b:
                return
            yield b


def read_chunks_of(fh: BinaryIO, chunk_size: int = CHUNK) -> Iterator[bytes]:
    while True:
        b = fh.read(chunk_size)
        if not b:
            return
        yield b


