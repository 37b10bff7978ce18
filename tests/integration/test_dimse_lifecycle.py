"""xdsi serve under process faults: kill -9 in the middle of ingest, SIGTERM, and TCP_NODELAY on its sockets."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.conftest import make_settings
from tests.integration.dimse_support import leftover_temp_files
from tests.support.server import XdsiProcess
from xdsi.archive import Archive
from xdsi.config import Settings
from xdsi.storage.tiers import sha256_file
from xdsi.tools.synth import StudySpec, write_study

TOTAL = 200
KILL_AFTER = 60


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_kill9_during_ingest_loses_no_acknowledged_instance(tmp_path: Path, backend: str, workers: int, request: pytest.FixtureRequest) -> None:
    """With ``workers = 2`` two associations ingest at once (one per worker, most likely) and the whole process
    group (supervisor and workers) is killed together."""
    files = write_study(tmp_path / "in", StudySpec(), series=4, per_series=TOTAL // 4, rows=256, columns=256)
    data_dir = tmp_path / "data"
    index_url = None
    env: dict[str, str] = {}
    if backend == "postgresql":
        index_url = request.getfixturevalue("postgres").create_database(f"t_{uuid.uuid4().hex[:12]}")
        env["XDSI_INDEX_URL"] = index_url
    server = XdsiProcess(data_dir, env=env, workers=workers).start()
    acked: list[str] = []
    refused: list[tuple[str, int]] = []
    errors: list[str] = []

    def send(files: list[Path]) -> None:
        ae = AE(ae_title="LOADER")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        assoc = ae.associate(server.host, server.dicom_port, ae_title="XDSI")
        if not assoc.is_established:
            errors.append("association refused")
            return
        try:
            for f in files:
                sop = f.stem
                try:
                    rsp = assoc.send_c_store(f)
                except Exception as exc:  # the server vanished mid-send
                    errors.append(f"{sop}: {exc}")
                    return
                if not rsp or "Status" not in rsp:
                    errors.append(f"{sop}: no response")
                    return
                if rsp.Status == 0x0000:
                    acked.append(sop)
                else:
                    refused.append((sop, rsp.Status))
        finally:
            if assoc.is_established:
                assoc.abort()

    senders = [threading.Thread(target=send, args=(files[i::workers],), daemon=True) for i in range(workers)]
    for sender in senders:
        sender.start()
    deadline = time.time() + 120
    while len(acked) < KILL_AFTER and all(s.is_alive() for s in senders) and time.time() < deadline:
        time.sleep(0.005)
    assert len(acked) >= KILL_AFTER, f"only {len(acked)} acknowledged before the sender stopped: {errors[:3]} {refused[:3]}"
    server.kill9(group=workers > 1)
    for sender in senders:
        sender.join(60)
        assert not sender.is_alive()
    assert not refused, f"refused during ingest: {refused[:3]}; server log:\n{server.output()[-6000:]}"
    assert len(acked) < TOTAL, "the kill came too late to interrupt the ingest"
    snapshot = list(acked)

    restarted = XdsiProcess(data_dir, env=env, workers=workers).start()
    try:
        assert leftover_temp_files(data_dir) == []
    finally:
        restarted.stop_cleanly()

    archive = Archive.open(Settings(data_dir=data_dir, index_url=index_url), clean=False)
    try:
        refs = {r.sop_instance_uid: r for r in archive.retrieve.select(sop_uids=snapshot)}
        missing = [s for s in snapshot if s not in refs]
        assert not missing, f"{len(missing)} acknowledged instance(s) lost, e.g. {missing[:3]}"
        for sop in snapshot:
            tier, rel, size, sha = refs[sop].copies[0]
            path = archive.tiers[tier].abspath(rel)
            assert sha256_file(path) == (size, sha), f"{sop}: stored bytes do not match the index"
            ds = dcmread(path)
            assert ds.SOPInstanceUID == sop and len(ds.PixelData) == 256 * 256 * 2
        # nothing beyond what was sent, and every indexed instance reads back (acknowledged or not)
        everything = archive.retrieve.select(study_uids=[str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)])
        assert {r.sop_instance_uid for r in everything} <= {f.stem for f in files}
        for r in everything:
            tier, rel, size, sha = r.copies[0]
            assert sha256_file(archive.tiers[tier].abspath(rel)) == (size, sha)
    finally:
        archive.close()
    assert leftover_temp_files(data_dir) == []


def test_sigterm_stops_cleanly(tmp_path: Path) -> None:
    server = XdsiProcess(tmp_path / "data").start()
    ae = AE(ae_title="IDLE")
    ae.add_requested_context(Verification)
    assoc = ae.associate(server.host, server.dicom_port, ae_title="XDSI")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    try:
        started = time.monotonic()
        # an association still open must not keep the process alive
        assert server.stop(timeout=20) == 0, server.output()
        assert time.monotonic() - started < 15
    finally:
        if assoc.is_established:
            assoc.abort()
    assert server.logged("stopping"), server.output()[-3000:]


def test_accepted_and_outgoing_sockets_have_nodelay(tmp_path: Path) -> None:
    from xdsi.dimse.server import DicomServer

    archive = Archive.open(make_settings(tmp_path))
    dicom = DicomServer(archive)
    dicom.start("127.0.0.1", 0)
    try:
        ae = AE(ae_title="PEER")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", dicom.port, ae_title="XDSI")
        assert assoc.is_established
        try:
            deadline = time.time() + 10
            accepted = []
            while not accepted and time.time() < deadline:
                accepted = [a for a in dicom.ae.active_associations if a.is_acceptor and a.is_established]
                time.sleep(0.01)
            (server_side,) = accepted
            sock = server_side.dul.socket.socket
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        finally:
            assoc.release()
        # our own outgoing associations (move sub-operations, commitment reports) too
        peer = AE(ae_title="PEER")
        peer.add_supported_context(Verification)
        peer_server = peer.start_server(("127.0.0.1", 0), block=False)
        try:
            out = dicom.ae.associate("127.0.0.1", peer_server.server_address[1], ae_title="PEER", contexts=[_verification()])
            assert out.is_established
            try:
                assert out.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            finally:
                out.release()
        finally:
            peer_server.shutdown()
    finally:
        dicom.stop()
        archive.close()


def _verification():  # type: ignore[no-untyped-def]
    from pynetdicom.presentation import build_context

    return build_context(Verification)


