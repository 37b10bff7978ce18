"""What the SOAP endpoints tell the audit trail about XUA: an assertion refused (ITI-40 3.40.4.1.3).

ITI-40 wants "the ATNA Audit event for Authentication Failure" when an X-User Assertion does not
validate: PS3.15 A.5.3.12 User Authentication, EventTypeCode Login, outcome 4, the cause in
EventOutcomeDescription.  The person is who the assertion *claimed* to be (A.5.3.12: "Person
authenticated or claimed"), written as ITI-40 3.40.4.2 encodes an XUA user, ``alias<user@issuer>``;
without a readable assertion it is the requester as the HTTP adapters name it (TLS subject or address).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from xdsi.audit import messages as m
from xdsi.audit.http import requester, us

__all__ = ["xua_refused"]

log = logging.getLogger(__name__)


def xua_refused(archive: Any, environ: Mapping[str, Any], refused: Any) -> None:
    """One User Authentication failure for a refused assertion (an ``xdsi.security.xua.XuaRefused``); never raises."""
    trail = getattr(archive, "audit", None)
    if trail is None or not trail.enabled:
        return
    try:
        from xdsi.security.xua import audit_user_name

        peer = requester(environ)
        # the same refusal repeated within the interval (a client looping on a bad assertion) is counted, not re-alerted
        more = trail.alerts.admit(("xua", peer.network_access_point, str(refused.subcode), str(refused.detail), getattr(refused.claimed, "user", None)))
        if more is None:
            return
        claimed = refused.claimed
        if claimed is not None and claimed.user:
            user_name = audit_user_name(claimed.user, claimed.issuer or "", claimed.alias)
            person = m.Participant(claimed.user, True, None, peer.network_access_point, alternative_user_id=peer.user_id, user_name=user_name)
        else:
            person = m.Participant(peer.user_id, True, None, peer.network_access_point)
        subcode = str(refused.subcode).rsplit("}", 1)[-1]
        description = f"XUA assertion refused (wsse:{subcode}): {refused.detail}"[:1024] + more
        trail.record(m.user_authentication(trail.source, person, us(archive, environ), outcome=m.OUTCOME["minor"], description=description))
    except Exception:  # the fault goes out regardless
        log.exception("audit of a refused XUA assertion failed")
