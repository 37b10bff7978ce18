"""ITI-43 Retrieve Document Set at ``/xdsi/DocumentRepository`` (integrated mode): XML in and out only.

Runs on the shared SOAP 1.2 / WS-Addressing / MTOM endpoint (:mod:`xdsi.soap.endpoint`),
so its transport and error rules are the same as RAD-69's: documents go out as
XOP attachments streamed from the archive, a per-document problem is a
RegistryError with ``location`` = the DocumentUniqueId and no DocumentResponse,
and the status is Success / PartialSuccess / Failure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lxml import etree

from xdsi.archive import Archive
from xdsi.soap.ebrs import registry_response
from xdsi.soap.endpoint import Operation, Reply, RequestContext, SoapEndpoint
from xdsi.wire.mtom import OutgoingAttachment, new_content_id, xop_include
from xdsi.xds import constants as C
from xdsi.xds.repository import DocumentError, ManifestRepository

X = f"{{{C.NS_XDS}}}"
STANDARDS = Path(__file__).resolve().parent.parent / "standards" / "ihe"


def make_endpoint(archive: Archive) -> SoapEndpoint:
    repo = ManifestRepository(archive)

    def retrieve(body: Any, ctx: RequestContext) -> Reply:
        resp = etree.Element(X + "RetrieveDocumentSetResponse", nsmap={"xds": C.NS_XDS, "rs": C.NS_RS})
        errors: list[DocumentError] = []
        attachments: list[OutgoingAttachment] = []
        found = []
        for dr in body.findall(X + "DocumentRequest"):
            hc = dr.findtext(X + "HomeCommunityId")
            r = repo.find((dr.findtext(X + "RepositoryUniqueId") or "").strip(), (dr.findtext(X + "DocumentUniqueId") or "").strip(), hc.strip() if hc else None)
            (errors if isinstance(r, DocumentError) else found).append(r)
        status = C.STATUS_SUCCESS if not errors else (C.STATUS_PARTIAL if found else C.STATUS_FAILURE)
        registry_response(status, errors, parent=resp)
        for doc in found:
            d = etree.SubElement(resp, X + "DocumentResponse")
            if doc.home_community_id is not None:
                etree.SubElement(d, X + "HomeCommunityId").text = doc.home_community_id
            etree.SubElement(d, X + "RepositoryUniqueId").text = doc.repository_unique_id
            etree.SubElement(d, X + "DocumentUniqueId").text = doc.document_unique_id
            etree.SubElement(d, X + "mimeType").text = doc.mime_type
            cid = new_content_id()
            xop_include(etree.SubElement(d, X + "Document"), cid)
            attachments.append(OutgoingAttachment(cid, doc.produced.chunks, "application/dicom", close=doc.produced.close))
        return Reply(resp, C.ACTION_RETRIEVE_RESPONSE, attachments)

    op = Operation("DocumentRepository_RetrieveDocumentSet", frozenset({X + "RetrieveDocumentSetRequest"}), retrieve)
    return SoapEndpoint(
        operations={C.ACTION_RETRIEVE: op},
        wsdl_file=STANDARDS / "wsdl" / "XDS.b_DocumentRepository.wsdl",
        schema_dir=STANDARDS / "schema",
        max_root_bytes=archive.settings.http_limits.max_soap_envelope,
        max_parts=archive.settings.http_limits.max_mtom_parts,
        max_document_requests=archive.settings.http_limits.max_document_requests,
    )
