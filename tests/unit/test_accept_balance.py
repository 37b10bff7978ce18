"""The accept balance of the workers of one node (:mod:`xdsi.dimse.accept_balance`), across real processes.

Peers are real processes (``python -c``): liveness is a record lock, which belongs to a process, so a
second object in this process would prove nothing.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from xdsi.dimse.accept_balance import AcceptBalance

ROOT = Path(__file__).resolve().parents[2]


def peer(path: Path, index: int, script: str) -> subprocess.Popen[str]:
    """Worker ``index`` of 2 in another process: serving, then runs ``script`` (``b`` bound) on each stdin line."""
    code = textwrap.dedent(f"""
        import socket, sys
        from pathlib import Path
        from xdsi.dimse.accept_balance import AcceptBalance
        b = AcceptBalance(Path({str(path)!r}), {index}, 2)
        b.serving()
        held = []
        print("ready", flush=True)
        for line in sys.stdin:
    """) + textwrap.indent(textwrap.dedent(script), "    ") + "\n    print('done', flush=True)\n"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def ask(proc: subprocess.Popen[str], line: str = "go") -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "done"


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    yield sock
    sock.close()


def connections(here: AcceptBalance, n: int) -> list[socket.socket]:
    """``n`` open connected sockets counted as this worker's accepted connections."""
    out = []
    for _ in range(n):
        a, b = socket.socketpair()
        here.accepted(a)
        out += [a, b]
    return out


@contextmanager
def scene(tmp_path: Path, held: int, *, defer: float | None = None, script: str = "",
          expect_defer: float | None = None) -> Iterator[tuple[AcceptBalance, subprocess.Popen[str], list[socket.socket]]]:
    """Worker 0 here (serving, ``held`` connections counted) and worker 1 in another process (``script``); all
    closed, killed and released at the end."""
    path = tmp_path / "accept-load"
    timing = {k: v for k, v in (("defer", defer), ("expect_defer", expect_defer)) if v is not None}
    here = AcceptBalance(path, 0, 2, **timing)
    here.serving()
    other = peer(path, 1, script)
    socks = connections(here, held)
    try:
        yield here, other, socks
    finally:
        for s in socks:
            s.close()
        if other.poll() is None:
            other.kill()
        other.wait()
        here.close()


def test_a_worker_with_more_connections_waits_for_the_lighter_live_peer(tmp_path: Path) -> None:
    with scene(tmp_path, 0) as (here, _, _):
        assert here.lighter_peer(here.refresh()) is None  # 0 and 0: accept
        held = connections(here, 1)
        assert here.load(0) == 1
        assert here.lighter_peer(here.refresh()) == 1  # 1 against 0: leave it to worker 1
        for s in held:
            s.close()
        assert here.refresh() == 0 and here.lighter_peer(0) is None  # a closed connection is no load


def test_a_dead_peer_is_not_waited_for_and_its_stale_count_is_ignored(tmp_path: Path) -> None:
    with scene(tmp_path, 2) as (here, other, _):
        assert here.lighter_peer(here.refresh()) == 1
        other.send_signal(signal.SIGKILL)
        other.wait()
        assert here.alive(1) is False
        assert here.lighter_peer(here.refresh()) is None  # its counter still says 0; it is dead


def test_a_stopped_listener_is_not_waited_for(tmp_path: Path) -> None:
    with scene(tmp_path, 1, script="b.stopped()") as (here, other, _):
        assert here.alive(1)
        ask(other)  # its last listener closed (shutting down): alive as a process, serving no more
        assert not here.alive(1)
        assert here.lighter_peer(here.refresh()) is None


@contextmanager
def waiting_client(listener: socket.socket) -> Iterator[socket.socket]:
    """A connection waiting in ``listener``'s queue for an accept."""
    client = socket.create_connection(listener.getsockname())
    try:
        yield client
    finally:
        client.close()


def timed_turn(here: AcceptBalance, listener: socket.socket, meanwhile: threading.Timer | None = None) -> float:
    """Seconds :meth:`AcceptBalance.turn` took, with ``meanwhile`` started before and joined after."""
    if meanwhile is not None:
        meanwhile.start()
    started = time.monotonic()
    here.turn(listener)
    waited = time.monotonic() - started
    if meanwhile is not None:
        meanwhile.join()
    return waited


def test_turn_accepts_anyway_when_the_peer_does_not_take_the_connection(tmp_path: Path, listener: socket.socket) -> None:
    # worker 1: alive, lighter, and never accepts (busy)
    with scene(tmp_path, 1, defer=0.2) as (here, _, _), waiting_client(listener):
        waited = timed_turn(here, listener)
        assert 0.2 <= waited < 2.0, waited
        assert here.overridden == 1 and here.deferred == 0
        conn, _ = listener.accept()  # still there: this worker takes it
        conn.close()


def test_turn_returns_as_soon_as_the_peer_took_the_connection(tmp_path: Path, listener: socket.socket) -> None:
    taker = socket.socket(fileno=os.dup(listener.fileno()))  # another worker's accept on the shared queue
    with scene(tmp_path, 1, defer=5.0) as (here, _, _), waiting_client(listener), taker:
        waited = timed_turn(here, listener, threading.Timer(0.3, lambda: taker.accept()[0].close()))
        assert 0.25 <= waited < 4.0, waited
        assert here.deferred == 1 and here.overridden == 0
        with pytest.raises(BlockingIOError):  # nothing left: the caller's accept fails and it waits for the next
            listener.accept()


def test_turn_goes_on_when_the_peer_catches_up(tmp_path: Path, listener: socket.socket) -> None:
    """Worker 1 accepted a connection elsewhere meanwhile: 1 against 1, this worker may accept now."""
    script = "a, c = socket.socketpair(); b.accepted(a); held += [a, c]"
    with scene(tmp_path, 1, defer=5.0, script=script) as (here, other, _), waiting_client(listener):
        waited = timed_turn(here, listener, threading.Timer(0.3, ask, (other,)))
        assert 0.25 <= waited < 4.0, waited
        assert here.load(1) == 1 and here.deferred == 0 and here.overridden == 0


def test_each_node_has_its_own_file_and_dead_nodes_files_go(tmp_path: Path) -> None:
    """Two `xdsi serve` on one data folder (a mistake, or a test) do not share loads or liveness locks: the file
    is named by the supervisor's pid; a file left by a supervisor no longer running is removed.  (Two real servers
    on one data folder: tests/integration/test_dimse_retrieve_direct.py::test_server_stops_while_sending.)"""
    from xdsi.dimse import accept_balance

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / ".workers" / f"accept-load-{dead.pid}"
    stale.parent.mkdir()
    stale.write_bytes(b"\0" * 16)
    live = tmp_path / ".workers" / f"accept-load-{os.getppid()}"  # a running process: kept
    live.write_bytes(b"\0" * 16)
    try:
        b = accept_balance.configure(tmp_path, 0, 2, supervisor=os.getpid())
        assert b is not None and b.path.name == f"accept-load-{os.getpid()}"
        assert not stale.exists() and live.exists()
    finally:
        accept_balance.configure(tmp_path, 0, 1)


# -- a worker expecting to be called back (a relay's C-MOVE to us, issue 15) ---------------------------------------------


def test_a_peer_expecting_a_call_back_is_left_the_connection_even_when_it_is_busier(tmp_path: Path, listener: socket.socket) -> None:
    """Worker 1 holds two connections and expects the remote's association: worker 0, lighter, leaves it the waiting
    connection (up to expect_defer, not defer); once the expectation ends, the loads decide again (0 accepts)."""
    with scene(tmp_path, 0, defer=0.05, expect_defer=0.4, script="exec(line.strip())") as (here, other, _):
        ask(other, "held += [x for _ in range(2) for x in socket.socketpair()]; [b.accepted(s) for s in held[::2]]")
        ask(other, "done = b.expect(30)")
        assert here.load(1) == 2 and here.load(0) == 0
        assert here.expects(1) and not here.expects(0) and here.expecting_peer() == 1
        with waiting_client(listener):
            waited = timed_turn(here, listener)  # nobody takes it in worker 1 (it only runs what it is told)
            assert 0.4 <= waited < 3.0, waited  # expect_defer, where the loads alone would not have waited at all
            assert here.overridden == 1
            listener.accept()[0].close()
        ask(other, "done(); done()")  # ended (twice is fine)
        assert not here.expects(1) and here.expecting_peer() is None
        with waiting_client(listener):
            assert timed_turn(here, listener) < 0.04  # lighter and nobody expecting: at once
            listener.accept()[0].close()


def test_the_expecting_worker_accepts_at_once_whatever_its_load(tmp_path: Path, listener: socket.socket) -> None:
    with scene(tmp_path, 3, defer=5.0) as (here, _, _), waiting_client(listener):
        assert here.lighter_peer(here.refresh()) == 1  # the loads alone would leave it to worker 1 for 5 s
        first = here.expect(30)
        second = here.expect(30)
        first()
        assert here.expects(0)  # one expectation of the worker ended, the other goes on
        assert timed_turn(here, listener) < 0.5
        assert here.overridden == 0 and here.deferred == 0
        second()
        assert not here.expects(0)


def test_an_expectation_lapses_by_itself_and_a_dead_expecting_peer_is_not_waited_for(tmp_path: Path) -> None:
    with scene(tmp_path, 0, script="exec(line.strip())") as (here, other, _):
        short = here.expect(0.2)
        assert here.expects(0)
        time.sleep(0.3)
        assert not here.expects(0)  # lapsed although never ended
        short()
        ask(other, "b.expect(30)")
        assert here.expecting_peer() == 1
        other.send_signal(signal.SIGKILL)
        other.wait()
        assert here.expects(1) and here.expecting_peer() is None  # its deadline stands in the file; it is dead
