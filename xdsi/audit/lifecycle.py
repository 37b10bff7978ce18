"""What the archive's life cycle tells the audit trail: deletes and tier migrations (issue 12).

Deletes (PS3.15 A.5.3.8 / A.5.3.6).  One message per study (one patient per message):
DICOM Study Deleted (110105, action D) when the study is gone from the archive, DICOM
Instances Accessed (110103, action D) when only part of it was deleted, as A.5.3.6 says
("if all instances within a Study are deleted, then ... Study Deleted shall be used").
Outcome 4 when index rows went but some file could not be removed from its tier.

Tier migrations (A.5.3.6).  A migration copies each instance to the next tier, verifies
the SHA-256 and only then removes the copy from the faster tier: the SOP Instances stay
in the archive, unchanged and retrievable.  So it is *not* a delete ("D" would tell an
auditor the instances were destroyed, which they were not); it changes how the archive
holds them, which is what "U" (update) on DICOM Instances Accessed records, with the tiers
as ParticipantObjectDetail ("MigratedFrom", "MigratedTo").  Outcome 4, with the errors,
when some copies could not move (their source copy stays).

Who did it: "the person and/or process" (1..2).  ``xdsi delete`` and ``xdsi migrate`` name
the operator (login@host, PS3.15 A.5.2.1 for a person, UserIsRequestor) and this process
(its process id as UserID as A.5.2.1 suggests, AlternativeUserID ``AETITLES=<our AE>`` as
A.5.2.2 wants for a DICOM application, UserName the command).  The CLI runs without the
server: it records into the same durable spool (``AuditTrail(settings)`` without starting
a sender), and the running server's sender, which looks at the spool every second,
delivers it; with no server running it waits there for the next ``xdsi serve``.  A second
sender in the CLI could send a message the server is sending too: twice is worse than later.
"""

from __future__ import annotations

import getpass
import logging
import socket
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

from xdsi.audit import messages as m
from xdsi.running import application_pid

__all__ = ["RemovedStudy", "MigratedStudy", "removed", "migrated", "operator", "this_process"]

log = logging.getLogger(__name__)


@dataclass
class RemovedStudy:
    """What one removal did to one study; filled in by the remove service (only when auditing is on)."""

    study_uid: str
    patient_id: str
    sop_classes: Counter[str]
    whole_study: bool = False
    files_left: list[str] = field(default_factory=list)  # tier:path of copies whose file could not be deleted


@dataclass
class MigratedStudy:
    """One study's copies moved from one tier to the next (or dropped where a verified lower copy existed)."""

    study_uid: str
    patient_id: str
    sop_classes: Counter[str]
    source: str
    target: str
    errors: list[str] = field(default_factory=list)


def this_process(ae_title: str, command: str | None = None, requestor: bool = True) -> m.Participant:
    """This xdsi process as an ActiveParticipant (PS3.15 A.5.2.1 process id; A.5.2.2 AE title)."""
    host = socket.gethostname() or None
    return m.Participant(str(application_pid()), requestor, None, host, f"AETITLES={ae_title}", command)


def operator() -> m.Participant | None:
    """The person running a command, as login@host (PS3.15 A.5.2.1), or None when the login is unknown."""
    try:
        login = getpass.getuser()
    except Exception:  # no login name in a bare container
        return None
    host = socket.gethostname()  # not getfqdn(): a reverse DNS lookup can hang a command for seconds
    return m.Participant(f"{login}@{host}" if host else login, True, None, host or None)


def _actors(trail: Any, actors: Sequence[m.Participant]) -> list[m.Participant]:
    return list(actors) or [this_process(trail.source.source_id)]


def removed(trail: Any, studies: Sequence[RemovedStudy], actors: Sequence[m.Participant] = ()) -> None:
    """Record the deletes of one removal, one message per study; never raises."""
    if trail is None or not trail.enabled:
        return
    try:
        people = _actors(trail, actors)
        for st in studies:
            outcome, why = "0", None
            if st.files_left:
                outcome = m.OUTCOME["minor"]
                why = f"removed from the index; {len(st.files_left)} file(s) could not be deleted from storage: " + ", ".join(st.files_left[:5])
            patient = st.patient_id or "UNKNOWN"
            classes = sorted(st.sop_classes.items())
            if st.whole_study:
                event = m.study_deleted(trail.source, people, st.study_uid, patient, classes, outcome, why)
            else:
                event = m.instances_accessed(trail.source, people, "D", st.study_uid, patient, classes, outcome, why)
            trail.record(event)
    except Exception:  # the delete happened; its audit failing must not turn it into an error
        log.exception("audit of a delete failed")


def migrated(trail: Any, study: MigratedStudy, actors: Sequence[m.Participant] = ()) -> None:
    """Record one study's tier migration as DICOM Instances Accessed, action U (see the module text); never raises."""
    if trail is None or not trail.enabled:
        return
    try:
        outcome, why = "0", None
        if study.errors:
            outcome = m.OUTCOME["minor"]
            why = f"{len(study.errors)} copy(ies) not moved (source kept): " + "; ".join(study.errors[:3])
        details = [("MigratedFrom", study.source.encode()), ("MigratedTo", study.target.encode())]
        trail.record(m.instances_accessed(trail.source, _actors(trail, actors), "U", study.study_uid, study.patient_id or "UNKNOWN",
                                          sorted(study.sop_classes.items()), outcome, why, details))
    except Exception:
        log.exception("audit of a tier migration failed")
