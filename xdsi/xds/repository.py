"""The Document Repository side of integrated mode: which manifests ITI-43 may return, and from where.

Only manifests xdsi itself built and queued (rows of ``xds_submission``) are
documents of this repository; anything else in the archive is an image, served
by RAD-69, not by ITI-43.  The bytes come from the archive through
:meth:`RetrieveService.produce` in its stored transfer syntax, the same stored
instance that C-FIND and RAD-69 see, so ITI-43 returns exactly the stored KOS;
it is produced (recalled if cold) before the response lists it.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select

from xdsi.archive import Archive
from xdsi.archive.produced import Produced
from xdsi.archive.retrieve import CannotProvide, NotAvailable
from xdsi.index.xds_models import DONE, KIND_PUBLISH, XdsSubmission
from xdsi.uids import is_valid_uid
from xdsi.standards import constants as C
from xdsi.wire.ebrs import RegistryError


@dataclass(frozen=True)
class FoundDocument:
    repository_unique_id: str
    document_unique_id: str
    home_community_id: str | None
    mime_type: str
    produced: Produced  # the stored bytes, ready: stream with produced.chunks()
    study_uid: str = ""  # the study the manifest describes (its patient is named in the audit record)


class ManifestRepository:
    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self.repository_unique_id = archive.settings.xds.repository_unique_id

    def find(self, repository_unique_id: str, document_unique_id: str, home_community_id: str | None = None) -> FoundDocument | RegistryError:
        if repository_unique_id != self.repository_unique_id:
            return RegistryError(C.XDS_UNKNOWN_REPOSITORY_ID, f"repositoryUniqueId {repository_unique_id!r} is not this repository ({self.repository_unique_id})", document_unique_id or None)
        if not is_valid_uid(document_unique_id):
            return RegistryError(C.XDS_DOCUMENT_UNIQUE_ID_ERROR, f"documentUniqueId {document_unique_id!r} is not a manifest of this repository", document_unique_id or None)
        with self.archive.index.session() as s:
            row = s.scalars(
                select(XdsSubmission).where(XdsSubmission.kos_sop_uid == document_unique_id, XdsSubmission.kind == KIND_PUBLISH)
            ).first()
        if row is None:
            return RegistryError(C.XDS_DOCUMENT_UNIQUE_ID_ERROR, f"document {document_unique_id} is not in this repository", document_unique_id)
        refs = self.archive.retrieve.select(study_uids=[row.study_uid], sop_uids=[document_unique_id])
        try:
            if not refs:
                raise NotAvailable("not in the archive")
            produced = self.archive.retrieve.produce(refs[0], [refs[0].transfer_syntax_uid])  # as stored
        except (NotAvailable, CannotProvide, OSError) as exc:
            return RegistryError(C.XDS_DOCUMENT_UNIQUE_ID_ERROR, f"document {document_unique_id} is no longer available: {exc}", document_unique_id)
        return FoundDocument(repository_unique_id, document_unique_id, home_community_id, C.MIME_DICOM, produced, row.study_uid)


def registered_patient(archive: Archive, kos_sop_uid: str, entry_uuid: str | None = None) -> str:
    """The patientId manifest ``kos_sop_uid`` was registered under (the affinity-domain CX), from the metadata
    of its last successful submission; "" when it was never registered (or the record is unreadable).

    Used where the entry's own patient must be named whatever the mapping says today: deprecating
    it (ITI-57, issue 11) and the audit record of its retrieval (ITI-43, issue 12).
    """
    from xdsi.wire.xml import parse_untrusted

    with archive.index.session() as s:
        found = s.execute(
            select(XdsSubmission.last_metadata, XdsSubmission.entry_uuid)
            .where(XdsSubmission.kos_sop_uid == kos_sop_uid, XdsSubmission.kind == KIND_PUBLISH, XdsSubmission.state == DONE)
            .order_by(XdsSubmission.pk.desc())
            .limit(1)
        ).first()
    if found is None or not found[0]:
        return ""
    sent, entry = found
    try:
        root = parse_untrusted(sent.encode())
    except Exception:  # a damaged record: the caller falls back to what it knows
        return ""
    for e in root.iter(C.q("rim", "ExternalIdentifier")):
        if e.get("identificationScheme") == C.DE_PATIENT_ID and e.get("registryObject") == (entry_uuid or entry):
            return e.get("value", "")
    return ""
