"""HTJ2K lossless encoding (1.2.840.10008.1.2.4.201, .202 and .203) for pydicom 3, through pydicom's own plugin point.

Why this module: pydicom 3.0 decodes HTJ2K (pylibjpeg-openjpeg) but ships no
HTJ2K encoder, so ``Dataset.compress(HTJ2KLossless)`` raises.  We add one
:class:`pydicom.pixels.encoders.base.Encoder` per syntax and register our
frame function on it with ``Encoder.add_plugin`` (pydicom's extension point:
the plugin module exposes ``is_available``, ``ENCODER_DEPENDENCIES`` and an
encode function), plus the syntaxes' encoding profiles.  pydicom 3.0 has no
public call to add an encoder for a new syntax, so :func:`register` puts the
two encoders into ``_PIXEL_DATA_ENCODERS`` (what ``get_encoder`` and
``Dataset.compress`` read); it never replaces an encoder pydicom itself
provides (a later pydicom with HTJ2K encoders keeps its own, and we only add
our plugin to it).

The codec is OpenJPH through imagecodecs (``htj2k_encode``, maintained on
PyPI).  Every frame is encoded reversibly (5/3 wavelet, no quantization) in
one tile, RPCL progression, with TLM markers and tile-parts split at
resolutions, and enough decomposition levels for the smallest resolution to
be at most 64 pixels a side: PS3.5 10.18's requirements for HTJ2K Lossless
RPCL, which also satisfy HTJ2K Lossless and HTJ2K (.203, lossless or lossy
at the sender's discretion: ours is always lossless), so the three syntaxes
get the same codestream.  The main header of every codestream produced is read back
(:func:`codestream_facts`) and the frame is refused unless it says
reversible, no quantization, RPCL and TLM: a future OpenJPH default cannot
silently change what we claim.

Sample values (PS3.5 8.2): the frame is taken as pydicom reads it, i.e. the
Bits Stored least significant bits, sign-extended when Pixel Representation
is 1.  A frame whose samples carry other bits (values outside the Bits
Stored range, e.g. an overlay kept in the high bits) is refused rather than
silently changed.  imagecodecs writes the component precision as the
container width (8 or 16 bits; it has no precision parameter), so a 12-bit
image is a 16-bit codestream whose values use 12 bits: every decoder gives
back the same integers, and pydicom's decoder (sign correction keyed on the
codestream's signedness, which matches Pixel Representation) returns exactly
the original pixels.  Colour: RGB is encoded without a colour transform (PS3.5
8.2.4: a multi-component transform would make it YBR_RCT), YBR_RCT with the
reversible colour transform; the Photometric Interpretation is unchanged.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydicom.uid import HTJ2K, HTJ2KLossless, HTJ2KLosslessRPCL, UID

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    from pydicom.pixels.encoders.base import EncodeRunner

PLUGIN = "imagecodecs"
SYNTAXES = (HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K)
# pydicom's plugin contract: what the plugin needs, reported when it is unavailable
ENCODER_DEPENDENCIES = {uid: ("numpy", "imagecodecs>=2026.3.6") for uid in SYNTAXES}
BASE_RESOLUTION_MAX = 64  # PS3.5 10.18: the lowest resolution at most 64 wide or high
MIN_DECOMPOSITIONS = 5  # OpenJPH's default: good compression for ordinary images
RPCL = 2  # COD progression order values (ISO/IEC 15444-1 Table A.16)
PROGRESSIONS = {0: "LRCP", 1: "RLCP", 2: "RPCL", 3: "PCRL", 4: "CPRL"}
# (Photometric Interpretation after encoding, Samples per Pixel, Pixel Representation, Bits Allocated, Bits Stored)
# as pydicom's ENCODING_PROFILES lists them; 8 and 16 bits allocated (the containers OpenJPH encodes from here).
PROFILES = [
    ("MONOCHROME1", 1, (0, 1), (8, 16), range(1, 17)),
    ("MONOCHROME2", 1, (0, 1), (8, 16), range(1, 17)),
    ("PALETTE COLOR", 1, (0,), (8, 16), range(1, 17)),
    ("RGB", 3, (0,), (8, 16), range(1, 17)),
    ("YBR_RCT", 3, (0,), (8, 16), range(1, 17)),
    ("YBR_FULL", 3, (0,), (8, 16), range(1, 17)),
]


class HTJ2KEncodeError(ValueError):
    """A frame cannot be encoded as lossless HTJ2K without changing a pixel."""


def is_available(uid: str) -> bool:
    """pydicom's plugin contract: whether this plugin can encode ``uid`` here (imagecodecs built with OpenJPH)."""
    if UID(uid) not in SYNTAXES:
        return False
    try:
        import imagecodecs
    except ImportError:
        return False
    return bool(getattr(getattr(imagecodecs, "HTJ2K", None), "available", False))


def decompositions(rows: int, columns: int) -> int:
    """Wavelet levels: at least OpenJPH's 5 where the image allows, and enough for a base resolution <= 64."""
    longest = max(rows, columns, 1)
    needed = max(0, math.ceil(math.log2(longest / BASE_RESOLUTION_MAX))) if longest > BASE_RESOLUTION_MAX else 0
    usual = min(MIN_DECOMPOSITIONS, max(1, int(math.log2(max(min(rows, columns), 1)))))
    return max(needed, usual, 1)


def frame_array(src: bytes, runner: "EncodeRunner") -> "np.ndarray":
    """The frame as pydicom reads it: (rows, columns[, samples]), values within Bits Stored; refused otherwise."""
    import numpy as np

    bits_stored = runner.bits_stored
    itemsize = 1 if bits_stored <= 8 else 2  # pydicom hands encoders the container Bits Stored needs
    if bits_stored > 16:
        raise HTJ2KEncodeError(f"{bits_stored} bits stored: this HTJ2K encoder takes at most 16")
    signed = runner.pixel_representation == 1
    dtype = np.dtype(f"<{'i' if signed else 'u'}{itemsize}")
    rows, columns, spp = runner.rows, runner.columns, runner.samples_per_pixel
    arr = np.frombuffer(src, dtype=dtype, count=rows * columns * spp)
    if spp > 1:
        if runner.planar_configuration == 1:
            arr = arr.reshape(spp, rows, columns).transpose(1, 2, 0)
        else:
            arr = arr.reshape(rows, columns, spp)
    else:
        arr = arr.reshape(rows, columns)
    unused = 8 * itemsize - bits_stored
    if unused:
        # the value pydicom's decoder gives (unused high bits dropped, sign extended) must be the stored one
        read = (arr << unused) >> unused if signed else arr & ((1 << bits_stored) - 1)
        if not np.array_equal(read, arr):
            raise HTJ2KEncodeError(
                f"samples use bits above Bits Stored ({bits_stored}): lossless HTJ2K would change them; refused"
            )
    return np.ascontiguousarray(arr)


def _encode_frame(src: bytes, runner: "EncodeRunner") -> bytes:
    """pydicom's encode-function contract: one frame's raw bytes in, one HTJ2K codestream out."""
    import imagecodecs

    if runner.transfer_syntax not in SYNTAXES:
        raise HTJ2KEncodeError(f"{runner.transfer_syntax} is not an HTJ2K syntax")
    arr = frame_array(src, runner)
    pi = str(runner.photometric_interpretation)
    cs = imagecodecs.htj2k_encode(
        arr,
        reversible=True,
        rgb=(pi == "YBR_RCT") if runner.samples_per_pixel > 1 else None,
        resolutions=decompositions(runner.rows, runner.columns),
        tlm=True,
        tilepart=imagecodecs.HTJ2K.TILEPART.RESOLUTIONS,
    )
    cs = bytes(cs)
    check_lossless_rpcl(cs)
    return cs


@dataclass(frozen=True)
class CodestreamFacts:
    """What a JPEG 2000 main header says (ISO/IEC 15444-1 Annex A), as far as our claims depend on it."""

    width: int
    height: int
    components: int
    precision: int
    signed: bool
    progression: str
    decompositions: int
    reversible: bool  # 5/3 wavelet
    quantized: bool  # QCD style other than "no quantization"
    colour_transform: bool
    tlm: bool
    high_throughput: bool  # CAP marker with Part 15 (HT) capability


def codestream_facts(cs: bytes) -> CodestreamFacts:
    """Read the main header of a J2K codestream (up to the first SOT) into :class:`CodestreamFacts`."""
    if cs[:2] != b"\xff\x4f":
        raise HTJ2KEncodeError("not a JPEG 2000 codestream (no SOC marker)")
    pos = 2
    siz: tuple[int, int, int, int, bool] | None = None
    cod: tuple[str, int, bool, bool] | None = None
    quantized = True
    tlm = ht = False
    while pos + 4 <= len(cs):
        marker, length = struct.unpack(">HH", cs[pos : pos + 4])
        body = cs[pos + 4 : pos + 2 + length]
        if marker == 0xFF90:  # SOT: end of the main header
            break
        if marker == 0xFF51:  # SIZ
            xsiz, ysiz, xo, yo = struct.unpack(">IIII", body[2:18])
            ncomp = struct.unpack(">H", body[34:36])[0]
            ssiz = body[36]
            siz = (xsiz - xo, ysiz - yo, ncomp, (ssiz & 0x7F) + 1, bool(ssiz & 0x80))
        elif marker == 0xFF52:  # COD
            progression = PROGRESSIONS.get(body[1], f"unknown {body[1]}")
            mct = bool(body[4])
            levels = body[5]
            transform = body[9]
            cod = (progression, levels, transform == 1, mct)
        elif marker == 0xFF5C:  # QCD
            quantized = (body[0] & 0x1F) != 0
        elif marker == 0xFF55:  # TLM
            tlm = True
        elif marker == 0xFF50:  # CAP: Pcap bit 15 (from the MSB) = Part 15
            ht = bool(struct.unpack(">I", body[0:4])[0] & (1 << (32 - 15)))
        pos += 2 + length
    if siz is None or cod is None:
        raise HTJ2KEncodeError("JPEG 2000 main header without SIZ or COD")
    return CodestreamFacts(
        width=siz[0],
        height=siz[1],
        components=siz[2],
        precision=siz[3],
        signed=siz[4],
        progression=cod[0],
        decompositions=cod[1],
        reversible=cod[2],
        quantized=quantized,
        colour_transform=cod[3],
        tlm=tlm,
        high_throughput=ht,
    )


def check_lossless_rpcl(cs: bytes) -> CodestreamFacts:
    """Refuse a codestream that is not reversible HTJ2K in RPCL with TLM and a base resolution <= 64 (PS3.5 10.18)."""
    f = codestream_facts(cs)
    problems = []
    if not f.reversible or f.quantized:
        problems.append("not reversible")
    if f.progression != "RPCL":
        problems.append(f"progression {f.progression}, not RPCL")
    if not f.tlm:
        problems.append("no TLM marker")
    if not f.high_throughput:
        problems.append("no HTJ2K capability (CAP) marker")
    base = max(math.ceil(f.width / 2**f.decompositions), math.ceil(f.height / 2**f.decompositions))
    if base > BASE_RESOLUTION_MAX:
        problems.append(f"base resolution {base} > {BASE_RESOLUTION_MAX}")
    if problems:
        raise HTJ2KEncodeError("the HTJ2K encoder produced a codestream that is " + "; ".join(problems))
    return f


def register() -> None:
    """Make ``get_encoder``/``Dataset.compress`` produce HTJ2K Lossless, Lossless RPCL and HTJ2K (idempotent)."""
    from pydicom.pixels.encoders import base

    for uid in SYNTAXES:
        entry = base._PIXEL_DATA_ENCODERS.get(uid)
        encoder = entry[0] if entry else base.Encoder(uid)
        if PLUGIN not in encoder._available and PLUGIN not in encoder._unavailable:
            encoder.add_plugin(PLUGIN, (__name__, "_encode_frame"))
        if entry is None:
            base._PIXEL_DATA_ENCODERS[uid] = (encoder, "xdsi")
        base.ENCODING_PROFILES.setdefault(uid, list(PROFILES))


register()
