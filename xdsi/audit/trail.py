"""The one audit service the adapters call: ``trail.record(event)`` and nothing else.

``record`` builds the PS3.15 message, frames it for syslog and commits it to the
durable spool; the sender threads deliver it later.  It never raises into the caller
and never waits on the network, so auditing cannot fail or slow a DICOM or HTTP
response; what goes wrong is logged (and a full spool is counted in ``xdsi status``).
"""

from __future__ import annotations

import logging
import ssl
import time
from pathlib import Path
from typing import TYPE_CHECKING

from xdsi.audit.messages import AuditEvent, AuditSource, build
from xdsi.audit.ratelimit import AlertLimiter
from xdsi.audit.sender import AuditSender, parse_repository
from xdsi.audit.spool import AuditSpool, SpoolFull, SpoolStatus
from xdsi.audit.syslog import frame

if TYPE_CHECKING:  # xdsi.config imports nothing of this package; only the type is needed here
    from xdsi.config import Settings

__all__ = ["AuditTrail", "spool_path", "spool_status"]

log = logging.getLogger(__name__)


def spool_path(settings: "Settings") -> Path:
    return settings.audit.spool_path or (settings.data_dir / "audit" / "spool.sqlite").resolve()


class AuditTrail:
    """Spool plus sender for ``[audit]``; with no repository configured, ``record`` is a cheap no-op."""

    def __init__(self, settings: "Settings", ssl_context: ssl.SSLContext | None = None) -> None:
        cfg = settings.audit
        self.alerts = AlertLimiter()  # one budget for every refusal alert, whatever the interface
        self.source = AuditSource(cfg.audit_source_id or settings.ae_title, cfg.enterprise_site_id or None, cfg.audit_source_type)
        repos = [parse_repository(u) for u in cfg.repositories]
        self.enabled = bool(repos)
        # no file at all when auditing is off: an installation without [audit] keeps its data dir as it was
        self.spool = AuditSpool(spool_path(settings), [r.url for r in repos], cfg.spool_max_messages) if repos else None
        self.sender = AuditSender(self.spool, repos, ssl_context, retry_seconds=cfg.retry_seconds, max_backoff=max(cfg.retry_max_seconds, cfg.retry_seconds)) if self.spool else None

    def start(self) -> None:
        if self.sender is not None:
            self.sender.start()

    def stop(self, drain_seconds: float = 2.0) -> None:
        """Stop delivery, first giving reachable repositories ``drain_seconds`` to take what waits
        (the Application Stop message among it); the rest stays spooled for the next start."""
        if self.sender is None or self.spool is None:
            return
        deadline = time.monotonic() + drain_seconds
        while time.monotonic() < deadline and any(self.spool.status().depth.values()):
            time.sleep(0.05)
        self.sender.stop()
        self.spool.close()

    def record(self, event: AuditEvent) -> bool:
        """Spool one event for every repository; False (and logged) when it could not be kept."""
        if self.spool is None or self.sender is None:
            return False
        try:
            self.spool.put(frame(build(event), at=event.at), at=event.at)
        except SpoolFull as exc:
            log.error("audit event %s not recorded: %s", event.event.meaning, exc)
            return False
        except Exception:  # an audit bug must not fail the request being audited
            log.exception("audit event %s not recorded", event.event.meaning)
            return False
        self.sender.wake()
        return True

    def status(self) -> SpoolStatus:
        return self.spool.status() if self.spool is not None else SpoolStatus({}, None, 0)


def spool_status(settings: "Settings") -> SpoolStatus | None:
    """For ``xdsi status``: the spool as it is on disk, or None when no repository is configured."""
    if not settings.audit.repositories:
        return None
    spool = AuditSpool(spool_path(settings), list(settings.audit.repositories), settings.audit.spool_max_messages)
    try:
        return spool.status()
    finally:
        spool.close()
