"""Shared pieces of the fuzz suite: the wall-clock budget, byte mutators, server health checks.

Why a wall-clock budget on top of hypothesis' ``max_examples``: one example
against a running server can take 2 ms or 2 s (an XPath killed at its budget,
a DIMSE peer waiting out a timeout), so example counts alone cannot keep the
CI fuzz run under its two minutes.  Each test gets ``seconds`` (scaled by
XDSI_FUZZ_SECONDS for the "long" profile); once spent, the remaining examples
return at once, so hypothesis ends the run normally.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field

import psutil
from hypothesis import strategies as st

from tests.support.server import XdsiProcess

LONG = os.environ.get("XDSI_FUZZ") == "long"
LONG_SECONDS = float(os.environ.get("XDSI_FUZZ_SECONDS", "300"))  # per test, in the long profile
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")  # the server's log record prefix
RSS_GROWTH = 96 * 1024 * 1024  # the server may warm caches and pools, but not grow with the examples


@dataclass
class Budget:
    """``spent()`` once ``seconds`` of wall clock have passed since the test started."""

    seconds: float
    start: float = field(default_factory=time.monotonic)
    examples: int = 0

    def __post_init__(self) -> None:
        if LONG:
            self.seconds = LONG_SECONDS

    def spent(self) -> bool:
        if time.monotonic() - self.start > self.seconds:
            return True
        self.examples += 1
        return False


def rss(server: XdsiProcess) -> int:
    """Resident memory of the server process and its children (the XPath workers)."""
    assert server.proc is not None and server.proc.poll() is None, "the server process is gone:\n" + server.output()[-4000:]
    p = psutil.Process(server.proc.pid)
    total = p.memory_info().rss
    for c in p.children(recursive=True):
        try:
            total += c.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def assert_running(server: XdsiProcess) -> None:
    assert server.proc is not None and server.proc.poll() is None, "the server died:\n" + server.output()[-4000:]


def assert_no_traceback(server: XdsiProcess, since: int, allow_loggers: tuple[str, ...] = (), known: tuple[str, ...] = ()) -> None:
    """No Python traceback in the server's log since line ``since`` (an unhandled exception is a bug even if answered).

    ``allow_loggers``: loggers whose tracebacks are a library's own handled errors (pynetdicom's DUL logs the
    exception of a PDU it cannot decode, then aborts the association, which is the right answer).
    ``known``: text of a known, reported traceback (with its own xfail reproducer) that is not failed again here."""
    record: list[str] = []
    records: list[list[str]] = []
    for line in server.log[since:]:
        if TIMESTAMP.match(line):
            record = [line]
            records.append(record)
        else:
            record.append(line)
    for rec in records:
        text = "".join(rec)
        if "Traceback (most recent call last)" in text and not any(f" {name}:" in rec[0] for name in allow_loggers) and not any(k in text for k in known):
            raise AssertionError("traceback in the server log:\n" + text[-6000:])


# -- byte mutations ------------------------------------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn, data: bytes, max_ops: int = 4) -> bytes:
    """``data`` with 1..max_ops edits: overwrite, insert, delete, truncate, duplicate a slice, or extend."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, max_ops))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "dup", "append"]))
        n = len(out)
        pos = draw(st.integers(0, max(n - 1, 0)))
        if op == "flip" and n:
            out[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and n:
            chunk = draw(st.binary(min_size=1, max_size=8))
            out[pos : pos + len(chunk)] = chunk
        elif op == "insert":
            out[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete" and n:
            del out[pos : pos + draw(st.integers(1, 64))]
        elif op == "truncate":
            del out[pos:]
        elif op == "dup" and n:
            end = min(n, pos + draw(st.integers(1, 256)))
            out[pos:pos] = out[pos:end]
        elif op == "append":
            out += draw(st.binary(max_size=256))
    return bytes(out)


def text_mutation() -> st.SearchStrategy[str]:
    """Values meant to trip parsers: unicode, control characters, wildcards, long runs, UID- and date-likes."""
    return st.one_of(
        st.text(max_size=40),
        st.text(alphabet=st.characters(codec="latin-1"), max_size=40),
        st.sampled_from(["*", "?", "**", "*?*", "\\", "%", "%00", "\x00", "'", '"', "1.2.٣٤٥", "١٢٣", "../../etc/passwd", "", " ", "-", ",", "=="]),
        st.from_regex(r"[0-9.]{1,80}", fullmatch=True),
        st.from_regex(r"[0-9]{0,9}-?[0-9]{0,9}", fullmatch=True),
        st.builds(lambda c, n: c * n, st.sampled_from(["a", "*", "9", ".", "é", "\u202e"]), st.integers(60, 5000)),
    )


def fixed_uid() -> str:
    """A fresh 2.25 UID of constant length: templates built from it keep their size, so hypothesis'
    byte-position draws stay the same from one example to the next (otherwise FlakyStrategyDefinition)."""
    import secrets

    return f"2.25.{10**37 + secrets.randbelow(9 * 10**37)}"
