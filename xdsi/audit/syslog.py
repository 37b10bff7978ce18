"""RFC 5424 syslog frames for audit messages, and the RFC 5425 octet-counted TLS framing.

ITI-20 carries each audit message as the MSG of one RFC 5424 syslog message:
facility 10 (security/authorization), severity 5 (notice), MSGID ``IHE+RFC-3881``,
and the XML as UTF-8 preceded by a BOM so the receiver knows it is Unicode.
"""

from __future__ import annotations

import datetime as dt
import re
import socket

from xdsi.running import application_pid

__all__ = ["frame", "octet_counted", "MSGID", "FACILITY_AUTHPRIV", "SEVERITY_NOTICE"]

FACILITY_AUTHPRIV = 10
SEVERITY_NOTICE = 5
MSGID = "IHE+RFC-3881"
BOM = b"\xef\xbb\xbf"
_PRINTUSASCII = re.compile(r"^[\x21-\x7e]+$")  # RFC 5424 header fields: printable, no spaces


def _field(value: str, limit: int) -> str:
    """A header field as RFC 5424 allows it: 1..limit printable characters, or the NILVALUE '-'."""
    value = value[:limit]
    return value if value and _PRINTUSASCII.match(value) else "-"


def frame(
    msg: bytes,
    at: dt.datetime | None = None,
    hostname: str | None = None,
    app_name: str = "xdsi",
    procid: str | None = None,
    msgid: str = MSGID,
) -> bytes:
    """One RFC 5424 SYSLOG-MSG: ``<85>1 TIMESTAMP HOST APP PROCID MSGID - BOM MSG``.

    The timestamp is UTC with microseconds (TIME-SECFRAC allows six digits) so
    the repository can order messages sent within the same second.
    """
    at = at or dt.datetime.now(dt.timezone.utc)
    if at.tzinfo is None:
        raise ValueError("syslog timestamps must be timezone-aware")
    stamp = at.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    pri = FACILITY_AUTHPRIV * 8 + SEVERITY_NOTICE
    header = " ".join(
        (
            f"<{pri}>1",
            stamp,
            _field(hostname or socket.getfqdn(), 255),
            _field(app_name, 48),
            _field(procid or str(application_pid()), 128),
            _field(msgid, 32),
            "-",  # no STRUCTURED-DATA
        )
    )
    return header.encode("ascii") + b" " + BOM + msg


def octet_counted(syslog_msg: bytes) -> bytes:
    """RFC 5425 section 4.3 / RFC 6587 octet counting: ``MSG-LEN SP SYSLOG-MSG``."""
    return str(len(syslog_msg)).encode("ascii") + b" " + syslog_msg
