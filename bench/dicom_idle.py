"""Hostile DICOM peers against a running ``xdsi serve`` on 127.0.0.1, while dcmtk's storescu keeps sending.

Run separately (not in CI), from the repository with its virtualenv::

    python -m bench.dicom_idle                          # this tree's xdsi
    python -m bench.dicom_idle --xdsi-src /tmp/xdsi-old # another checkout's xdsi (e.g. before a fix)

It starts ``xdsi serve`` (from ``--xdsi-src``, first on PYTHONPATH) in a temporary directory
and runs four scenarios, each on a fresh server, printing one line of figures per scenario:

* ``idle-tcp``: ``--idle`` TCP connections that never send an A-ASSOCIATE-RQ, held for
  ``--seconds`` while ``/usr/bin/storescu`` sends a file every half second: stores that
  succeeded / failed, their latency (p50 / max), and how many idle sockets the server closed.
* ``idle-assoc``: ``--idle`` established associations (pynetdicom, calling AE IDLER, one
  C-ECHO each, then silent), same storescu loop; how many the server accepted.
* ``storm``: ``--storm`` TCP connect/close in a row, then the time a C-ECHO takes.
* ``big-rq``: one socket announcing an 800 MB A-ASSOCIATE-RQ and sending up to ``--big-mb``
  MB of it: how much the server read before refusing, how long that took, and the server's
  RSS growth (psutil), while C-ECHOs go on.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import Verification

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.dicom_raw import A_ASSOCIATE_RQ, echo, pdu_header, wait_closed  # noqa: E402
from tests.support.server import XdsiProcess  # noqa: E402

STORESCU = "/usr/bin/storescu"


def serve(src: Path, data: Path) -> XdsiProcess:
    env = {"PYTHONPATH": str(src), "TCP_NODELAY": "1", "XDSI_WORKERS": "1"}  # one worker: the figures below sample this pid (CPU, RSS, py-spy), and the supervisor serves nothing
    return XdsiProcess(data, env=env).start(timeout=60)


class StoreLoop:
    """``storescu`` sending one file every half second until stopped: latencies and failures."""

    def __init__(self, srv: XdsiProcess) -> None:
        self.srv = srv
        self.file = get_testdata_file("CT_small.dcm")
        self.lat: list[float] = []
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "StoreLoop":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        env = dict(os.environ, TCP_NODELAY="1")
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                p = subprocess.run(
                    [STORESCU, "-aet", "BENCH", "-aec", self.srv.ae_title, "-to", "30", "-ta", "30",
                     self.srv.host, str(self.srv.dicom_port), str(self.file)],
                    capture_output=True, timeout=60, env=env,
                )
                ok = p.returncode == 0
            except subprocess.TimeoutExpired:
                ok = False
            if ok:
                self.lat.append(time.monotonic() - t0)
            else:
                self.failed += 1
            self._stop.wait(0.5)

    def figures(self) -> str:
        if not self.lat:
            return f"stores ok 0, failed {self.failed}"
        return (f"stores ok {len(self.lat)}, failed {self.failed}, latency p50 {statistics.median(self.lat):.2f}s "
                f"max {max(self.lat):.2f}s")


def idle_tcp(srv: XdsiProcess, n: int, seconds: float) -> str:
    socks = [socket.create_connection((srv.host, srv.dicom_port), timeout=5) for _ in range(n)]
    with StoreLoop(srv) as loop:
        time.sleep(seconds)
    closed = sum(wait_closed(s, 0.05) for s in socks)
    for s in socks:
        s.close()
    return f"idle-tcp {n}: {loop.figures()}; idle sockets closed by the server within {seconds:.0f}s: {closed}/{n}"


def idle_assoc(srv: XdsiProcess, n: int, seconds: float) -> str:
    ae = AE(ae_title="IDLER")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = 10
    ae.network_timeout = None  # we hold them: pynetdicom would otherwise abort its own idle associations
    assocs = []
    for _ in range(n):
        a = ae.associate(srv.host, srv.dicom_port, ae_title=srv.ae_title)
        if a.is_established:
            a.send_c_echo()
            assocs.append(a)
    with StoreLoop(srv) as loop:
        time.sleep(seconds)
    alive = sum(a.is_established for a in assocs)
    for a in assocs:
        if a.is_established:
            a.abort()
    return (f"idle-assoc {n}: {len(assocs)} accepted, {alive} still open after {seconds:.0f}s; {loop.figures()}")


def storm(srv: XdsiProcess, n: int) -> str:
    t0 = time.monotonic()
    for _ in range(n):
        try:
            socket.create_connection((srv.host, srv.dicom_port), timeout=5).close()
        except OSError:
            pass
    took = time.monotonic() - t0
    ok, secs, what = echo(srv.host, srv.dicom_port, timeout=60)
    ok2, secs2, what2 = echo(srv.host, srv.dicom_port, timeout=60)
    return (f"storm {n} connect/close ({took:.1f}s): next C-ECHO {what} in {secs:.2f}s, "
            f"the one after {what2} in {secs2:.2f}s")


def big_rq(srv: XdsiProcess, mb: int) -> str:
    assert srv.proc is not None
    proc = psutil.Process(srv.proc.pid)
    rss0 = proc.memory_info().rss
    peak = rss0
    s = socket.create_connection((srv.host, srv.dicom_port), timeout=5)
    s.sendall(pdu_header(A_ASSOCIATE_RQ, 800 * 1024 * 1024))
    chunk = b"\0" * (1 << 20)
    sent = 0
    t0 = time.monotonic()
    refused_after = None
    s.settimeout(10)
    try:
        while sent < mb * (1 << 20):
            s.sendall(chunk)
            sent += len(chunk)
            peak = max(peak, proc.memory_info().rss)
    except OSError:
        refused_after = time.monotonic() - t0
    echoes = [echo(srv.host, srv.dicom_port, timeout=20) for _ in range(2)]
    closed = wait_closed(s, 15)
    if refused_after is None and closed:
        refused_after = time.monotonic() - t0
    peak = max(peak, proc.memory_info().rss)
    s.close()
    ends = "refused" if refused_after is not None else "still reading"
    return (f"big-rq: sent {sent >> 20} MB of an 800 MB A-ASSOCIATE-RQ; server {ends}"
            + (f" after {refused_after:.2f}s" if refused_after is not None else "")
            + f"; RSS growth {(peak - rss0) / 2**20:.0f} MB; C-ECHO meanwhile: "
            + ", ".join(f"{w} {t:.2f}s" for _, t, w in echoes))


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--xdsi-src", type=Path, default=ROOT, help="source tree whose xdsi serves (default this one)")
    ap.add_argument("--idle", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--storm", type=int, default=2000)
    ap.add_argument("--big-mb", type=int, default=200)
    ap.add_argument("--only", choices=["idle-tcp", "idle-assoc", "storm", "big-rq"], action="append")
    args = ap.parse_args()
    src = args.xdsi_src.resolve()
    # ``python -m xdsi`` puts its working directory first on sys.path: serve from the tree asked for
    os.chdir(src)
    rev = subprocess.run(["git", "-C", str(src), "log", "-1", "--format=%h %s"], capture_output=True, text=True).stdout.strip()
    print(f"xdsi from {src} ({rev})", flush=True)
    scenarios = {
        "idle-tcp": lambda srv: idle_tcp(srv, args.idle, args.seconds),
        "idle-assoc": lambda srv: idle_assoc(srv, args.idle, args.seconds),
        "storm": lambda srv: storm(srv, args.storm),
        "big-rq": lambda srv: big_rq(srv, args.big_mb),
    }
    for name, fn in scenarios.items():
        if args.only and name not in args.only:
            continue
        with tempfile.TemporaryDirectory() as d:
            srv = serve(src, Path(d) / "data")
            try:
                print(fn(srv), flush=True)
            finally:
                srv.stop()


if __name__ == "__main__":
    main()
