"""WADO-RS frames (PS3.18 8.7.3, 10.4.1.1.2): which form a request gets, and single-part answers with HTTP Range.

Why a module of its own: the frame resource is what viewers hit hardest and
it has grown three ways of answering, chosen from the Accept ranges in order:

* **as stored** (``transfer-syntax=*``, or the stored syntax / its image media
  type): an encapsulated frame's bitstream, or the native frame;
* **native** (``application/octet-stream``, Explicit VR Little Endian): decoded;
* **re-encoded** (:mod:`xdsi.archive.frame_codec`): a compressed syntax the
  instance is not stored in, e.g. ``transfer-syntax=1.2.840.10008.1.2.4.202``
  (HTJ2K lossless RPCL) or a bare ``image/jphc`` (HTJ2K lossless, .201), so
  OHIF/Cornerstone get HTJ2K whatever we hold.

A ``multipart/related`` range (or ``*/*``) gets the usual multipart answer.  A
single-part media range (``image/jphc``, ``image/jp2``, ``application/octet-stream``,
with or without ``transfer-syntax``) for exactly one frame gets that frame as
the whole body, and only such a body honours ``Range`` (RFC 9110 14): one
``bytes`` range gives 206 with ``Content-Range``, a range past the end 416 with
``Content-Range: bytes */length``; several ranges or an unreadable header are
ignored (200, the whole frame), as the RFC allows.  ``Accept-Ranges: bytes``
and a strong ``ETag`` say so; ``If-Range`` with another entity tag gets the
whole frame.  This is what lets a viewer fetch the first resolution levels of
an HTJ2K RPCL frame first (its tile-parts are one per resolution level, in
order; the TLM marker in the first bytes says where each ends) and the rest
later.  A multipart answer ignores ``Range``: its boundary changes per response.

The PS3.18 8.3.3.1 ``accept`` query parameter is read before the Accept header
(Cornerstone puts ``accept=image/jphc...`` in ``urlArguments``); the header's
ranges follow it, so a query naming nothing we can send still falls back.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from werkzeug.wrappers import Request

from xdsi.archive import frame_codec
from xdsi.archive.retrieve import FrameInfo
from xdsi.web import media
from xdsi.wire.media import MediaRange, parse_accept


@dataclass(frozen=True)
class FrameForm:
    """How the frames of one request go out."""

    stored: bool  # as stored (encapsulated bitstream / stored native layout); False: decoded or re-encoded
    part_type: str | None  # media type of the part(s); None: the frame set's natural one
    target: str | None = None  # re-encode in this transfer syntax (xdsi.archive.frame_codec)
    single: bool = False  # one frame as the whole body (not multipart): Range applies


def frame_accept(request: Request) -> list[MediaRange]:
    """The ``accept`` query parameter's media ranges (PS3.18 8.3.3.1), then the Accept header's."""
    header = parse_accept(request.headers.get("Accept"))
    query = [v for v in request.args.getlist("accept") if v.strip()]
    if not query:
        return header
    return parse_accept(", ".join(query)) + header


def choose(
    accept: list[MediaRange], info: FrameInfo, count: int, refusal: Callable[[str], str | None]
) -> tuple[FrameForm | None, list[str]]:
    """The form of the first acceptable media range, and the reasons others were passed over (for a 406).

    ``count`` is the number of frames asked for (single-part needs one);
    ``refusal(target)`` says why the instance's frames cannot be re-encoded in
    ``target`` (None: they can); it is asked only when a range needs it.
    """
    reasons: list[str] = []
    for r in accept:
        single = False
        if r.type == media.MULTIPART_RELATED:
            inner = MediaRange(r.params.get("type", media.OCTET_STREAM).lower())
            ts = r.params.get("transfer-syntax")
        elif r.type == "*/*":
            inner, ts = MediaRange("*/*"), None
        else:
            if count != 1:
                reasons.append(f"{r.type}: a single-part answer carries one frame; ask for multipart/related")
                continue
            inner, ts, single = MediaRange(r.type), r.params.get("transfer-syntax"), True
        form = _as_held(inner, ts, info)
        if form is not None:
            return FrameForm(form[0], form[1], None, single), reasons
        target = ts if ts in frame_codec.FRAME_TARGETS else None
        if ts is None and inner.type in frame_codec.DEFAULT_SYNTAX_OF_TYPE:
            target = frame_codec.DEFAULT_SYNTAX_OF_TYPE[inner.type]
        if target is None or target == info.transfer_syntax:
            continue
        part_type = frame_codec.media_type(target)
        if not (inner.matches(part_type) or inner.type == media.OCTET_STREAM):
            continue
        why = refusal(target)
        if why is None:
            return FrameForm(False, part_type, target, single), reasons
        reasons.append(f"{target}: {why}")
    return None, reasons


def _as_held(inner: MediaRange, ts: str | None, info: FrameInfo) -> tuple[bool, str | None] | None:
    """(stored encoding?, part media type or None for the natural one) when the range takes the frames as held.

    PS3.18 8.7.3: ``transfer-syntax=*`` lets the server choose, so frames go as
    stored (an encapsulated frame's bitstream, its Table 8.7.3-5 media type in
    the part's Content-Type); ``application/octet-stream`` with no or the
    Explicit VR Little Endian transfer syntax asks for native frames; an image
    media type of the stored syntax asks for the stored bitstream.
    """
    stored_types = info.media_types
    image_type = next((t for t in stored_types if inner.type == t), None) or next(
        (t for t in stored_types if inner.type != media.OCTET_STREAM and inner.matches(t) and inner.type != "*/*"), None
    )
    if ts == "*" and (inner.matches(media.OCTET_STREAM) or image_type):
        return True, image_type
    if image_type and ts in (None, info.transfer_syntax):
        return True, image_type
    if inner.matches(media.OCTET_STREAM) and ts in (None, media.DEFAULT_TRANSFER_SYNTAX):
        if info.encapsulated and not info.decodable:
            return None
        return False, None
    if info.encapsulated and inner.matches(media.OCTET_STREAM) and ts == info.transfer_syntax:
        return True, None
    return None


def entity_tag(stored_sha256: str, frame: int, transfer_syntax: str, form: FrameForm) -> str | None:
    """A strong ETag for one frame's single-part body: the stored file's digest, the frame and how it is produced.

    The same stored bytes give the same frame bytes (the codecs are
    deterministic; their versions are part of the tag for re-encoded frames),
    so a client may join ranges of two responses that carry the same tag.
    None when the stored digest is unknown.
    """
    if not stored_sha256:
        return None
    how = "stored" if form.stored else (f"encoded:{_codec_versions()}" if form.target else "native")
    text = f"{stored_sha256}|{frame}|{transfer_syntax}|{how}"
    return '"' + hashlib.sha256(text.encode()).hexdigest()[:32] + '"'


@lru_cache(maxsize=1)
def _codec_versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("pydicom", "imagecodecs", "pylibjpeg-openjpeg"):
        try:
            out.append(f"{name}={version(name)}")
        except PackageNotFoundError:
            out.append(f"{name}=-")
    return ",".join(out)


def byte_range(request: Request, length: int, etag: str | None) -> tuple[int, int] | None | bool:
    """The one byte range of a single-part frame to send: ``(start, end)``; None for the whole body; False for 416.

    Ignored (whole body) when there is no Range, it is not one ``bytes`` range,
    or ``If-Range`` names another representation (RFC 9110 13.1.5; a date
    never matches: the frame has no Last-Modified).
    """
    if not request.headers.get("Range") or request.method not in ("GET", "HEAD"):
        return None
    if_range = request.headers.get("If-Range")
    if if_range is not None and (etag is None or if_range.strip() != etag):  # strong comparison; W/ never matches
        return None
    rng = request.range
    if rng is None or rng.units != "bytes" or len(rng.ranges) != 1:
        return None
    bounds = rng.range_for_length(length)
    if bounds is None:
        return False
    return bounds
