"""The routing worker: one thread per node that evaluates new instances and sends due forwards.

``xdsi serve`` starts it once (:meth:`RoutingService.start`, beside the XDS
publisher) for the main archive and every partition; with several worker
processes only one of them may run it (the queue is safe if two do, through
its leases, but they would compete for nothing).  Each archive's store service
gets a listener that only wakes the thread: the rules are evaluated from the
index (:meth:`RouteQueue.evaluate_new`), so nothing routing does sits on the
path of an acknowledgement.

The thread sends one batch (one destination, one transfer syntax) at a time,
highest priority first, and looks for new instances between batches, so a
long backlog for one workstation does not keep new arrivals from being queued.
"""

from __future__ import annotations

import logging
from collections import Counter
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Sequence

from xdsi.routing.queue import Claimed, RouteQueue
from xdsi.routing.senders import send_batch

log = logging.getLogger(__name__)


GATHER = 0.5  # seconds to wait after a wake-up before the next pass (profiled: passes of a few instances cost 8 % of ingest CPU)


def queues_for(archives: Sequence[Any]) -> list[RouteQueue]:
    """One queue per archive (main AE title and partitions), each with the routes of the settings."""
    out = []
    for a in archives:
        s = a.settings
        out.append(RouteQueue(a, s.routes, s.routing))
    return out


class RoutingService:
    def __init__(self, archives: Sequence[Any]) -> None:
        self.queues = queues_for(archives)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listening: list[tuple[Any, Any]] = []

    @property
    def poll_interval(self) -> float:
        return min(q.settings.poll_interval for q in self.queues) if self.queues else 1.0

    def wake(self, *_args: Any) -> None:
        """A store listener: something arrived (or `xdsi route` queued rows); look now, not at the next poll."""
        self._wake.set()

    def _listener(self, q: RouteQueue) -> Callable[..., None]:
        def stored(header: Any, path: Any, sha256: str) -> None:
            q.stored(header, path, sha256)
            self._wake.set()

        return stored

    def start(self) -> None:
        if self._thread is not None:
            return
        for q in self.queues:
            listener = self._listener(q)
            q.archive.store.listeners.append(listener)
            self._listening.append((q.archive, listener))
            try:
                q.release_dead_leases()
            except Exception:
                log.exception("routing: could not release the leases of a previous process")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="xdsi-routing", daemon=True)
        self._thread.start()
        routes = sum(len(q.routes) for q in self.queues)
        log.info("routing: %d route(s) over %d archive(s)", routes, len(self.queues))

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the instance being sent (its answer is recorded); what was claimed and not sent is released."""
        self._stop.set()
        self._wake.set()
        for archive, listener in self._listening:
            try:
                archive.store.listeners.remove(listener)
            except ValueError:
                pass
        self._listening.clear()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("routing: the worker did not stop within %.0f s", timeout)
            self._thread = None

    @property
    def parallel(self) -> int:
        return max((q.settings.parallel for q in self.queues), default=1)

    def _run(self) -> None:
        """Evaluate, then keep up to ``parallel`` batches in flight, one per destination; sleep when idle."""
        inflight: dict[Future[None], tuple[RouteQueue, str]] = {}
        with ThreadPoolExecutor(self.parallel, thread_name_prefix="xdsi-route-send") as pool:
            while not self._stop.is_set():
                self._wake.clear()
                busy = False
                for f in [f for f in inflight if f.done()]:
                    q, dest = inflight.pop(f)
                    if f.exception() is not None:
                        log.error("routing: sending to %s failed", dest, exc_info=f.exception())
                for q in self.queues:
                    if self._stop.is_set():
                        break
                    try:
                        busy |= bool(q.evaluate_new())
                        while len(inflight) < self.parallel and not self._stop.is_set():
                            claims = q.claim(exclude={d for qq, d in inflight.values() if qq is q})
                            if not claims:
                                break
                            f = pool.submit(deliver, q, claims, self._stop.is_set)
                            f.add_done_callback(lambda _f: self._wake.set())
                            inflight[f] = (q, claims[0].destination)
                    except Exception:
                        log.exception("routing: pass over %s failed", q.called_aet)
                if not busy and self._wake.wait(self.poll_interval) and not self._stop.is_set():
                    # woken by a store (or a finished batch): let more arrive, so that a study being received
                    # is evaluated and sent in groups (one transaction, one association), not one by one
                    self._stop.wait(GATHER)
            # stopping: leaving the pool waits for each batch, which ends after the instance it is sending
            # and releases the rest of its rows

    def step(self, q: RouteQueue) -> bool:
        """One pass in the calling thread (tests, one-shot commands): evaluate, then send one batch."""
        looked = q.evaluate_new()
        claims = q.claim()
        if claims:
            deliver(q, claims)
        return bool(looked or claims)


def deliver_now(q: RouteQueue, pks: Sequence[int]) -> list[Claimed]:
    """Send these rows in this process (``xdsi route``); returns what was claimed (the rest is another process's)."""
    done: list[Claimed] = []
    remaining = list(pks)
    while remaining:
        claims = q.claim(pks=remaining)
        if not claims:
            break
        deliver(q, claims)
        done += claims
        claimed = {c.pk for c in claims}
        remaining = [pk for pk in remaining if pk not in claimed]
    return done


SETTLE_EVERY = 16  # answers recorded per commit at most ...
SETTLE_AFTER = 0.25  # ... or after this many seconds, whichever comes first


def deliver(q: RouteQueue, claims: Sequence[Claimed], stopping: Callable[[], bool] = lambda: False) -> None:
    """Send claimed rows, recording the answers in small groups; rows not attempted (stopping) are released.

    One commit per answer (an fsync each on SQLite) was a third of the sending time (profiled: 1.6 of
    4.6 s for 200 instances); answers are committed together, at most :data:`SETTLE_EVERY` or
    :data:`SETTLE_AFTER` seconds apart.  The price: if the process dies, the answers not yet recorded
    (at most that many instances) are sent again after the restart, which a storage SCP takes as a
    duplicate.
    """
    pending = [c.pk for c in claims]
    failures: Counter[str] = Counter()
    answers: list[tuple[Claimed, bool, str, bool]] = []
    first_at = [0.0]

    def flush() -> None:
        if answers:
            q.settle_many(answers, renew=pending)
            answers.clear()

    def report(c: Claimed, ok: bool, error: str, final: bool) -> None:
        if c.pk in pending:
            pending.remove(c.pk)
        if not ok:
            if not failures[error]:  # once per distinct reason and batch: a destination that is down is one line
                log.warning("routing: %s to %s failed: %s", c.sop_instance_uid, c.destination, error)
            failures[error] += 1
        if not answers:
            first_at[0] = time.monotonic()
        answers.append((c, ok, error, final))
        if len(answers) >= SETTLE_EVERY or time.monotonic() - first_at[0] >= SETTLE_AFTER or not pending:
            flush()

    try:
        left = send_batch(q.archive, claims, q.settings, report, stopping)
    finally:
        flush()
    q.release(left)
    failed = sum(failures.values())
    if failed > 1:
        log.warning("routing: %d of %d instance(s) to %s failed this attempt", failed, len(claims), claims[0].destination)
    elif not failed:
        log.info("routing: %d instance(s) sent to %s", len(claims), claims[0].destination)
