"""ITI-43 Retrieve Document Set at ``/xdsi/DocumentRepository`` (integrated mode) as a spyne application.

It runs on the same protocol and transport as the Imaging Document Source
(:mod:`xdsi.soap.protocol`, :mod:`xdsi.soap.application`), so its rules are
RAD-69's: documents go out as XOP attachments streamed from the archive, a
per-document problem is a RegistryError with ``location`` = the
DocumentUniqueId and no DocumentResponse, and the status is Success /
PartialSuccess / Failure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spyne import Application, ServiceBase

from xdsi.archive import Archive
from xdsi.soap import models as M
from xdsi.security.xua import protocol_options
from xdsi.soap.application import SoapApplication
from xdsi.soap.protocol import Exchange, IheSoap12, Route, ihe_operation
from xdsi.standards import constants as C
from xdsi.wire.ebrs import RegistryError
from xdsi.xds.repository import FoundDocument, ManifestRepository

STANDARDS = Path(__file__).resolve().parent.parent / "standards" / "ihe"
ITI43_REQUEST = f"{{{C.NS_XDS}}}RetrieveDocumentSetRequest"


class DocumentRepositoryService(ServiceBase):
    """ITI-43 Retrieve Document Set for the KOS manifests this archive published."""

    @ihe_operation(M.RetrieveDocumentSetRequestType, ITI43_REQUEST, M.RetrieveDocumentSetResponseType, f"{{{C.NS_XDS}}}RetrieveDocumentSetResponse")
    def DocumentRepository_RetrieveDocumentSet(ctx: Any, request: Any) -> M.RetrieveDocumentSetResponseType:
        ex: Exchange = ctx.udc
        repo: ManifestRepository = ex.context
        errors: list[RegistryError] = []
        found: list[FoundDocument] = []
        for dr in request.DocumentRequest or ():
            hc = dr.HomeCommunityId
            r = repo.find((dr.RepositoryUniqueId or "").strip(), (dr.DocumentUniqueId or "").strip(), hc.strip() if hc else None)
            if isinstance(r, RegistryError):
                errors.append(r)
            else:
                found.append(r)
                ex.on_close(r.produced.close)
        status = C.STATUS_SUCCESS if not errors else (C.STATUS_PARTIAL_SUCCESS if found else C.STATUS_FAILURE)
        return M.document_set_response(
            status,
            errors,
            ((d.home_community_id, d.repository_unique_id, d.document_unique_id, d.mime_type, M.StreamedDocument(d.produced.chunks, C.MIME_DICOM)) for d in found),
        )


def make_application(archive: Archive) -> SoapApplication:
    """The spyne WSGI application mounted at ``/xdsi/DocumentRepository``."""
    lim = archive.settings.http_limits
    route = Route(ITI43_REQUEST, C.ACTION_ITI43_RESPONSE, frozenset({ITI43_REQUEST}))
    xua = protocol_options(archive)  # [xua]: the assertion policy and the audit of refusals, loaded once

    def protocol() -> IheSoap12:  # spyne: one protocol instance per direction
        return IheSoap12({C.ACTION_ITI43: route}, max_document_requests=lim.max_document_requests, **xua)

    app = Application([DocumentRepositoryService], tns=C.NS_XDS, name="DocumentRepository", in_protocol=protocol(), out_protocol=protocol())
    return SoapApplication(
        app,
        context=ManifestRepository(archive),
        wsdl_file=STANDARDS / "wsdl" / "XDS.b_DocumentRepository.wsdl",
        schema_dir=STANDARDS / "schema",
        spool_dir=str(archive.settings.temp_dir),
        max_root_bytes=lim.max_soap_envelope,
        max_parts=lim.max_mtom_parts,
    )
