"""Whole-study retrieval, xdsi (WADO-RS and RAD-69 MTOM) against Orthanc's WADO-RS, in one run.

    python bench/retrieve.py [--instances 200] [--size 512] [--rounds 3] [--against OTHER_TREE] [--no-orthanc]
                             [--profile OUT.svg|OUT.txt] [--keep]

Needs root, curl, dcmtk's storescu and Debian's orthanc + orthanc-dicomweb
(``/work/shared/peers/README.md``).  The script re-executes itself in its own
network namespace (``BENCH_NETNS``, default ``bench-web-perf``; see
:mod:`bench.web_peers`), builds a study of N CT instances (size x size,
16 bit), imports it into a fresh xdsi data directory, sends it to a fresh
Orthanc with storescu, starts ``xdsi serve`` and then, in alternating order
each round (ABBA), times ``--repeat`` requests with curl (body to /dev/null, so the client costs
the same for every server):

- xdsi WADO-RS ``GET /dicomweb/studies/{uid}`` (multipart/related; type="application/dicom"; transfer-syntax=*);
- xdsi RAD-69 (``POST /xdsi/ImagingDocumentSource``, MTOM answer);
- Orthanc WADO-RS ``GET /dicom-web/studies/{uid}`` with the same Accept.

Each server's RSS is sampled every 10 ms during its requests (growth =
peak - RSS before).  Round 0 warms the page cache and the servers and is not
counted.  Prints MB/s per request, medians, and the per-round ratios
xdsi/Orthanc: only ratios measured in one run mean anything on a shared
machine.  ``--against DIR`` serves a copy of the data from another source tree
too (``git worktree add /tmp/base REV``), in the same rounds, and prints this
tree/base.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.peers import load_line, process_cpu, py_spy, remove_work  # noqa: E402
from bench.web_peers import LAST_TTFB, NS, Orthanc, RssPeak, curl  # noqa: E402

ACCEPT_DICOM = 'Accept: multipart/related; type="application/dicom"; transfer-syntax=*'


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--instances", type=int, default=200)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3, help="requests per measurement (one after the other, timed together)")
    ap.add_argument("--against", type=Path, help="also serve a copy of the data from this source tree, alternately")
    ap.add_argument("--no-orthanc", action="store_true")
    ap.add_argument("--only", choices=["wado", "rad69"], help="xdsi's WADO-RS or RAD-69 only")
    ap.add_argument("--profile", type=Path, help="py-spy of xdsi during 3 extra retrievals (.svg flame graph or raw text)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = ap.parse_args(argv)
    args.rounds = max(1, args.rounds)
    if not NS.inside():
        return NS.reexec(__file__, argv)

    import xdsi
    from tests.support.server import XdsiProcess

    print(f"xdsi imported from {Path(xdsi.__file__).parent}")
    from xdsi.archive import Archive
    from xdsi.config import Settings
    from xdsi.soap.client import build_request
    from xdsi.standards.constants import ACTION_RAD69, DEFAULT_REPOSITORY_UNIQUE_ID
    from xdsi.tools.synth import StudySpec, write_study

    work = Path(tempfile.mkdtemp(prefix="xdsi-bench-retrieve-"))
    os.chdir(work)  # "python -m xdsi" must not pick up a source tree from the working directory
    orthanc = Orthanc(work)
    servers: dict[str, XdsiProcess] = {}
    try:
        spec = StudySpec(patient_id="BENCHWEB", patient_name="BENCH^WEB")
        files = write_study(work / "in", spec, series=1, per_series=args.instances, rows=args.size, columns=args.size)
        total = sum(f.stat().st_size for f in files)
        data = work / "data"
        archive = Archive.open(Settings(data_dir=data))
        for f in files:
            archive.store.store_file(f, move=False)
        refs = archive.retrieve.select(study_uids=[spec.study_uid])
        archive.close()
        print(f"study: {len(refs)} x {args.size}x{args.size} CT, {total / 1e6:.1f} MB; {load_line()}")
        if not args.no_orthanc:
            orthanc.start()
            orthanc.load(work / "in")

        env = {"XDSI_LOG_LEVEL": "WARNING", "TCP_NODELAY": "1", "XDSI_REPOSITORY_UNIQUE_ID": DEFAULT_REPOSITORY_UNIQUE_ID,
               "XDSI_WORKERS": "1"}  # one worker: the figures below sample this pid (CPU, RSS, py-spy), and the supervisor serves nothing
        servers["xdsi"] = XdsiProcess(data, env={**env, "PYTHONPATH": str(ROOT)}).start(timeout=60)
        if args.against:
            shutil.copytree(data, work / "data-base")
            servers["base"] = XdsiProcess(work / "data-base", env={**env, "PYTHONPATH": str(args.against)}).start(timeout=60)

        series = {refs[0].series_uid: [r.sop_instance_uid for r in refs]}
        envelopes: dict[str, Path] = {}
        for name, proc in servers.items():
            url = f"http://127.0.0.1:{proc.http_port}/xdsi/ImagingDocumentSource"
            envelopes[name] = work / f"rad69-{name}.xml"
            envelopes[name].write_bytes(build_request(url, spec.study_uid, series, DEFAULT_REPOSITORY_UNIQUE_ID))

        def wado(port: int, prefix: str) -> list[str]:
            return ["-H", ACCEPT_DICOM, f"http://127.0.0.1:{port}/{prefix}/studies/{spec.study_uid}"]

        def rad69(name: str) -> list[str]:
            proc = servers[name]
            return ["-X", "POST", "--data-binary", f"@{envelopes[name]}",
                    "-H", f'Content-Type: application/soap+xml; charset=UTF-8; action="{ACTION_RAD69}"',
                    f"http://127.0.0.1:{proc.http_port}/xdsi/ImagingDocumentSource"]  # fmt: skip

        # (label, pid, curl args)
        cases: list[tuple[str, int, list[str]]] = []
        for name, proc in servers.items():
            pid = proc.proc.pid  # type: ignore[union-attr]
            if args.only in (None, "wado"):
                cases.append((f"{name} WADO-RS", pid, wado(proc.http_port, "dicomweb")))
            if args.only in (None, "rad69"):
                cases.append((f"{name} RAD-69", pid, rad69(name)))
        if not args.no_orthanc:
            cases.append(("Orthanc WADO-RS", orthanc.pid, wado(orthanc.http_port, "dicom-web")))

        mbps: dict[str, list[float]] = {c[0]: [] for c in cases}
        growth: dict[str, list[int]] = {c[0]: [] for c in cases}
        cpu: dict[str, list[float]] = {c[0]: [] for c in cases}
        for rnd in range(args.rounds + 1):
            for label, pid, cmd in cases if rnd % 2 else cases[::-1]:
                c0 = process_cpu(pid)
                with RssPeak(pid) as rss:
                    dt = ttfb = 0.0
                    for _ in range(args.repeat):
                        t, size = curl(cmd)
                        dt += t
                        ttfb += LAST_TTFB[0]
                        if size < total:
                            raise RuntimeError(f"{label}: {size} bytes received, the study has {total}")
                dt /= args.repeat
                ttfb /= args.repeat
                c1 = (process_cpu(pid) - c0) / args.repeat + c0
                if size < total:
                    raise RuntimeError(f"{label}: {size} bytes received, the study has {total}")
                if rnd:
                    mbps[label].append(total / 1e6 / dt)
                    growth[label].append(rss.growth)
                    cpu[label].append(c1 - c0)
                    print(f"round {rnd} {label:18s} {dt:6.3f} s {total / 1e6 / dt:7.1f} MB/s  first byte {ttfb * 1e3:4.0f} ms  server CPU {c1 - c0:5.2f} s  "
                          f"RSS {rss.before / 2**20:.0f} -> {rss.peak / 2**20:.0f} MiB")  # fmt: skip

        print(f"\nmedians over {args.rounds} rounds ({load_line()}):")
        for label in mbps:
            m = mbps[label]
            print(f"  {label:18s} {statistics.median(m):7.1f} MB/s ({min(m):.0f}-{max(m):.0f}), server CPU "
                  f"{statistics.median(cpu[label]):.2f} s, largest RSS growth {max(growth[label]) / 2**20:.1f} MiB")  # fmt: skip
        ref = "Orthanc WADO-RS"
        for label in mbps:
            if label != ref and ref in mbps:
                r = [a / b for a, b in zip(mbps[label], mbps[ref])]
                c = [a / b for a, b in zip(cpu[label], cpu[ref]) if b > 0]
                print(f"  ratio {label} / {ref}: MB/s {statistics.median(r):.2f} ({min(r):.2f}-{max(r):.2f})"
                      + (f", server CPU per study {statistics.median(c):.2f}" if c else ""))  # fmt: skip
        if "base" in servers:
            for kind in ("WADO-RS", "RAD-69"):
                a, b = mbps.get(f"xdsi {kind}"), mbps.get(f"base {kind}")
                if a and b:
                    r = [x / y for x, y in zip(a, b)]
                    print(f"  ratio this tree / base ({args.against}) {kind}: {statistics.median(r):.2f} ({min(r):.2f}-{max(r):.2f})")

        if args.profile:
            proc = servers["xdsi"]
            with py_spy(proc.proc.pid, args.profile, wait=30):  # type: ignore[union-attr]
                for _ in range(3):
                    curl(rad69("xdsi") if args.only == "rad69" else wado(proc.http_port, "dicomweb"))
            print(f"profile: {args.profile}")
    finally:
        for proc in servers.values():
            proc.stop()
        orthanc.stop()
        remove_work(work, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
