"""What the HTTP access check tells the audit trail: a refused request, as a Security Alert.

Why a Security Alert with "Use of Restricted Function" (DCM 110132) for 401 and 403 alike:
issue 13 asks for every refusal as a Security Alert, and of the PS3.16 CID 403 alert types
110132 is the one that describes "someone tried to use a function they may not use";
110126 "Node Authentication" is about a node (TLS) and there is no user-authentication
alert type (a User Authentication event, 110114, would need a login to have happened).
The Alert Description detail says which it was: no credentials, an invalid token (and
why), a wrong password, or a right the requester lacks.  The object is the URL path
asked for (RFC 3881 type 12 URI), without the query string, which is the requester's text.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from xdsi.audit import messages as m
from xdsi.audit.http import requester, us
from xdsi.security.principal import Principal

__all__ = ["http_access_refused"]

log = logging.getLogger(__name__)


def http_access_refused(archive: Any, environ: Mapping[str, Any], status: int, reason: str, principal: Principal | None = None) -> None:
    """One Security Alert for a request answered 401/403; never raises, returns at once (the spool does the rest)."""
    trail = getattr(archive, "audit", None)
    if trail is None or not trail.enabled:
        return
    try:
        who = requester(environ)
        path = (str(environ.get("SCRIPT_NAME") or "") + str(environ.get("PATH_INFO") or "")) or "/"
        # the same refusal (address, status, user, path, reason) repeated within the interval is counted into the next alert
        more = trail.alerts.admit(("http", who.network_access_point, status, principal.subject if principal else None, path, reason))
        if more is None:  # a client retrying, or a flood of bad tokens
            return
        if principal is not None:  # authenticated but lacking the right: name the user, keep the address
            who = m.Participant(principal.subject, True, network_access_point=who.network_access_point, alternative_user_id=who.user_id)
        description = f"HTTP {status} {environ.get('REQUEST_METHOD', '')} {path[:512]}: {reason}{more}"
        trail.record(m.security_alert(trail.source, us(archive, environ), "use_of_restricted_function", path[:1024], description, performer=who))
    except Exception:  # the refusal goes out regardless
        log.exception("audit of a refused HTTP request failed")
