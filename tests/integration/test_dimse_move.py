"""C-MOVE from xdsi serve to dcmtk storescp, all inside a private network namespace.

storescp listens on every interface, so it, the xdsi under test and the
movescu/storescu that drive them run in a namespace holding only loopback.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless

from tests.integration.conftest import load
from tests.integration.dimse_support import StudySet, dataset_bytes, dcmtk_available, run, stop_processes, tool, wait_for_echo, write_config
from tests.support import netns
from tests.support.netns import NetNS
from tests.support.server import XdsiProcess

pytestmark = [
    pytest.mark.dcmtk,
    pytest.mark.skipif(not netns.available(), reason="network namespaces need root"),
]

STORESCP_PORTS = {"ACCEPTALL": 11201, "PLAIN": 11202}


@dataclass
class MoveEnv:
    ns: NetNS
    server: XdsiProcess
    received: dict[str, Path]  # destination AE -> storescp output folder

    def clear(self) -> None:
        for d in self.received.values():
            shutil.rmtree(d)
            d.mkdir()

    def movescu(self, dest: str, keys: dict[str, str], model: str = "-S") -> str:
        args = [tool("movescu"), "-v", model, "-aec", self.server.ae_title, "-aem", dest]
        for k, v in keys.items():
            args += ["-k", f"{k}={v}"]
        proc = run(self.ns.cmd(*args, self.server.host, str(self.server.dicom_port)), check=False)
        return proc.stdout + proc.stderr

    def files(self, dest: str) -> dict[str, Path]:
        return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in self.received[dest].iterdir() if p.is_file()}



@pytest.fixture(scope="module")
def move_env(tmp_path_factory: pytest.TempPathFactory, test_data: StudySet) -> Iterator[MoveEnv]:
    if not dcmtk_available():
        pytest.skip("Debian's dcmtk tools are not installed in /usr/bin")
    root = tmp_path_factory.mktemp("move")
    procs: list[subprocess.Popen[bytes]] = []
    with NetNS() as ns:
        received = {}
        try:
            for aet, port in STORESCP_PORTS.items():
                out = root / aet
                out.mkdir()
                received[aet] = out
                # ACCEPTALL takes every syntax it knows; PLAIN keeps storescp's default: uncompressed only
                accept = ["+xa"] if aet == "ACCEPTALL" else []
                cmd = ns.cmd(tool("storescp"), "-aet", aet, *accept, "+B", "-od", str(out), str(port))
                p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={"TCP_NODELAY": "1"})
                procs.append(p)
                wait_for_echo(ns, aet, port, p)
            config = write_config(root / "xdsi.toml", {aet: ("127.0.0.1", port) for aet, port in STORESCP_PORTS.items()})
            server = XdsiProcess(root / "data", config=config, prefix=ns.cmd()).start()
            try:
                load(server, test_data, prefix=ns.cmd())
                yield MoveEnv(ns, server, received)
            finally:
                server.stop()
        finally:
            stop_processes(procs)


def test_move_unknown_destination_is_a801(move_env: MoveEnv, test_data: StudySet) -> None:
    log = move_env.movescu("NOWHERE", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": test_data.spec_a.study_uid})
    # dcmtk names status A801 (and only it) "MoveDestinationUnknown"; the exact code is asserted with pynetdicom
    assert "Received Final Move Response (Refused: MoveDestinationUnknown)" in log, log


def test_move_study_is_byte_identical(move_env: MoveEnv, test_data: StudySet) -> None:
    move_env.clear()
    log = move_env.movescu("ACCEPTALL", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": test_data.spec_a.study_uid})
    assert "Received Final Move Response (Success)" in log, log
    got = move_env.files("ACCEPTALL")
    originals = test_data.by_sop()
    assert set(got) == {u for uids in test_data.series_of(test_data.spec_a).values() for u in uids}
    assert test_data.j2k.stem in got
    for sop, path in got.items():
        assert dataset_bytes(path) == dataset_bytes(originals[sop]), f"{sop} differs from what storescu sent"
    assert dcmread(got[test_data.j2k.stem], stop_before_pixels=True).file_meta.TransferSyntaxUID == JPEG2000Lossless


def test_move_patient_root_image_level(move_env: MoveEnv, test_data: StudySet) -> None:
    move_env.clear()
    series = test_data.series_of(test_data.spec_b)
    (series_uid, sops), = series.items()
    keys = {
        "QueryRetrieveLevel": "IMAGE",
        "PatientID": test_data.spec_b.patient_id,
        "StudyInstanceUID": test_data.spec_b.study_uid,
        "SeriesInstanceUID": series_uid,
        "SOPInstanceUID": sops[1],
    }
    log = move_env.movescu("ACCEPTALL", keys, model="-P")
    assert "Received Final Move Response (Success)" in log, log
    got = move_env.files("ACCEPTALL")
    assert set(got) == {sops[1]}
    assert dataset_bytes(got[sops[1]]) == dataset_bytes(test_data.by_sop()[sops[1]])


def test_move_to_uncompressed_only_peer_transcodes(move_env: MoveEnv, test_data: StudySet) -> None:
    move_env.clear()
    log = move_env.movescu("PLAIN", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": test_data.spec_a.study_uid})
    assert "Received Final Move Response (Success)" in log, log
    got = move_env.files("PLAIN")
    originals = test_data.by_sop()
    assert set(got) == {u for uids in test_data.series_of(test_data.spec_a).values() for u in uids}
    for sop, path in got.items():
        if sop != test_data.j2k.stem:
            assert dataset_bytes(path) == dataset_bytes(originals[sop])
    received = dcmread(got[test_data.j2k.stem])
    assert received.file_meta.TransferSyntaxUID in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    assert np.array_equal(received.pixel_array, dcmread(test_data.j2k).pixel_array)
