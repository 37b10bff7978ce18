"""C-GET / C-MOVE sub-operations written and answered directly on the socket (xdsi.dimse.direct): cancel and abort.

The direct writer and reader share the socket with pynetdicom's DUL thread; these tests drive the
moments where the two meet: a C-CANCEL arriving where a C-STORE response is awaited, the requestor
aborting mid-transfer, a move destination aborting mid-transfer, and the server stopping while it
sends.  Every instance that arrives must be byte-identical to the original; counts must add up; the
association (or the server) must go on serving.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelMove, Verification

from tests.integration.dimse_support import dataset_bytes, free_port, write_config
from tests.support.server import XdsiProcess
from xdsi.archive import Archive
from xdsi.config import Settings
from xdsi.tools.synth import StudySpec, write_study

TIMEOUT = 30
N = 24  # instances: 256x256 CT, 128 KB each: 9 PDUs at a 16 KB maximum PDU
DEST = "DIRECTDEST"


class Destination:
    """A pynetdicom storage SCP (move destination) that can abort after a number of instances."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: dict[str, bytes] = {}
        self.abort_after: int | None = None
        self.ae = AE(ae_title=DEST)
        self.ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian])
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self.on_store)])

    def on_store(self, event: Any) -> int:
        self.received[str(event.request.AffectedSOPInstanceUID)] = event.request.DataSet.getvalue()
        if self.abort_after is not None and len(self.received) >= self.abort_after:
            threading.Thread(target=event.assoc.abort, daemon=True).start()
        return 0x0000


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[XdsiProcess, StudySpec, dict[str, bytes], Destination]]:
    root = tmp_path_factory.mktemp("direct")
    spec = StudySpec(patient_id="DIRECT1", patient_name="DIRECT^RETRIEVE")
    files = write_study(root / "in", spec, series=2, per_series=N // 2, rows=256, columns=256)
    archive = Archive.open(Settings(data_dir=root / "data"))
    for f in files:
        archive.store.store_file(f, move=False)
    archive.close()
    originals = {f.stem: dataset_bytes(f) for f in files}
    dest = Destination()
    config = write_config(root / "xdsi.toml", {DEST: ("127.0.0.1", dest.port)})
    server = XdsiProcess(root / "data", config=config).start(timeout=60)
    try:
        yield server, spec, originals, dest
    finally:
        server.stop()
        dest.server.shutdown()


def _get_ae(received: dict[str, bytes], on_store_extra: Any = None) -> tuple[AE, list[Any]]:
    ae = AE(ae_title="DIRECTSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    ae.maximum_pdu_size = 16384
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])

    def on_store(event: Any) -> int:
        received[str(event.request.AffectedSOPInstanceUID)] = event.request.DataSet.getvalue()
        if on_store_extra is not None:
            on_store_extra(event)
        return 0x0000

    return ae, [(evt.EVT_C_STORE, on_store)]


def _query(spec: StudySpec) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = spec.study_uid
    return ds


def _assert_identical(received: dict[str, bytes], originals: dict[str, bytes]) -> None:
    for sop, raw in received.items():
        assert raw == originals[sop], f"{sop} differs"


def test_cancel_mid_get_then_the_association_goes_on(env: tuple[XdsiProcess, StudySpec, dict[str, bytes], Destination]) -> None:
    """A C-CANCEL arrives while the server awaits a C-STORE response: it is honoured, counts add up, the association lives."""
    server, spec, originals, _ = env
    received: dict[str, bytes] = {}
    ae, handlers = _get_ae(received)
    assoc = ae.associate(server.host, server.dicom_port, ae_title="XDSI", ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=handlers)
    assert assoc.is_established
    try:
        responses = []
        cancelled = False
        for status, ident in assoc.send_c_get(_query(spec), StudyRootQueryRetrieveInformationModelGet, msg_id=11):
            responses.append(status)
            if not cancelled and status.Status == 0xFF00 and status.NumberOfCompletedSuboperations >= 5:
                assoc.send_c_cancel(11, query_model=StudyRootQueryRetrieveInformationModelGet)
                cancelled = True
        final = responses[-1]
        assert final.Status == 0xFE00, hex(final.Status)
        completed = final.NumberOfCompletedSuboperations
        assert 5 <= completed < N
        assert completed == len(received)
        assert completed + final.get("NumberOfFailedSuboperations", 0) + final.get("NumberOfRemainingSuboperations", 0) == N
        _assert_identical(received, originals)
        # the same association: every instance, byte for byte, then a C-ECHO
        received.clear()
        again = list(assoc.send_c_get(_query(spec), StudyRootQueryRetrieveInformationModelGet, msg_id=12))
        assert again[-1][0].Status == 0x0000
        assert again[-1][0].NumberOfCompletedSuboperations == N and len(received) == N
        _assert_identical(received, originals)
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def test_requestor_abort_mid_get_leaves_the_server_serving(env: tuple[XdsiProcess, StudySpec, dict[str, bytes], Destination]) -> None:
    server, spec, originals, _ = env
    received: dict[str, bytes] = {}

    def abort_after_three(event: Any) -> None:
        if len(received) == 3:
            threading.Thread(target=event.assoc.abort, daemon=True).start()

    ae, handlers = _get_ae(received, abort_after_three)
    ae.dimse_timeout = 5  # pynetdicom's requestor does not always notice its own abort from inside a C-STORE handler
    assoc = ae.associate(server.host, server.dicom_port, ae_title="XDSI", ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=handlers)
    assert assoc.is_established
    list(assoc.send_c_get(_query(spec), StudyRootQueryRetrieveInformationModelGet))
    deadline = time.monotonic() + 10
    while assoc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted
    assert 3 <= len(received) < N
    _assert_identical(received, originals)
    # a new association gets the whole study
    received2: dict[str, bytes] = {}
    ae2, handlers2 = _get_ae(received2)
    assoc2 = ae2.associate(server.host, server.dicom_port, ae_title="XDSI", ext_neg=[build_role(CTImageStorage, scp_role=True)],
                           evt_handlers=handlers2)
    assert assoc2.is_established
    try:
        final = list(assoc2.send_c_get(_query(spec), StudyRootQueryRetrieveInformationModelGet))[-1][0]
    finally:
        assoc2.release()
    assert final.Status == 0x0000 and len(received2) == N
    _assert_identical(received2, originals)


def _move(server: XdsiProcess, spec: StudySpec) -> Dataset:
    ae = AE(ae_title="MOVESCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate(server.host, server.dicom_port, ae_title="XDSI")
    assert assoc.is_established
    try:
        responses = list(assoc.send_c_move(_query(spec), DEST, StudyRootQueryRetrieveInformationModelMove))
    finally:
        assoc.release()
    return responses[-1][0]


def test_destination_abort_mid_move_fails_the_rest(env: tuple[XdsiProcess, StudySpec, dict[str, bytes], Destination]) -> None:
    server, spec, originals, dest = env
    dest.received.clear()
    dest.abort_after = 4
    try:
        t = time.monotonic()
        final = _move(server, spec)
        assert time.monotonic() - t < TIMEOUT
    finally:
        dest.abort_after = None
    assert final.Status in (0xA702, 0xB000), hex(final.Status)
    completed = final.get("NumberOfCompletedSuboperations", 0)
    assert completed + final.NumberOfFailedSuboperations == N
    assert 4 <= len(dest.received) < N and completed <= len(dest.received)
    _assert_identical(dest.received, originals)
    # the destination back to normal: the whole study, byte for byte
    dest.received.clear()
    final = _move(server, spec)
    assert final.Status == 0x0000 and final.NumberOfCompletedSuboperations == N
    assert len(dest.received) == N
    _assert_identical(dest.received, originals)


def test_server_stops_while_sending(tmp_path: Path, env: tuple[XdsiProcess, StudySpec, dict[str, bytes], Destination]) -> None:
    """SIGTERM while the direct writer sends to a slow requestor: no deadlock between the send and the abort, a clean exit.

    The bound is the server's shutdown grace (10 s for association threads) plus start-up slack: measured
    12 s with the base tree too, since the requestor's pynetdicom reactor reads the A-ABORT only between
    its slow C-STORE handlers.
    """
    _, spec, originals, _ = env
    server = XdsiProcess(env[0].data_dir).start(timeout=60)
    received: dict[str, bytes] = {}
    started = threading.Event()

    def slow(event: Any) -> None:
        started.set()
        time.sleep(0.3)

    ae, handlers = _get_ae(received, slow)
    assoc = ae.associate(server.host, server.dicom_port, ae_title="XDSI", ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=handlers)
    assert assoc.is_established
    getter = threading.Thread(target=lambda: list(assoc.send_c_get(_query(spec), StudyRootQueryRetrieveInformationModelGet)), daemon=True)
    getter.start()
    try:
        assert started.wait(TIMEOUT)
        t = time.monotonic()
        rc = server.stop(timeout=25)
        assert time.monotonic() - t < 20, "the server did not stop promptly while sending:\n" + server.output()[-4000:]
        assert rc == 0, server.output()[-3000:]
    finally:
        server.stop()
        getter.join(TIMEOUT)
        if assoc.is_established:
            assoc.abort()
    assert len(received) < N
    _assert_identical(received, originals)
