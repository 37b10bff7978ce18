"""``[[prefetch]]`` from remote PACS (issue 15 item 4): an ORM whose patient's priors are split between our cold
tier and a remote (dcmtk ``dcmqrscp --disable-get``: C-FIND and C-MOVE only, as most PACS) brings exactly the
rule's priors to the first tier (ours recalled, the remote's fetched by C-MOVE to us), byte for byte, and
pushes them to the rule's workstation.

Everything runs in a private network namespace: ``xdsi serve`` (HL7 listener on, gateway off, the rule naming
the remote), PACS1 (dcmqrscp), DEAD (nothing listens: its failure is reported, the rest of the job is done)
and a dcmtk storescp as the workstation.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from pydicom import dcmread
from sqlalchemy import select

from tests.conftest import make_settings
from tests.integration.dimse_support import dataset_bytes, dcmtk_available, stop_processes, tool, wait_for_echo
from tests.support import dcmqrscp as dq
from tests.support import netns
from tests.support.netns import NetNS
from tests.support.tiers import study_tiers
from tests.support.server import XdsiProcess, free_port
from xdsi.archive import Archive
from xdsi.index.models import Study
from xdsi.tools.synth import StudySpec, write_study

pytestmark = [
    pytest.mark.dcmtk,
    pytest.mark.skipif(not netns.available(), reason="network namespaces need root"),
]

YEAR = date.today().year
SEND_ORM = """
import sys
from hl7.client import MLLPClient
port, pid, acc = int(sys.argv[1]), sys.argv[2], sys.argv[3]
msg = "\\r".join([
    "MSH|^~\\\\&|RIS|HOSP|XDSI|RAD|20261130101500||ORM^O01|PFR1|P|2.3.1",
    f"PID|||{pid}^^^HOSP||DOE^JANE||19700101|F",
    "PV1||I|WARD3^301^B^HOSP",
    f"ORC|NW|PL{acc}|FL{acc}||SC||^^^20261201090000||20261130|||1234^HOUSE^GREGORY",
    f"OBR|1|PL{acc}|FL{acc}|CTCHEST^CT Chest^LOCAL||||||||||||||{acc}||||||CT",
]) + "\\r"
with MLLPClient("127.0.0.1", port) as c:
    print(c.send_message(msg).decode(errors="replace"))
"""

FULL_BACKLOG = """
import socket, sys, time
s = socket.socket()
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(0)
held = []
for _ in range(3):  # fill the accept queue; connects beyond it wait (their SYNs are dropped)
    c = socket.socket(); c.setblocking(False)
    try:
        c.connect(("127.0.0.1", int(sys.argv[1])))
    except BlockingIOError:
        pass
    held.append(c)
time.sleep(0.5)
print("full", flush=True)
time.sleep(3600)
"""

# name -> (where, spec); the rule: CT, last 4 studies, within 6 years
PRIORS = {
    "ct-1y-local": ("local", StudySpec(study_date=f"{YEAR - 1}0301", accession="L1")),
    "ct-2y-remote": ("remote", StudySpec(study_date=f"{YEAR - 2}0301", accession="R2")),
    "mr-2y-local": ("local", StudySpec(study_date=f"{YEAR - 2}0601", accession="L2", modality="MR", body_part="HEAD")),
    "mr-2y-remote": ("remote", StudySpec(study_date=f"{YEAR - 2}0901", accession="R9", modality="MR", body_part="HEAD")),
    "ct-3y-remote": ("remote", StudySpec(study_date=f"{YEAR - 3}0301", accession="R3")),
    "ct-4y-both": ("both", StudySpec(study_date=f"{YEAR - 4}0301", accession="B4")),
    "ct-5y-remote": ("remote", StudySpec(study_date=f"{YEAR - 5}0301", accession="R5")),  # beyond last_studies = 4
    "ct-8y-remote": ("remote", StudySpec(study_date=f"{YEAR - 8}0301", accession="R8")),  # beyond years = 6
    "other-patient": ("remote", StudySpec(patient_id="PFR999", study_date=f"{YEAR - 1}0601", accession="X1")),
    "ordered": ("remote", StudySpec(study_date=f"{YEAR}0101", accession="NEWACC")),  # the order's own study: no prior
}
WANTED = ["ct-1y-local", "ct-2y-remote", "ct-3y-remote", "ct-4y-both"]


@dataclass
class Env:
    ns: NetNS
    server: XdsiProcess
    root: Path
    files: dict[str, list[Path]]
    dest_dir: Path
    hl7_port: int
    config: Path


def _config(root: Path, *, hl7: int, pacs: int, dead: int, dest: int, slow: int) -> Path:
    tiers = "\n".join(f'[[storage.tiers]]\nname = "{n}"\npath = "{root / "storage" / n}"\n' for n in ("cache", "warm", "cold"))
    path = root / "xdsi.toml"
    path.write_text(f"""
[index]
url = "sqlite:///{root / 'data' / 'index.sqlite'}"

{tiers}
[hl7]
port = {hl7}

[peers.WS1]
host = "127.0.0.1"
port = {dest}

[remotes.PACS1]
host = "127.0.0.1"
port = {pacs}
services = ["find", "move"]
find_timeout = 20

[remotes.DEAD]
host = "127.0.0.1"
port = {dead}
connect_timeout = 2
find_timeout = 3

[remotes.SLOW]
ae_title = "SLOWPACS"
host = "127.0.0.1"
port = {slow}
services = ["find", "move", "get"]

[gateway]
remotes = ["PACS1"]
mode = "fallback"

[partitions.GW2]
[partitions.GW2.gateway]
remotes = ["PACS1", "SLOW"]
cache = true

[[prefetch]]
name = "ct-priors"
triggers = ["ORM^O01"]
modalities = ["CT"]
years = 6
last_studies = 4
push_to = "WS1"
remotes = ["DEAD", "PACS1"]
""")
    return path


def _settings(root: Path):  # type: ignore[no-untyped-def]
    return make_settings(root, f"sqlite:///{root / 'data' / 'index.sqlite'}", tiers=3)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    if not dcmtk_available() or not dq.available():
        pytest.skip("Debian's dcmtk tools (with dcmqrscp) are not installed in /usr/bin")
    root = tmp_path_factory.mktemp("prefetch_remote")
    files = {name: write_study(root / name, replace(spec, patient_id=spec.patient_id if spec.patient_id != "PAT001" else "PFR1"),
                               series=1, per_series=3, rows=32, columns=32)
             for name, (_, spec) in PRIORS.items()}
    # ours, all on the cold tier
    archive = Archive.open(_settings(root))
    try:
        for name, (where, _) in PRIORS.items():
            if where in ("local", "both"):
                for p in files[name]:
                    assert archive.store.store_file(p).ok
        with archive.index.read_session() as s:
            for pk in s.scalars(select(Study.pk)).all():
                assert not archive.policy.move_study(pk, "cache", "cold").errors
    finally:
        archive.close()
    procs: list[subprocess.Popen[bytes]] = []
    with NetNS() as ns:
        hl7, pacs_port, dead, dest, slow = free_port(), free_port(), free_port(), free_port(), free_port()
        config = _config(root, hl7=hl7, pacs=pacs_port, dead=dead, dest=dest, slow=slow)
        server = XdsiProcess(root / "data", config=config, prefix=ns.cmd())
        # SLOW: a listener whose accept queue is full and never drained: further SYNs go unanswered (a host behind a firewall)
        full = subprocess.Popen(ns.cmd(sys.executable, "-c", FULL_BACKLOG, str(slow)), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        procs.append(full)
        assert full.stdout is not None and full.stdout.readline().strip() == b"full"
        dest_dir = root / "ws1"
        dest_dir.mkdir()
        storescp = subprocess.Popen(ns.cmd(tool("storescp"), "-aet", "WS1", "+B", "-od", str(dest_dir), str(dest)),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={"TCP_NODELAY": "1"})
        procs.append(storescp)
        pacs = dq.Dcmqrscp(ns.cmd(), root / "pacs1", "PACS1", pacs_port, {"XDSI": ("127.0.0.1", server.dicom_port)}, get=False)
        try:
            wait_for_echo(ns, "WS1", dest, storescp)
            pacs.load([p for name, (where, _) in PRIORS.items() if where in ("remote", "both") for p in files[name]])
            pacs.start()
            server.start(timeout=120)
            try:
                yield Env(ns, server, root, files, dest_dir, hl7, config)
            finally:
                server.stop()
        finally:
            pacs.stop()
            stop_processes(procs)


def _jobs(root: Path) -> list[tuple[str, str, int, int, int, str]]:
    with sqlite3.connect(f"file:{root / 'data' / 'index.sqlite'}?mode=ro", uri=True) as db:
        return db.execute("SELECT rule, state, studies, recalled, pushed, error FROM hl7_prefetch_job").fetchall()



def test_orm_brings_exactly_the_rules_priors_from_cold_tier_and_remote(env: Env) -> None:
    uid = {name: str(dcmread(env.files[name][0], stop_before_pixels=True).StudyInstanceUID) for name in PRIORS}
    ack = subprocess.run(env.ns.cmd(sys.executable, "-c", SEND_ORM, str(env.hl7_port), "PFR1", "NEWACC"),
                         capture_output=True, text=True, timeout=60)
    assert "MSA|AA|PFR1" in ack.stdout, ack.stdout + ack.stderr
    deadline = time.time() + 180
    while time.time() < deadline:
        jobs = _jobs(env.root)
        if jobs and all(j[1] in ("done", "failed") for j in jobs):
            break
        time.sleep(0.5)
    [(rule, state, studies, ready, pushed, error)] = _jobs(env.root)
    log = env.server.output()
    # DEAD's failure is the job's only error: the priors were still brought in and pushed
    assert (rule, state, studies) == ("ct-priors", "failed", 4), (error, log)
    assert error.startswith("remote DEAD:") and ";" not in error, (error, log)
    assert (ready, pushed) == (4 * 3, 4 * 3), (error, log)

    archive = Archive.open(_settings(env.root))
    try:
        tiers = study_tiers(archive)
        for name, (where, _) in PRIORS.items():
            if name in WANTED:
                want = {"cache"} if where == "remote" else {"cache", "cold"}  # fetched onto the first tier / recalled to it
            else:
                want = {"cold"} if where in ("local", "both") else None  # untouched, or never fetched
            assert tiers.get(uid[name]) == want, name
        # what the first tier holds is the original, byte for byte (fetched: the data set the remote sent; recalled: the file)
        for name in WANTED:
            originals = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in env.files[name]}
            refs = archive.retrieve.select(study_uids=[uid[name]])
            assert sorted(r.sop_instance_uid for r in refs) == sorted(originals), name
            for ref in refs:
                assert ref.copies[0][0] == "cache"
                path = archive.tiers["cache"].abspath(ref.copies[0][1])
                orig = originals[ref.sop_instance_uid]
                if PRIORS[name][0] == "remote":
                    assert dataset_bytes(path) == dataset_bytes(orig), name
                else:
                    assert path.read_bytes() == orig.read_bytes(), name
                assert np.array_equal(dcmread(path).pixel_array, dcmread(orig).pixel_array), name
    finally:
        archive.close()
    # the workstation received exactly the rule's priors, as they were
    got = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in env.dest_dir.iterdir() if p.is_file()}
    want = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for name in WANTED for p in env.files[name]}
    assert set(got) == set(want)
    for sop, p in got.items():
        assert dataset_bytes(p) == dataset_bytes(want[sop])


def test_status_shows_remotes_reachability_and_gateway_per_ae(env: Env) -> None:
    out = subprocess.run(env.ns.cmd(sys.executable, "-m", "xdsi", "status", "--config", str(env.config), "--data-dir",
                                    str(env.root / "data")), capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    block = lines[lines.index("remotes:") + 1:]
    rows = {line.split()[0]: line for line in block if line.startswith("  ") and not line.startswith("  gateway")}
    assert set(rows) == {"PACS1", "DEAD", "SLOW"}, out.stdout
    assert rows["PACS1"].split()[1:4] == ["PACS1@127.0.0.1:" + rows["PACS1"].split(":")[1].split()[0], "find,", "move"]
    assert " reachable in " in rows["PACS1"], rows
    assert " refused in " in rows["DEAD"], rows
    slow = rows["SLOW"]
    assert "SLOWPACS@127.0.0.1:" in slow and "find, move, get" in slow and " timed out in " in slow, rows
    assert 2500 <= int(slow.rsplit(" in ", 1)[1].split()[0]) < 10000, slow  # the probe's 3 s, not the remote's connect_timeout
    assert "  gateway XDSI: fallback to PACS1" in block, out.stdout
    assert "  gateway GW2: forward to PACS1, SLOW (cache)" in block, out.stdout
