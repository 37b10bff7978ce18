"""WADO-WS RetrieveRenderedImagingDocumentSet: requests to the one render parser, refusals to WADO codes.

Every parameter of a RenderedDocumentRequest either takes effect or yields
the PS3.18 6.4.4 error for that document: nothing is ignored.  Parameters are
checked by :func:`xdsi.render.request.parse_render_request` and presentation
states loaded by :meth:`RetrieveService.presentation_state`, the same parser
and loader as WADO-URI and WADO-RS.  Images are rendered before the response
is sent (a refusal must become a RegistryError, not a broken stream) into
spooled temporary files, so memory stays bounded whatever the number of
documents.
"""

from __future__ import annotations

import io
import tempfile
from dataclasses import dataclass
from typing import Iterator, Sequence

from xdsi.archive.retrieve import NotAvailable, PresentationStateError
from xdsi.wire.ebrs import RegistryError
from xdsi.ids.model import DocumentRequest, RetrieveResult, ReturnedDocument
from xdsi.ids.service import ImagingDocumentSource
from xdsi.render import NotRenderable, RenderError, UnsupportedParameter
from xdsi.render.request import RenderRequest, parse_render_request
from xdsi.standards.constants import (
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

SPOOL_MEMORY = 1024 * 1024

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
    "presentation_uid": "PresentationUID",
    "presentation_series_uid": "PresentationSeriesUID",
    "anonymize": "Anonymize",
    "charset": "Charset",
    "object": "DocumentUniqueId",
}

# the one presentation-state loader's refusals as WADO-WS codes
PRESENTATION_CODES = {
    "unknown": WADO_UNKNOWN_PRESENTATION,
    "series": WADO_UNKNOWN_PRESENTATION_SERIES,
    "sop_class": WADO_UID_DOES_NOT_MATCH_SOP_CLASS,
    "study": WADO_INCONSISTENT_IDENTIFIERS,
    "unreadable": WADO_UNKNOWN_PRESENTATION,
}


@dataclass(frozen=True)
class RenderedRequest:
    """One RenderedDocumentRequest: the document and its rendering parameters as received."""

    document: DocumentRequest
    render: RenderRequest


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
        if exc.parameter == "anonymize":
            return _Refused(WADO_ANONYMIZATION_NOT_SUPPORTED, f"{name}: this Imaging Document Source does not anonymize")
        return _Refused(WADO_FORMAT_NOT_SUPPORTED if exc.parameter == "content_type" else WADO_INVALID_PARAMETER, f"{name}: {exc.message}")
    if exc.parameter == "frame_number" and "requested" in exc.message:
        return _Refused(WADO_FRAME_OUT_OF_RANGE, f"{name}: {exc.message}")
    return _Refused(WADO_INVALID_PARAMETER, f"{name}: {exc.message}")


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
    retrieve = ids.retrieve
    for r in requests:
        item = by_request.get(id(r.document))
        if item is None:
            continue
        loc = r.document.document_unique_id
        try:
            try:
                params = parse_render_request(r.render)
            except RenderError as exc:
                raise _map_render_error(exc) from None
            ps = None
            if params.presentation is not None:
                try:
                    ps = retrieve.presentation_state(item.ref.study_uid, *params.presentation)
                except PresentationStateError as exc:
                    raise _Refused(PRESENTATION_CODES[exc.reason], exc.message) from None
            try:
                data = retrieve.render(item.ref, params, ps)
            except RenderError as exc:
                raise _map_render_error(exc) from None
            except (NotAvailable, OSError) as exc:
                raise _Refused(XDS_DOCUMENT_UNIQUE_ID_ERROR, f"instance {loc} cannot be read: {exc}") from None
            except (MemoryError, ValueError) as exc:
                raise _Refused(WADO_PROCESSING_FAILURE, f"rendering failed: {exc}") from None
        except _Refused as refused:
            errors.append(RegistryError(refused.code, refused.context, loc))
            continue
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
        used: dict[str, str] = {"Rows": str(height), "Columns": str(width)}
        q = r.render
        for key, value in (
            ("Annotation", ",".join(params.annotation) if params.annotation else None),
            ("Region", q.region.strip() if q.region else None),
            ("WindowWidth", q.window_width.strip() if q.window_width else None),
            ("WindowCenter", q.window_center.strip() if q.window_center else None),
            ("ImageQuality", q.image_quality.strip() if q.image_quality else None),
            ("PresentationUID", q.presentation_uid.strip() if q.presentation_uid else None),
            ("PresentationSeriesUID", q.presentation_series_uid.strip() if q.presentation_series_uid else None),
            ("FrameNumber", q.frame_number.strip() if q.frame_number is not None else None),
        ):
            if value is not None:
                used[key] = value
        documents.append(ReturnedDocument(request=r.document, mime_type=params.content_type, produce=_spooled(data), ref=item.ref, extra=used))
    return RetrieveResult(documents, _ordered(errors, requests))


def _ordered(errors: list[RegistryError], requests: Sequence[RenderedRequest]) -> list[RegistryError]:
    """Errors in the order of the requests they belong to (identity errors come first otherwise)."""
    order = {r.document.document_unique_id: i for i, r in reversed(list(enumerate(requests)))}
    return sorted(errors, key=lambda e: order.get(e.location or "", -1))
