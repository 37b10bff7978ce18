"""C-STOREs read by the association thread itself (xdsi.dimse.receive_direct) store exactly the bytes sent.

Real peers: dcmtk's storescu (by /usr/bin path) sends every pydicom test file it can, in one
association, so every instance after the first can take the direct path; the data set bytes the
archive stored must be the ones in the file sent, byte for byte.  A small maximum PDU (many P-DATA
PDUs per instance) and a pynetdicom peer that mixes C-ECHO and C-STORE on one association (the
direct reader must give the C-ECHO back to pynetdicom) are checked too.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import pydicom.data
import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import select

from tests.conftest import make_settings
from tests.support.inprocess_dicom import inprocess_dicom
from xdsi.archive import Archive
from xdsi.archive.header import dataset_start
from xdsi.dimse import receive_direct
from xdsi.index.models import FileCopy, Instance
from xdsi.tools.synth import StudySpec, write_study

STORESCU, STORESCP = "/usr/bin/storescu", "/usr/bin/storescp"
pytestmark = pytest.mark.skipif(not os.path.exists(STORESCU), reason="dcmtk storescu not installed")

@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Archive]]:
    """An in-process DicomServer; what it sets process-wide (pynetdicom's _config, the spool directory) is put back."""
    tmp = tmp_path_factory.mktemp("receive-direct")
    archive = Archive.open(make_settings(tmp))
    try:
        with inprocess_dicom(archive) as dicom:
            yield dicom, archive
    finally:
        archive.close()


def _storescu(port: int, folder: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [STORESCU, "-aec", "XDSI", "-nh", *extra, "+sd", "127.0.0.1", str(port), str(folder)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "TCP_NODELAY": "1"},
    )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _received_by_storescp(folder: Path, out: Path, *extra: str) -> dict[str, Path]:
    """What dcmtk's storescp +B (bit-preserving: the data set exactly as received) stores of the same storescu run."""
    out.mkdir()
    port = _free_port()
    scp = subprocess.Popen([STORESCP, "+B", "+xa", "-pm", "-od", str(out), "--aetitle", "XDSI", str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while _storescu_echo(port) != 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        _storescu(port, folder, *extra)
    finally:
        scp.terminate()
        scp.wait(10)
    got: dict[str, Path] = {}
    for f in out.iterdir():
        got[str(dcmread(f, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID)] = f
    return got


def _storescu_echo(port: int) -> int:
    return subprocess.run(["/usr/bin/echoscu", "-aec", "XDSI", "127.0.0.1", str(port)], capture_output=True, timeout=30).returncode


def _same_as_storescp(stored: dict[str, Path], reference: dict[str, Path], sops: list[str]) -> int:
    """Assert every instance both received in one transfer syntax has the same data set bytes; how many were compared."""
    compared = 0
    for sop in sops:
        ours, theirs = stored[sop], reference.get(sop)
        if theirs is None:
            continue
        ts = [str(dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID) for p in (ours, theirs)]
        if ts[0] != ts[1]:  # the two acceptors chose different presentation contexts: storescu sent other bytes
            continue
        assert _data_set_bytes(ours) == _data_set_bytes(theirs), f"{sop}: stored data set differs from what storescp +B received"
        compared += 1
    return compared


def _stored(archive: Archive) -> dict[str, Path]:
    """SOP Instance UID -> stored file, from the index."""
    hot = archive.store.tiers.hot
    with archive.index.session() as s:
        rows = s.execute(select(Instance.sop_instance_uid, FileCopy.rel_path).join(FileCopy, FileCopy.instance_fk == Instance.pk)).all()
    return {sop: hot.abspath(rel) for sop, rel in rows}


def _assert_index_checksums(archive: Archive) -> int:
    """Every copy's sha256 in the index is the stored file's: the direct reader hashes the spool as it writes it
    (receive_direct.WRITTEN) and the tier takes that digest instead of reading the file again."""
    hot = archive.store.tiers.hot
    with archive.index.session() as s:
        rows = s.execute(select(FileCopy.rel_path, FileCopy.size, FileCopy.sha256)).all()
    for rel, size, sha in rows:
        data = hot.abspath(rel).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (size, sha), rel
    return len(rows)


def _data_set_bytes(path: Path) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(dataset_start(fh)[1])
        return fh.read()


def _unique_part10_files(folder: Path) -> dict[str, Path]:
    """pydicom's test files with a File Meta group, one per SOP Instance UID (several share one), copied to ``folder``."""
    folder.mkdir()
    chosen: dict[str, Path] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, src in enumerate(sorted(p for p in (Path(pydicom.data.__file__).parent / "test_files").rglob("*") if p.is_file())):
            try:
                ds = dcmread(src, stop_before_pixels=True)
                sop = str(ds.file_meta.MediaStorageSOPInstanceUID)
                str(ds.file_meta.TransferSyntaxUID)
            except Exception:
                continue
            if not sop or sop in chosen:
                continue
            dest = folder / f"{i:04d}.dcm"
            shutil.copyfile(src, dest)
            chosen[sop] = dest
    return chosen


def test_every_pydicom_file_byte_exact_through_the_direct_path(served: tuple[Any, Archive], tmp_path: Path) -> None:
    dicom, archive = served
    sent = _unique_part10_files(tmp_path / "in")
    before = dict(receive_direct.stats)
    result = _storescu(dicom.port, tmp_path / "in")
    stored = _stored(archive)
    accepted = [sop for sop in sent if sop in stored]
    assert len(accepted) >= 20, (len(accepted), result.stdout[-2000:], result.stderr[-2000:])
    reference = _received_by_storescp(tmp_path / "in", tmp_path / "storescp")
    compared = _same_as_storescp(stored, reference, accepted)
    assert compared >= len(accepted) * 3 // 4, (compared, len(accepted))
    for sop in accepted:
        assert dcmread(stored[sop], stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID == sop
    # every instance after the first of each run of successes can be read by the association thread
    taken = receive_direct.stats["taken"] - before["taken"]
    assert taken >= len(accepted) // 2, (taken, len(accepted))
    assert _assert_index_checksums(archive) >= len(accepted)


def test_small_pdus_many_fragments(served: tuple[Any, Archive], tmp_path: Path) -> None:
    """4 KiB PDUs: a 256x256 CT is ~32 P-DATA PDUs, each read and appended by the association thread."""
    dicom, archive = served
    files = write_study(tmp_path / "ct", StudySpec(patient_id="DIRECT01"), series=1, per_series=8, rows=256, columns=256)
    before = receive_direct.stats["taken"]
    result = _storescu(dicom.port, tmp_path / "ct", "--max-send-pdu", "4096")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    stored = _stored(archive)
    sops = [str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    reference = _received_by_storescp(tmp_path / "ct", tmp_path / "storescp", "--max-send-pdu", "4096")
    assert _same_as_storescp(stored, reference, sops) == len(files)
    for f, sop in zip(files, sops):
        assert (dcmread(stored[sop]).pixel_array == dcmread(f).pixel_array).all()
    assert receive_direct.stats["taken"] - before == len(files) - 1
    _assert_index_checksums(archive)


def test_each_spool_files_write_back_starts_on_the_association_thread(
    served: tuple[Any, Archive], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The direct reader hands early_sync its open spool file: for every instance it reads, the association thread
    itself asks glibc for the fsync (libc_aio) or, without it, starts the write-back (sync_file_range) before the
    pool's fsync; never a pool thread.  The stored bytes and checksums are as always."""
    import stat as stat_mod
    import threading

    from xdsi.storage import early_sync, libc_aio

    dicom, archive = served
    calls: list[tuple[str, bool]] = []
    if libc_aio.available():
        real_aio = libc_aio.AioFsync

        def aio_spy(fd: int, path: str = "") -> Any:
            calls.append((threading.current_thread().name, stat_mod.S_ISREG(os.fstat(fd).st_mode)))
            return real_aio(fd, path)

        monkeypatch.setattr(libc_aio, "AioFsync", aio_spy)
    else:
        real = early_sync._SYNC_FILE_RANGE
        if real is None:
            pytest.skip("neither glibc's AIO nor sync_file_range on this platform")

        def spy(fd: int, offset: int, nbytes: int, flags: int) -> int:
            calls.append((threading.current_thread().name, stat_mod.S_ISREG(os.fstat(fd).st_mode) and flags == 2))
            return int(real(fd, offset, nbytes, flags))

        monkeypatch.setattr(early_sync, "_SYNC_FILE_RANGE", spy)
    files = write_study(tmp_path / "ct", StudySpec(patient_id="DIRECTSFR"), series=1, per_series=5, rows=64, columns=64)
    before = receive_direct.stats["taken"]
    result = _storescu(dicom.port, tmp_path / "ct")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    taken = receive_direct.stats["taken"] - before
    assert taken == len(files) - 1
    assert len(calls) == taken and all(regular for _, regular in calls)
    assert not any(name.startswith("xdsi-fsync") for name, _ in calls)  # the caller's thread, not the pool's
    _assert_index_checksums(archive)


def test_echo_between_stores_is_given_back_to_pynetdicom(served: tuple[Any, Archive], tmp_path: Path) -> None:
    dicom, archive = served
    files = write_study(tmp_path / "ct", StudySpec(patient_id="DIRECT02"), series=1, per_series=4, rows=64, columns=64)
    ae = AE(ae_title="MIXER")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    before = dict(receive_direct.stats)
    assoc = ae.associate("127.0.0.1", dicom.port, ae_title="XDSI")
    assert assoc.is_established
    try:
        for f in files:
            status = assoc.send_c_store(dcmread(f))
            assert status.Status == 0x0000
            assert assoc.send_c_echo().Status == 0x0000  # read by the direct reader, given back, answered by pynetdicom
    finally:
        assoc.release()
    assert assoc.is_released
    stored = _stored(archive)
    for f in files:
        ds = dcmread(f)
        assert (dcmread(stored[str(ds.SOPInstanceUID)]).pixel_array == ds.pixel_array).all()
    assert receive_direct.stats["given_back"] - before["given_back"] >= len(files)


def test_the_dul_is_woken_when_the_direct_reader_gives_the_socket_back(
    served: tuple[Any, Archive], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the association thread holds the socket the DUL waits up to wakeup.READER_WAIT (10 ms) instead of
    looking every millisecond; giving the socket back wakes it (Guard.release_read), so a PDU the direct reader
    gave back (the C-ECHO) is read at once.  Every release after the first store finds the DUL's wake-up hooked."""
    from xdsi.dimse import direct, wakeup

    assert wakeup.READER_WAIT >= 0.005
    dicom, _ = served
    hooked: list[bool] = []
    real = direct.Guard.release_read

    def spy(self):  # type: ignore[no-untyped-def]
        hooked.append(self.on_read_release is not None)
        return real(self)

    monkeypatch.setattr(direct.Guard, "release_read", spy)
    files = write_study(tmp_path / "ct", StudySpec(patient_id="DIRECT03"), series=1, per_series=6, rows=64, columns=64)
    ae = AE(ae_title="WAKER")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", dicom.port, ae_title="XDSI")
    assert assoc.is_established
    echo_ms: list[float] = []
    try:
        for f in files:
            assert assoc.send_c_store(dcmread(f)).Status == 0x0000
            t0 = time.perf_counter()
            assert assoc.send_c_echo().Status == 0x0000  # given back by the direct reader, read by the DUL
            echo_ms.append((time.perf_counter() - t0) * 1000)
    finally:
        assoc.release()
    assert len(hooked) >= len(files) - 1 and all(hooked[1:]), hooked
    assert sorted(echo_ms)[len(echo_ms) // 2] < 500, echo_ms  # not stuck: each one answered promptly


def test_a_relays_storage_association_is_not_hashed_and_what_it_archives_is_hashed_by_the_tier(
    served: tuple[Any, Archive], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a remote's storage association to a relay (``dimse._xdsi_relay_receive``, set by xdsi.gateway.receive.install)
    the direct reader neither hashes nor early-fsyncs the spool file (relayed, not stored: issue 15) but keeps its first
    bytes for the relay's identity check (receive_direct.HEAD: the file's, byte for byte); a C-STORE on it
    that no relay takes is archived, the tier hashing and syncing it itself, so every index checksum is still the
    stored file's."""
    dicom, archive = served
    files = write_study(tmp_path / "ct", StudySpec(patient_id="DIRECT04"), series=1, per_series=5, rows=256, columns=256)  # > HEAD_BYTES
    written: list[Any] = []
    heads: list[Any] = []
    receive, complete = receive_direct._receive, receive_direct._complete

    def as_relays(assoc: Any, g: Any, dul: Any, dimse: Any) -> bool:
        dimse._xdsi_relay_receive = True  # what receive.install marks; its C-STOREs are otherwise the usual ones
        return receive(assoc, g, dul, dimse)

    def recording(assoc: Any, dimse: Any, message: Any, w: Any, head: Any = None) -> None:
        written.append(w)
        heads.append((message.command_set.AffectedSOPInstanceUID, head))
        complete(assoc, dimse, message, w, head)

    monkeypatch.setattr(receive_direct, "_receive", as_relays)
    monkeypatch.setattr(receive_direct, "_complete", recording)
    result = _storescu(dicom.port, tmp_path / "ct")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert len(written) == len(files) - 1 and all(w is None for w in written), written
    stored = _stored(archive)
    # what the relay scans for the instance's identity instead of reading the file again: the file's first bytes
    from xdsi.gateway.headscan import HEAD_BYTES

    assert len(heads) == len(files) - 1
    for sop, head in heads:
        assert head is not None and head == stored[str(sop)].read_bytes()[:HEAD_BYTES]
    for f in files:
        ds = dcmread(f)
        assert (dcmread(stored[str(ds.SOPInstanceUID)]).pixel_array == ds.pixel_array).all()
    _assert_index_checksums(archive)


def _pdu_bytes(assoc: Any, message: Any, context_id: int) -> bytes:
    """The P-DATA-TF PDUs of one DIMSE message as pynetdicom would send them on ``assoc``."""
    from pynetdicom.pdu import P_DATA_TF

    out = b""
    for primitive in message.encode_msg(context_id, assoc.acceptor.maximum_length):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        out += pdu.encode()
    return out


def test_an_oversize_pdu_after_stores_is_refused_by_the_direct_reader(
    served: tuple[Any, Archive], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The direct reader reads a PDU's body and the next header at once (PduGuard.recv_upto), so it checks each
    header's length itself: a P-DATA-TF over our Maximum Length gets the A-ABORT at once, nothing of it read."""
    from xdsi.dimse import limits

    dicom, archive = served
    checked: list[int] = []
    real = limits.PduGuard.header_read

    def spy(self, pdu_type, length):  # type: ignore[no-untyped-def]
        checked.append(length)
        return real(self, pdu_type, length)

    monkeypatch.setattr(limits.PduGuard, "header_read", spy)
    (f,) = write_study(tmp_path / "ct", StudySpec(patient_id="DIRECT05"), series=1, per_series=1, rows=64, columns=64)
    ae = AE(ae_title="BIGAFTER")
    ae.add_requested_context(CTImageStorage)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", dicom.port, ae_title="XDSI")
    assert assoc.is_established
    assert assoc.send_c_store(dcmread(f)).Status == 0x0000
    huge = 700 * 1024 * 1024
    assoc.dul.socket.socket.sendall(bytes([0x04, 0]) + huge.to_bytes(4, "big") + b"\0" * 8192)
    deadline = time.monotonic() + 5
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.02)
    assert assoc.is_aborted, "the association survived an oversize P-DATA-TF"
    assert huge in checked  # refused by the direct reader's check, not found out by the network timeout
    ae2 = AE(ae_title="BIGAFTER")
    ae2.add_requested_context(CTImageStorage)
    again = ae2.associate("127.0.0.1", dicom.port, ae_title="XDSI")
    try:
        assert again.send_c_store(dcmread(f)).Status == 0x0000  # a duplicate now: still Success, the server serves on
    finally:
        again.release()


def test_what_a_peer_sends_before_our_response_reaches_pynetdicom_in_order(served: tuple[Any, Archive], tmp_path: Path) -> None:
    """A C-STORE and a C-ECHO written in one go (the echo's bytes arrive with the store's last PDU, before our
    response): the direct reader reads the store and gives the bytes past it back; both are answered, in order."""
    from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
    from pynetdicom.dimse_primitives import C_ECHO, C_STORE

    dicom, archive = served
    first, second = write_study(tmp_path / "ct", StudySpec(patient_id="DIRECT06"), series=1, per_series=2, rows=64, columns=64)
    ae = AE(ae_title="PIPELINE")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    ae.dimse_timeout = 30
    assoc = ae.associate("127.0.0.1", dicom.port, ae_title="XDSI")
    assert assoc.is_established
    try:
        assert assoc.send_c_store(dcmread(first)).Status == 0x0000  # from now on the association thread reads stores
        cx_store = next(c for c in assoc.accepted_contexts if c.abstract_syntax == CTImageStorage)
        cx_echo = next(c for c in assoc.accepted_contexts if c.abstract_syntax == Verification)
        ds = dcmread(second)
        store = C_STORE()
        store.MessageID, store.AffectedSOPClassUID, store.AffectedSOPInstanceUID, store.Priority = 7, ds.SOPClassUID, ds.SOPInstanceUID, 2
        from io import BytesIO

        from pynetdicom.dsutils import encode

        implicit = cx_store.transfer_syntax[0] == "1.2.840.10008.1.2"
        store.DataSet = BytesIO(encode(ds, implicit, True))
        echo = C_ECHO()
        echo.MessageID, echo.AffectedSOPClassUID = 8, Verification
        m1, m2 = C_STORE_RQ(), C_ECHO_RQ()
        m1.primitive_to_message(store)
        m2.primitive_to_message(echo)
        wire = _pdu_bytes(assoc, m1, cx_store.context_id) + _pdu_bytes(assoc, m2, cx_echo.context_id)
        assoc._reactor_checkpoint.clear()
        try:
            while not assoc._is_paused:
                time.sleep(0.001)
            assoc.dul.socket.socket.sendall(wire)
            got = [assoc.dimse.get_msg(block=True)[1] for _ in range(2)]
        finally:
            assoc._reactor_checkpoint.set()
        assert [(g.__class__.__name__, g.MessageIDBeingRespondedTo, g.Status) for g in got] == [("C_STORE", 7, 0), ("C_ECHO", 8, 0)]
    finally:
        assoc.release()
    stored = _stored(archive)
    assert (dcmread(stored[str(ds.SOPInstanceUID)]).pixel_array == dcmread(second).pixel_array).all()


def test_a_store_read_whole_here_does_not_wake_the_dul(served: tuple[Any, Archive], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After the association thread has read a whole C-STORE request (nothing given back) the peer waits for our
    response and the DUL has nothing to read: the socket is returned without waking it (receive_direct.QUIET)."""
    from xdsi.dimse import direct

    dicom, archive = served
    woken: list[int] = []
    real = direct.Guard.release_read

    def spy(self):  # type: ignore[no-untyped-def]
        woken.append(1)
        return real(self)

    monkeypatch.setattr(direct.Guard, "release_read", spy)
    files = write_study(tmp_path / "ct", StudySpec(patient_id="DIRECT07"), series=1, per_series=8, rows=64, columns=64)
    datasets = [dcmread(f) for f in files]
    ae = AE(ae_title="QUIETONE")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", dicom.port, ae_title="XDSI")
    assert assoc.is_established
    before = receive_direct.stats["taken"]
    try:
        for ds in datasets:
            assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()
    taken = receive_direct.stats["taken"] - before
    assert taken >= len(files) // 2, taken  # most were read by the association thread
    assert len(woken) <= 2, (len(woken), taken)  # at most when it found nothing more to read, and at the release
