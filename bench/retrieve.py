"""RAD-69 retrieval throughput and server memory, against a disk-read baseline in the same run.

    python bench/retrieve.py [--instances 500] [--size 512] [--keep DIR]

Builds a study of N CT instances (size x size, 16 bit), imports it into a
fresh data directory, starts ``xdsi serve``, and then:

1. baseline: reads every stored file from disk in 256 KiB chunks (MB/s);
2. RAD-69: retrieves the whole study in one request with the streaming
   client (:func:`xdsi.soap.client.retrieve`, attachments written to a
   temporary folder), sampling the server's RSS every 10 ms (peak, and the
   RSS before the request);

and prints the figures.  Both reads hit the page cache the same way (the
study was just written), so the comparison is protocol cost, not disk.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402

from tests.support.server import XdsiProcess  # noqa: E402
from xdsi.archive import Archive  # noqa: E402
from xdsi.config import Settings  # noqa: E402
from xdsi.soap.client import retrieve  # noqa: E402
from xdsi.tools.synth import StudySpec, write_study  # noqa: E402
from xdsi.xdsconst import DEFAULT_REPOSITORY_UNIQUE_ID  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--instances", type=int, default=500)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="xdsi-bench-"))
    work.mkdir(parents=True, exist_ok=True)
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

        # 2. RAD-69 through the server
        proc = XdsiProcess(data).start()
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
            out = work / "out"
            t = time.perf_counter()
            report = retrieve(url, spec.study_uid, series, out, repository_unique_id=DEFAULT_REPOSITORY_UNIQUE_ID)
            dt = time.perf_counter() - t
            stop.set()
            th.join()
            assert report.status.endswith("Success") and len(report.saved) == len(refs), report
            print(f"RAD-69 retrieval:   {report.bytes / 1e6 / dt:8.1f} MB/s  ({dt:.2f} s, {len(report.saved)} documents)")
            print(f"server RSS: {before / 1e6:.0f} MB before, {peak[0] / 1e6:.0f} MB peak during the request (response {report.bytes / 1e6:.0f} MB)")
        finally:
            proc.stop()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
