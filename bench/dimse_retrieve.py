#!/usr/bin/env python3
"""C-GET and C-MOVE of one study: xdsi against Orthanc (and dcmtk storescp as the move destination), one run.

    python bench/dimse_retrieve.py [--instances 200] [--size 512] [--rounds 3] [--pdu 16384] [--only get|move]
                                   [--against BASE_TREE] [--no-orthanc] [--profile OUT.svg|OUT.txt]

Needs root and Debian's dcmtk and orthanc (see ``/work/shared/peers/README.md``, or ``--peers DIR``).
The script re-executes itself in its own network namespace (``BENCH_NETNS``,
default ``bench-get-perf``), where it starts Orthanc, a storescp and ``xdsi
serve`` on ports of their own (``BENCH_PORT_BASE``), loads the same study into
xdsi (imported) and Orthanc (by storescu), and then, alternating the two servers
each round (ABBA), times:

- C-GET: dcmtk ``getscu`` at STUDY level, receiving into a folder (``--ignore``
  with ``--discard``), every instance counted;
- C-MOVE: dcmtk ``movescu`` to the storescp, whose files are counted.

It prints each server's MB/s and CPU (ms per instance, the process and its children) per round, the
medians and the per-round ratio xdsi/Orthanc: only ratios measured in one run mean anything on a shared machine.
``--against DIR`` also serves a copy of the data from another source tree (e.g. ``git archive BASE | tar -x -C DIR``)
in the same rounds and prints this tree/base.  ``--profile`` runs py-spy on the xdsi server during three extra
C-GETs (C-MOVEs with ``--only move``; ``PYSPY_GIL=1`` samples only the thread holding the GIL).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.peers import Netns, count_files, peer, py_spy, remove_work, stop_peer, tree_cpu  # noqa: E402

NS = Netns.from_env("bench-get-perf", 24200)
GETSCU, MOVESCU, STORESCU = "/usr/bin/getscu", "/usr/bin/movescu", "/usr/bin/storescu"


def run(cmd: list[str], timeout: float = 600) -> tuple[float, str]:
    """Wall time and output of a dcmtk client run; raises with its output if it fails."""
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "TCP_NODELAY": "1"})
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
    return dt, r.stdout + r.stderr


def c_get(port: int, aet: str, study_uid: str, out: Path, pdu: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    dt, _ = run([GETSCU, "-aet", "BENCH", "-aec", aet, "-pdu", str(pdu), "-S", "-k", "QueryRetrieveLevel=STUDY",
              "-k", f"StudyInstanceUID={study_uid}", "-od", str(out), "127.0.0.1", str(port)])
    return dt


def c_move(port: int, aet: str, study_uid: str) -> float:
    """Wall time; the final response must be Success (PS3.4 C.4.2.3.1: every sub-operation completed)."""
    dt, out = run([MOVESCU, "-v", "-aet", "BENCH", "-aec", aet, "-aem", "STORESCP", "-S", "-k", "QueryRetrieveLevel=STUDY",
                   "-k", f"StudyInstanceUID={study_uid}", "127.0.0.1", str(port)])
    if "Received Final Move Response (Success)" not in out:
        raise RuntimeError(f"C-MOVE did not end in Success:\n{out[-3000:]}")
    return dt


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--instances", type=int, default=200)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pdu", type=int, default=16384, help="getscu's maximum receive PDU (dcmtk default 16384)")
    p.add_argument("--only", choices=["get", "move"], help="run only one of the two")
    p.add_argument("--no-orthanc", action="store_true", help="xdsi alone (e.g. while profiling)")
    p.add_argument("--profile", type=Path, help="py-spy profile of xdsi during 3 extra C-GETs (C-MOVEs with --only move): a flame graph (.svg) or collapsed stacks (any other suffix)")
    p.add_argument("--against", type=Path, help="also serve a copy of the data from this source tree (a git worktree "
                   "of the base revision), alternating with this one: before/after ratio from one run")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args(argv)
    rc = NS.enter(__file__, argv, GETSCU, MOVESCU, STORESCU)
    if rc is not None:
        return rc

    from bench.common import machine
    from tests.support.server import XdsiProcess
    from xdsi.archive import Archive
    from xdsi.config import Settings
    from xdsi.tools.synth import StudySpec, write_study

    work = Path(tempfile.mkdtemp(prefix="xdsi-bench-dimse-retrieve-"))
    env = NS.peer_env(work, STORESCP_OPTS="--ignore")
    started: list[str] = []
    proc = base = None
    try:
        spec = StudySpec(patient_id="BENCHGET", patient_name="BENCH^RETRIEVE")
        files = write_study(work / "in", spec, series=1, per_series=args.instances, rows=args.size, columns=args.size)
        total = sum(f.stat().st_size for f in files)
        data = work / "data"
        archive = Archive.open(Settings(data_dir=data))
        for f in files:
            archive.store.store_file(f, move=False)
        archive.close()
        print(f"study: {args.instances} x {args.size}x{args.size} CT, {total / 1e6:.1f} MB; pdu {args.pdu}; {machine()}")

        storescp_port = NS.port(3)
        peer("start_storescp.sh", env, "--fresh")
        started.append("storescp")
        if not args.no_orthanc:
            peer("start_orthanc.sh", env, "--fresh")
            started.append("orthanc")
            run([STORESCU, "-aet", "BENCH", "-aec", "ORTHANC", "+sd", "127.0.0.1", str(NS.port(1)), str(work / "in")])

        config = work / "xdsi.toml"
        config.write_text(f'[peers.STORESCP]\nhost = "127.0.0.1"\nport = {storescp_port}\n')
        # `python -m xdsi` puts the working directory first on sys.path, ahead of PYTHONPATH: each server runs in its own tree
        proc = XdsiProcess(data, config=config, prefix=["env", "-C", str(ROOT)], env={"XDSI_LOG_LEVEL": os.environ.get("XDSI_LOG_LEVEL", "WARNING"), "TCP_NODELAY": "1", "PYTHONPATH": str(ROOT),
                                "XDSI_WORKERS": "1"}).start(timeout=60)  # one worker: CPU and py-spy sample this pid
        servers = {"xdsi": (proc.dicom_port, proc.ae_title)}
        pids = {"xdsi": proc.proc.pid}
        if args.against:
            shutil.copytree(data, work / "data-base")
            base = XdsiProcess(work / "data-base", config=config, prefix=["env", "-C", str(args.against)],
                               env={"XDSI_LOG_LEVEL": "WARNING", "TCP_NODELAY": "1", "PYTHONPATH": str(args.against), "XDSI_WORKERS": "1"}).start(timeout=60)
            servers["base"] = (base.dicom_port, base.ae_title)
            pids["base"] = base.proc.pid
        if not args.no_orthanc:
            servers["orthanc"] = (NS.port(1), "ORTHANC")
            pids["orthanc"] = int((work / "peers" / "orthanc" / "orthanc.pid").read_text().strip())

        kinds = [k for k in ("get", "move") if args.only in (None, k)]
        mbps: dict[tuple[str, str], list[float]] = {(k, s): [] for k in kinds for s in servers}
        cpu: dict[tuple[str, str], list[float]] = {(k, s): [] for k in kinds for s in servers}  # server CPU ms per instance
        names = list(servers)
        for rnd in range(args.rounds + 1):  # round 0 warms the page cache and both servers; not counted
            order = names if rnd % 2 else names[::-1]
            for kind in kinds:
                for name in order:
                    port, aet = servers[name]
                    cpu0 = tree_cpu(pids[name])
                    if kind == "get":
                        out = work / "got"
                        dt = c_get(port, aet, spec.study_uid, out, args.pdu)
                        n = count_files(out)
                    else:  # storescp --ignore keeps no files: the final response's count says what it took
                        dt, n = c_move(port, aet, spec.study_uid), args.instances
                    used = (tree_cpu(pids[name]) - cpu0) * 1000 / args.instances
                    if n != args.instances:
                        raise RuntimeError(f"C-{kind.upper()} from {name} delivered {n} of {args.instances} instances")
                    if rnd:
                        mbps[(kind, name)].append(total / 1e6 / dt)
                        cpu[(kind, name)].append(used)
                        print(f"round {rnd} C-{kind.upper()} {name:8s} {dt:6.2f} s {total / 1e6 / dt:7.1f} MB/s  server CPU {used:.2f} ms/instance")
        for kind in kinds:
            x = mbps[(kind, "xdsi")]
            line = f"C-{kind.upper()} median: xdsi {statistics.median(x):.1f} MB/s ({min(x):.0f}-{max(x):.0f})"
            if "orthanc" in servers:
                o = mbps[(kind, "orthanc")]
                ratios = [a / b for a, b in zip(x, o)]
                line += (f", Orthanc {statistics.median(o):.1f} MB/s ({min(o):.0f}-{max(o):.0f}); "
                         f"xdsi/Orthanc {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")
            print(line)
            print(f"C-{kind.upper()} server CPU ms/instance (median): "
                  + ", ".join(f"{name} {statistics.median(cpu[(kind, name)]):.2f}" for name in servers))
            if "base" in servers:
                b = mbps[(kind, "base")]
                ratios = [a / c for a, c in zip(x, b)]
                line = (f"C-{kind.upper()} median: base ({args.against}) {statistics.median(b):.1f} MB/s ({min(b):.0f}-{max(b):.0f}); "
                        f"this tree/base {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")
                if "orthanc" in servers:
                    ro = [c / o for c, o in zip(b, mbps[(kind, "orthanc")])]
                    line += f"; base/Orthanc {statistics.median(ro):.2f}"
                print(line)

        if args.profile:
            with py_spy(proc.proc.pid, args.profile, wait=30):
                for _ in range(3):  # C-MOVEs with --only move, else C-GETs
                    if args.only == "move":
                        c_move(proc.dicom_port, proc.ae_title, spec.study_uid)
                    else:
                        c_get(proc.dicom_port, proc.ae_title, spec.study_uid, work / "got", args.pdu)
            print(f"profile: {args.profile}")
    except Exception:
        if proc is not None:
            print("xdsi log (last 60 lines):\n" + "".join(proc.log[-400:]), file=sys.stderr)
        raise
    finally:
        for server in (proc, base):
            if server is not None:
                server.stop()
        if "orthanc" in started:
            stop_peer("stop_orthanc.sh", env, "--wipe")
        if "storescp" in started:
            stop_peer("stop_storescp.sh", env, "--wipe")
        remove_work(work, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
