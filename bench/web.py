"""OHIF-style study launch against a real ``xdsi serve``, timed against reading the same study from disk.

    .venv/bin/python bench/web.py [--instances 1000] [--series 4] [--size 128] [--threads 4]

Steps, as a zero-footprint viewer does them: QIDO-RS study list, WADO-RS study
metadata (gzip), then every frame (``frames/1``, octet-stream) with a few
parallel requests.  The baseline parses every file of the study from local
disk with pydicom (headers + pixel data).  Also measured: STOW-RS ingest and
the store-time cost of the per-series metadata journal (in process, with and
without the hook).  Prints figures; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pydicom  # noqa: E402
import requests  # noqa: E402

from tests.support.server import XdsiProcess  # noqa: E402
from xdsi.archive import Archive  # noqa: E402
from xdsi.config import Settings  # noqa: E402
from xdsi.tools.synth import StudySpec, write_study  # noqa: E402


def stow(base: str, paths: list[Path], batch: int = 50) -> None:
    s = requests.Session()
    for i in range(0, len(paths), batch):
        boundary = uuid.uuid4().hex
        body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p.read_bytes() + b"\r\n" for p in paths[i : i + batch])
        body += f"--{boundary}--\r\n".encode()
        r = s.post(f"{base}/studies", data=body, headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
        r.raise_for_status()


def hook_cost(paths: list[Path], tmp: Path) -> tuple[float, float]:
    """Seconds per store_file with and without the metadata journal hook (fresh archive each)."""
    out = []
    for with_hook in (True, False):
        d = tmp / f"hook-{with_hook}"
        a = Archive.open(Settings(data_dir=d))
        if not with_hook:
            a.store.listeners.clear()
        t = time.perf_counter()
        for p in paths:
            assert a.store.store_file(p).ok
        out.append((time.perf_counter() - t) / len(paths))
        a.close()
        shutil.rmtree(d)
    return out[0], out[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=1000)
    ap.add_argument("--series", type=int, default=4)
    ap.add_argument("--size", type=int, default=128, help="rows = columns")
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--hook-sample", type=int, default=200)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="xdsi-bench-web-"))
    try:
        spec = StudySpec(patient_id="BENCH")
        per = max(1, args.instances // args.series)
        paths = write_study(tmp / "study", spec, series=args.series, per_series=per, rows=args.size, columns=args.size)
        n = len(paths)
        mb = sum(p.stat().st_size for p in paths) / 1e6
        print(f"study: {n} instances in {args.series} series, {args.size}x{args.size} 16-bit, {mb:.1f} MB")

        with_hook, without = hook_cost(paths[: args.hook_sample], tmp)
        print(f"store_file per instance: {with_hook * 1e3:.2f} ms with metadata hook, {without * 1e3:.2f} ms without "
              f"(+{(with_hook - without) * 1e3:.2f} ms, n={min(n, args.hook_sample)})")  # fmt: skip

        t = time.perf_counter()
        for p in paths:
            ds = pydicom.dcmread(p)
            _ = ds.PixelData
        disk = time.perf_counter() - t
        print(f"disk baseline: parse all {n} files with pixel data: {disk:.2f} s")

        proc = XdsiProcess(tmp / "data").start()
        try:
            base = f"http://127.0.0.1:{proc.http_port}/dicomweb"
            t = time.perf_counter()
            stow(base, paths)
            ingest = time.perf_counter() - t
            print(f"STOW-RS ingest: {ingest:.2f} s ({n / ingest:.0f} instances/s, {mb / ingest:.1f} MB/s)")

            s = requests.Session()
            t0 = time.perf_counter()
            r = s.get(f"{base}/studies", params={"limit": 101, "includefield": "all"})
            r.raise_for_status()
            t1 = time.perf_counter()
            r = s.get(f"{base}/studies/{spec.study_uid}/metadata", headers={"Accept-Encoding": "gzip"}, stream=True)
            raw = r.raw.read()
            md = r.json() if not raw else __import__("json").loads(gzip.decompress(raw))
            t2 = time.perf_counter()
            r = s.get(f"{base}/studies/{spec.study_uid}/metadata", headers={"Accept-Encoding": "gzip"}, stream=True)
            raw2 = r.raw.read()
            t3 = time.perf_counter()
            assert len(md) == n, len(md)
            urls = [
                f"{base}/studies/{spec.study_uid}/series/{m['0020000E']['Value'][0]}/instances/{m['00080018']['Value'][0]}/frames/1"
                for m in md
            ]

            def fetch(u: str) -> int:
                with requests.get(u, headers={"Accept": 'multipart/related; type="application/octet-stream"'}) as resp:
                    resp.raise_for_status()
                    return len(resp.content)

            with ThreadPoolExecutor(args.threads) as ex:
                total = sum(ex.map(fetch, urls))
            t4 = time.perf_counter()
        finally:
            proc.stop()
        print(f"QIDO study list: {(t1 - t0) * 1e3:.0f} ms")
        print(f"study metadata ({n} instances): first {(t2 - t1) * 1e3:.0f} ms, again {(t3 - t2) * 1e3:.0f} ms, "
              f"{len(raw2) / 1e3:.0f} kB gzip")  # fmt: skip
        print(f"all frames ({args.threads} parallel): {t4 - t3:.2f} s, {total / 1e6:.1f} MB, {n / (t4 - t3):.0f} frames/s")
        print(f"launch total (list + metadata + frames): {(t1 - t0) + (t2 - t1) + (t4 - t3):.2f} s vs disk parse {disk:.2f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
