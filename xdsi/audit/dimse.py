"""What the DIMSE server tells the audit trail: instances received and sent, queries, refused associations.

PS3.15 wants one DICOM Instances Transferred message per study (one patient per
message), not one per instance: a 2,000-image CT would otherwise be 2,000 records.  So
C-STOREs are counted per association and study, and the messages are recorded when the
association is released or aborted; a C-MOVE or C-GET records one Begin Transferring per
study when its sub-operations start and one DICOM Instances Transferred per study when
they end (:class:`RetrieveAudit`).  All of it runs on the association's thread but only
touches memory and the local spool: the network is the sender thread's business.

The TLS peer (PS3.15 A.5.2.1/A.5.2.2).  A DICOM peer is named by its AE title as UserID, as
before, so a search by AE title finds every record.  When the association came over DICOM
TLS, the certificate subject is the authenticated identity of the peer *node*: A.5.2.1 lets a
node's UserID be its node name, and A.5.2.2 reserves AlternativeUserID of a DICOM application
for its AE titles, so the subject cannot go there.  It goes into a second ActiveParticipant:
UserID = the certificate subject (RFC 4514), AlternativeUserID = ``AETITLES=<AE title>``
tying it to the application, the same address and UserIsRequestor, and no RoleIDCode (it
is the same party, not a second sender or receiver).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, defaultdict
from dataclasses import replace
from typing import Any, Callable, Iterable, Sequence

from pynetdicom import evt

from xdsi.audit import messages as m
from xdsi.audit.trail import AuditTrail
from xdsi.security.tls import certificate_subject

__all__ = ["DimseAudit", "RetrieveAudit", "patient_of"]

log = logging.getLogger(__name__)

_SUBJECT_ATTR = "_xdsi_tls_subject"  # set on a pynetdicom Association by EVT_REQUESTED (audit on only)


def _assoc_socket(assoc: Any) -> Any:
    return getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)


def _aet(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value or "").strip()


def _participant(info: Any, requestor: bool) -> m.Participant:
    """An association end as an ActiveParticipant: AE title as UserID, its IP address as access point."""
    return m.Participant(_aet(info.ae_title) or "UNKNOWN", requestor, network_access_point=str(info.address or "") or None)


def node_participant(app: m.Participant, subject: str | None) -> list[m.Participant]:
    """The TLS-authenticated node behind ``app`` (see the module text), or nothing without TLS."""
    if not subject:
        return []
    return [m.Participant(subject, app.is_requestor, None, app.network_access_point, f"AETITLES={app.user_id}")]


def _with_nodes(event: m.AuditEvent, nodes: Sequence[m.Participant]) -> m.AuditEvent:
    return replace(event, participants=[*event.participants, *nodes]) if nodes else event


class DimseAudit:
    """Per-association bookkeeping for the audit trail; ``patient_of(archive, study_uid)`` looks up the patient."""

    def __init__(self, trail: AuditTrail, patient_of: Callable[[Any, str], str]) -> None:
        self.trail = trail
        self.patient_of = patient_of
        self._lock = threading.Lock()
        # id(assoc) -> (archive, study UID -> Counter of SOP Class UIDs, studies with a replaced instance)
        self._received: dict[int, tuple[Any, dict[str, Counter[str]], set[str]]] = {}

    def handlers(self) -> list[tuple[Any, Any]]:
        return [
            (evt.EVT_REQUESTED, self._requested),
            (evt.EVT_REJECTED, self._rejected),
            (evt.EVT_RELEASED, self._flush),
            (evt.EVT_ABORTED, self._flush),
        ]

    # -- who the peer is ---------------------------------------------------------------------------

    @staticmethod
    def _requested(event: Any) -> None:
        """Keep the TLS peer's certificate subject while the socket is open (it is gone by the release)."""
        subject = certificate_subject(_assoc_socket(event.assoc))
        if subject:
            setattr(event.assoc, _SUBJECT_ATTR, subject)

    @staticmethod
    def peer(assoc: Any) -> list[m.Participant]:
        """The requestor of an association we accepted: its AE participant, then its TLS node participant if any."""
        app = _participant(assoc.requestor, True)
        return [app, *node_participant(app, getattr(assoc, _SUBJECT_ATTR, None))]

    # -- C-STORE received ----------------------------------------------------------------------------

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
        sender, *nodes = self.peer(event.assoc)
        receiver = _participant(event.assoc.acceptor, False)
        for study_uid, classes in studies.items():
            patient = self._patient(archive, study_uid)
            action = "U" if study_uid in updated else "C"  # PS3.15 A.5.3.7: Create, or Update when we replaced a copy
            msg = m.instances_transferred(self.trail.source, sender, receiver, study_uid, patient, sorted(classes.items()), action=action)
            self.trail.record(_with_nodes(msg, nodes))

    def _patient(self, archive: Any, study_uid: str) -> str:
        try:
            return self.patient_of(archive, study_uid) or "UNKNOWN"
        except Exception:  # the index is busy or gone: audit what we know rather than nothing
            log.exception("audit: patient of study %s not found", study_uid)
            return "UNKNOWN"

    # -- C-FIND ------------------------------------------------------------------------------------------

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
        try:
            requestor, *nodes = self.peer(event.assoc)
            msg = m.query(
                self.trail.source,
                requestor,
                _participant(event.assoc.acceptor, False),
                str(req.AffectedSOPClassUID),
                raw,
                str(event.context.transfer_syntax),
                patient_id=patient,
            )
            self.trail.record(_with_nodes(msg, nodes))
        except Exception:  # the C-FIND is answered regardless
            log.exception("audit of a C-FIND failed")

    # -- C-MOVE and C-GET ----------------------------------------------------------------------------------

    def retrieval(
        self,
        event: Any,
        archive: Any,
        refs: Sequence[Any],
        destination: m.Participant | None = None,
        destination_subject: str | None = None,
    ) -> "RetrieveAudit | None":
        """The audit of one C-MOVE (``destination`` = the move destination) or C-GET (the requestor receives).

        None when auditing is off, so the retrieve path does no audit work at all.
        """
        if not self.trail.enabled:
            return None
        try:
            us = _participant(event.assoc.acceptor, False)
            requestor = self.peer(event.assoc)
            if destination is None:  # C-GET: the requestor is the receiver
                receiver, others = requestor[0], requestor[1:]
            else:  # C-MOVE: a third party asked us to send to the destination
                receiver = destination
                others = [*node_participant(destination, destination_subject), *requestor]
            return RetrieveAudit(self.trail, lambda uid: self._patient(archive, uid), us, receiver, others, refs)
        except Exception:  # the retrieve goes on, unaudited, rather than fail because of its audit
            log.exception("audit of a retrieve could not start")
            return None

    # -- refused associations --------------------------------------------------------------------------------

    def _rejected(self, event: Any) -> None:
        """EVT_REJECTED: pynetdicom answered A-ASSOCIATE-RJ itself (its ``require_calling_aet``/``require_called_aet``)."""
        assoc = event.assoc
        primitive = getattr(assoc.requestor, "primitive", None)
        calling = _aet(getattr(primitive, "calling_ae_title", None))
        called = _aet(getattr(primitive, "called_ae_title", None))
        ae = assoc.ae
        if ae.require_calling_aet and calling not in [_aet(a) for a in ae.require_calling_aet]:
            reason = f"calling AE title {calling!r} not recognised"
        elif ae.require_called_aet and called != _aet(ae.ae_title):
            reason = f"called AE title {called!r} not recognised"
        else:  # pynetdicom's other refusals are resource limits, not a failed node authentication
            return
        self.association_refused(assoc, reason)

    def association_refused(self, assoc: Any, reason: str) -> None:
        """We answered ``assoc``'s A-ASSOCIATE-RQ with A-ASSOCIATE-RJ (PS3.8 7.1.1.9) because of ``reason``."""
        if not self.trail.enabled:
            return
        primitive = getattr(assoc.requestor, "primitive", None)
        calling = _aet(getattr(primitive, "calling_ae_title", None))
        called = _aet(getattr(primitive, "called_ae_title", None))
        address = str(assoc.requestor.address or "") or "unknown"
        subject = getattr(assoc, _SUBJECT_ATTR, None) or certificate_subject(_assoc_socket(assoc))
        self.refused(_participant(assoc.acceptor, False), address, calling, called, reason, subject)

    def refused(self, us: m.Participant, address: str, calling: str, called: str, reason: str, subject: str | None = None) -> None:
        """A Security Alert (110113, type Node Authentication) for a peer we refused; rate-limited (``trail.alerts``).

        ``us`` reports it (our AE title, not the called one the peer may have invented); the peer is the performer."""
        if not self.trail.enabled:
            return
        more = self.trail.alerts.admit(("association", address, calling, called))
        if more is None:
            return
        try:
            them = m.Participant(calling or "UNKNOWN", True, network_access_point=address)
            why = f"DICOM association from {calling or '?'} at {address} to {called or '?'} refused (A-ASSOCIATE-RJ): {reason}{more}"
            msg = m.security_alert(self.trail.source, us, "node_authentication", address, why, performer=them)
            self.trail.record(_with_nodes(msg, node_participant(them, subject)))
        except Exception:  # the refusal stands regardless
            log.exception("audit of a refused association failed")

    def operation_refused(self, caller: Any, operation: str, our_ae_title: str, our_address: str | None = None) -> None:
        """A known peer asked for an operation its ``[peers.AET]`` rights do not allow (answered 0124H, issue 13).

        PS3.15 A.5.3.11 Security Alert, event type 110132 "Use of Restricted Function": the peer as
        performer, us as reporter, its certificate subject as a second participant over TLS.
        ``caller`` is the policy's :class:`xdsi.dimse.policy.Caller`.  Rate-limited per peer and operation."""
        if not self.trail.enabled:
            return
        c = caller
        more = self.trail.alerts.admit(("operation", c.address, c.calling_ae, operation))
        if more is None:
            return
        try:
            us = m.Participant(our_ae_title, False, network_access_point=our_address or None)
            them = m.Participant(c.calling_ae or "UNKNOWN", True, network_access_point=c.address or None)
            why = (f"DICOM {DIMSE_NAMES[operation]} from {c.calling_ae or '?'} at {c.address or '?'} to {c.called_ae or '?'} "
                   f"refused (0124H Refused: Not Authorized): [peers.{c.calling_ae}] {operation} = false{more}")
            msg = m.security_alert(self.trail.source, us, "use_of_restricted_function", c.address or c.calling_ae or "unknown", why, performer=them)
            self.trail.record(_with_nodes(msg, node_participant(them, c.tls_subject)))
        except Exception:  # the refusal stands regardless
            log.exception("audit of a refused DICOM %s failed", operation)


DIMSE_NAMES = {"store": "C-STORE", "find": "C-FIND", "move": "C-MOVE", "get": "C-GET", "commit": "Storage Commitment (N-ACTION)"}


class RetrieveAudit:
    """One C-MOVE or C-GET request, per study: Begin Transferring DICOM Instances when the sub-operations
    start (what we intend to send), DICOM Instances Transferred when they end (what was actually sent).

    Outcome 0 when every instance of the study was sent, else 4 (minor failure) with an
    EventOutcomeDescription saying how many were not and why; the SOP classes listed are those
    sent.  The comparison of the two messages is what PS3.15 A.5.3.3 says they are for.
    """

    def __init__(
        self,
        trail: AuditTrail,
        patient_of: Callable[[str], str],
        sender: m.Participant,
        receiver: m.Participant,
        others: Sequence[m.Participant],
        refs: Iterable[Any],
    ) -> None:
        self.trail = trail
        self.sender = sender
        self.receiver = receiver
        self.others = list(others)
        self.intended: dict[str, Counter[str]] = defaultdict(Counter)
        for r in refs:
            self.intended[r.study_uid][r.sop_class_uid] += 1
        self.sent_ok: dict[str, Counter[str]] = defaultdict(Counter)
        self.reasons: dict[str, Counter[str]] = defaultdict(Counter)  # study -> reason -> instances
        self.note: str | None = None  # why the rest was not sent (cancelled, aborted, refused)
        self._patients = {uid: patient_of(uid) for uid in self.intended}
        self._ended = False

    def begin(self) -> None:
        """The sub-operations start now: one Begin Transferring per study."""
        for study_uid, classes in self.intended.items():
            self._record(m.begin_transferring(self.trail.source, self.sender, self.receiver, study_uid, self._patients[study_uid],
                                              sorted(classes.items()), self.others))

    def sent(self, ref: Any, ok: bool, reason: str | None = None) -> None:
        """One sub-operation finished: the instance was stored by the receiver (``ok``) or not, and why."""
        if ok:
            self.sent_ok[ref.study_uid][ref.sop_class_uid] += 1
        else:
            self.reasons[ref.study_uid][(reason or "failed")[:200]] += 1

    def end(self, note: str | None = None) -> None:
        """The request is over (completed, cancelled, aborted or refused): one Instances Transferred per study."""
        if self._ended:
            return
        self._ended = True
        note = note or self.note
        for study_uid, classes in self.intended.items():
            total = sum(classes.values())
            sent = self.sent_ok.get(study_uid, Counter())
            missing = total - sum(sent.values())
            description = None
            if missing:
                failed = self.reasons.get(study_uid, Counter())
                parts = [f"{n} x {why}" for why, n in failed.most_common(3)]
                unsent = missing - sum(failed.values())
                if unsent > 0:
                    parts.append(f"{unsent} not attempted" + (f": {note}" if note else ""))
                description = f"{missing} of {total} instance(s) not sent to {self.receiver.user_id}: " + "; ".join(parts)
            self._record(m.instances_sent(self.trail.source, self.sender, self.receiver, study_uid, self._patients[study_uid],
                                          sorted(sent.items()), self.others, m.OUTCOME["minor"] if missing else m.OUTCOME["success"], description))

    def _record(self, event: m.AuditEvent) -> None:
        try:
            self.trail.record(event)
        except Exception:  # record() does not raise; a builder bug must not fail the retrieve either
            log.exception("audit of a retrieve failed")


def patient_of(archive: Any, study_uid: str) -> str:
    """The Patient ID the index holds for ``study_uid`` (empty when the study has none)."""
    from sqlalchemy import select

    from xdsi.index.models import Patient, Study

    with archive.index.read_session() as s:
        pid = s.execute(select(Patient.patient_id).join(Study, Study.patient_fk == Patient.pk).where(Study.study_uid == study_uid)).scalar()
    return str(pid or "")
