"""An association storing instances: message-driven loops while the peer sends, pynetdicom's pace once idle (issue 14).

A real pynetdicom peer against an in-process DicomServer, so the acceptor's
association can be inspected: each C-STORE succeeds and lands in the index,
the DUL polls fast while instances arrive and falls back to pynetdicom's own
delay after the association has been idle, and release and abort are still
noticed at once.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import func, select

from tests.conftest import make_settings
from tests.support.inprocess_dicom import inprocess_dicom
from xdsi.archive import Archive
from xdsi.dimse import store_polling, wakeup
from xdsi.index.models import Instance
from xdsi.tools.synth import StudySpec, write_study


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Archive, list[Path]]]:
    """An in-process DicomServer; what it sets process-wide (pynetdicom's _config, the spool directory) is put back."""
    tmp = tmp_path_factory.mktemp("polling")
    archive = Archive.open(make_settings(tmp))
    files = write_study(tmp / "in", StudySpec(patient_id="POLL01"), series=1, per_series=6, rows=128, columns=128)
    try:
        with inprocess_dicom(archive) as dicom:
            yield dicom, archive, files
    finally:
        archive.close()


def _acceptor(dicom: Any) -> Any:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = [a for a in dicom.ae.active_associations if a.is_acceptor and a.is_established]
        if found:
            return found[0]
        time.sleep(0.01)
    raise AssertionError("no established acceptor association")


def _count(archive: Archive) -> int:
    with archive.index.session() as s:
        return int(s.scalar(select(func.count()).select_from(Instance)) or 0)


def _peer() -> AE:
    ae = AE(ae_title="POLLER")
    ae.add_requested_context(CTImageStorage)
    return ae


def test_wakeup_while_storing_no_fast_polling_and_release_at_once(
    served: tuple[Any, Archive, list[Path]], tmp_path: Path
) -> None:
    """The one mechanism for every association (xdsi.dimse.wakeup): woken by activity, never polling faster than pynetdicom."""
    dicom, archive, _ = served
    files = write_study(tmp_path, StudySpec(patient_id="POLL02"), series=1, per_series=6, rows=128, columns=128)
    if not wakeup.check_pynetdicom():
        pytest.skip("pynetdicom's loops changed: the store_polling fallback is tested below")
    before = _count(archive)
    assoc = _peer().associate("127.0.0.1", dicom.port, ae_title="XDSI")
    assert assoc.is_established
    try:
        server_side = _acceptor(dicom)
        slow = server_side.dul._run_loop_delay
        for f in files:
            assert assoc.send_c_store(dcmread(f)).Status == 0x0000
        assert getattr(server_side, wakeup._MARK, False) is True
        assert not isinstance(server_side._reactor_checkpoint, store_polling.MessageCheckpoint)  # one mechanism, not two
        assert server_side.dul._run_loop_delay == slow  # idle passes keep pynetdicom's pace: no busy core
        t0 = time.monotonic()
    finally:
        assoc.release()
    assert assoc.is_released and time.monotonic() - t0 < 2
    assert _count(archive) == before + len(files)


def test_fast_while_storing_slow_when_idle_and_release_at_once(
    served: tuple[Any, Archive, list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fallback when pynetdicom's loops are not the ones wakeup knows: store_polling, as before."""
    monkeypatch.setattr(wakeup, "_SUPPORTED", False)
    dicom, archive, files = served
    before = _count(archive)
    assoc = _peer().associate("127.0.0.1", dicom.port, ae_title="XDSI")
    assert assoc.is_established
    try:
        server_side = _acceptor(dicom)
        slow = server_side.dul._run_loop_delay
        assert slow > store_polling.FAST_LOOP_DELAY  # pynetdicom's own pace before any C-STORE
        for f in files[:3]:
            assert assoc.send_c_store(dcmread(f)).Status == 0x0000
        assert isinstance(server_side._reactor_checkpoint, store_polling.MessageCheckpoint)
        assert server_side.dul._run_loop_delay == store_polling.FAST_LOOP_DELAY
        deadline = time.monotonic() + 10  # idle: back to pynetdicom's pace
        while server_side.dul._run_loop_delay != slow:
            assert time.monotonic() < deadline, "the DUL kept polling fast on an idle association"
            time.sleep(0.05)
        for f in files[3:]:  # and fast again, still storing correctly
            assert assoc.send_c_store(dcmread(f)).Status == 0x0000
        t0 = time.monotonic()
    finally:
        assoc.release()
    assert assoc.is_released and time.monotonic() - t0 < 2
    assert _count(archive) == before + len(files)


def test_abort_while_idle_ends_the_association(served: tuple[Any, Archive, list[Path]]) -> None:
    dicom, archive, files = served
    assoc = _peer().associate("127.0.0.1", dicom.port, ae_title="XDSI")
    assert assoc.is_established
    server_side = _acceptor(dicom)
    assert assoc.send_c_store(dcmread(files[0])).Status == 0x0000  # a duplicate by now: Success all the same
    assoc.abort()
    deadline = time.monotonic() + 5
    while server_side.is_alive():
        assert time.monotonic() < deadline, "the acceptor did not notice the abort"
        time.sleep(0.01)
    assert server_side.is_aborted
