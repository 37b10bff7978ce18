#!/usr/bin/env python3
"""C-STORE ingest on one and on four parallel associations: xdsi with 1 and 2 workers, and Orthanc, one run.

    python bench/workers.py [-n 200] [--size 512] [--rounds 3] [--associations 4] [--trials 200] [--no-orthanc]
                            [--against BASE_TREE] [--profile OUT.svg|OUT.txt]

Needs root and Debian's dcmtk and orthanc (see ``/work/shared/peers/README.md``).  The script
re-executes itself in its own network namespace (``BENCH_NETNS``, default ``bench-workers``), where it
starts Orthanc (its own ports, ``BENCH_PORT_BASE``) and ``xdsi serve --workers 1`` / ``--workers 2``.
Every measurement stores the same N files into an *empty* archive (a fresh data directory, a wiped
Orthanc), with Debian's storescu: once over one association, once split over ``--associations``
storescu processes started together.  The order of the servers alternates each round (ABBA).

Printed per measurement: instances/s (N over the wall time from the first storescu's start to the last
one's end), MB/s, server CPU ms per instance (user + system of the server's whole process tree, from
/proc), and for two workers how the associations were spread over them (``ss -tnp`` while the
storescus are connected) and each worker's share of the CPU.  Then the medians and the ratios the issue
asks for: xdsi --workers 2 with 4 associations over xdsi's single-association rate, and xdsi/Orthanc.

``--against DIR`` also runs ``xdsi serve`` from that source tree (``base-w1``, ``base-w2``) in the same rounds,
so the ratios of this tree and the base come from the same minutes of a shared machine (ABBA).
``--profile`` records py-spy (with ``--subprocesses``) on ``xdsi serve --workers 2`` during one extra
4-association measurement after the rounds.

``--trials`` first measures how 4 connections made at once are spread over 2 processes accepting on
one inherited listening socket (pre-fork, what ``xdsi serve --workers`` does) and on two SO_REUSEPORT
sockets (the kernel picks by a hash of the addresses), with idle acceptors: the spread policy alone;
then (a quarter as many tries) 4 associations requested at once of a real ``xdsi serve --workers 2``.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.peers import (Netns, STORESCU, peer, process_cpu, py_spy, release_pages, remove_work, scratch, set_aside,  # noqa: E402
                         settle_inodes, stop_peer)

NS = Netns.from_env("bench-workers", 25600)


# -- the server's processes ----------------------------------------------------------------------------


def tree(pid: int) -> list[int]:
    from tests.support.server import children_of

    return [pid, *children_of(pid)]


def connections_by_pid(port: int) -> Counter[int]:
    """Established connections on our side of ``port``, by owning process (``ss -tnp``)."""
    out = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{port} )"], capture_output=True, text=True).stdout
    seen: Counter[int] = Counter()
    for line in out.splitlines():
        for part in line.split("pid=")[1:]:
            seen[int(part.split(",")[0])] += 1
    return seen


# -- one measurement ---------------------------------------------------------------------------------


def machine_ticks() -> tuple[int, int]:
    """(all, idle) clock ticks of every CPU so far (/proc/stat): how busy the machine was over a measurement."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(v), v[3] + v[4]


@dataclass
class Usage:
    """What one measurement cost besides the server: the storescu clients' CPU and the machine's busy share.

    Why: on a 2-CPU machine the clients share the cores with the server, so "4 associations / 1" is
    bounded by them (issue 14's 1.6x): these figures say how close a run came to that bound.
    """

    clients_cpu: float = 0.0  # seconds, user + system of the storescu processes
    busy: float = 0.0  # share of all CPUs busy over the run, 0..1


_usage = Usage()


def store(port: int, aet: str, parts: list[Path], server_pids: list[int], watch_port: bool) -> tuple[float, dict[int, float], Counter[int]]:
    """Wall time of ``len(parts)`` storescu started together, each sending one folder; CPU seconds per server
    process over the run; the associations per process seen while they were connected.  The clients' CPU and
    the machine's busy share go to ``_usage``."""
    before = {p: process_cpu(p) for p in server_pids}
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    ticks = machine_ticks()
    spread: Counter[int] = Counter()
    t0 = time.perf_counter()
    procs = [subprocess.Popen([STORESCU, "-aet", f"BENCH{i}", "-aec", aet, "+sd", "127.0.0.1", str(port), str(part)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "TCP_NODELAY": "1"})
             for i, part in enumerate(parts)]
    if watch_port:  # the busiest moment: every storescu connected (sampled until the first one ends)
        while all(p.poll() is None for p in procs):
            now = connections_by_pid(port)
            if sum(now.values()) > sum(spread.values()):
                spread = now
            if sum(spread.values()) >= len(parts):
                break
            time.sleep(0.02)
    outs = [p.communicate(timeout=1200)[0] for p in procs]
    wall = time.perf_counter() - t0
    all_now, idle_now = machine_ticks()
    kids_now = resource.getrusage(resource.RUSAGE_CHILDREN)
    _usage.clients_cpu = (kids_now.ru_utime - kids.ru_utime) + (kids_now.ru_stime - kids.ru_stime)
    _usage.busy = 1 - (idle_now - ticks[1]) / max(1, all_now - ticks[0])
    for p, out in zip(procs, outs):
        if p.returncode != 0 or "E:" in out:
            raise RuntimeError(f"storescu failed ({p.returncode}):\n{out[-3000:]}")
    return wall, {p: process_cpu(p) - before[p] for p in server_pids}, spread


# -- the spread of 4 connections over 2 acceptors, pre-fork vs SO_REUSEPORT ----------------------------


def _acceptor(sock: socket.socket | None, port: int, ident: int, ready: "object") -> None:
    if sock is None:  # SO_REUSEPORT: a socket of its own
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(64)
    sock.setblocking(False)
    ready.set()  # type: ignore[attr-defined]
    import select

    while True:
        select.select([sock], [], [])
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            continue
        conn.sendall(bytes([ident]))
        conn.close()


def spread_trial(kind: str, trials: int, connections: int = 4) -> Counter[tuple[int, ...]]:
    """How ``connections`` made at once land on 2 processes, over ``trials`` tries."""
    ctx = get_context("fork")
    port = NS.port(9) if kind == "prefork" else NS.port(10)
    shared = None
    if kind == "prefork":
        shared = socket.socket()
        shared.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        shared.bind(("127.0.0.1", port))
        shared.listen(64)
    events = [ctx.Event() for _ in range(2)]
    procs = [ctx.Process(target=_acceptor, args=(shared, port, i, events[i]), daemon=True) for i in range(2)]
    for p in procs:
        p.start()
    for e in events:
        e.wait(10)
    shapes: Counter[tuple[int, ...]] = Counter()
    try:
        for _ in range(trials):
            socks = []
            for _c in range(connections):
                s = socket.socket()
                s.connect(("127.0.0.1", port))
                socks.append(s)
            got = Counter(s.recv(1)[0] for s in socks)
            for s in socks:
                s.close()
            shapes[tuple(sorted((got.get(0, 0), got.get(1, 0)), reverse=True))] += 1
    finally:
        for p in procs:
            p.kill()
            p.join()
        if shared is not None:
            shared.close()
    return shapes


def xdsi_spread(trials: int, connections: int = 4) -> Counter[tuple[int, ...]]:
    """How ``connections`` associations requested at once land on the 2 workers of a real ``xdsi serve --workers 2``
    (seen with ``ss``), over ``trials`` tries; each association then sends a C-ECHO and is released."""
    from concurrent.futures import ThreadPoolExecutor

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from tests.support.server import XdsiProcess

    work = Path(tempfile.mkdtemp(prefix="xdsi-bench-spread-"))
    server = XdsiProcess(work / "data", env={"XDSI_LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT)}, workers=2).start(timeout=120)
    shapes: Counter[tuple[int, ...]] = Counter()

    def associate(_i: int) -> object:
        ae = AE(ae_title="SPREAD")
        ae.add_requested_context(Verification)
        return ae.associate("127.0.0.1", server.dicom_port, ae_title="XDSI")

    try:
        workers = tree(server.pid)[1:]
        with ThreadPoolExecutor(connections) as pool:
            for _ in range(trials):
                assocs = list(pool.map(associate, range(connections)))
                assert all(a.is_established for a in assocs)  # type: ignore[attr-defined]
                seen = connections_by_pid(server.dicom_port)
                shapes[tuple(sorted((seen.get(w, 0) for w in workers), reverse=True))] += 1
                for a in assocs:
                    a.send_c_echo()  # type: ignore[attr-defined]
                    a.release()  # type: ignore[attr-defined]
                deadline = time.monotonic() + 5
                while sum(connections_by_pid(server.dicom_port).values()) and time.monotonic() < deadline:
                    time.sleep(0.01)
    finally:
        server.stop(timeout=60)
        shutil.rmtree(work, ignore_errors=True)
    return shapes


# -- main --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=200, help="instances per measurement (default 200)")
    p.add_argument("--size", type=int, default=512, help="rows and columns of each CT image (default 512)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--associations", type=int, default=4)
    p.add_argument("--trials", type=int, default=200, help="spread trials per policy (0: skip)")
    p.add_argument("--no-orthanc", action="store_true")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--settle", type=float, default=1.0, help="seconds of rest after each measurement's sync (default 1)")
    p.add_argument("--pairs", default="", help="only these workers:associations measurements of xdsi, e.g. w1:1,w2:4 (default: all)")
    p.add_argument("--against", type=Path, help="also run xdsi from this source tree in the same rounds (base-w1, base-w2)")
    p.add_argument("--profile", type=Path, help="py-spy on xdsi --workers 2 during one extra 4-association run: .svg, else raw")
    args = p.parse_args(argv)
    rc = NS.enter(__file__, argv, STORESCU)
    if rc is not None:
        return rc

    from bench.common import machine
    from tests.support.server import XdsiProcess
    from xdsi.tools.synth import StudySpec, write_study

    print(f"{machine()}; load average {os.getloadavg()[0]:.1f} {os.getloadavg()[1]:.1f} at start")
    if args.trials:
        for kind in ("prefork", "reuseport"):
            shapes = spread_trial(kind, args.trials)
            print(f"spread of 4 simultaneous connections over 2 idle acceptors, {kind:9s}: "
                  + ", ".join(f"{'+'.join(map(str, k))}: {v / args.trials:.0%}" for k, v in sorted(shapes.items(), reverse=True)))
        shapes = xdsi_spread(max(1, args.trials // 4))
        print(f"spread of 4 associations requested at once over xdsi serve --workers 2 ({max(1, args.trials // 4)} tries): "
              + ", ".join(f"{'+'.join(map(str, k))}: {v / max(1, args.trials // 4):.0%}" for k, v in sorted(shapes.items(), reverse=True)))

    work = scratch("xdsi-bench-workers-")
    env = NS.peer_env(work)
    orthanc_running = False
    try:
        spec = StudySpec(patient_id="BENCHW", patient_name="BENCH^WORKERS")
        files = write_study(work / "in", spec, series=args.associations, per_series=args.n // args.associations, rows=args.size, columns=args.size)
        n = len(files)
        total = sum(f.stat().st_size for f in files)
        whole = work / "in"
        parts = []
        for i in range(args.associations):  # one folder per association: storescu +sd takes a folder
            d = work / f"part{i}"
            d.mkdir()
            for f in files[i :: args.associations]:
                os.link(f, d / f.name)
            parts.append(d)
        print(f"{n} x {args.size}x{args.size} CT, {total / 1e6:.1f} MB per measurement; {args.associations} associations; {args.rounds} rounds")
        print(f"scratch {work}: {settle_inodes(work)}", flush=True)

        trees = {"xdsi": ROOT, **({"base": args.against.resolve()} if args.against else {})}
        names = [f"{t}-w{w}" for t in trees for w in (1, 2)] + ([] if args.no_orthanc else ["orthanc"])
        modes = ["1", str(args.associations)]
        rate: dict[tuple[str, str], list[float]] = {(s, m): [] for s in names for m in modes}
        cpu: dict[tuple[str, str], list[float]] = {(s, m): [] for s in names for m in modes}
        clients: dict[tuple[str, str], list[float]] = {(s, m): [] for s in names for m in modes}
        busy: dict[tuple[str, str], list[float]] = {(s, m): [] for s in names for m in modes}

        def settle() -> None:
            """Write back what this measurement left dirty before the next starts: else the next one (in ABBA
            order, always the same ones) pays for this one's 200 MB of writeback (its files are set aside, not freed)."""
            os.sync()
            time.sleep(args.settle)

        def measure(name: str, mode: str, rnd: int) -> None:
            nonlocal orthanc_running
            split = parts if mode != "1" else [whole]
            if name == "orthanc":
                if orthanc_running:
                    stop_peer("stop_orthanc.sh", env)
                set_aside(work / "peers" / "orthanc" / "storage", work)  # not deleted during the run (bench.peers)
                peer("start_orthanc.sh", env, "--fresh")
                orthanc_running = True
                pid = int((work / "peers" / "orthanc" / "orthanc.pid").read_text())
                wall, used, spread = store(NS.port(1), "ORTHANC", split, [pid], False)
                stop_peer("stop_orthanc.sh", env)
                orthanc_running = False
                release_pages(work / "peers" / "orthanc" / "storage")  # its page cache back for the next run (bench.peers)
            else:
                workers = int(name[-1])
                tree_dir = trees[name.split("-")[0]]
                data = work / f"data-{name}-{mode}-{rnd}"
                server = XdsiProcess(data, env={"XDSI_LOG_LEVEL": "WARNING", "TCP_NODELAY": "1", "PYTHONPATH": str(tree_dir)},
                                     workers=workers, prefix=["env", "-C", str(tree_dir)]).start(timeout=120)
                try:
                    pids = tree(server.pid)
                    wall, used, spread = store(server.dicom_port, server.ae_title, split, pids, workers > 1)
                finally:
                    server.stop(timeout=120)
                release_pages(data)  # its page cache back for the next run (bench.peers)
                set_aside(data, work)
            settle()
            r = n / wall
            ms = sum(used.values()) * 1000 / n
            rate[(name, mode)].append(r)
            cpu[(name, mode)].append(ms)
            extra = ""
            if name.endswith("-w2"):
                share = sorted((v for p, v in used.items() if p != pids[0]), reverse=True)
                extra = (f"; associations per worker {'+'.join(str(c) for c in sorted(spread.values(), reverse=True)) or '?'}"
                         f", CPU per worker {'/'.join(f'{s:.1f}' for s in share)} s")
            clients[(name, mode)].append(_usage.clients_cpu * 1000 / n)
            busy[(name, mode)].append(_usage.busy)
            print(f"round {rnd} {name:8s} {mode} assoc: {wall:6.2f} s {r:6.1f} inst/s {total / 1e6 / wall:6.1f} MB/s {ms:5.1f} ms CPU/inst{extra}"
                  f"; clients {_usage.clients_cpu * 1000 / n:.1f} ms/inst, machine {100 * _usage.busy:.0f}% busy", flush=True)

        for rnd in range(1, args.rounds + 1):
            order = [(s, m) for s in names for m in modes if not args.pairs or f"{s.split('-')[-1]}:{m}" in args.pairs.split(",")
                     or s == "orthanc"]
            for name, mode in (order if rnd % 2 else order[::-1]):
                measure(name, mode, rnd)

        def med(key: tuple[str, str]) -> float:
            return statistics.median(rate[key])

        rate = {k: v for k, v in rate.items() if v}
        cpu = {k: v for k, v in cpu.items() if v}

        many = str(args.associations)
        if args.profile:
            data = work / "data-profile"
            server = XdsiProcess(data, env={"XDSI_LOG_LEVEL": "WARNING", "TCP_NODELAY": "1", "PYTHONPATH": str(ROOT)}, workers=2).start(timeout=120)
            try:
                with py_spy(server.pid, args.profile.resolve(), subprocesses=True):
                    wall, _used, _spread = store(server.dicom_port, server.ae_title, parts, tree(server.pid), False)
            finally:
                server.stop(timeout=120)
            print(f"profile: {args.profile} (run under py-spy: {n / wall:.1f} inst/s)")
        print("medians (inst/s, CPU ms/inst):")
        for key in rate:
            print(f"  {key[0]:8s} {key[1]} assoc: {med(key):6.1f} inst/s ({min(rate[key]):.1f}-{max(rate[key]):.1f}), {statistics.median(cpu[key]):.1f} ms CPU/inst"
                  f"; clients {statistics.median(clients[key]):.1f} ms/inst, machine {100 * statistics.median(busy[key]):.0f}% busy")
        def ratio(a: tuple[str, str], b: tuple[str, str], label: str, note: str = "") -> None:
            """Median (range) of a/b over the rounds, when both were measured (``--pairs`` may leave some out)."""
            if a in rate and b in rate:
                r = [x / y for x, y in zip(rate[a], rate[b])]
                print(f"{label}: {statistics.median(r):.2f} ({min(r):.2f}-{max(r):.2f}) per round{note}")

        cores = os.cpu_count() or 1
        for t in trees:
            one, four = (f"{t}-w1", "1"), (f"{t}-w2", many)
            if one in rate and four in rate:
                # the most K associations could reach with every CPU busy, at the CPU per instance (server + clients)
                # they were measured at, over the one-association rate: above it no server change alone helps
                cost = statistics.median(cpu[four]) + statistics.median(clients[four])
                print(f"{t}: {cores} CPUs at {cost:.1f} ms per instance (server + clients, {many} assoc) give at most "
                      f"{cores * 1000 / cost:.0f} inst/s = {cores * 1000 / cost / med(one):.2f}x the 1-assoc rate")
            ratio((f"{t}-w2", many), (f"{t}-w1", "1"), f"{t} --workers 2, {many} assoc / {t} --workers 1, 1 assoc", " (target >= 1.6)")
        if args.against:
            ratio(("xdsi-w2", many), ("base-w2", many), f"xdsi / base, --workers 2, {many} assoc")
            ratio(("xdsi-w1", "1"), ("base-w1", "1"), "xdsi / base, --workers 1, 1 assoc")
        ratio(("xdsi-w2", many), ("xdsi-w2", "1"), f"xdsi --workers 2, {many} assoc / xdsi --workers 2, 1 assoc")
        ratio(("xdsi-w1", many), ("xdsi-w1", "1"), f"xdsi --workers 1, {many} assoc / 1 assoc")
        if "orthanc" in names:
            for mode in modes:
                ratio(("xdsi-w2", mode), ("orthanc", mode), f"xdsi --workers 2 / Orthanc, {mode} assoc")
            ratio(("orthanc", many), ("orthanc", "1"), f"Orthanc {many} assoc / 1 assoc")
        print(f"load average {os.getloadavg()[0]:.1f} {os.getloadavg()[1]:.1f} at end")
    finally:
        if orthanc_running:
            stop_peer("stop_orthanc.sh", env)
        remove_work(work, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
