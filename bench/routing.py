#!/usr/bin/env python3
"""Routing: forwarding throughput against dcmtk's own storescu, and what routing costs ingest, in one run.

    python bench/routing.py [--instances 200] [--size 512] [--rounds 3]

Needs root and Debian's dcmtk (see ``/work/shared/peers/README.md``).  The script re-executes itself in
its own network namespace (``BENCH_NETNS``, default ``bench-routing``) where dcmtk ``storescp --ignore``
is the destination, and alternates (ABBA) each round:

- forward: a study already archived sent to the storescp by the routing queue (the sending code
  ``xdsi serve``'s routing worker runs, here in this process: ``RouteQueue.queue_study`` then
  ``deliver_now``) against dcmtk ``storescu`` sending the same files to the same storescp.  Every row
  must end ``sent``.
- ingest: ``storescu`` into a fresh ``xdsi serve`` with a route forwarding everything to the storescp
  against one with no route: instances/s of the acknowledged stores, and for the routed server the time
  until the last forward was sent (end to end).

Only the ratios of one run mean anything on a shared machine; the load average is printed.
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

from bench.peers import STORESCU, Netns, peer  # noqa: E402

NS = Netns.from_env("bench-routing", 24600)


def storescu(port: int, aec: str, folder: Path, aet: str = "BENCH") -> float:
    t = time.perf_counter()
    r = subprocess.run([STORESCU, "-aet", aet, "-aec", aec, "+sd", "127.0.0.1", str(port), str(folder)],
                       capture_output=True, text=True, timeout=900, env={**os.environ, "TCP_NODELAY": "1"})
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"storescu failed ({r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return dt


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--instances", type=int, default=200)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    rc = NS.enter(__file__, argv, STORESCU)
    if rc is not None:
        return rc

    from bench.common import machine
    from tests.support.server import XdsiProcess
    from xdsi.archive import Archive
    from xdsi.config import load_settings
    from xdsi.routing.models import SENT
    from xdsi.routing.queue import RouteQueue
    from xdsi.routing.service import deliver_now
    from xdsi.tools.synth import StudySpec, write_study

    work = Path(tempfile.mkdtemp(prefix="xdsi-bench-routing-"))
    env = NS.peer_env(work, STORESCP_OPTS="--ignore")
    port = NS.port(3)
    started = False
    try:
        spec = StudySpec(patient_id="BENCHROUTE", patient_name="BENCH^ROUTE")
        files = write_study(work / "in", spec, series=1, per_series=args.instances, rows=args.size, columns=args.size)
        total = sum(f.stat().st_size for f in files)
        peers = f'[peers.STORESCP]\nhost = "127.0.0.1"\nport = {port}\n'
        plain, routed = work / "plain.toml", work / "routed.toml"
        plain.write_text(peers)
        routed.write_text(peers + '\n[[routes]]\nname = "all"\ndestinations = ["STORESCP"]\n')
        settings = load_settings(plain, env={}, overrides={"data_dir": work / "archive"})
        archive = Archive.open(settings)
        for f in files:
            assert archive.store.store_file(f).ok
        print(f"study: {args.instances} x {args.size}x{args.size} CT, {total / 1e6:.1f} MB; {machine()}")
        peer("start_storescp.sh", env, "--fresh")
        started = True

        def forward_xdsi() -> float:
            q = RouteQueue(archive, (), settings.routing)
            t = time.perf_counter()
            pks = q.queue_study(spec.study_uid, "STORESCP")
            deliver_now(q, pks)
            dt = time.perf_counter() - t
            sent = sum(1 for r in q.rows_for(pks) if r.state == SENT)
            if sent != args.instances:
                raise RuntimeError(f"routing sent {sent} of {args.instances}")
            return dt

        def ingest(config: Path) -> tuple[float, float | None]:
            data = work / "serve-data"
            shutil.rmtree(data, ignore_errors=True)
            proc = XdsiProcess(data, config=config, env={"XDSI_LOG_LEVEL": "WARNING", "TCP_NODELAY": "1", "PYTHONPATH": str(ROOT)}).start(timeout=60)
            try:
                t = time.perf_counter()
                dt = storescu(proc.dicom_port, proc.ae_title, work / "in")
                if config is plain:
                    return dt, None
                from sqlalchemy import create_engine, text

                engine = create_engine(f"sqlite:///{data / 'index.sqlite'}")
                try:
                    deadline = time.monotonic() + 600
                    while time.monotonic() < deadline:
                        with engine.connect() as c:
                            n = c.execute(text("SELECT count(*) FROM route_forward WHERE state = 'sent'")).scalar()
                        if n == args.instances:
                            return dt, time.perf_counter() - t
                        time.sleep(0.05)
                finally:
                    engine.dispose()
                raise RuntimeError("the routed server did not forward every instance in 10 minutes")
            finally:
                proc.stop()

        fwd: dict[str, list[float]] = {"xdsi": [], "storescu": []}
        ing: dict[str, list[float]] = {"plain": [], "routed": [], "end-to-end": []}
        for rnd in range(args.rounds + 1):  # round 0 warms up, not counted
            for name in (["xdsi", "storescu"] if rnd % 2 else ["storescu", "xdsi"]):
                dt = forward_xdsi() if name == "xdsi" else storescu(port, "STORESCP", work / "in")
                if rnd:
                    fwd[name].append(args.instances / dt)
                    print(f"round {rnd} forward {name:8s} {dt:6.2f} s {args.instances / dt:7.1f} inst/s {total / 1e6 / dt:6.1f} MB/s", flush=True)
            for name in (["routed", "plain"] if rnd % 2 else ["plain", "routed"]):
                dt, e2e = ingest(routed if name == "routed" else plain)
                if rnd:
                    ing[name].append(args.instances / dt)
                    extra = ""
                    if e2e is not None:
                        ing["end-to-end"].append(args.instances / e2e)
                        extra = f"; every forward sent after {e2e:6.2f} s ({args.instances / e2e:.1f} inst/s end to end)"
                    print(f"round {rnd} ingest  {name:8s} {dt:6.2f} s {args.instances / dt:7.1f} inst/s{extra}", flush=True)
        archive.close()
        med = {k: statistics.median(v) for k, v in {**fwd, **ing}.items()}
        fr = [a / b for a, b in zip(fwd["xdsi"], fwd["storescu"])]
        ir = [a / b for a, b in zip(ing["routed"], ing["plain"])]
        print(f"forward median: xdsi routing {med['xdsi']:.1f} inst/s, dcmtk storescu {med['storescu']:.1f} inst/s; "
              f"ratio xdsi/storescu per round {', '.join(f'{r:.2f}' for r in fr)} (median {statistics.median(fr):.2f})")
        print(f"ingest median: with a route {med['routed']:.1f} inst/s, without {med['plain']:.1f} inst/s; "
              f"ratio per round {', '.join(f'{r:.2f}' for r in ir)} (median {statistics.median(ir):.2f}); "
              f"end to end (stored and forwarded) {med['end-to-end']:.1f} inst/s")
        print(f"load after: {machine()}")
        return 0
    finally:
        if started:
            try:
                peer("stop_storescp.sh", env)
            except RuntimeError as exc:
                print(exc, file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
