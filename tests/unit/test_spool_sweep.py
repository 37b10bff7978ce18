"""The periodic spool sweep: old orphans go, fresh files and files a handler holds stay, other files are never touched."""

from __future__ import annotations

import os
import time
from pathlib import Path

from xdsi.dimse.spool import SpoolKeeper, spool_usage


def _file(d: Path, name: str, age: float) -> Path:
    p = d / name
    p.write_bytes(b"x" * 100)
    t = time.time() - age
    os.utime(p, (t, t))
    return p


def test_sweep_removes_only_stale_unowned_spool_files(tmp_path: Path) -> None:
    keeper = SpoolKeeper(tmp_path, max_age=60)
    stale = _file(tmp_path, "tmpabc.dcm", 120)
    stale_stow = _file(tmp_path, "stow-1.part", 120)
    fresh = _file(tmp_path, "tmpdef.dcm", 5)
    held = _file(tmp_path, "tmpghi.dcm", 120)
    other = _file(tmp_path, "produce-xyz", 120)  # a retrieve spool: its owner streams it, never swept
    keeper.hold(held)
    assert spool_usage(tmp_path).files == 5
    assert keeper.sweep() == 2
    assert not stale.exists() and not stale_stow.exists()
    assert fresh.exists() and held.exists() and other.exists()
    keeper.release(held)
    assert keeper.sweep() == 1 and not held.exists()
    assert spool_usage(tmp_path).bytes == 200
    assert spool_usage(tmp_path / "missing").files == 0
