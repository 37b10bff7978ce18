"""The Imaging Document Source web service: RAD-69 and the two WADO-WS operations as a spyne application.

:class:`ImagingDocumentSourceService` declares the three operations with
``@rpc`` over the typed messages of :mod:`xdsi.soap.models`; each method only
translates, typed request into :class:`~xdsi.ids.DocumentRequest` values for
:class:`xdsi.ids.ImagingDocumentSource` and its result into the response model.
Every rule (which document is an error, which transfer syntax) lives in the
service layer.  :func:`make_application` mounts it at ``/xdsi/ImagingDocumentSource``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Iterator

from spyne import Application, ServiceBase

from xdsi.archive import Archive
from xdsi.audit import http as audit_http
from xdsi.wire.regions import FileChunks
from xdsi.audit.messages import TRANSACTION
from xdsi.config import LimitsSettings
from xdsi.ids import DocumentRequest, ImagingDocumentSource
from xdsi.ids.information import InformationRequest, retrieve_information
from xdsi.ids.model import RetrieveResult
from xdsi.ids.rendered import RenderedRequest, retrieve_rendered
from xdsi.render.request import RenderRequest
from xdsi.soap import models as M
from xdsi.security.xua import protocol_options
from xdsi.soap.application import SoapApplication
from xdsi.soap.protocol import BODY_READERS, Exchange, IheSoap12, Route, ihe_operation, rename_namespace, text_value
from xdsi.soap.validation import SCHEMA_DIR, WSDL_DIR
from xdsi.standards.constants import (
    ACTION_INFORMATION,
    ACTION_INFORMATION_RESPONSE,
    ACTION_RAD69,
    ACTION_RAD69_LEGACY,
    ACTION_RAD69_RESPONSE,
    ACTION_RENDERED,
    ACTION_RENDERED_RESPONSE,
    ACTION_RENDERED_SWAPPED,
    ACTION_RENDERED_SWAPPED_RESPONSE,
    NS_XDS,
    NS_IHERAD,
    NS_WADO,
    NS_WADO_SWAPPED,
)

log = logging.getLogger(__name__)

RAD69_REQUEST = f"{{{NS_IHERAD}}}RetrieveImagingDocumentSetRequest"
RENDERED_REQUEST = f"{{{NS_WADO}}}RetrieveRenderedImagingDocumentSetRequest"
INFORMATION_REQUEST = f"{{{NS_WADO}}}RetrieveImagingDocumentSetInformationRequest"


@dataclass
class SourceContext:
    """What the service methods work with: the Imaging Document Source and the XPath limits."""

    ids: ImagingDocumentSource
    limits: LimitsSettings | None
    archive: Any = None  # for the audit trail (archive.audit) and its patient look-ups


def _s(value: str | None) -> str:
    return (value or "").strip()


def _document(req: Any, study_uid: str, series_uid: str) -> DocumentRequest:
    hc = req.HomeCommunityId
    return DocumentRequest(
        study_uid=study_uid,
        series_uid=series_uid,
        repository_unique_id=_s(req.RepositoryUniqueId),
        document_unique_id=_s(req.DocumentUniqueId),
        home_community_id=None if hc is None else hc.strip(),
    )


def _documents(request: Any, member: str) -> Iterator[tuple[Any, DocumentRequest]]:
    """(typed document element, request value) under every StudyRequest/SeriesRequest, in document order."""
    for study in request.StudyRequest or ():
        for series in study.SeriesRequest or ():
            for doc in getattr(series, member) or ():
                yield doc, _document(doc, _s(study.studyInstanceUID), _s(series.seriesInstanceUID))


def _read_rad69_request(el: Any) -> SimpleNamespace:
    """A schema-valid ``RetrieveImagingDocumentSetRequest`` element as the attributes the operation reads.

    The same values spyne's reader gives (attributes as given, element text '' when empty, None
    when absent), without building a spyne ComplexModel per DocumentRequest (:data:`BODY_READERS`).
    """
    rad, xds = f"{{{NS_IHERAD}}}", f"{{{NS_XDS}}}"

    def document(d: Any) -> SimpleNamespace:
        return SimpleNamespace(
            HomeCommunityId=text_value(d.find(xds + "HomeCommunityId")),
            RepositoryUniqueId=text_value(d.find(xds + "RepositoryUniqueId")),
            DocumentUniqueId=text_value(d.find(xds + "DocumentUniqueId")),
        )

    studies = [
        SimpleNamespace(
            studyInstanceUID=st.get("studyInstanceUID"),
            SeriesRequest=[
                SimpleNamespace(seriesInstanceUID=se.get("seriesInstanceUID"), DocumentRequest=[document(d) for d in se.iterchildren(xds + "DocumentRequest")])
                for se in st.iterchildren(rad + "SeriesRequest")
            ],
        )
        for st in el.iterchildren(rad + "StudyRequest")
    ]
    tsl = el.find(rad + "TransferSyntaxUIDList")
    syntaxes = None if tsl is None else SimpleNamespace(TransferSyntaxUID=[text_value(t) for t in tsl.iterchildren(rad + "TransferSyntaxUID")])
    return SimpleNamespace(StudyRequest=studies, TransferSyntaxUIDList=syntaxes)


BODY_READERS[RAD69_REQUEST] = _read_rad69_request


def _log_result(what: str, result: Any, ex: Exchange) -> None:
    sec = ex.envelope.security if ex.envelope is not None else None
    log.info(
        "%s: %d document(s), %d error(s), status %s%s",
        what,
        len(result.documents),
        len(result.errors),
        result.status.rsplit(":", 1)[-1],
        f", asserted by {sec.subject!r} via {sec.issuer!r}" if sec is not None else "",
    )


def _echo(req: DocumentRequest) -> dict[str, Any]:
    """The identifiers echoed in a response; HomeCommunityId only when it was sent (ids_2018-4820)."""
    return {"HomeCommunityId": req.home_community_id, "RepositoryUniqueId": req.repository_unique_id}


def retrieve_response(result: RetrieveResult, ex: Exchange, audit: audit_http.Transfer | None = None) -> M.RetrieveDocumentSetResponseType:
    """``RetrieveDocumentSetResponse``: one XOP-referenced Document per returned instance (RAD-69, ITI-43)."""
    ex.on_close(result.close)
    return M.document_set_response(
        result.status,
        result.errors,
        (
            (d.request.home_community_id, d.request.repository_unique_id, d.request.document_unique_id, d.mime_type, M.StreamedDocument(_tracked(d, audit), d.mime_type))
            for d in result.documents
        ),
    )


def _tracked(d: Any, audit: audit_http.Transfer | None) -> Any:
    """The document's chunks, counted by the audit trail as sent once written whole."""
    if audit is None or d.ref is None:
        return d.produce if isinstance(d.produce, FileChunks) else d.chunks
    if isinstance(d.produce, FileChunks):  # stays a file the server can sendfile; counted once sent whole
        ref = d.ref
        return d.produce.then(lambda: audit.sent(ref.study_uid, ref.sop_class_uid))
    return audit.tracked(d.chunks, d.ref.study_uid, d.ref.sop_class_uid)


def _audit_transfer(source: SourceContext, ctx: Any, ex: Exchange, requests: list[DocumentRequest], result: Any, what: str, event_type: Any) -> audit_http.Transfer | None:
    """Begin Transferring / Instances Transferred per study for a RAD-69 (or rendered) response, recorded when it is released.

    What is intended is every returned document; what fails is every RegistryError of severity
    Error, under the study it was requested in (issue 12; PS3.15 A.5.3.3 and A.5.3.7, RAD-69
    following ITI TF-2 3.43.6.1 in recording what was not retrieved as a failure).
    """
    if source.archive is None:
        return None
    audit = audit_http.transfer(source.archive, ctx.transport.req_env, event_type, what, endpoint=True)
    if audit is None:
        return None
    study_of = {r.document_unique_id: r.study_uid for r in requests}
    for d in result.documents:
        if d.ref is not None:
            audit.intend(d.ref.study_uid, d.ref.sop_class_uid)
    for e in result.errors:
        if e.is_error:
            audit.omit(study_of.get(e.location or "", ""), f"{e.location}: {e.code_context}")
    ex.on_close(audit.close)
    return audit


class ImagingDocumentSourceService(ServiceBase):
    """RAD-69 RetrieveImagingDocumentSet, WADO-WS RetrieveRenderedImagingDocumentSet and RetrieveImagingDocumentSetInformation."""

    @ihe_operation(M.RetrieveImagingDocumentSetRequestType, RAD69_REQUEST, M.RetrieveDocumentSetResponseType, f"{{{NS_XDS}}}RetrieveDocumentSetResponse")
    def ImagingDocumentSource_RetrieveImagingDocumentSet(ctx: Any, request: Any) -> M.RetrieveDocumentSetResponseType:
        ex: Exchange = ctx.udc
        source: SourceContext = ex.context
        requests = [r for _d, r in _documents(request, "DocumentRequest")]
        tsl = request.TransferSyntaxUIDList
        syntaxes = [_s(t) for t in (tsl.TransferSyntaxUID or ())] if tsl is not None else []
        result = source.ids.retrieve_set(requests, syntaxes)
        _log_result("RAD-69", result, ex)
        audit = _audit_transfer(source, ctx, ex, requests, result, "RAD-69", TRANSACTION["RAD-69"])
        return retrieve_response(result, ex, audit)

    @ihe_operation(M.RetrieveRenderedImagingDocumentSetRequestType, RENDERED_REQUEST, M.RetrieveRenderedImagingDocumentSetResponseType, f"{{{NS_WADO}}}RetrieveRenderedImagingDocumentSetResponse")
    def ImagingDocumentSource_RetrieveRenderedImagingDocumentSet(ctx: Any, request: Any) -> M.RetrieveRenderedImagingDocumentSetResponseType:
        ex: Exchange = ctx.udc
        source: SourceContext = ex.context
        requests = []
        for doc, req in _documents(request, "RenderedDocumentRequest"):
            content_types = doc.ContentTypeList.ContentType if doc.ContentTypeList is not None else None
            charsets = doc.CharsetList.Charset if doc.CharsetList is not None else None
            render = RenderRequest(
                content_types=tuple(_s(c) for c in content_types or ()),
                annotation=doc.Annotation,
                rows=doc.Rows,
                columns=doc.Columns,
                region=doc.Region,
                window_width=doc.WindowWidth,
                window_center=doc.WindowCenter,
                image_quality=doc.ImageQuality,
                presentation_uid=doc.PresentationUID,
                presentation_series_uid=doc.PresentationSeriesUID,
                anonymize=doc.Anonymize,
                frame_number=doc.FrameNumber,
                charsets=tuple(_s(c) for c in charsets or ()),
            )
            requests.append(RenderedRequest(document=req, render=render))
        result = retrieve_rendered(source.ids, requests)
        _log_result("WADO-WS rendered", result, ex)
        ex.on_close(result.close)
        audit = _audit_transfer(source, ctx, ex, [r.document for r in requests], result, "WADO-WS rendered", None)
        return M.RetrieveRenderedImagingDocumentSetResponseType(
            RegistryResponse=M.registry_response(result.status, result.errors),
            RenderedDocumentResponse=[
                M.RenderedDocumentResponse(
                    **_echo(doc.request),
                    SourceDocumentUniqueId=doc.request.document_unique_id,
                    **{name: doc.extra[name] for name in M.RENDERED_PARAMETERS if name in doc.extra},
                    mimeType=doc.mime_type,
                    Document=M.StreamedDocument(_tracked(doc, audit), doc.mime_type),
                )
                for doc in result.documents
            ],
        )

    @ihe_operation(M.RetrieveImagingDocumentSetInformationRequestType, INFORMATION_REQUEST, M.RetrieveImagingDocumentSetInformationResponseType, f"{{{NS_WADO}}}RetrieveImagingDocumentSetInformationResponse")
    def ImagingDocumentSource_RetrieveImagingDocumentSetInformation(ctx: Any, request: Any) -> M.RetrieveImagingDocumentSetInformationResponseType:
        ex: Exchange = ctx.udc
        source: SourceContext = ex.context
        requests = [
            InformationRequest(document=req, xpaths=tuple(x or "" for x in doc.XPath or ()), frame_number=doc.FrameNumber)
            for doc, req in _documents(request, "DocumentRequest")
        ]
        result = retrieve_information(source.ids, requests, source.limits)
        _log_result("WADO-WS information", result, ex)
        if getattr(source.archive, "audit", None) is not None:  # a Query per study asked about (issue 12); nothing when auditing is off
            failed = "; ".join(f"{e.location}: {e.code_context}" for e in result.errors if e.is_error) or None
            audit_http.information_query(source.archive, ctx.transport.req_env, ACTION_INFORMATION, ex.message.envelope,
                                         [r.document.study_uid for r in requests], failure=failed)
        return M.RetrieveImagingDocumentSetInformationResponseType(
            RegistryResponse=M.registry_response(result.status, result.errors),
            DocumentInformationResponse=[
                M.DocumentInformationResponse(
                    HomeCommunityId=doc.request.document.home_community_id,
                    DocumentUniqueId=doc.request.document.document_unique_id,
                    FrameNumber=doc.request.frame_number.strip() if doc.request.frame_number is not None else None,
                    XPathResponseList=M.XPathResponseList(XPathResponse=[M.XPathResult(res.text, tuple(res.elements)) for res in doc.results]),
                )
                for doc in result.documents
            ],
        )


def _to_wado(body: Any) -> Any:
    return rename_namespace(body, NS_WADO_SWAPPED, NS_WADO)


def _in_request_namespace(body: Any, request_qname: str) -> Any:
    """The response in the WADO namespace the request *body* used: swapped only for a swapped body.

    The action does not decide it: a client may send the legacy action with a
    body in the standard ``urn:dicom:wado:ws:2011`` (or the reverse), and it
    reads the answer with the namespace of the body it wrote.
    """
    if request_qname.startswith(f"{{{NS_WADO_SWAPPED}}}"):
        return rename_namespace(body, NS_WADO, NS_WADO_SWAPPED)
    return body


def routes() -> dict[str, Route]:
    """``wsa:Action`` -> operation, legacy actions and the swapped WADO namespace (dcm4che before #380) included.

    The response action follows the request's action; the response body's
    namespace follows the request body's (:func:`_in_request_namespace`).
    """
    rad69 = Route(RAD69_REQUEST, ACTION_RAD69_RESPONSE, frozenset({RAD69_REQUEST}))
    swapped_request = f"{{{NS_WADO_SWAPPED}}}RetrieveRenderedImagingDocumentSetRequest"
    rendered_bodies = frozenset({RENDERED_REQUEST, swapped_request})
    return {
        ACTION_RAD69: rad69,
        ACTION_RAD69_LEGACY: rad69,
        ACTION_RENDERED: Route(RENDERED_REQUEST, ACTION_RENDERED_RESPONSE, rendered_bodies, normalize=_to_wado, denormalize=_in_request_namespace),
        ACTION_RENDERED_SWAPPED: Route(
            RENDERED_REQUEST, ACTION_RENDERED_SWAPPED_RESPONSE, rendered_bodies, normalize=_to_wado, denormalize=_in_request_namespace
        ),
        ACTION_INFORMATION: Route(INFORMATION_REQUEST, ACTION_INFORMATION_RESPONSE, frozenset({INFORMATION_REQUEST})),
    }


def make_application(archive: Archive) -> SoapApplication:
    """The spyne WSGI application mounted at ``/xdsi/ImagingDocumentSource``."""
    lim = archive.settings.http_limits
    xua = protocol_options(archive)  # [xua]: the assertion policy and the audit of refusals, loaded once

    def protocol() -> IheSoap12:  # spyne: one protocol instance per direction
        return IheSoap12(routes(), max_document_requests=lim.max_document_requests, **xua)

    app = Application([ImagingDocumentSourceService], tns=NS_IHERAD, name="ImagingDocumentSource", in_protocol=protocol(), out_protocol=protocol())
    ids = ImagingDocumentSource(archive.retrieve, archive.settings.xds.repository_unique_id)
    return SoapApplication(
        app,
        context=SourceContext(ids, archive.settings.limits, archive),
        wsdl_file=WSDL_DIR / "ImagingDocumentSource.wsdl",
        schema_dir=SCHEMA_DIR,
        spool_dir=str(archive.settings.temp_dir),
        max_root_bytes=lim.max_soap_envelope,
        max_parts=lim.max_mtom_parts,
    )
