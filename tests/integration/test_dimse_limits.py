"""Hostile DICOM peers against a running ``xdsi serve`` (issue 9, findings 2 and 3, DICOM parts).

Each attack at a scale safe for CI: an A-ASSOCIATE-RQ announcing 800 MB, silent TCP
connections, one AE title or address taking every slot, idle associations, a connect/close
storm.  Each asserts the refusal, bounded server memory (psutil) and that normal peers
(pynetdicom and Debian's dcmtk) are still served during and after.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import psutil
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.integration.dimse_support import dcmtk_available, tool
from tests.support.dicom_raw import A_ASSOCIATE_RJ, A_ASSOCIATE_RQ, P_DATA_TF, echo, pdu_header, read_pdu, wait_closed
from tests.support.server import XdsiProcess
from xdsi.tools.synth import StudySpec, write_study

pytestmark = pytest.mark.skipif(not dcmtk_available(), reason="Debian dcmtk tools not installed")

ASSOCIATE_TIMEOUT = 3.0
IDLE_TIMEOUT = 4.0
PER_AE = 3
PER_ADDRESS = 6
MAX_PENDING = 24
MAX_PDU = 64 * 1024
CONFIG = f"""
[dimse]
associate_timeout = {ASSOCIATE_TIMEOUT}
idle_timeout = {IDLE_TIMEOUT}
max_associations_per_ae = {PER_AE}
max_associations_per_address = {PER_ADDRESS}
max_pending = {MAX_PENDING}
max_pdu_size = "64 KiB"
max_associate_rq = "64 KiB"
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[XdsiProcess]:
    root = tmp_path_factory.mktemp("dimse-limits")
    cfg = root / "xdsi.toml"
    cfg.write_text(CONFIG)
    srv = XdsiProcess(root / "data", config=cfg, env={"TCP_NODELAY": "1"}).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 256 x 256 x 16 bit: larger than the 64 KiB Maximum Length, so a store crosses several PDUs
    return write_study(tmp_path_factory.mktemp("ct"), StudySpec(), series=1, per_series=1, rows=256, columns=256)[0]


def rss(srv: XdsiProcess) -> int:
    """The server's RSS: the process's, plus its workers' with ``--workers N`` (where the DICOM work happens)."""
    assert srv.proc is not None
    return sum(psutil.Process(pid).memory_info().rss for pid in [srv.proc.pid, *srv.children()])


def most_threads(srv: XdsiProcess) -> int:
    """Threads of the server process, or of its busiest worker with ``--workers N``."""
    assert srv.proc is not None
    return max(psutil.Process(pid).num_threads() for pid in [srv.proc.pid, *srv.children()])


def dcmtk_echo(srv: XdsiProcess, aet: str = "DCMTKECHO") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("echoscu"), "-aet", aet, "-aec", srv.ae_title, "-to", "10", "-ta", "10", srv.host, str(srv.dicom_port)],
        capture_output=True, text=True, timeout=30, env=dict(os.environ, TCP_NODELAY="1"),
    )


def dcmtk_store(srv: XdsiProcess, f: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("storescu"), "-aet", "DCMTKSTORE", "-aec", srv.ae_title, "-to", "10", "-ta", "10", srv.host, str(srv.dicom_port), str(f)],
        capture_output=True, text=True, timeout=30, env=dict(os.environ, TCP_NODELAY="1"),
    )


def associate(srv: XdsiProcess, calling: str) -> object:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = 10
    ae.network_timeout = None  # held on purpose: pynetdicom would otherwise abort its own idle association
    return ae.associate(srv.host, srv.dicom_port, ae_title=srv.ae_title)


def assert_echo_works(srv: XdsiProcess, within: float = 2.0) -> None:
    ok, secs, what = echo(srv.host, srv.dicom_port, timeout=10)
    assert ok, f"pynetdicom C-ECHO: {what} after {secs:.2f}s"
    assert secs < within, f"pynetdicom C-ECHO took {secs:.2f}s"
    p = dcmtk_echo(srv)
    assert p.returncode == 0, p.stdout + p.stderr


def flood(sock: socket.socket, header: bytes, cap: int, result: dict[str, object]) -> None:
    """Announce a huge PDU, then send zeros until the server stops reading or ``cap`` bytes went out."""
    chunk = b"\0" * (256 * 1024)
    sent = 0
    t0 = time.monotonic()
    sock.settimeout(10)
    try:
        sock.sendall(header)
        while sent < cap:
            sock.sendall(chunk)
            sent += len(chunk)
        result["refused"] = wait_closed(sock, 10)
    except OSError:
        result["refused"] = True
    result["sent"] = sent
    result["seconds"] = time.monotonic() - t0


def test_800mb_associate_rq_is_refused_unread(server: XdsiProcess) -> None:
    """Finding 2: three 800 MB A-ASSOCIATE-RQs at once once killed the process; now each is refused after its header."""
    assert_echo_works(server)
    before = rss(server)
    peak = before
    socks = [socket.create_connection((server.host, server.dicom_port), timeout=5) for _ in range(3)]
    results: list[dict[str, object]] = [{} for _ in socks]
    threads = [
        threading.Thread(target=flood, args=(s, pdu_header(A_ASSOCIATE_RQ, 800 * 1024 * 1024), 64 * 1024 * 1024, r), daemon=True)
        for s, r in zip(socks, results)
    ]
    for t in threads:
        t.start()
    assert_echo_works(server)  # during
    for t in threads:
        t.join(30)
        peak = max(peak, rss(server))
    for s in socks:
        s.close()
    for r in results:
        assert r.get("refused") is True, r
        assert float(r["seconds"]) < 5, r  # type: ignore[arg-type]
        assert int(r["sent"]) < 32 * 1024 * 1024, r  # the server stopped reading long before 64 MiB  # type: ignore[call-overload]
    assert peak - before < 20 * 1024 * 1024, f"server RSS grew {(peak - before) / 2**20:.1f} MB"
    assert_echo_works(server)  # after


def test_oversize_associate_rq_gets_an_associate_rj(server: XdsiProcess) -> None:
    """A few KB after a header announcing 800 MB: the answer is A-ASSOCIATE-RJ (permanent, local limit exceeded)."""
    with socket.create_connection((server.host, server.dicom_port), timeout=5) as s:
        s.sendall(pdu_header(A_ASSOCIATE_RQ, 800 * 1024 * 1024) + b"\0" * 4096)
        t0 = time.monotonic()
        pdu = read_pdu(s, timeout=5)
        took = time.monotonic() - t0
    assert took < 2
    # the server answers, then closes without reading the rest; a reset may beat the answer to us
    if pdu is not None:
        pdu_type, body = pdu
        assert pdu_type == A_ASSOCIATE_RJ
        assert body[1:4] == bytes([1, 3, 2]), body.hex()  # rejected-permanent, UL provider (presentation), local-limit-exceeded
    assert_echo_works(server)


def test_oversize_p_data_aborts_the_association(server: XdsiProcess) -> None:
    """A P-DATA-TF over the Maximum Length we advertised is answered with A-ABORT, unread."""
    ae = AE(ae_title="BIGPDATA")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate(server.host, server.dicom_port, ae_title=server.ae_title)
    assert assoc.is_established
    assert assoc.acceptor.maximum_length == MAX_PDU  # what we advertise
    before = rss(server)
    raw = assoc.dul.socket.socket
    raw.sendall(pdu_header(P_DATA_TF, 700 * 1024 * 1024) + b"\0" * 8192)
    deadline = time.monotonic() + 5
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted, "the association survived an oversize P-DATA-TF"
    assert rss(server) - before < 20 * 1024 * 1024
    assert_echo_works(server)


def test_silent_connections_do_not_lock_dicom_out(server: XdsiProcess, ct_file: Path) -> None:
    """Finding 3: 40 connections that never complete an A-ASSOCIATE-RQ; storescu still gets in, they are closed."""
    silent = [socket.create_connection((server.host, server.dicom_port), timeout=5) for _ in range(40)]
    # some half-send a request: a partial header, or a header and a little of the body, then stall
    stalled = [socket.create_connection((server.host, server.dicom_port), timeout=5) for _ in range(6)]
    for i, s in enumerate(stalled):
        s.sendall(b"\x01\x00\x00" if i % 2 else pdu_header(A_ASSOCIATE_RQ, 1000) + b"\0" * 10)
    t0 = time.monotonic()
    p = dcmtk_store(server, ct_file)
    took = time.monotonic() - t0
    assert p.returncode == 0, p.stdout + p.stderr
    assert took < 3, f"storescu took {took:.2f}s behind 46 silent connections"
    assert_echo_works(server)
    # every silent connection is closed by the associate timeout (or evicted sooner by newer ones)
    for s in silent + stalled:
        assert wait_closed(s, ASSOCIATE_TIMEOUT + 3), "a connection without an A-ASSOCIATE-RQ was left open"
        s.close()


def test_one_calling_ae_cannot_take_every_slot(server: XdsiProcess) -> None:
    """Per-peer caps: the (N+1)th association of one AE title is rejected (transient, local-limit-exceeded)."""
    held = [associate(server, "GREEDY") for _ in range(PER_AE)]
    try:
        assert all(a.is_established for a in held)
        extra = associate(server, "GREEDY")
        assert extra.is_rejected
        rj = extra.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (2, 3, 2)  # transient, presentation, local-limit-exceeded
        assert_echo_works(server)  # other AE titles get in
        held[0].release()
        time.sleep(0.3)
        again = associate(server, "GREEDY")
        assert again.is_established, "a freed slot was not given back"
        held[0] = again
    finally:
        for a in held:
            if a.is_established:
                a.release()


def test_one_address_cannot_take_every_slot(server: XdsiProcess) -> None:
    """Changing AE titles does not help: associations from one address are capped too."""
    held = [associate(server, f"ROT{i}") for i in range(PER_ADDRESS)]
    try:
        assert all(a.is_established for a in held)
        extra = associate(server, "ROTX")
        assert extra.is_rejected
        rj = extra.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (2, 3, 2)
    finally:
        for a in held:
            if a.is_established:
                a.release()
    time.sleep(0.3)
    assert_echo_works(server)


def test_idle_association_is_aborted(server: XdsiProcess) -> None:
    """An established association without DIMSE traffic for idle_timeout is aborted; an active one is not."""
    idle = associate(server, "IDLER")
    busy = associate(server, "CHATTY")
    assert idle.is_established and busy.is_established
    t0 = time.monotonic()
    while time.monotonic() - t0 < IDLE_TIMEOUT + 3 and idle.is_established:
        status = busy.send_c_echo()
        assert status and status.Status == 0
        time.sleep(0.5)
    assert idle.is_aborted, "an idle association was kept"
    assert time.monotonic() - t0 > IDLE_TIMEOUT - 0.5
    assert busy.is_established, "an association with traffic was aborted"
    busy.release()


def test_connect_storm_leaves_nothing_blocking(server: XdsiProcess) -> None:
    """Finding 3: after many connect/close, an association used to wait ~30 s; now it is answered at once."""
    for _ in range(500):
        socket.create_connection((server.host, server.dicom_port), timeout=5).close()
    t0 = time.monotonic()
    ok, secs, what = echo(server.host, server.dicom_port, timeout=10)
    assert ok, what
    assert time.monotonic() - t0 < 2, f"C-ECHO after the storm took {time.monotonic() - t0:.2f}s"
    assert_echo_works(server)
    # and the server's threads come back down: the storm's association threads ended
    assert server.proc is not None
    deadline = time.monotonic() + ASSOCIATE_TIMEOUT + 5
    while most_threads(server) > 60 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert most_threads(server) <= 60


def test_stored_data_still_arrives_intact_with_a_small_pdu(server: XdsiProcess, ct_file: Path) -> None:
    """A 64 KiB Maximum Length splits datasets into many P-DATA-TFs; a multi-PDU store still succeeds."""
    ae = AE(ae_title="PDUSPLIT")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate(server.host, server.dicom_port, ae_title=server.ae_title)
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(ct_file)
        assert rsp and rsp.Status == 0
    finally:
        assoc.release()
    assert ct_file.stat().st_size > MAX_PDU  # so it really crossed several PDUs


def test_an_association_idle_after_stores_is_aborted(server: XdsiProcess, tmp_path: Path) -> None:
    """Success C-STORE responses written by xdsi's own sender (store_responses) still tell the governor that the
    request was answered: an association that stored instances and then fell silent is aborted as idle, not kept
    for ever as one with a request in progress."""
    files = write_study(tmp_path / "ct", StudySpec(patient_id="IDLE-AFTER-STORE"), series=1, per_series=3)
    ae = AE(ae_title="STOREIDLE")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = 10
    ae.network_timeout = None  # held on purpose, as in associate()
    assoc = ae.associate(server.host, server.dicom_port, ae_title=server.ae_title)
    assert assoc.is_established
    for f in files:  # the second and third are read by the association thread itself (receive_direct)
        rsp = assoc.send_c_store(f)
        assert rsp and rsp.Status == 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < IDLE_TIMEOUT + 3 and assoc.is_established:
        time.sleep(0.2)
    assert assoc.is_aborted, "an association silent after its C-STOREs was kept"
