"""Associations we open to a remote archive (``[remotes.NAME]``): C-FIND, C-MOVE and C-GET as the SCU.

One :class:`RemoteClient` per remote and process.  It bounds how many associations we hold open to the
remote at once (``max_associations``: a PACS counts its associations, and a busy gateway must not take
all of them), applies the remote's timeouts, switches Nagle off (the remote is often dcmtk, whose
exchanges stall ~40 ms per round trip with Nagle on), and uses TLS with our ``[tls]`` certificate when
``tls = true``.  Message IDs are unique per process, so an instance a remote sends back for a C-MOVE
can be matched to the request by its Move Originator Message ID (PS3.7 9.1.1.1).
"""

from __future__ import annotations

import itertools
import logging
import socket
import ssl
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from pynetdicom import AE, evt
from pynetdicom.presentation import PresentationContext, build_context, build_role
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from xdsi.config import RemoteSettings, Settings
from xdsi.dimse import reactor_pause

log = logging.getLogger(__name__)

QR_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]

_ids = itertools.count(1)
_ids_lock = threading.Lock()


def next_message_id() -> int:
    """A Message ID no other request of this process uses right now (1..65535, wrapping)."""
    with _ids_lock:
        return (next(_ids) - 1) % 65535 + 1


class RemoteUnavailable(ConnectionError):
    """The remote did not take the association (unreachable, rejected, or it timed out)."""


def _nodelay(event: Any) -> None:
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    try:
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:  # pragma: no cover - closed already
        pass


class RemoteClient:
    """Opens associations to one remote archive, at most ``max_associations`` at a time."""

    def __init__(self, remote: RemoteSettings, settings: Settings, tls_context: Callable[[], ssl.SSLContext] | None = None) -> None:
        self.remote = remote
        self.calling_ae = settings.ae_title
        self.move_destination = remote.move_destination or settings.ae_title  # our AE title as the remote knows it
        self.max_pdu = settings.dimse_limits.max_pdu_size
        self._slots = threading.BoundedSemaphore(remote.max_associations)
        self._tls_context = tls_context

    def __repr__(self) -> str:
        r = self.remote
        return f"remote {r.name} ({r.ae_title}@{r.host}:{r.port})"

    @contextmanager
    def association(
        self,
        contexts: Sequence[PresentationContext],
        *,
        scp_roles: Sequence[str] = (),
        handlers: Sequence[tuple[Any, Any]] = (),
        slot_timeout: float | None = None,
    ) -> Iterator[Any]:
        """An established association with the remote for the block, released (or aborted) after it.

        ``scp_roles``: storage SOP classes we take the SCP role for (C-GET sub-operations).
        Raises :class:`RemoteUnavailable` when no slot frees in ``slot_timeout`` (default the
        remote's ``timeout``) or the remote does not accept.
        """
        r = self.remote
        if not self._slots.acquire(timeout=r.timeout if slot_timeout is None else slot_timeout):
            raise RemoteUnavailable(f"{self!r}: all {r.max_associations} associations busy")
        try:
            ae = AE(ae_title=self.calling_ae)
            ae.acse_timeout = r.connect_timeout
            ae.connection_timeout = r.connect_timeout
            ae.dimse_timeout = r.timeout
            ae.network_timeout = r.timeout
            ae.maximum_pdu_size = self.max_pdu
            ext_neg = [build_role(uid, scp_role=True) for uid in dict.fromkeys(scp_roles)]
            kwargs: dict[str, Any] = {}
            if r.tls and self._tls_context is not None:
                kwargs["tls_args"] = (self._tls_context(), r.host)
            assoc = ae.associate(
                r.host, r.port, contexts=list(contexts), ae_title=r.ae_title, ext_neg=ext_neg or None,
                evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay), *handlers], **kwargs,
            )
            reactor_pause.install(assoc)  # pynetdicom's pause before a send made reliable
            if not assoc.is_established:
                why = "rejected the association" if assoc.is_rejected else "could not be reached or aborted"
                raise RemoteUnavailable(f"{self!r} {why}")
            try:
                yield assoc
            finally:
                if assoc.is_established:
                    assoc.release()
                else:
                    assoc.abort()
        finally:
            self._slots.release()


def qr_contexts(*models: str) -> list[PresentationContext]:
    return [build_context(m, QR_SYNTAXES) for m in models]


class Remotes:
    """The process's clients, one per ``[remotes.NAME]``, built lazily."""

    def __init__(self, settings: Settings, tls_context: Callable[[], ssl.SSLContext] | None = None) -> None:
        self.settings = settings
        self._tls_context = tls_context
        self._clients: dict[str, RemoteClient] = {}
        self._lock = threading.Lock()

    def client(self, name: str) -> RemoteClient:
        with self._lock:
            c = self._clients.get(name)
            if c is None:
                c = self._clients[name] = RemoteClient(self.settings.remotes[name], self.settings, self._tls_context)
            return c


def probe(remote: RemoteSettings, settings: Settings, timeout: float = 3.0,
          tls_context: Callable[[], ssl.SSLContext] | None = None) -> tuple[str, float]:
    """Is the remote there (``xdsi status``)?  ("reachable" | "refused" | "timed out" | why not, milliseconds).

    A TCP connect first, so that "nothing listens" (refused) and "no answer" (timed out: a firewall, a
    host down) are told apart, which pynetdicom's failed association does not; then A-ASSOCIATE and a
    C-ECHO with the same short timeout, as the gateway would call it (our AE title, TLS when set).
    """
    import time
    from dataclasses import replace

    from pynetdicom.sop_class import Verification

    t0 = time.monotonic()
    ms = lambda: (time.monotonic() - t0) * 1000  # noqa: E731
    try:
        socket.create_connection((remote.host, remote.port), timeout=timeout).close()
    except ConnectionRefusedError:
        return "refused", ms()
    except (socket.timeout, TimeoutError):
        return "timed out", ms()
    except OSError as exc:
        return f"unreachable ({exc.strerror or exc.__class__.__name__})", ms()
    client = RemoteClient(replace(remote, connect_timeout=timeout, timeout=timeout, max_associations=1), settings, tls_context)
    t0 = time.monotonic()
    try:
        with client.association([build_context(Verification)]) as assoc:
            if not any(str(cx.abstract_syntax) == Verification for cx in assoc.accepted_contexts):
                return "reachable (association accepted; C-ECHO not offered)", ms()
            st = assoc.send_c_echo()
            code = getattr(st, "Status", None)
            if code is None:
                return "timed out (no C-ECHO response)", ms()
            return ("reachable" if code == 0 else f"C-ECHO status 0x{code:04X}"), ms()
    except RemoteUnavailable as exc:
        return ("association rejected" if "rejected" in str(exc) else "association failed (aborted or timed out)"), ms()
    except (OSError, ssl.SSLError) as exc:
        return f"unreachable ({exc.__class__.__name__})", ms()
