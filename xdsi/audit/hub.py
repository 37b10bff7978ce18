"""What the hub (issue 15) tells the audit trail: relayed retrieves, on-demand fetches, routing forwards, prefetch pushes.

The local C-MOVE/C-GET paths are audited by :mod:`xdsi.audit.dimse`; the gateway's answers leave
them before any of that runs, and the routing worker and the prefetch push send on associations
of their own, so without this module instances would leave (or enter) the archive unrecorded.

* **relayed retrieve** (C-GET via C-MOVE or via C-GET, C-MOVE relayed through us): per study, one
  DICOM Instances Transferred from the remote (Source) to us (Destination), action "C" (what we
  received), and one from us (Source) to the receiver (the C-GET requester or the C-MOVE
  destination; Destination), action "R", with the remote and a C-MOVE's requester as further
  participants.  Instances refused as not asked for (:mod:`xdsi.gateway.identity`) are in the
  received message's outcome description (outcome 4), never in its SOP class counts.
* **on-demand fetch** (RAD-69 / WADO-RS / WADO-URI of a study only a remote holds): Import
  (110107) per study, the remote as Source, we (who asked) as Destination and requestor.
* **routing forward** and **prefetch push**: per destination batch and study, Begin Transferring
  DICOM Instances then DICOM Instances Transferred, through :class:`xdsi.audit.dimse.RetrieveAudit`
  (the same intended/sent bookkeeping as a local C-MOVE, not a copy of it).

All of it is bookkeeping in memory while instances move, and one spool write per message when the
transfer ends (``AuditTrail.record`` spools, the sender thread does the network): nothing here
waits for an audit repository, and nothing here may fail a transfer (every entry point swallows
and logs its own errors).
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from xdsi.audit import messages as m

__all__ = ["RelayAudit", "fetch_audit", "transfer_audit", "trail_of", "remote_participant", "us"]

log = logging.getLogger(__name__)


def trail_of(owner: Any) -> Any:
    """The enabled AuditTrail reachable from an archive (``archive.audit``) or a DicomServer (``server.audit.trail``), or None."""
    trail = getattr(owner, "audit", None)
    trail = getattr(trail, "trail", trail)  # a DimseAudit holds its trail
    return trail if trail is not None and getattr(trail, "enabled", False) else None


def us(settings: Any) -> m.Participant:
    """This archive as a participant: its AE title, its host as the access point."""
    return m.Participant(settings.ae_title, False, network_access_point=str(getattr(settings, "host", "") or "") or None)


def remote_participant(remote: Any, is_requestor: bool = False) -> m.Participant:
    """A ``[remotes.NAME]`` (or ``[peers.AE]``) as a participant: its AE title and host."""
    return m.Participant(str(remote.ae_title), is_requestor, network_access_point=str(getattr(remote, "host", "") or "") or None)


def _safely(what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception:  # the transfer goes on (or has ended) regardless of its audit
        log.exception("audit of %s failed", what)
        return None


@dataclass
class _Study:
    patient: str = ""
    received: Counter[str] = field(default_factory=Counter)  # SOP Class UID -> instances the remote delivered
    sent: Counter[str] = field(default_factory=Counter)  # SOP Class UID -> instances the receiver stored
    failed: Counter[str] = field(default_factory=Counter)  # reason -> instances not sent on


class RelayAudit:
    """One relayed retrieve: what the remote delivered and what went on to the receiver, per study."""

    def __init__(self, trail: Any, us_: m.Participant, remote: m.Participant, receiver: m.Participant,
                 others: Sequence[m.Participant] = ()) -> None:
        self.trail = trail
        self.us = us_
        self.remote = remote
        self.receiver = receiver
        self.others = list(others)
        self.studies: dict[str, _Study] = defaultdict(_Study)
        self.refused: Counter[str] = Counter()  # instances refused as not asked for, by reason
        self._ended = False

    def arrived(self, study_uid: str, patient_id: str, sop_class_uid: str) -> None:
        s = self.studies[study_uid or "UNKNOWN"]
        s.patient = s.patient or patient_id
        s.received[sop_class_uid] += 1

    def sent(self, study_uid: str, sop_class_uid: str, ok: bool, reason: str = "") -> None:
        s = self.studies[study_uid or "UNKNOWN"]
        if ok:
            s.sent[sop_class_uid] += 1
        else:
            s.failed[(reason or "failed")[:200]] += 1

    def end(self, refused: Iterable[tuple[str, str]] = (), note: str | None = None) -> None:
        """The retrieve is over: record per study (received, then sent on).  Idempotent."""
        if self._ended:
            return
        self._ended = True
        _safely("a relayed retrieve", lambda: self._record(list(refused), note))

    def _record(self, refused: list[tuple[str, str]], note: str | None) -> None:
        refused_text = ""
        if refused:
            why = Counter(reason for _, reason in refused)
            refused_text = (f"{len(refused)} instance(s) from {self.remote.user_id} refused as not asked for: "
                            + "; ".join(f"{n} x {r}" for r, n in why.most_common(3)))
        if refused and not self.studies:  # nothing of what was asked came: the refusal is still on record
            log.warning("audit: %s", refused_text)
        for study_uid, s in self.studies.items():
            patient = s.patient or "UNKNOWN"
            desc = refused_text or None
            received = m.instances_transferred(self.trail.source, self.remote, self.us, study_uid, patient, sorted(s.received.items()),
                                               action="C", outcome=m.OUTCOME["minor"] if refused else m.OUTCOME["success"],
                                               outcome_description=desc)
            self.trail.record(_plus(received, [_as_other(self.receiver), *self.others]))
            total = sum(s.received.values())
            missing = total - sum(s.sent.values())
            description = None
            if missing:
                parts = [f"{n} x {why}" for why, n in s.failed.most_common(3)]
                unsent = missing - sum(s.failed.values())
                if unsent > 0:
                    parts.append(f"{unsent} not attempted" + (f": {note}" if note else ""))
                description = f"{missing} of {total} instance(s) not sent to {self.receiver.user_id}: " + "; ".join(parts)
            sent = m.instances_sent(self.trail.source, self.us, self.receiver, study_uid, patient, sorted(s.sent.items()),
                                    [_as_other(self.remote), *self.others], m.OUTCOME["minor"] if missing else m.OUTCOME["success"],
                                    description)
            self.trail.record(sent)


def _as_other(p: m.Participant) -> m.Participant:
    """A further participant: no role (PS3.15 leaves it optional), so it is not taken for the source or destination."""
    return m.Participant(p.user_id, p.is_requestor, None, p.network_access_point, p.alternative_user_id, p.user_name)


def _plus(event: m.AuditEvent, more: Sequence[m.Participant]) -> m.AuditEvent:
    return m.AuditEvent(event.event, event.action, event.outcome, [*event.participants, *more], event.source, event.objects,
                        event.event_types, event.outcome_description, event.at)


def fetch_audit(trail: Any, us_: m.Participant, remote: m.Participant, study_uid: str, patient_id: str,
                sop_classes: Iterable[tuple[str, int]], failed: int, refused: Sequence[tuple[str, str]], problem: str | None) -> None:
    """Import (110107) of one study fetched on demand from a remote: the remote as Source, we as Destination (we asked)."""

    def record() -> None:
        parts = []
        if failed:
            parts.append(f"{failed} instance(s) not stored")
        if refused:
            parts.append(f"{len(refused)} instance(s) refused as not asked for ({refused[0][1]})")
        if problem:
            parts.append(problem)
        classes = sorted(sop_classes)
        outcome = m.OUTCOME["success"] if not parts else m.OUTCOME["minor"] if classes else m.OUTCOME["serious"]
        people = [m.Participant(remote.user_id, False, m.ROLE["source"], remote.network_access_point),
                  m.Participant(us_.user_id, True, m.ROLE["destination"], us_.network_access_point)]
        objects = [m.study_object(study_uid, classes), m.patient_object(patient_id or "UNKNOWN")]
        trail.record(m.AuditEvent(m.EVENT["import"], "C", outcome, people, trail.source, objects,
                                  outcome_description="; ".join(parts)[:1000] or None))

    _safely(f"the fetch of study {study_uid}", record)


def transfer_audit(archive: Any, receiver: m.Participant, refs: Sequence[Any], others: Sequence[m.Participant] = ()) -> Any:
    """A :class:`xdsi.audit.dimse.RetrieveAudit` for instances we send on our own initiative (a routing forward, a
    prefetch push) to ``receiver``; Begin Transferring already recorded.  None when auditing is off."""
    trail = trail_of(archive)
    if trail is None or not refs:
        return None

    def start() -> Any:
        from xdsi.audit.dimse import RetrieveAudit, patient_of

        audit = RetrieveAudit(trail, lambda uid: _patient(archive, uid, patient_of), us(archive.settings), receiver, others, refs)
        audit.begin()
        return audit

    return _safely("a transfer", start)


def _patient(archive: Any, study_uid: str, patient_of: Callable[[Any, str], str]) -> str:
    try:
        return patient_of(archive, study_uid) or "UNKNOWN"
    except Exception:
        log.exception("audit: patient of study %s not found", study_uid)
        return "UNKNOWN"


def audited_push(archive: Any, peer_ae: str, study_uids: Sequence[str], push: Callable[..., tuple[int, list[str]]]) -> tuple[int, list[str]]:
    """``push(archive, peer_ae, study_uids)`` (the prefetch push), audited per study: Begin Transferring, then
    Instances Transferred with what the peer did not take (its errors name the SOP Instance UID first)."""
    peer = archive.settings.peer(peer_ae)
    refs: list[Any] = []
    if peer is not None and trail_of(archive) is not None:
        refs = _safely("a prefetch push", lambda: [r for uid in study_uids for r in archive.retrieve.select(study_uids=[uid])]) or []
    audit = transfer_audit(archive, remote_participant(peer), refs) if refs else None
    done, errors = push(archive, peer_ae, study_uids)
    if audit is not None:
        def finish() -> None:
            failed = {}
            for e in errors:
                uid, sep, why = e.partition(": ")
                if sep:
                    failed[uid] = why
            budget = done  # push sends in the order of the same selection: the first ``done`` not failed were taken
            for r in refs:
                if r.sop_instance_uid in failed:
                    audit.sent(r, False, failed[r.sop_instance_uid])
                elif budget > 0:
                    budget -= 1
                    audit.sent(r, True)
            audit.end("; ".join(e for e in errors if ": " not in e) or None)

        _safely("a prefetch push", finish)
    return done, errors


def relay_audit(server: Any, event: Any, remote: Any, destination: m.Participant | None = None) -> "RelayAudit | None":
    """The audit of one relayed retrieve served by ``server`` (a DicomServer) for ``event``'s requester, or None when
    auditing is off.  ``destination``: the C-MOVE destination (the requester receives for a C-GET)."""
    dimse = getattr(server, "audit", None)
    trail = trail_of(server)
    if dimse is None or trail is None:
        return None

    def start() -> RelayAudit:
        from xdsi.audit.dimse import _participant

        ours = _participant(event.assoc.acceptor, False)
        requestor = dimse.peer(event.assoc)
        if destination is None:
            receiver, others = requestor[0], requestor[1:]
        else:
            receiver, others = destination, requestor
        return RelayAudit(trail, ours, remote_participant(remote), receiver, others)

    return _safely("a relayed retrieve", start)
