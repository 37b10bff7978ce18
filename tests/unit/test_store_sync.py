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


def test_a_file_hashed_and_synced_as_it_was_received_is_not_opened_again(archive: Archive, tmp_path: Path, monkeypatch) -> None:
    """The receiver's size, sha256 and early fsync (early_sync.Written) stand for the tier's own when they cover
    this very file: it is neither opened to be hashed nor synced again.  Its recorded checksum is still right."""
    import hashlib

    from xdsi.storage import early_sync

    (f,) = write_study(tmp_path / "src", StudySpec(patient_id="SYNC-3"), series=1, per_series=1, rows=64, columns=64)
    spool = tmp_path / "spool3.dcm"
    shutil.copyfile(f, spool)
    data = spool.read_bytes()
    written = early_sync.Written(len(data), hashlib.sha256(data).hexdigest(), early_sync.start(spool))
    opened: list[str] = []
    real_open = open

    def spy(path, *a, **k):  # type: ignore[no-untyped-def]
        opened.append(str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(tiers, "open", spy, raising=False)
    r = archive.store.store_file(spool, move=True, written=written)
    assert r.outcome is Outcome.STORED, r.reason
    assert opened == []
    with archive.index.session() as s:
        (copy,) = s.scalars(select(FileCopy)).all()
    assert copy.sha256 == hashlib.sha256(f.read_bytes()).hexdigest() == sha256_file(archive.tiers[copy.tier].abspath(copy.rel_path))[1]


def test_a_written_record_of_other_bytes_is_not_trusted(archive: Archive, tmp_path: Path) -> None:
    """A size that is not the file's: the tier hashes (and syncs) the file itself, and records what is there."""
    from xdsi.storage import early_sync

    (f,) = write_study(tmp_path / "src", StudySpec(patient_id="SYNC-4"), series=1, per_series=1, rows=64, columns=64)
    spool = tmp_path / "spool4.dcm"
    shutil.copyfile(f, spool)
    written = early_sync.Written(os.path.getsize(spool) - 1, "0" * 64, early_sync.start(spool))
    r = archive.store.store_file(spool, move=True, written=written)
    assert r.outcome is Outcome.STORED, r.reason
    with archive.index.session() as s:
        (copy,) = s.scalars(select(FileCopy)).all()
    assert copy.sha256 == sha256_file(f)[1] != "0" * 64


def test_the_tiers_temporary_folder_is_made_again_if_it_went(archive: Archive, tmp_path: Path) -> None:
    """The hot path no longer makes the folder for every file: one removed under a running archive is made again."""
    a, b = write_study(tmp_path / "src", StudySpec(patient_id="SYNC-5"), series=1, per_series=2, rows=64, columns=64)
    for n, f in enumerate((a, b)):
        spool = tmp_path / f"spool5-{n}.dcm"
        shutil.copyfile(f, spool)
        shutil.rmtree(archive.tiers.hot.tmp, ignore_errors=True)
        r = archive.store.store_file(spool, move=True)
        assert r.outcome is Outcome.STORED, r.reason
        assert not spool.exists()
