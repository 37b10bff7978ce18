"""Issue 9 findings 4 and 5 over the wire: only valid objects archived, no spool file outlives its transfer.

A real ``xdsi serve`` and pynetdicom peers.  The refused cases are sent as
Part 10 files with ``STORE_SEND_CHUNKED_DATASET`` so pynetdicom sends exactly
the bytes we crafted, and takes the command's SOP Class/Instance and the
context's transfer syntax from the File Meta we wrote.
"""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE, _config
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import Verification

from tests.integration.dimse_support import cli_status, dcmtk_available, http_status, leftover_temp_files, run, tool
from tests.support.server import XdsiProcess
from xdsi.uids import new_uid

TIMEOUT = 30
NETWORK_TIMEOUT = 3  # the server's idle timeout: how long a stalled transfer may hold its spool file


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[XdsiProcess]:
    root = tmp_path_factory.mktemp("validity")
    cfg = root / "xdsi.toml"
    cfg.write_text(f"[dimse]\nnetwork_timeout = {NETWORK_TIMEOUT}\n")
    srv = XdsiProcess(root / "data", config=cfg).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(autouse=True)
def chunked_send(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def _dataset(sop_class: str = CTImageStorage, pixels: int = 64) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = new_uid()
    ds.PatientID = "VALID-1"
    ds.PatientName = "Valid^Test"
    ds.StudyInstanceUID = new_uid()
    ds.SeriesInstanceUID = new_uid()
    ds.Modality = "CT"
    ds.Rows = ds.Columns = pixels
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.SamplesPerPixel = 1
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(pixels * pixels * 2)
    return ds


def _part10(
    path: Path,
    ds: Dataset,
    *,
    meta_class: str | None = None,
    meta_instance: str | None = None,
    ts: str = ExplicitVRLittleEndian,
    body_implicit: bool | None = None,
    preamble: bool = True,
) -> Path:
    """A file whose File Meta says what we want the command and context to say, and a body encoded as told."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = meta_class or ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = meta_instance or ds.SOPInstanceUID
    meta.TransferSyntaxUID = ts
    implicit = (ts == ImplicitVRLittleEndian) if body_implicit is None else body_implicit
    body = DicomBytesIO()
    body.is_implicit_VR = implicit
    body.is_little_endian = True
    write_dataset(body, ds)
    out = io.BytesIO()
    if preamble:
        out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    path.write_bytes(out.getvalue() + body.getvalue())
    return path


def _scu(*contexts: tuple[str, list[str]]) -> AE:
    ae = AE(ae_title="VALIDSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, syntaxes)
    return ae


def _instances(server: XdsiProcess) -> int:
    return int(http_status(server)["instances"])


def _wait_no_spool(server: XdsiProcess, within: float) -> list[Path]:
    deadline = time.monotonic() + within
    while True:
        left = leftover_temp_files(server.data_dir)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def _store(server: XdsiProcess, path: Path, *contexts: tuple[str, list[str]]) -> Dataset:
    assoc = _scu(*contexts).associate(server.host, server.dicom_port, ae_title="XDSI")
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(path)
        assert rsp is not None and "Status" in rsp, "no C-STORE response"
        assert assoc.is_established, "a refused C-STORE must not end the association"
        return rsp
    finally:
        assoc.release()


# -- only valid objects stored -------------------------------------------------------------------


def test_refused_datasets_are_not_stored(server: XdsiProcess, tmp_path: Path) -> None:
    before = _instances(server)
    both = [(CTImageStorage, [ExplicitVRLittleEndian]), (MRImageStorage, [ExplicitVRLittleEndian])]
    cases = {
        # (a) a CT data set on an MR context (the command says MR, the File Meta says MR)
        "ct-on-mr": (_part10(tmp_path / "a.dcm", _dataset(CTImageStorage), meta_class=MRImageStorage), 0xA900),
        # (b) implicit-VR bytes on an Explicit VR Little Endian context
        "implicit-on-explicit": (_part10(tmp_path / "b.dcm", _dataset(), body_implicit=True), 0xC000),
        # (c) a data set claiming the Verification SOP Class, sent on a CT context
        "verification-dataset": (_part10(tmp_path / "c.dcm", _dataset(Verification), meta_class=CTImageStorage), 0xA900),
        # (d) the command's Affected SOP Instance UID is not the data set's
        "instance-mismatch": (_part10(tmp_path / "d.dcm", _dataset(), meta_instance=new_uid()), 0xA900),
    }
    got = {name: _store(server, path, *both) for name, (path, _) in cases.items()}
    statuses = {name: rsp.Status for name, rsp in got.items()}
    assert statuses == {name: code for name, (_, code) in cases.items()}, {k: hex(v) for k, v in statuses.items()}
    assert all(rsp.get("ErrorComment") for rsp in got.values())
    assert _instances(server) == before
    assert _wait_no_spool(server, 5) == []
    # and a valid one still goes through on the same kind of association
    good = _part10(tmp_path / "good.dcm", _dataset())
    assert _store(server, good, *both).Status == 0x0000
    assert _instances(server) == before + 1


def test_store_on_a_verification_context_is_refused(server: XdsiProcess, tmp_path: Path) -> None:
    """A C-STORE whose command and context are Verification: not a storage SOP class, nothing stored."""
    before = _instances(server)
    path = _part10(tmp_path / "v.dcm", _dataset(Verification))
    rsp = _store(server, path, (Verification, [ExplicitVRLittleEndian]))
    assert rsp.Status != 0x0000 and rsp.Status >> 12 not in (0xB, 0xF), hex(rsp.Status)
    assert _instances(server) == before
    assert _wait_no_spool(server, 5) == []


@pytest.mark.skipif(not dcmtk_available(), reason="dcmtk not installed")
def test_implicit_vr_context_still_stores_and_dcmtk_reads_it(server: XdsiProcess, tmp_path: Path) -> None:
    """The encoding check does not refuse a correctly labelled implicit-VR transfer."""
    ds = _dataset()
    path = _part10(tmp_path / "i.dcm", ds, ts=ImplicitVRLittleEndian)
    assert _store(server, path, (CTImageStorage, [ImplicitVRLittleEndian])).Status == 0x0000
    stored = next((server.data_dir / "storage").rglob(f"{ds.SOPInstanceUID}.dcm"))
    out = run([tool("dcmdump"), "+E", str(stored)])
    assert ds.SOPInstanceUID in out.stdout


# -- no spool file outlives its transfer ----------------------------------------------------------------


def _spool_files(server: XdsiProcess) -> list[Path]:
    """Spool files holding (or about to hold) a transfer: not the empty ones made ahead (xdsi.dimse.spool_ahead)."""
    from tests.support.spool import spool_files

    return spool_files(server.data_dir / "tmp", "*.dcm")


def test_abort_mid_store_leaves_no_spool_file(server: XdsiProcess, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # the SCU fragments into 16 KiB PDUs (our server accepts any size) so the transfer is in progress long enough
    monkeypatch.setattr(DIMSEServiceProvider, "maximum_pdu_size", property(lambda self: 16384))
    big = _part10(tmp_path / "big.dcm", _dataset(pixels=3000))  # 18 MB of Pixel Data
    before = _instances(server)
    assoc = _scu((CTImageStorage, [ExplicitVRLittleEndian])).associate(server.host, server.dicom_port, ae_title="XDSI")
    assert assoc.is_established
    # The sender is held after ~2 MB of P-DATA until the abort has gone, so the whole data set can never
    # arrive first, however fast the machine (CI once received all 18 MB before the A-ABORT).
    release = threading.Event()
    queue_pdu = assoc.dul.send_pdu
    sent = 0

    def held_send_pdu(primitive) -> None:  # type: ignore[no-untyped-def]
        nonlocal sent
        if isinstance(primitive, P_DATA):
            sent += 1
            if sent > 128:
                release.wait(30)
                return
        queue_pdu(primitive)

    monkeypatch.setattr(assoc.dul, "send_pdu", held_send_pdu)
    sender = threading.Thread(target=lambda: _swallow(assoc.send_c_store, big), daemon=True)
    sender.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if any(p.stat().st_size > 1_000_000 for p in _spool_files(server) if p.exists()):
            break
        time.sleep(0.01)
    else:
        pytest.fail("the transfer never started spooling")
    assoc.abort()
    release.set()
    sender.join(10)
    assert _wait_no_spool(server, 3) == [], "the partial data set of an aborted transfer is still on disk"
    assert _instances(server) == before
    assert http_status(server)["spool"] == {"bytes": 0, "files": 0}


def _swallow(fn, *args) -> None:  # type: ignore[no-untyped-def]
    try:
        fn(*args)
    except Exception:
        pass


def _send_command_only(assoc, path: Path) -> None:  # type: ignore[no-untyped-def]
    """Send the C-STORE-RQ command set announcing a data set, and nothing else."""
    req = C_STORE()
    req.MessageID = 7
    req.AffectedSOPClassUID = CTImageStorage
    req.AffectedSOPInstanceUID = new_uid()
    req.Priority = 2
    req._dataset_path = (path, 0)
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    cx = next(c for c in assoc.accepted_contexts if c.abstract_syntax == CTImageStorage)
    first = next(iter(msg.encode_msg(cx.context_id, 16384)))  # the command; the data set fragments never go
    assoc.dul.send_pdu(first)


def test_stalled_store_loses_its_spool_file_at_the_network_timeout(server: XdsiProcess, tmp_path: Path) -> None:
    payload = tmp_path / "payload.bin"
    payload.write_bytes(b"\x00" * 1024)
    assoc = _scu((CTImageStorage, [ExplicitVRLittleEndian])).associate(server.host, server.dicom_port, ae_title="XDSI")
    assert assoc.is_established
    try:
        _send_command_only(assoc, payload)
        deadline = time.monotonic() + 5
        while not _spool_files(server) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _spool_files(server), "the server did not start a spool file for the announced data set"
        assert http_status(server)["spool"]["files"] >= 1
        started = time.monotonic()
        assert cli_status(server.data_dir)["spool"].startswith("1 file(s)")
        # the server's idle timeout ends the association; the partial file goes with it
        assert _wait_no_spool(server, NETWORK_TIMEOUT + 5) == []
        assert time.monotonic() - started < NETWORK_TIMEOUT + 5
        assert cli_status(server.data_dir)["spool"].startswith("0 file(s), 0 B")
    finally:
        assoc.abort()


def test_peer_closing_socket_mid_store_leaves_no_spool_file(server: XdsiProcess, tmp_path: Path) -> None:
    payload = tmp_path / "payload.bin"
    payload.write_bytes(b"\x00" * 1024)
    assoc = _scu((CTImageStorage, [ExplicitVRLittleEndian])).associate(server.host, server.dicom_port, ae_title="XDSI")
    assert assoc.is_established
    _send_command_only(assoc, payload)
    deadline = time.monotonic() + 5
    while not _spool_files(server) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _spool_files(server)
    assoc.dul.socket.socket.close()  # no A-ABORT: the TCP connection just goes away
    assert _wait_no_spool(server, 3) == []
    assoc.abort()


# -- STOW-RS without the preamble ------------------------------------------------------------------------


@pytest.mark.skipif(not dcmtk_available(), reason="dcmtk not installed")
@pytest.mark.parametrize("with_meta", [True, False], ids=["meta-no-preamble", "bare-dataset"])
def test_stow_part_without_preamble_is_stored_as_part10(server: XdsiProcess, tmp_path: Path, with_meta: bool) -> None:
    import json
    import urllib.request

    ds = _dataset()
    if with_meta:
        raw = _part10(tmp_path / "np.dcm", ds, preamble=False).read_bytes()
    else:
        body = DicomBytesIO()
        body.is_implicit_VR, body.is_little_endian = False, True
        write_dataset(body, ds)
        raw = body.getvalue()
    assert raw[128:132] != b"DICM"
    boundary = "xdsi-np-boundary"
    payload = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + raw + f"\r\n--{boundary}--\r\n".encode()
    )
    base = f"http://127.0.0.1:{server.http_port}/dicomweb"
    req = urllib.request.Request(
        f"{base}/studies",
        data=payload,
        method="POST",
        headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}', "Accept": "application/dicom+json"},
    )
    with urllib.request.urlopen(req, timeout=30) as rsp:
        assert rsp.status == 200
    study, series, sop = ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    with urllib.request.urlopen(f"{base}/studies/{study}/series/{series}/instances/{sop}/metadata", timeout=30) as rsp:
        meta = json.loads(rsp.read())
    assert len(meta) == 1
    item = meta[0]
    assert item["00080018"]["Value"] == [sop]
    assert item["0020000D"]["Value"] == [study]
    assert item["00100010"]["Value"] == [{"Alphabetic": "Valid^Test"}]
    assert item["00280010"]["Value"] == [64]
    # WADO-RS instance: a Part 10 file with complete File Meta that dcmtk parses
    get = urllib.request.Request(
        f"{base}/studies/{study}/series/{series}/instances/{sop}",
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
    )
    with urllib.request.urlopen(get, timeout=30) as rsp:
        ctype = rsp.headers["Content-Type"]
        body_bytes = rsp.read()
    bnd = ctype.split("boundary=")[1].split(";")[0].strip('"')
    part = body_bytes.split(f"--{bnd}".encode())[1]
    dicom = part.split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n", 1)[0]
    assert dicom[128:132] == b"DICM"
    fetched = tmp_path / "fetched.dcm"
    fetched.write_bytes(dicom)
    fm = dcmread(fetched).file_meta
    assert (fm.MediaStorageSOPClassUID, fm.MediaStorageSOPInstanceUID, fm.TransferSyntaxUID) == (CTImageStorage, sop, ExplicitVRLittleEndian)
    out = run([tool("dcmdump"), "+E", str(fetched)])
    assert sop in out.stdout and "Valid^Test" in out.stdout
    stored = next((server.data_dir / "storage").rglob(f"{sop}.dcm"))
    assert stored.read_bytes()[128:132] == b"DICM"
