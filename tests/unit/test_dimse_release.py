"""An association we request (a C-MOVE sub-association, a forward) is released without pynetdicom's 10 ms sleep.

pynetdicom's requestor receives the A-RELEASE confirmation before its DUL has closed the connection;
``Association.kill()`` then slept 10 ms before looking again.  With ``direct.on_released`` bound by
``ArchiveAE.associate`` the DUL is in Sta1 when ``kill()`` looks, so that sleep never happens; the peer
still sees a proper A-RELEASE (its EVT_RELEASED fires) and nothing is left running.
"""

from __future__ import annotations

import threading
from typing import Any, Iterator

import pytest
from pynetdicom import AE, association, evt
from pynetdicom.sop_class import Verification

from tests.support.server import free_port
from xdsi.dimse.server import ArchiveAE


@pytest.fixture(scope="module")
def peer() -> Iterator[tuple[int, list[str]]]:
    released: list[str] = []
    ae = AE(ae_title="RELPEER")
    ae.add_supported_context(Verification)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_RELEASED, lambda e: released.append(e.assoc.requestor.ae_title))]
    )
    yield port, released
    server.shutdown()


def test_release_does_not_sleep_waiting_for_the_dul(peer: tuple[int, list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    port, released = peer
    ae = ArchiveAE(ae_title="XDSIREL")
    ae.add_requested_context(Verification)
    slept: list[float] = []
    real_sleep = association.time.sleep

    def sleep(seconds: float) -> None:
        if threading.current_thread() is threading.main_thread():
            slept.append(seconds)
        real_sleep(seconds)

    for _ in range(5):
        assoc = ae.associate("127.0.0.1", port, ae_title="RELPEER")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        monkeypatch.setattr(association.time, "sleep", sleep)
        assoc.release()
        monkeypatch.setattr(association.time, "sleep", real_sleep)
        assert assoc.is_released and not assoc.dul.is_alive()
        assert assoc.dul.state_machine.current_state == "Sta1"
    assert 0.01 not in slept  # Association.kill()'s wait for a DUL not yet in Sta1
    deadline_wait = threading.Event()
    for _ in range(100):
        if len(released) >= 5:
            break
        deadline_wait.wait(0.05)
    assert released.count("XDSIREL") == 5
