"""The Imaging Document Source: which requested documents are returned, in what form, and which are errors.

The rules here are the ones Connectathon validators check (FACTS.md 1.3-1.7):
a wrong repositoryUniqueId is ``XDSUnknownRepositoryId``; an unknown instance
``XDSDocumentUniqueIdError``; empty or malformed UIDs and transfer syntaxes are
errors of that document, reported as RegistryErrors (never faults) with
``location`` = the requested DocumentUniqueId, and a failed document gets no
DocumentResponse.

Error codes come from ITI TF-3 Table 4.2.4.1-2 wherever one fits (its rule for
RegistryError.errorCode); the DICOM WADO-WS codes (PS3.18 6.4.4) only where the
table has nothing more specific than the generic one, or in the two DICOM
WADO-WS operations, whose own list they are:

* an instance outside the named series, or a series outside the named study:
  for RAD-69 ``XDSDocumentUniqueIdError`` (the document is not available
  under the identifiers asked for; NIST ids_2018-4811 cases 03/04 want a
  Failure with any code); in WADO-WS rendered and information the operation's
  own ``urn:dicom:wado:0010`` (inconsistent identifiers), see :meth:`resolve`;
* a transfer syntax list none of whose entries can be produced (unknown,
  unsupported, or the conversion failed): ``XDSRepositoryError`` with the
  details in codeContext; the table has no specific code, and this is the one
  NIST's Imaging Document Source simulator answers ("No valid Xfer Syntax");
* an empty or malformed study/series/transfer syntax UID stays
  ``urn:dicom:wado:0012`` (invalid parameter value): no IHE code names it.

Identity comes from the index via :meth:`RetrieveService.select`; bytes via
:meth:`RetrieveService.produce`, *before* the response lists the document:
the MTOM response sends its envelope (status and every DocumentResponse)
first, so a converted instance is produced into a spool on disk and a cold one
recalled before the envelope is built; one that fails is a RegistryError of
that document (PartialSuccess), never a cut stream after "Success".
"""

from __future__ import annotations

import logging
from typing import Sequence

from xdsi.archive.retrieve import CannotProvide, InstanceRef, NotAvailable, RetrieveService
from xdsi.archive.transcode import TranscodeError, is_known_transfer_syntax
from xdsi.wire.ebrs import RegistryError
from xdsi.wire.regions import FileChunks
from xdsi.ids.model import DocumentRequest, Resolved, RetrieveResult, ReturnedDocument, errors_for
from xdsi.uids import is_valid_uid
from xdsi.standards.constants import (
    MIME_DICOM,
    WADO_INCONSISTENT_IDENTIFIERS,
    WADO_INVALID_PARAMETER,
    XDS_DOCUMENT_UNIQUE_ID_ERROR,
    XDS_REPOSITORY_ERROR,
    XDS_UNKNOWN_REPOSITORY_ID,
)

log = logging.getLogger(__name__)

LOOKUP_BATCH = 500


class ImagingDocumentSource:
    def __init__(self, retrieve: RetrieveService, repository_unique_id: str) -> None:
        self.retrieve = retrieve
        self.repository_unique_id = repository_unique_id

    # -- identity checks shared by the three operations --------------------------------------------

    def _check_request(self, r: DocumentRequest) -> RegistryError | None:
        loc = r.document_unique_id or None
        if not r.document_unique_id:
            return RegistryError(XDS_DOCUMENT_UNIQUE_ID_ERROR, "DocumentUniqueId is empty", loc)
        if r.repository_unique_id != self.repository_unique_id:
            return RegistryError(
                XDS_UNKNOWN_REPOSITORY_ID,
                f"RepositoryUniqueId {r.repository_unique_id!r} is not this Imaging Document Source ({self.repository_unique_id})",
                loc,
            )
        for what, value in (("studyInstanceUID", r.study_uid), ("seriesInstanceUID", r.series_uid)):
            if not value:
                return RegistryError(WADO_INVALID_PARAMETER, f"{what} is empty", loc)
            if not is_valid_uid(value):
                return RegistryError(WADO_INVALID_PARAMETER, f"{what} {value[:80]!r} is not a valid UID", loc)
        if not is_valid_uid(r.document_unique_id):
            return RegistryError(XDS_DOCUMENT_UNIQUE_ID_ERROR, f"DocumentUniqueId {r.document_unique_id[:80]!r} is not a valid SOP Instance UID", loc)
        return None

    def _lookup(self, sop_uids: list[str]) -> dict[str, InstanceRef]:
        found: dict[str, InstanceRef] = {}
        unique = list(dict.fromkeys(sop_uids))
        for i in range(0, len(unique), LOOKUP_BATCH):
            for ref in self.retrieve.select(sop_uids=unique[i : i + LOOKUP_BATCH], read_stamps=True):  # read at once: no per-instance stamp query
                found[ref.sop_instance_uid] = ref
        return found

    def resolve(self, requests: Sequence[DocumentRequest], *, inconsistent: str = WADO_INCONSISTENT_IDENTIFIERS) -> tuple[list[Resolved], list[RegistryError]]:
        """Check every request against our identity and the index; in request order.

        ``inconsistent`` is the code for an instance outside the named series or
        study: the WADO-WS operations' own ``urn:dicom:wado:0010`` by default,
        ``XDSDocumentUniqueIdError`` for RAD-69 (ITI TF-3 Table 4.2.4.1-2).
        """
        errors: list[RegistryError] = []
        pending: list[DocumentRequest] = []
        early: dict[int, RegistryError] = {}
        for i, r in enumerate(requests):
            e = self._check_request(r)
            if e is not None:
                early[i] = e
            else:
                pending.append(r)
        refs = self._lookup([r.document_unique_id for r in pending]) if pending else {}
        missing = [r for r in pending if r.document_unique_id not in refs]
        fetch = getattr(self.retrieve, "fetch_missing", None)
        if missing and fetch is not None and fetch([r.study_uid for r in missing]):  # issue 15: a remote held them
            refs.update(self._lookup([r.document_unique_id for r in missing]))
        resolved: list[Resolved] = []
        for i, r in enumerate(requests):
            if i in early:
                errors.append(early[i])
                continue
            loc = r.document_unique_id
            ref = refs.get(loc)
            if ref is None:
                errors.append(RegistryError(XDS_DOCUMENT_UNIQUE_ID_ERROR, f"no instance {loc} in this Imaging Document Source", loc))
            elif ref.series_uid != r.series_uid:
                errors.append(RegistryError(inconsistent, f"instance {loc} is not in series {r.series_uid}", loc))
            elif ref.study_uid != r.study_uid:
                errors.append(RegistryError(inconsistent, f"series {r.series_uid} is not in study {r.study_uid}", loc))
            elif not ref.copies:
                errors.append(RegistryError(XDS_DOCUMENT_UNIQUE_ID_ERROR, f"instance {loc} is no longer available", loc))
            else:
                resolved.append(Resolved(r, ref))
        return resolved, errors

    # -- RAD-69 ------------------------------------------------------------------------------------

    def retrieve_set(self, requests: Sequence[DocumentRequest], transfer_syntaxes: Sequence[str]) -> RetrieveResult:
        """RAD-69 / WADO-WS RetrieveImagingDocumentSet: documents to stream, in request order, and errors."""
        syntaxes = [t.strip() for t in transfer_syntaxes]
        bad = [t for t in syntaxes if not is_valid_uid(t)]
        if not syntaxes or bad:
            what = "an empty TransferSyntaxUID" if (not syntaxes or "" in bad) else f"TransferSyntaxUID {bad[0][:80]!r} is not a valid UID"
            resolved, errors = self.resolve(requests, inconsistent=XDS_DOCUMENT_UNIQUE_ID_ERROR)
            return RetrieveResult([], errors + errors_for([x.request for x in resolved], WADO_INVALID_PARAMETER, f"the request has {what}"))
        resolved, errors = self.resolve(requests, inconsistent=XDS_DOCUMENT_UNIQUE_ID_ERROR)
        documents: list[ReturnedDocument] = []
        known = [t for t in syntaxes if is_known_transfer_syntax(t)]
        try:
            for item in resolved:
                ref = item.ref
                loc = item.request.document_unique_id
                try:
                    produced = self.retrieve.produce(ref, syntaxes)
                except CannotProvide:
                    if not known:
                        errors.append(
                            RegistryError(XDS_REPOSITORY_ERROR, f"none of the requested transfer syntaxes {', '.join(syntaxes)} is a DICOM transfer syntax we know", loc)
                        )
                    else:
                        errors.append(
                            RegistryError(
                                XDS_REPOSITORY_ERROR,
                                f"instance {loc} (stored as {ref.transfer_syntax_uid}) cannot be provided in {', '.join(syntaxes)}",
                                loc,
                            )
                        )
                    continue
                except TranscodeError as exc:
                    log.warning("RAD-69: %s could not be converted: %s", loc, exc)
                    errors.append(
                        RegistryError(XDS_REPOSITORY_ERROR, f"instance {loc} (stored as {ref.transfer_syntax_uid}) could not be converted: {exc}", loc)
                    )
                    continue
                except (NotAvailable, OSError) as exc:
                    log.warning("RAD-69: %s cannot be read: %s", loc, exc)
                    errors.append(RegistryError(XDS_DOCUMENT_UNIQUE_ID_ERROR, f"instance {loc} cannot be read: {exc}", loc))
                    continue
                documents.append(
                    ReturnedDocument(
                        request=item.request,
                        mime_type=MIME_DICOM,
                        # the file itself, so the HTTP server can sendfile it (plain HTTP); removed (a spool) once sent
                        produce=FileChunks(produced.file_path(), produced.size, [produced.close]),
                        ref=ref,
                        transfer_syntax=produced.transfer_syntax,
                        close=produced.close,
                    )
                )
        except BaseException:
            for d in documents:
                d.close()
            raise
        return RetrieveResult(documents, errors)
