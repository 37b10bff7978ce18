"""Security Alerts for DIMSE operations refused by a peer's rights (issue 13: every refusal audited).

A rejected *association* is audited by :meth:`xdsi.audit.dimse.DimseAudit.association_refused`
(Node Authentication).  A refused *operation* (C-STORE, C-FIND, C-MOVE, C-GET or Storage
Commitment answered 0124H) is a known peer asking for what it may not do: PS3.15 A.5.3.11
Security Alert with event type 110132 "Use of Restricted Function", the peer as performer, us as
reporter, the peer's certificate subject as a second participant when it came over TLS (the
rule :func:`xdsi.audit.dimse.node_participant` follows for every DIMSE message).

Rate-limited like the association alerts, for the same reason: a peer that repeats a refused
request in a loop must not fill the bounded audit spool.  At most one alert per (address,
calling AE title, operation) and :attr:`RefusalAlerts.INTERVAL` seconds; the ones held back are
counted in the next alert's text.  Recording only spools to SQLite; it never raises.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from typing import Any

from xdsi.dimse.policy import Decision

__all__ = ["RefusalAlerts"]

log = logging.getLogger(__name__)

DIMSE_NAMES = {"store": "C-STORE", "find": "C-FIND", "move": "C-MOVE", "get": "C-GET", "commit": "Storage Commitment (N-ACTION)"}


class RefusalAlerts:
    INTERVAL = 10.0
    MAX_KEYS = 4096

    def __init__(self, our_ae_title: str) -> None:
        self.our_ae_title = our_ae_title
        self._lock = threading.Lock()
        self._last: dict[tuple[str, str, str], tuple[float, int]] = {}  # key -> (last alert, refusals held back since)

    def operation_refused(self, trail: Any, decision: Decision, operation: str, our_address: str | None = None) -> bool:
        """Record the alert unless one for the same peer and operation went out within INTERVAL; True if recorded."""
        if trail is None or not trail.enabled:
            return False
        c = decision.caller
        key = (c.address, c.calling_ae, operation)
        now = time.monotonic()
        with self._lock:
            last, held = self._last.get(key, (float("-inf"), 0))
            if now - last < self.INTERVAL:
                self._last[key] = (last, held + 1)
                return False
            if len(self._last) >= self.MAX_KEYS:  # many peers: forget the old ones rather than grow
                self._last.clear()
            self._last[key] = (now, 0)
        try:
            from xdsi.audit import messages as m
            from xdsi.audit.dimse import node_participant

            us = m.Participant(self.our_ae_title, False, network_access_point=our_address or None)
            them = m.Participant(c.calling_ae or "UNKNOWN", True, network_access_point=c.address or None)
            more = f" ({held} more such refusal(s) not alerted separately)" if held else ""
            why = (f"DICOM {DIMSE_NAMES[operation]} from {c.calling_ae or '?'} at {c.address or '?'} to {c.called_ae or '?'} "
                   f"refused (0124H Refused: Not Authorized): [peers.{c.calling_ae}] {operation} = false{more}")
            msg = m.security_alert(trail.source, us, "use_of_restricted_function", c.address or c.calling_ae or "unknown", why, performer=them)
            nodes = node_participant(them, c.tls_subject)
            trail.record(replace(msg, participants=[*msg.participants, *nodes]) if nodes else msg)
            return True
        except Exception:  # the refusal stands regardless
            log.exception("audit of a refused DICOM %s failed", operation)
            return False
