"""``xdsi serve --workers 2``: shared listeners, a worker killed and restarted, clean stop, audit sent once.

Real peers: Debian's dcmtk storescu/getscu (by /usr/bin path, TCP_NODELAY=1) and pynetdicom for C-FIND;
Debian's rsyslogd as the audit repository.  The server is a real process tree (the supervisor and two
workers, each a ``python -m xdsi.supervisor``); pids are read from /proc.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import requests
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

from tests.integration.dimse_support import dcmtk_available, run, tool
from tests.support import rsyslog
from tests.support.server import XdsiProcess, children_of, process_alive, wait_until
from xdsi.tools.synth import StudySpec, write_study

pytestmark = [pytest.mark.dcmtk]

STUDIES = 4
PER_STUDY = 12
SOURCE_ID = "XDSI-WORKERS"


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> list[list[Path]]:
    root = tmp_path_factory.mktemp("studies")
    return [
        write_study(root / f"s{i}", StudySpec(patient_id=f"PW{i}", accession=f"ACCW{i}"), series=2, per_series=PER_STUDY // 2, rows=128, columns=128)
        for i in range(STUDIES + 1)  # the last one is stored after a worker was killed
    ]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[rsyslog.Rsyslog | None]:
    with rsyslog.running_if_available(tmp_path_factory.mktemp("arr")) as r:
        yield r


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, repo: rsyslog.Rsyslog | None) -> Iterator[XdsiProcess]:
    if not dcmtk_available():
        pytest.skip("Debian's dcmtk tools are not installed in /usr/bin")
    d = tmp_path_factory.mktemp("workers")
    config = d / "xdsi.toml"
    config.write_text(f'[audit]\nrepositories = ["{repo.udp_url}"]\naudit_source_id = "{SOURCE_ID}"\nretry_seconds = 0.2\n' if repo else "")
    proc = XdsiProcess(d / "data", config=config, env={"TCP_NODELAY": "1"}, workers=2).start()
    try:
        yield proc
    finally:
        assert proc.stop(timeout=60) == 0, proc.output()[-3000:]


def worker_pids(server: XdsiProcess) -> list[int]:
    """Worker 0's pid first, as the supervisor logged them at start."""
    m = re.search(r"2 workers serving \(pids (\d+), (\d+)\)", server.output())
    assert m, server.output()
    return [int(m.group(1)), int(m.group(2))]


def storescu(server: XdsiProcess, files: list[Path]) -> subprocess.Popen[str]:
    return subprocess.Popen([tool("storescu"), "-aet", "STORESCU", "-aec", "XDSI", server.host, str(server.dicom_port), *map(str, files)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "TCP_NODELAY": "1"})


def find_studies(server: XdsiProcess) -> dict[str, int]:
    """Study Instance UID -> Number of Study Related Instances, by C-FIND at study level."""
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(server.host, server.dicom_port, ae_title="XDSI")
    assert assoc.is_established
    from pydicom.dataset import Dataset

    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = ""
    q.NumberOfStudyRelatedInstances = ""
    found: dict[str, int] = {}
    try:
        for status, ident in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind):
            assert status is not None and status.Status in (0x0000, 0xFF00, 0xFF01), status
            if status.Status in (0xFF00, 0xFF01):
                found[str(ident.StudyInstanceUID)] = int(ident.NumberOfStudyRelatedInstances)
    finally:
        assoc.release()
    return found


def echo(server: XdsiProcess) -> bool:
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate(server.host, server.dicom_port, ae_title="XDSI")
    if not assoc.is_established:
        return False
    try:
        rsp = assoc.send_c_echo()
        return bool(rsp) and rsp.Status == 0
    finally:
        assoc.release()


def same_pixels(got: Path, original: Path) -> None:
    a, b = dcmread(got), dcmread(original)
    assert a.SOPInstanceUID == b.SOPInstanceUID
    assert np.array_equal(a.pixel_array, b.pixel_array), f"{got.name}: pixels differ from the original"


def test_four_parallel_associations_store_find_and_get(cluster: XdsiProcess, studies: list[list[Path]], tmp_path: Path) -> None:
    senders = [storescu(cluster, files) for files in studies[:STUDIES]]
    for p in senders:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out
        assert "Failed" not in out and "E:" not in out, out
    expected = {str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID): files for files in studies[:STUDIES]}
    assert find_studies(cluster) == {uid: PER_STUDY for uid in expected}
    for uid, files in expected.items():  # each retrieve on its own association: both workers answer some
        out = tmp_path / uid
        out.mkdir()
        run([tool("getscu"), "-S", "-aet", "GETSCU", "-aec", "XDSI", "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={uid}",
             "-od", str(out), cluster.host, str(cluster.dicom_port)])
        got = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in out.iterdir()}
        originals = {f.stem: f for f in files}
        assert set(got) == set(originals)
        for sop, path in got.items():
            same_pixels(path, originals[sop])


def connections_by_worker(server: XdsiProcess, workers: list[int]) -> list[int]:
    """Established connections on the DICOM port held by each worker (its socket inodes in /proc/net/tcp*)."""
    established: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if int(f[1].rsplit(":", 1)[1], 16) == server.dicom_port and f[3] == "01":
                established.add(f[9])
    counts = []
    for pid in workers:
        inodes = set()
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        counts.append(len(inodes & established))
    return counts


def associate_at_once(server: XdsiProcess, n: int, acse_timeout: float = 30) -> list[object]:
    """``n`` associations requested together (a barrier before each connect), Verification only."""
    barrier = threading.Barrier(n)

    def one(_i: int) -> object:
        ae = AE(ae_title=f"AT{_i}ONCE")
        ae.acse_timeout = acse_timeout
        ae.add_requested_context(Verification)
        barrier.wait(10)
        return ae.associate(server.host, server.dicom_port, ae_title="XDSI")

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def wait_all_serving(server: XdsiProcess) -> None:
    """Both workers run and serve (every restart the supervisor announced has been followed by "serving again")."""
    out = server.output
    wait_until(lambda: len(server.children()) == 2 and out().count("serving again") >= out().count("; restarting in"), 60)


def release_all(server: XdsiProcess, assocs: list[object]) -> None:
    for a in assocs:
        if a.is_established:  # type: ignore[attr-defined]
            a.release()  # type: ignore[attr-defined]
    wait_until(lambda: sum(connections_by_worker(server, server.children())) == 0, 15)


def test_associations_requested_together_are_spread_evenly(cluster: XdsiProcess) -> None:
    """Issue 14: 4 associations at once over 2 workers land 2+2, every time (load-aware accept)."""
    workers = worker_pids(cluster)
    shapes = []
    for _ in range(12):
        assocs = associate_at_once(cluster, 4)
        try:
            assert all(a.is_established for a in assocs)  # type: ignore[attr-defined]
            for a in assocs:  # each one answers, whichever worker holds it
                assert a.send_c_echo().Status == 0  # type: ignore[attr-defined]
            shapes.append(connections_by_worker(cluster, workers))
        finally:
            release_all(cluster, assocs)
    assert shapes == [[2, 2]] * len(shapes), shapes


def test_a_stopped_worker_does_not_hold_connections_back(cluster: XdsiProcess) -> None:
    """A worker alive but not accepting (SIGSTOP: busy, swapped out) is waited for a moment only: the other serves all."""
    workers = worker_pids(cluster)
    os.kill(workers[1], signal.SIGSTOP)
    try:
        started = time.monotonic()
        assocs = associate_at_once(cluster, 4, acse_timeout=10)
        took = time.monotonic() - started
        try:
            assert all(a.is_established for a in assocs), "a connection was left to the stopped worker"  # type: ignore[attr-defined]
            assert connections_by_worker(cluster, workers) == [4, 0]
            assert took < 8, took  # 3 deferrals of 0.1 s, on a busy machine
        finally:
            os.kill(workers[1], signal.SIGCONT)
            release_all(cluster, assocs)
    finally:
        os.kill(workers[1], signal.SIGCONT)


def test_killed_worker_is_restarted_and_service_goes_on(cluster: XdsiProcess, studies: list[list[Path]]) -> None:
    before = set(cluster.children())
    assert len(before) == 2, cluster.output()[-2000:]
    primary = worker_pids(cluster)[0]
    assert primary in before
    os.kill(primary, signal.SIGKILL)  # worker 0: the one running the background jobs
    assert echo(cluster), "the other worker must answer while worker 0 is restarted"
    after = wait_until(lambda: (lambda c: c if len(c) == 2 and primary not in c else None)(set(children_of(cluster.pid))), 60)
    assert len(after & before) == 1  # one survivor, one new worker
    wait_until(lambda: "worker 0 serving again" in cluster.output(), 60)
    assert "killed by SIGKILL" in cluster.output()
    p = storescu(cluster, studies[STUDIES])
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    uid = str(dcmread(studies[STUDIES][0], stop_before_pixels=True).StudyInstanceUID)
    for _ in range(4):  # several associations: whichever worker takes each, the new study is there
        assert find_studies(cluster).get(uid) == PER_STUDY


def test_connections_are_served_at_once_while_a_worker_is_dead(cluster: XdsiProcess) -> None:
    """A dead worker (its liveness lock gone with it) is not waited for: the survivor takes 4 at once, then the
    restarted worker gets its share again."""
    wait_all_serving(cluster)
    restarts = cluster.output().count("serving again")
    survivor, victim = cluster.children()
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: not process_alive(victim), 10)
    assocs = associate_at_once(cluster, 4, acse_timeout=10)
    try:
        assert all(a.is_established for a in assocs)  # type: ignore[attr-defined]
        assert connections_by_worker(cluster, [survivor]) == [4]
    finally:
        release_all(cluster, assocs)
    wait_until(lambda: cluster.output().count("serving again") > restarts, 60)
    workers = [survivor, next(pid for pid in cluster.children() if pid != survivor)]
    assocs = associate_at_once(cluster, 4)
    try:
        assert all(a.is_established for a in assocs)  # type: ignore[attr-defined]
        assert connections_by_worker(cluster, workers) == [2, 2]
    finally:
        release_all(cluster, assocs)


def test_audit_messages_from_both_workers_arrive_once(cluster: XdsiProcess, repo: rsyslog.Rsyslog | None, studies: list[list[Path]]) -> None:
    if repo is None:
        pytest.skip("needs Debian rsyslog + rsyslog-gnutls (scripts/test installs them)")
    stored = {str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID) for files in studies}

    def transfers() -> Counter[str]:
        seen: Counter[str] = Counter()
        for msg in repo.audit_messages(SOURCE_ID):
            event = msg.find("EventIdentification")
            if event.find("EventID").get("csd-code") != "110104" or event.get("EventActionCode") != "C":  # received, not sent by C-GET
                continue
            for po in msg.findall("ParticipantObjectIdentification"):
                if po.get("ParticipantObjectID") in stored:
                    seen[str(po.get("ParticipantObjectID"))] += 1
        return seen

    # every study stored (four in parallel, one after worker 0 was restarted) is reported; give the sender time
    wait_until(lambda: set(transfers()) == stored, 30)
    time.sleep(2.0)  # a duplicate from a second sender would come within its 1 s poll
    assert set(transfers().values()) == {1}, transfers()
    bodies = [line.split(" ", 3)[3] for line in repo.lines() if SOURCE_ID in line]
    dupes = [b[:200] for b, n in Counter(bodies).items() if n > 1]
    assert not dupes, f"{len(dupes)} message(s) delivered more than once"
    started = [m for m in repo.audit_messages(SOURCE_ID) if m.find("EventIdentification/EventID").get("csd-code") == "110100"]
    # Application Start once for the node, not again when worker 0 was restarted; every message names the application
    assert len(started) == 1, len(started)
    # QIDO-RS queries, audited with our process id (Alternative User ID), whichever worker answers each
    for _ in range(6):
        r = requests.get(f"http://127.0.0.1:{cluster.http_port}/dicomweb/studies", params={"PatientID": "PW0"}, timeout=30)
        assert r.status_code == 200 and len(r.json()) == 1

    def pids() -> set[str]:
        return {u.get("AlternativeUserID") for m in repo.audit_messages(SOURCE_ID) for u in m.findall("ActiveParticipant")
                if (u.get("AlternativeUserID") or "").isdigit()}

    wait_until(pids, 30)
    assert pids() == {str(cluster.pid)}, f"process ids in the messages: {pids()}, the supervisor's: {cluster.pid}"


def test_sigterm_stops_every_worker(tmp_path: Path) -> None:
    server = XdsiProcess(tmp_path / "data", workers=2).start()
    workers = server.children()
    assert len(workers) == 2
    status = subprocess.run([sys.executable, "-m", "xdsi", "status", "--data-dir", str(server.data_dir)], capture_output=True, text=True, timeout=60)
    assert re.search(rf"^serving:    pid {server.pid} since ", status.stdout, re.M), status.stdout  # the supervisor, once
    assert f"workers:    2 worker processes under pid {server.pid}" in status.stdout, status.stdout
    ae = AE(ae_title="IDLE")
    ae.add_requested_context(Verification)
    assoc = ae.associate(server.host, server.dicom_port, ae_title="XDSI")  # an open association must not hold a worker
    assert assoc.is_established
    try:
        started = time.monotonic()
        assert server.stop(timeout=60) == 0, server.output()
        assert time.monotonic() - started < 30
    finally:
        if assoc.is_established:
            assoc.abort()
    alive = [pid for pid in workers if process_alive(pid)]
    assert not alive, f"orphaned workers {alive}"
    assert server.output().count("stopping") >= 3  # the supervisor and both workers said so


def test_workers_die_with_a_killed_supervisor(tmp_path: Path) -> None:
    server = XdsiProcess(tmp_path / "data", workers=2).start()
    workers = server.children()
    assert len(workers) == 2
    server.kill9()  # the supervisor only: PR_SET_PDEATHSIG takes the workers, nobody keeps the ports
    wait_until(lambda: not any(process_alive(pid) for pid in workers), 15)
    again = XdsiProcess(tmp_path / "data", workers=2)
    again.dicom_port, again.http_port = server.dicom_port, server.http_port  # the same ports bind again at once
    again.start()
    try:
        assert echo(again)
    finally:
        assert again.stop(timeout=60) == 0


def _cpus(text: str) -> set[int]:
    """A kernel CPU list ("0-1,3") as a set."""
    out: set[int] = set()
    for part in text.strip().split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def thread_cpus(workers: list[int]) -> dict[int, list[set[int]]]:
    """Per worker pid: the CPU set of each of its threads."""
    out: dict[int, list[set[int]]] = {}
    for pid in workers:
        out[pid] = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                status = (task / "status").read_text()
            except OSError:
                continue
            out[pid].append(_cpus(status.split("Cpus_allowed_list:", 1)[1].split("\n", 1)[0]))
    return out


def pinned_threads(workers: list[int]) -> dict[int, list[set[int]]]:
    """Per worker pid: the CPU sets of its threads that may not run on every CPU this test may use."""
    allowed = os.sched_getaffinity(0)
    return {pid: [c for c in cpus if c != allowed] for pid, cpus in thread_cpus(workers).items()}


def loads(data: Path) -> list[int]:
    """The accept balance's connection counters of the node's workers (xdsi.dimse.accept_balance)."""
    import struct

    (f,) = (data / ".workers").glob("accept-load-*")
    b = f.read_bytes()
    return [struct.unpack_from("<q", b, 8 * i)[0] for i in range(2)]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_association_threads_keep_to_their_workers_cpu_while_the_node_is_busy(tmp_path: Path) -> None:
    """Issue 14 (xdsi.dimse.affinity): one association alone runs anywhere; with one per CPU on the node every
    thread of a worker holding one is pinned to its worker's CPU (the two workers' CPUs differ); when one goes,
    they are freed again at the other's next C-STORE.  Read back from /proc, on a real ``xdsi serve --workers 2``."""
    from pynetdicom.sop_class import CTImageStorage

    files = write_study(tmp_path / "src", StudySpec(patient_id="PWAFF"), series=1, per_series=6, rows=32, columns=32)
    server = XdsiProcess(tmp_path / "data", env={"TCP_NODELAY": "1"}, workers=2).start()
    assocs: list[object] = []
    try:
        workers = worker_pids(server)
        wait_until(lambda: loads(tmp_path / "data") == [0, 0], 15)  # the start-up probe's connection counted no more
        wait_until(lambda: pinned_threads(workers) == {w: [] for w in workers}, 15)

        def associate() -> object:
            ae = AE(ae_title="AFFINITY")
            ae.add_requested_context(CTImageStorage)
            a = ae.associate(server.host, server.dicom_port, ae_title="XDSI")
            assert a.is_established  # type: ignore[attr-defined]
            assocs.append(a)
            return a

        def store(a: object, f: Path) -> None:
            assert a.send_c_store(dcmread(f)).Status == 0  # type: ignore[attr-defined]

        first = associate()
        store(first, files[0])
        assert pinned_threads(workers) == {w: [] for w in workers}  # one connection on a 2-CPU node: not busy
        second = associate()
        store(second, files[1])
        store(first, files[2])  # the first looks again before its C-STORE: the node is busy now
        held = connections_by_worker(server, workers)
        cpus = thread_cpus(workers)
        busy = [w for w, n in zip(workers, held) if n]  # the workers holding an association pinned all their threads
        assert busy, held
        for w in busy:
            assert len({frozenset(c) for c in cpus[w]}) == 1 and len(cpus[w][0]) == 1, cpus
        if len(busy) == 2:  # one per worker (the usual spread): each on a CPU of its own
            assert cpus[busy[0]][0] != cpus[busy[1]][0], cpus
        second.release()  # type: ignore[attr-defined]
        wait_until(lambda: sum(connections_by_worker(server, workers)) == 1, 15)

        seen: list[object] = []

        def freed() -> bool:
            store(first, files[3])  # a duplicate after the first time: still a C-STORE, still looked at
            seen[:] = [pinned_threads(workers), loads(tmp_path / "data")]
            return seen[0] == {w: [] for w in workers}

        try:
            wait_until(freed, 15)
        except AssertionError:
            raise AssertionError(f"still pinned (threads, node loads): {seen}") from None
    finally:
        for a in assocs:
            if a.is_established:  # type: ignore[attr-defined]
                a.release()  # type: ignore[attr-defined]
        assert server.stop(timeout=60) == 0, server.output()[-3000:]


def test_cpu_affinity_off_pins_nothing(tmp_path: Path) -> None:
    """``[server] cpu_affinity = "off"``: two associations on a 2-worker node, no thread pinned."""
    config = tmp_path / "xdsi.toml"
    config.write_text('[server]\ncpu_affinity = "off"\n')
    server = XdsiProcess(tmp_path / "data", config=config, env={"TCP_NODELAY": "1"}, workers=2).start()
    try:
        workers = worker_pids(server)
        assocs = associate_at_once(server, 2)
        try:
            for a in assocs:
                assert a.send_c_echo().Status == 0  # type: ignore[attr-defined]
            assert pinned_threads(workers) == {w: [] for w in workers}
        finally:
            release_all(server, assocs)
    finally:
        assert server.stop(timeout=60) == 0, server.output()[-3000:]
