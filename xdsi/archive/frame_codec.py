"""Frames re-encoded on the fly in a compressed transfer syntax a DICOMweb viewer asks for (HTJ2K, JPEG 2000 lossless).

Why: OHIF/Cornerstone fetch frames as High-Throughput JPEG 2000 (PS3.5,
1.2.840.10008.1.2.4.201-.203) and, for the RPCL variant (.202), fetch the first
bytes of a frame first (HTTP Range) and draw the low resolution levels they
hold.  An archive that keeps what it received as it is (or on a JPEG 2000
tier) must then be able to produce those frames from any decodable stored
syntax.  This module does that one frame at a time: pydicom's own decoder
(:func:`xdsi.archive.content.frame_array`) gives the pixels, pydicom's encoder
registry (:func:`pydicom.pixels.get_encoder`, where the HTJ2K plugin of
:mod:`xdsi.archive.htj2k` registers itself) encodes them.  Nothing is written
here but bytes into the caller's spool.

Only lossless targets, and only pixels that the instance's own metadata still
describes after decoding (the frames resource carries no attributes): the
photometric interpretation must not change in decoding (a YCbCr JPEG decodes
to RGB, so its frames are not re-encoded here), and :func:`transcode.can_encode_pixels`
must accept the pixel layout.  Anything else is :class:`content.CannotConvert`
(HTTP 406) before a byte is sent.

A ``.203`` request (HTJ2K, lossless or lossy) is answered with a lossless
codestream: every lossless HTJ2K codestream is a valid ``.203`` one.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO, Sequence

from pydicom.uid import JPEG2000Lossless, UID

from xdsi.archive import content, transcode

HTJ2K_LOSSLESS = "1.2.840.10008.1.2.4.201"
HTJ2K_LOSSLESS_RPCL = "1.2.840.10008.1.2.4.202"
HTJ2K_ANY = "1.2.840.10008.1.2.4.203"
HTJ2K_SYNTAXES = (HTJ2K_LOSSLESS, HTJ2K_LOSSLESS_RPCL, HTJ2K_ANY)
# what a frame may be re-encoded into, and the pydicom encoder that produces it (xdsi.archive.htj2k's for HTJ2K:
# always reversible, RPCL, TLM and a tile-part per resolution, so .203 output is lossless and progressive too)
ENCODER_OF = {
    str(JPEG2000Lossless): str(JPEG2000Lossless),
    HTJ2K_LOSSLESS: HTJ2K_LOSSLESS,
    HTJ2K_LOSSLESS_RPCL: HTJ2K_LOSSLESS_RPCL,
    HTJ2K_ANY: HTJ2K_ANY,
}
FRAME_TARGETS = tuple(ENCODER_OF)
# a single-part request naming only the media type (PS3.18 Table 8.7.3-5) gets the lossless syntax of that type
DEFAULT_SYNTAX_OF_TYPE = {"image/jphc": HTJ2K_LOSSLESS, "image/jp2": str(JPEG2000Lossless)}


def media_type(target: str) -> str:
    """The PS3.18 Table 8.7.3-5 media type of a frame in ``target``."""
    return content.frame_media_type(target) or "application/octet-stream"


def _register_plugins() -> None:
    """Import the HTJ2K encoder plugin (it registers itself with pydicom on import), when this build has it."""
    try:
        import xdsi.archive.htj2k  # noqa: F401
    except ImportError:
        pass


def why_not(path: Path, target: str) -> str | None:
    """None when the frames of the instance at ``path`` can be re-encoded in ``target``; otherwise the reason (for a 406)."""
    if target not in ENCODER_OF:
        return f"frames are not re-encoded in {target}"
    _register_plugins()
    info = content.pixel_info(path)
    facts = transcode.facts(path)
    ts = info.transfer_syntax_uid
    if not facts.has_pixel_data or facts.float_pixels:
        return "the instance has no integer pixel data"
    if info.bits_allocated == 1:
        return "1-bit frames are not re-encoded"
    if not transcode.can_decode(ts):
        return f"no decoder is installed for frames in {ts}"
    if facts.decoded_photometric() != facts.photometric_interpretation:
        return (
            f"{facts.photometric_interpretation} frames decode to {facts.decoded_photometric()}, which the instance's"
            " metadata does not describe; ask for the stored frames (transfer-syntax=*)"
        )
    encoder = ENCODER_OF[target]
    if not transcode.can_encode(encoder):
        return f"no encoder for {UID(encoder).name} is installed"
    if not transcode.can_encode_pixels(encoder, facts):
        return (
            f"the {UID(encoder).name} encoder does not take {facts.photometric_interpretation} pixels"
            f" ({facts.samples_per_pixel} samples, {facts.bits_allocated}/{facts.bits_stored} bits,"
            f" representation {facts.pixel_representation}, {facts.rows}x{facts.columns})"
        )
    return None


def write_encoded(path: Path, numbers: Sequence[int], target: str, out: BinaryIO) -> list[tuple[int, int, int]]:
    """Each requested frame (1-based numbers) encoded in ``target``, written to ``out`` one after the other.

    Returns the spans ``(frame number, offset in out, length)``.  Raises
    :class:`content.CannotConvert` when the frames cannot be produced (checked
    first, by :func:`why_not`) or the decoder or encoder fails.
    """
    from pydicom.pixels import get_encoder

    reason = why_not(path, target)
    if reason is not None:
        raise content.CannotConvert(reason)
    info = content.pixel_info(path)
    content.check_frames(info, list(numbers))
    facts = transcode.facts(path)
    encoder = get_encoder(ENCODER_OF[target])
    description = dict(
        rows=info.rows,
        columns=info.columns,
        number_of_frames=1,
        samples_per_pixel=facts.samples_per_pixel,
        bits_allocated=facts.bits_allocated,
        bits_stored=facts.bits_stored or facts.bits_allocated,
        pixel_representation=facts.pixel_representation,
        photometric_interpretation=facts.photometric_interpretation,
        planar_configuration=0,  # pydicom's decode gives pixel-interleaved arrays
    )
    spans: list[tuple[int, int, int]] = []
    offset = 0
    for n in numbers:
        try:
            arr = content.frame_array(path, n - 1, as_rgb=True)
            data = encoder.encode(arr, **description)
        except content.ContentError:
            raise
        except Exception as exc:  # decoders and encoders raise many kinds for data they cannot take
            raise content.CannotConvert(f"cannot encode frame {n} in {UID(target).name}: {exc.__class__.__name__}: {exc}") from None
        out.write(data)
        spans.append((n, offset, len(data)))
        offset += len(data)
    return spans
