"""Group commit: the index writes of instances stored at the same time share one transaction.

Every stored instance needs its index rows committed before it is
acknowledged.  On SQLite each commit is a write-lock round and an fsync of the
WAL, and concurrent writers from one process do not queue for the lock: they
sleep in SQLite's busy handler (1, 2, 5, 10 … ms) until it is free, so four
associations storing at once spent more time asleep than writing, and ran
slower together than one alone (issue 14).

:class:`GroupCommitter` is the classic leader/follower scheme with no thread of
its own: a store that finds no write in progress becomes the leader and writes
its own instance plus every instance queued while it waits for the lock, in one
transaction, each inside its own SAVEPOINT so that one refused instance (a
patient mismatch, a lost duplicate race) rolls back only its own rows.  The
followers wait until the transaction holding their instance has committed; only
then does :meth:`run` return, so no acknowledgement is sent before its commit
("acknowledged = durable" holds).  A failed commit fails every instance of the
batch, as it failed the one instance before.  One store alone is a batch of one,
written exactly as before (no savepoint).

Across processes (``xdsi serve --workers N`` on one SQLite index) the leaders
of the processes take turns through an exclusive ``flock`` on a file beside the
database (:class:`WriterLock`): a waiting leader sleeps in the kernel and wakes
the moment the other commits, instead of polling in SQLite's busy handler.
PostgreSQL needs no such lock: its writers do not exclude one another.

A store alone in its batch that brings a *driver* form of its write (``run(fn, driver=...)``: the
index's fast path for a new instance of a known series) runs it on a DBAPI connection in a
transaction of its own, without an ORM session: BEGIN, the statements, COMMIT.  Why (issue 14):
the session's life around one instance (session, pool checkout, SQLAlchemy's transaction objects
and BEGIN event, commit) was ~15 % of the GIL time of a stored instance, more than the
statements.  When the driver form declines (it returns None before writing anything: the
instance needs the general path) the transaction is rolled back and the session form runs, in the
same turn of the writer lock.  Errors of the driver are raised as SQLAlchemy's (``DBAPIError``),
so retries and failures are the session form's.

When the database breaks a deadlock (two PostgreSQL writers bumping the same
study and series counters in different orders) or a serialization conflict,
the instances it hit are written again in a new transaction, up to
:data:`ATTEMPTS` times, before being failed: the condition clears by itself,
and a refused instance is one the modality has to send again.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager, Generic, TypeVar

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from xdsi.index.db import Index, retryable

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_BATCH = 64  # instances per transaction: bounds the time a follower waits behind the leader's batch
ATTEMPTS = 5  # transactions an instance is tried in when the database aborts it as a deadlock victim


class DriverConnection:
    """What a driver form of a write gets: the dialect, and ``connection`` (the pooled DBAPI connection, ``cursor()``).

    The same two attributes a SQLAlchemy ``Connection`` has, so one statement runner serves both
    (:class:`xdsi.index.catalog._DriverStatement`).
    """

    __slots__ = ("dialect", "connection")

    def __init__(self, dialect: Any, connection: Any) -> None:
        self.dialect = dialect
        self.connection = connection


class _Job(Generic[T]):
    __slots__ = ("fn", "driver", "value", "error", "done")

    def __init__(self, fn: Callable[[Session], T], driver: Callable[[DriverConnection], T | None] | None = None) -> None:
        self.fn = fn
        self.driver = driver
        self.value: T | None = None
        self.error: BaseException | None = None
        self.done = False


class WriterLock:
    """An exclusive ``flock`` on ``<database>-xdsi-writer.lock``, held for one write transaction.

    Taken only by group-commit leaders (one per process at a time), so it
    orders the processes; other writers (the XDS publisher, tier moves) still
    meet the leaders at SQLite's own lock.  The file holds nothing and may be
    deleted while no xdsi runs.
    """

    def __init__(self, database: Path) -> None:
        self.path = database.with_name(database.name + "-xdsi-writer.lock")
        self._fd: int | None = None
        self._open_lock = threading.Lock()

    def _fileno(self) -> int:
        with self._open_lock:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            return self._fd

    def __enter__(self) -> "WriterLock":
        fcntl.flock(self._fileno(), fcntl.LOCK_EX)  # blocks in the kernel, without the GIL
        return self

    def __exit__(self, *exc: Any) -> None:
        fcntl.flock(self._fileno(), fcntl.LOCK_UN)

    def close(self) -> None:
        with self._open_lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def writer_lock(index: Index) -> WriterLock | None:
    """The cross-process writer lock of a SQLite index on a file; None for PostgreSQL or an in-memory database."""
    url = index.engine.url
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return WriterLock(Path(url.database))


class GroupCommitter:
    """Runs ``fn(session)`` for concurrent callers in shared transactions; returns after its transaction committed."""

    def __init__(self, index: Index, max_batch: int = MAX_BATCH) -> None:
        self.index = index
        self.max_batch = max_batch
        self._cond = threading.Condition(threading.Lock())
        self._queue: list[_Job[Any]] = []
        self._writing = False
        self.lock = writer_lock(index)
        # figures for tests and benchmarks: transactions committed, instances written in them
        self.transactions = 0
        self.jobs = 0

    def run(self, fn: Callable[[Session], T], driver: Callable[[DriverConnection], T | None] | None = None) -> T:
        """``fn(session)`` inside a committed transaction; re-raises what ``fn`` or the commit raised.

        ``driver``: the same write on a DBAPI connection, or None when it cannot do it (it must then
        have written nothing); used when this job is alone in its batch (see the module docstring).
        """
        job: _Job[T] = _Job(fn, driver)
        with self._cond:
            self._queue.append(job)
            while not job.done:
                if self._writing:
                    self._cond.wait()
                    continue
                self._writing = True
                batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
                self._cond.release()
                try:
                    self._write(batch)
                finally:
                    self._cond.acquire()
                    self._writing = False
                    self._cond.notify_all()
        if job.error is not None:
            raise job.error
        return job.value  # type: ignore[return-value]

    def close(self) -> None:
        if self.lock is not None:
            self.lock.close()

    def _write(self, batch: list[_Job[Any]]) -> None:
        try:
            pending = batch
            for attempt in range(ATTEMPTS):
                self._attempt(pending)
                pending = [j for j in pending if j.error is not None and retryable(j.error)]
                if not pending or attempt == ATTEMPTS - 1:
                    break
                log.info("index write of %d instance(s) aborted by the database (%s); trying again",
                         len(pending), pending[0].error.__class__.__name__)
                time.sleep(0.005 * (attempt + 1))  # let the other writer commit
                for job in pending:
                    job.error = None
        finally:
            for job in batch:
                job.done = True

    def _attempt(self, batch: list[_Job[Any]]) -> None:
        lock: ContextManager[Any] = self.lock if self.lock is not None else nullcontext()
        try:
            with lock:
                alone = len(batch) == 1
                if not (alone and batch[0].driver is not None and self._by_driver(batch[0])):
                    with self.index.session() as s:
                        if alone:  # no savepoint, the transaction is the instance's own
                            batch[0].value = batch[0].fn(s)
                        else:
                            for job in batch:
                                try:
                                    with s.begin_nested():
                                        job.value = job.fn(s)
                                except Exception as exc:  # this instance only; the others go on
                                    job.error = exc
                                    job.value = None
            self.transactions += 1
            self.jobs += len(batch)
        except BaseException as exc:  # the commit (or the batch of one) failed: nothing of the batch is stored
            for job in batch:
                if job.error is None:  # an instance refused on its own (a patient mismatch) keeps its reason
                    job.error = exc
                    job.value = None
            if not isinstance(exc, Exception):
                raise

    def _by_driver(self, job: _Job[Any]) -> bool:
        """Run ``job.driver`` in a transaction of its own on a DBAPI connection; False if it declined (rolled back)."""
        engine = self.index.engine
        dialect = engine.dialect
        raw = engine.raw_connection()  # checked out of the pool (pre-pinged on PostgreSQL) and back on close
        try:
            dbapi = raw.dbapi_connection
            try:
                if dialect.name == "sqlite":  # autocommit mode (xdsi.index.db): take the write lock at BEGIN
                    dbapi.execute("BEGIN IMMEDIATE")
                value = job.driver(DriverConnection(dialect, raw))  # type: ignore[misc]
                if value is None:
                    dbapi.rollback()
                    return False
                dbapi.commit()
            except dialect.loaded_dbapi.Error as exc:
                _rollback_quietly(dbapi)
                raise DBAPIError.instance(None, None, exc, dialect.loaded_dbapi.Error) from exc
            except BaseException:
                _rollback_quietly(dbapi)
                raise
        finally:
            raw.close()
        job.value = value
        return True


def _rollback_quietly(dbapi: Any) -> None:
    try:
        dbapi.rollback()
    except Exception:  # the connection is broken: the pool discards it on close
        pass
