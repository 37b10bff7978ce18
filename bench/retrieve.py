"""RAD-69 retrieval throughput and server memory, against a disk-read baseline in the same run.

    python bench/retrieve.py [--instances 500] [--size 512] [--keep DIR] [--against OTHER_TREE --rounds N]

Builds a study of N CT instances (size x size, 16 bit), imports it into a
fresh data directory, starts ``xdsi serve``, and then:

1. baseline: reads every stored file from disk in 256 KiB chunks (MB/s);
2. RAD-69: retrieves the whole study in one request with the streaming
   client (:func:`xdsi.soap.client.retrieve`, attachments written to a
   temporary folder), sampling the server's RSS every 10 ms (peak, and the
   RSS before the request);

and prints the figures.  ``--against DIR`` serves the same data directory
from another source tree too (``git worktree add /tmp/base REV``), alternating
the two servers ``--rounds`` times, and prints their ratio: before/after figures
from one run, on one machine state.  Both reads hit the page cache the same way (the
study was just written), so the comparison is protocol cost, not disk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from tests.support.server import XdsiProcess  # noqa: E402
from xdsi.archive import Archive  # noqa: E402
from xdsi.config import Settings  # noqa: E402
from xdsi.soap.client import retrieve  # noqa: E402
from xdsi.tools.synth import StudySpec, write_study  # noqa: E402
from xdsi.standards.constants import DEFAULT_REPOSITORY_UNIQUE_ID  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--instances", type=int, default=500)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it")
    ap.add_argument("--against", type=Path, help="also serve the same data from this source tree (e.g. a git worktree of an older revision), alternately")
    ap.add_argument("--rounds", type=int, default=1, help="retrievals per tree (alternating with --against)")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="xdsi-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # the servers' "python -m xdsi" must not pick up a source tree from the working directory
    for name, src in [("this tree", str(ROOT))] + ([(str(args.against), str(args.against))] if args.against else []):
        where = subprocess.run([sys.executable, "-c", "import xdsi; print(xdsi.__file__)"], env={**os.environ, "PYTHONPATH": src}, capture_output=True, text=True).stdout.strip()
        print(f"[{name}] serves {where}")
    try:
        spec = StudySpec()
        t = time.perf_counter()
        files = write_study(work / "in", spec, series=1, per_series=args.instances, rows=args.size, columns=args.size)
        data = work / "data"
        archive = Archive.open(Settings(data_dir=data))
        for f in files:
            archive.store.store_file(f, move=True)
        refs = archive.retrieve.select(study_uids=[spec.study_uid])
        stored = [archive.retrieve.path(r) for r in refs]
        archive.close()
        total = sum(p.stat().st_size for p in stored)
        print(f"study: {len(refs)} instances of {args.size}x{args.size}, {total / 1e6:.1f} MB (prepared in {time.perf_counter() - t:.1f} s)")

        # 1. baseline: the same files straight from disk
        t = time.perf_counter()
        n = 0
        for p in stored:
            with open(p, "rb") as fh:
                while b := fh.read(256 * 1024):
                    n += len(b)
        dt = time.perf_counter() - t
        print(f"disk read baseline: {n / 1e6 / dt:8.1f} MB/s  ({dt:.2f} s)")

        # 2. RAD-69 through the server; with --against, alternately through this tree's and the other's
        trees = [("this tree", None)] + ([(f"{args.against}", str(args.against))] if args.against else [])
        results: dict[str, list[tuple[float, int, int]]] = {name: [] for name, _ in trees}
        for round_ in range(args.rounds):
            for name, src in trees if round_ % 2 == 0 else trees[::-1]:  # ABBA: neither tree always runs first
                mbps, before, peak, nbytes = _rad69(data, work / "out", spec.study_uid, refs, src)
                results[name].append((mbps, before, peak))
                print(f"RAD-69 retrieval [{name}]: {mbps:8.1f} MB/s; server RSS {before / 1e6:.0f} MB before, {peak / 1e6:.0f} MB peak (+{(peak - before) / 1e6:.0f} MB for a {nbytes / 1e6:.0f} MB response)")
        if args.against:
            (a, _), (b, _) = trees
            best = {name: max(r[0] for r in rs) for name, rs in results.items()}
            median = {name: statistics.median(r[0] for r in rs) for name, rs in results.items()}
            growth = {name: max(r[2] - r[1] for r in rs) for name, rs in results.items()}
            print(f"best MB/s: this tree {best[a]:.1f}, {b} {best[b]:.1f}: ratio {best[a] / best[b]:.3f}")
            print(f"median MB/s: this tree {median[a]:.1f}, {b} {median[b]:.1f}: ratio {median[a] / median[b]:.3f}")
            print(f"largest RSS growth: this tree {growth[a] / 1e6:.0f} MB, {b} {growth[b] / 1e6:.0f} MB")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _rad69(data: Path, out: Path, study_uid: str, refs: list, src: str | None) -> tuple[float, int, int, int]:
    """One whole-study RAD-69 retrieval from a fresh ``xdsi serve`` (from ``src`` when given): MB/s, RSS before, peak RSS, bytes."""
    # explicit for both: "python -m" would put the working directory first; the repository id is the test one
    # (an unconfigured install generates its own, issue 11)
    env = {"PYTHONPATH": src or str(ROOT), "XDSI_REPOSITORY_UNIQUE_ID": DEFAULT_REPOSITORY_UNIQUE_ID}
    proc = XdsiProcess(data, env=env).start()
    try:
        server = psutil.Process(proc.proc.pid)  # type: ignore[union-attr]
        url = f"http://127.0.0.1:{proc.http_port}/xdsi/ImagingDocumentSource"
        series = {refs[0].series_uid: [r.sop_instance_uid for r in refs]}
        before = server.memory_info().rss
        peak = [before]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                try:
                    peak[0] = max(peak[0], server.memory_info().rss)
                except psutil.Error:
                    return
                time.sleep(0.01)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        report = retrieve(url, study_uid, series, out, repository_unique_id=DEFAULT_REPOSITORY_UNIQUE_ID)
        dt = time.perf_counter() - t
        stop.set()
        th.join()
        assert report.status.endswith("Success") and len(report.saved) == len(refs), report
        shutil.rmtree(out, ignore_errors=True)
        return report.bytes / 1e6 / dt, before, peak[0], report.bytes
    finally:
        proc.stop()


if __name__ == "__main__":
    sys.exit(main())
