"""Group commit of index writes (issue 14): shared transactions, per-instance refusals, nothing returned before commit."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from xdsi.archive import Archive
from xdsi.archive.header import read_header
from xdsi.archive.store import Outcome
from xdsi.index import catalog
from xdsi.index.models import FileCopy, Instance, Patient, Series, Study
from xdsi.storage.tiers import sha256_file
from xdsi.tools.synth import StudySpec, write_study
from xdsi.uids import new_uid


def _count(archive: Archive, model: type) -> int:
    with archive.index.session() as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


def _until(pred, seconds: float = 10) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def test_followers_share_one_transaction_and_a_refusal_stays_their_own(archive: Archive, tmp_path: Path) -> None:
    """Seven stores queued behind a busy writer go out in one transaction.  The one naming another patient for
    the same study is refused alone; so is a second copy of an instance sent under a new series, and the series
    row it had written before its duplicate was found goes with its savepoint (no empty series left behind)."""
    spec = StudySpec(patient_id="GC-P1")
    good = [read_header(p) for p in write_study(tmp_path / "a", spec, series=1, per_series=6)]
    other = StudySpec(patient_id="GC-P2", study_uid=spec.study_uid)  # same study, another person
    bad = read_header(write_study(tmp_path / "b", other, series=1, per_series=1)[0])
    dup = dataclasses.replace(good[1], series_uid=new_uid())  # same SOP Instance UID, another series
    first, followers = good[0], [*good[1:3], bad, dup, *good[3:]]

    def record(h):  # type: ignore[no-untyped-def]
        copy = catalog.CopyRecord("cache", f"x/{h.sop_instance_uid}.dcm", 1, "0" * 64, h.transfer_syntax_uid)
        return lambda s: catalog.record_instance(s, h, copy)

    committer = archive.store.committer
    go = threading.Event()
    results: dict[tuple[str, str], object] = {}

    def leader() -> None:
        def slow(s):  # type: ignore[no-untyped-def]
            go.wait(30)
            return record(first)(s)
        results[(first.sop_instance_uid, first.series_uid)] = committer.run(slow)

    def follower(h) -> None:  # type: ignore[no-untyped-def]
        try:
            results[(h.sop_instance_uid, h.series_uid)] = committer.run(record(h))
        except Exception as exc:
            results[(h.sop_instance_uid, h.series_uid)] = exc

    threads = [threading.Thread(target=leader)]
    threads[0].start()
    while not committer._writing:
        time.sleep(0.001)
    threads += [threading.Thread(target=follower, args=(h,)) for h in followers]
    for t in threads[1:]:
        t.start()
    deadline = time.monotonic() + 30
    while len(committer._queue) < len(followers):
        assert time.monotonic() < deadline
        time.sleep(0.001)
    # nothing returned while the leader's transaction is open
    assert not results
    go.set()
    for t in threads:
        t.join(30)
    assert committer.transactions == 2 and committer.jobs == 8
    assert isinstance(results[(bad.sop_instance_uid, bad.series_uid)], catalog.PatientMismatch)
    assert isinstance(results[(dup.sop_instance_uid, dup.series_uid)], catalog.DuplicateInstance)
    assert all(not isinstance(results[(h.sop_instance_uid, h.series_uid)], Exception) for h in good)
    with archive.index.session() as s:
        sops = set(s.scalars(select(Instance.sop_instance_uid)))
        assert sops == {h.sop_instance_uid for h in good}
        assert set(s.scalars(select(Patient.patient_id))) == {"GC-P1"}  # GC-P2's row went with its savepoint
        assert s.scalar(select(func.count()).select_from(Study)) == 1
        assert set(s.scalars(select(Series.series_uid))) == {good[0].series_uid}


def test_concurrent_stores_all_land_intact(archive: Archive, tmp_path: Path) -> None:
    """Four threads storing at once (as four associations do): every instance indexed once, bytes as sent."""
    files = []
    for k in range(4):
        files += write_study(tmp_path / f"in{k}", StudySpec(patient_id=f"GC-C{k}"), series=2, per_series=5)
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def worker(part: list[Path]) -> None:
        for f in part:
            r = archive.store.store_file(f)
            with lock:
                outcomes.append(r.outcome)

    threads = [threading.Thread(target=worker, args=(files[k::4],)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert outcomes.count(Outcome.STORED) == len(files) == 40
    assert _count(archive, Instance) == 40
    with archive.index.session() as s:
        for c in s.scalars(select(FileCopy)):
            assert sha256_file(archive.tiers[c.tier].abspath(c.rel_path)) == (c.size, c.sha256)
    assert archive.store.committer.jobs == 40


def test_a_failed_commit_fails_every_instance_of_the_batch(archive: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The commit itself failing (disk full, connection lost) is reported to each caller; nothing is stored."""
    files = write_study(tmp_path / "in", StudySpec(patient_id="GC-F"), series=1, per_series=2)
    real = archive.index.session

    from contextlib import contextmanager

    @contextmanager
    def failing():  # type: ignore[no-untyped-def]
        with real() as s:
            yield s
            raise OSError("disk full")

    monkeypatch.setattr(archive.index, "session", failing)
    r = archive.store.store_file(files[0])
    assert r.outcome is Outcome.FAILED and "index failure" in r.reason
    monkeypatch.setattr(archive.index, "session", real)
    assert _count(archive, Instance) == 0
    assert not list(archive.tiers.hot.root.rglob("*.dcm"))  # the placed file went with the failed commit
    assert archive.store.store_file(files[0]).outcome is Outcome.STORED


def test_sqlite_leaders_of_two_processes_take_turns_through_the_writer_lock(archive: Archive, tmp_path: Path) -> None:
    """While one process's leader writes, another process cannot take the writer lock (it would wait in the
    kernel, not in SQLite's busy handler); after the commit it can.  PostgreSQL has no such lock."""
    import subprocess
    import sys

    committer = archive.store.committer
    if archive.index.dialect != "sqlite":
        assert committer.lock is None
        return
    assert committer.lock is not None
    probe = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR)\n"
             "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError:\n    sys.exit(3)\nsys.exit(0)")
    h = read_header(write_study(tmp_path / "in", StudySpec(patient_id="GC-L"), series=1, per_series=1)[0])
    seen: list[int] = []

    def while_writing(s):  # type: ignore[no-untyped-def]
        seen.append(subprocess.run([sys.executable, "-c", probe, str(committer.lock.path)]).returncode)
        copy = catalog.CopyRecord("cache", f"x/{h.sop_instance_uid}.dcm", 1, "0" * 64, h.transfer_syntax_uid)
        return catalog.record_instance(s, h, copy)

    committer.run(while_writing)
    after = subprocess.run([sys.executable, "-c", probe, str(committer.lock.path)]).returncode
    assert seen == [3] and after == 0
    assert _count(archive, Instance) == 1


def test_two_processes_store_into_one_sqlite_index(tmp_path: Path) -> None:
    """Two processes (as `xdsi serve --workers 2` runs) storing at once into one SQLite index: all indexed once."""
    import subprocess
    import sys

    from tests.conftest import make_settings

    settings = make_settings(tmp_path)
    Archive.open(settings).close()  # create the index once
    script = (
        "import sys, threading\n"
        "from pathlib import Path\n"
        "from tests.conftest import make_settings\n"
        "from xdsi.archive import Archive\n"
        "from xdsi.tools.synth import StudySpec, write_study\n"
        "tmp = Path(sys.argv[1]); k = sys.argv[2]\n"
        "a = Archive.open(make_settings(tmp), clean=False)\n"
        "files = write_study(tmp / ('in' + k), StudySpec(patient_id='GC-W' + k), series=1, per_series=12)\n"
        "bad = []\n"
        "def worker(part):\n"
        "    for f in part:\n"
        "        r = a.store.store_file(f)\n"
        "        if r.outcome.value != 'stored': bad.append(r)\n"
        "ts = [threading.Thread(target=worker, args=(files[i::2],)) for i in range(2)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\n"
        "a.close()\n"
        "sys.exit(1 if bad else 0)\n"
    )
    import os

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(k)], env=env) for k in range(2)]
    assert [p.wait(180) for p in procs] == [0, 0]
    a = Archive.open(settings, clean=False)
    try:
        assert _count(a, Instance) == 24
        with a.index.session() as s:
            for c in s.scalars(select(FileCopy)):
                assert sha256_file(a.tiers[c.tier].abspath(c.rel_path)) == (c.size, c.sha256)
    finally:
        a.close()


def test_a_deadlock_victim_is_written_again_not_refused(tmp_path: Path, postgres) -> None:  # type: ignore[no-untyped-def]
    """Two writers (two workers' committers on one PostgreSQL index) take the same study and series rows in
    opposite orders: PostgreSQL breaks the deadlock by aborting one of them.  That one is run again in a new
    transaction and both succeed; nothing is refused (before, the victim's instance got A700)."""
    from sqlalchemy import text, update

    from xdsi.archive.group_commit import GroupCommitter
    from xdsi.index.db import open_index

    url = postgres.create_database(f"t_gc_{new_uid()[-10:].replace('.', '')}")
    from tests.conftest import make_settings

    archive = Archive.open(make_settings(tmp_path, url))
    try:
        archive.store.store_file(write_study(tmp_path / "in", StudySpec(patient_id="GC-D"), series=1, per_series=1)[0])
        other = open_index(url)
        committers = [GroupCommitter(archive.index), GroupCommitter(other)]
        both_hold_one = threading.Barrier(2, timeout=30)
        calls = [0, 0]

        def writer(k: int):  # type: ignore[no-untyped-def]
            def fn(s):  # type: ignore[no-untyped-def]
                calls[k] += 1
                s.execute(text("SET LOCAL deadlock_timeout = '100ms'"))
                first, second = (Study, Series) if k == 0 else (Series, Study)
                s.execute(update(first).values(num_instances=first.num_instances + 0))
                if calls[k] == 1:
                    both_hold_one.wait()  # each holds one row and now asks for the other's
                s.execute(update(second).values(num_instances=second.num_instances + 0))
                return k
            return fn

        results: list[object] = [None, None]

        def run(k: int) -> None:
            try:
                results[k] = committers[k].run(writer(k))
            except Exception as exc:  # the test fails below with the error shown
                results[k] = exc

        threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == [0, 1]
        assert sorted(calls) == [1, 2]  # exactly one was the deadlock victim and ran twice
        other.engine.dispose()
    finally:
        archive.close()


def test_a_retryable_error_inside_a_batch_reruns_only_that_instance(archive: Archive, tmp_path: Path) -> None:
    """In a shared transaction the database aborting one instance's statement (its savepoint) leaves the
    others committed; that instance is written again on its own, and a deterministic refusal is not retried."""
    import psycopg
    from sqlalchemy.exc import OperationalError

    from xdsi.archive.group_commit import GroupCommitter

    committer = GroupCommitter(archive.index)
    calls: dict[str, int] = {"ok": 0, "victim": 0, "refused": 0}

    def job(name: str):  # type: ignore[no-untyped-def]
        def fn(s):  # type: ignore[no-untyped-def]
            calls[name] += 1
            if name == "victim" and calls[name] == 1:
                raise OperationalError("UPDATE study", {}, psycopg.errors.DeadlockDetected("deadlock detected"))
            if name == "refused":
                raise catalog.PatientMismatch("another patient")
            return name
        return fn

    gate = threading.Event()
    results: dict[str, object] = {}

    def leader(s):  # type: ignore[no-untyped-def]
        gate.wait(10)  # holds the writer role while the three below queue up into one batch
        return "leader"

    def run(name: str, fn) -> None:  # type: ignore[no-untyped-def]
        try:
            results[name] = committer.run(fn)
        except Exception as exc:
            results[name] = exc

    threads = [threading.Thread(target=run, args=("leader", leader))]
    threads[0].start()
    _until(lambda: committer._writing)
    threads += [threading.Thread(target=run, args=(n, job(n))) for n in ("ok", "victim", "refused")]
    for t in threads[1:]:
        t.start()
    _until(lambda: len(committer._queue) == 3)
    gate.set()
    for t in threads:
        t.join(30)
    assert results["leader"] == "leader" and results["ok"] == "ok" and results["victim"] == "victim"
    assert isinstance(results["refused"], catalog.PatientMismatch)
    assert calls == {"ok": 1, "victim": 2, "refused": 1}
    assert committer.transactions == 3  # the leader's, the batch of three, the victim's second attempt


def _driver_writes(committer, monkeypatch: pytest.MonkeyPatch) -> list[bool]:  # type: ignore[no-untyped-def]
    """Spy on the committer's driver form: True per job it wrote, False per job it declined."""
    seen: list[bool] = []
    real = committer._by_driver

    def spy(job):  # type: ignore[no-untyped-def]
        seen.append(done := real(job))
        return done

    monkeypatch.setattr(committer, "_by_driver", spy)
    return seen


def test_a_lone_new_instance_is_written_by_the_driver_form(archive: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One store at a time (one association): the first instance of a series needs the general path (the
    driver form declines, nothing written), every later one is written on the DBAPI connection; the rows and
    the study and series counters are those of the session form."""
    files = write_study(tmp_path / "in", StudySpec(patient_id="GC-DRV"), series=2, per_series=3)
    seen = _driver_writes(archive.store.committer, monkeypatch)
    for f in files:
        assert archive.store.store_file(f).outcome is Outcome.STORED
    assert seen == [False, True, True, False, True, True]
    with archive.index.session() as s:
        study = s.scalars(select(Study)).one()
        assert (study.num_series, study.num_instances) == (2, 6)
        assert sorted(se.num_instances for se in s.scalars(select(Series))) == [3, 3]
        copies = s.scalars(select(FileCopy)).all()
        assert len(copies) == 6
        for c in copies:  # the digest and size recorded are the stored file's
            assert (c.size, c.sha256) == sha256_file(archive.tiers.hot.abspath(c.rel_path))
    # the same instance again: refused as a duplicate before any index write is tried; the first copy stays
    assert archive.store.store_file(files[1]).outcome is Outcome.DUPLICATE
    assert len(seen) == 6 and _count(archive, Instance) == 6


def test_a_declined_or_failed_driver_form_leaves_nothing(archive: Archive, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a driver form wrote before it declined or failed is rolled back; its error arrives as SQLAlchemy's."""
    from sqlalchemy.exc import IntegrityError

    from xdsi.archive.group_commit import GroupCommitter

    committer = GroupCommitter(archive.index)
    sql = "INSERT INTO patient (patient_id, issuer_of_patient_id, scope_study_uid, patient_name, patient_name_norm, " \
          "birth_date, sex, created_at) VALUES ('{0}', '', '', '', '', '', '', '2026-01-01 00:00:00')"

    def declines(c):  # type: ignore[no-untyped-def]
        c.connection.cursor().execute(sql.format("DECLINED"))
        return None

    assert committer.run(lambda s: "session form", driver=declines) == "session form"

    def fails(c):  # type: ignore[no-untyped-def]
        cur = c.connection.cursor()
        cur.execute(sql.format("FAILED"))
        cur.execute(sql.format("FAILED"))  # the unique key: the driver's IntegrityError
        return 1

    with pytest.raises(IntegrityError):
        committer.run(lambda s: "not reached", driver=fails)
    assert _count(archive, Patient) == 0


def test_a_failed_driver_commit_fails_the_store_and_keeps_nothing(archive: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The COMMIT of the driver form failing (disk I/O error) is the instance's failure: no row, no file."""
    files = write_study(tmp_path / "in", StudySpec(patient_id="GC-DC"), series=1, per_series=2)
    assert archive.store.store_file(files[0]).outcome is Outcome.STORED  # the series, by the session form
    engine = archive.index.engine
    real = engine.raw_connection
    dbapi_error = engine.dialect.loaded_dbapi.OperationalError

    class FailingCommit:
        def __init__(self, conn) -> None:  # type: ignore[no-untyped-def]
            self._conn = conn

        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            return getattr(self._conn, name)

        def commit(self) -> None:
            raise dbapi_error("disk I/O error")

    class Raw:
        def __init__(self) -> None:
            self._raw = real()
            self.dbapi_connection = FailingCommit(self._raw.dbapi_connection)

        def cursor(self):  # type: ignore[no-untyped-def]
            return self._raw.cursor()

        def close(self) -> None:
            self._raw.close()

    seen = _driver_writes(archive.store.committer, monkeypatch)
    monkeypatch.setattr(engine, "raw_connection", Raw)
    r = archive.store.store_file(files[1])
    monkeypatch.setattr(engine, "raw_connection", real)
    assert r.outcome is Outcome.FAILED and "index failure" in r.reason
    assert _count(archive, Instance) == 1
    assert len(list(archive.tiers.hot.root.rglob("*.dcm"))) == 1  # the placed file went with the failed commit
    assert archive.store.store_file(files[1]).outcome is Outcome.STORED
    assert seen[-1] is True
