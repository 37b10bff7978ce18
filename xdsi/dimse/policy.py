"""Who may associate with us over DIMSE, and what each peer may do (issue 13, item 1).

The decisions here are pure: :meth:`DimsePolicy.decide` takes what an A-ASSOCIATE-RQ and its
connection tell us (called and calling AE title, peer address, the TLS certificate subject) and
answers accept, or reject with the PS3.8 9.3.4 A-ASSOCIATE-RJ result / source / reason.  The
DIMSE server only asks (``xdsi.dimse.server``: once per association, once per operation).

Why a known AE title from the wrong host, or without its certificate, counts as *not
recognised*: an AE title is a name the peer chooses and sends in clear; it identifies no one.
Only the address it calls from (``hosts``) and the certificate it proved it holds
(``tls_subject``) make it believable, so a title that fails them is a stranger using a known
name, and gets exactly what a stranger gets.

Refusals of an operation (a right switched off) are answered by the server with PS3.7 C
general status 0124H "Refused: Not Authorized", valid for C-STORE, C-FIND, C-MOVE, C-GET and
N-ACTION alike (pynetdicom lists it among the statuses of every one of those services).
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from xdsi.config import DIMSE_OPERATIONS, DimsePolicySettings, PeerRights, Settings
from xdsi.security.tls import certificate_subject

__all__ = [
    "Caller",
    "Decision",
    "DimsePolicy",
    "caller_of",
    "NOT_AUTHORIZED",
    "REJECTED_PERMANENT",
    "SOURCE_SERVICE_USER",
    "CALLING_AE_NOT_RECOGNISED",
    "CALLED_AE_NOT_RECOGNISED",
]

log = logging.getLogger(__name__)

# PS3.8 9.3.4 / Table 9-21: A-ASSOCIATE-RJ Result, Source and Reason/Diag.
REJECTED_PERMANENT = 0x01
SOURCE_SERVICE_USER = 0x01
CALLING_AE_NOT_RECOGNISED = 0x03
CALLED_AE_NOT_RECOGNISED = 0x07
# PS3.7 C (general status): Refused: Not Authorized
NOT_AUTHORIZED = 0x0124


@dataclass(frozen=True)
class Caller:
    """What we know of the requester when its A-ASSOCIATE-RQ arrives."""

    called_ae: str
    calling_ae: str
    address: str  # the peer's IP address as the socket reports it
    tls_subject: str | None = None  # RFC 4514 subject of its verified certificate; None: plain DICOM or no certificate


@dataclass(frozen=True)
class Decision:
    """Accept, or reject with the A-ASSOCIATE-RJ fields; ``reason`` is for the log and the Security Alert."""

    caller: Caller
    accepted: bool
    reason: str
    result: int | None = None
    source: int | None = None
    diagnostic: int | None = None
    rights: PeerRights | None = None  # the configured peer; None for an accepted unknown peer (every right)

    def allows(self, operation: str) -> bool:
        if operation not in DIMSE_OPERATIONS:
            raise ValueError(f"unknown DIMSE operation {operation!r}")
        if not self.accepted:
            return False
        return True if self.rights is None else self.rights.allows(operation)


def _reject(caller: Caller, diagnostic: int, reason: str) -> Decision:
    return Decision(caller, False, reason, REJECTED_PERMANENT, SOURCE_SERVICE_USER, diagnostic)


def _address(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(value.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # a dual-stack listener reports 10.0.0.7 as ::ffff:10.0.0.7
    return ip


def _from_hosts(address: str, hosts: Iterable[str]) -> bool:
    ip = _address(address)
    if ip is None:
        return False
    return any(ip in ipaddress.ip_network(n) for n in hosts)


class DimsePolicy:
    """The association and operation rules of one DICOM listener.

    ``served`` maps each called AE title this listener answers to the allow-list of calling
    AE titles that may use it (``[partitions.NAME] peers``; None: any accepted peer).
    ``main_ae`` is the one answered for any other called AE title when
    ``accept_any_called_aet`` is on (the listener then serves it from the main archive).
    """

    def __init__(self, settings: DimsePolicySettings, bind_host: str, served: Mapping[str, tuple[str, ...] | None], main_ae: str) -> None:
        self.settings = settings
        self.accept_unknown = settings.accepts_unknown_peers(bind_host)
        self.served = dict(served)
        self.main_ae = main_ae

    @classmethod
    def for_archives(cls, main: Settings, partitions: Mapping[str, Any] | None = None) -> "DimsePolicy":
        """The policy of a listener serving ``main``'s AE title and ``partitions`` (AE title -> Archive)."""
        served: dict[str, tuple[str, ...] | None] = {main.ae_title: main.dimse_policy.own_peers}
        for aet, archive in (partitions or {}).items():
            served[aet] = archive.settings.dimse_policy.own_peers
        return cls(main.dimse_policy, main.host, served, main.ae_title)

    def describe(self) -> str:
        """One line for the start-up log: who will be accepted, so a locked-out site sees why at once."""
        known = len(self.settings.peers)
        who = "any calling AE title" if self.accept_unknown else f"only the {known} AE title(s) in [peers]"
        called = "any called AE title" if self.settings.accept_any_called_aet else "called AE title(s) " + ", ".join(sorted(self.served))
        return f"accepting {who}, {called}"

    def decide(self, caller: Caller) -> Decision:
        called, calling = caller.called_ae.strip(), caller.calling_ae.strip()
        if called in self.served:
            allow_list = self.served[called]
        elif self.settings.accept_any_called_aet:
            allow_list = self.served.get(self.main_ae)
        else:
            return _reject(caller, CALLED_AE_NOT_RECOGNISED, f"called AE title {called!r} not recognised: not served here")
        rights = self.settings.peers.get(calling)
        if rights is not None:
            if rights.hosts is not None and not _from_hosts(caller.address, rights.hosts):
                return _reject(caller, CALLING_AE_NOT_RECOGNISED, f"calling AE title {calling!r} not recognised: called from {caller.address}, outside its hosts")
            if rights.tls_subject is not None and caller.tls_subject != rights.tls_subject:
                got = "no certificate (plain DICOM)" if caller.tls_subject is None else f"certificate {caller.tls_subject!r}"
                return _reject(caller, CALLING_AE_NOT_RECOGNISED, f"calling AE title {calling!r} not recognised: {got}, not its tls_subject")
        elif not self.accept_unknown:
            return _reject(caller, CALLING_AE_NOT_RECOGNISED, f"calling AE title {calling!r} not recognised: not in [peers] (accept_unknown_peers is off)")
        if allow_list is not None and calling not in allow_list:
            return _reject(caller, CALLING_AE_NOT_RECOGNISED, f"calling AE title {calling!r} not recognised: not among the peers of {called!r}")
        return Decision(caller, True, "known peer" if rights is not None else "unknown peer accepted", rights=rights)

    # -- the server's two questions -------------------------------------------------------

    def on_association(self, assoc: Any) -> Decision:
        """Decide for an association whose A-ASSOCIATE-RQ has arrived, and remember it on the association."""
        decision = self.decide(caller_of(assoc))
        assoc.xdsi_policy_decision = decision
        return decision

    def refusal(self, assoc: Any, operation: str) -> str | None:
        """None if the association's peer may do ``operation``; else why not (for Error Comment and the log)."""
        decision: Decision | None = getattr(assoc, "xdsi_policy_decision", None)
        if decision is None:  # not decided at association time (cannot happen with our handlers): decide now
            decision = self.on_association(assoc)
        if decision.allows(operation):
            return None
        reason = f"{decision.caller.calling_ae} is not authorised to {operation}"
        log.warning("DICOM %s from %s (%s) refused (0x%04X): %s", operation, decision.caller.calling_ae, decision.caller.address, NOT_AUTHORIZED, reason)
        return reason


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value or "").strip()


def caller_of(assoc: Any) -> Caller:
    """The :class:`Caller` of an acceptor association whose A-ASSOCIATE-RQ has arrived (pynetdicom objects)."""
    primitive = getattr(assoc.requestor, "primitive", None)
    called = _text(getattr(primitive, "called_ae_title", None))
    calling = _text(getattr(primitive, "calling_ae_title", None) or getattr(assoc.requestor, "ae_title", ""))
    address = _text(getattr(assoc.requestor, "address", ""))
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    return Caller(called, calling, address, certificate_subject(sock))


