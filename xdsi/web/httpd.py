"""The HTTP server for ``xdsi serve``: cheroot, a production threaded WSGI server, in-process.

Why not werkzeug's development server: it is documented as unfit for
production.  Why not a pre-fork server (gunicorn's sync worker): it kills a
worker at its timeout, mid-body, and RAD-69 and WADO-RS responses of whole
studies stream for as long as they need.  cheroot runs a thread per request,
sets TCP_NODELAY, and streams iterables with chunked transfer encoding.

What cheroot (11.x) does not do by itself, added here through its extension
points (``ConnectionClass``/``RequestHandlerClass``, ``HeaderReader``,
``process_conn``):

* **Head gate** (slowloris): cheroot hands a new connection to a worker
  thread at once, and the worker blocks reading the request head, so N
  sockets trickling one byte a second hold N of the threads.  Here a
  connection reaches a worker only once its whole request head is in the
  kernel buffer (seen with ``MSG_PEEK``); until then it waits in
  :class:`HeadGate`, one thread waiting in ``poll`` on every pending socket
  (a socket that receives bytes is looked at at once, the others every
  :data:`GATE_POLL`), and is answered 408 and closed when the head is not
  complete within ``header_timeout``.
  Over HTTPS the gate also runs the TLS handshake and then decrypts the head
  itself (ciphertext cannot be peeked), so a peer that completes the handshake
  and says nothing holds no worker either (:meth:`GatedServer.tls_head`).
* **Coalesced output**: small response writes (the head, multipart part
  heads) go out with the next write (:class:`CoalescingWriter`), so over TLS
  they do not each cost a record, a syscall and a client wake-up.
* **Files by sendfile**: a body that is a :class:`~xdsi.wire.regions.RegionBody`
  (WADO-RS instances, RAD-69 documents) has its file ranges sent by
  ``socket.sendfile`` on plain HTTP (:class:`RegionGateway`): no read into
  Python, no chunk join, no copy through the GIL.  Over TLS it is iterated
  as any body.
* **Request smuggling**: a repeated Content-Length, a Content-Length that
  is not a plain decimal, or Content-Length together with Transfer-Encoding
  is refused with 400 and the connection closed (RFC 9112 6.3: such a
  message "ought to be handled as an error"), instead of cheroot's
  last-one-wins.
* **Unread bodies are not drained into memory**: cheroot reads whatever
  body the application left unread with one ``read(remaining)`` to keep the
  connection alive (1,000 MB sent to ``/status`` became 2 GB of RSS); here
  any unread body above :data:`DRAIN_LIMIT` closes the connection instead.
* **Minimum body rate** (slow POST): the head gate only covers the head;
  a client that then trickles its body a few bytes a second holds its worker
  for as long as it likes, since each read waits at most ``io_timeout`` for
  the *next* byte.  Here the body is read through :class:`PacedBody`, which
  gives each socket read a timeout equal to the client's remaining credit
  (``[http] min_body_rate``, ``body_rate_window``); a client below the rate
  gets 408, the connection is closed and the worker freed.  The application
  sees :class:`~xdsi.web.limits.BodyTooSlow` from its ``wsgi.input`` read and
  its usual error path removes any partial STOW or SOAP spool file.

Downloads are deliberately *not* rate-checked: a viewer on a slow link may
legitimately take long to receive a whole study, and a response is written
only as fast as the client reads it.  ``io_timeout`` still drops a client
that stops reading altogether (no progress for that long on one write).
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import threading
import time
from typing import Any, Callable

from cheroot import connections as cheroot_connections
from cheroot import server as cheroot_server
from cheroot import wsgi
from cheroot.ssl.builtin import BuiltinSSLAdapter

from xdsi.config import HttpLimits
from xdsi.security.tls import handshake_failure
from xdsi.web.limits import BodyTooSlow
from xdsi.wire.regions import FileRegion, RegionError

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 64 * 1024
DRAIN_LIMIT = 64 * 1024  # an unread body up to this is drained to keep the connection; above, it is closed
GATE_POLL = 0.05  # seconds between looks at connections whose head is still arriving
ACCEPT_QUEUE = 128  # listen() backlog: connections the kernel holds before cheroot accepts them
COALESCE_BELOW = 16 * 1024  # response writes smaller than this wait for the next (one TLS record's worth of payload)


class StrictHeaderReader(cheroot_server.HeaderReader):
    """cheroot's header reader, refusing the framing ambiguities a proxy in front could read differently."""

    def __call__(self, rfile: Any, hdict: dict[bytes, bytes] | None = None) -> dict[bytes, bytes]:
        counts: dict[bytes, int] = {}
        original = self._transform_key

        def counting(key: bytes) -> bytes:
            k = original(key)
            counts[k] = counts.get(k, 0) + 1
            return k

        self._transform_key = counting  # type: ignore[method-assign]  # this reader belongs to one request
        try:
            hdict = super().__call__(rfile, hdict)
        finally:
            del self._transform_key
        if counts.get(b"Content-Length", 0) > 1:
            raise ValueError("Repeated Content-Length header.")
        if counts.get(b"Transfer-Encoding", 0) and counts.get(b"Content-Length", 0):
            raise ValueError("Content-Length together with Transfer-Encoding.")
        cl = hdict.get(b"Content-Length")
        if cl is not None and not (cl.isdigit() and cl.isascii()):
            raise ValueError("Malformed Content-Length Header.")
        return hdict


class PacedBody:
    """The connection's buffered socket reader, for one request body, with a minimum arrival rate.

    Credit model (a leaky bucket, in seconds): the client starts with
    ``window`` seconds of credit (the grace period); every second spent
    *waiting on the socket* costs one, every byte received earns
    ``1 / rate``, and credit never exceeds ``window`` (a fast start cannot
    buy a long stall later).  Each socket read is given exactly the remaining
    credit as its timeout, so a read that times out *is* a client below the
    rate; no watchdog thread and no per-byte bookkeeping.  A client sending
    at a fraction f of the rate is cut after about ``window / (1 - f)``
    seconds; one at or above the rate never is.  Time the application spends
    between reads (parsing, writing the spool) is not charged to the client.

    Only ``read``, ``readline`` and ``close`` are used by cheroot's
    ``KnownLengthRFile``/``ChunkedRFile``; each reads with ``read1``/``peek``
    (one ``recv`` at a time) so no single call waits for more than one
    socket read's worth of data.
    """

    def __init__(self, stream: Any, sock: socket.socket, rate: int, window: float, io_timeout: float) -> None:
        self.stream = stream
        self.sock = sock
        self.rate = float(rate)
        self.window = window
        self.io_timeout = io_timeout
        self.credit = window
        self.tripped = False
        self.received = 0

    def _wait(self, fn: Callable[[], bytes]) -> bytes:
        """One buffered-or-socket read ``fn``, within the client's credit; charges the time it waited."""
        if self.tripped:
            raise BodyTooSlow(self._reason())
        budget = min(self.credit, self.io_timeout)
        t0 = time.monotonic()
        self.sock.settimeout(max(budget, 0.001))
        try:
            data = fn()
        except TimeoutError:
            if self.credit >= self.io_timeout:
                raise  # the plain io_timeout, as before this class existed
            self.tripped = True
            raise BodyTooSlow(self._reason()) from None
        finally:
            try:
                self.sock.settimeout(self.io_timeout)  # the response is written under io_timeout only
            except OSError:
                pass
        self.credit -= time.monotonic() - t0
        return data

    def _earn(self, n: int) -> None:
        self.received += n
        self.credit = min(self.window, self.credit + n / self.rate)

    def _reason(self) -> str:
        return f"request body arrived slower than {int(self.rate)} bytes/s ({self.received} bytes received); closing the connection"

    def read(self, size: int | None = -1) -> bytes:
        out = bytearray()
        while size is None or size < 0 or len(out) < size:
            want = 64 * 1024 if size is None or size < 0 else size - len(out)
            chunk = self._wait(lambda: self.stream.read1(want))
            if not chunk:
                break
            self._earn(len(chunk))
            out += chunk
        return bytes(out)

    def readline(self, size: int | None = -1) -> bytes:
        out = bytearray()
        while size is None or size < 0 or len(out) < size:
            buf = self._wait(lambda: self.stream.peek(1))  # what is buffered, or one socket read
            if not buf:
                break
            limit = len(buf) if size is None or size < 0 else min(len(buf), size - len(out))
            i = buf.find(b"\n", 0, limit)
            take = i + 1 if i >= 0 else limit
            data = self.stream.read(take)  # already buffered: does not block
            self._earn(len(data))
            out += data
            if i >= 0:
                break
        return bytes(out)

    def close(self) -> None:
        self.stream.close()


class CoalescingWriter:
    """The connection's output for one response: small writes wait to go out with the next one.

    Why: cheroot writes the response head, then every WSGI chunk, each with its own ``send``; a
    RAD-69 or WADO-RS multipart body alternates a part head of ~200 bytes with the instance.  Over
    TLS each ``send`` is at least one TLS record, so every small write became a record of its own
    (its own encryption, its own syscall, and on the client its own two ``recv`` calls for header
    and body: OpenSSL reads records without read-ahead) and the client woke once per record.
    Writes below :data:`COALESCE_BELOW` are held and sent in front of the next write, so a part
    head shares its record with the instance bytes.  Nothing is held past the end of the response:
    :meth:`GuardedRequest.respond` flushes.  This also writes from a ``memoryview`` with ``send``
    instead of cheroot's pure-Python buffered writer, which copied every chunk twice
    (``bytearray.extend`` and ``bytes(...)``).  Each ``send`` waits at most ``io_timeout`` for
    progress, as cheroot's writer did, so a client that stops reading is still dropped.
    """

    def __init__(self, raw: Any, sock: Any) -> None:
        self.raw = raw  # cheroot's StreamWriter: kept for its byte count and for writes after the response
        self.sock = sock
        self._held = bytearray()

    def write(self, data: bytes) -> int:
        n = len(data)
        if len(self._held) + n < COALESCE_BELOW:
            self._held += data
            return n
        if self._held:
            self._held += data
            data, self._held = self._held, bytearray()  # type: ignore[assignment]
        self._send(data)
        return n

    def flush(self) -> None:
        if self._held:
            data, self._held = self._held, bytearray()
            self._send(data)

    def _send(self, data: bytes | bytearray, flags: int = 0) -> None:
        view = memoryview(data)
        total = len(view)
        sent = 0
        while sent < total:
            sent += self.sock.send(view[sent:], flags) if flags else self.sock.send(view[sent:])
        self.raw.bytes_written += total

    def send_region(self, region: FileRegion) -> None:
        """``region`` straight from the page cache to the socket (``sendfile``), after what is held.

        The held bytes (a part head, the response head) go out with ``MSG_MORE``, so the kernel
        puts them in the same segment as the file's first bytes instead of a packet of their own.
        ``socket.sendfile`` waits at most the socket's timeout for progress, like :meth:`_send`.
        """
        if self._held:
            data, self._held = self._held, bytearray()
            self._send(data, socket.MSG_MORE)
        with open(region.path, "rb") as fh:
            sent = self.sock.sendfile(fh, region.offset, region.length) if region.length else 0
        self.raw.bytes_written += sent
        if sent != region.length:
            raise RegionError(f"{region.path}: {sent} of {region.length} bytes sent from offset {region.offset} (file shorter than announced)")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


class GuardedRequest(cheroot_server.HTTPRequest):
    pacer: PacedBody | None = None

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.header_reader = StrictHeaderReader()  # per request: it counts headers while reading

    def respond(self) -> None:
        """cheroot's respond, its output through :class:`CoalescingWriter`, and the body (if any) read through :class:`PacedBody`."""
        raw_out = self.conn.wfile
        writer = CoalescingWriter(raw_out, self.conn.socket)
        self.conn.wfile = writer  # cheroot writes the head, every body chunk and the last chunk through conn.wfile
        done = False
        try:
            self._respond_paced()
            done = True
        finally:
            self.conn.wfile = raw_out  # error answers cheroot writes after an exception go straight out
            try:
                writer.flush()
            except OSError:
                if done:
                    raise  # a failure of its own: cheroot closes the connection as for any write error
                # else the exception already on its way says what went wrong

    def _respond_paced(self) -> None:
        limits: HttpLimits = self.server.limits
        has_body = self.chunked_read or self.inheaders.get(b"Content-Length", b"0") not in (b"0", b"")
        if not (limits.min_body_rate and has_body):
            super().respond()
            return
        raw = self.conn.rfile
        self.pacer = PacedBody(raw, self.conn.socket, limits.min_body_rate, limits.body_rate_window, self.server.timeout)
        self.conn.rfile = self.pacer  # only respond() builds the body reader from conn.rfile
        try:
            super().respond()
        finally:
            self.conn.rfile = raw

    def send_headers(self) -> None:
        if self.pacer is not None and self.pacer.tripped:
            # whatever the adapter made of BodyTooSlow (a SOAP Sender fault, a 400), the answer is 408 and the end
            self.status = b"408 Request Timeout"
            self.close_connection = True
            self.conn.body_too_slow = True
        if not self.close_connection:
            if self.chunked_read:
                # cheroot never drains a chunked body: what the application left would be parsed as the next request
                if not getattr(self.rfile, "closed", False):
                    self.close_connection = True
            elif getattr(self.rfile, "remaining", 0) > DRAIN_LIMIT:
                self.close_connection = True
        super().send_headers()


class RegionGateway(wsgi.Gateway_10):
    """cheroot's WSGI 1.0 gateway, sending the file ranges of a :class:`~xdsi.wire.regions.RegionBody` with ``sendfile``.

    Only on plain HTTP: over TLS the bytes must pass through OpenSSL anyway, so the body is
    iterated as any WSGI body (its file ranges read in 256 KiB pieces).  Chunked framing, when the
    application gave no Content-Length, is written around each range; the declared
    Content-Length is enforced as cheroot enforces it for ordinary chunks.
    """

    def respond(self) -> None:
        response = self.req.server.wsgi_app(self.env, self.start_response)
        regions = getattr(response, "regions", None)
        writer = self.req.conn.wfile
        if regions is None or isinstance(self.req.conn.socket, ssl.SSLSocket) or not isinstance(writer, CoalescingWriter):
            self._respond_with(response, iter(response))
            return
        self._respond_with(response, regions())

    def _respond_with(self, response: Any, items: Any) -> None:
        try:
            for item in items:
                if isinstance(item, FileRegion):
                    self._send_region(item)
                elif item:
                    if not isinstance(item, bytes):
                        raise ValueError("WSGI Applications must yield bytes")
                    self.write(item)
        finally:
            self.req.ensure_headers_sent()
            if hasattr(response, "close"):
                response.close()

    def _send_region(self, region: FileRegion) -> None:
        if not self.started_response:
            raise RuntimeError("WSGI write called before start_response.")
        rbo = self.remaining_bytes_out
        if rbo is not None and region.length > rbo:
            raise ValueError("Response body exceeds the declared Content-Length.")
        self.req.ensure_headers_sent()
        if region.length:
            writer = self.req.conn.wfile
            if self.req.chunked_write:
                writer.write(f"{region.length:x}\r\n".encode("ascii"))
            writer.send_region(region)
            if self.req.chunked_write:
                writer.write(b"\r\n")
        if rbo is not None:
            self.remaining_bytes_out = rbo - region.length
        if region.after is not None:
            region.after()


class GuardedConnection(cheroot_server.HTTPConnection):
    RequestHandlerClass = GuardedRequest
    head_since: float | None = None  # monotonic time the head gate began waiting for this connection's head
    body_too_slow = False  # a request body below min_body_rate: closed after its 408

    def close(self) -> None:
        if self.body_too_slow:
            _discard_pending(self.socket)
        super().close()


def _discard_pending(sock: socket.socket) -> None:
    """Read (without waiting) what the client already sent, so closing sends FIN rather than RST and the 408 arrives."""
    try:
        sock.setblocking(False)
        for _ in range(16):
            if not sock.recv(64 * 1024):
                break
    except OSError:
        pass


class HeadGate(threading.Thread):
    """Holds connections whose request head is incomplete, so they wait without a worker thread.

    Why it waits in ``epoll`` and not only on a timer (issue 14): most clients send their request the
    moment the TCP handshake completes, and cheroot accepts at that moment too, so the head is often a
    few microseconds short when :meth:`GatedServer.process_conn` looks; such a connection waited here
    for the next look, 25 ms on average with a 50 ms period: the first byte of a WADO-RS study came
    8-30 ms after the request (Orthanc: 5-6 ms).  Now bytes arriving on a pending socket end the wait
    at once.  Edge-triggered: a socket holding part of a head (peeked, not consumed, so it stays
    readable) wakes the gate again only when more bytes arrive, not in a busy loop.  The timer still
    ends the wait every :data:`GATE_POLL`, for the header timeout and for TLS records already
    decrypted into the socket's buffer.
    """

    def __init__(self, server: "GatedServer") -> None:
        super().__init__(name="http-head-gate", daemon=True)
        self.server = server
        self._pending: list[GuardedConnection] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._epoll.register(self._wake_r.fileno(), select.EPOLLIN)

    def add(self, conn: GuardedConnection) -> None:
        with self._lock:
            self._pending.append(conn)
            try:  # reported at once if bytes are already there, then again only when more arrive
                self._epoll.register(conn.socket.fileno(), select.EPOLLIN | select.EPOLLET)
            except (OSError, ValueError, AttributeError):
                pass  # closed already, or registered: the timer looks at it

    def _release(self, conn: GuardedConnection) -> None:
        """Leaving the gate (to a worker, or closed): its descriptor is no longer watched (it may be reused)."""
        try:
            self._epoll.unregister(conn.socket.fileno())
        except (OSError, ValueError, AttributeError):
            pass

    def _poke(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # full of pokes already, or closed at stop
            pass

    def _wait(self) -> None:
        """Until bytes arrive on a pending socket, :meth:`stop` is called, or :data:`GATE_POLL` has passed."""
        try:
            self._epoll.poll(GATE_POLL)
        except OSError:
            time.sleep(GATE_POLL)
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def run(self) -> None:
        try:
            self._serve()
        finally:
            self._epoll.close()
            self._wake_r.close()
            self._wake_w.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            self._wait()
            if self._stop.is_set():
                break
            with self._lock:
                pending, self._pending = self._pending, []
            keep: list[GuardedConnection] = []
            now = time.monotonic()
            for conn in pending:
                state = self.server.head_state(conn)
                if state == "waiting" and now - (conn.head_since or now) <= self.server.limits.header_timeout:
                    keep.append(conn)
                    continue
                self._release(conn)
                if state == "failed":
                    _close(conn)
                elif state != "waiting":
                    self.server.to_worker(conn)
                elif isinstance(conn.socket, ssl.SSLSocket) and not getattr(conn, "tls_done", False):
                    log.warning("HTTPS: TLS handshake with %s not completed in time; closed", _peer(conn.socket))
                    _close(conn)  # no TLS session to carry a 408
                else:
                    _refuse(conn, b"408 Request Timeout", b"request head not received in time\n")
            with self._lock:
                self._pending.extend(keep)

    def stop(self) -> None:
        self._stop.set()
        self._poke()
        with self._lock:
            pending, self._pending = self._pending, []
        for conn in pending:
            self._release(conn)
            _close(conn)


def _refuse(conn: Any, status: bytes, text: bytes) -> None:
    try:
        conn.socket.setblocking(False)
        conn.socket.send(
            b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain\r\nContent-Length: " + str(len(text)).encode() + b"\r\nConnection: close\r\n\r\n" + text
        )
    except OSError:
        pass
    _close(conn)


def tls_environ(sock: ssl.SSLSocket) -> dict[str, str]:
    """mod_ssl's names for the session, so the application (and its audit records) know who the peer is."""
    env = {"SSL_PROTOCOL": sock.version() or "", "SSL_CIPHER": (sock.cipher() or ("",))[0]}
    der = sock.getpeercert(binary_form=True)
    if der:
        from cryptography import x509

        env["SSL_CLIENT_VERIFY"] = "SUCCESS"  # the context verified it, or the handshake would have failed
        env["SSL_CLIENT_S_DN"] = x509.load_der_x509_certificate(der).subject.rfc4514_string()
    else:
        env["SSL_CLIENT_VERIFY"] = "NONE"
    return env


def _peer(sock: Any) -> str:
    try:
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "(peer gone)"


def _close(conn: Any) -> None:
    try:
        conn.socket.close()
    except OSError:
        pass


class GatedServer(wsgi.Server):
    """cheroot's WSGI server with the head gate in front of its worker queue."""

    ConnectionClass = GuardedConnection
    limits: HttpLimits
    on_tls_refused: Callable[[str, str, str], None] | None = None  # (interface, peer address, reason)

    def head_state(self, conn: Any) -> str:
        """"ready" (a complete head, or something a worker should answer: EOF, an oversized head), or "waiting"."""
        sock = conn.socket
        if isinstance(sock, ssl.SSLSocket):
            return self.tls_state(conn)
        try:
            if conn.rfile.has_data():
                return "ready"  # pipelined: the next request is already in our buffer
        except (AttributeError, ValueError):
            return "ready"
        try:
            sock.settimeout(0)  # with a timeout set, Python waits for data even under MSG_DONTWAIT
            try:
                data = sock.recv(MAX_HEADER_BYTES + 4, socket.MSG_PEEK)
            finally:
                sock.settimeout(self.timeout)
        except (BlockingIOError, InterruptedError):
            return "waiting"
        except OSError:
            return "ready"  # the worker meets the same error and closes the connection
        if not data or b"\r\n\r\n" in data or len(data) > MAX_HEADER_BYTES:
            return "ready"
        return "waiting"

    def tls_state(self, conn: Any) -> str:
        """The TLS handshake, then the request head, each one non-blocking step at a time, in the head gate.

        cheroot's builtin adapter completes the handshake inside ``accept``: one peer that connects and
        says nothing held every other HTTPS client for ``io_timeout`` (measured).  Here the handshake
        advances whenever the gate looks, is bounded by ``header_timeout`` like a request head, and a
        refused one is logged with the peer address and OpenSSL's reason.  Once it is done, the head is
        awaited here too (:meth:`tls_head`): a peer that completes the handshake and then sends nothing,
        or trickles its head, waits without a worker and is answered 408 at ``header_timeout``, as over HTTP.
        """
        if not getattr(conn, "tls_done", False):
            sock = conn.socket
            try:
                sock.settimeout(0)
                sock.do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return "waiting"
            except (ssl.SSLError, OSError) as exc:
                reason = handshake_failure(exc)
                log.warning("HTTPS: TLS handshake with %s refused: %s", _peer(sock), reason)
                if self.on_tls_refused is not None:  # the Security Alert audit, when [audit] is on
                    self.on_tls_refused("HTTPS", _peer(sock).rsplit(":", 1)[0], reason)
                return "failed"
            finally:
                try:
                    sock.settimeout(self.timeout)
                except OSError:
                    pass
            conn.tls_done = True
            conn.ssl_env = {**(conn.ssl_env or {}), **tls_environ(sock)}  # cheroot copies it into every request's environ
        return self.tls_head(conn)

    def tls_head(self, conn: Any) -> str:
        """Whether a whole request head has arrived over TLS, decrypting (without waiting) what the peer sent.

        TLS records cannot be peeked in the kernel as plain HTTP heads are (``MSG_PEEK`` would see
        ciphertext), so the gate reads the plaintext itself and keeps it in the connection's read
        buffer, where cheroot's request parser finds it first.  ``conn.rfile`` is cheroot's
        ``StreamReader``, a ``_pyio.BufferedReader``: its buffer is ``_read_buf``/``_read_pos``, the same
        fields cheroot's own ``has_data`` reads.  Bytes past the head (a body sent with it) stay there too.
        """
        rfile = conn.rfile
        try:
            held = rfile._read_buf[rfile._read_pos :]
        except AttributeError:  # not the reader we know: let a worker read the head as cheroot does
            return "ready"
        if b"\r\n\r\n" in held or len(held) > MAX_HEADER_BYTES:
            return "ready"
        sock = conn.socket
        got = bytearray(held)
        state = "waiting"
        try:
            sock.settimeout(0)
            while True:
                data = sock.recv(MAX_HEADER_BYTES + 4)  # at most one TLS record's plaintext per call
                if not data:
                    state = "ready"  # close_notify or EOF: the worker sees it and closes quietly
                    break
                got += data
                if b"\r\n\r\n" in got or len(got) > MAX_HEADER_BYTES:
                    state = "ready"
                    break
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError, InterruptedError):
            pass
        except (ssl.SSLError, OSError):
            state = "failed"  # a broken session (bad record, reset): closed here, no worker needed to find that out
        finally:
            try:
                sock.settimeout(self.timeout)
            except OSError:
                pass
        if len(got) != len(held):
            rfile._read_buf, rfile._read_pos = bytes(got), 0
        return state

    adopted: socket.socket | None = None  # a listener bound by the supervisor (``xdsi serve --workers N``)

    def prepare(self) -> None:
        """cheroot's ``prepare``, or, for an adopted listener, its tail without the bind.

        The supervisor bound the socket once and every worker inherited it, so the kernel queues
        each connection once and whichever worker accepts first serves it.  The socket is made
        non-blocking (a flag every worker shares on the one open socket): the workers that lose
        the race get EAGAIN, which cheroot ignores, instead of blocking their selector loop in
        ``accept`` for a second.
        """
        if self.adopted is None:
            super().prepare()
            return
        self._interrupt = None
        if self.software is None:
            self.software = f"{self.version} Server"
        self.socket = self.adopted
        self.socket.settimeout(0.0)
        self.bind_addr = self.socket.getsockname()[:2]
        self._connections = cheroot_connections.ConnectionManager(self)
        self.requests.start()
        self.ready = True
        self._start_time = time.time()

    def process_conn(self, conn: Any) -> None:
        state = self.head_state(conn)
        if state == "failed":
            _close(conn)
            return
        if state == "ready":
            self.to_worker(conn)
            return
        conn.head_since = time.monotonic()
        self.gate.add(conn)

    def to_worker(self, conn: Any) -> None:
        conn.head_since = None
        super().process_conn(conn)


class _ContextAdapter(BuiltinSSLAdapter):
    """cheroot's builtin TLS adapter around a context built by :mod:`xdsi.security.tls` (not its own defaults)."""

    def __init__(self, context: ssl.SSLContext) -> None:  # noqa: D107 - the base reads certificate files we already loaded
        self._ssl_context = context
        self.certificate = self.private_key = self.certificate_chain = None  # type: ignore[assignment]
        self.ciphers = None
        self._server_env = {}  # filled per connection by get_environ
        self.context = context

    def wrap(self, sock: Any) -> tuple[Any, dict[str, Any]]:  # type: ignore[override]
        """Wrap without the handshake: :meth:`GatedServer.tls_state` completes it off the accept loop."""
        return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), self.get_environ(sock)

    def get_environ(self, sock: Any) -> dict[str, Any]:  # type: ignore[override]
        # called by cheroot before the handshake, so nothing of the session (peer certificate) is known yet
        return {"wsgi.url_scheme": "https", "HTTPS": "on"}


class HttpServer:
    def __init__(
        self,
        host: str,
        port: int,
        app: Callable[..., Any],
        limits: HttpLimits | None = None,
        ssl_context: ssl.SSLContext | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        """``sock``: an already bound and listening socket to serve instead of binding ``host:port``."""
        s = limits or HttpLimits()
        self.server = GatedServer(
            (host, port), app, numthreads=s.threads, server_name=host, request_queue_size=ACCEPT_QUEUE, timeout=s.io_timeout, shutdown_timeout=5
        )
        self.server.limits = s
        self.server.gateway = RegionGateway  # file ranges of a RegionBody go out by sendfile (plain HTTP)
        self.server.adopted = sock
        self.server.gate = HeadGate(self.server)
        # body limits are per endpoint, in the application (xdsi.web.limits): STOW-RS and MTOM bodies stream to disk
        self.server.max_request_body_size = 0
        self.server.max_request_header_size = MAX_HEADER_BYTES
        if ssl_context is not None:
            self.server.ssl_adapter = _ContextAdapter(ssl_context)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.server.prepare()  # binds now, so a busy port fails at start, not later in a thread
        self.server.gate.start()
        self._thread = threading.Thread(target=self.server.serve, name="http", daemon=True)
        self._thread.start()

    @property
    def server_port(self) -> int:
        return int(self.server.bind_addr[1])

    def shutdown(self) -> None:
        self.server.gate.stop()
        self.server.stop()
        if self._thread is not None:
            self._thread.join(timeout=10)
