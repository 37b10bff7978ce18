"""State the worker processes of one node share: association slots (record locks) and the alert budget (SQLite).

Other processes are real processes (``python -c``), because record locks are per process: two
objects in one process would share them and prove nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from xdsi.audit.shared_alerts import SharedAlertLimiter
from xdsi.config import DimseLimits, load_settings, ConfigError
from xdsi.dimse.slots import SharedSlots

LIMITS = DimseLimits(max_associations_per_ae=2, max_associations_per_address=3)
ROOT = Path(__file__).resolve().parents[2]


def other_process(path: Path, script: str, max_associations: int = 4) -> subprocess.Popen[str]:
    """A second process with slots on ``path``: runs ``script`` (``slots`` bound), prints what it says, then waits for stdin."""
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from xdsi.config import DimseLimits
        from xdsi.dimse.slots import SharedSlots
        slots = SharedSlots(Path({str(path)!r}), "XDSI", DimseLimits(max_associations_per_ae=2, max_associations_per_address=3), {max_associations})
    """) + textwrap.dedent(script) + "\nprint('done', flush=True)\nsys.stdin.readline()\n"
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def said(proc: subprocess.Popen[str]) -> list[str]:
    assert proc.stdout is not None
    lines = []
    while True:
        line = proc.stdout.readline().strip()
        assert line, "the other process ended early"
        if line == "done":
            return lines
        lines.append(line)


def test_slots_are_counted_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "slots.lock"
    here = SharedSlots(path, "XDSI", LIMITS, 5)
    assert here.take(1, "CT1", "10.0.0.1") is None
    assert here.take(2, "CT1", "10.0.0.2") is None
    other = other_process(path, """
        print(slots.take(1, "CT1", "10.0.0.3"))      # CT1 has 2 here already: refused
        print(slots.take(2, "MR1", "10.0.0.1"))      # taken
        print(slots.take(3, "MR1", "10.0.0.1"))      # taken: 10.0.0.1 now has 3
        print(slots.take(4, "US1", "10.0.0.1"))      # 10.0.0.1 has 3: refused
        print(slots.take(5, "US1", "10.0.0.9"))      # taken: the node has 5
        print(slots.take(6, "US1", "10.0.0.8"))      # the node has 5 associations: refused
    """, max_associations=5)
    try:
        answers = said(other)
        assert answers[0].startswith("calling AE 'CT1' has 2 associations open")
        assert answers[1:3] == ["None", "None"]
        assert answers[3].startswith("10.0.0.1 has 3 associations open")
        assert answers[4] == "None"
        assert answers[5].startswith("5 associations open on this node")
        assert here.take(3, "XA1", "10.0.0.8") is not None  # the other process's two count here too
        other.send_signal(signal.SIGKILL)  # a worker that dies gives its slots back with it
        other.wait()
        assert here.take(3, "XA1", "10.0.0.8") is None
        here.release(1)
        here.release(1)  # twice: harmless
        assert here.take(4, "CT1", "10.0.0.1") is None  # CT1 is back to one
        assert here.take(5, "CT1", "10.0.0.7") is not None  # ... and now at two again
    finally:
        if other.poll() is None:
            other.kill()
            other.wait()
        for holder in range(1, 6):
            here.release(holder)
    assert here.held() == 0


def test_a_released_slot_is_free_for_another_process_at_once(tmp_path: Path) -> None:
    path = tmp_path / "slots.lock"
    here = SharedSlots(path, "XDSI", LIMITS, 1)
    assert here.take(1, "CT1", "10.0.0.1") is None
    other = other_process(path, """
        print(slots.take(1, "MR1", "10.0.0.2"))
    """, max_associations=1)
    try:
        assert said(other)[0] != "None"  # the node's one slot is ours
    finally:
        other.kill()
        other.wait()
    here.release(1)
    again = other_process(path, """
        print(slots.take(1, "MR1", "10.0.0.2"))
    """, max_associations=1)
    try:
        assert said(again) == ["None"]
    finally:
        again.kill()
        again.wait()


def test_alert_budget_is_shared(tmp_path: Path) -> None:
    """Two limiters on one file (as two workers): per_key alerts per key and interval in all, not per limiter."""
    a = SharedAlertLimiter(tmp_path / "alerts.sqlite", interval=60.0, per_key=2)
    b = SharedAlertLimiter(tmp_path / "alerts.sqlite", interval=60.0, per_key=2)
    key = ("association", "10.0.0.1", "EVIL", "XDSI")
    try:
        decisions = [lim.admit(key) for lim in (a, b, a, b, b)]
        assert decisions[:2] == ["", ""]
        assert decisions[2:] == [None, None, None]
        assert a.admit(("association", "10.0.0.2", "OTHER", "XDSI")) == ""  # another key has its own budget
    finally:
        a.close()
        b.close()


def test_alert_budget_counts_what_it_held_back(tmp_path: Path) -> None:
    a = SharedAlertLimiter(tmp_path / "alerts.sqlite", interval=0.3, per_key=1)
    b = SharedAlertLimiter(tmp_path / "alerts.sqlite", interval=0.3, per_key=1)
    key = ("operation", "10.0.0.1", "WS1", "C-MOVE")
    try:
        assert a.admit(key) == ""
        assert b.admit(key) is None
        assert a.admit(key) is None
        time.sleep(0.35)
        assert b.admit(key) == " (2 more such refusal(s) not alerted separately)"
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("value, ok", [("1", True), ("4", True), ("0", False), ("-2", False), ("x", False)])
def test_workers_setting(tmp_path: Path, value: str, ok: bool) -> None:
    cfg = tmp_path / "x.toml"
    cfg.write_text(f"[server]\nworkers = {value if value != 'x' else chr(34) + 'x' + chr(34)}\n")
    if ok:
        assert load_settings(cfg, env={}).effective_workers == int(value)
        assert load_settings(cfg, env={"XDSI_WORKERS": "3"}).workers == 3  # the environment overrides the file
    else:
        with pytest.raises(ConfigError, match="workers"):
            load_settings(cfg, env={})


def test_workers_default_is_the_cpus_we_may_use() -> None:
    s = load_settings(None, env={})
    assert s.workers is None
    assert s.effective_workers == len(os.sched_getaffinity(0))
