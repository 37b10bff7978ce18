"""Reads must not queue behind writers, and reading frames must not write the index per read."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

from pydicom.dataset import Dataset
from sqlalchemy import select, update

from xdsi.archive import Archive
from xdsi.archive.retrieve import TOUCH_INTERVAL
from xdsi.index.catalog import as_utc, utcnow
from xdsi.index.models import FileCopy, Instance
from xdsi.tools.synth import StudySpec, write_study


def _stored(archive: Archive, tmp_path: Path) -> StudySpec:
    spec = StudySpec()
    for f in write_study(tmp_path / "in", spec, per_series=2):
        assert archive.store.store_file(f).ok
    return spec


def test_query_runs_while_a_writer_holds_the_lock(archive: Archive, tmp_path: Path) -> None:
    spec = _stored(archive, tmp_path)
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = spec.study_uid
    result: list[int] = []
    with archive.index.session() as s:  # a writer in the middle of its transaction
        s.execute(update(Instance).values(content_date="20000101"))
        t = threading.Thread(target=lambda: result.append(len(list(archive.query.find(ident)))))
        t.start()
        t.join(timeout=10)
        assert not t.is_alive(), "the query waited for the writer's lock"
    assert result == [1]


def test_reads_stamp_last_read_at_at_most_once_per_interval(archive: Archive, tmp_path: Path) -> None:
    spec = _stored(archive, tmp_path)
    ref = archive.retrieve.select(study_uids=[spec.study_uid])[0]
    old = utcnow() - timedelta(days=3)
    with archive.index.session() as s:
        s.execute(update(FileCopy).values(last_read_at=old))
    archive.retrieve.path(ref)
    with archive.index.read_session() as s:
        first = as_utc(s.scalar(select(FileCopy.last_read_at).where(FileCopy.instance_fk == ref.pk)))
    assert first > old + timedelta(days=2), "a read of a stale copy must stamp it"
    archive.retrieve.path(ref)
    with archive.index.read_session() as s:
        second = as_utc(s.scalar(select(FileCopy.last_read_at).where(FileCopy.instance_fk == ref.pk)))
    assert second == first, "a second read within the interval must not write"
    assert TOUCH_INTERVAL <= timedelta(hours=1)  # far finer than the policy's days


def test_retrieve_selection_stamps_stale_copies_and_reads_fresh_ones_without_the_index(archive: Archive, tmp_path: Path) -> None:
    """C-GET/C-MOVE select with the copies' read stamps: a copy stale when selected is stamped when read;
    one fresh when selected is read without asking the index again (its stamp stays what the selection saw,
    within TOUCH_INTERVAL of the request, which the policy's days do not notice)."""
    spec = _stored(archive, tmp_path)
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = spec.study_uid
    old = utcnow() - timedelta(days=3)

    def stamps() -> list:
        with archive.index.read_session() as s:
            return [as_utc(v) for v in s.scalars(select(FileCopy.last_read_at).order_by(FileCopy.instance_fk))]

    with archive.index.session() as s:
        s.execute(update(FileCopy).values(last_read_at=old))
    refs = archive.retrieve.select_by_identifier(ident)
    assert len(refs) == 2 and all(r.read_at for r in refs)
    for r in refs:
        archive.retrieve.path(r)
    assert all(v > old + timedelta(days=2) for v in stamps()), "a copy stale when selected must be stamped"
    fresh = archive.retrieve.select_by_identifier(ident)
    with archive.index.session() as s:  # the index changes behind the selection's back
        s.execute(update(FileCopy).values(last_read_at=old))
    for r in fresh:
        archive.retrieve.path(r)
    assert stamps() == [old, old], "a copy fresh when selected is read without a lookup or a write"
