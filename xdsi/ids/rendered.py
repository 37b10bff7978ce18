"""WADO-WS RetrieveRenderedImagingDocumentSet: parameters to renderer calls and renderer refusals to WADO codes.

Every parameter of a RenderedDocumentRequest either takes effect or yields
the PS3.18 6.4.4 error for that document: nothing is ignored.  Images are
rendered before the response is sent (a refusal must become a RegistryError,
not a broken stream) into spooled temporary files, so memory stays bounded
whatever the number of documents.
"""

from __future__ import annotations

import io
import tempfile
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from pydicom import dcmread

from xdsi.archive.retrieve import NotAvailable
from xdsi.ids.model import DocumentRequest, RegistryError, RetrieveResult, ReturnedDocument
from xdsi.ids.service import ImagingDocumentSource
from xdsi.render import (
    RENDERED_TYPES,
    NotRenderable,
    RenderError,
    UnsupportedParameter,
    parse_annotation,
    parse_float,
    parse_int,
    parse_region,
    render,
)
from xdsi.render.params import MAX_SIZE
from xdsi.uids import is_valid_uid
from xdsi.xdsconst import (
    WADO_ANONYMIZATION_NOT_SUPPORTED,
    WADO_FORMAT_NOT_SUPPORTED,
    WADO_FRAME_OUT_OF_RANGE,
    WADO_INCONSISTENT_IDENTIFIERS,
    WADO_INVALID_PARAMETER,
    WADO_PROCESSING_FAILURE,
    WADO_UID_DOES_NOT_MATCH_SOP_CLASS,
    WADO_UNKNOWN_PRESENTATION,
    WADO_UNKNOWN_PRESENTATION_SERIES,
    XDS_DOCUMENT_UNIQUE_ID_ERROR,
)

GSPS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"
SPOOL_MEMORY = 1024 * 1024
CHARSET_RE_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:*;=")

# the renderer's parameter names, as PS3.18 spells them
PARAMETER_NAMES = {
    "rows": "Rows",
    "columns": "Columns",
    "region": "Region",
    "window_center": "WindowCenter",
    "window_width": "WindowWidth",
    "image_quality": "ImageQuality",
    "frame_number": "FrameNumber",
    "annotation": "Annotation",
    "content_type": "ContentType",
    "presentation_state": "PresentationUID",
    "object": "DocumentUniqueId",
}


@dataclass(frozen=True)
class RenderedRequest:
    """One RenderedDocumentRequest; parameters as the strings received (None when absent)."""

    document: DocumentRequest
    content_types: tuple[str, ...]
    annotation: str | None = None
    rows: str | None = None
    columns: str | None = None
    region: str | None = None
    window_width: str | None = None
    window_center: str | None = None
    image_quality: str | None = None
    presentation_uid: str | None = None
    presentation_series_uid: str | None = None
    anonymize: str | None = None
    frame_number: str | None = None
    charsets: tuple[str, ...] = ()


@dataclass
class _Params:
    content_type: str
    kw: dict[str, object] = field(default_factory=dict)


class _Refused(Exception):
    def __init__(self, code: str, context: str) -> None:
        super().__init__(context)
        self.code = code
        self.context = context


def _map_render_error(exc: RenderError) -> _Refused:
    name = PARAMETER_NAMES.get(exc.parameter, exc.parameter)
    if isinstance(exc, NotRenderable):
        return _Refused(WADO_PROCESSING_FAILURE, f"cannot render: {exc.message}")
    if isinstance(exc, UnsupportedParameter):
        return _Refused(WADO_FORMAT_NOT_SUPPORTED if exc.parameter == "content_type" else WADO_INVALID_PARAMETER, f"{name}: {exc.message}")
    if exc.parameter == "frame_number" and "requested" in exc.message:
        return _Refused(WADO_FRAME_OUT_OF_RANGE, f"{name}: {exc.message}")
    return _Refused(WADO_INVALID_PARAMETER, f"{name}: {exc.message}")


def _params(r: RenderedRequest) -> _Params:
    """Parse and check every parameter; raise _Refused naming the first bad one."""
    if r.anonymize is not None and r.anonymize.strip():
        if r.anonymize.strip().lower() == "yes":
            raise _Refused(WADO_ANONYMIZATION_NOT_SUPPORTED, "Anonymize: this Imaging Document Source does not anonymize")
        raise _Refused(WADO_INVALID_PARAMETER, f"Anonymize: {r.anonymize[:40]!r} is not 'yes'")
    wanted = [c.split(";", 1)[0].strip().lower() for c in r.content_types]
    ct = next((c for c in wanted if c in RENDERED_TYPES), None)
    if ct is None:
        raise _Refused(WADO_FORMAT_NOT_SUPPORTED, f"ContentType: none of {', '.join(wanted) or '(none)'} can be rendered; use {', '.join(RENDERED_TYPES)}")
    for cs in r.charsets:
        if not cs.strip() or not set(cs.strip()) <= CHARSET_RE_OK:
            raise _Refused(WADO_INVALID_PARAMETER, f"Charset: {cs[:40]!r} is not a character set name")
    try:
        kw: dict[str, object] = {
            "rows": parse_int(r.rows, "rows", low=1, high=MAX_SIZE),
            "columns": parse_int(r.columns, "columns", low=1, high=MAX_SIZE),
            "region": parse_region(r.region),
            "window_center": parse_float(r.window_center, "window_center"),
            "window_width": parse_float(r.window_width, "window_width"),
            "image_quality": parse_int(r.image_quality, "image_quality", low=1, high=100),
            "frame_number": parse_int(r.frame_number, "frame_number", low=1, high=2**31 - 1),
            "annotation": parse_annotation(r.annotation),
        }
    except RenderError as exc:
        raise _map_render_error(exc) from None
    if (kw["window_center"] is None) != (kw["window_width"] is None):
        raise _Refused(WADO_INVALID_PARAMETER, "WindowCenter and WindowWidth must be given together")
    if kw["image_quality"] is not None and ct != "image/jpeg":
        raise _Refused(WADO_INVALID_PARAMETER, f"ImageQuality applies to image/jpeg only, not {ct}")
    if r.presentation_series_uid and not r.presentation_uid:
        raise _Refused(WADO_INVALID_PARAMETER, "PresentationSeriesUID without PresentationUID")
    if r.presentation_uid is not None and not r.presentation_series_uid:
        raise _Refused(WADO_INVALID_PARAMETER, "PresentationUID needs PresentationSeriesUID")
    return _Params(ct, kw)


def _presentation_state(ids: ImagingDocumentSource, r: RenderedRequest, study_uid: str):  # type: ignore[no-untyped-def]
    uid, series = (r.presentation_uid or "").strip(), (r.presentation_series_uid or "").strip()
    if not is_valid_uid(uid):
        raise _Refused(WADO_INVALID_PARAMETER, f"PresentationUID {uid[:80]!r} is not a valid UID")
    if not is_valid_uid(series):
        raise _Refused(WADO_INVALID_PARAMETER, f"PresentationSeriesUID {series[:80]!r} is not a valid UID")
    refs = ids.retrieve.select(sop_uids=[uid])
    if not refs:
        raise _Refused(WADO_UNKNOWN_PRESENTATION, f"no presentation state {uid}")
    ref = refs[0]
    if ref.series_uid != series:
        raise _Refused(WADO_UNKNOWN_PRESENTATION_SERIES, f"presentation state {uid} is not in series {series}")
    if ref.sop_class_uid != GSPS_SOP_CLASS:
        raise _Refused(WADO_UID_DOES_NOT_MATCH_SOP_CLASS, f"{uid} is not a Grayscale Softcopy Presentation State ({ref.sop_class_uid})")
    if ref.study_uid != study_uid:
        raise _Refused(WADO_INCONSISTENT_IDENTIFIERS, f"presentation state {uid} belongs to another study")
    try:
        return dcmread(ids.path(ref))
    except (NotAvailable, OSError) as exc:
        raise _Refused(WADO_UNKNOWN_PRESENTATION, f"presentation state {uid} cannot be read: {exc}") from None


def _spooled(data: bytes):  # type: ignore[no-untyped-def]
    f = tempfile.SpooledTemporaryFile(SPOOL_MEMORY)
    f.write(data)
    f.seek(0)

    def produce() -> Iterator[bytes]:
        try:
            while True:
                b = f.read(256 * 1024)
                if not b:
                    return
                yield b
        finally:
            f.close()

    return produce


def retrieve_rendered(ids: ImagingDocumentSource, requests: Sequence[RenderedRequest]) -> RetrieveResult:
    resolved, errors = ids.resolve([r.document for r in requests])
    by_request = {id(x.request): x for x in resolved}
    documents: list[ReturnedDocument] = []
    for r in requests:
        item = by_request.get(id(r.document))
        if item is None:
            continue
        loc = r.document.document_unique_id
        try:
            p = _params(r)
            ps = _presentation_state(ids, r, item.ref.study_uid) if r.presentation_uid is not None else None
            try:
                path = ids.path(item.ref)
            except (NotAvailable, OSError) as exc:
                raise _Refused(XDS_DOCUMENT_UNIQUE_ID_ERROR, f"instance {loc} cannot be read: {exc}") from None
            try:
                data = render(path, content_type=p.content_type, presentation_state=ps, **p.kw)  # type: ignore[arg-type]
            except RenderError as exc:
                raise _map_render_error(exc) from None
            except (MemoryError, OSError, ValueError) as exc:
                raise _Refused(WADO_PROCESSING_FAILURE, f"rendering failed: {exc}") from None
        except _Refused as refused:
            errors.append(RegistryError(refused.code, refused.context, loc))
            continue
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
        used: dict[str, str] = {"Rows": str(height), "Columns": str(width)}
        for key, value in (
            ("Annotation", ",".join(p.kw["annotation"]) if p.kw["annotation"] else None),  # type: ignore[arg-type]
            ("Region", r.region.strip() if r.region else None),
            ("WindowWidth", r.window_width.strip() if r.window_width else None),
            ("WindowCenter", r.window_center.strip() if r.window_center else None),
            ("ImageQuality", r.image_quality.strip() if r.image_quality else None),
            ("PresentationUID", r.presentation_uid.strip() if r.presentation_uid else None),
            ("PresentationSeriesUID", r.presentation_series_uid.strip() if r.presentation_series_uid else None),
            ("FrameNumber", r.frame_number.strip() if r.frame_number is not None else None),
        ):
            if value is not None:
                used[key] = value
        documents.append(ReturnedDocument(request=r.document, mime_type=p.content_type, produce=_spooled(data), ref=item.ref, extra=used))
    return RetrieveResult(documents, _ordered(errors, requests))


def _ordered(errors: list[RegistryError], requests: Sequence[RenderedRequest]) -> list[RegistryError]:
    """Errors in the order of the requests they belong to (identity errors come first otherwise)."""
    order = {r.document.document_unique_id: i for i, r in reversed(list(enumerate(requests)))}
    return sorted(errors, key=lambda e: order.get(e.location or "", -1))
