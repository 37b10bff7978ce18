"""A moved spool file is fsynced before it gets its name, and named (durably) before it is indexed.

The order that makes an acknowledgement durable: data fsync -> final name -> directory fsync -> index
commit.  The direct C-STORE reader may start the data fsync early (xdsi.storage.early_sync, its own
tests); this test pins the order of the steps the tier takes, with or without it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import select

from xdsi.archive import Archive
from xdsi.archive import store as store_module
from xdsi.archive.store import Outcome
from xdsi.index.models import FileCopy
from xdsi.storage import tiers
from xdsi.storage.tiers import sha256_file
from xdsi.tools.synth import StudySpec, write_study


def test_moved_spool_file_is_synced_before_named_and_named_before_indexed(archive: Archive, tmp_path: Path, monkeypatch) -> None:
    (f,) = write_study(tmp_path / "src", StudySpec(patient_id="SYNC-1"), series=1, per_series=1, rows=64, columns=64)
    spool = tmp_path / "spool.dcm"
    shutil.copyfile(f, spool)
    spool_ino = os.stat(spool).st_ino
    events: list[str] = []
    real_fsync, real_link, real_run = os.fsync, os.link, archive.store.committer.run

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        events.append("fsync-file" if st.st_ino == spool_ino else "fsync-dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync-other")
        real_fsync(fd)

    def link(src, dst, *a, **k):  # type: ignore[no-untyped-def]
        events.append("name")
        return real_link(src, dst, *a, **k)

    def run(fn, **kw):  # type: ignore[no-untyped-def]
        events.append("index")
        return real_run(fn, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(tiers.os, "link", link)
    monkeypatch.setattr(archive.store.committer, "run", run)
    r = archive.store.store_file(spool, move=True)
    assert r.outcome is Outcome.STORED, r.reason
    assert not spool.exists()  # renamed into the tier, not copied
    assert "fsync-file" in events and "name" in events and "index" in events
    assert events.index("fsync-file") < events.index("name") < events.index("index")
    # a directory fsync after the name and before the index row
    assert any(e == "fsync-dir" for e in events[events.index("name") : events.index("index")])
    with archive.index.session() as s:
        (copy,) = s.scalars(select(FileCopy)).all()
    stored = archive.tiers[copy.tier].abspath(copy.rel_path)
    assert os.stat(stored).st_ino == spool_ino
    assert (copy.size, copy.sha256) == (stored.stat().st_size, sha256_file(stored)[1])
    assert stored.read_bytes() == f.read_bytes()


def test_refused_spool_file_is_left_to_its_owner(archive: Archive, tmp_path: Path) -> None:
    (f,) = write_study(tmp_path / "src", StudySpec(patient_id="SYNC-2"), series=1, per_series=1, rows=64, columns=64)
    spool = tmp_path / "spool.dcm"
    shutil.copyfile(f, spool)
    expect = store_module.Expected(sop_instance_uid="1.2.3.4")  # not what the data set is
    r = archive.store.store_file(spool, move=True, expect=expect)
    assert r.outcome is Outcome.REJECTED and r.mismatch == "SOPInstanceUID"
    assert spool.read_bytes() == f.read_bytes()
    assert dcmread(spool).SOPInstanceUID != "1.2.3.4"
