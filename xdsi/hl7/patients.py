"""RAD-12 Patient Update: ADT^A08 (demographics) and ADT^A40 (merge) applied to the index.

What changes, and why only that:

* the ``patient`` row (name, birth date, sex) and the copies each study keeps
  (``study.patient_*``), which C-FIND, QIDO-RS and the XDS manifest answer from;
* for a merge, every study of the prior patient (MRG-1) is moved under the surviving
  patient (PID-3) and the emptied prior patient row is removed;
* a study with a manifest queued or registered gets a replacement manifest (RPLC)
  through the XDS publisher's outbox: the registered one names the old identity.

Stored files are not rewritten: their bytes are what the modality sent (and what their
checksums prove).  Each study touched gets ``study.identity_updated_at``, and every retrieve
path then sends its objects with the patient attributes of the index instead of the stored
ones (:mod:`xdsi.archive.coercion`, as dcm4chee-arc merges its patient record on retrieve).  An identity is matched on (Patient ID, Issuer): PID-3.4 / MRG-1.4 is
compared with the DICOM Issuer of Patient ID.  A message without an issuer updates a
Patient ID only when exactly one issuer holds it; several is an ``AE``, never a guess.
An update for a patient this archive does not hold is accepted and changes nothing
(a HIS sends every A08 to every system).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from xdsi.hl7.messages import REQUIRED_FIELD_MISSING, UNKNOWN_KEY_IDENTIFIER, Hl7Error, Received
from xdsi.index.catalog import utcnow
from xdsi.index.models import Patient, Study

if TYPE_CHECKING:
    from xdsi.archive import Archive

log = logging.getLogger(__name__)

__all__ = ["Demographics", "PatientUpdate", "demographics", "update_patient", "merge_patients", "republish"]

_SEX = {"M": "M", "F": "F", "O": "O"}  # HL7 table 0001 -> DICOM (0010,0040); U, A, N: unknown -> empty (Type 2)


@dataclass(frozen=True)
class Demographics:
    """PID-5, PID-7, PID-8 as DICOM values; ``None`` where the message left the field empty (not sent)."""

    name: str | None
    birth_date: str | None
    sex: str | None


@dataclass
class PatientUpdate:
    """What one message changed: the studies touched (for the manifest replacement) and a line for the log."""

    studies: list[str] = field(default_factory=list)
    patients: int = 0
    note: str = ""
    updated: list[tuple[str, str, str]] = field(default_factory=list)  # (Patient ID, issuer, name) whose record changed
    deleted: list[tuple[str, str, str]] = field(default_factory=list)  # (Patient ID, issuer, name) merged away


def _pn_from_xpn(r: Received) -> str | None:
    """PID-5 (XPN: family^given^middle^suffix^prefix) as a DICOM PN (family^given^middle^prefix^suffix).

    None: not sent (keep the name); "": the HL7 null ``""`` (clear it)."""
    parts = [r.value("PID", 5, i) for i in (1, 2, 3, 4, 5)]
    if all(p is None for p in parts):
        return None
    family, given, middle, suffix, prefix = ((p or "") for p in parts)
    family = family.split("&", 1)[0]  # FN.1 surname (further subcomponents: own surname prefix ...)
    return "^".join([family, given, middle, prefix, suffix]).rstrip("^")


def demographics(r: Received) -> Demographics:
    birth = r.value("PID", 7)
    if birth:
        birth = birth[:8] if len(birth) >= 8 and birth[:8].isdigit() else ""  # a DTM we cannot read as a DA: cleared, not wrong
    sex = r.value("PID", 8)
    return Demographics(_pn_from_xpn(r), birth, _SEX.get(sex.upper(), "") if sex is not None else None)


def _identity(r: Received, segment: str, fld: int) -> tuple[str, str]:
    pid, issuer = r.get(segment, fld, 1), r.get(segment, fld, 4)
    if not pid:
        raise Hl7Error("AE", REQUIRED_FIELD_MISSING, f"{segment}-{fld} (patient identifier) is empty", f"{segment}^1^{fld}")
    return pid, issuer


def _find(session: Session, pid: str, issuer: str, where: str) -> Patient | None:
    """The patient row for (ID, issuer); without an issuer, the one row holding the ID (several: AE)."""
    stmt = select(Patient).where(Patient.patient_id == pid, Patient.scope_study_uid == "")
    if issuer:
        return session.scalars(stmt.where(Patient.issuer_of_patient_id == issuer)).one_or_none()
    rows = session.scalars(stmt).all()
    if len(rows) > 1:
        issuers = ", ".join(sorted(repr(p.issuer_of_patient_id) for p in rows))
        raise Hl7Error("AE", UNKNOWN_KEY_IDENTIFIER,
                       f"Patient ID {pid!r} is held under several issuers ({issuers}); the message must name one", where)
    return rows[0] if rows else None


def _apply(session: Session, patient: Patient, d: Demographics, now) -> list[str]:  # type: ignore[no-untyped-def]
    """Write the demographics on the patient and on each of its studies; the study UIDs touched."""
    values: dict[str, str] = {}
    if d.name is not None:
        patient.patient_name, patient.patient_name_norm = d.name, d.name.upper()
        values.update(patient_name=d.name, patient_name_norm=d.name.upper())
    if d.birth_date is not None:
        patient.birth_date = values["patient_birth_date"] = d.birth_date
    if d.sex is not None:
        patient.sex = values["patient_sex"] = d.sex
    uids = list(session.scalars(select(Study.study_uid).where(Study.patient_fk == patient.pk).order_by(Study.pk)))
    if values and uids:
        # identity_updated_at: the stored files still carry the old identity; retrieves coerce them (xdsi.archive.coercion)
        session.execute(update(Study).where(Study.patient_fk == patient.pk).values(**values, updated_at=now, identity_updated_at=now))
    return uids if values else []


def update_patient(session: Session, r: Received) -> PatientUpdate:
    """ADT^A08 (and A31): new demographics for the patient of PID-3."""
    pid, issuer = _identity(r, "PID", 3)
    patient = _find(session, pid, issuer, "PID^1^3")
    if patient is None:
        return PatientUpdate(note=f"patient {pid!r} (issuer {issuer!r}) is not held: nothing to update")
    studies = _apply(session, patient, demographics(r), utcnow())
    return PatientUpdate(studies, 1, f"patient {pid!r}: demographics updated ({len(studies)} studies)",
                         updated=[(patient.patient_id, patient.issuer_of_patient_id, patient.patient_name)])


def merge_patients(session: Session, r: Received) -> PatientUpdate:
    """ADT^A40: the studies of each prior patient (MRG-1, one per PID/MRG group) move under the surviving one (PID-3)."""
    pid, issuer = _identity(r, "PID", 3)
    groups = r.count("MRG")
    if groups == 0:
        raise Hl7Error("AE", REQUIRED_FIELD_MISSING, "ADT^A40 without an MRG segment (the prior patient)", "MRG^1")
    now = utcnow()
    d = demographics(r)
    moved: list[str] = []
    merged = 0
    deleted: list[tuple[str, str, str]] = []
    target: Patient | None = None
    orders = 0
    for occurrence in range(1, groups + 1):
        # (one PID/MRG pair per merge; several pairs in one A40 all name the same surviving patient here)
        old_id, old_issuer = r.get("MRG", 1, 1, occurrence=occurrence), r.get("MRG", 1, 4, occurrence=occurrence)
        if not old_id:
            raise Hl7Error("AE", REQUIRED_FIELD_MISSING, "MRG-1 (prior patient identifier) is empty", f"MRG^{occurrence}^1")
        if (old_id, old_issuer) == (pid, issuer):
            raise Hl7Error("AE", UNKNOWN_KEY_IDENTIFIER, "MRG-1 names the surviving patient itself", f"MRG^{occurrence}^1")
        orders += _move_orders(session, (old_id, old_issuer), (pid, issuer), now)
        prior = _find(session, old_id, old_issuer, f"MRG^{occurrence}^1")
        if prior is None:
            continue
        deleted.append((prior.patient_id, prior.issuer_of_patient_id, prior.patient_name))
        surviving = _find(session, pid, issuer, "PID^1^3")
        if surviving is None and issuer == "" and prior.issuer_of_patient_id:
            issuer_for_new = prior.issuer_of_patient_id  # same assigning authority as the prior ID
        else:
            issuer_for_new = issuer
        if surviving is None:
            # the surviving ID is new to us: the prior row takes it (its studies follow through the foreign key)
            prior.patient_id, prior.issuer_of_patient_id = pid, issuer_for_new
            session.flush()
            target = prior
        else:
            session.execute(update(Study).where(Study.patient_fk == prior.pk).values(patient_fk=surviving.pk, updated_at=now))
            session.flush()
            session.delete(prior)
            target = surviving
        # the studies now carry the surviving patient's name, birth date and sex: the message's, else the index's
        name = d.name if d.name is not None else target.patient_name
        target_d = Demographics(name, d.birth_date if d.birth_date is not None else target.birth_date,
                                d.sex if d.sex is not None else target.sex)
        study_uids = _apply(session, target, target_d, now)
        moved.extend(u for u in study_uids if u not in moved)
        merged += 1
    session.flush()
    if not merged:
        return PatientUpdate(note=f"no prior patient of the merge into {pid!r} is held: nothing to merge"
                             + (f" ({orders} order(s) moved)" if orders else ""))
    assert target is not None
    return PatientUpdate(moved, merged, f"merged {merged} patient(s) into {pid!r} (issuer {issuer!r}): {len(moved)} studies, {orders} order(s)",
                         updated=[(target.patient_id, target.issuer_of_patient_id, target.patient_name)], deleted=deleted)


def _move_orders(session: Session, prior: tuple[str, str], surviving: tuple[str, str], now) -> int:  # type: ignore[no-untyped-def]
    """The prior patient's orders now belong to the surviving patient: routing looks them up by the ID the
    images will carry.  An accession the surviving patient already has an order for keeps that order."""
    from xdsi.hl7.models import Hl7Order

    stmt = select(Hl7Order).where(Hl7Order.patient_id == prior[0])
    if prior[1]:
        stmt = stmt.where(Hl7Order.issuer_of_patient_id.in_((prior[1], "")))
    taken = set(session.scalars(select(Hl7Order.accession_number).where(Hl7Order.patient_id == surviving[0])))
    n = 0
    for order in session.scalars(stmt).all():
        if order.accession_number in taken:
            continue
        order.patient_id, order.issuer_of_patient_id, order.updated_at = surviving[0], surviving[1] or order.issuer_of_patient_id, now
        n += 1
    session.flush()
    return n


def republish(archive: "Archive", study_uids: list[str]) -> list[str]:
    """Queue a replacement manifest (RPLC at send time) for each study that has one queued or registered.

    The publisher thread of ``xdsi serve`` sends it; a registry that refuses it (it has not
    merged the patients itself yet) leaves it in the outbox to be retried with backoff.
    A study that cannot be published under the new identity (not mapped to the affinity
    domain) is logged and left: the old manifest is not withdrawn silently.
    """
    if not study_uids or not archive.settings.xds.enabled or not archive.settings.hl7.republish:
        return []
    from xdsi.index.xds_models import XdsSubmission
    from xdsi.xds.publisher import Publisher

    with archive.index.read_session() as s:
        published = set(s.scalars(select(XdsSubmission.study_uid).where(XdsSubmission.study_uid.in_(study_uids))))
    queued: list[str] = []
    try:
        publisher = Publisher(archive)
    except Exception as exc:  # the index change is committed and acknowledged; the operator must see this
        log.error("the replacement manifests of %d studies after a patient update were not queued: %s", len(study_uids), exc)
        return []
    for uid in study_uids:
        if uid not in published:
            continue
        try:
            if publisher.prepare(uid, force=True) is not None:
                queued.append(uid)
        except Exception as exc:  # one study must not stop the others; the operator sees it in the log and `xdsi status`
            log.error("study %s: the replacement manifest after a patient update was not queued: %s", uid, exc)
    return queued
