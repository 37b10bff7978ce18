"""What a registry's refusal of one of our submissions means (ITI TF-2 3.42.4.1.3, ITI TF-3 Table 4.2.4.1-2).

Two questions, asked by the publisher and by ``xdsi status --study``:

* does a refused re-send prove that an earlier attempt of the same submission
  was registered (its answer lost on the way back)?  :func:`proves_registered`;
* what should an operator know about the study's last answer?
  :func:`publication_findings`.
"""

from __future__ import annotations

import re

from sqlalchemy import select

from xdsi.archive import Archive
from xdsi.index.xds_models import DONE, KIND_PUBLISH, SUPERSEDED, XdsSubmission
from xdsi.standards import constants as C
from xdsi.uids import validate_uid
from xdsi.wire.ebrs import RegistryError, RegistryResult, parse_registry_response
from xdsi.wire.xml import make_parser

_PARSER = make_parser()


def _names(error: RegistryError, uid: str) -> bool:
    """Whether a RegistryError is about ``uid``: its location, or the UID as a whole word of its codeContext."""
    if not uid:
        return False
    if error.location == uid:
        return True
    return re.search(rf"(?<![0-9A-Za-z.]){re.escape(uid)}(?![0-9A-Za-z]|\.[0-9])", error.code_context or "") is not None


def proves_registered(result: RegistryResult, submission_set_uid: str, manifest_uid: str | None) -> bool:
    """Whether a refused re-send proves that an earlier attempt of the same submission was registered.

    An answer can be lost after the registry committed (a proxy timeout, a
    dropped connection); the outbox then sends the same submission again.
    Each submission has a SubmissionSet uniqueId generated for it alone and a
    publication a manifest uniqueId of its own, and submissions are atomic
    (ITI TF-2 3.42.4.1.3.1).  So ``XDSDuplicateUniqueIdInRegistry`` naming our
    SubmissionSet uniqueId (its codeContext must give the value, ITI TF-3
    Table 4.2.4.1-2) proves the whole earlier submission is in the registry,
    and the re-send's other errors (our entryUUID already used, the RPLC
    target already Deprecated by it, the ITI-57 status already changed) follow
    from that.  A registry conforming to ITI-42 3.42.4.1.3.3.1 accepts a
    re-sent DocumentEntry of the same uniqueId, hash and size without error;
    older ones answer ``XDSDuplicateUniqueIdInRegistry`` for it, and that
    naming our manifest's uniqueId is the same proof.  Never when the registry
    has the manifest's uniqueId with another hash or size
    (``XDSNonIdenticalHash`` / ``XDSNonIdenticalSize``): that is not ours.
    """
    errors = [e for e in result.errors if e.is_error]
    if not errors or any(e.error_code in (C.XDS_NON_IDENTICAL_HASH, C.XDS_NON_IDENTICAL_SIZE) for e in errors):
        return False
    ours = [submission_set_uid] + ([manifest_uid] if manifest_uid else [])
    return any(e.error_code == C.XDS_DUPLICATE_UNIQUE_ID and any(_names(e, uid) for uid in ours) for e in errors)


def answer_of(row: XdsSubmission) -> RegistryResult | None:
    """The RegistryResponse kept with a submission row (the SOAP envelope as received), or None if there is none."""
    if not row.last_response or not row.last_response.lstrip().startswith("<"):
        return None
    try:
        from lxml import etree

        root = etree.fromstring(row.last_response.encode("utf-8"), _PARSER)
    except Exception:  # a proxy's HTML, a cut answer: nothing to explain
        return None
    if not any(el.tag == C.q("rs", "RegistryResponse") for el in root.iter()):
        return None
    return parse_registry_response(root)


def explain(row: XdsSubmission) -> list[str]:
    """What the last registry answer of one submission means, in the operator's terms."""
    result = answer_of(row)
    if result is None or result.success:
        return []
    manifest = row.kos_sop_uid if row.kind == KIND_PUBLISH else None
    codes = sorted({e.error_code for e in result.errors if e.is_error})
    where = f"submission {row.pk} ({row.kind} of manifest {row.kos_sop_uid})"
    if row.state == DONE and proves_registered(result, row.submission_set_uid, manifest):
        return [f"{where}: registered by an earlier attempt whose answer was lost; the re-send was refused with {', '.join(codes)}, as expected"]
    out: list[str] = []
    for e in result.errors:
        if not e.is_error:
            continue
        if e.error_code == C.XDS_REGISTRY_DEPRECATED_DOCUMENT_ERROR:
            out.append(
                f"{where}: the registry no longer has the manifest it replaces ({row.replaces_entry_uuid or e.location or '?'}) "
                f"as Approved ({e.error_code}: {e.code_context}); someone deprecated or replaced it, so this one is not sent as "
                "its replacement. Find out why before publishing the study again (a deprecation can mean a wrong patient)"
            )
        elif e.error_code in (C.XDS_NON_IDENTICAL_HASH, C.XDS_NON_IDENTICAL_SIZE):
            out.append(
                f"{where}: the registry has a document with this manifest's uniqueId and another "
                f"{'hash' if e.error_code == C.XDS_NON_IDENTICAL_HASH else 'size'} ({e.code_context}); it is not the manifest "
                "as archived here, and ITI-42 refuses to register ours next to it"
            )
        elif e.error_code == C.XDS_DUPLICATE_UNIQUE_ID and not proves_registered(RegistryResult(result.status, [e]), row.submission_set_uid, manifest):
            out.append(f"{where}: the registry says a uniqueId of this submission is already used by another object ({e.code_context})")
        elif e.error_code == C.XDS_UNRESOLVED_REFERENCE:
            out.append(f"{where}: the registry cannot resolve an entryUUID this submission refers to ({e.code_context})")
    return out


def publication_findings(archive: Archive, study_uid: str) -> list[str]:
    """Why the study's manifest is not (or was only by recovery) registered, from the last answer of each open submission."""
    study_uid = validate_uid(study_uid, "Study Instance UID")
    with archive.index.session() as s:
        rows = s.scalars(
            select(XdsSubmission).where(XdsSubmission.study_uid == study_uid, XdsSubmission.state != SUPERSEDED).order_by(XdsSubmission.pk)
        ).all()
        return [line for row in rows for line in explain(row)]
