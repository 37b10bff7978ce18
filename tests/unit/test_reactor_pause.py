"""xdsi.dimse.reactor_pause: a send after a send no longer races pynetdicom's reactor for the response.

The reactor below is pynetdicom 3.0's loop (``Association._run_reactor``) reduced to what the race needs:
``_is_paused = True``, ``wait()`` on the checkpoint, ``_is_paused = False``, then whatever is on the DIMSE
queue is taken.  The sender does what every ``send_c_*`` does: clear the checkpoint, wait for
``_is_paused``, send, take the response, set the checkpoint.  A long GIL switch interval keeps the reactor
from running between the sender's steps unless the sender blocks, which is how a busy machine orders them.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Iterator

import pytest

from xdsi.dimse import reactor_pause


class Reactor(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self._reactor_checkpoint = threading.Event()
        self._reactor_checkpoint.set()
        self._is_paused = False
        self._kill = False
        self.queue: list[str] = []
        self.taken: list[str] = []

    def run(self) -> None:
        while not self._kill:
            time.sleep(0.001)
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            if self.queue:
                self.taken.append(self.queue.pop())


@pytest.fixture()
def slow_switching() -> Iterator[None]:
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.5)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def _two_sends(r: Reactor) -> list[str]:
    """Two back-to-back sends; the responses the sender got (a response the reactor took is lost to it)."""
    got = []
    for n in range(2):
        r._reactor_checkpoint.clear()
        while not r._is_paused:
            time.sleep(0.0001)
        r.queue.append(f"response {n}")  # the peer answers at once
        time.sleep(0.02)  # the sender's get_msg blocks: the reactor may run now
        if r.queue:
            got.append(r.queue.pop())
        r._reactor_checkpoint.set()
    return got


def test_without_it_the_reactor_takes_the_second_response(slow_switching: None) -> None:
    """The race itself, as pynetdicom has it (what the fix is for): stale ``_is_paused`` lets the second send out."""
    r = Reactor()
    r.start()
    time.sleep(0.05)
    try:
        got = _two_sends(r)
    finally:
        r._kill = True
        r._reactor_checkpoint.set()
        r.join(2)
    assert got == ["response 0"] and r.taken == ["response 1"]


def test_with_it_every_response_reaches_the_sender(slow_switching: None) -> None:
    r = Reactor()
    reactor_pause.install(r)
    reactor_pause.install(r)  # idempotent
    r.start()
    time.sleep(0.05)
    try:
        got = _two_sends(r) + _two_sends(r)
    finally:
        r._kill = True
        r._reactor_checkpoint.set()
        r.join(2)
    assert got == ["response 0", "response 1"] * 2 and r.taken == []


def test_a_clear_returns_when_the_reactor_is_gone() -> None:
    r = Reactor()
    reactor_pause.install(r)  # never started: nothing to wait for
    t = time.monotonic()
    r._reactor_checkpoint.clear()
    assert time.monotonic() - t < 1.0 and not r._reactor_checkpoint.is_set()
    r._reactor_checkpoint.set()
    assert r._reactor_checkpoint.wait(0) is True
