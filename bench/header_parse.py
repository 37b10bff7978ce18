#!/usr/bin/env python3
"""CPU of the received-header parse: read_header_dataset + the metadata journal's dataset_json, per instance.

    python bench/header_parse.py [-n 200] [--rows 512] [--cols 512] [--rounds 3] [--against BASE_TREE]

The corpus: n generated CT instances (xdsi.tools.synth, one study) and every file of pydicom's own test
files.  Each measurement runs in a fresh process (``--worker``) that imports xdsi from one source tree
and times, with ``time.process_time``, ``read_header_dataset(path)`` and then ``dataset_json(ds, ts)`` on
every file (the CT files several times over); figures are CPU ms per instance.

Without ``--against`` the two sides are this tree with its lean path and this tree with the lean path
switched off (``xdsi.archive.rawvalues.enabled`` -> False: every element converted by pydicom, the path
before issue 14).  With ``--against DIR`` (e.g. ``git worktree add DIR BASE``) the other side is that
tree's code.  Rounds alternate the order (ABBA); the summary gives medians and the ratio new/old.

Every worker also reports, per file, a digest of what it decided: the refusal text, or the header and
the journal's JSON text (or the exception dataset_json raised).  Any file on which the two sides differ
is listed and the script exits 1: a faster parse that answers differently is not a result.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def generate(out: Path, n: int, rows: int, cols: int) -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import pydicom.data

    from xdsi.tools.synth import StudySpec, ct_instance
    from xdsi.uids import new_uid

    ct = out / "ct"
    ct.mkdir(parents=True)
    spec = StudySpec(patient_id="BENCH01", patient_name="BENCH^HEADER")
    series_uid = new_uid()
    for i in range(n):
        ds = ct_instance(spec, series_uid, i + 1, rows=rows, columns=cols, seed=i)
        ds.save_as(ct / f"{i:06d}.dcm", enforce_file_format=True)
    src = Path(pydicom.data.__file__).parent / "test_files"
    pyd = out / "pydicom"
    pyd.mkdir()
    for i, p in enumerate(sorted(q for q in src.rglob("*") if q.is_file())):
        shutil.copyfile(p, pyd / f"{i:04d}_{p.name}")


def worker(tree: Path, corpus: Path, reps: int, lean: bool) -> dict:
    """Runs in its own process: time and digest every file with the xdsi of ``tree``."""
    sys.path.insert(0, str(tree))
    import warnings

    warnings.simplefilter("ignore")
    import logging

    logging.disable(logging.CRITICAL)
    from xdsi.archive import header as H
    from xdsi.archive import metadata as M

    if not lean:
        from xdsi.archive import rawvalues

        rawvalues.enabled = lambda: False  # type: ignore[assignment]

    def one(path: Path) -> str:
        try:
            h, ds = H.read_header_dataset(path)
        except H.InvalidDataset as exc:
            return "refused " + str(exc)
        try:
            text = M.dataset_json(ds, h.transfer_syntax_uid)
        except Exception as exc:
            text = f"{exc.__class__.__name__}: {exc}"
        return repr(h) + "\n" + text

    digests = {}
    for p in sorted((corpus / "pydicom").iterdir()) + sorted((corpus / "ct").iterdir()):
        digests[f"{p.parent.name}/{p.name}"] = hashlib.sha256(one(p).encode()).hexdigest()

    ct = sorted((corpus / "ct").iterdir())
    pyd = sorted((corpus / "pydicom").iterdir())
    for p in ct[:20]:  # warm up
        one(p)
    parse = journal = 0.0
    for _ in range(reps):
        for p in ct:
            t0 = time.process_time()
            h, ds = H.read_header_dataset(p)
            t1 = time.process_time()
            M.dataset_json(ds, h.transfer_syntax_uid)
            t2 = time.process_time()
            parse += t1 - t0
            journal += t2 - t1
    t0 = time.process_time()
    for _ in range(2):
        for p in pyd:
            one(p)
    pyd_cpu = time.process_time() - t0
    n = reps * len(ct)
    return {
        "ct_parse_ms": parse / n * 1e3,
        "ct_journal_ms": journal / n * 1e3,
        "ct_total_ms": (parse + journal) / n * 1e3,
        "pydicom_files_ms": pyd_cpu / (2 * len(pyd)) * 1e3,
        "digests": digests,
    }


def run_worker(tree: Path, corpus: Path, reps: int, lean: bool) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(tree), "--corpus", str(corpus), "--reps", str(reps)]
    if not lean:
        cmd.append("--reference")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=str(tree)).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=200, help="generated CT instances")
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--cols", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5, help="passes over the CT files per worker")
    ap.add_argument("--against", type=Path, help="a base source tree to compare with (else: lean path off)")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.corpus, args.reps, lean=not args.reference)))
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="bench-header-"))
    try:
        generate(tmp / "corpus", args.n, args.rows, args.cols)
        new_side = ("new", ROOT, True)
        old_side = ("base", args.against.resolve(), True) if args.against else ("lean-off", ROOT, False)
        results: dict[str, list[dict]] = {"new": [], old_side[0]: []}
        for r in range(args.rounds):
            order = [new_side, old_side] if r % 2 == 0 else [old_side, new_side]
            for name, tree, lean in order:
                res = run_worker(tree, tmp / "corpus", args.reps, lean)
                results[name].append(res)
                print(f"round {r + 1} {name:8s} parse {res['ct_parse_ms']:.3f} ms  journal {res['ct_journal_ms']:.3f} ms  "
                      f"total {res['ct_total_ms']:.3f} ms/CT  pydicom files {res['pydicom_files_ms']:.3f} ms/file", flush=True)
        old = old_side[0]
        print(f"\n{args.n} CT {args.rows}x{args.cols} instances x {args.reps} passes, {args.rounds} rounds (ABBA), "
              f"CPU ms per instance, medians; {old}: {old_side[1]}{'' if old_side[2] else ' with rawvalues.enabled() False'}")
        print(f"{'':22s} {'new':>8s} {old:>8s} {'new/' + old:>10s}")
        for key in ("ct_parse_ms", "ct_journal_ms", "ct_total_ms", "pydicom_files_ms"):
            a = statistics.median(x[key] for x in results["new"])
            b = statistics.median(x[key] for x in results[old])
            print(f"{key:22s} {a:8.3f} {b:8.3f} {a / b:10.2f}")
        ratios = [n["ct_total_ms"] / o["ct_total_ms"] for n, o in zip(results["new"], results[old])]
        print(f"per-round ratio of ct_total_ms: {', '.join(f'{x:.2f}' for x in ratios)}")
        d_new, d_old = results["new"][0]["digests"], results[old][0]["digests"]
        differ = sorted(k for k in d_new.keys() | d_old.keys() if d_new.get(k) != d_old.get(k))
        print(f"outcome (refusal text, header, journal JSON) identical on {len(d_new) - len(differ)} of {len(d_new)} files")
        for k in differ:
            print(f"  DIFFERS: {k}")
        return 1 if differ else 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
