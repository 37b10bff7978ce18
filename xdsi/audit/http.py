"""What the HTTP adapters tell the audit trail (STOW-RS so far): who asked, from where, about which study.

The requester of an HTTP transaction has no AE title: PS3.15 A.5.3 lets UserID be the
client's identity as known (the TLS certificate subject once [tls] delivers it, else
its address), with the address as NetworkAccessPointID.  We are named by our AE title
and the Host the client used.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Mapping

from xdsi.audit import messages as m

__all__ = ["stow_received"]

log = logging.getLogger(__name__)


def requester(environ: Mapping[str, Any]) -> m.Participant:
    addr = str(environ.get("REMOTE_ADDR") or "") or None
    subject = str(environ.get("SSL_CLIENT_S_DN") or "")  # set by a TLS front end or our HTTPS adapter
    return m.Participant(subject or addr or "UNKNOWN", True, network_access_point=addr)


def us(archive: Any, environ: Mapping[str, Any]) -> m.Participant:
    host = str(environ.get("SERVER_NAME") or "") or None
    return m.Participant(archive.settings.ae_title, False, network_access_point=host)


def stow_received(archive: Any, environ: Mapping[str, Any], studies: Mapping[str, Counter[str]], patient_of: Any) -> None:
    """One DICOM Instances Transferred (action C) per study a STOW-RS request stored; never raises."""
    trail = getattr(archive, "audit", None)
    if trail is None or not trail.enabled or not studies:
        return
    try:
        sender, receiver = requester(environ), us(archive, environ)
        sender = m.Participant(sender.user_id, True, None, sender.network_access_point)
        for study_uid, classes in studies.items():
            patient = patient_of(archive, study_uid) or "UNKNOWN"
            trail.record(m.instances_transferred(trail.source, sender, receiver, study_uid, patient, sorted(classes.items())))
    except Exception:  # the STOW answer goes out regardless
        log.exception("audit of a STOW-RS request failed")
