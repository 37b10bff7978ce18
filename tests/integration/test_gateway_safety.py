"""Patient safety in the gateway (issue 15): a remote that answers a C-MOVE with another study's instances.

dcmqrscp cannot lie, so the remote here is a pynetdicom Q/R SCP written for the test ("LIAR"): for
each study asked it sends what the test planned, among it an instance of another patient's study.
xdsi (``[gateway] remotes = ["LIAR"]``, ``cache = true``) must refuse that instance (C-STORE A900),
count it as a failed sub-operation, never relay it to the requester nor cache it, and log it; the
instances of the asked study are relayed byte-identical and cached.  Same for an on-demand fetch
(WADO-RS of a study only the remote holds).
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
import numpy as np
from pynetdicom import AE, _config, evt
from pynetdicom.presentation import build_role
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelMove

from tests.integration.dimse_support import dataset_bytes
from tests.support.server import XdsiProcess, free_port
from xdsi.tools.synth import StudySpec, write_study


class Liar:
    """A C-MOVE SCP that sends, for each Study Instance UID asked, the files the test planned for it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.plan: dict[str, list[Path]] = {}
        self.statuses: list[int] = []  # C-STORE statuses xdsi answered, in order
        self.xdsi_port = 0
        # pynetdicom's C-MOVE SCP writes its OWN AE title as the sub-operations' Move Originator AE Title (PS3.7 wants
        # the C-MOVE requester's, as dcmqrscp does); xdsi matches a delivery on (calling AE, originator, Message ID),
        # so the liar calls itself XDSI and is configured with ae_title = "XDSI": both then read XDSI, as from a real PACS
        ae = AE(ae_title="XDSI")
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])  # the files' own encoding: sent unchanged
        ae.dimse_timeout = ae.network_timeout = 30
        self.ae = ae
        self.server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_MOVE, self.on_move)])

    def on_move(self, event: Any) -> Iterator[Any]:
        files = self.plan.get(str(event.identifier.StudyInstanceUID), [])
        yield "127.0.0.1", self.xdsi_port
        yield len(files)
        for p in files:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield 0xFF00, dcmread(p)

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("gwsafety")
    specs = {k: StudySpec(patient_id=f"SAFE{k}", patient_name=f"SAFETY^{k}", accession=f"SA{k}") for k in "ABCD"}
    files = {k: write_study(root / k, s, series=1, per_series=3) for k, s in specs.items()}
    liar = Liar(free_port())
    cfg = root / "xdsi.toml"
    cfg.write_text(f"""
[remotes.LIAR]
ae_title = "XDSI"
host = "127.0.0.1"
port = {liar.port}
services = ["move"]
connect_timeout = 5

[gateway]
remotes = ["LIAR"]
mode = "forward"
cache = true
""")
    server = XdsiProcess(root / "data", config=cfg)
    liar.xdsi_port = server.dicom_port
    try:
        server.start(timeout=120)
        try:
            yield {"root": root, "specs": specs, "files": files, "liar": liar, "server": server}
        finally:
            server.stop()
    finally:
        liar.stop()


def _c_get(port: int, study: str) -> dict[str, Any]:
    """A pynetdicom C-GET of one study from xdsi (main AE): what arrived (dataset bytes by SOP UID) and the final counts."""
    _config.STORE_RECV_CHUNKED_DATASET = False
    received: dict[str, tuple[Dataset, bytes]] = {}

    def on_store(event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received[str(event.request.AffectedSOPInstanceUID)] = (ds, event.encoded_dataset(include_meta=False))
        return 0x0000

    ae = AE(ae_title="VIEWER")
    ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="XDSI", ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = study
    final: dict[str, Any] = {}
    for st, rsp in assoc.send_c_get(ident, StudyRootQueryRetrieveInformationModelGet, msg_id=1):
        if "Status" in st and int(st.Status) not in (0xFF00, 0xFF01):
            final = {"status": int(st.Status), "completed": st.get("NumberOfCompletedSuboperations"),
                     "failed": st.get("NumberOfFailedSuboperations"), "warning": st.get("NumberOfWarningSuboperations")}
            failed = rsp.get("FailedSOPInstanceUIDList", []) if rsp is not None else []
            final["failed_uids"] = [failed] if isinstance(failed, str) else [str(u) for u in failed]
    assoc.release()
    final["received"] = received
    return final


def _sop(p: Path) -> str:
    return str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)


def _local_studies(server: XdsiProcess) -> set[str]:
    """QIDO-RS answers from the local index only: what was cached."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/dicomweb/studies", timeout=30) as rsp:
        body = rsp.read()
    return {m["0020000D"]["Value"][0] for m in json.loads(body)} if body else set()


def test_cget_via_cmove_refuses_another_studys_instance(env: dict[str, Any]) -> None:
    specs, files, liar, server = env["specs"], env["files"], env["liar"], env["server"]
    wrong = files["B"][0]
    liar.plan[specs["A"].study_uid] = [files["A"][0], wrong, files["A"][1], files["A"][2]]
    out = _c_get(server.dicom_port, specs["A"].study_uid)
    want = {_sop(p): p for p in files["A"]}
    # the requester got exactly the asked study, byte-identical to the remote's copy
    assert set(out["received"]) == set(want), out
    for sop, (ds, raw) in out["received"].items():
        assert ds.StudyInstanceUID == specs["A"].study_uid and ds.PatientID == specs["A"].patient_id
        assert raw == dataset_bytes(want[sop]), sop
        assert np.array_equal(ds.pixel_array, dcmread(want[sop]).pixel_array), sop
    # the wrong instance is one failed sub-operation, not a completed one
    assert (out["status"], out["completed"], out["failed"]) == (0xB000, 3, 1), out
    assert _sop(wrong) in out["failed_uids"], out
    # cache = true: the asked study was cached, the other patient's study was not
    local = _local_studies(server)
    assert specs["A"].study_uid in local and specs["B"].study_uid not in local, local
    assert "refused" in server.output() and _sop(wrong) in server.output()


def test_fetch_refuses_another_studys_instance(env: dict[str, Any]) -> None:
    """WADO-RS of study C, which the liar answers with one of C's instances and one of D's: only C's is stored and served."""
    specs, files, liar, server = env["specs"], env["files"], env["liar"], env["server"]
    liar.plan[specs["C"].study_uid] = [files["D"][0], files["C"][0]]
    url = f"http://127.0.0.1:{server.http_port}/dicomweb/studies/{specs['C'].study_uid}"
    req = urllib.request.Request(url, headers={"Accept": 'multipart/related; type="application/dicom"'})
    with urllib.request.urlopen(req, timeout=60) as rsp:
        body = rsp.read()
    assert dataset_bytes(files["C"][0])[-4096:] in body, server.output()[-3000:]
    assert _sop(files["D"][0]).encode() not in body
    local = _local_studies(server)
    assert specs["C"].study_uid in local and specs["D"].study_uid not in local, local
    # a study the liar answers only with another patient's instance: nothing stored, not found
    liar.plan[specs["D"].study_uid + ".9"] = [files["A"][0]]
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/dicomweb/studies/{specs['D'].study_uid}.9/metadata", timeout=60)
    assert exc.value.code == 404
    assert specs["D"].study_uid not in _local_studies(server)
