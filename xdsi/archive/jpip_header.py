"""JPIP Referenced headers: an instance's attributes with a Pixel Data Provider URL instead of its Pixel Data.

A requester that accepts JPIP Referenced (1.2.840.10008.1.2.4.94) or JPIP
Referenced Deflate (.95) on C-GET, C-MOVE, WADO-RS or RAD-69 gets, for an
instance our JPIP server can serve, the data set without Pixel Data and with
Pixel Data Provider URL (0028,7FE0) = ``<[server] public_url>/jpip?target=<SOP
Instance UID>`` (:func:`xdsi.jpip.urls.provider_url`; the frames of a
multi-frame instance are JPIP codestreams, so Number of Frames stays and the
URL is one).  What the standard asks of such a data set (PS3.5 A.6 / A.7,
PS3.3 C.7.6.3 Image Pixel Module):

- Explicit VR Little Endian throughout; .95 is that byte stream deflated
  (RFC 1951, raw deflate), the File Meta group left as it is.  pydicom 3 does
  not treat .95 as deflated, so the deflating is done here.
- Pixel Data (7FE0,0010) absent; so are Float / Double Float Pixel Data and
  the offset tables of encapsulated Pixel Data (group 7FE0), which describe
  bytes that are no longer there.  Every other attribute stays (Rows,
  Columns, Bits Allocated/Stored, Number of Frames, Pixel Representation ...):
  they describe the pixels the JPIP server delivers.
- Photometric Interpretation only MONOCHROME1, MONOCHROME2, YBR_ICT or
  YBR_RCT.

Which instances are offered (the rest get the requester's next syntax, or a
refusal, by the one policy of :mod:`xdsi.archive.transcode`):

- never without ``[server] public_url`` (a URL naming our bind address would
  be broken for everyone else) or with ``[jpip] enabled = false`` when that
  section exists: the URL must answer;
- monochrome images stored as JPEG 2000 or HTJ2K (the stored codestream is
  served), or whose pixels we decode and can encode as JPEG 2000 lossless
  (the JPIP server encodes them on demand; the header then says what that
  lossless codestream holds: the decoded photometric interpretation, and
  Lossy Image Compression "01" when the stored pixels came from a lossy-only
  process, exactly as :func:`xdsi.archive.transcode.convert` would);
- colour images only when stored as JPEG 2000 (Part 1) whose codestream
  applies a multiple component transform (COD marker): YBR_RCT for the
  reversible 5-3 wavelet, YBR_ICT for the irreversible 9-7.  A colour image
  whose JPEG 2000 codestream is produced on demand is not offered: its
  header could only be truthful if the encoder's colour transform were known
  here, and a header that says YBR_RCT over an RGB codestream shows wrong
  colours.  PALETTE COLOR and the other interpretations are not allowed by
  A.6 at all.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Callable, Sequence

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import UID, JPEG2000, ExplicitVRBigEndian, JPEG2000Lossless

from xdsi.archive import transcode
from xdsi.jpip.urls import JPIP_REFERENCED_DEFLATE, JPIP_SYNTAXES, provider_url

HTJ2K_STORED = ("1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203")
J2K_PART1_STORED = (str(JPEG2000Lossless), str(JPEG2000))
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
PIXEL_GROUP = 0x7FE0
PROVIDER_URL_TAG = 0x00287FE0
DEFER_SIZE = 64 * 1024  # values larger than this are read from the file when the header is written


def asked(accepted: Sequence[str]) -> bool:
    """Whether a requester's list names a JPIP Referenced syntax (only then is the JPIP policy consulted)."""
    return any(str(t) in JPIP_SYNTAXES for t in accepted)


def offered(settings: Any) -> bool:
    """JPIP Referenced is offered at all: a public URL to put in the header, and a JPIP server to answer it.

    ``[server] public_url`` is required.  ``[jpip] enabled`` is honoured when
    the settings have a ``jpip`` section (the JPIP server's); without that
    section the URL form is all there is to check.
    """
    if not str(getattr(settings, "public_url", "") or "").strip():
        return False
    jpip = getattr(settings, "jpip", None)
    return jpip is None or bool(getattr(jpip, "enabled", True))


def syntaxes(settings: Any) -> list[str]:
    """The JPIP Referenced syntaxes to accept for C-GET storage contexts: none unless :func:`offered`."""
    return list(JPIP_SYNTAXES) if offered(settings) else []


def header_photometric(path: Path, facts: transcode.PixelFacts) -> str | None:
    """The Photometric Interpretation a JPIP Referenced header of this instance declares, or None: not offered.

    See the module docstring for the rules; ``facts`` are the stored file's
    (:func:`xdsi.archive.transcode.facts`).
    """
    if not facts.has_pixel_data or facts.float_pixels:
        return None
    ts = facts.transfer_syntax_uid
    pi = facts.photometric_interpretation
    if ts in J2K_PART1_STORED or ts in HTJ2K_STORED:
        if facts.samples_per_pixel == 1:
            return pi if pi in MONOCHROME else None
        if ts in HTJ2K_STORED:
            return None  # colour HTJ2K: served under JPIP HTJ2K Referenced (.204), which we do not offer
        return codestream_colour(path)
    if facts.samples_per_pixel != 1 or not transcode.can_decode(ts):
        return None
    if not transcode.can_encode_pixels(JPEG2000Lossless, facts):
        return None
    decoded = facts.decoded_photometric()
    return decoded if decoded in MONOCHROME else None


def codestream_colour(path: Path) -> str | None:
    """YBR_RCT / YBR_ICT as the first frame's JPEG 2000 COD marker says, or None (no colour transform, unreadable)."""
    from xdsi.archive import content

    try:
        frame = next(content.stored_frames(path, [1]))
    except Exception:  # an unreadable frame is not offered; the other paths report it when they read it
        return None
    cod = _cod(frame)
    if cod is None:
        return None
    mct, reversible = cod
    if not mct:
        return None
    return "YBR_RCT" if reversible else "YBR_ICT"


def _cod(codestream: bytes) -> tuple[bool, bool] | None:
    """(multiple component transform used, reversible 5-3 wavelet) from a codestream's main-header COD marker.

    ISO/IEC 15444-1 A.6.1: COD = FF52, Lcod (2), Scod (1), SGcod = progression
    order (1), layers (2), multiple component transform (1); SPcod = levels,
    code-block width, height, style, transformation (1: 5-3 reversible).  A JP2
    wrapper, if any, is skipped by looking for the SOC+SIZ start of the codestream.
    """
    start = codestream.find(b"\xff\x4f\xff\x51")
    if start < 0:
        return None
    pos = start + 2
    end = len(codestream)
    while pos + 4 <= end:
        marker, length = struct.unpack(">HH", codestream[pos : pos + 4])
        if marker in (0xFF90, 0xFF93):  # SOT / SOD: the main header is over
            return None
        if marker == 0xFF52:
            if pos + 14 > end:
                return None
            mct = codestream[pos + 8]
            transformation = codestream[pos + 13]
            return bool(mct), transformation == 1
        if marker >> 8 != 0xFF or length < 2:
            return None
        pos += 2 + length
    return None


def choose(
    service: Any, ref: Any, accepted: Sequence[str], path: Path | None
) -> tuple[transcode.Choice | None, Path | None]:
    """:meth:`RetrieveService.choose` for a list that names a JPIP Referenced syntax.

    The one policy, in the requester's order: the syntaxes before the first
    JPIP one are tried by the ordinary policy (the stored syntax among them
    means the stored bytes); then JPIP Referenced, when :func:`offered` and
    this instance's header can be truthful (:func:`header_photometric`); then
    the rest (the stored syntax among them, again, the stored bytes).  So a
    requester that lists JPIP Referenced first gets the header even for an
    instance whose stored syntax it lists later: RAD TF-3 4.69.4.2.3 (FACTS
    1.4) has the IDS that supports JPIP remove Pixel Data and add the URL
    whenever the request lists it; a requester that lists the stored syntax
    first gets the pixels.  The header is read only when the syntaxes before
    JPIP could not be produced.
    """
    order = [str(t) for t in accepted]
    k = next(i for i, t in enumerate(order) if t in JPIP_SYNTAXES)
    if ref.transfer_syntax_uid in order[:k]:
        return transcode.Choice(ref.transfer_syntax_uid, True), path
    if k:
        found, path = service.choose(ref, order[:k], path)
        if found is not None:
            return found, path
    if offered(service.settings):
        path = path or service.path(ref)
        try:
            facts = transcode.facts(path)
        except OSError:
            raise
        except Exception:  # an unreadable header: no JPIP header can be built from it either
            facts = None
        if facts is not None and header_photometric(path, facts) is not None:
            return transcode.Choice(order[k], False), path
    rest = [t for t in order[k + 1 :] if t not in JPIP_SYNTAXES]
    if not rest:
        return None, path
    return service.choose(ref, rest, path)


def build(path: Path, target: str, url: str) -> Dataset:
    """The JPIP Referenced data set of the instance at ``path``, its File Meta naming ``target``.

    Raises :class:`xdsi.archive.transcode.TranscodeError` when the instance is
    not one we offer (checked again here: a header is never built on the
    strength of a stale choice).
    """
    if target not in JPIP_SYNTAXES:
        raise transcode.TranscodeError(f"{target} is not a JPIP Referenced transfer syntax")
    facts = transcode.facts(path)
    photometric = header_photometric(path, facts)
    if photometric is None:
        raise transcode.TranscodeError("this instance's pixels cannot be referenced by JPIP (PS3.5 A.6)")
    # every element, the ones after Pixel Data too (private groups, padding); large values are read when written,
    # Pixel Data (group 7FE0) never: it goes before anything touches the values
    ds = dcmread(path, defer_size=DEFER_SIZE)
    for tag in [t for t in ds.keys() if t.group == PIXEL_GROUP]:
        del ds[tag]
    source = transcode.source_transfer_syntax(ds)
    if ds.original_encoding[1] is False or source == ExplicitVRBigEndian:
        transcode.to_little_endian(ds)
    else:
        transcode._swap_dataset(ds, top=True, swap=False)  # parse every element, VRs from the dictionary
    if source not in J2K_PART1_STORED and source not in HTJ2K_STORED:
        transcode._mark_lossy(ds, source)  # encoded on demand from decoded pixels: a lossy-only source says so
    ds.PhotometricInterpretation = photometric
    ds.add_new(PROVIDER_URL_TAG, "UR", url)
    ds.file_meta.TransferSyntaxUID = UID(target)
    return ds


def write(path: Path, target: str, url: str, out: BinaryIO, identity: Any = None) -> None:
    """The JPIP Referenced Part 10 file of the instance at ``path``, written to ``out`` (the caller's spool).

    ``identity``: an :class:`xdsi.archive.coercion.Identity` to send instead of the stored patient attributes."""
    ds = build(path, target, url)
    if identity is not None:  # issue 15: a study whose patient identity HL7 changed after storage
        from xdsi.archive import coercion

        coercion.apply(ds, identity)
    buf = io.BytesIO()
    try:
        dcmwrite(buf, ds, implicit_vr=False, little_endian=True, enforce_file_format=True)
    except Exception as exc:
        raise transcode.TranscodeError(f"cannot encode the JPIP Referenced header: {exc.__class__.__name__}: {exc}") from exc
    data = buf.getvalue()
    if target != JPIP_REFERENCED_DEFLATE:
        out.write(data)
        return
    start = dataset_offset(data)
    deflater = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -zlib.MAX_WBITS)  # RFC 1951: raw deflate
    out.write(data[:start])
    out.write(deflater.compress(data[start:]) + deflater.flush())


def dataset_offset(part10: bytes) -> int:
    """Where the data set starts in a Part 10 file: after the preamble, "DICM" and the File Meta group (its group length)."""
    if part10[128:132] != b"DICM" or part10[132:136] != b"\x02\x00\x00\x00":
        raise transcode.TranscodeError("the written header has no File Meta Information Group Length")
    (group_length,) = struct.unpack("<I", part10[140:144])
    return 144 + group_length


def writer(path: Path, target: str, settings: Any, sop_instance_uid: str, identity: Any = None) -> Callable[[BinaryIO], None]:
    """What :meth:`RetrieveService.produce` spools for a JPIP Referenced choice.

    The URL is built inside the spooling step, so a failure there (no public
    URL, a SOP Instance UID that is not a UID) is a failed conversion of this
    instance like any other, never an error of the whole request.
    """
    return lambda out: write(path, target, provider_url(settings.public_url, sop_instance_uid), out, identity)
