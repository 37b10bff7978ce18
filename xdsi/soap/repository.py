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
from xdsi.audit import http as audit_http
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
        # ITI TF-2 3.43.6.1: an Export per patient for what was returned, a failure Export for what was not
        audit = audit_http.document_export(repo.archive, ctx.transport.req_env)
        for dr in request.DocumentRequest or ():
            hc = dr.HomeCommunityId
            repository_uid, document_uid, home = (dr.RepositoryUniqueId or "").strip(), (dr.DocumentUniqueId or "").strip(), hc.strip() if hc else None
            r = repo.find(repository_uid, document_uid, home)
            if isinstance(r, RegistryError):
                errors.append(r)
                if audit is not None and document_uid:
                    audit.failed(document_uid, repository_uid, home, r.code_context)
            else:
                found.append(r)
                ex.on_close(r.produced.close)
                if audit is not None:
                    audit.found(r.document_unique_id, r.repository_unique_id, r.home_community_id, r.study_uid)
        if audit is not None:
            ex.on_close(audit.close)  # when the response is written whole, or the consumer went away
        status = C.STATUS_SUCCESS if not errors else (C.STATUS_PARTIAL_SUCCESS if found else C.STATUS_FAILURE)

        def chunks(d: FoundDocument) -> Any:
            return d.produced.chunks if audit is None else audit.tracked(d.produced.chunks, d.document_unique_id)

        return M.document_set_response(
            status,
            errors,
            ((d.home_community_id, d.repository_unique_id, d.document_unique_id, d.mime_type, M.StreamedDocument(chunks(d), C.MIME_DICOM)) for d in found),
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
