"""A DUL told to read lazily (xdsi.dimse.wakeup.read_lazily, issue 15), against a real pynetdicom peer.

While the condition holds, what the peer sends waits in the socket until the DUL's next look (LAZY_WAIT);
what we send goes out at once; the returned poke makes the DUL look at once when the condition turns false.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Iterator

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from xdsi.dimse import wakeup


@pytest.fixture(scope="module")
def peer() -> Iterator[int]:
    ae = AE(ae_title="PEER")
    ae.add_supported_context(Verification)
    server = ae.start_server(("127.0.0.1", 0), block=False)
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()


def _plain(port: int) -> Any:
    ae = AE(ae_title="US")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="PEER")
    assert assoc.is_established
    return assoc


def _associate(port: int) -> Any:
    assoc = _plain(port)
    if not wakeup.install(assoc):
        assoc.release()
        pytest.skip("pynetdicom's loops are not the ones xdsi.dimse.wakeup knows")
    return assoc


def _echo(assoc: Any) -> float:
    t0 = time.monotonic()
    assert assoc.send_c_echo().Status == 0x0000
    return time.monotonic() - t0


def test_lazy_reading_delays_what_comes_and_the_poke_ends_it(peer: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wakeup, "LAZY_WAIT", 0.6)
    assoc = _associate(peer)
    try:
        assert _echo(assoc) < 0.3  # read as it comes
        lazy = [True]
        poke = wakeup.read_lazily(assoc, lambda: lazy[0])
        assert poke is not None
        _echo(assoc)  # a wait already begun before the condition was set ends as before
        slow = _echo(assoc)  # the request went out at once; the response waited in the socket for the DUL's next look
        assert 0.3 < slow < 3, slow
        took: list[float] = []
        t = threading.Thread(target=lambda: took.append(_echo(assoc)))
        t.start()
        time.sleep(0.1)
        lazy[0] = False
        poke()  # the condition turned false: the DUL looks now, not after LAZY_WAIT
        t.join(5)
        assert took and took[0] < 0.35, took
        assert _echo(assoc) < 0.3
    finally:
        assoc.release()


def test_read_lazily_needs_an_installed_association(peer: int) -> None:
    assoc = _plain(peer)
    try:
        assert wakeup.read_lazily(assoc, lambda: True) is None
        assert _echo(assoc) < 0.3
    finally:
        assoc.release()
