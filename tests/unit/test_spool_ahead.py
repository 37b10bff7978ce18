"""Spool files made ahead (xdsi.dimse.spool_ahead) are handed out only while they are safe to write.

Each one is new (created exclusively, owner-only, empty, under the spool keeper's pattern), in the
directory asked for, not removed meanwhile, and younger than half the spool keeper's ``max_age`` (so
the keeper's sweep never takes one about to be written); the rest are removed, and a forked child
never gets its parent's.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from xdsi.dimse import spool_ahead
from xdsi.dimse.spool import SPOOL_PATTERNS, SpoolKeeper, spool_usage
from xdsi.process_tag import process_tag


@pytest.fixture
def ahead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    pool = spool_ahead.SpoolAhead(ahead=3, max_age=60.0)
    yield pool
    pool.drain()


def _ready(pool: spool_ahead.SpoolAhead, n: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while len(pool._ready) < n:
        assert time.monotonic() < deadline, f"only {len(pool._ready)} of {n} made ahead"
        time.sleep(0.01)


def test_a_file_made_ahead_is_new_private_empty_and_where_the_keeper_looks(ahead, tmp_path: Path) -> None:
    assert ahead.take() is None  # nothing ready yet: the caller creates its own; the thread starts
    _ready(ahead, 3)
    path, fd = ahead.take()
    try:
        p = Path(path)
        assert p.parent == tmp_path and p.match(SPOOL_PATTERNS[0]) and process_tag() in p.name
        st = os.fstat(fd)
        assert (st.st_size, stat.S_IMODE(st.st_mode), st.st_nlink) == (0, 0o600, 1)
        assert (st.st_dev, st.st_ino) == (p.stat().st_dev, p.stat().st_ino)
        os.write(fd, b"abc")
        assert p.read_bytes() == b"abc"
    finally:
        os.close(fd)
    _ready(ahead, 3)  # the one taken is made again
    assert ahead.made == 4 and ahead.taken == 1
    # xdsi status counts the file written, not the three waiting: they hold no data
    assert (spool_usage(tmp_path).files, spool_usage(tmp_path).bytes) == (1, 3)


def test_a_file_removed_meanwhile_is_not_handed_out(ahead, tmp_path: Path) -> None:
    ahead.take()
    _ready(ahead, 3)
    for p in tmp_path.glob(SPOOL_PATTERNS[0]):
        p.unlink()  # the keeper (or anyone) removed them
    assert ahead.take() is None


def test_a_file_made_for_another_directory_is_removed_not_used(ahead, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ahead.take()
    _ready(ahead, 3)
    old = sorted(tmp_path.glob(SPOOL_PATTERNS[0]))
    other = tmp_path / "other"
    other.mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(other))
    assert ahead.take() is None  # nothing made there yet
    assert not any(p.exists() for p in old)
    _ready(ahead, 3)
    path, fd = ahead.take()
    os.close(fd)
    assert Path(path).parent == other


def test_no_file_waits_long_enough_for_the_keeper_to_sweep_it(ahead, tmp_path: Path) -> None:
    """Made ahead, a file is replaced after half the keeper's max_age: the keeper's sweep (untouched for longer
    than max_age, owned by nobody) never finds one, and every file handed out is younger than that."""
    ahead.configure(2.0)  # replaced after 1 s; the thread looks every 0.5 s: a stall of over 0.5 s to fail
    keeper = SpoolKeeper(tmp_path, max_age=2.0)
    ahead.take()
    deadline = time.monotonic() + 4.0
    while time.monotonic() < deadline:
        assert keeper.sweep() == 0
        time.sleep(0.05)
    _ready(ahead, 3)
    path, fd = ahead.take()
    os.close(fd)
    assert time.time() - os.stat(path).st_mtime < 2.0
    assert ahead.made >= 6  # replaced as they aged


def test_drain_removes_what_was_made_ahead(ahead, tmp_path: Path) -> None:
    ahead.take()
    _ready(ahead, 3)
    ahead.drain()
    deadline = time.monotonic() + 5
    while ahead._thread is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert list(tmp_path.glob(SPOOL_PATTERNS[0])) == [] and ahead._thread is None


def test_a_forked_child_never_gets_its_parents_files(ahead, tmp_path: Path) -> None:
    ahead.take()
    _ready(ahead, 3)
    parents = {p.name for p in tmp_path.glob(SPOOL_PATTERNS[0])}
    pid = os.fork()
    if pid == 0:
        import signal

        signal.alarm(10)
        try:
            got = ahead.take()
            while got is None:  # the child's own thread makes its own
                time.sleep(0.01)
                got = ahead.take()
            os._exit(0 if Path(got[0]).name not in parents and process_tag() in got[0] else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert parents <= {p.name for p in tmp_path.glob(SPOOL_PATTERNS[0])}  # the child removed none of ours

