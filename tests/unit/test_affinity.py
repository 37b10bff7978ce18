"""xdsi.dimse.affinity: a worker's threads on its own CPU while the node is busy, free otherwise."""

from __future__ import annotations

import os
import threading

import pytest

from xdsi.dimse import affinity


class Loads:
    """What the rule reads of xdsi.dimse.accept_balance: connections held per worker index."""

    def __init__(self, *loads: int) -> None:
        self.loads = list(loads)

    def load(self, index: int) -> int:
        return self.loads[index]


@pytest.fixture
def calls(monkeypatch) -> list[tuple[int, frozenset[int]]]:
    made: list[tuple[int, frozenset[int]]] = []
    monkeypatch.setattr(affinity.os, "sched_setaffinity", lambda tid, cpus: made.append((tid, frozenset(cpus))))
    monkeypatch.setattr(affinity, "_threads", lambda: [101, 102])
    return made


def test_pinned_while_busy_freed_when_quiet_and_set_only_on_change(calls) -> None:
    loads = Loads(1, 0)
    rule = affinity.Affinity(1, 2, loads, [0, 1])
    rule.apply()  # one connection on a 2-CPU node: not busy, and never pinned: nothing to do
    assert calls == [] and rule.changes == 0
    loads.loads = [1, 1]
    rule.apply()
    rule.apply()
    assert calls == [(101, frozenset({1})), (102, frozenset({1}))]  # worker 1 -> the second CPU; every thread
    loads.loads = [1, 0]
    rule.apply()
    assert calls[2:] == [(101, frozenset({0, 1})), (102, frozenset({0, 1}))] and rule.changes == 2


def test_a_thread_that_ended_meanwhile_does_not_stop_the_others(monkeypatch) -> None:
    done: list[int] = []

    def set_(tid: int, cpus: object) -> None:
        if tid == 101:
            raise OSError(3, "No such process")
        done.append(tid)

    monkeypatch.setattr(affinity.os, "sched_setaffinity", set_)
    monkeypatch.setattr(affinity, "_threads", lambda: [101, 102])
    rule = affinity.Affinity(0, 2, Loads(1, 1), [0, 1])
    rule.apply()
    assert done == [102] and rule.pinned


def test_a_thread_started_while_the_threads_are_set_is_set_too(monkeypatch, calls) -> None:
    """The list is read again until it holds no thread not yet set (one started meanwhile inherited the old CPUs)."""
    lists = iter([[101], [101, 103], [101, 103]])
    monkeypatch.setattr(affinity, "_threads", lambda: next(lists))
    affinity.Affinity(0, 2, Loads(1, 1), [0, 1]).apply()
    assert calls == [(101, frozenset({0})), (103, frozenset({0}))]


def test_workers_take_the_allowed_cpus_round_robin() -> None:
    cpus = [2, 5, 7]
    assert [set(affinity.Affinity(i, 4, Loads(0, 0, 0, 0), cpus).own) for i in range(4)] == [{2}, {5}, {7}, {2}]
    # busy means one connection per CPU the workers use: 3 CPUs for 4 workers, 2 workers on 3 CPUs
    assert affinity.Affinity(0, 4, Loads(1, 1, 1, 0), cpus).busy()
    assert not affinity.Affinity(0, 2, Loads(1, 0), cpus).busy() and affinity.Affinity(0, 2, Loads(1, 1), cpus).busy()


def test_off_one_worker_no_balance_or_one_cpu_configure_nothing(monkeypatch, calls) -> None:
    assert affinity.configure(0, 2, Loads(5, 5), "off") is None
    assert affinity.configure(0, 1, Loads(5), "auto") is None
    assert affinity.configure(0, 2, None, "auto") is None
    monkeypatch.setattr(affinity.os, "sched_getaffinity", lambda pid: {3})
    assert affinity.configure(0, 2, Loads(5, 5), "auto") is None
    affinity.on_request()  # nothing configured: no call
    assert calls == []
    monkeypatch.setattr(affinity.os, "sched_getaffinity", lambda pid: {0, 1})
    try:
        assert affinity.configure(1, 2, Loads(1, 1), "auto") is affinity.current() is not None
        affinity.on_request()
        assert calls == [(101, frozenset({1})), (102, frozenset({1}))]
    finally:
        affinity.configure(0, 1, None)
    assert affinity.current() is None


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs Linux and 2 CPUs")
def test_real_threads_are_pinned_and_freed_also_one_started_while_pinned() -> None:
    """The system calls themselves, read back: every thread of the process (the caller, one that was running, one
    started while pinned, which inherits it) on the worker's CPU, then all of them free again."""
    allowed = sorted(os.sched_getaffinity(0))
    loads = Loads(1, 1)
    rule = affinity.Affinity(1, 2, loads, allowed)
    go, late_go = threading.Event(), threading.Event()
    seen: dict[str, set[int]] = {}

    def helper(name: str, event: threading.Event) -> None:
        event.wait(10)
        seen[name] = os.sched_getaffinity(0)

    running = threading.Thread(target=helper, args=("running", go))
    running.start()
    try:
        rule.apply()
        started = threading.Thread(target=helper, args=("started", go))
        started.start()
        go.set()
        running.join()
        started.join()
        assert seen == {"running": {allowed[1]}, "started": {allowed[1]}} and os.sched_getaffinity(0) == {allowed[1]}
        late = threading.Thread(target=helper, args=("late", late_go))
        late.start()  # inherits the pin; the unpin below must free every thread there is then
        loads.loads = [0, 1]
        rule.apply()
        late_go.set()
        late.join()
        assert seen["late"] == set(allowed) and os.sched_getaffinity(0) == set(allowed)
    finally:
        go.set()
        late_go.set()
        os.sched_setaffinity(0, allowed)


def test_the_setting(tmp_path) -> None:
    from xdsi.config import ConfigError, load_settings

    assert load_settings(env={}).cpu_affinity == "auto"
    p = tmp_path / "x.toml"
    p.write_text('[server]\ncpu_affinity = "off"\n')
    assert load_settings(p, env={}).cpu_affinity == "off"
    p.write_text("[server]\ncpu_affinity = true\n")
    with pytest.raises(ConfigError, match=r'cpu_affinity must be "auto" or "off"'):
        load_settings(p, env={})
