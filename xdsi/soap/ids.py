"""The Imaging Document Source web service: RAD-69 and the two WADO-WS operations, XML in and out.

This module only translates: request elements into :class:`DocumentRequest`
values for :class:`xdsi.ids.ImagingDocumentSource`, and its results into
response elements plus attachments streamed by the endpoint.  Every rule
(which document is an error, which transfer syntax) lives in the service.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from lxml import etree

from xdsi.archive import Archive
from xdsi.ids import DocumentRequest, ImagingDocumentSource
from xdsi.ids.model import RetrieveResult
from xdsi.soap.ebrs import registry_response
from xdsi.soap.endpoint import Operation, Reply, RequestContext, SoapEndpoint
from xdsi.wire.mtom import OutgoingAttachment, new_content_id, xop_include
from xdsi.soap.validation import WSDL_DIR
from xdsi.xdsconst import (
    ACTION_INFORMATION,
    ACTION_INFORMATION_RESPONSE,
    ACTION_RAD69,
    ACTION_RAD69_LEGACY,
    ACTION_RAD69_RESPONSE,
    ACTION_RENDERED,
    ACTION_RENDERED_RESPONSE,
    ACTION_RENDERED_SWAPPED,
    ACTION_RENDERED_SWAPPED_RESPONSE,
    NS_IHE,
    NS_IHERAD,
    NS_RS,
    NS_WADO,
    NS_WADO_SWAPPED,
)

log = logging.getLogger(__name__)

IHE = f"{{{NS_IHE}}}"
RAD = f"{{{NS_IHERAD}}}"
WADO = f"{{{NS_WADO}}}"
NSMAP_RESPONSE = {"ihe": NS_IHE, "rs": NS_RS}


def _text(el: Any, tag: str) -> str | None:
    child = el.find(tag)
    return None if child is None else (child.text or "").strip()


def document_request(el: Any, study_uid: str, series_uid: str) -> DocumentRequest:
    """A DocumentRequest (ihe:, or wado:RenderedDocumentRequest / DocumentRequest) as a value."""
    return DocumentRequest(
        study_uid=study_uid,
        series_uid=series_uid,
        repository_unique_id=_text(el, IHE + "RepositoryUniqueId") or "",
        document_unique_id=_text(el, IHE + "DocumentUniqueId") or "",
        home_community_id=_text(el, IHE + "HomeCommunityId"),
    )


def iter_document_elements(body: Any, ns: str, doc_tag: str) -> list[tuple[Any, DocumentRequest]]:
    """(element, request) for every document under StudyRequest/SeriesRequest, in document order."""
    out = []
    for study in body.iterchildren(ns + "StudyRequest"):
        study_uid = (study.get("studyInstanceUID") or "").strip()
        for series in study.iterchildren(ns + "SeriesRequest"):
            series_uid = (series.get("seriesInstanceUID") or "").strip()
            for doc in series.iterchildren(doc_tag):
                out.append((doc, document_request(doc, study_uid, series_uid)))
    return out


def _echo_ids(parent: Any, req: DocumentRequest, *, repository: bool = True, document_tag: str | None = IHE + "DocumentUniqueId") -> None:
    if req.home_community_id is not None:  # echoed only when it was sent (ids_2018-4820)
        etree.SubElement(parent, IHE + "HomeCommunityId").text = req.home_community_id
    if repository:
        etree.SubElement(parent, IHE + "RepositoryUniqueId").text = req.repository_unique_id
    if document_tag:
        etree.SubElement(parent, document_tag).text = req.document_unique_id


def _log_result(what: str, result: RetrieveResult, ctx: RequestContext) -> None:
    sec = ctx.envelope.security
    log.info(
        "%s: %d document(s), %d error(s), status %s%s",
        what,
        len(result.documents),
        len(result.errors),
        result.status.rsplit(":", 1)[-1],
        f", asserted by {sec.subject!r} via {sec.issuer!r}" if sec is not None else "",
    )


# --------------------------------------------------------------------------------------------------
# RAD-69 RetrieveImagingDocumentSet
# --------------------------------------------------------------------------------------------------


def retrieve_response(result: RetrieveResult) -> tuple[Any, list[OutgoingAttachment]]:
    """``ihe:RetrieveDocumentSetResponse`` with one XOP-referenced Document per returned instance."""
    root = etree.Element(IHE + "RetrieveDocumentSetResponse", nsmap=NSMAP_RESPONSE)
    registry_response(result.status, result.errors, parent=root)
    attachments = []
    for doc in result.documents:
        dr = etree.SubElement(root, IHE + "DocumentResponse")
        _echo_ids(dr, doc.request)
        etree.SubElement(dr, IHE + "mimeType").text = doc.mime_type
        cid = new_content_id()
        xop_include(etree.SubElement(dr, IHE + "Document"), cid)
        attachments.append(OutgoingAttachment(cid, doc.chunks, doc.mime_type, close=doc.close))
    return root, attachments


def make_rad69(ids: ImagingDocumentSource) -> Callable[[Any, RequestContext], Reply]:
    def handle(body: Any, ctx: RequestContext) -> Reply:
        requests = [r for _el, r in iter_document_elements(body, RAD, IHE + "DocumentRequest")]
        tsl = body.find(RAD + "TransferSyntaxUIDList")
        syntaxes = [(t.text or "").strip() for t in tsl.iterchildren(RAD + "TransferSyntaxUID")] if tsl is not None else []
        result = ids.retrieve_set(requests, syntaxes)
        _log_result("RAD-69", result, ctx)
        element, attachments = retrieve_response(result)
        return Reply(element, ACTION_RAD69_RESPONSE, attachments)

    return handle


# --------------------------------------------------------------------------------------------------
# wiring
# --------------------------------------------------------------------------------------------------


def _rename_namespace(el: Any, old: str, new: str) -> Any:
    """Move every element of namespace ``old`` to ``new`` (for the legacy swapped WADO namespace)."""
    for e in el.iter():
        if isinstance(e.tag, str) and e.tag.startswith("{" + old + "}"):
            e.tag = "{" + new + "}" + e.tag[len(old) + 2 :]
    etree.cleanup_namespaces(el)
    return el


def make_endpoint(archive: Archive) -> SoapEndpoint:
    """The WSGI application mounted at ``/xdsi/ImagingDocumentSource``."""
    ids = ImagingDocumentSource(archive.retrieve, archive.settings.xds.repository_unique_id)
    rad69 = Operation("RetrieveImagingDocumentSet", frozenset({RAD + "RetrieveImagingDocumentSetRequest"}), make_rad69(ids))
    operations = {ACTION_RAD69: rad69, ACTION_RAD69_LEGACY: rad69}
    from xdsi.soap.wado import make_information, make_rendered  # they build on this module's helpers

    rendered = Operation(
        "RetrieveRenderedImagingDocumentSet",
        frozenset({WADO + "RetrieveRenderedImagingDocumentSetRequest", f"{{{NS_WADO_SWAPPED}}}RetrieveRenderedImagingDocumentSetRequest"}),
        make_rendered(ids, archive),
        normalize=lambda b: _rename_namespace(b, NS_WADO_SWAPPED, NS_WADO),
    )
    operations[ACTION_RENDERED] = rendered
    operations[ACTION_RENDERED_SWAPPED] = rendered
    operations[ACTION_INFORMATION] = Operation(
        "RetrieveImagingDocumentSetInformation",
        frozenset({WADO + "RetrieveImagingDocumentSetInformationRequest"}),
        make_information(ids, archive.settings.limits),
    )
    lim = archive.settings.http_limits
    return SoapEndpoint(
        operations,
        WSDL_DIR / "ImagingDocumentSource.wsdl",
        spool_dir=str(archive.settings.temp_dir),
        max_root_bytes=lim.max_soap_envelope,
        max_parts=lim.max_mtom_parts,
        max_document_requests=lim.max_document_requests,
    )


__all__ = [
    "make_endpoint",
    "retrieve_response",
    "iter_document_elements",
    "ACTION_INFORMATION_RESPONSE",
    "ACTION_RENDERED_RESPONSE",
    "ACTION_RENDERED_SWAPPED_RESPONSE",
]
