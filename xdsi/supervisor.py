"""``xdsi serve --workers N``: one supervisor, N worker processes sharing every listening socket.

Why processes: the receive path of a C-STORE, a C-FIND answer and a WADO-RS response are
Python, and one process with the GIL cannot use a second core, so parallel associations got
*slower* than one (issue 14).  Each worker is a whole ``xdsi serve`` (its own pynetdicom AE,
cheroot HTTP server, index connection pool) over one shared index: SQLite in WAL mode with
``BEGIN IMMEDIATE`` writers and a 30 s busy timeout (:mod:`xdsi.index.db`), or PostgreSQL.

Why pre-fork (the supervisor binds, workers inherit) rather than ``SO_REUSEPORT``: with
SO_REUSEPORT the kernel hashes each connection to one worker's queue by its addresses, blindly,
so a connection hashed to a worker that is busy (or restarting: its queue dies with it) waits or
is reset.  With one shared queue whichever worker calls ``accept`` first takes the connection, and
a port stays served while any worker lives.  Measured (``bench/workers.py``, load ~12 on 2 vCPUs):
4 connections at once over 2 idle SO_REUSEPORT acceptors landed 2+2 in 38-40 % of 200 tries and
4+0 in 8-20 %; 4 associations at once over a real ``xdsi serve --workers 2`` landed 2+2 in
62-72 % of 4 x 40 tries, 3+1 otherwise, 4+0 once.  It also keeps the one-line errors for a busy
port in one place, before any worker starts.  The race is now load-aware
(:mod:`xdsi.dimse.accept_balance`): a worker holding more connections than a live peer leaves a waiting
connection to it for a moment, then takes it anyway; 4 at once land 2+2 (tests/integration/test_workers.py).

What runs once per node runs in worker 0 (the *primary*), never in the supervisor: the audit
sender (every worker records into the durable audit spool; only the primary sends, so each
message reaches a repository once), the XDS publisher loop, the routing worker, the HL7 listener and
its prefetch jobs (issue 15), the sweep of stale spool files,
the Application Activity and configuration-change audit messages.  A primary that dies is
restarted as worker 0 and takes them up again.  Schema migrations and the removal of
temporary files left by a crash happen once, before any worker starts (workers
open the archive with ``clean=False``: another worker may be writing those files).  The
supervisor keeps no archive and no connections (the start-up checks run in a short-lived child, so
it stays small); workers are fresh interpreters (``python -m xdsi.supervisor``), never forks of a
process with threads.  It restarts a worker that dies
(with backoff), and on SIGTERM/SIGINT asks every worker to stop (each finishes or aborts its
associations and lets running HTTP responses end, as a single ``xdsi serve`` does), then kills
what is still running after :data:`STOP_GRACE` seconds.  Workers die with the supervisor
(``PR_SET_PDEATHSIG``): a ``kill -9`` of the supervisor leaves no orphan holding the ports.

Limits that are promises about the node hold for the node: ``[dimse] max_associations`` and its
per-AE and per-address limits (:mod:`xdsi.dimse.slots`), the Security Alert budget
(:mod:`xdsi.audit.shared_alerts`).  Per worker: ``[http] threads``, ``[limits] xpath_workers``.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from xdsi.config import Settings
from xdsi.startup import StartupError, listen_error

__all__ = ["Supervisor", "WorkerSpec", "bind_listeners", "supervise"]

log = logging.getLogger(__name__)

STOP_GRACE = 40.0  # seconds a worker gets to stop (its associations get 10, HTTP 5, the audit drain 2) before SIGKILL
READY_TIMEOUT = 120.0  # a worker that has not opened the archive and started its listeners by then failed
BACKOFF_FIRST = 0.5  # seconds before restarting a worker that died; doubled per death ...
BACKOFF_MAX = 30.0  # ... up to this
STABLE_AFTER = 60.0  # a worker that lived this long before dying starts the backoff afresh
HTTP_BACKLOG = 128  # as xdsi.web.httpd.ACCEPT_QUEUE
DICOM_BACKLOG = 512  # as xdsi.dimse.server.GovernedAssociationServer.request_queue_size


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs, sent pickled on its stdin: the resolved settings, not the command line."""

    settings: Settings
    fds: Mapping[str, int]  # listener key -> inherited file descriptor
    index: int
    ready_fd: int  # written once ("R") when every listener serves
    supervisor: int  # pid: a worker whose parent is already another process exits
    verbose: bool = False
    restart: bool = False  # a slot's later process: worker 0 then does not announce an Application Start again


def listeners(settings: Settings) -> list[tuple[str, str, str | None, int, int]]:
    """(key, setting, flag, port, backlog) per listener, in the order a single ``xdsi serve`` binds them."""
    s = settings
    out: list[tuple[str, str, str | None, int, int]] = []
    if s.http_port:
        out.append(("http", "[server] http_port", "--http-port", int(s.http_port), HTTP_BACKLOG))
    if s.https_port is not None:
        out.append(("https", "[server] https_port", "--https-port", int(s.https_port), HTTP_BACKLOG))
    if s.dicom_port:
        out.append(("dicom", "[server] dicom_port", "--dicom-port", int(s.dicom_port), DICOM_BACKLOG))
    if s.dicom_tls_port is not None:
        out.append(("dicom_tls", "[server] dicom_tls_port", "--dicom-tls-port", int(s.dicom_tls_port), DICOM_BACKLOG))
    for name, p in s.partitions.items():
        if p.dicom_port is not None:
            out.append((f"partition:{name}:dicom", f"[partitions.{name}] dicom_port", None, int(p.dicom_port), DICOM_BACKLOG))
        if p.dicom_tls_port is not None:
            out.append((f"partition:{name}:dicom_tls", f"[partitions.{name}] dicom_tls_port", None, int(p.dicom_tls_port), DICOM_BACKLOG))
    return out


def _bind(host: str, port: int, backlog: int) -> socket.socket:
    af, kind, proto, _name, address = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)[0]
    sock = socket.socket(af, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as pynetdicom and cheroot: a restart need not wait out TIME_WAIT
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted connections
        sock.bind(address)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def bind_listeners(settings: Settings) -> dict[str, socket.socket]:
    """Every listener bound once, for all workers; a failure is the one-line StartupError of a single process."""
    bound: dict[str, socket.socket] = {}
    try:
        for key, setting, flag, port, backlog in listeners(settings):
            try:
                bound[key] = _bind(settings.host, port, backlog)
            except OSError as exc:
                raise listen_error(setting, flag, port, settings.host, exc) from None
    except BaseException:
        for sock in bound.values():
            sock.close()
        raise
    return bound


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    ready_fd: int | None = None  # our end of the readiness pipe, until the worker is ready (or failed)
    ready: bool = False
    started: float = 0.0
    backoff: float = BACKOFF_FIRST
    restart_at: float | None = None  # when a dead worker is due to be started again
    pids: list[int] = field(default_factory=list)  # every pid this slot had, for the log


class Supervisor:
    """N worker slots over the bound listeners: start, watch and restart, stop."""

    def __init__(self, settings: Settings, sockets: Mapping[str, socket.socket], workers: int, *, verbose: bool = False) -> None:
        self.settings = settings
        self.sockets = dict(sockets)
        self.verbose = verbose
        self.workers = [_Worker(i) for i in range(workers)]
        self.stopping = False

    # -- one worker ------------------------------------------------------------------------

    def _spawn(self, w: _Worker) -> None:
        r, wfd = os.pipe()
        fds = {key: sock.fileno() for key, sock in self.sockets.items()}
        spec = WorkerSpec(self.settings, fds, w.index, wfd, os.getpid(), self.verbose, restart=bool(w.pids))
        try:
            # a fresh interpreter, not fork(): nothing of ours (locks, pools) is copied in a half state
            proc = subprocess.Popen([sys.executable, "-m", "xdsi.supervisor"], stdin=subprocess.PIPE, pass_fds=[*fds.values(), wfd])
        finally:
            os.close(wfd)
        try:
            assert proc.stdin is not None
            proc.stdin.write(pickle.dumps(spec))
            proc.stdin.close()
        except OSError:  # it died at once; the watch loop sees it
            pass
        w.proc, w.ready_fd, w.ready, w.started, w.restart_at = proc, r, False, time.monotonic(), None
        w.pids.append(proc.pid)

    def _check_ready(self, w: _Worker, timeout: float = 0.0) -> bool | None:
        """True once the worker said it serves, False when it never will (exited, closed the pipe), None: not yet."""
        if w.ready:
            return True
        if w.ready_fd is None:
            return False
        readable, _, _ = select.select([w.ready_fd], [], [], timeout)
        if not readable:
            return None
        data = os.read(w.ready_fd, 1)
        os.close(w.ready_fd)
        w.ready_fd = None
        w.ready = data == b"R"
        return w.ready

    # -- all of them -----------------------------------------------------------------------

    def start(self) -> bool:
        """Start every worker and wait until each serves; False (all stopped) when one cannot start."""
        for w in self.workers:
            self._spawn(w)
        deadline = time.monotonic() + READY_TIMEOUT
        for w in self.workers:
            while True:
                state = self._check_ready(w, 0.2)
                if state:
                    break
                if state is False or time.monotonic() > deadline or self.stopping:
                    if state is None and not self.stopping:
                        log.error("worker %d did not start within %.0f s", w.index, READY_TIMEOUT)
                    self.stop(quiet=True)
                    return False
        log.info("%d workers serving (pids %s); worker 0 runs the background jobs", len(self.workers), ", ".join(str(w.proc.pid) for w in self.workers if w.proc))
        return True

    def watch(self) -> None:
        """One look at every worker: restart the dead (with backoff), note the ones that became ready."""
        now = time.monotonic()
        for w in self.workers:
            if self.stopping:
                return
            if w.proc is not None:
                if not w.ready and self._check_ready(w) and w.pids[:-1]:
                    log.info("worker %d serving again (pid %d)", w.index, w.proc.pid)
                rc = w.proc.poll()
                if rc is None:
                    continue
                lived = now - w.started
                how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited with status {rc}"
                if w.ready_fd is not None:
                    os.close(w.ready_fd)
                    w.ready_fd = None
                w.backoff = BACKOFF_FIRST if lived > STABLE_AFTER else w.backoff
                log.warning("worker %d (pid %d) %s after %.1f s; restarting in %.1f s", w.index, w.proc.pid, how, lived, w.backoff)
                w.proc, w.restart_at = None, now + w.backoff
                w.backoff = min(w.backoff * 2, BACKOFF_MAX)
            elif w.restart_at is not None and now >= w.restart_at:
                self._spawn(w)

    def stop(self, *, quiet: bool = False) -> None:
        """SIGTERM to every worker, then SIGKILL to those still running after :data:`STOP_GRACE` seconds."""
        self.stopping = True
        live = [w for w in self.workers if w.proc is not None and w.proc.poll() is None]
        for w in live:
            try:
                w.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + STOP_GRACE
        for w in live:
            try:
                w.proc.wait(max(0.0, deadline - time.monotonic()))  # type: ignore[union-attr]
            except subprocess.TimeoutExpired:
                if not quiet:
                    log.warning("worker %d (pid %d) still running %.0f s after SIGTERM: killed", w.index, w.proc.pid, STOP_GRACE)  # type: ignore[union-attr]
                w.proc.kill()  # type: ignore[union-attr]
                w.proc.wait()  # type: ignore[union-attr]
        for w in self.workers:
            if w.ready_fd is not None:
                os.close(w.ready_fd)
                w.ready_fd = None

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers if w.proc is not None and w.proc.poll() is None]


def supervise(settings: Settings, *, verbose: bool = False) -> int:
    """``xdsi serve`` with ``workers > 1``: check, bind, start the workers, watch them until SIGTERM/SIGINT."""
    from xdsi.running import clear_running, describe_listeners

    # everything a single process checks before it listens, with the same one-line errors: directories, the
    # index (migrated here, once, before any worker opens it), temporary files a crash left, [tls], [http] auth;
    # in a short-lived process, so that the supervisor never imports the archive (~90 MB it would keep for good)
    rc = _check(settings, verbose)
    if rc:
        return rc
    sockets = bind_listeners(settings)
    done = threading.Event()

    def _stop(signum: int, _frame: Any) -> None:
        log.info("received %s", signal.Signals(signum).name)
        done.set()
        sup.stopping = True

    sup = Supervisor(settings, sockets, settings.effective_workers, verbose=verbose)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        if not sup.start():
            if done.is_set():
                return 0
            print("xdsi: a worker could not start (its reason is above)", file=sys.stderr)
            return 2
        _record_running(settings, len(sup.workers))
        print(f"xdsi serving AE {settings.ae_title} on {describe_listeners(settings)} (data in {settings.data_dir}; "
              f"{len(sup.workers)} workers)", flush=True)
        while not done.wait(0.2):  # with a timeout: see xdsi.server.serve
            sup.watch()
        log.info("stopping %d workers", len(sup.workers))
    finally:
        sup.stop()
        for sock in sockets.values():
            sock.close()
        clear_running(settings)
    return 0


def _record_running(settings: Settings, workers: int) -> None:
    """``serving.json`` for ``xdsi status``: the supervisor's pid, once for all workers."""
    from xdsi.running import write_running

    try:
        write_running(settings, workers)
    except OSError as exc:  # the listeners run; only `xdsi status` will not know
        log.warning("cannot record the listeners for `xdsi status` in %s: %s", settings.data_dir, exc)


def _check(settings: Settings, verbose: bool) -> int:
    """Run the start-up checks of :class:`xdsi.server.Servers` in a child process; its exit status (0: fine)."""
    proc = subprocess.Popen([sys.executable, "-m", "xdsi.supervisor", "--check"], stdin=subprocess.PIPE)
    assert proc.stdin is not None
    try:
        proc.stdin.write(pickle.dumps((settings, verbose)))
        proc.stdin.close()
    except OSError:
        pass
    return proc.wait()


def check_main() -> int:
    """``python -m xdsi.supervisor --check``: the one-line errors of a single ``xdsi serve`` start, then exit."""
    settings, verbose = pickle.load(sys.stdin.buffer)
    from xdsi.cli import configure_logging
    from xdsi.config import ConfigError
    from xdsi.server import Servers

    configure_logging(settings, verbose)
    try:
        Servers(settings).close()
    except StartupError as exc:
        print(f"xdsi: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"xdsi: configuration error: {exc}", file=sys.stderr)
        return 2
    return 0


# -- the worker process ------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the supervisor dies, however it dies (no orphans holding the ports)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the supervisor's SIGTERM is all there is
        pass


def _balance_accepts(spec: WorkerSpec) -> None:
    """This worker's DICOM listeners accept with the node's load in view (:mod:`xdsi.dimse.accept_balance`), and its
    threads keep to its CPU while the node is busy (:mod:`xdsi.dimse.affinity`)."""
    from xdsi.dimse import accept_balance, affinity

    try:
        balance = accept_balance.configure(spec.settings.data_dir, spec.index, spec.settings.effective_workers, spec.supervisor)
    except (OSError, ValueError) as exc:  # connections are still all served, only not spread by load
        log.warning("worker %d: accepting without the load balance: %s", spec.index, exc)
        balance = None
    # this worker's threads on its own CPU while the node is busy (the rule reads the balance's counters)
    affinity.configure(spec.index, spec.settings.effective_workers, balance, spec.settings.cpu_affinity)


def freeze_startup_heap() -> None:
    """Leave what start-up built out of every later full garbage collection (``gc.collect()``, then ``gc.freeze()``).

    Why (issue 14): a worker's heap after start-up (modules, pydicom's dictionaries, SQLAlchemy's
    tables, the AE's presentation contexts) is never garbage, yet each full collection walks all of it,
    holding the GIL: 80-210 ms per collection, measured with ``gc.callbacks`` in both workers of
    ``xdsi serve --workers 2``, one of them in the middle of an 800-instance ``bench/workers.py`` run in
    each worker (~0.4 ms CPU per instance, and a stall of every association of that worker).  Frozen,
    those objects are skipped; a full collection walks only what was made since.  Reference counting
    still frees frozen objects; only a reference cycle among them that becomes garbage later would stay.
    Called once the listeners serve, so what they set up is included; the one collection here is the
    last full walk of that heap.
    """
    import gc

    gc.collect()
    gc.freeze()


def worker_main() -> int:
    """``python -m xdsi.supervisor``: one worker, its spec on stdin."""
    _die_with_parent()
    from xdsi.heap import tune_allocator

    tune_allocator()  # before the worker allocates anything large (xdsi.heap)
    spec: WorkerSpec = pickle.load(sys.stdin.buffer)
    if os.getppid() != spec.supervisor:  # the supervisor died before PR_SET_PDEATHSIG was set
        return 1
    import xdsi.running
    from xdsi.cli import configure_logging
    from xdsi.config import ConfigError
    from xdsi.server import serve

    xdsi.running._APPLICATION_PID = spec.supervisor  # audit messages name the application, not this worker

    configure_logging(spec.settings, spec.verbose, f"w{spec.index}")
    sockets = {key: socket.socket(fileno=fd) for key, fd in spec.fds.items()}
    _balance_accepts(spec)

    def ready() -> None:
        freeze_startup_heap()
        os.write(spec.ready_fd, b"R")
        os.close(spec.ready_fd)

    try:
        return serve(spec.settings, sockets=sockets, primary=spec.index == 0, announce=not spec.restart, on_ready=ready)
    except StartupError as exc:
        print(f"xdsi: worker {spec.index}: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"xdsi: worker {spec.index}: configuration error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno == errno.EPIPE:
            return 1
        raise


if __name__ == "__main__":
    sys.exit(check_main() if sys.argv[1:] == ["--check"] else worker_main())
