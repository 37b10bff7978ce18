"""What XDS publishing tells the audit trail: one Export per submission we SEND (ITI-41 = RAD-68, ITI-42, ITI-57).

Called by :meth:`xdsi.xds.publisher.Publisher.deliver` once per attempt that reached the
wire (a submission that could not even be built disclosed nothing and is not audited),
with the registry's answer: outcome 0 on Success, 8 (serious failure: the transaction
did not complete) on a RegistryError answer or a transport failure, 4 when the registry
refused a retry because an earlier attempt, whose answer was lost, had registered it.

Participants (ITI TF-2 3.41.5.1.1 / 3.42.5.1.1): Source = us, UserID our AE title,
AlternativeUserID our process id, NetworkAccessPointID our host name; Destination = the
SOAP endpoint URI, with its host.  Objects: the Patient as registered (the affinity-domain
CX) and the SubmissionSet (its uniqueId).  Never raises; only spools.
"""

from __future__ import annotations

import logging
import socket
from typing import Any
from urllib.parse import urlsplit

from xdsi.audit import messages as m
from xdsi.running import application_pid

__all__ = ["submission_sent", "TRANSACTIONS"]

log = logging.getLogger(__name__)

# the transaction we ran -> its EventTypeCodes and EventActionCode
TRANSACTIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "ITI-41": (("ITI-41", "RAD-68"), "R"),  # RAD-68 is ITI-41 carrying a KOS manifest (RAD TF-3 4.68)
    "ITI-42": (("ITI-42",), "R"),
    "ITI-57": (("ITI-57",), "U"),  # a metadata update: XDS Metadata Update supplement (not checked here)
}


def submission_sent(
    archive: Any, transaction: str, endpoint: str, submission_set_uid: str, patient_id: str, outcome: str, description: str | None = None
) -> None:
    """Record the Export for one submission attempt; nothing when auditing is off or the transaction is unknown."""
    trail = getattr(archive, "audit", None)
    if trail is None or not trail.enabled:
        return
    try:
        codes, action = TRANSACTIONS[transaction]
        host = socket.gethostname()
        # we start the transaction: UserIsRequestor true (the ITI tables leave it "U" for the Document Source)
        us = m.Participant(archive.settings.ae_title, True, network_access_point=host or None, alternative_user_id=str(application_pid()))
        peer_host = urlsplit(endpoint).hostname or None
        them = m.Participant(endpoint or "UNKNOWN", False, network_access_point=peer_host)
        trail.record(m.submission_exported(trail.source, us, them, codes, submission_set_uid, patient_id or "UNKNOWN", outcome, description, action=action))
    except Exception:  # the publisher goes on regardless
        log.exception("audit of %s to %s failed", transaction, endpoint)
