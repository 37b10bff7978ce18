#!/usr/bin/env python3
"""C-STORE ingest throughput: Debian's storescu sends N CT images to a real ``xdsi serve`` over one association.

    .venv/bin/python bench/ingest.py [-n 500] [--rows 512] [--cols 512] [--pg | --index-url URL]

The figure is the wall time of the storescu run (association set-up to
release), so it includes xdsi's full store path: parse, fsync the file,
commit the index row, acknowledge.  Afterwards the index must hold exactly N
instances, or the run fails.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_index_options, bench, machine  # noqa: E402
from xdsi.tools.synth import StudySpec, ct_instance  # noqa: E402
from xdsi.uids import new_uid  # noqa: E402

STORESCU = "/usr/bin/storescu"  # dcmtk's, not pynetdicom's app of the same name in the venv


def generate(out: Path, n: int, rows: int, cols: int) -> int:
    """Write n CT instances of one study (100 per series); returns the total bytes written."""
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


def count_instances(index_url: str) -> int:
    from sqlalchemy import func, select

    from xdsi.index.db import open_index
    from xdsi.index.models import Instance

    index = open_index(index_url, migrate=False)
    try:
        with index.session() as s:
            return int(s.scalar(select(func.count()).select_from(Instance)) or 0)
    finally:
        index.dispose()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=500, help="instances to send (default 500)")
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--cols", type=int, default=512)
    add_index_options(p)
    args = p.parse_args(argv)
    if not os.access(STORESCU, os.X_OK):
        print(f"{STORESCU} not found: apt-get install dcmtk", file=sys.stderr)
        return 2

    with bench(args, "ingest") as b:
        t0 = time.perf_counter()
        total = generate(b.dir / "in", args.n, args.rows, args.cols)
        print(f"generated {args.n} instances, {total / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s ({b.dir / 'in'})")
        server = b.serve()
        cmd = [STORESCU, "-aet", "BENCH", "-aec", server.ae_title, "+sd", server.host, str(server.dicom_port), str(b.dir / "in")]
        env = {**os.environ, "TCP_NODELAY": "1"}
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=max(600, args.n))
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            print(f"storescu failed ({r.returncode}):\n{r.stdout}{r.stderr}\n--- xdsi ---\n{server.output()}", file=sys.stderr)
            return 1
        stored = count_instances(b.index_url)
        ok = stored == args.n
        summary = (
            f"ingest: {args.n} x {args.rows}x{args.cols}x16-bit CT ({total / 1e6:.0f} MB) via dcmtk storescu, "
            f"1 association, {b.backend} index: {wall:.2f} s, {args.n / wall:.1f} inst/s, {total / 1e6 / wall:.1f} MB/s; "
            f"index holds {stored}/{args.n} [{machine()}]"
        )
        print(summary)
        if not ok:
            print(f"index count mismatch: {stored} != {args.n}\n{r.stdout}{r.stderr}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
