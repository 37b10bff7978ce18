"""WADO-WS rendered and Information operations: request elements to service calls, results to response elements."""

from __future__ import annotations

from typing import Any, Callable

from lxml import etree

from xdsi.archive import Archive
from xdsi.config import LimitsSettings
from xdsi.ids import ImagingDocumentSource
from xdsi.ids.information import InformationRequest, retrieve_information
from xdsi.ids.rendered import RenderedRequest, retrieve_rendered
from xdsi.render.request import RenderRequest
from xdsi.soap.ebrs import registry_response
from xdsi.soap.endpoint import Reply, RequestContext
from xdsi.soap.ids import IHE, _echo_ids, _log_result, iter_document_elements
from xdsi.wire.mtom import OutgoingAttachment, new_content_id, xop_include
from xdsi.xdsconst import (
    ACTION_INFORMATION_RESPONSE,
    ACTION_RENDERED_RESPONSE,
    ACTION_RENDERED_SWAPPED,
    ACTION_RENDERED_SWAPPED_RESPONSE,
    NS_IHE,
    NS_NATIVE_DICOM,
    NS_RS,
    NS_WADO,
    NS_WADO_SWAPPED,
)

WADO = f"{{{NS_WADO}}}"
RS = f"{{{NS_RS}}}"
NSMAP = {"wado": NS_WADO, "ihe": NS_IHE, "rs": NS_RS}
RENDERED_ECHO = (
    "Annotation",
    "Rows",
    "Columns",
    "Region",
    "WindowWidth",
    "WindowCenter",
    "ImageQuality",
    "PresentationUID",
    "PresentationSeriesUID",
    "Anonymize",
    "FrameNumber",
)


def _opt(el: Any, local: str) -> str | None:
    child = el.find(WADO + local)
    return None if child is None else (child.text or "")


def _list(el: Any, container: str, item: str) -> tuple[str, ...]:
    c = el.find(WADO + container)
    return tuple((i.text or "").strip() for i in c.iterchildren(WADO + item)) if c is not None else ()


def make_rendered(ids: ImagingDocumentSource, archive: Archive) -> Callable[[Any, RequestContext], Reply]:
    def handle(body: Any, ctx: RequestContext) -> Reply:
        requests = [
            RenderedRequest(
                document=req,
                render=RenderRequest(
                    content_types=_list(el, "ContentTypeList", "ContentType"),
                    annotation=_opt(el, "Annotation"),
                    rows=_opt(el, "Rows"),
                    columns=_opt(el, "Columns"),
                    region=_opt(el, "Region"),
                    window_width=_opt(el, "WindowWidth"),
                    window_center=_opt(el, "WindowCenter"),
                    image_quality=_opt(el, "ImageQuality"),
                    presentation_uid=_opt(el, "PresentationUID"),
                    presentation_series_uid=_opt(el, "PresentationSeriesUID"),
                    anonymize=_opt(el, "Anonymize"),
                    frame_number=_opt(el, "FrameNumber"),
                    charsets=_list(el, "CharsetList", "Charset"),
                ),
            )
            for el, req in iter_document_elements(body, WADO, WADO + "RenderedDocumentRequest")
        ]
        result = retrieve_rendered(ids, requests)
        _log_result("WADO-WS rendered", result, ctx)
        root = etree.Element(WADO + "RetrieveRenderedImagingDocumentSetResponse", nsmap=NSMAP)
        registry_response(result.status, result.errors, tag=WADO + "RegistryResponse", parent=root)
        attachments = []
        for doc in result.documents:
            dr = etree.SubElement(root, WADO + "RenderedDocumentResponse")
            _echo_ids(dr, doc.request, document_tag=WADO + "SourceDocumentUniqueId")
            for name in RENDERED_ECHO:
                if name in doc.extra:
                    etree.SubElement(dr, WADO + name).text = doc.extra[name]
            etree.SubElement(dr, IHE + "mimeType").text = doc.mime_type
            cid = new_content_id()
            xop_include(etree.SubElement(dr, IHE + "Document"), cid)
            attachments.append(OutgoingAttachment(cid, doc.chunks, doc.mime_type))
        if ctx.action == ACTION_RENDERED_SWAPPED:  # answer a legacy client in its own namespace
            from xdsi.soap.ids import _rename_namespace

            return Reply(_rename_namespace(root, NS_WADO, NS_WADO_SWAPPED), ACTION_RENDERED_SWAPPED_RESPONSE, attachments)
        return Reply(root, ACTION_RENDERED_RESPONSE, attachments)

    return handle


def make_information(ids: ImagingDocumentSource, limits: LimitsSettings | None = None) -> Callable[[Any, RequestContext], Reply]:
    def handle(body: Any, ctx: RequestContext) -> Reply:
        requests = [
            InformationRequest(
                document=req,
                xpaths=tuple((x.text or "") for x in el.iterchildren(WADO + "XPath")),
                frame_number=_opt(el, "FrameNumber"),
            )
            for el, req in iter_document_elements(body, WADO, WADO + "DocumentRequest")
        ]
        result = retrieve_information(ids, requests, limits)
        _log_result("WADO-WS information", result, ctx)  # type: ignore[arg-type]
        root = etree.Element(WADO + "RetrieveImagingDocumentSetInformationResponse", nsmap={**NSMAP, "nd": NS_NATIVE_DICOM})
        registry_response(result.status, result.errors, parent=root)
        for doc in result.documents:
            dr = etree.SubElement(root, WADO + "DocumentInformationResponse")
            _echo_ids(dr, doc.request.document, repository=False)
            if doc.request.frame_number is not None:
                etree.SubElement(dr, WADO + "FrameNumber").text = doc.request.frame_number.strip()
            lst = etree.SubElement(dr, WADO + "XPathResponseList")
            for res in doc.results:
                xr = etree.SubElement(lst, WADO + "XPathResponse")
                xr.text = res.text or None
                for e in res.elements:
                    xr.append(e)
        return Reply(root, ACTION_INFORMATION_RESPONSE)

    return handle
