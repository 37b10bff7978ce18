"""Which affinity-domain patient a study is published under, and why a study is not published.

A study filed under the wrong patient is a patient-safety defect, far worse than
a study not published.  Before issue 11 a patient missing from
``[[xds.patient_ids]]`` was published with its *local* Patient ID stamped with
the affinity domain's assigning authority, i.e. under whoever holds that number
in the domain, and sourcePatientId fell back to an invented issuer OID.  Now:

* ``[xds] unmapped_patients = "refuse"`` (the default): a patient the table does
  not map is not published at all; :func:`publication_findings` (``xdsi status
  --study``) says so and prints the row to add.
* ``"local-authority"``: the operator declares that local Patient IDs *are*
  affinity-domain IDs (a Connectathon, a hospital whose MPI is the domain's).
  Even then a patient whose issuer is known to be another domain (its OID,
  through ``[xds.issuer_oids]`` or the Issuer itself, differs from
  ``patient_id_authority``) is refused.
* ``[xds] pix_url`` set: a patient the table does not map is looked up with PIXm
  (ITI-83) first; only a single affinity-domain ID is taken, an unreachable PIX
  Manager leaves the study waiting.
* sourcePatientId needs the OID of the local issuer (``[xds.issuer_oids]``, an
  OID Issuer of Patient ID, or ``source_patient_authority``); none is invented.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from xdsi.config import PatientIdMapping, XdsSettings
from xdsi.xds.manifest import StudySnapshot
from xdsi.xds.metadata import MetadataError, cx
from xdsi.xds.pix import PixError, pix_lookup

if TYPE_CHECKING:
    from xdsi.archive import Archive

__all__ = ["PatientIds", "PatientNotPublishable", "patient_ids", "publication_findings", "row_to_add"]

_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")


class PatientNotPublishable(MetadataError):
    """The study's patient cannot be identified in the affinity domain with certainty; nothing is published."""


@dataclass(frozen=True)
class PatientIds:
    affinity: str  # XDSDocumentEntry.patientId (CX)
    source: str  # sourcePatientId (CX)
    mapped: bool  # found in [[xds.patient_ids]] (else published under unmapped_patients = "local-authority")


def _who(snap: StudySnapshot) -> str:
    return f"patient {snap.patient_id!r} (Issuer of Patient ID {snap.issuer_of_patient_id!r})"


def local_issuer_oid(snap: StudySnapshot, x: XdsSettings) -> str:
    """The OID of the local Patient ID's issuer: ``[xds.issuer_oids]``, an OID Issuer, or source_patient_authority; "" if unknown."""
    issuer = snap.issuer_of_patient_id or ""
    if issuer in x.issuer_oids:
        return x.issuer_oids[issuer]
    if _OID.match(issuer):
        return issuer
    return x.source_patient_authority


def mapping_for(snap: StudySnapshot, x: XdsSettings) -> PatientIdMapping | None:
    """The table row for the local (ID, issuer): an exact issuer match first, then a row with no issuer.

    Two rows that would map the same local patient to different affinity-domain
    IDs are ambiguous: refused rather than the first one taken.
    """
    rows = [m for m in x.patient_ids if m.local_id == snap.patient_id]
    for candidates in ([m for m in rows if m.local_issuer == (snap.issuer_of_patient_id or "")], [m for m in rows if m.local_issuer == ""]):
        targets = {(m.affinity_id, m.affinity_authority) for m in candidates}
        if len(targets) > 1:
            raise PatientNotPublishable(
                f"{_who(snap)} has {len(targets)} different rows in [[xds.patient_ids]] "
                f"({', '.join(sorted(f'{i}^^^&{a}&ISO' for i, a in targets))}); keep the one that is right"
            )
        if candidates:
            return candidates[0]
    return None


def row_to_add(snap: StudySnapshot, x: XdsSettings) -> str:
    """The ``[[xds.patient_ids]]`` row that would let the study be published (TOML)."""
    lines = ["[[xds.patient_ids]]", f"local_id = {json.dumps(snap.patient_id)}"]
    if snap.issuer_of_patient_id:
        lines.append(f"local_issuer = {json.dumps(snap.issuer_of_patient_id)}")
    lines.append('affinity_id = "..."   # this patient\'s ID in the affinity domain (from your PIX manager / MPI)')
    lines.append(f"affinity_authority = {json.dumps(x.patient_id_authority)}")
    return "\n".join(lines)


def _source_authority_missing(snap: StudySnapshot) -> PatientNotPublishable:
    issuer = snap.issuer_of_patient_id
    how = (f'add [xds.issuer_oids] {json.dumps(issuer)} = "<OID of that issuer>"' if issuer
           else 'set [xds] source_patient_authority = "<OID of your local Patient ID domain>"')
    return PatientNotPublishable(
        f"{_who(snap)}: the OID of the local issuer is not known, so sourcePatientId cannot be formed "
        f"(no issuer OID is invented); {how}"
    )


def patient_ids(snap: StudySnapshot, x: XdsSettings) -> PatientIds:
    """The affinity-domain patientId and the sourcePatientId of the study, or :class:`PatientNotPublishable`."""
    m = mapping_for(snap, x)
    local_oid = local_issuer_oid(snap, x)
    if m is not None:
        if not local_oid:
            raise _source_authority_missing(snap)
        return PatientIds(
            cx(m.affinity_id, m.affinity_authority, "affinity-domain patient ID"),
            cx(snap.patient_id, local_oid, "local patient ID"),
            True,
        )
    if x.pix_url and not local_oid and x.unmapped_patients != "local-authority":
        raise _source_authority_missing(snap)  # PIXm needs the source domain's OID
    if x.pix_url and local_oid:
        try:
            found = pix_lookup(x.pix_url, snap.patient_id, local_oid, x.patient_id_authority, timeout=x.timeout)
        except PixError as exc:
            raise PatientNotPublishable(f"{_who(snap)}: {exc}; the study is published once the PIX Manager answers") from None
        if found:
            return PatientIds(cx(found, x.patient_id_authority, "affinity-domain patient ID (PIXm)"),
                              cx(snap.patient_id, local_oid, "local patient ID"), True)
    if x.unmapped_patients != "local-authority":
        unknown = " nor known to the PIX Manager" if x.pix_url else ""
        raise PatientNotPublishable(
            f"{_who(snap)} is not in [[xds.patient_ids]]{unknown} and [xds] unmapped_patients = \"refuse\": the study is not "
            f"published, so that it cannot be filed under another patient of the affinity domain. Add the row:\n"
            + row_to_add(snap, x)
        )
    if local_oid and local_oid != x.patient_id_authority:
        raise PatientNotPublishable(
            f"{_who(snap)}: its issuer is {local_oid}, not the affinity domain's {x.patient_id_authority}, so its local "
            "ID is not an affinity-domain ID (unmapped_patients = \"local-authority\" applies only to IDs the domain "
            "issued). Add the row:\n" + row_to_add(snap, x)
        )
    affinity = cx(snap.patient_id, x.patient_id_authority, "patient ID")
    return PatientIds(affinity, affinity, False)


def publication_findings(archive: "Archive", study_uid: str) -> list[str]:
    """Why the study is not (fully) published, as far as patient identity and published URLs go; [] if nothing."""
    from sqlalchemy import select

    from xdsi.index.xds_models import XdsSubmission
    from xdsi.uids import validate_uid
    from xdsi.xds.manifest import load_study

    study_uid = validate_uid(study_uid, "Study Instance UID")
    settings = archive.settings
    x = settings.xds
    findings: list[str] = []
    if not x.enabled:
        findings.append('XDS publishing is off: [xds] mode = "off"')
    with archive.index.session() as s:
        ours = set(s.scalars(select(XdsSubmission.kos_sop_uid).where(XdsSubmission.study_uid == study_uid)).all())
    snap = load_study(archive.index, study_uid, exclude_sops=ours)
    if snap is not None and snap.instance_count:
        try:
            patient_ids(snap, x)
        except MetadataError as exc:
            findings.append(f"not published: {exc}")
    if x.enabled and not x.retrieve_url and not settings.public_url:
        findings.append("manifests carry no WADO-RS Retrieve URL: set [server] public_url (how consumers reach this server)")
    return findings
