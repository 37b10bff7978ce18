"""XPath evaluation in worker processes that are killed at a deadline.

Why processes: XPath 1.0 with nested predicates is polynomial, with the
nesting depth as exponent (``count(/*/*[0 * /*/*[0 * /*/*[...]]])``: 61
characters, minutes of CPU), no static check covers every form, and lxml holds
the GIL while libxml2 evaluates, so neither a thread nor a signal can stop it.
A worker process can be killed: the caller waits on a pipe with a timeout, and
at the deadline the worker gets SIGKILL and the next evaluation starts a fresh
one.  As a backstop when this process itself dies, each worker also arms
RLIMIT_CPU before a job (SIGXCPU ends it) and exits when its pipe closes.

Workers are ``spawn``-ed children of the serving process (no fork of a
threaded server), at most ``workers`` at once: that also bounds concurrent
evaluations; a caller waits for a free worker up to its own deadline.
"""

from __future__ import annotations

import atexit
import logging
import math
import multiprocessing
import os
import queue
import resource
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

from lxml import etree

from xdsi.config import LimitsSettings
from xdsi.wire.xml import make_parser

log = logging.getLogger(__name__)

STARTUP_SECONDS = 30.0  # a worker that cannot import lxml within this is broken, not slow


class XPathBudgetExceeded(Exception):
    """The evaluation ran past its time budget; the worker was killed."""


class XPathPoolBusy(Exception):
    """No worker became free within the caller's deadline."""


class XPathWorkerFailed(Exception):
    """The worker died (memory limit, CPU limit, pool stopped) without an answer."""


@dataclass(frozen=True)
class Outcome:
    """A worker's answer: ``kind`` is "ok" (``results``: (text, [element bytes]) per expression),
    "refused" (XPathRefused) or "too_large" (ResultTooLarge / memory); ``message`` says why."""

    kind: str
    results: tuple[tuple[str, tuple[bytes, ...]], ...] = ()
    message: str = ""


def _hardened_parser() -> Any:
    return make_parser(remove_comments=False)


def _arm_cpu_limit(seconds: float) -> None:
    """Let this worker use at most ``seconds`` more CPU (+2 s slack) before the kernel sends SIGXCPU."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    soft = int(ru.ru_utime + ru.ru_stime) + math.ceil(seconds) + 2
    _old_soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def _worker_main(conn: Any, memory_bytes: int) -> None:
    """Serve jobs ``(xml, exprs, max_bytes, seconds)`` until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if memory_bytes:
        try:
            resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        except (ValueError, OSError):  # already lower: keep it
            pass
    from xdsi.ids import xpath as xp

    parser = _hardened_parser()
    conn.send(("ready", os.getpid()))
    while True:
        try:
            xml, exprs, max_bytes, seconds = conn.recv()
        except (EOFError, OSError):
            return
        _arm_cpu_limit(seconds)
        try:
            tree = etree.fromstring(xml, parser)
            results: list[tuple[str, tuple[bytes, ...]]] = []
            size = 0
            for e in exprs:
                r = xp.evaluate(tree, e, max_bytes=max(0, max_bytes - size), guard=False)
                els = tuple(etree.tostring(x) for x in r.elements)
                size += len(r.text.encode()) + sum(len(b) for b in els)
                if size > max_bytes:
                    raise xp.ResultTooLarge(f"the XPath results are larger than {max_bytes} bytes")
                results.append((r.text, els))
            answer = Outcome("ok", tuple(results))
        except xp.XPathRefused as exc:
            answer = Outcome("refused", message=str(exc))
        except xp.ResultTooLarge as exc:
            answer = Outcome("too_large", message=str(exc))
        except MemoryError:
            answer = Outcome("too_large", message="the XPath evaluation exceeded its memory budget")
        except etree.LxmlError as exc:
            answer = Outcome("refused", message=f"cannot evaluate: {exc}")
        try:
            conn.send(answer)
        except (OSError, ValueError):
            return


class _Worker:
    def __init__(self, ctx: Any, memory_bytes: int) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, memory_bytes), name="xdsi-xpath", daemon=True)
        self.proc.start()
        child.close()
        if not self.conn.poll(STARTUP_SECONDS):
            self.kill()
            raise XPathWorkerFailed("an XPath worker did not start")
        try:
            self.conn.recv()
        except (EOFError, OSError):
            self.kill()
            raise XPathWorkerFailed("an XPath worker died at start") from None

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()


class XPathPool:
    """At most ``limits.xpath_workers`` worker processes, started on demand, killed at a job's deadline."""

    def __init__(self, limits: LimitsSettings) -> None:
        self.limits = limits
        self._ctx = multiprocessing.get_context("spawn")
        self._slots = threading.BoundedSemaphore(limits.xpath_workers)
        self._idle: queue.LifoQueue[_Worker] = queue.LifoQueue()
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        self._closed = False
        self.kills = 0  # workers killed at a deadline (for status and tests)

    def pids(self) -> list[int]:
        with self._lock:
            return [w.proc.pid for w in self._all if w.proc.pid is not None]

    def evaluate(self, xml: bytes, exprs: Sequence[str], *, seconds: float, max_bytes: int, wait: float) -> Outcome:
        """Evaluate ``exprs`` on the serialised namespace-free model ``xml`` within ``seconds``.

        The expressions are evaluated as given (the caller applies :func:`xdsi.ids.xpath.check`);
        lxml's compiler still refuses syntax errors and unknown functions ("refused").

        Raises XPathPoolBusy (no worker within ``wait`` s), XPathBudgetExceeded (worker killed)
        or XPathWorkerFailed.
        """
        if not self._slots.acquire(timeout=max(0.0, wait)):
            raise XPathPoolBusy(f"all {self.limits.xpath_workers} XPath workers stayed busy")
        worker: _Worker | None = None
        healthy = False
        try:
            if self._closed:
                raise XPathWorkerFailed("the XPath pool is stopped")
            try:
                worker = self._idle.get_nowait()
            except queue.Empty:
                worker = _Worker(self._ctx, self.limits.xpath_worker_memory)
                with self._lock:
                    self._all.add(worker)
                    if self._closed:  # stop() ran while this one started
                        raise XPathWorkerFailed("the XPath pool is stopped")
            started = time.monotonic()
            try:
                worker.conn.send((xml, list(exprs), max_bytes, seconds))
                if not worker.conn.poll(seconds):
                    self.kills += 1
                    log.warning("XPath evaluation passed its %.1f s budget; worker %s killed", seconds, worker.proc.pid)
                    raise XPathBudgetExceeded(f"the XPath evaluation exceeded its {seconds:g} s budget")
                answer: Outcome = worker.conn.recv()
            except (EOFError, OSError) as exc:
                raise XPathWorkerFailed(f"the XPath worker ended without an answer after {time.monotonic() - started:.1f} s ({exc.__class__.__name__})") from None
            healthy = True
            return answer
        finally:
            if worker is not None:
                if healthy and not self._closed:
                    self._idle.put(worker)
                else:
                    worker.kill()
                    with self._lock:
                        self._all.discard(worker)
            self._slots.release()

    def stop(self) -> None:
        """Kill every worker, busy or idle; callers waiting on one get XPathWorkerFailed at once."""
        with self._lock:
            self._closed = True
            workers = list(self._all)
            self._all.clear()
        for w in workers:
            try:
                w.proc.kill()
            except Exception:  # already gone
                pass
        for w in workers:
            w.proc.join(5)


_POOLS: dict[LimitsSettings, XPathPool] = {}
_POOLS_LOCK = threading.Lock()


def shared_pool(limits: LimitsSettings) -> XPathPool:
    """The process's pool for these limits (one per distinct ``[limits]``, in practice one)."""
    with _POOLS_LOCK:
        pool = _POOLS.get(limits)
        if pool is None or pool._closed:
            pool = _POOLS[limits] = XPathPool(limits)
        return pool


def stop_pools() -> None:
    """Kill all XPath workers of this process (``xdsi serve`` stop, interpreter exit)."""
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
    for p in pools:
        p.stop()


atexit.register(stop_pools)
