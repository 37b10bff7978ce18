#!/usr/bin/env python3
"""C-STORE ingest: xdsi against dcmtk storescp +B (the ceiling) and Orthanc, in one run, alternating rounds (ABBA).

    python bench/ingest.py [-n 500] [--rows 512] [--cols 512] [--rounds 3] [--associations K] [--workers N]
                           [--no-orthanc] [--no-storescp] [--against BASE_TREE] [--profile OUT.svg|OUT.txt] [--strace OUT]
                           [--pg | --index-url URL] [--keep]

Needs root and Debian's dcmtk and orthanc (see ``/work/shared/peers/README.md``; ``BENCH_PEERS`` names
another folder).  The script re-executes itself in its own network namespace (``BENCH_NETNS``, default
``bench-ingest``) where it starts storescp +B, Orthanc and ``xdsi serve`` on ports of their own
(``BENCH_PORT_BASE``).  Each round every receiver starts empty (fresh data folder) and Debian's
``storescu`` sends the same N CT images to it, over one association or, with ``--associations K``, K
storescu processes in parallel, each with its share.  Figures per receiver: wall time of the storescu
run(s) (association set-up to release) as inst/s and MB/s, and the server's CPU time (user + system of
the server process and its children, from ``/proc``) per instance.

The order of receivers alternates each round (ABBA), and the summary gives the median of the per-round
ratios xdsi/storescp and xdsi/Orthanc: only ratios measured in one run mean anything on a shared machine.
After each round the receiver must hold exactly N instances (xdsi: index rows; Orthanc: its statistics;
storescp: files), and a sample of xdsi's stored files must be byte-identical to what was sent.

``--workers N`` is passed to ``xdsi serve`` only if its ``--help`` lists the flag.  ``--against DIR`` also
runs xdsi from another source tree (e.g. ``git worktree add DIR BASE``) in the same rounds and prints
this tree/base.  ``--profile`` records py-spy (``--native`` off) on xdsi during one extra round.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.peers import (STORESCU, Netns, create_cost, peer, py_spy, release_pages, remove_work, reported_mb, scratch,  # noqa: E402
                         set_aside, settle_inodes, settle_writeback, stop_peer, thread_cpu, tree_split)

NS = Netns.from_env("bench-ingest", 24600)


def generate(out: Path, n: int, rows: int, cols: int) -> int:
    """Write n CT instances of one study (100 per series); returns the total bytes written."""
    from xdsi.tools.synth import StudySpec, ct_instance
    from xdsi.uids import new_uid

    out.mkdir(parents=True)
    spec = StudySpec(patient_id="BENCH01", patient_name="BENCH^INGEST")
    total = 0
    series_uid = ""
    for i in range(n):
        if i % 100 == 0:
            series_uid = new_uid()
        ds = ct_instance(spec, series_uid, i % 100 + 1, rows=rows, columns=cols, series_number=i // 100 + 1, seed=i)
        p = out / f"{i:06d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        total += p.stat().st_size
    return total


def split(src: Path, k: int) -> list[Path]:
    """K folders of hard links, instance i in folder i mod K: one per parallel storescu."""
    if k == 1:
        return [src]
    parts = [src.parent / f"{src.name}.part{j}" for j in range(k)]
    for d in parts:
        d.mkdir(exist_ok=True)
    for i, f in enumerate(sorted(src.iterdir())):
        target = parts[i % k] / f.name
        if not target.exists():
            os.link(f, target)
    return parts


def send(port: int, aet: str, folders: list[Path]) -> float:
    """Wall time of one storescu per folder, all at once; every one must succeed."""
    env = {**os.environ, "TCP_NODELAY": "1"}
    t = time.perf_counter()
    procs = [
        subprocess.Popen([STORESCU, "-aet", "BENCH", "-aec", aet, "+sd", "127.0.0.1", str(port), str(f)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for f in folders
    ]
    outs = [p.communicate(timeout=1800)[0] for p in procs]
    dt = time.perf_counter() - t
    for p, out in zip(procs, outs):
        if p.returncode != 0:
            raise RuntimeError(f"storescu to {aet}:{port} failed ({p.returncode}):\n{out[-3000:]}")
    return dt


@dataclass
class Receiver:
    """One C-STORE SCP under test: how to start it empty, stop it, find its pid and count what it holds."""

    name: str
    port: int = 0
    aet: str = ""
    pid: int = 0
    inst_s: list[float] = field(default_factory=list)
    mb_s: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def count(self) -> int: ...
    def check(self, sources: list[Path]) -> None: ...
    def written(self) -> Path | None: ...  # the folder a round fills, truncated once checked (bench.peers.release_pages)


class Storescp(Receiver):
    def __init__(self, env: dict[str, str], work: Path) -> None:
        super().__init__("storescp", NS.port(3), "STORESCP")
        self.env, self.dir, self.root = env, work / "peers" / "storescp", work

    def start(self) -> None:
        set_aside(self.dir / "data", self.root)  # not deleted during the run (bench.peers: the scratch file system)
        peer("start_storescp.sh", self.env, "--fresh")
        self.pid = int((self.dir / "storescp.pid").read_text())

    def stop(self) -> None:
        stop_peer("stop_storescp.sh", self.env)

    def count(self) -> int:
        return sum(1 for p in (self.dir / "data").rglob("*") if p.is_file())

    def written(self) -> Path | None:
        return self.dir / "data"


class Orthanc(Receiver):
    def __init__(self, env: dict[str, str], work: Path) -> None:
        super().__init__("orthanc", NS.port(1), "ORTHANC")
        self.env, self.dir, self.root = env, work / "peers" / "orthanc", work

    def start(self) -> None:
        set_aside(self.dir / "storage", self.root)
        peer("start_orthanc.sh", self.env, "--fresh")
        self.pid = int((self.dir / "orthanc.pid").read_text())

    def stop(self) -> None:
        stop_peer("stop_orthanc.sh", self.env)

    def written(self) -> Path | None:
        return self.dir / "storage"

    def count(self) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{NS.port(2)}/statistics", timeout=30) as r:
            return int(json.load(r)["CountInstances"])


EATMYDATA = Path("/usr/lib/x86_64-linux-gnu/libeatmydata.so")  # Debian's eatmydata: fsync and friends do nothing


class Xdsi(Receiver):
    def __init__(self, name: str, tree: Path, work: Path, args: argparse.Namespace, env: dict[str, str] | None = None) -> None:
        super().__init__(name)
        self.tree, self.work, self.args, self.root = tree, work / name, args, work
        self.extra_env = env or {}
        self.proc = None
        self.pg = None
        self.index_url = ""

    def start(self) -> None:
        from tests.support.server import XdsiProcess

        set_aside(self.work, self.root)
        data = self.work / "data"
        self.index_url = self.args.index_url or f"sqlite:///{data / 'index.sqlite'}"
        if self.args.pg:
            from tests.support.postgres import PostgresServer

            if self.pg is None:
                self.pg = PostgresServer().start()
            self.index_url = self.pg.create_database(f"bench{int(time.time() * 1000)}")
        env = {"XDSI_INDEX_URL": self.index_url, "XDSI_LOG_LEVEL": "WARNING", "TCP_NODELAY": "1",
               "PYTHONPATH": str(self.tree), **self.extra_env}
        config = None
        if self.args.workers is not None and workers_supported(self.tree):
            config = self.work / "xdsi.toml"
            self.work.mkdir(parents=True, exist_ok=True)
            config.write_text(f"[server]\nworkers = {self.args.workers}\n")
        # cwd = the tree: ``python -m xdsi`` imports from the current directory first
        self.proc = XdsiProcess(data, env=env, config=config, prefix=["env", "-C", str(self.tree)]).start(timeout=120)
        self.port, self.aet = self.proc.dicom_port, self.proc.ae_title
        self.pid = self.proc.proc.pid

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def written(self) -> Path | None:
        return self.work

    def close(self) -> None:
        self.stop()
        if self.pg is not None:
            self.pg.stop()

    def count(self) -> int:
        from sqlalchemy import func, select

        from xdsi.index.db import open_index
        from xdsi.index.models import Instance

        index = open_index(self.index_url, migrate=False)
        try:
            with index.session() as s:
                return int(s.scalar(select(func.count()).select_from(Instance)) or 0)
        finally:
            index.dispose()

    def check(self, sources: list[Path]) -> None:
        """A sample of stored files: the data set bytes after the File Meta group are the ones sent."""
        from xdsi.archive.header import dataset_start
        from xdsi.storage.tiers import instance_path
        from pydicom import dcmread

        for src in random.Random(len(sources)).sample(sources, min(5, len(sources))):
            ds = dcmread(src, stop_before_pixels=True)
            stored = self.work / "data" / "storage" / instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
            if not stored.exists():
                hits = list((self.work / "data").rglob(f"{ds.SOPInstanceUID}*.dcm"))
                stored = hits[0] if hits else stored
            with open(src, "rb") as a, open(stored, "rb") as b:
                oa, ob = dataset_start(a)[1], dataset_start(b)[1]
                a.seek(oa)
                b.seek(ob)
                if a.read() != b.read():
                    raise RuntimeError(f"{self.name}: stored {stored} differs from the sent {src}")


def thread_cpu_round(r: "Xdsi", folders: list[Path], n: int) -> None:
    """One round with CPU per server thread (:func:`bench.peers.thread_cpu`)."""
    with thread_cpu(r.pid, n) as report:
        dt = send(r.port, r.aet, folders)
    report(dt)


def workers_supported(tree: Path) -> bool:
    r = subprocess.run([sys.executable, "-m", "xdsi", "serve", "--help"], capture_output=True, text=True, cwd=tree,
                       env={**os.environ, "PYTHONPATH": str(tree)})
    return "--workers" in r.stdout


def ratio_line(label: str, a: list[float], b: list[float]) -> str:
    r = [x / y for x, y in zip(a, b)]
    return f"{label} {statistics.median(r):.2f} ({min(r):.2f}-{max(r):.2f})"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=500, help="instances to send per round (default 500)")
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--cols", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3, help="measured rounds (default 3)")
    p.add_argument("--associations", type=int, default=1, help="parallel storescu processes (default 1)")
    p.add_argument("--workers", type=int, help="xdsi serve --workers N (only if this xdsi has the flag)")
    p.add_argument("--no-orthanc", action="store_true")
    p.add_argument("--no-storescp", action="store_true")
    p.add_argument("--against", type=Path, help="also run xdsi from this source tree in the same rounds")
    p.add_argument("--nosync", action="store_true", help="also run this xdsi with every fsync a no-op (eatmydata): what "
                   "durability costs, storescp +B syncing nothing (a diagnostic: acknowledged is then not durable)")
    p.add_argument("--profile", type=Path, help="py-spy on xdsi during one extra round: .svg flame graph, else raw")
    p.add_argument("--threads", action="store_true", help="one extra round: CPU per xdsi thread (names from py-spy dump)")
    p.add_argument("--strace", type=Path, help="strace -c -f of xdsi during one extra round: its system calls counted "
                   "(STRACE_FULL=1: every call, per thread)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--index-url", metavar="URL", help="xdsi's index database (default: SQLite in its data folder)")
    g.add_argument("--pg", action="store_true", help="a throwaway PostgreSQL server for xdsi's index")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = p.parse_args(argv)
    rc = NS.enter(__file__, argv, STORESCU)
    if rc is not None:
        return rc

    from bench.common import machine

    work = scratch("xdsi-bench-ingest-")
    env = NS.peer_env(work, STORESCP_OPTS="+B")
    receivers: list[Receiver] = []
    try:
        t0 = time.perf_counter()
        src = work / "in"
        total = generate(src, args.n, args.rows, args.cols)
        sources = sorted(src.iterdir())
        folders = split(src, args.associations)
        print(f"ingest: {args.n} x {args.rows}x{args.cols}x16-bit CT ({total / 1e6:.0f} MB, generated in "
              f"{time.perf_counter() - t0:.1f} s), {args.associations} association(s), xdsi workers "
              f"{args.workers if args.workers is not None else 'default'}"
              f"{'' if args.workers is None or workers_supported(ROOT) else ' (flag not supported: not passed)'}; "
              f"{'PostgreSQL' if args.pg else args.index_url or 'SQLite'} index; {machine()}")
        print(f"scratch {work}: {settle_inodes(work)}", flush=True)
        if (reported := reported_mb()) is not None:
            print(f"memory: this guest reports free pages to its host ({reported:.0f} MB so far); each round's files are "
                  f"truncated once checked, so the next round writes into recycled pages (bench.peers)", flush=True)
        receivers.append(Xdsi("xdsi", ROOT, work, args))
        if args.against:
            receivers.append(Xdsi("base", args.against.resolve(), work, args))
        if args.nosync:
            if not EATMYDATA.exists():
                raise SystemExit(f"--nosync needs Debian's eatmydata ({EATMYDATA})")
            receivers.append(Xdsi("nosync", ROOT, work, args, env={"LD_PRELOAD": str(EATMYDATA)}))
        if not args.no_storescp:
            receivers.append(Storescp(env, work))
        if not args.no_orthanc:
            receivers.append(Orthanc(env, work))

        for rnd in range(args.rounds + 1):  # round 0 warms the page cache and every server; not counted
            order = receivers if rnd % 2 else receivers[::-1]
            for r in order:
                fs_us = create_cost(work / "trash")
                r.start()
                dirty = settle_writeback()
                try:
                    cpu0 = tree_split(r.pid)
                    dt = send(r.port, r.aet, folders)
                    cpu1 = tree_split(r.pid)
                    user, system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
                    cpu = user + system
                    n = r.count()
                    if n != args.n:
                        raise RuntimeError(f"{r.name} holds {n} instances after the round, not {args.n}")
                    r.check(sources)
                finally:
                    r.stop()
                release_pages(r.written())  # its page cache back to the guest, for the next round (bench.peers)
                if rnd:
                    r.inst_s.append(args.n / dt)
                    r.mb_s.append(total / 1e6 / dt)
                    r.cpu_ms.append(cpu * 1000 / args.n)
                print(f"round {rnd}{'' if rnd else ' (warm-up)'} {r.name:8s} {dt:6.2f} s {args.n / dt:7.1f} inst/s "
                      f"{total / 1e6 / dt:6.1f} MB/s  server CPU {cpu * 1000 / args.n:5.2f} ms/inst (user {user * 1000 / args.n:.2f}, "
                      f"system {system * 1000 / args.n:.2f})  load {os.getloadavg()[0]:.1f}  create {fs_us:.0f} us  dirty {dirty:.0f} MB",
                      flush=True)

        print(f"\nmedians of {args.rounds} rounds, {args.associations} association(s):")
        for r in receivers if args.rounds else ():
            print(f"  {r.name:8s} {statistics.median(r.inst_s):7.1f} inst/s ({min(r.inst_s):.0f}-{max(r.inst_s):.0f}) "
                  f"{statistics.median(r.mb_s):6.1f} MB/s  server CPU {statistics.median(r.cpu_ms):5.2f} ms/inst")
        by = {r.name: r for r in receivers}
        x = by["xdsi"].inst_s
        for other, label in (("storescp", "xdsi/storescp +B"), ("orthanc", "xdsi/Orthanc"), ("base", "this tree/base"),
                             ("nosync", "xdsi/xdsi without fsync")):
            if other in by and x:
                print("  " + ratio_line(label, x, by[other].inst_s))
        for first in ("base", "nosync"):
            if first in by:
                for other, label in (("storescp", f"{first}/storescp +B"), ("orthanc", f"{first}/Orthanc")):
                    if other in by and x:
                        print("  " + ratio_line(label, by[first].inst_s, by[other].inst_s))

        if args.strace:
            r = by["xdsi"]
            r.start()
            try:
                spy = subprocess.Popen(["strace", *(["-c"] if not os.environ.get("STRACE_FULL") else []), "-f", "-o", str(args.strace),
                                        "-p", str(r.pid)])
                time.sleep(1.0)
                try:
                    dt = send(r.port, r.aet, folders)
                finally:
                    spy.send_signal(signal.SIGINT)
                    spy.wait(60)
                print(f"strace: {args.strace} ({args.n} instances; round under strace: {args.n / dt:.1f} inst/s)")
            finally:
                r.stop()
        for r in [r for r in receivers if isinstance(r, Xdsi)] if args.threads else ():
            r.start()
            try:
                print(f"{r.name}:", end=" ")
                thread_cpu_round(r, folders, args.n)
            finally:
                r.stop()
        if args.profile:
            r = by["xdsi"]
            r.start()
            try:
                with py_spy(r.pid, args.profile, subprocesses=True):
                    dt = send(r.port, r.aet, folders)
                print(f"profile: {args.profile} (round under py-spy: {args.n / dt:.1f} inst/s)")
            finally:
                r.stop()
    finally:
        for r in receivers:
            (r.close if isinstance(r, Xdsi) else r.stop)()
        remove_work(work, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
