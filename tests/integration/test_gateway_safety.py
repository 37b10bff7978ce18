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
from contextlib import ExitStack, contextmanager
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
from tests.support import rsyslog
from tests.support.audit_schema import event
from tests.support.server import XdsiProcess, free_port
from xdsi.tools.synth import StudySpec, write_study


SOURCE_ID = "XDSI-HUB-SAFETY"


class Liar:
    """A C-MOVE SCP that sends, for each Study Instance UID asked, the files the test planned for it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.plan: dict[str, list[Path]] = {}
        self.statuses: list[int] = []  # C-STORE statuses xdsi answered, in order
        self.xdsi_port = 0
        ae = AE(ae_title="LIAR")
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])  # the files' own encoding: sent unchanged
        ae.dimse_timeout = ae.network_timeout = 30
        self.ae = ae
        self.server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_MOVE, self.on_move)])

    def on_move(self, event: Any) -> Iterator[Any]:
        files = self.plan.get(str(event.identifier.StudyInstanceUID), [])
        yield "127.0.0.1", self.xdsi_port
        yield len(files)
        # pynetdicom's C-MOVE SCP writes its OWN AE title as the sub-operations' Move Originator AE Title (PS3.7 wants
        # the C-MOVE requester's, as dcmqrscp writes); the sub-association is open by now (called from LIAR), so the
        # AE's title is the requester's while the C-STOREs go out
        self.ae.ae_title = str(event.assoc.requestor.ae_title).strip()
        try:
            for p in files:
                if event.is_cancelled:
                    yield 0xFE00, None
                    return
                yield 0xFF00, dcmread(p)
        finally:
            self.ae.ae_title = "LIAR"

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("gwsafety")
    specs = {k: StudySpec(patient_id=f"SAFE{k}", patient_name=f"SAFETY^{k}", accession=f"SA{k}") for k in "ABCDE"}
    files = {k: write_study(root / k, s, series=1, per_series=3) for k, s in specs.items()}
    liar = Liar(free_port())
    stack = ExitStack()
    dest = stack.enter_context(_destination())
    repo = stack.enter_context(rsyslog.running_if_available(root / "arr"))  # the audit assertions need it, the rest not
    audit = f'[audit]\nrepositories = ["{repo.udp_url}"]\naudit_source_id = "{SOURCE_ID}"\nretry_seconds = 0.2\n' if repo else ""
    cfg = root / "xdsi.toml"
    cfg.write_text(audit + f"""
[remotes.LIAR]
host = "127.0.0.1"
port = {liar.port}
services = ["move"]
connect_timeout = 5

[peers.DEST]
host = "127.0.0.1"
port = {dest["port"]}

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
            yield {"root": root, "specs": specs, "files": files, "liar": liar, "server": server, "repo": repo, "dest": dest}
        finally:
            server.stop()
    finally:
        liar.stop()
        stack.close()


@contextmanager
def _destination() -> Iterator[dict[str, Any]]:
    """A C-MOVE destination (pynetdicom storage SCP, AE DEST): the raw data sets it received, by SOP Instance UID."""
    got: dict[str, bytes] = {}

    def on_store(event: Any) -> int:
        got[str(event.request.AffectedSOPInstanceUID)] = event.encoded_dataset(include_meta=False)
        return 0x0000

    ae = AE(ae_title="DEST")
    ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian])
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        yield {"port": port, "got": got}
    finally:
        server.shutdown()


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
    assert server.logged(_sop(wrong)) and "refused" in server.output()


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


# -- the audit trail (issue 15): what was relayed and fetched, the remote named ------------------------------------


def _participants(root: Any) -> list[tuple[str | None, str | None, str | None]]:
    """(UserID, UserIsRequestor, RoleIDCode) of each ActiveParticipant, in order ."""
    out = []
    for ap in root.findall("ActiveParticipant"):
        role = ap.find("RoleIDCode")
        out.append((ap.get("UserID"), ap.get("UserIsRequestor"), None if role is None else role.get("csd-code")))
    return out


def _about(root: Any, study_uid: str) -> bool:
    return any(o.get("ParticipantObjectID") == study_uid for o in root.findall("ParticipantObjectIdentification"))


def _wait(repo: Any, pred: Any, n: int, seconds: float = 20.0) -> list[Any]:
    import time

    deadline = time.monotonic() + seconds
    got: list[Any] = []
    while time.monotonic() < deadline:
        got = [r for r in repo.audit_messages(SOURCE_ID) if pred(r)]  # each checked against the PS3.15 schema
        if len(got) >= n:
            time.sleep(0.3)
            return [r for r in repo.audit_messages(SOURCE_ID) if pred(r)]
        time.sleep(0.1)
    return got


def test_relayed_and_fetched_instances_are_audited(env: dict[str, Any]) -> None:
    repo, specs, files, liar, server = env["repo"], env["specs"], env["files"], env["liar"], env["server"]
    if repo is None:
        pytest.skip("needs Debian rsyslog + rsyslog-gnutls (scripts/test installs them)")
    study = specs["A"].study_uid
    if study not in liar.plan:  # run alone: the relay of the first test
        test_cget_via_cmove_refuses_another_studys_instance(env)
    transferred = _wait(repo, lambda r: event(r)[0] == "110104" and _about(r, study), 2)
    by_action = {event(r)[1]: r for r in transferred}
    assert sorted(by_action) == ["C", "R"], [event(r) for r in transferred]
    # received from the remote: LIAR is the Source, we the Destination;
    # the refused instance of another patient's study makes it outcome 4, described, and not counted
    received = by_action["C"]
    assert event(received)[2] == "4"
    assert "refused as not asked for" in received.find("EventIdentification/EventOutcomeDescription").text
    counts = {sc.get("UID"): sc.get("NumberOfInstances") for sc in received.iter("SOPClass")}
    assert counts == {"1.2.840.10008.5.1.4.1.1.2": "3"}, counts
    assert not any(_about(r, specs["B"].study_uid) for r in repo.audit_messages(SOURCE_ID)), "the refused study is not audited as transferred"
    sent = by_action["R"]
    assert event(sent)[2] == "0"
    # we (Source), the C-GET requester (Destination, requestor), the remote (no role)
    assert _participants(sent) == [("XDSI", "false", "110153"), ("VIEWER", "true", "110152"), ("LIAR", "false", None)]
    assert _participants(received)[:2] == [("LIAR", "false", "110153"), ("XDSI", "false", "110152")]  # the remote, then us
    assert ("VIEWER", "true", None) in _participants(received)
    # the on-demand fetch of study C: Import, the remote as Source
    if specs["C"].study_uid not in liar.plan:
        test_fetch_refuses_another_studys_instance(env)
    (imported,) = _wait(repo, lambda r: event(r)[0] == "110107" and _about(r, specs["C"].study_uid), 1)
    assert event(imported)[1:] == ("C", "4")  # one instance of another study was refused
    assert _participants(imported) == [("LIAR", "false", "110153"), ("XDSI", "true", "110152")]  # the remote, then us who asked


def test_cmove_relayed_to_a_destination_refuses_another_studys_instance(env: dict[str, Any]) -> None:
    """C-MOVE to DEST (a [peers] entry LIAR does not know): moved to us, relayed; the other patient's instance stops here."""
    specs, files, liar, server, dest = env["specs"], env["files"], env["liar"], env["server"], env["dest"]
    liar.plan[specs["E"].study_uid] = [files["E"][0], files["A"][0], files["E"][1]]
    ae = AE(ae_title="MOVER")
    ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title="XDSI")
    assert assoc.is_established
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = specs["E"].study_uid
    final: Any = None
    for st, _rsp in assoc.send_c_move(ident, "DEST", StudyRootQueryRetrieveInformationModelMove, msg_id=1):
        if "Status" in st and int(st.Status) not in (0xFF00, 0xFF01):
            final = st
    assoc.release()
    assert final is not None and int(final.Status) == 0xB000, final
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (2, 1), final
    want = {_sop(p): p for p in files["E"][:2]}
    assert set(dest["got"]) == set(want), sorted(dest["got"])
    for sop, raw in dest["got"].items():
        assert raw == dataset_bytes(want[sop]), sop
    assert _sop(files["A"][0]) not in dest["got"]
