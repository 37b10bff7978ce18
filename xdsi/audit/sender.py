"""Delivery of spooled audit messages to the Audit Record Repositories, off the request path.

One thread per repository, so a repository that is down never delays another.  Each
thread sends the spool's messages in order and moves that repository's cursor after
each successful send; on any failure it closes the connection, waits (doubling up to
``max_backoff``) and starts again from the first message not yet taken.

TLS (RFC 5425) carries octet-counted frames on one long-lived connection.  Before each
write we look whether the repository has closed its side (it never sends us data, so
a readable socket means EOF or an alert): writing into a half-closed TCP connection
"succeeds" locally and the message would be lost.  A repository that dies between our
write and its read can still lose the frames in flight; RFC 5425 has no application
acknowledgement to close that window.  UDP (RFC 5426) is fire-and-forget by design:
one datagram per message, and a refusal (ICMP port unreachable) surfaces only on the
next send, so UDP can lose a message per outage — use TLS where loss matters.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import Sequence
from urllib.parse import urlsplit

from xdsi.audit.spool import AuditSpool
from xdsi.audit.syslog import octet_counted

__all__ = ["Repository", "parse_repository", "AuditSender", "MAX_UDP_PAYLOAD"]

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"tls": 6514, "udp": 514}
MAX_UDP_PAYLOAD = 65507  # IPv4 UDP datagram payload limit


@dataclass(frozen=True)
class Repository:
    """One ``[audit] repositories`` entry: ``tls://host:6514`` or ``udp://host:514``."""

    url: str
    scheme: str
    host: str
    port: int


def parse_repository(url: str) -> Repository:
    """Parse and check a repository URL; ValueError says what is wrong with it."""
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS:
        raise ValueError(f"{url!r}: the scheme must be tls:// (RFC 5425) or udp:// (RFC 5426)")
    try:
        port = parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError:
        raise ValueError(f"{url!r}: the port must be a number from 1 to 65535") from None
    if not parts.hostname:
        raise ValueError(f"{url!r} names no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"{url!r}: only scheme://host:port is allowed")
    return Repository(url, parts.scheme, parts.hostname, port)


class AuditSender:
    """The delivery threads: :meth:`start`, :meth:`wake` after a put, :meth:`stop` at shutdown."""

    def __init__(
        self,
        spool: AuditSpool,
        repositories: Sequence[Repository],
        ssl_context: ssl.SSLContext | None = None,
        retry_seconds: float = 1.0,
        max_backoff: float = 30.0,
        timeout: float = 10.0,
    ) -> None:
        self.spool = spool
        self.repositories = tuple(repositories)
        self.ssl_context = ssl_context
        self.retry_seconds = retry_seconds
        self.max_backoff = max_backoff
        self.timeout = timeout
        self._stop = threading.Event()
        self._wake = {r.url: threading.Event() for r in self.repositories}
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for repo in self.repositories:
            t = threading.Thread(target=self._run, args=(repo,), name=f"audit-{repo.url}", daemon=True)
            t.start()
            self._threads.append(t)

    def wake(self) -> None:
        for ev in self._wake.values():
            ev.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the threads; what is not delivered stays in the spool for the next start."""
        self._stop.set()
        self.wake()
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()

    # -- one repository ---------------------------------------------------------------------------------

    def _context(self) -> ssl.SSLContext:
        if self.ssl_context is None:
            ctx = ssl.create_default_context()
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            self.ssl_context = ctx
        return self.ssl_context

    def _connect(self, repo: Repository) -> socket.socket:
        if repo.scheme == "udp":
            info = socket.getaddrinfo(repo.host, repo.port, type=socket.SOCK_DGRAM)[0]
            sock = socket.socket(info[0], socket.SOCK_DGRAM)
            sock.connect(info[4])  # connected: an ICMP refusal is reported on the next send
            return sock
        raw = socket.create_connection((repo.host, repo.port), timeout=self.timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            return self._context().wrap_socket(raw, server_hostname=repo.host)
        except BaseException:
            raw.close()
            raise

    @staticmethod
    def _peer_closed(sock: socket.socket) -> bool:
        """True when a TLS repository has sent EOF, an alert or anything (it is never supposed to talk)."""
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable)

    def _send(self, repo: Repository, sock: socket.socket, body: bytes, seq: int) -> bool:
        """Send one message; False when it can never be sent this way (too large for a datagram)."""
        if repo.scheme == "udp":
            if len(body) > MAX_UDP_PAYLOAD:
                log.error("audit message %d (%d bytes) does not fit a UDP datagram to %s; not sent there", seq, len(body), repo.url)
                return False
            sock.send(body)
            return True
        if self._peer_closed(sock):
            raise ConnectionError("the repository closed the connection")
        sock.sendall(octet_counted(body))
        return True

    def _run(self, repo: Repository) -> None:
        wake = self._wake[repo.url]
        sock: socket.socket | None = None
        backoff = self.retry_seconds
        failing = False
        while not self._stop.is_set():
            batch = self.spool.pending(repo.url)
            if not batch:
                wake.wait(1.0)
                wake.clear()
                continue
            try:
                if sock is None:
                    sock = self._connect(repo)
                for seq, body in batch:
                    if self._stop.is_set():
                        break
                    self._send(repo, sock, body, seq)
                    self.spool.delivered(repo.url, seq)
                if failing:
                    log.warning("audit repository %s answers again", repo.url)
                failing, backoff = False, self.retry_seconds
            except (OSError, ssl.SSLError, ConnectionError) as exc:
                if sock is not None:
                    sock.close()
                    sock = None
                if not failing:
                    log.warning("audit repository %s unreachable (%s); messages wait in the spool", repo.url, exc)
                failing = True
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff)
            except Exception:  # the spool itself failed (disk full, closed at shutdown): say so, keep trying
                if self._stop.is_set():
                    break
                log.exception("audit delivery to %s failed; retrying", repo.url)
                self._stop.wait(self.max_backoff)
        if sock is not None:
            sock.close()
