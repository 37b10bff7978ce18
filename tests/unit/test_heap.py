"""xdsi.heap: glibc's allocator thresholds fixed per worker (issue 15), unless the operator set them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from xdsi import heap

ROOT = Path(__file__).resolve().parents[2]

# two ~0.5 MB buffers made and freed per step, as a relayed instance's PDU and bytes are: minor faults per step
_PATTERN = """
import resource, sys
from xdsi.heap import tune_allocator
tuned = tune_allocator() if sys.argv[1] == "tuned" else False
def step():
    a = bytearray(600_000); b = bytearray(600_000)
    a[::4096] = b"x" * len(range(0, len(a), 4096)); b[::4096] = b"x" * len(range(0, len(b), 4096))
for _ in range(5):
    step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):
    step()
print(tuned, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 200)
"""


def _faults(mode: str, **env: str) -> tuple[str, float]:
    clean = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", *heap._OPERATOR_CHOICES)}
    out = subprocess.run([sys.executable, "-c", _PATTERN, mode], capture_output=True, text=True, check=True, timeout=60,
                         env={**clean, "PYTHONPATH": str(ROOT), **env}).stdout.split()
    return out[0], float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_buffers_made_and_freed_per_instance_stop_faulting_in_fresh_pages() -> None:
    tuned, faults = _faults("tuned")
    if tuned != "True":
        pytest.skip("no glibc mallopt here")
    default = _faults("default")[1]
    assert default > 100, default  # glibc's adaptive trim hands both buffers back each time
    assert faults < 5, faults


def test_the_operators_thresholds_are_left_alone() -> None:
    calls: list[tuple[int, int]] = []

    class Libc:
        def mallopt(self, param: int, value: int) -> int:
            calls.append((param, value))
            return 1

    assert not heap.tune_allocator({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000000"}, Libc())
    assert not heap.tune_allocator({"MALLOC_TRIM_THRESHOLD_": "1000000"}, Libc())
    assert calls == []
    assert heap.tune_allocator({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}, Libc())
    assert calls == [(heap.M_MMAP_THRESHOLD, heap.MMAP_THRESHOLD), (heap.M_TRIM_THRESHOLD, heap.TRIM_THRESHOLD)]


def test_without_mallopt_nothing_is_set() -> None:
    class NoMallopt:
        pass

    class Refuses:
        def mallopt(self, param: int, value: int) -> int:
            return 0

    assert not heap.tune_allocator({}, NoMallopt())
    assert not heap.tune_allocator({}, Refuses())


def test_an_operator_choice_in_the_environment_also_holds_for_the_real_process() -> None:
    """With GLIBC_TUNABLES naming a malloc tunable, a process is not tuned (the pattern faults as by default)."""
    tuned, _ = _faults("tuned", GLIBC_TUNABLES="glibc.malloc.trim_threshold=131072")
    assert tuned == "False"


def test_serving_in_one_process_tunes_first(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``xdsi serve`` with one worker sets the thresholds before it serves (a supervisor's workers do in worker_main)."""
    import argparse

    from tests.conftest import make_settings
    from xdsi import cli, server

    order: list[str] = []
    monkeypatch.setattr(heap, "tune_allocator", lambda: order.append("tuned") or True)
    monkeypatch.setattr(server, "serve", lambda settings: order.append("served") or 0)
    settings = make_settings(tmp_path, workers=1)
    assert settings.effective_workers == 1
    assert cli.cmd_serve(settings, argparse.Namespace(verbose=False)) == 0
    assert order == ["tuned", "served"]
