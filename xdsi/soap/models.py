"""The IHE XDS-I.b, XDS.b and DICOM WADO-WS messages as spyne ``ComplexModel`` types.

Each type mirrors its official schema (``xdsi/soap/schemas``): element names,
namespaces (a member whose schema element is a ``ref`` to another namespace
carries that namespace in ``sub_ns``), order (``_type_info`` as a list) and
attributes.  Requests are validated against the schemas before spyne maps
them (spyne's own mapping ignores namespaces and cardinalities), so a service
method can trust the shape it receives; responses are serialised by spyne
and must validate against the same schemas (the conformance tests check).

Two member types are serialised by :class:`xdsi.soap.protocol.IheSoap12`
rather than by spyne: :class:`XopDocument` (an ``xop:Include`` whose bytes
follow as a streamed MIME part) and :class:`XPathValue` (the mixed content of
an ``XPathResponse``: text, or copies of Native DICOM Model elements).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from spyne import ByteArray, ComplexModel, Unicode, XmlAttribute

from xdsi.standards.constants import NS_XDS, NS_IHERAD, NS_RS, NS_WADO


def _u(**kw: Any) -> Any:
    return Unicode(**kw)


def _opt(ns: str | None = None) -> Any:
    return Unicode(min_occurs=0, sub_ns=ns) if ns else Unicode(min_occurs=0)


def _many(cls: Any, *, min_occurs: int = 1, ns: str | None = None) -> Any:
    kw: dict[str, Any] = {"max_occurs": "unbounded", "min_occurs": min_occurs}
    if ns:
        kw["sub_ns"] = ns
    return cls.customize(**kw)


# -- values spyne hands to the protocol instead of serialising -------------------------------------


@dataclass
class StreamedDocument:
    """The bytes of one ``Document``: produced only when the MTOM writer reaches its part."""

    chunks: Callable[[], Iterable[bytes]]
    content_type: str
    close: Callable[[], None] | None = None


class XopDocument(ByteArray):
    """``base64Binary`` sent as an ``xop:Include`` and a binary MIME part (never inline base64)."""



@dataclass
class XPathResult:
    """One XPathResponse: a string value, or Native DICOM Model elements (lxml) for a node-set."""

    text: str | None
    elements: tuple[Any, ...] = ()


class XPathValue(Unicode):
    """``wado:XPathResponseType`` (mixed): text and/or copied elements, written by the protocol."""



# -- ebRS RegistryResponse (rs.xsd) ------------------------------------------------------------------


class RegistryErrorModel(ComplexModel):
    __namespace__ = NS_RS
    _type_info = [
        ("errorCode", XmlAttribute(Unicode)),
        ("codeContext", XmlAttribute(Unicode)),
        ("severity", XmlAttribute(Unicode)),
        ("location", XmlAttribute(Unicode)),
    ]


class RegistryErrorList(ComplexModel):
    __namespace__ = NS_RS
    _type_info = [
        ("RegistryError", _many(RegistryErrorModel)),
        ("highestSeverity", XmlAttribute(Unicode)),
    ]


class RegistryResponseType(ComplexModel):
    __namespace__ = NS_RS
    _type_info = [
        ("RegistryErrorList", RegistryErrorList.customize(min_occurs=0)),
        ("status", XmlAttribute(Unicode)),
    ]


# -- ITI-43 / RAD-69 (XDS.b_DocumentRepository.xsd, XDSI.b_ImagingDocumentSource.xsd) ----------------


class DocumentRequest(ComplexModel):
    __namespace__ = NS_XDS
    _type_info = [
        ("HomeCommunityId", _opt()),
        ("RepositoryUniqueId", _u(min_occurs=1)),
        ("DocumentUniqueId", _u(min_occurs=1)),
    ]


class RetrieveDocumentSetRequestType(ComplexModel):
    __namespace__ = NS_XDS
    _type_info = [("DocumentRequest", _many(DocumentRequest))]


class SeriesRequest(ComplexModel):
    __namespace__ = NS_IHERAD
    _type_info = [
        ("DocumentRequest", _many(DocumentRequest, ns=NS_XDS)),
        ("seriesInstanceUID", XmlAttribute(Unicode)),
    ]


class StudyRequest(ComplexModel):
    __namespace__ = NS_IHERAD
    _type_info = [
        ("SeriesRequest", _many(SeriesRequest)),
        ("studyInstanceUID", XmlAttribute(Unicode)),
    ]


class TransferSyntaxUIDList(ComplexModel):
    __namespace__ = NS_IHERAD
    _type_info = [("TransferSyntaxUID", _many(Unicode))]


class RetrieveImagingDocumentSetRequestType(ComplexModel):
    __namespace__ = NS_IHERAD
    _type_info = [
        ("StudyRequest", _many(StudyRequest)),
        ("TransferSyntaxUIDList", TransferSyntaxUIDList),
    ]


class DocumentResponse(ComplexModel):
    __namespace__ = NS_XDS
    _type_info = [
        ("HomeCommunityId", _opt()),
        ("RepositoryUniqueId", _u()),
        ("DocumentUniqueId", _u()),
        ("mimeType", _u()),
        ("Document", XopDocument),
    ]


class RetrieveDocumentSetResponseType(ComplexModel):
    __namespace__ = NS_XDS
    _type_info = [
        ("RegistryResponse", RegistryResponseType.customize(sub_ns=NS_RS)),
        ("DocumentResponse", _many(DocumentResponse, min_occurs=0)),
    ]


def document_set_response(status: str, errors: Iterable[Any], documents: Iterable[tuple[str | None, str, str, str, StreamedDocument]]) -> RetrieveDocumentSetResponseType:
    """``RetrieveDocumentSetResponse`` of RAD-69 and ITI-43: (HomeCommunityId or None, RepositoryUniqueId,
    DocumentUniqueId, mimeType, bytes) per returned document, each sent as an XOP attachment."""
    return RetrieveDocumentSetResponseType(
        RegistryResponse=registry_response(status, errors),
        DocumentResponse=[
            DocumentResponse(HomeCommunityId=home, RepositoryUniqueId=repository, DocumentUniqueId=document, mimeType=mime, Document=data)
            for home, repository, document, mime, data in documents
        ],
    )


# -- WADO-WS rendered (dicom.wado.ws.2011.xsd) -------------------------------------------------------

RENDERED_PARAMETERS = (
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


class ContentTypeList(ComplexModel):
    __namespace__ = NS_WADO
    _type_info = [("ContentType", _many(Unicode))]


class CharsetList(ComplexModel):
    __namespace__ = NS_WADO
    _type_info = [("Charset", _many(Unicode))]


class RenderedDocumentRequest(ComplexModel):
    __namespace__ = NS_WADO
    _type_info = [
        ("HomeCommunityId", _opt(NS_XDS)),
        ("RepositoryUniqueId", _u(sub_ns=NS_XDS)),
        ("DocumentUniqueId", _u(sub_ns=NS_XDS)),
        *[(name, _opt()) for name in RENDERED_PARAMETERS],
        ("ContentTypeList", ContentTypeList),
        ("CharsetList", CharsetList.customize(min_occurs=0)),
    ]


class RenderedSeriesRequest(ComplexModel):
    __namespace__ = NS_WADO
    _type_info = [
        ("RenderedDocumentRequest", _many(RenderedDocumentRequest)),
        ("seriesInstanceUID", XmlAttribute(Unicode)),
    ]


class RenderedStudyRequest(ComplexModel):
    __namespace__ = NS_WADO
    _type_info = [
        ("SeriesRequest", _many(RenderedSeriesRequest)),
        ("studyInstanceUID", XmlAttribute(Unicode)),
    ]


class RetrieveRenderedImagingDocumentSetRequestType(ComplexModel):
    __namespace__ = NS_WADO
    _type_info = [("StudyRequest", _many(RenderedStudyRequest))]


class RenderedDocumentResponse(ComplexModel):
    __namespace__ = NS_WADO
    _type_info = [
        ("HomeCommunityId", _opt(NS_XDS)),
        ("RepositoryUniqueId", _u(sub_ns=NS_XDS)),
        ("SourceDocumentUniqueId", _u()),
        *[(name, _opt()) for name in RENDERED_PARAMETERS],
        ("mimeType", _u(sub_ns=NS_XDS)),
        ("Document", XopDocument.customize(sub_ns=NS_XDS)),
    ]


class RetrieveRenderedImagingDocumentSetResponseType(ComplexModel):
    __namespace__ = NS_WADO
    _type_info = [
        ("RegistryResponse", RegistryResponseType.customize(sub_ns=NS_WADO)),
        ("RenderedDocumentResponse", _many(RenderedDocumentResponse, min_occurs=0)),
    ]


# -- WADO-WS Information (dicom.wado.ws.2011.information.xsd) -----------------------------------------


class InformationDocumentRequest(ComplexModel):
    __namespace__ = NS_WADO
    _type_info = [
        ("HomeCommunityId", _opt(NS_XDS)),
        ("RepositoryUniqueId", _u(sub_ns=NS_XDS)),
        ("DocumentUniqueId", _u(sub_ns=NS_XDS)),
        ("FrameNumber", _opt()),
        ("XPath", _many(Unicode, min_occurs=0)),
    ]


class InformationSeriesRequest(ComplexModel):
    __namespace__ = NS_WADO
    _type_info = [
        ("DocumentRequest", _many(InformationDocumentRequest)),
        ("seriesInstanceUID", XmlAttribute(Unicode)),
    ]


class InformationStudyRequest(ComplexModel):
    __namespace__ = NS_WADO
    _type_info = [
        ("SeriesRequest", _many(InformationSeriesRequest)),
        ("studyInstanceUID", XmlAttribute(Unicode)),
    ]


class RetrieveImagingDocumentSetInformationRequestType(ComplexModel):
    __namespace__ = NS_WADO
    _type_info = [("StudyRequest", _many(InformationStudyRequest))]


class XPathResponseList(ComplexModel):
    __namespace__ = NS_WADO
    _type_info = [("XPathResponse", _many(XPathValue))]


class DocumentInformationResponse(ComplexModel):
    __namespace__ = NS_WADO
    _type_info = [
        ("HomeCommunityId", _opt(NS_XDS)),
        ("DocumentUniqueId", _u(sub_ns=NS_XDS)),
        ("FrameNumber", _opt()),
        ("XPathResponseList", XPathResponseList),
    ]


class RetrieveImagingDocumentSetInformationResponseType(ComplexModel):
    __namespace__ = NS_WADO
    _type_info = [
        ("RegistryResponse", RegistryResponseType.customize(sub_ns=NS_RS)),
        ("DocumentInformationResponse", _many(DocumentInformationResponse, min_occurs=0)),
    ]


def registry_response(status: str, errors: Iterable[Any]) -> RegistryResponseType:
    """``RegistryResponse`` with a RegistryErrorList (and its ``highestSeverity``) when there are errors or warnings.

    ``errors``: anything with ``error_code``, ``code_context``, ``severity`` and
    ``location`` (:class:`xdsi.ids.model.RegistryError`).  Each RegistryError
    has an empty body (Gazelle IHEXDSError checks).
    """
    from xdsi.standards.constants import SEVERITY_ERROR, SEVERITY_WARNING

    errors = list(errors)
    lst = None
    if errors:
        lst = RegistryErrorList(
            highestSeverity=SEVERITY_ERROR if any(e.severity == SEVERITY_ERROR for e in errors) else SEVERITY_WARNING,
            RegistryError=[
                RegistryErrorModel(errorCode=e.error_code, codeContext=e.code_context, severity=e.severity, location=e.location or None) for e in errors
            ],
        )
    return RegistryResponseType(status=status, RegistryErrorList=lst)
