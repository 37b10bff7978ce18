"""ATNA audit trail (IHE ITI-20): PS3.15 A.5 messages, RFC 5424 frames, a durable spool, TLS/UDP delivery."""

from xdsi.audit.trail import AuditTrail

__all__ = ["AuditTrail"]
