"""Bytes before/after lossless compression on a tier (issue 16): the figures for the note.

For each input: the Part 10 file size as stored, and the size after
``xdsi.storage.compress.squeeze`` (the code a ``compress`` tier runs:
encode, then decode with pydicom and compare with the original; a result not
smaller than the original is not kept) for JPEG 2000
Lossless and HTJ2K Lossless RPCL, plus the time each took.  Inputs:

* the synthetic CT of ``xdsi.tools.synth`` (uniform random 12-bit noise in 16
  bits: a worst case, nothing for a wavelet coder to predict);
* a body-like phantom CT, 512x512, 16-bit signed (the one the tier tests use);
* every uncompressed image among pydicom's bundled test files.

Run: ``python -m bench.compress_ratio`` (prints a table; ``--json`` for machine output).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_files

from xdsi.config import COMPRESS_METHODS
from xdsi.storage import compress as compression
from xdsi.tools.synth import StudySpec, ct_instance


def inputs(tmp: Path) -> list[tuple[str, Path]]:
    out: list[tuple[str, Path]] = []
    ds = ct_instance(StudySpec(), "1.2.3.4", 1, rows=512, columns=512, seed=1)
    p = tmp / "synth_ct.dcm"
    ds.save_as(p, enforce_file_format=True)
    out.append(("xdsi.tools.synth CT 512x512 (random 12-bit)", p))
    from tests.unit.test_tier_compress import study_files

    phantom = study_files(tmp / "phantom")
    out.append(("phantom CT 512x512 int16", phantom["ct"]))
    out.append(("phantom MR 256x256 12-in-16", phantom["mr"]))
    out.append(("phantom RGB 160x120", phantom["rgb"]))
    for f in sorted(get_testdata_files()):
        try:
            ds = dcmread(f, stop_before_pixels=True)
        except Exception:
            continue
        ts = str(getattr(getattr(ds, "file_meta", None), "get", lambda *_: "")("TransferSyntaxUID", "") or "")
        if ts in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99") and "Rows" in ds:
            out.append((f"pydicom {Path(f).name}", Path(f)))
    return out


def measure(label: str, path: Path, tmp: Path) -> dict[str, object]:
    row: dict[str, object] = {"input": label, "bytes": path.stat().st_size}
    for method, ts in COMPRESS_METHODS.items():
        t0 = time.perf_counter()
        try:
            c, why = compression.squeeze(path, ts, tmp / f"{method}.dcm")
        except Exception as exc:
            row[method] = f"refused: {exc.__class__.__name__}"
            continue
        if c is None:
            row[method] = f"kept: {compression.reason_key(why)}"
            continue
        row[method] = c.size
        row[f"{method} s"] = round(time.perf_counter() - t0, 3)
        (tmp / f"{method}.dcm").unlink(missing_ok=True)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        rows = [measure(label, p, tmp) for label, p in inputs(tmp)]
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        return 0
    print(f"{'input':<48} {'bytes':>9}  {'J2K lossless':>22}  {'HTJ2K lossless RPCL':>22}")
    totals = {m: [0, 0] for m in COMPRESS_METHODS}
    for r in rows:
        cells = []
        for m in COMPRESS_METHODS:
            v = r[m]
            if isinstance(v, int):
                cells.append(f"{v:>9} {r['bytes'] / v:5.2f}x {r[m + ' s']:5.2f}s")
                totals[m][0] += int(r["bytes"])  # type: ignore[arg-type]
                totals[m][1] += v
            else:
                cells.append(f"{str(v)[:22]:>22}")
        print(f"{str(r['input'])[:48]:<48} {r['bytes']:>9}  {cells[0]:>22}  {cells[1]:>22}")
    for m, (before, after) in totals.items():
        print(f"total {m}: {before} -> {after} bytes ({before / max(after, 1):.2f}x) over the compressed inputs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
