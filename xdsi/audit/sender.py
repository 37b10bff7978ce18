"""Delivery of spooled audit messages to the Audit Record Repositories, off the request path.

One thread per repository, so a repository that is down never delays another.  Each
thread sends the spool's messages in order and moves that repository's cursor after
each message the repository has taken; on any failure it closes the connection, waits
(doubling up to ``max_backoff``) and starts again from the first message not yet taken.

TLS (RFC 5425) carries octet-counted frames on one long-lived connection.  Before each
write we look whether the repository has closed its side (it never sends us data, so
a readable socket means EOF or an alert): writing into a half-closed TCP connection
"succeeds" locally and the message would be lost.

"Taken" on TLS means acknowledged by the repository host's TCP stack, not merely written:
a repository stopped during a burst used to lose the message written at that moment (2 of
10 runs of the experiment in tests/integration/test_audit_rsyslog.py: our write succeeded
into a connection whose peer had just closed, the peer answered with a reset, and the
cursor had already moved).  So the cursor moves only when ``tcpi_bytes_acked`` (Linux
TCP_INFO) passes the last byte of the message; anything written but not acknowledged when
the connection fails is sent again on the next one.  Measured with bench/audit_outage.py
(12 stops mid-burst against rsyslog with a direct queue, unloaded): 5 runs lost a message
before, none after.  It is a bench, not a test, because under load rsyslog itself
occasionally drops a message it had read while stopping (about 1 run in 5), and counting
an orderly FIN as "everything read" made that worse: rsyslog closes cleanly after
dropping.  What remains is
what RFC 5425 cannot close (it has no application acknowledgement): bytes acknowledged by
the repository's kernel that its process never read or dropped from its own queue on the
way down (rsyslog's default in-memory main queue does: the test repository runs a direct
queue), and a message read just before the repository stopped whose acknowledgement was
still delayed, which is sent again (at least once, never silently lost on our side).  On systems without
TCP_INFO a written message counts as taken, as before.  UDP (RFC 5426) is fire-and-forget by design:
one datagram per message, and a refusal (ICMP port unreachable) surfaces only on the
next send, so UDP can lose a message per outage — use TLS where loss matters.
"""

from __future__ import annotations

import collections
import fcntl
import logging
import select
import socket
import ssl
import struct
import termios
import threading
import time
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


_TCP_INFO = getattr(socket, "TCP_INFO", None)
_BYTES_ACKED_AT = 120  # offset of the u64 tcpi_bytes_acked in Linux's struct tcp_info (Linux 4.1 and later)


class _Acknowledgements:
    """Which messages written on one TCP connection the peer's TCP stack has acknowledged.

    After each message we note the byte position the connection's stream has reached
    (bytes acknowledged so far plus the kernel's unacknowledged send queue); the message
    is taken once ``tcpi_bytes_acked`` reaches that position.
    """

    def __init__(self, raw: socket.socket) -> None:
        self.raw = raw
        self.waiting: collections.deque[tuple[int, int]] = collections.deque()  # (seq, stream position)
        self.progress = time.monotonic()  # when the peer last acknowledged something (or we began waiting)

    @classmethod
    def of(cls, sock: socket.socket) -> "_Acknowledgements | None":
        if _TCP_INFO is None or sock.type != socket.SOCK_STREAM:
            return None
        tracker = cls(sock)
        try:
            tracker._acked()
            tracker._unacknowledged()
        except (OSError, struct.error):
            return None
        return tracker

    def _acked(self) -> int:
        info = self.raw.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 256)
        return int(struct.unpack_from("=Q", info, _BYTES_ACKED_AT)[0])

    def _unacknowledged(self) -> int:
        return int(struct.unpack("i", fcntl.ioctl(self.raw.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0])

    def written(self, seq: int) -> None:
        for _ in range(8):  # an ACK arriving between the two reads would skew the sum: read until stable
            queued = self._unacknowledged()
            acked = self._acked()
            if self._unacknowledged() == queued:
                break
        if not self.waiting:
            self.progress = time.monotonic()
        self.waiting.append((seq, acked + queued))

    def taken(self) -> int | None:
        """The highest sequence number now acknowledged, if any became so since the last call."""
        if not self.waiting:
            return None
        acked = self._acked()
        top = None
        while self.waiting and self.waiting[0][1] <= acked:
            top = self.waiting.popleft()[0]
        if top is not None:
            self.progress = time.monotonic()
        return top


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
        acks: _Acknowledgements | None = None
        sent_upto = 0  # the last message written on this connection (taken or still unacknowledged)
        backoff = self.retry_seconds
        failing = False
        while not self._stop.is_set():
            try:
                if acks is not None and acks.waiting:
                    self._take(repo, sock, acks)
                batch = [(seq, body) for seq, body in self.spool.pending(repo.url) if seq > sent_upto]
                if not batch:
                    if acks is not None and acks.waiting:
                        self._stop.wait(0.005)  # acknowledgements come within a round trip
                    else:
                        wake.wait(1.0)
                        wake.clear()
                    continue
                if sock is None:
                    sock = self._connect(repo)
                    acks = _Acknowledgements.of(sock)
                for seq, body in batch:
                    if self._stop.is_set():
                        break
                    self._send(repo, sock, body, seq)
                    sent_upto = seq
                    if acks is None:
                        self.spool.delivered(repo.url, seq)
                    else:
                        acks.written(seq)
                        self._take(repo, sock, acks)
                if failing:
                    log.warning("audit repository %s answers again", repo.url)
                failing, backoff = False, self.retry_seconds
            except (OSError, ssl.SSLError, ConnectionError) as exc:
                if sock is not None:
                    sock.close()
                sock, acks, sent_upto = None, None, 0  # what was not acknowledged goes again on the next connection
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

    def _take(self, repo: Repository, sock: socket.socket | None, acks: _Acknowledgements) -> None:
        """Move the cursor past what the repository acknowledged; a peer that went away or stopped
        acknowledging for ``timeout`` seconds fails the connection (its unacknowledged messages go again)."""
        top = acks.taken()
        if top is not None:
            self.spool.delivered(repo.url, top)
        if not acks.waiting:
            return
        if sock is not None and self._peer_closed(sock):
            raise ConnectionError("the repository closed the connection before acknowledging every message")
        if time.monotonic() - acks.progress > self.timeout:
            raise ConnectionError(f"no TCP acknowledgement from the repository for {self.timeout:.0f} s")
