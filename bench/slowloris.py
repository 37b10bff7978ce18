"""Slowloris against a running ``xdsi serve`` on 127.0.0.1: N sockets trickling request-head bytes, one normal client.

Run separately (not in CI)::

    python -m bench.slowloris --sockets 500 --seconds 20

It starts its own ``xdsi serve`` in a temporary directory, opens ``--sockets``
connections that each send one header byte per second, and meanwhile times a
``GET /status`` every half second.  It prints the normal client's latencies
(p50/max, failures) and how the slow sockets ended (408, closed, still open).

``--body`` sends each slow socket's request head at once (a STOW-RS POST
declaring a 10 MB body) and then trickles the *body* one byte a second: the
attack ``[http] min_body_rate`` answers.  ``--config FILE`` passes an
``xdsi.toml`` (e.g. ``[http]`` with ``min_body_rate = 0`` for the "before"
figure).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import requests

from tests.support.server import XdsiProcess


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sockets", type=int, default=500)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--body", action="store_true", help="complete heads, then a STOW-RS body at one byte a second")
    ap.add_argument("--config", type=Path, default=None, help="xdsi.toml for the server")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        srv = XdsiProcess(Path(d) / "data", config=args.config).start()
        try:
            run(srv, args.sockets, args.seconds, body=args.body)
        finally:
            srv.stop()


def run(srv: XdsiProcess, n: int, seconds: float, body: bool = False) -> None:
    head = b"GET /status HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000
    slow: list[socket.socket] = []
    for _ in range(n):
        try:
            slow.append(socket.create_connection(("127.0.0.1", srv.http_port), timeout=5))
        except OSError:
            break
    if body:
        post = (
            b"POST /dicomweb/studies HTTP/1.1\r\nHost: x\r\nAccept: application/dicom+json\r\n"
            b'Content-Type: multipart/related; type="application/dicom"; boundary=b\r\nContent-Length: 10000000\r\n\r\n'
        )
        for s in slow:
            try:
                s.sendall(post)
            except OSError:
                pass
        head = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + b"\0" * 10_000
    stop = threading.Event()

    def drip() -> None:
        i = 0
        while not stop.wait(1.0):
            for s in slow:
                try:
                    s.send(head[i : i + 1])
                except OSError:
                    pass
            i += 1

    threading.Thread(target=drip, daemon=True).start()
    lat: list[float] = []
    failures = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.monotonic()
        try:
            r = requests.get(f"http://127.0.0.1:{srv.http_port}/status", timeout=10)
            r.raise_for_status()
            lat.append(time.monotonic() - t0)
        except Exception:
            failures += 1
        time.sleep(0.5)
    stop.set()
    ended = {"408": 0, "closed": 0, "open": 0}
    for s in slow:
        s.setblocking(False)
        try:
            data = s.recv(64)
            ended["408" if data.startswith(b"HTTP/1.1 408") else "closed"] += 1
        except BlockingIOError:
            ended["open"] += 1
        except OSError:
            ended["closed"] += 1
        s.close()
    print(f"slow sockets: {len(slow)} opened; ended {ended}")
    if lat:
        print(f"normal client: {len(lat)} answered, {failures} failed; p50 {statistics.median(lat) * 1000:.1f} ms, max {max(lat) * 1000:.1f} ms")
    else:
        print(f"normal client: 0 answered, {failures} failed")


if __name__ == "__main__":
    main()
