"""The one form of a JPIP target URL, shared by the JPIP server and the JPIP Referenced transfer syntaxes.

A header sent with JPIP Referenced (1.2.840.10008.1.2.4.94) or JPIP
Referenced Deflate (.95) carries Pixel Data Provider URL (0028,7FE0) instead
of Pixel Data (PS3.3 C.7.6.3.1.11, PS3.5 A.6 / A.7): a JPIP request naming the
instance as ``target``.  The target is the SOP Instance UID and nothing else,
so it is validated as a UID before it touches the index or a path; the frames
of a multi-frame instance are its codestreams, chosen with JPIP's own
``stream`` request field (0-based), not with a form of our own.
"""

from __future__ import annotations

from urllib.parse import quote

from xdsi.uids import is_valid_uid

JPIP_PATH = "/jpip"
JPIP_REFERENCED = "1.2.840.10008.1.2.4.94"
JPIP_REFERENCED_DEFLATE = "1.2.840.10008.1.2.4.95"
JPIP_SYNTAXES = (JPIP_REFERENCED, JPIP_REFERENCED_DEFLATE)


class BadTarget(ValueError):
    """The target is not the SOP Instance UID of an instance: refused before any lookup."""


def provider_url(public_url: str, sop_instance_uid: str) -> str:
    """The Pixel Data Provider URL of an instance: ``<public_url>/jpip?target=<SOP Instance UID>``."""
    if not is_valid_uid(sop_instance_uid):
        raise BadTarget(f"not a UID: {sop_instance_uid!r}")
    base = public_url.rstrip("/")
    if not base:
        raise ValueError("[server] public_url is needed to build a Pixel Data Provider URL")
    return f"{base}{JPIP_PATH}?target={quote(sop_instance_uid, safe='.')}"


def parse_target(target: str) -> str:
    """The SOP Instance UID a JPIP ``target`` names; :class:`BadTarget` for anything else."""
    if not is_valid_uid(target):
        raise BadTarget(f"not a SOP Instance UID: {target[:80]!r}")
    return target
