"""What the DIMSE server tells the audit trail: instances received per association, and queries.

PS3.15 A.5.3.4 wants one DICOM Instances Transferred message per study (one patient per
message), not one per instance: a 2,000-image CT would otherwise be 2,000 records.  So
C-STOREs are counted per association and study, and the messages are recorded when the
association is released or aborted.  All of it runs on the association's thread but
only touches memory and the local spool: the network is the sender thread's business.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, defaultdict
from typing import Any, Callable

from pynetdicom import evt

from xdsi.audit import messages as m
from xdsi.audit.trail import AuditTrail

__all__ = ["DimseAudit"]

log = logging.getLogger(__name__)


def _participant(info: Any, requestor: bool) -> m.Participant:
    """An association end as an ActiveParticipant: AE title as UserID, its IP address as access point."""
    aet = info.ae_title
    if isinstance(aet, bytes):
        aet = aet.decode("ascii", "replace")
    return m.Participant(str(aet or "").strip() or "UNKNOWN", requestor, network_access_point=str(info.address or "") or None)


class DimseAudit:
    """Per-association bookkeeping for the audit trail; ``patient_of(archive, study_uid)`` looks up the patient."""

    def __init__(self, trail: AuditTrail, patient_of: Callable[[Any, str], str]) -> None:
        self.trail = trail
        self.patient_of = patient_of
        self._lock = threading.Lock()
        # id(assoc) -> (archive, study UID -> Counter of SOP Class UIDs, studies with a replaced instance)
        self._received: dict[int, tuple[Any, dict[str, Counter[str]], set[str]]] = {}

    def handlers(self) -> list[tuple[Any, Any]]:
        return [(evt.EVT_RELEASED, self._flush), (evt.EVT_ABORTED, self._flush)]

    def stored(self, event: Any, archive: Any, study_uid: str, sop_class_uid: str, replaced: bool = False) -> None:
        """One instance accepted (stored, replaced or a duplicate we already held: all were sent to us)."""
        if not self.trail.enabled:
            return
        with self._lock:
            _, studies, updated = self._received.setdefault(id(event.assoc), (archive, defaultdict(Counter), set()))
            studies[study_uid][sop_class_uid] += 1
            if replaced:
                updated.add(study_uid)

    def _flush(self, event: Any) -> None:
        with self._lock:
            entry = self._received.pop(id(event.assoc), None)
        if entry is None:
            return
        archive, studies, updated = entry
        sender = _participant(event.assoc.requestor, True)
        receiver = _participant(event.assoc.acceptor, False)
        for study_uid, classes in studies.items():
            try:
                patient = self.patient_of(archive, study_uid) or "UNKNOWN"
            except Exception:  # the index is busy or gone: audit what we know rather than nothing
                log.exception("audit: patient of study %s not found", study_uid)
                patient = "UNKNOWN"
            action = "U" if study_uid in updated else "C"  # PS3.15 A.5.3.4: Create, or Update when we replaced a copy
            self.trail.record(m.instances_transferred(self.trail.source, sender, receiver, study_uid, patient, sorted(classes.items()), action=action))

    def queried(self, event: Any) -> None:
        """C-FIND: the identifier as received (encoded) and its transfer syntax (PS3.15 A.5.3.10)."""
        if not self.trail.enabled:
            return
        req = event.request
        raw = req.Identifier.getvalue() if req.Identifier is not None else b""
        try:
            patient = str(event.identifier.get("PatientID", "") or "") or None
        except Exception:  # an identifier pydicom cannot decode is still audited, without a patient
            patient = None
        self.trail.record(
            m.query(
                self.trail.source,
                _participant(event.assoc.requestor, True),
                _participant(event.assoc.acceptor, False),
                str(req.AffectedSOPClassUID),
                raw,
                str(event.context.transfer_syntax),
                patient_id=patient,
            )
        )


def patient_of(archive: Any, study_uid: str) -> str:
    """The Patient ID the index holds for ``study_uid`` (empty when the study has none)."""
    from sqlalchemy import select

    from xdsi.index.models import Patient, Study

    with archive.index.read_session() as s:
        pid = s.execute(select(Patient.patient_id).join(Study, Study.patient_fk == Patient.pk).where(Study.study_uid == study_uid)).scalar()
    return str(pid or "")
