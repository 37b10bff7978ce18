"""ATNA records of RAD-12 Patient Update: who changed which patient's record, through which message.

DICOM PS3.15 A.5.3.9 *Patient Record* (110110): an ``ADT^A08`` is an Update (``U``) of the
patient; an ``ADT^A40`` deletes (``D``) the record of each merged prior patient and updates
(``U``) the surviving one, as ITI-8's audit of a merge does.  The RIS (MSH-3/MSH-4, its
address) is the requestor, this archive the process that applied it.  Written only when the
index changed: an update for a patient we do not hold touches no record here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from xdsi.audit import messages as am

if TYPE_CHECKING:
    from xdsi.archive import Archive
    from xdsi.hl7.messages import Received
    from xdsi.hl7.patients import PatientUpdate

__all__ = ["PATIENT_RECORD", "RAD_12", "patient_record_events"]

PATIENT_RECORD = am.Code("110110", "DCM", "Patient Record")
RAD_12 = am.Code("RAD-12", "IHE Transactions", "Patient Update")


def _cx(patient_id: str, issuer: str) -> str:
    return f"{patient_id}^^^{issuer}" if issuer else patient_id


def patient_record_events(archive: "Archive", r: "Received", done: "PatientUpdate", peer: str) -> list[am.AuditEvent]:
    """One Patient Record event per patient whose record the message changed (none when nothing changed)."""
    trail = archive.audit
    if trail is None or not getattr(trail, "enabled", False):
        return []
    settings = archive.settings
    sender = "|".join(p for p in (r.get("MSH", 3), r.get("MSH", 4)) if p) or "unknown"
    ris = am.Participant(sender, True, network_access_point=peer or None)
    us = am.Participant(settings.ae_title, False, network_access_point=settings.host)
    events = []
    for action, (pid, issuer, name) in [("D", p) for p in done.deleted] + [("U", p) for p in done.updated]:
        events.append(am.AuditEvent(PATIENT_RECORD, action, "0", [ris, us], trail.source,
                                    [am.patient_object(_cx(pid, issuer), name or None)], event_types=[RAD_12]))
    return events
