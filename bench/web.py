"""Viewer launch (OHIF-style) against xdsi and Orthanc's DICOMweb in one run, beside pydicom reading the same headers.

    python bench/web.py [--instances 200] [--size 512] [--threads 4] [--rounds 5] [--against OTHER_TREE]
                        [--cold] [--no-orthanc] [--profile OUT.svg|OUT.txt] [--keep]

Needs root, dcmtk's storescu and Debian's orthanc + orthanc-dicomweb
(``/work/shared/peers/README.md``).  Re-executes itself in its own network
namespace (:mod:`bench.web_peers`), builds one study (``--instances`` CT
images of size x size, 16 bit, one series), imports it into xdsi, sends it to
a fresh Orthanc with storescu, and then, alternating the servers each round
(ABBA), does what a zero-footprint viewer does when it opens the study:

1. QIDO-RS: the series of the study (``/studies/{uid}/series``);
2. WADO-RS: the study metadata (``Accept-Encoding: gzip``), parsed;
3. every frame (``.../frames/1``, ``multipart/related; type="application/octet-stream";
   transfer-syntax=*``) with ``--threads`` parallel keep-alive connections;

and, after the launch and timed apart, QIDO-RS of every instance of the study (``/studies/{uid}/instances``,
one match per instance: what a match costs in JSON).

Baseline: pydicom reading the same 200 headers from disk (``stop_before_pixels``).
Prints per-round times, medians, frames/s and the ratios xdsi/Orthanc (only
ratios from one run mean anything on a shared machine).  Round 0 warms up and
is not counted.  ``--cold`` restarts each server before each of its launches, so
every launch is a first view for the servers' own caches (xdsi keeps each
file's pixel layout after its first read).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.peers import load_line, process_cpu, py_spy, remove_work  # noqa: E402
from bench.web_peers import NS, Orthanc  # noqa: E402

FRAME_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'


def launch(base: str, study: str, threads: int, frame_bytes: int) -> dict[str, float]:
    """One viewer launch against the DICOMweb root ``base``: seconds per step."""
    import requests

    s = requests.Session()
    t0 = time.perf_counter()
    r = s.get(f"{base}/studies/{study}/series", headers={"Accept": "application/dicom+json"})
    r.raise_for_status()
    series = r.json()
    t1 = time.perf_counter()
    r = s.get(f"{base}/studies/{study}/metadata", headers={"Accept": "application/dicom+json", "Accept-Encoding": "gzip"}, stream=True)
    r.raise_for_status()
    raw = r.raw.read()
    md = json.loads(gzip.decompress(raw) if r.headers.get("Content-Encoding") == "gzip" else raw)
    t2 = time.perf_counter()
    if not series or not md:
        raise RuntimeError(f"{base}: {len(series)} series, {len(md)} instances in the metadata")
    urls = [
        f"{base}/studies/{study}/series/{m['0020000E']['Value'][0]}/instances/{m['00080018']['Value'][0]}/frames/1" for m in md
    ]
    local = threading.local()

    def fetch(u: str) -> int:
        sess = getattr(local, "s", None)
        if sess is None:
            sess = local.s = requests.Session()
        resp = sess.get(u, headers={"Accept": FRAME_ACCEPT})
        resp.raise_for_status()
        if len(resp.content) < frame_bytes:
            raise RuntimeError(f"{u}: {len(resp.content)} bytes, a frame has {frame_bytes}")
        return len(resp.content)

    with ThreadPoolExecutor(threads) as ex:
        sum(ex.map(fetch, urls))
    t3 = time.perf_counter()
    # not part of the launch: a QIDO-RS answer with one match per instance (the per-match JSON cost)
    r = s.get(f"{base}/studies/{study}/instances", headers={"Accept": "application/dicom+json"})
    r.raise_for_status()
    if len(r.json()) != len(md):
        raise RuntimeError(f"{base}: QIDO-RS found {len(r.json())} of the study's {len(md)} instances")
    t4 = time.perf_counter()
    return {"qido": t1 - t0, "metadata": t2 - t1, "frames": t3 - t2, "total": t3 - t0, "n": float(len(md)), "qido_all": t4 - t3}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--instances", type=int, default=200)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--against", type=Path, help="also serve a copy of the data from this source tree, alternately")
    ap.add_argument("--no-orthanc", action="store_true")
    ap.add_argument("--cold", action="store_true", help="restart every server before each of its launches (a first view: "
                    "no cache in any server; the page cache stays warm)")
    ap.add_argument("--profile", type=Path, help="py-spy of xdsi during 3 extra launches (.svg flame graph or raw text)")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)
    args.rounds = max(1, args.rounds)
    if not NS.inside():
        return NS.reexec(__file__, argv)

    import pydicom

    import xdsi
    from tests.support.server import XdsiProcess

    print(f"xdsi imported from {Path(xdsi.__file__).parent}")
    from xdsi.archive import Archive
    from xdsi.config import Settings
    from xdsi.tools.synth import StudySpec, write_study

    work = Path(tempfile.mkdtemp(prefix="xdsi-bench-web-"))
    os.chdir(work)
    orthanc = Orthanc(work)
    servers: dict[str, XdsiProcess] = {}
    try:
        spec = StudySpec(patient_id="BENCHVIEW", patient_name="BENCH^VIEWER")
        files = write_study(work / "in", spec, series=1, per_series=args.instances, rows=args.size, columns=args.size)
        mb = sum(f.stat().st_size for f in files) / 1e6
        archive = Archive.open(Settings(data_dir=work / "data"))
        for f in files:
            archive.store.store_file(f, move=False)
        archive.close()
        print(f"study: {len(files)} x {args.size}x{args.size} CT, {mb:.1f} MB, {args.threads} parallel frame requests; {load_line()}")
        if not args.no_orthanc:
            orthanc.start()
            orthanc.load(work / "in")
        env = {"XDSI_LOG_LEVEL": "WARNING", "TCP_NODELAY": "1", "XDSI_WORKERS": "1"}  # one worker: the figures below sample this pid (CPU, RSS, py-spy), and the supervisor serves nothing
        servers["xdsi"] = XdsiProcess(work / "data", env={**env, "PYTHONPATH": str(ROOT)}).start(timeout=60)
        if args.against:
            shutil.copytree(work / "data", work / "data-base")
            servers["base"] = XdsiProcess(work / "data-base", env={**env, "PYTHONPATH": str(args.against)}).start(timeout=60)

        targets: dict[str, tuple[str, int]] = {
            name: (f"http://127.0.0.1:{p.http_port}/dicomweb", p.proc.pid) for name, p in servers.items()  # type: ignore[union-attr]
        }
        if not args.no_orthanc:
            targets["Orthanc"] = (orthanc.dicomweb, orthanc.pid)
        frame_bytes = args.size * args.size * 2
        results: dict[str, list[dict[str, float]]] = {n: [] for n in targets}
        disk: list[float] = []
        names = list(targets)
        for rnd in range(args.rounds + 1):
            t = time.perf_counter()
            for f in files:
                pydicom.dcmread(f, stop_before_pixels=True)
            if rnd:
                disk.append(time.perf_counter() - t)
            for name in names if rnd % 2 else names[::-1]:
                if args.cold:
                    if name == "Orthanc":
                        orthanc.restart()
                        targets[name] = (orthanc.dicomweb, orthanc.pid)
                    else:
                        servers[name].stop()
                        servers[name].start(timeout=60)
                        targets[name] = (targets[name][0], servers[name].proc.pid)  # type: ignore[union-attr]
                base, pid = targets[name]
                c0 = process_cpu(pid)
                res = launch(base, spec.study_uid, args.threads, frame_bytes)
                res["cpu"] = process_cpu(pid) - c0
                if rnd:
                    results[name].append(res)
                    print(f"round {rnd} {name:8s} QIDO {res['qido'] * 1e3:5.0f} ms  metadata {res['metadata'] * 1e3:5.0f} ms  "
                          f"frames {res['frames'] * 1e3:6.0f} ms ({res['n'] / res['frames']:4.0f}/s)  total {res['total'] * 1e3:6.0f} ms  "
                          f"server CPU {res['cpu']:.2f} s; QIDO all instances {res['qido_all'] * 1e3:5.0f} ms")  # fmt: skip

        def med(name: str, key: str) -> float:
            return statistics.median(r[key] for r in results[name])

        d = statistics.median(disk)
        print(f"\nmedians over {args.rounds} rounds ({load_line()}); pydicom reads the {len(files)} headers in {d * 1e3:.0f} ms")
        for name in names:
            fps = [r["n"] / r["frames"] for r in results[name]]
            print(f"  {name:8s} QIDO {med(name, 'qido') * 1e3:5.0f} ms  metadata {med(name, 'metadata') * 1e3:5.0f} ms "
                  f"({med(name, 'metadata') / d:.2f} x pydicom)  frames {statistics.median(fps):4.0f}/s ({min(fps):.0f}-{max(fps):.0f})  "
                  f"total {med(name, 'total') * 1e3:6.0f} ms  server CPU {med(name, 'cpu'):.2f} s; "
                  f"QIDO all {int(med(name, 'n'))} instances {med(name, 'qido_all') * 1e3:5.0f} ms")  # fmt: skip
        for name in names:
            if name == "Orthanc" or "Orthanc" not in results:
                continue
            for key, what in (("frames", "frames/s"), ("metadata", "metadata time"), ("total", "launch time"),
                              ("qido_all", "QIDO-RS all instances time")):
                if key == "frames":
                    r = [(a["n"] / a["frames"]) / (b["n"] / b["frames"]) for a, b in zip(results[name], results["Orthanc"])]
                else:
                    r = [a[key] / b[key] for a, b in zip(results[name], results["Orthanc"])]
                print(f"  ratio {name}/Orthanc {what}: {statistics.median(r):.2f} ({min(r):.2f}-{max(r):.2f})")
        if "base" in results:
            r = [(a["n"] / a["frames"]) / (b["n"] / b["frames"]) for a, b in zip(results["xdsi"], results["base"])]
            print(f"  ratio this tree/base frames/s: {statistics.median(r):.2f} ({min(r):.2f}-{max(r):.2f})")
            r = [a["qido_all"] / b["qido_all"] for a, b in zip(results["xdsi"], results["base"])]
            print(f"  ratio this tree/base QIDO-RS all instances time: {statistics.median(r):.2f} ({min(r):.2f}-{max(r):.2f})")

        if args.profile:
            proc = servers["xdsi"]
            with py_spy(proc.proc.pid, args.profile, wait=30):  # type: ignore[union-attr]
                for _ in range(3):
                    launch(targets["xdsi"][0], spec.study_uid, args.threads, frame_bytes)
            print(f"profile: {args.profile}")
    finally:
        for p in servers.values():
            p.stop()
        orthanc.stop()
        remove_work(work, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
