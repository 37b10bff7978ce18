"""Issue 12, HTTPS side of the head gate: after the TLS handshake the request head is awaited off the workers.

A peer that completes the handshake and then sends nothing (or trickles its head) used to go to a
worker thread at once, which then waited up to ``io_timeout`` (300 s by default) for the head: a few
such peers held every worker and the HTTPS service stopped answering.  These tests run a real
``xdsi serve`` with few workers and a short ``header_timeout`` and check that idle and slow TLS peers
hold none of them, are answered 408 at ``header_timeout``, and that requests whose head arrives in
pieces, together with a body, pipelined or after a keep-alive pause are still served (the gate reads
the plaintext itself and hands it to cheroot's parser).
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from typing import Iterator

import pytest
import requests

from tests.support.objects import secondary_capture
from tests.support.pki import Issued, TestCA, standard_pki
from tests.support.server import XdsiProcess, free_port
from xdsi.config import TlsSettings
from xdsi.security.tls import client_context

THREADS = 4
HEADER_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    return standard_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, pki: dict[str, object]) -> Iterator[XdsiProcess]:
    d = tmp_path_factory.mktemp("https-gate")
    srv: Issued = pki["server"]  # type: ignore[assignment]
    ca: TestCA = pki["ca"]  # type: ignore[assignment]
    proc = XdsiProcess(d / "data", config=d / "xdsi.toml")
    proc.https_port = free_port()  # type: ignore[attr-defined]
    (d / "xdsi.toml").write_text(
        f"[server]\nhttps_port = {proc.https_port}\n"  # type: ignore[attr-defined]
        f"[http]\nthreads = {THREADS}\nheader_timeout = {HEADER_TIMEOUT}\n"
        f'[tls]\ncertificate = "{srv.cert}"\nprivate_key = "{srv.key}"\nca_certificates = "{ca.pem}"\n'
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def _ctx(pki: dict[str, object]) -> ssl.SSLContext:
    ca: TestCA = pki["ca"]  # type: ignore[assignment]
    cli: Issued = pki["client"]  # type: ignore[assignment]
    return client_context(TlsSettings(certificate=cli.cert, private_key=cli.key, ca_certificates=ca.pem))


def _tls(server: XdsiProcess, pki: dict[str, object], timeout: float = 10) -> ssl.SSLSocket:
    """A TLS connection to the HTTPS port with the handshake completed (and nothing sent)."""
    raw = socket.create_connection(("127.0.0.1", server.https_port), timeout=timeout)  # type: ignore[attr-defined]
    return _ctx(pki).wrap_socket(raw, server_hostname="127.0.0.1")


def _session(pki: dict[str, object]) -> requests.Session:
    ca: TestCA = pki["ca"]  # type: ignore[assignment]
    cli: Issued = pki["client"]  # type: ignore[assignment]
    s = requests.Session()
    s.trust_env = False
    s.cert, s.verify = (str(cli.cert), str(cli.key)), str(ca.pem)
    return s


def _read_response(sock: ssl.SSLSocket, buf: bytearray) -> tuple[int, bytes]:
    """One HTTP/1.1 response (Content-Length or chunked) from ``sock``; ``buf`` keeps what follows it: (status, body)."""

    def need(pred) -> None:  # type: ignore[no-untyped-def]
        while not pred():
            data = sock.recv(65536)
            if not data:
                raise AssertionError(f"connection closed after {bytes(buf)[:200]!r}")
            buf.extend(data)

    need(lambda: b"\r\n\r\n" in buf)
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    buf[:] = rest
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    fields = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(b":") for ln in lines[1:])}
    if fields.get(b"transfer-encoding") == b"chunked":
        body = b""
        while True:
            need(lambda: b"\r\n" in buf)
            size_line, _, rest = bytes(buf).partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            need(lambda: len(buf) >= len(size_line) + 2 + size + 2)
            body += bytes(buf[len(size_line) + 2 : len(size_line) + 2 + size])
            del buf[: len(size_line) + 2 + size + 2]
            if size == 0:
                return status, body
    length = int(fields[b"content-length"])
    need(lambda: len(buf) >= length)
    body = bytes(buf[:length])
    del buf[:length]
    return status, body


def test_idle_and_slow_tls_peers_hold_no_worker(server: XdsiProcess, pki: dict[str, object]) -> None:
    """3x the workers in handshaken-but-silent TLS peers, plus 3 trickling a head: real requests are answered at once."""
    idle = [_tls(server, pki) for _ in range(3 * THREADS)]
    slow = [_tls(server, pki) for _ in range(3)]
    head = b"GET /status HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
    stop = threading.Event()

    def drip() -> None:
        i = 0
        while not stop.wait(0.25) and i < len(head):
            for s in slow:
                try:
                    s.sendall(head[i : i + 1])
                except OSError:
                    pass
            i += 1

    t = threading.Thread(target=drip, daemon=True)
    t.start()
    started = time.monotonic()
    try:
        session = _session(pki)
        latencies = []
        while time.monotonic() - started < HEADER_TIMEOUT - 0.5:
            t0 = time.monotonic()
            # a fresh connection each time: a new handshake must get through as well as a new request
            r = session.get(f"https://127.0.0.1:{server.https_port}/status", headers={"Connection": "close"}, timeout=10)  # type: ignore[attr-defined]
            latencies.append(time.monotonic() - t0)
            assert r.status_code == 200 and "instances" in r.json()
            time.sleep(0.2)
        assert len(latencies) >= 3 and max(latencies) < 1.0, latencies
        # at header_timeout the silent and the slow peers are answered 408 over TLS and closed
        for s in idle + slow:
            s.settimeout(HEADER_TIMEOUT + 5)
            answer = b""
            while True:
                try:
                    data = s.recv(4096)
                except (ssl.SSLError, OSError):
                    break
                if not data:
                    break
                answer += data
            assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]
        assert time.monotonic() - started < HEADER_TIMEOUT + 3
    finally:
        stop.set()
        t.join(timeout=5)
        for s in idle + slow:
            s.close()


def test_head_in_pieces_with_a_pause_between_requests_and_pipelined(server: XdsiProcess, pki: dict[str, object]) -> None:
    """Heads split across TLS records, a keep-alive pause, then two requests in one record: all answered in order."""
    with _tls(server, pki) as s:
        buf = bytearray()
        for piece in (b"GET /sta", b"tus HTTP/1.1\r\nHo", b"st: x\r\n", b"\r\n"):
            s.sendall(piece)
            time.sleep(0.15)
        status, body = _read_response(s, buf)
        assert status == 200 and b"instances" in body
        time.sleep(0.5)  # idle on a kept-alive connection: back to the gate, no worker
        s.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\nGET /nonexistent-path HTTP/1.1\r\nHost: x\r\n\r\n")
        status1, body1 = _read_response(s, buf)
        status2, _ = _read_response(s, buf)
        assert (status1, status2) == (200, 404) and b"instances" in body1


def test_body_in_the_same_record_as_the_head(server: XdsiProcess, pki: dict[str, object]) -> None:
    """STOW-RS sent as one write (head and body in one TLS record): the body bytes the gate read reach the application."""
    part10, sop = secondary_capture("GATE^TLS", "GATE01")
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + part10 + b"\r\n--b--\r\n"
    head = (
        b"POST /dicomweb/studies HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/related; type=\"application/dicom\"; boundary=b\r\n"
        b"Accept: application/dicom+json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    assert len(head + body) < 16 * 1024  # one TLS record
    with _tls(server, pki) as s:
        buf = bytearray()
        s.sendall(head + body)
        status, answer = _read_response(s, buf)
        assert status == 200, answer[:300]
        assert sop.encode() in answer
    r = _session(pki).get(f"https://127.0.0.1:{server.https_port}/dicomweb/instances", params={"SOPInstanceUID": sop}, timeout=10)  # type: ignore[attr-defined]
    assert r.status_code == 200 and len(r.json()) == 1


def test_https_and_http_bodies_are_identical(server: XdsiProcess, pki: dict[str, object]) -> None:
    """A streamed multipart WADO-RS answer (small part heads between instances, written coalesced) carries every
    instance with pixels equal to pydicom's decoding of the original, and is byte-identical on both ports."""
    import io

    import numpy as np
    from pydicom import dcmread

    from xdsi.wire.multipart import read_parts

    study = None
    originals: dict[str, bytes] = {}
    for i in range(5):
        part10, _ = secondary_capture("SAME^BYTES", "SAME01", side=64 + 40 * i)
        ds = dcmread(io.BytesIO(part10))
        if study is None:
            study = str(ds.StudyInstanceUID)
        ds.StudyInstanceUID = study
        out = io.BytesIO()
        ds.save_as(out)
        originals[str(ds.SOPInstanceUID)] = out.getvalue()
        body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + out.getvalue() + b"\r\n--b--\r\n"
        r = requests.post(
            f"http://127.0.0.1:{server.http_port}/dicomweb/studies", data=body, timeout=30,
            headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b', "Accept": "application/dicom+json"},
        )
        assert r.status_code == 200, r.text
    accept = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
    plain = requests.get(f"http://127.0.0.1:{server.http_port}/dicomweb/studies/{study}", headers=accept, timeout=30)
    secure = _session(pki).get(f"https://127.0.0.1:{server.https_port}/dicomweb/studies/{study}", headers=accept, timeout=30)  # type: ignore[attr-defined]
    assert plain.status_code == secure.status_code == 200
    boundary = plain.headers["Content-Type"].split("boundary=")[1].split(";")[0].strip('"')
    other = secure.headers["Content-Type"].split("boundary=")[1].split(";")[0].strip('"')
    assert plain.content.replace(boundary.encode(), b"B") == secure.content.replace(other.encode(), b"B")
    parts: list[io.BytesIO] = []

    def sink(_headers: dict[str, str]) -> io.BytesIO:
        parts.append(io.BytesIO())
        return parts[-1]

    read_parts(io.BytesIO(secure.content), other, sink)
    assert len(parts) == len(originals)
    for f in parts:
        got = dcmread(io.BytesIO(f.getvalue()))
        want = dcmread(io.BytesIO(originals[str(got.SOPInstanceUID)]))
        assert (got.PatientID, got.StudyInstanceUID) == (want.PatientID, want.StudyInstanceUID)
        assert np.array_equal(got.pixel_array, want.pixel_array)
