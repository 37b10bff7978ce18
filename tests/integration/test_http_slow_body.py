"""Issue 9 finding 3, request bodies: a body trickled a few bytes a second must not hold a worker thread.

Against a running ``xdsi serve`` with 4 worker threads and ``min_body_rate``
high enough (2,000 bytes/s with 0.5 s of credit) to trip within seconds: twice
as many slow STOW-RS and MTOM uploads as there are workers are each answered
408 (or closed) within the window, a normal client keeps getting QIDO and
``/status`` answers meanwhile, a slow upload above the rate is stored, and no
spool file is left behind.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import requests

from tests.integration.test_http_hardening import base, mtom, rad69_body, soap_envelope
from tests.support.objects import secondary_capture
from tests.support.server import XdsiProcess

THREADS = 4
RATE = 2000  # bytes/s
# seconds of credit: the slow uploads (twice the workers) hold every worker for about 2 x WINDOW in all, and the
# normal client's requests queue behind them for that long: the price of a rate check without an async front
WINDOW = 0.5
CONFIG = f"""
[http]
threads = {THREADS}
min_body_rate = {RATE}
body_rate_window = {WINDOW}
"""
STOW_TYPE = 'multipart/related; type="application/dicom"; boundary=b'


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[XdsiProcess]:
    d = tmp_path_factory.mktemp("slowbody")
    cfg = d / "xdsi.toml"
    cfg.write_text(CONFIG)
    # one process: "twice as many slow uploads as worker threads" counts the threads of one process
    srv = XdsiProcess(d / "data", config=cfg, workers=1).start()
    try:
        yield srv
    finally:
        srv.stop()


def spool_files(server: XdsiProcess) -> list[Path]:
    """Files in the spool folder, but for the empty ones made ahead for C-STOREs (xdsi.dimse.spool_ahead)."""
    from tests.support.spool import spool_files as held

    return held(server.data_dir / "tmp", recursive=True)


def dicom_part10(size: int = 0) -> tuple[bytes, str]:
    """A small Secondary Capture instance as Part 10 bytes (pixel data padded to about ``size`` bytes) and its SOP Instance UID."""
    return secondary_capture("SLOW^BODY", "SLOW01", side=max(4, int(size**0.5) // 2 * 2))


def stow_request(server: XdsiProcess, part10: bytes) -> tuple[bytes, bytes]:
    """(head, body) of a STOW-RS request with one part."""
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + part10 + b"\r\n--b--\r\n"
    head = (
        f"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1:{server.http_port}\r\nContent-Type: {STOW_TYPE}\r\n"
        f"Accept: application/dicom+json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head, body


def mtom_request(server: XdsiProcess, attachment: int) -> tuple[bytes, bytes]:
    """(head, body) of an MTOM RAD-69 request whose second part (spooled by the server) is ``attachment`` bytes."""
    root = soap_envelope(rad69_body(1))
    body, ct = mtom(root)
    b = b"--uuid:7a1c"
    extra = b + b"\r\nContent-Type: application/octet-stream\r\nContent-ID: <big@x>\r\n\r\n" + b"y" * attachment + b"\r\n"
    body = body[: body.rindex(b + b"--")] + extra + b + b"--\r\n"
    head = (
        f"POST /xdsi/ImagingDocumentSource HTTP/1.1\r\nHost: 127.0.0.1:{server.http_port}\r\nContent-Type: {ct}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head, body


class SlowUpload(threading.Thread):
    """Sends ``head`` and the first ``prefix`` body bytes at once, then ``step`` bytes every ``pause`` s; records how it ended."""

    def __init__(self, port: int, head: bytes, body: bytes, prefix: int, step: int, pause: float, limit: float) -> None:
        super().__init__(daemon=True)
        self.port, self.head, self.body = port, head, body
        self.prefix, self.step, self.pause, self.limit = prefix, step, pause, limit
        self.answer = b""
        self.ended = "open"
        self.elapsed = 0.0

    def run(self) -> None:
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(self.head + self.body[: self.prefix])
            pos = self.prefix
            while time.monotonic() - t0 < self.limit:
                readable, _, _ = select.select([s], [], [], self.pause if pos < len(self.body) else 0.5)
                if readable:
                    self._finish(s)
                    break
                if pos < len(self.body):
                    try:
                        s.sendall(self.body[pos : pos + self.step])
                    except OSError:
                        self._finish(s)
                        break
                    pos += self.step
            self.elapsed = time.monotonic() - t0

    def _finish(self, s: socket.socket) -> None:
        s.settimeout(5)
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                self.answer += chunk
        except OSError:
            pass
        self.ended = "answered" if self.answer else "closed"

    def status(self) -> int:
        return int(self.answer.split(b" ", 2)[1]) if self.answer.startswith(b"HTTP/1.1 ") else 0


def test_slow_body_uploads_get_408_while_others_are_served(server: XdsiProcess) -> None:
    part10, _ = dicom_part10(100_000)  # over the 64 KiB the server reads at once, so a spool file is opened
    slow: list[SlowUpload] = []
    for i in range(2 * THREADS):
        head, body = stow_request(server, part10) if i % 2 == 0 else mtom_request(server, 100_000)
        # the part headers and most of the content at once (so a spool file exists), then 5 bytes/s
        prefix = len(body) - 3000
        slow.append(SlowUpload(server.http_port, head, body, prefix, step=1, pause=0.2, limit=4 * WINDOW + 5))
    for t in slow:
        t.start()
    saw_spool = 0
    settle = time.monotonic() + 0.5
    while time.monotonic() < settle:  # a spool file lives about WINDOW seconds: look from the start
        saw_spool = max(saw_spool, len(spool_files(server)))
        time.sleep(0.02)
    latencies: list[float] = []
    end = time.monotonic() + 2 * WINDOW + 1
    while time.monotonic() < end:
        saw_spool = max(saw_spool, len(spool_files(server)))
        for path in ("/status", "/dicomweb/studies"):
            t0 = time.monotonic()
            r = requests.get(base(server) + path, timeout=10, headers={"Accept": "application/dicom+json"})
            latencies.append(time.monotonic() - t0)
            assert r.status_code in (200, 204), (path, r.status_code, r.text[:200])
        time.sleep(0.2)
    for t in slow:
        t.join(timeout=4 * WINDOW + 10)
    assert saw_spool > 0, "the slow uploads never reached the spool: the test would not show its cleanup"
    assert max(latencies) < 2.0, latencies
    for t in slow:
        assert t.ended in ("answered", "closed"), (t.ended, t.elapsed)
        assert t.status() in (408, 0), t.answer[:300]
        # cut after about WINDOW / (1 - 5/RATE) seconds of trickle, not io_timeout
        assert t.elapsed < 2 * WINDOW + 2, t.elapsed
    assert all(t.status() == 408 for t in slow), [t.answer[:40] for t in slow]
    deadline = time.monotonic() + 5
    while spool_files(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert spool_files(server) == []
    r = requests.get(base(server) + "/status", timeout=5)
    assert r.status_code == 200


def test_slow_upload_above_the_rate_is_stored(server: XdsiProcess) -> None:
    part10, sop_uid = dicom_part10(16_000)
    head, body = stow_request(server, part10)
    # about 3x the minimum rate (1,000 bytes every 0.15 s), for longer than the window
    t = SlowUpload(server.http_port, head, body, prefix=0, step=1000, pause=0.15, limit=30)
    t.start()
    t.join(timeout=40)
    assert t.elapsed > WINDOW, t.elapsed  # really slower than a normal upload, longer than the credit
    assert t.status() == 200, t.answer[:500]
    r = requests.get(base(server) + "/dicomweb/instances", params={"SOPInstanceUID": sop_uid}, headers={"Accept": "application/dicom+json"}, timeout=10)
    assert r.status_code == 200 and len(r.json()) == 1
    assert spool_files(server) == []


def test_chunked_body_that_stalls_is_cut(server: XdsiProcess) -> None:
    """A chunked STOW body that stops after its first chunk: 408 after the window, not io_timeout."""
    part10, _ = dicom_part10(4096)
    _, body = stow_request(server, part10)
    head = (
        f"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1:{server.http_port}\r\nContent-Type: {STOW_TYPE}\r\n"
        "Accept: application/dicom+json\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    first = body[:1000]
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=WINDOW + 8) as s:
        s.sendall(head + b"%x\r\n" % len(first) + first + b"\r\n")
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except OSError:
            pass
    elapsed = time.monotonic() - t0
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert b"Connection: close" in answer
    assert WINDOW * 0.8 < elapsed < WINDOW + 3, elapsed
    assert spool_files(server) == []
