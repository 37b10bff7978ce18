"""Routing rules end to end: ``xdsi serve`` with [[routes]], modalities sending with dcmtk ``storescu``,
workstations that are real pynetdicom storage SCPs on loopback, and a second ``xdsi serve`` as a STOW-RS peer.

Every instance a workstation receives is compared with the file the modality sent: the data set bytes
when it is sent as stored, the pixels (pydicom's decoding of the original) when the route converts it.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.uid import UID, ImplicitVRLittleEndian

from tests.integration.dimse_support import StudySet, dataset_bytes, dcmtk_available, storescu
from tests.support.server import XdsiProcess, free_port, wait_until
from xdsi.tools.synth import StudySpec, write_study

pytestmark = [pytest.mark.dcmtk, pytest.mark.skipif(not dcmtk_available(), reason="Debian's dcmtk tools are not installed in /usr/bin")]


class Workstation:
    """A storage SCP (pynetdicom) that records every instance it is sent: SOP Instance UID -> [(syntax, data set bytes)]."""

    def __init__(self, aet: str, answer_after: float = 0.0) -> None:
        self.aet = aet
        self.answer_after = answer_after  # seconds each C-STORE response is held back (a slow workstation)
        self.port = free_port()
        self.received: dict[str, list[tuple[str, bytes]]] = defaultdict(list)
        self.callers: set[str] = set()
        self._lock = threading.Lock()
        self._server: Any = None

    def start(self) -> "Workstation":
        from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, evt

        ae = AE(ae_title=self.aet)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)

        def on_store(event: Any) -> int:
            time.sleep(self.answer_after)
            data = event.request.DataSet.getvalue()
            with self._lock:
                self.received[str(event.request.AffectedSOPInstanceUID)].append((str(event.context.transfer_syntax), data))
                self.callers.add(str(event.assoc.requestor.ae_title).strip())
            return 0x0000

        self._server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def count(self, uids: list[str]) -> int:
        with self._lock:
            return sum(1 for u in uids if self.received.get(u))


def _uids(files: list[Path]) -> list[str]:
    return [str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]


def _study(root: Path, name: str, n: int, **spec: Any) -> list[Path]:
    return write_study(root / name, StudySpec(**spec), per_series=n)


def _send(server: XdsiProcess, files: list[Path], calling: str, *extra: str) -> None:
    storescu(server.host, server.dicom_port, files, "-aet", calling, *extra, aec=server.ae_title)


def _status(server: XdsiProcess, config: Path) -> str:
    return subprocess.run(
        [sys.executable, "-m", "xdsi", "status", "--data-dir", str(server.data_dir), "--config", str(config)],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout


def _destination_line(status: str, dest: str) -> str:
    for line in status.splitlines():
        if line.strip().startswith(f"{dest}:"):
            return line.strip()
    return ""


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("routing")
    ws = {name: Workstation(name) for name in ("WSA", "WSB", "WSC")}
    ws["SLOW"] = Workstation("SLOW", answer_after=1.0)
    ws["WSA"].start()
    ws["WSB"].start()  # WSC starts down
    ws["SLOW"].start()
    stow_peer = XdsiProcess(root / "peer-data", ae_title="PEER").start()
    config = root / "xdsi.toml"
    config.write_text(
        "".join(f'[peers.{w.aet}]\nhost = "127.0.0.1"\nport = {w.port}\n\n' for w in ws.values())
        + f"""
[[routes]]
name = "ct1-to-a"
calling_aet = "CT1"
modality = "CT"
destinations = ["WSA"]

[[routes]]
name = "mr-to-b"
calling_aet = "MR*"
modality = "MR"
destinations = ["WSB"]

[[routes]]
name = "ct2-to-c"
calling_aet = "CT2"
destinations = ["WSC"]

[[routes]]
name = "ct3-native"
calling_aet = "CT3"
destinations = ["WSA"]
transfer_syntax = "{ImplicitVRLittleEndian}"

[[routes]]
name = "fan-out"
calling_aet = "PAR1"
destinations = ["SLOW", "WSB"]

[[routes]]
name = "web"
calling_aet = "re:WEB[0-9]"
destinations = ["http://127.0.0.1:{stow_peer.http_port}/dicomweb"]

[routing]
retry_initial = 0.3
retry_max = 1
poll_interval = 0.2
"""
    )
    server = XdsiProcess(root / "data", config=config).start()
    try:
        yield {"server": server, "ws": ws, "config": config, "root": root, "peer": stow_peer}
    finally:
        server.stop()
        stow_peer.stop()
        for w in ws.values():
            w.stop()


def test_a_ct_from_ct1_reaches_workstation_a_and_not_b(hub: dict[str, Any]) -> None:
    server, ws, root = hub["server"], hub["ws"], hub["root"]
    ct = _study(root, "ct1", 4, patient_id="R1")
    mr = _study(root, "mr1", 2, patient_id="R2", modality="MR", body_part="HEAD", description="MR HEAD")
    other = _study(root, "other", 2, patient_id="R3")
    _send(server, ct, "CT1")
    _send(server, mr, "MR7")  # B's own route: proves B receives when a route says so
    _send(server, other, "CT9")  # no route
    ct_uids, mr_uids, other_uids = _uids(ct), _uids(mr), _uids(other)
    wait_until(lambda: ws["WSA"].count(ct_uids) == 4 and ws["WSB"].count(mr_uids) == 2, 60)
    time.sleep(1.5)  # several polls: anything wrongly queued would have gone out by now
    a, b = ws["WSA"].received, ws["WSB"].received
    assert not any(u in b for u in ct_uids), "a CT from CT1 reached workstation B"
    assert not any(u in a for u in mr_uids), "an MR from MR7 reached workstation A"
    assert not any(u in a or u in b for u in other_uids), "an instance no route matches was forwarded"
    assert "XDSI" in ws["WSA"].callers
    for f, uid in zip(ct, ct_uids):
        (ts, data), = a[uid]  # exactly once
        assert ts == str(dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        assert data == dataset_bytes(f), f"{uid}: the data set bytes differ from what the modality sent"
    status = _status(server, hub["config"])
    assert _destination_line(status, "WSA").startswith("WSA: 0 queued (0 failing), 4 sent"), status
    assert "route:      ct1-to-a: calling_aet=CT1, modality=CT -> WSA" in status


def test_destination_down_then_up_across_a_restart_delivers_each_instance_once(hub: dict[str, Any]) -> None:
    server, ws, root, config = hub["server"], hub["ws"], hub["root"], hub["config"]
    files = _study(root, "ct2", 5, patient_id="R4")
    uids = _uids(files)
    _send(server, files, "CT2")
    # WSC is down: every forward fails and waits for its retry, shown by `xdsi status`
    line = wait_until(lambda: (l := _destination_line(_status(server, config), "WSC")) and re.match(r"WSC: 5 queued \(5 failing\)", l) and l, 60)
    assert line
    status = _status(server, config)
    assert re.search(r"last error .*: WSC \(127\.0\.0\.1:\d+\) could not be reached", status), status
    server.stop()  # SIGTERM while the forwards wait
    server.start()
    ws["WSC"].start()
    wait_until(lambda: ws["WSC"].count(uids) == 5, 60)
    time.sleep(2)  # retries are 0.3-1 s apart: a second delivery would have happened by now
    for f, uid in zip(files, uids):
        assert len(ws["WSC"].received[uid]) == 1, f"{uid} delivered {len(ws['WSC'].received[uid])} times"
        assert ws["WSC"].received[uid][0][1] == dataset_bytes(f)
    assert _destination_line(_status(server, config), "WSC").startswith("WSC: 0 queued (0 failing), 5 sent")


def test_kill_9_right_after_the_acknowledgement_loses_no_forward(hub: dict[str, Any]) -> None:
    """The forward is decided from the index after a restart: an acknowledged instance is routed even if
    the process died before its worker looked at it."""
    server, ws, root = hub["server"], hub["ws"], hub["root"]
    ws["WSC"].stop()
    files = _study(root, "ct2-kill", 6, patient_id="R5")
    uids = _uids(files)
    _send(server, files, "CT2")
    server.kill9()
    ws["WSC"].start()
    server.start()
    wait_until(lambda: ws["WSC"].count(uids) == 6, 60)
    time.sleep(2)
    assert all(len(ws["WSC"].received[u]) == 1 for u in uids), {u: len(ws["WSC"].received[u]) for u in uids}


def test_route_transfer_syntax_converts_and_keeps_the_pixels(hub: dict[str, Any], test_data: StudySet) -> None:
    """A JPEG 2000 lossless CT routed with transfer_syntax = Implicit VR LE: decoded, pixels identical."""
    server, ws = hub["server"], hub["ws"]
    _send(server, [test_data.j2k], "CT3", "-xv", "-R")
    (uid,) = _uids([test_data.j2k])
    wait_until(lambda: ws["WSA"].count([uid]) == 1, 60)
    (ts, data), = ws["WSA"].received[uid]
    assert UID(ts) == ImplicitVRLittleEndian
    received = read_dataset(DicomBytesIO(data), is_implicit_VR=True, is_little_endian=True)
    received.file_meta = dcmread(test_data.j2k).file_meta
    received.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    original = dcmread(test_data.j2k)
    assert original.file_meta.TransferSyntaxUID != ImplicitVRLittleEndian
    assert np.array_equal(received.pixel_array, original.pixel_array)
    assert received.SOPInstanceUID == original.SOPInstanceUID and received.PatientID == original.PatientID


def test_stow_rs_route_to_another_archive(hub: dict[str, Any]) -> None:
    server, root, peer = hub["server"], hub["root"], hub["peer"]
    files = _study(root, "web", 3, patient_id="R6")
    uids = _uids(files)
    _send(server, files, "WEB1")

    def arrived() -> list[Path]:
        found = [p for u in uids for p in peer.data_dir.rglob(f"{u}*.dcm")]
        return found if len(found) == 3 else []

    stored = wait_until(arrived, 60)
    by_uid = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in stored}
    for f, uid in zip(files, uids):
        assert dataset_bytes(by_uid[uid]) == dataset_bytes(f)
    assert _destination_line(_status(server, hub["config"]), f"http://127.0.0.1:{peer.http_port}/dicomweb").endswith("3 sent, 0 given up")


def test_xdsi_route_resends_a_study_by_hand(hub: dict[str, Any]) -> None:
    server, ws, root, config = hub["server"], hub["ws"], hub["root"], hub["config"]
    files = _study(root, "by-hand", 3, patient_id="R7")
    uids = _uids(files)
    _send(server, files, "CT1")
    wait_until(lambda: ws["WSA"].count(uids) == 3, 60)
    assert ws["WSB"].count(uids) == 0
    study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    out = subprocess.run(
        [sys.executable, "-m", "xdsi", "route", "--study", study, "--to", "WSB", "--data-dir", str(server.data_dir), "--config", str(config)],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"study {study} to WSB: 3 of 3 instance(s) sent" in out.stdout
    assert all(len(ws["WSB"].received[u]) == 1 for u in uids)
    # again: re-sent (by hand, every time it is asked)
    out = subprocess.run(
        [sys.executable, "-m", "xdsi", "route", "--study", study, "--to", "WSA", "--data-dir", str(server.data_dir), "--config", str(config)],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    time.sleep(1)
    assert all(len(ws["WSA"].received[u]) == 2 for u in uids)
    bad = subprocess.run(
        [sys.executable, "-m", "xdsi", "route", "--study", study, "--to", "NOBODY", "--data-dir", str(server.data_dir), "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )
    assert bad.returncode == 2 and "no [peers.NOBODY]" in bad.stderr


def test_stow_rs_refusal_is_not_sent_and_shows_in_status(hub: dict[str, Any]) -> None:
    """The STOW-RS peer already holds the study under another patient: it refuses that instance (409 with a
    Failed SOP Sequence) and stores the other study's; the refused forward stays queued, failing, with the reason."""
    server, root, peer, config = hub["server"], hub["root"], hub["peer"], hub["config"]
    clash = _study(root, "clash", 1, patient_id="R8")
    fine = _study(root, "fine", 1, patient_id="R9")
    theirs = dcmread(clash[0])
    theirs.PatientID = "SOMEONE-ELSE"
    theirs.SOPInstanceUID = theirs.file_meta.MediaStorageSOPInstanceUID = "2.25.4242424242424242"
    (root / "theirs").mkdir()
    theirs.save_as(root / "theirs" / "x.dcm", enforce_file_format=True)
    storescu(peer.host, peer.dicom_port, [root / "theirs" / "x.dcm"], aec=peer.ae_title)
    _send(server, clash + fine, "WEB2")
    (fine_uid,) = _uids(fine)
    wait_until(lambda: list(peer.data_dir.rglob(f"{fine_uid}*.dcm")), 60)
    dest = f"http://127.0.0.1:{peer.http_port}/dicomweb"
    line = wait_until(lambda: (l := _destination_line(_status(server, config), dest)) and "(1 failing)" in l and l, 60)
    assert "4 sent" in line  # the 3 of the earlier test and this study's other instance
    status = _status(server, config)
    assert re.search(r"last error .*: STOW-RS (409|202): failure reason", status), status
    (clash_uid,) = _uids(clash)
    assert not list(peer.data_dir.rglob(f"{clash_uid}*.dcm"))


def test_a_slow_workstation_does_not_hold_up_the_others(hub: dict[str, Any]) -> None:
    """Two destinations are sent to at once ([routing] parallel): WSB has every instance while SLOW
    (one second per C-STORE response) is still receiving; SLOW gets them all too, each once."""
    server, ws, root = hub["server"], hub["ws"], hub["root"]
    files = _study(root, "fan-out", 5, patient_id="R10")
    uids = _uids(files)
    _send(server, files, "PAR1")
    wait_until(lambda: ws["WSB"].count(uids) == 5, 60)
    assert ws["SLOW"].count(uids) < 5, "the fast workstation waited for the slow one"
    wait_until(lambda: ws["SLOW"].count(uids) == 5, 60)
    assert all(len(ws["SLOW"].received[u]) == 1 and len(ws["WSB"].received[u]) == 1 for u in uids)
