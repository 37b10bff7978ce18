"""A worker's threads run on its own CPU while the node is busy (``xdsi serve --workers N``).

Why (issue 14, measured on this 2-CPU machine with Debian's storescu, ``xdsi serve --workers 2``, 400
512x512 CT instances, data on a quiet file system): with the scheduler free to move threads, the CPU
per stored instance grew from ~2.4 ms on one association to 2.5-4.6 ms on two or four at once, and
the workers and the storescu clients hopped between the cores (2-4 migrations per instance).  Pinning
each worker to a CPU of its own cut that CPU by 12-18 % and raised throughput: four associations
444 -> 492 and 380 -> 450 inst/s, two 264 -> 343 and 298 -> 318 inst/s, in pairs run one after the
other.  A Python interpreter's working set is large and lives in its core's cache; a thread moved to
the other core starts cold.

But pinning costs when the node is not busy: one association then has a whole core to itself, and its
helper threads (the early fsyncs, the spool files made ahead), the peer and the association thread are
best spread by the scheduler; pinned, one association ran 4-7 % slower.  So the rule is adaptive:
while the node's workers hold at least as many connections as they have CPUs between them (the
counters :mod:`xdsi.dimse.accept_balance` keeps), every thread of a worker is pinned to its CPU; below
that they may run anywhere again.  Association threads look when their association starts and before
each C-STORE (a few counters read), and the DICOM server looks when one of its connections closes and
on its loop's idle tick (so a worker with no association left follows the node too); the threads are
set only when the answer changes.  The whole process, not the one thread that looked: a thread
inherits the affinity of the thread that starts it (pools started lazily by an association thread),
so pinning threads one by one left helpers pinned after the node went quiet.

``[server] cpu_affinity = "off"`` turns this off.  It is also off with one worker, with fewer than two
CPUs, without the accept balance, and where ``os.sched_setaffinity`` does not exist (not Linux).  The
CPUs are the ones the process was allowed at start (``taskset``, cgroups): worker *i* takes the
*i*-th of them, round robin.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["Affinity", "configure", "current", "on_request"]


class Affinity:
    """One worker's rule: its CPU, the node's CPUs, and whether its threads are pinned now."""

    def __init__(self, index: int, workers: int, balance: Any, allowed: list[int]) -> None:
        self.index = index
        self.workers = workers
        self.balance = balance  # xdsi.dimse.accept_balance.AcceptBalance: load(i) = connections worker i holds
        self.allowed = frozenset(allowed)
        self.own = frozenset({sorted(allowed)[index % len(allowed)]})
        self.threshold = min(workers, len(allowed))  # connections at which every CPU has an association to run
        self.pinned = False
        self.changes = 0  # times the threads were set (for tests and logs)
        self._lock = threading.Lock()

    def busy(self) -> bool:
        """Whether the node holds at least one connection per CPU its workers use."""
        load = self.balance.load
        return sum(max(0, load(i)) for i in range(self.workers)) >= self.threshold

    def apply(self) -> None:
        """Pin this worker's threads to its CPU if the node is busy, else free them; nothing to do if already so."""
        want = self.busy()
        if self.pinned is want:
            return
        with self._lock:
            if self.pinned is want:
                return
            cpus = self.own if want else self.allowed
            done: set[int] = set()
            while todo := [tid for tid in _threads() if tid not in done]:  # again: one started meanwhile by a
                for tid in todo:                                           # thread not yet set inherited the old
                    try:
                        os.sched_setaffinity(tid, cpus)
                    except OSError as exc:  # the thread ended meanwhile, or a CPU was taken away (cgroup change)
                        log.debug("cpu affinity of thread %d not changed: %s", tid, exc)
                done.update(todo)
            self.pinned = want
            self.changes += 1


def _threads() -> list[int]:
    """This process's thread ids (Linux ``/proc/self/task``)."""
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [threading.get_native_id()]


_current: Affinity | None = None


def configure(index: int, workers: int, balance: Any, mode: str = "auto") -> Affinity | None:
    """Set this worker's rule (None when it does not apply: see the module docstring)."""
    global _current
    _current = None
    if mode == "off" or workers < 2 or balance is None or not hasattr(os, "sched_setaffinity"):
        return None
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except OSError:
        return None
    if len(allowed) < 2:
        return None
    _current = Affinity(index, workers, balance, allowed)
    return _current


def current() -> Affinity | None:
    return _current


def on_request(event: Any = None) -> None:
    """``EVT_REQUESTED`` and the C-STORE path: apply the rule (the node may have become busy, or quiet)."""
    rule = _current
    if rule is not None:
        rule.apply()
