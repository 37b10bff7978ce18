"""The gateway (issue 15) against real remote PACS: two dcmtk dcmqrscp, one of them C-MOVE only (--disable-get).

Everything runs in a private network namespace: PACS1 (dcmqrscp --disable-get: find + move), PACS2
(dcmqrscp: find, move, get), a dcmtk storescp as C-MOVE destination, and ``xdsi serve`` holding
nothing of its own except the fallback partition's study.  AE titles served by xdsi:

* XDSI   [gateway] remotes PACS1, PACS2 (forward): C-FIND merged; C-GET via C-MOVE (PACS1 first);
* GW2    remote PACS2G (PACS2 offering find + get only): C-GET via C-GET, C-MOVE via C-GET;
* GWD    remotes PACS2 and DEAD (nothing listens): C-FIND with a remote down;
* FB     remote DEAD, fallback: its own study served without the remote.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import ImplicitVRLittleEndian

from tests.integration.dimse_support import dataset_bytes, dcmtk_available, run, stop_processes, storescu, tool, wait_for_echo
from tests.support import dcmqrscp as dq
from tests.support import netns
from tests.support.netns import NetNS
from tests.support.server import XdsiProcess, free_port
from xdsi.tools.synth import StudySpec, ct_instance, write_study
from xdsi.uids import new_uid

pytestmark = [
    pytest.mark.dcmtk,
    pytest.mark.skipif(not netns.available(), reason="network namespaces need root"),
]

REPO = Path(__file__).resolve().parents[2]
SILENT_LISTENER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(16)
held = []
while True:
    held.append(s.accept())
"""


@dataclass
class Env:
    ns: NetNS
    server: XdsiProcess
    root: Path
    study_a: list[Path]  # on PACS1 and PACS2 (30 CT)
    study_b: list[Path]  # on PACS2 only
    study_c: list[Path]  # local to partition FB only
    spec_a: StudySpec
    spec_b: StudySpec
    spec_c: StudySpec
    dest_dir: Path  # storescp DEST / DIRECT output
    pacs1: dq.Dcmqrscp
    pacs2: dq.Dcmqrscp
    study_d: list[Path]  # on PACS1 only, one of its files lost after indexing
    spec_d: StudySpec

    def client(self, *args: str) -> dict[str, Any]:
        proc = run(self.ns.cmd(sys.executable, "-m", "tests.integration.gateway_client", *args), cwd=REPO)
        return json.loads(proc.stdout)

    def getscu(self, aet: str, study: str, out: Path) -> str:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        proc = run(self.ns.cmd(tool("getscu"), "-v", "-S", "-aec", aet, "-od", str(out), "-k", "QueryRetrieveLevel=STUDY",
                               "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(self.server.dicom_port)), check=False)
        return proc.stdout + proc.stderr

    def movescu(self, aet: str, dest: str, study: str) -> str:
        proc = run(self.ns.cmd(tool("movescu"), "-v", "-S", "-aec", aet, "-aem", dest, "-k", "QueryRetrieveLevel=STUDY",
                               "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(self.server.dicom_port)), check=False)
        return proc.stdout + proc.stderr

    def clear_dest(self) -> None:
        shutil.rmtree(self.dest_dir)
        self.dest_dir.mkdir()

    def relay_spool(self) -> list[Path]:
        d = self.root / "data" / "tmp" / "relay"
        return list(d.iterdir()) if d.exists() else []


def _by_sop(paths: list[Path]) -> dict[str, Path]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in paths}


def _write_config(path: Path, *, p1: int, p2: int, dead: int, slow: int, dest: int) -> Path:
    path.write_text(f"""
[peers.DEST]
host = "127.0.0.1"
port = {dest}

[remotes.PACS1]
host = "127.0.0.1"
port = {p1}
services = ["find", "move"]
known_destinations = ["DIRECT"]
find_timeout = 10

[remotes.PACS2]
host = "127.0.0.1"
port = {p2}
services = ["find", "move", "get"]
find_timeout = 10

[remotes.PACS2G]
ae_title = "PACS2"
host = "127.0.0.1"
port = {p2}
services = ["find", "get"]

[remotes.DEAD]
host = "127.0.0.1"
port = {dead}
connect_timeout = 2
find_timeout = 3

[remotes.SLOW]
host = "127.0.0.1"
port = {slow}
connect_timeout = 10
find_timeout = 3

[gateway]
remotes = ["PACS1", "PACS2"]
mode = "forward"

[partitions.GW2]
[partitions.GW2.gateway]
remotes = ["PACS2G"]

[partitions.GWD]
[partitions.GWD.gateway]
remotes = ["PACS2", "DEAD", "SLOW"]

[partitions.GWC]
[partitions.GWC.gateway]
remotes = ["PACS2"]
cache = true

[partitions.FB]
[partitions.FB.gateway]
remotes = ["DEAD"]
mode = "fallback"
""")
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    if not dcmtk_available() or not dq.available():
        pytest.skip("Debian's dcmtk tools (with dcmqrscp) are not installed in /usr/bin")
    root = tmp_path_factory.mktemp("gateway")
    spec_a = StudySpec(patient_id="GWA", patient_name="REMOTE^ANNA", accession="GA1")
    spec_b = StudySpec(patient_id="GWB", patient_name="REMOTE^BEN", accession="GB1", study_date="20230301")
    spec_c = StudySpec(patient_id="GWC", patient_name="LOCAL^CARL", accession="GC1")
    study_a = write_study(root / "a", spec_a, series=2, per_series=15)
    study_b = write_study(root / "b", spec_b, series=1, per_series=4)
    study_c = write_study(root / "c", spec_c, series=1, per_series=3)
    spec_d = StudySpec(patient_id="GWD", patient_name="REMOTE^DORA", accession="GD1")
    study_d = write_study(root / "d", spec_d, series=1, per_series=5)
    procs: list[subprocess.Popen[bytes]] = []
    with NetNS() as ns:
        p1, p2, dead, slow, dest = free_port(), free_port(), free_port(), free_port(), free_port()
        server = XdsiProcess(root / "data", config=_write_config(root / "xdsi.toml", p1=p1, p2=p2, dead=dead, slow=slow, dest=dest),
                             prefix=ns.cmd())
        # SLOW: accepts connections and never says a word (a hung PACS)
        blackhole = subprocess.Popen(ns.cmd(sys.executable, "-c", SILENT_LISTENER, str(slow)), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        procs.append(blackhole)
        us = ("127.0.0.1", server.dicom_port)
        dest_dir = root / "dest"
        dest_dir.mkdir()
        storescp = subprocess.Popen(ns.cmd(tool("storescp"), "-aet", "DEST", "+B", "-od", str(dest_dir), str(dest)),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={"TCP_NODELAY": "1"})
        procs.append(storescp)
        pacs1 = dq.Dcmqrscp(ns.cmd(), root / "pacs1", "PACS1", p1, {"XDSI": us, "DIRECT": ("127.0.0.1", dest)}, get=False)
        pacs2 = dq.Dcmqrscp(ns.cmd(), root / "pacs2", "PACS2", p2, {"XDSI": us, "GW2": us, "GWD": us, "GWC": us}, get=True)
        try:
            wait_for_echo(ns, "DEST", dest, storescp)
            pacs1.load(study_a + study_d)
            (pacs1.storage / study_d[2].name).unlink()  # indexed, then lost: PACS1 fails that sub-operation
            pacs2.load(study_a + study_b)
            pacs1.start()
            pacs2.start()
            server.start(timeout=120)  # five archives to migrate on a loaded machine
            try:
                storescu(server.host, server.dicom_port, study_c, prefix=ns.cmd(), aec="FB")
                yield Env(ns, server, root, study_a, study_b, study_c, spec_a, spec_b, spec_c, dest_dir, pacs1, pacs2, study_d, spec_d)
            finally:
                server.stop()
        finally:
            pacs1.stop()
            pacs2.stop()
            stop_processes(procs)


def test_find_merged_and_deduplicated_from_two_remotes(env: Env) -> None:
    out = env.client("find", str(env.server.dicom_port), "XDSI", "STUDY", "StudyInstanceUID=", "PatientID=", "PatientName=")
    assert out["status"] == 0x0000, out
    studies = [m["StudyInstanceUID"] for m in out["matches"]]
    # A is on both remotes and comes once; B only on PACS2, D only on PACS1; C is the FB partition's, not the remotes'
    assert sorted(studies) == sorted([env.spec_a.study_uid, env.spec_b.study_uid, env.spec_d.study_uid]), out
    names = {m["StudyInstanceUID"]: m["PatientName"] for m in out["matches"]}
    assert names[env.spec_b.study_uid] == "REMOTE^BEN"


def test_find_key_not_requested_is_not_returned(env: Env) -> None:
    """The UID we add to de-duplicate is not handed back to a requester who did not ask for it."""
    out = env.client("find", str(env.server.dicom_port), "XDSI", "STUDY", "PatientID=GWB", "PatientName=")
    assert out["status"] == 0x0000, out
    assert [m.get("PatientName") for m in out["matches"]] == ["REMOTE^BEN"], out
    assert all("StudyInstanceUID" not in m for m in out["matches"]), out


def test_find_with_remotes_down_or_hung_is_a_warning_not_a_silent_success(env: Env) -> None:
    t0 = time.monotonic()
    out = env.client("find", str(env.server.dicom_port), "GWD", "STUDY", "StudyInstanceUID=", "PatientID=")
    assert out["status"] == 0xB001, out  # matches from PACS2, and a warning naming DEAD (refused) and SLOW (silent)
    assert out["comment"].startswith("incomplete: DEAD, SLOW"), out
    assert "no answer in 3 s" in out["comment"], out
    assert sorted(m["StudyInstanceUID"] for m in out["matches"]) == sorted([env.spec_a.study_uid, env.spec_b.study_uid])
    assert 3 <= time.monotonic() - t0 < 30  # SLOW's find_timeout, not its connect_timeout or forever


def _check_identical(got_dir: Path, originals: list[Path]) -> None:
    got = _by_sop([p for p in got_dir.iterdir() if p.is_file()])
    want = _by_sop(originals)
    assert set(got) == set(want)
    for sop, path in got.items():
        assert dataset_bytes(path) == dataset_bytes(want[sop]), f"{sop} differs from the remote's copy"


def test_getscu_via_cmove_from_a_move_only_pacs_is_byte_identical(env: Env) -> None:
    """C-GET served by C-MOVE (PACS1 has --disable-get); counts right; nothing cached (cache = false)."""
    out_dir = env.root / "get_a"
    seen = len(env.server.log)
    log = env.getscu("XDSI", env.spec_a.study_uid, out_dir)
    n = len(env.study_a)
    assert "Received C-GET Response (Success)" in log, log + "".join(env.server.log)
    assert f"Number of Completed Suboperations : {n}\n" in log and "Number of Failed Suboperations    : 0\n" in log, log
    _check_identical(out_dir, env.study_a)
    # two workers (one per CPU): the worker that asked PACS1 to move the study to us also took PACS1's association,
    # so every instance went from one association to the other in memory, none through the relay's inbox
    ends = [line for line in env.server.log[seen:] if f"{n} relayed" in line]
    assert len(ends) == 1 and " 0 instances received by another process," in ends[0], "".join(env.server.log[seen:])
    # and none waited on disk: the remote held back by our responses never gets far enough ahead of getscu
    assert ends[0].rstrip().endswith(" 0 waited on disk"), ends[0]
    assert not env.relay_spool()
    # cache = false: nothing of it was archived (QIDO-RS answers from the local index only)
    studies = run(env.ns.cmd("curl", "-sf", f"http://127.0.0.1:{env.server.http_port}/dicomweb/studies")).stdout
    assert env.spec_a.study_uid not in studies, studies


def test_get_via_cmove_counts(env: Env) -> None:
    out = env.client("get", str(env.server.dicom_port), "XDSI", env.spec_a.study_uid)
    n = len(env.study_a)
    assert out["status"] == 0x0000, out
    assert (out["completed"], out["failed"], out["warning"]) == (n, 0, 0), out
    assert sorted(out["received"]) == sorted(_by_sop(env.study_a)), out
    assert out["pendings"] == n  # one Pending response per relayed instance, as it arrived


def test_get_via_cmove_converted_for_an_implicit_only_requester(env: Env) -> None:
    """The remote sends Explicit VR LE; the requester accepts Implicit only: converted, pixels unchanged."""
    out_dir = env.root / "get_implicit"
    out_dir.mkdir()
    out = env.client("get", str(env.server.dicom_port), "XDSI", env.spec_b.study_uid, "--implicit-only", "--out", str(out_dir))
    assert out["status"] == 0x0000 and out["completed"] == len(env.study_b), out
    want = _by_sop(env.study_b)
    got = _by_sop(list(out_dir.iterdir()))
    assert set(got) == set(want)
    for sop, path in got.items():
        ds = dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        assert np.array_equal(ds.pixel_array, dcmread(want[sop]).pixel_array), sop


def test_get_via_cmove_cancel_midway(env: Env) -> None:
    out = env.client("get", str(env.server.dicom_port), "XDSI", env.spec_a.study_uid, "--cancel-after", "3")
    n = len(env.study_a)
    assert out["status"] == 0xFE00, out
    got = len(out["received"])
    assert 3 <= got < n, out
    assert out["completed"] == got, out
    assert out["remaining"] == n - got - out["failed"] - out["warning"], out
    deadline = time.time() + 15  # the remote's own end of the cancelled C-MOVE, then the spool is clean
    while env.relay_spool() and time.time() < deadline:
        time.sleep(0.2)
    assert not env.relay_spool()
    # the gateway is still usable afterwards
    again = env.client("get", str(env.server.dicom_port), "XDSI", env.spec_b.study_uid)
    assert again["status"] == 0x0000 and again["completed"] == len(env.study_b), again


def test_get_via_cget(env: Env) -> None:
    out_dir = env.root / "get_gw2"
    log = env.getscu("GW2", env.spec_b.study_uid, out_dir)
    assert "Received C-GET Response (Success)" in log, log
    _check_identical(out_dir, env.study_b)


def test_move_forwarded_to_a_destination_the_remote_knows(env: Env) -> None:
    env.clear_dest()
    # B is on PACS2 only, which does not know DIRECT, and neither do we: A801, nothing sent
    log = env.movescu("XDSI", "DIRECT", env.spec_b.study_uid)
    assert "Received Final Move Response (Refused: MoveDestinationUnknown)" in log, log
    assert not list(env.dest_dir.iterdir())
    log = env.movescu("XDSI", "DIRECT", env.spec_a.study_uid)  # DIRECT is in PACS1's table, not in ours
    assert "Received Final Move Response (Success)" in log, log
    _check_identical(env.dest_dir, env.study_a)


def test_move_relayed_through_us_by_cmove(env: Env) -> None:
    env.clear_dest()
    log = env.movescu("XDSI", "DEST", env.spec_a.study_uid)  # PACS1 does not know DEST: moved to us, relayed
    assert "Received Final Move Response (Success)" in log, log
    _check_identical(env.dest_dir, env.study_a)


def test_move_relayed_by_cget(env: Env) -> None:
    env.clear_dest()
    log = env.movescu("GW2", "DEST", env.spec_b.study_uid)  # PACS2G offers get only
    assert "Received Final Move Response (Success)" in log, log
    _check_identical(env.dest_dir, env.study_b)


def test_move_to_unknown_destination_is_a801(env: Env) -> None:
    log = env.movescu("XDSI", "NOWHERE", env.spec_a.study_uid)
    assert "Received Final Move Response (Refused: MoveDestinationUnknown)" in log, log


def test_fallback_serves_local_study_without_the_remote(env: Env) -> None:
    out_dir = env.root / "get_fb"
    log = env.getscu("FB", env.spec_c.study_uid, out_dir)  # FB's remote is DEAD: touching it would fail
    assert "Received C-GET Response (Success)" in log, log
    _check_identical(out_dir, env.study_c)
    found = env.client("find", str(env.server.dicom_port), "FB", "STUDY", "StudyInstanceUID=", "PatientID=")
    assert found["status"] == 0x0000 and [m["PatientID"] for m in found["matches"]] == ["GWC"], found


def test_fallback_forwards_what_it_does_not_hold(env: Env) -> None:
    out = env.client("get", str(env.server.dicom_port), "FB", env.spec_a.study_uid)
    assert out["status"] == 0xA702 and "DEAD" in out["comment"], out  # forwarded to DEAD: a clear failure
    assert out["received"] == []


def test_get_via_cmove_counts_what_the_remote_failed(env: Env) -> None:
    """PACS1 cannot read one file of study D: that sub-operation is failed, with its UID; the rest relayed."""
    lost = str(dcmread(env.study_d[2], stop_before_pixels=True).SOPInstanceUID)
    out = env.client("get", str(env.server.dicom_port), "XDSI", env.spec_d.study_uid)
    n = len(env.study_d)
    assert out["status"] == 0xB000, out
    assert (out["completed"], out["failed"], out["warning"]) == (n - 1, 1, 0), out
    assert sorted(out["received"]) == sorted(set(_by_sop(env.study_d)) - {lost}), out
    assert out["failed_uids"] == [lost], out


def test_get_with_cache_keeps_what_was_relayed(env: Env) -> None:
    out = env.client("get", str(env.server.dicom_port), "GWC", env.spec_b.study_uid)
    assert out["status"] == 0x0000 and out["completed"] == len(env.study_b), out
    url = f"http://127.0.0.1:{env.server.http_port}/dicomweb/GWC/studies/{env.spec_b.study_uid}/instances"
    proc = run(env.ns.cmd("curl", "-sf", url))
    cached = {i["00080018"]["Value"][0] for i in json.loads(proc.stdout)}
    assert cached == set(_by_sop(env.study_b))
    # the cached copies are what the remote sent (by C-GET, in the syntax this requester accepted): same pixels
    data = env.root / "data" / "partitions" / "GWC"
    stored = _by_sop([p for p in (data / "storage").rglob("*") if p.is_file()])
    for sop, path in _by_sop(env.study_b).items():
        assert np.array_equal(dcmread(stored[sop]).pixel_array, dcmread(path).pixel_array), sop
    assert not env.relay_spool()


def test_rad69_of_a_study_only_a_remote_holds(env: Env) -> None:
    """RAD-69 (xdsi retrieve) on the main AE: study A is fetched from PACS1 (C-MOVE to us), cached, then served."""
    by_sop = _by_sop(env.study_a)
    first = dcmread(env.study_a[0], stop_before_pixels=True)
    series = str(first.SeriesInstanceUID)
    sops = [s for s, p in by_sop.items() if str(dcmread(p, stop_before_pixels=True).SeriesInstanceUID) == series][:3]
    out_dir = env.root / "rad69"
    url = f"http://127.0.0.1:{env.server.http_port}/xdsi/ImagingDocumentSource"
    args = ["retrieve", url, "--data-dir", str(env.root / "data"), "--study", env.spec_a.study_uid, "--series", series,
            "--out", str(out_dir), "--no-progress"]
    for sop in sops:
        args += ["--instance", sop]
    run(env.ns.cmd(sys.executable, "-m", "xdsi", *args), cwd=REPO)
    got = _by_sop([p for p in out_dir.rglob("*") if p.is_file()])
    assert set(got) == set(sops)
    for sop in sops:
        assert dataset_bytes(got[sop]) == dataset_bytes(by_sop[sop]), sop
    assert "fetched study" in "".join(env.server.log)
    assert not env.relay_spool()


def test_wado_uri_of_a_study_only_a_remote_holds(env: Env) -> None:
    """WADO-URI on the main AE: study B is fetched from PACS2 (it offers C-GET), then served byte for byte."""
    sop, path = next(iter(_by_sop(env.study_b).items()))
    series = str(dcmread(path, stop_before_pixels=True).SeriesInstanceUID)
    out = env.root / "wado.dcm"
    url = (f"http://127.0.0.1:{env.server.http_port}/wado?requestType=WADO&studyUID={env.spec_b.study_uid}"
           f"&seriesUID={series}&objectUID={sop}&contentType=application/dicom")
    run(env.ns.cmd("curl", "-sf", "-o", str(out), url))
    assert dataset_bytes(out) == dataset_bytes(path)
    # a study no remote holds is still a 404, after asking
    missing = run(env.ns.cmd("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                             f"http://127.0.0.1:{env.server.http_port}/wado?requestType=WADO&studyUID=1.2.3.999"
                             f"&seriesUID=1.2.3.998&objectUID=1.2.3.997&contentType=application/dicom"), check=False)
    assert missing.stdout.strip() == "404", missing.stdout


def test_find_cancel_is_passed_on(env: Env) -> None:
    """GWD's SLOW remote keeps the query open for 3 s: the C-CANCEL after the first match always comes before the end."""
    t0 = time.monotonic()
    proc = run(env.ns.cmd(tool("findscu"), "-v", "-S", "--cancel", "1", "-aec", "GWD", "-k", "QueryRetrieveLevel=STUDY",
                          "-k", "StudyInstanceUID", "127.0.0.1", str(env.server.dicom_port)), check=False)
    log = proc.stdout + proc.stderr
    assert "Received Final Find Response (Cancel: MatchingTerminatedDueToCancelRequest)" in log, log
    assert time.monotonic() - t0 < 2.5, "the cancel waited for the hung remote"
    # the gateway answers the next query normally
    out = env.client("find", str(env.server.dicom_port), "XDSI", "STUDY", f"StudyInstanceUID={env.spec_b.study_uid}")
    assert out["status"] == 0 and len(out["matches"]) == 1, out


def test_invalid_uids_are_refused_before_reaching_a_remote(env: Env) -> None:
    found = env.client("find", str(env.server.dicom_port), "XDSI", "STUDY", "StudyInstanceUID=1.2.abc", "PatientID=")
    assert found["status"] == 0xA900 and "not a valid UID" in found["comment"] and found["matches"] == [], found
    got = env.client("get", str(env.server.dicom_port), "XDSI", "1.2.3.04")  # a leading zero: not a UID
    assert got["status"] == 0xA900 and got["received"] == [], got
    log = env.movescu("XDSI", "DEST", "9..9")
    assert "Received Final Move Response (Error: DataSetDoesNotMatchSOPClass)" in log, log  # dcmtk's name for A900


def test_wado_rs_of_a_study_only_a_remote_holds(env: Env) -> None:
    """WADO-RS study retrieve on the main AE: study D is fetched from PACS1 (C-MOVE to us), then served byte for byte.

    PACS1 lost one file of D after indexing it, so the fetch stores the others and WADO-RS serves
    exactly those; none was held here before (the C-GET of D earlier went through without caching).
    """
    import io

    from xdsi.wire.multipart import PartData, PartStart, iter_events

    held = {sop: p for sop, p in _by_sop(env.study_d).items() if p.name != env.study_d[2].name}
    before = "".join(env.server.log).count(f"fetched study {env.spec_d.study_uid}")
    body, headers = env.root / "wado-rs.bin", env.root / "wado-rs.headers"
    url = f"http://127.0.0.1:{env.server.http_port}/dicomweb/studies/{env.spec_d.study_uid}"
    run(env.ns.cmd("curl", "-sf", "-D", str(headers), "-o", str(body), "-H", 'Accept: multipart/related; type="application/dicom"', url))
    assert "".join(env.server.log).count(f"fetched study {env.spec_d.study_uid}") == before + 1
    ctype = next(line for line in headers.read_text().splitlines() if line.lower().startswith("content-type:"))
    boundary = ctype.split("boundary=", 1)[1].split(";")[0].strip().strip('"')
    parts: list[bytearray] = []
    for ev in iter_events(io.BytesIO(body.read_bytes()), boundary):
        if isinstance(ev, PartStart):
            parts.append(bytearray())
        elif isinstance(ev, PartData):
            parts[-1] += ev.data
    got = {}
    for i, data in enumerate(parts):
        p = env.root / f"wado-rs-{i}.dcm"
        p.write_bytes(bytes(data))
        got[str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)] = p
    assert set(got) == set(held)
    for sop, p in got.items():
        assert dataset_bytes(p) == dataset_bytes(held[sop]), sop
