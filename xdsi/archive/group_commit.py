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
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Generic, TypeVar

from sqlalchemy.orm import Session

from xdsi.index.db import Index

T = TypeVar("T")

MAX_BATCH = 64  # instances per transaction: bounds the time a follower waits behind the leader's batch


class _Job(Generic[T]):
    __slots__ = ("fn", "value", "error", "done")

    def __init__(self, fn: Callable[[Session], T]) -> None:
        self.fn = fn
        self.value: T | None = None
        self.error: BaseException | None = None
        self.done = False


class GroupCommitter:
    """Runs ``fn(session)`` for concurrent callers in shared transactions; returns after its transaction committed."""

    def __init__(self, index: Index, max_batch: int = MAX_BATCH) -> None:
        self.index = index
        self.max_batch = max_batch
        self._cond = threading.Condition(threading.Lock())
        self._queue: list[_Job[Any]] = []
        self._writing = False
        # figures for tests and benchmarks: transactions committed, instances written in them
        self.transactions = 0
        self.jobs = 0

    def run(self, fn: Callable[[Session], T]) -> T:
        """``fn(session)`` inside a committed transaction; re-raises what ``fn`` or the commit raised."""
        job: _Job[T] = _Job(fn)
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

    def _write(self, batch: list[_Job[Any]]) -> None:
        try:
            with self.index.session() as s:
                if len(batch) == 1:  # alone: no savepoint, the transaction is the instance's own
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
                if job.error is None:
                    job.error = exc
                    job.value = None
            if not isinstance(exc, Exception):
                raise
        finally:
            for job in batch:
                job.done = True
