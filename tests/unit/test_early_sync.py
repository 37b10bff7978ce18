"""The fsync a direct C-STORE reader starts early (xdsi.storage.early_sync) is waited for, never assumed.

The tier renames a received file only after its data are on disk: with an early fsync it waits for
that fsync (and runs none of its own), with one that failed or covered another inode it syncs again
itself, and a file whose size changed since it was hashed is hashed and synced from scratch.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from xdsi.config import TierSettings
from xdsi.storage import early_sync, libc_aio, tiers
from xdsi.storage.early_sync import Written


@pytest.fixture
def tier(tmp_path: Path) -> tiers.Tier:
    t = tiers.Tier(TierSettings(name="cache", path=tmp_path / "cache"))
    t.ensure()
    return t


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every os.fsync of a regular file (directory syncs are not counted)."""
    calls: list[int] = []
    real = os.fsync

    def spy(fd: int) -> None:
        import stat

        if stat.S_ISREG(os.fstat(fd).st_mode):
            calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return calls


def _spool(tmp_path: Path, data: bytes = b"DICM" * 1000) -> tuple[Path, bytes]:
    p = tmp_path / "spool.dcm"
    p.write_bytes(data)
    return p, data


def test_the_early_fsync_is_waited_for_before_the_rename(tier: tiers.Tier, tmp_path: Path, fsyncs: list[int]) -> None:
    src, data = _spool(tmp_path)
    st = os.stat(src)
    pending = early_sync.Sync(str(src))
    written = Written(len(data), hashlib.sha256(data).hexdigest(), pending)
    placed: list[tiers.Placed] = []
    worker = threading.Thread(target=lambda: placed.append(tier.place_file(src, "a/b/c.dcm", move=True, written=written)))
    worker.start()
    time.sleep(0.3)
    assert not placed and src.exists() and not (tier.root / "a/b/c.dcm").exists()  # still waiting for the fsync
    pending.set_result((st.st_dev, st.st_ino))
    worker.join(10)
    assert placed and placed[0].sha256 == hashlib.sha256(data).hexdigest() and placed[0].size == len(data)
    assert (tier.root / "a/b/c.dcm").read_bytes() == data
    assert fsyncs == []  # the early fsync covered this file: none of its own


def test_a_real_early_fsync_covers_the_file(tier: tiers.Tier, tmp_path: Path, fsyncs: list[int]) -> None:
    src, data = _spool(tmp_path)
    written = Written(len(data), hashlib.sha256(data).hexdigest(), early_sync.start(src))
    tier.place_file(src, "a/b/d.dcm", move=True, written=written)
    assert len(fsyncs) == 1  # the pool's, not a second one in the tier
    assert (tier.root / "a/b/d.dcm").read_bytes() == data


@pytest.mark.parametrize("outcome", ["other inode", "failed", "none"])
def test_the_tier_syncs_itself_when_the_early_fsync_does_not_cover_the_file(
    tier: tiers.Tier, tmp_path: Path, fsyncs: list[int], outcome: str
) -> None:
    src, data = _spool(tmp_path)
    done: early_sync.Sync | None = early_sync.Sync(str(src))
    if outcome == "other inode":
        done.set_result((os.stat(src).st_dev, os.stat(src).st_ino + 1))
    elif outcome == "failed":
        done.set_exception(FileNotFoundError(2, "gone"))
    else:
        done = None
    tier.place_file(src, "a/b/e.dcm", move=True, written=Written(len(data), hashlib.sha256(data).hexdigest(), done))
    assert len(fsyncs) == 1
    assert (tier.root / "a/b/e.dcm").read_bytes() == data


def test_a_file_that_changed_size_is_hashed_again(tier: tiers.Tier, tmp_path: Path, fsyncs: list[int]) -> None:
    src, data = _spool(tmp_path)
    stale = Written(len(data) - 4, "0" * 64, early_sync.start(src))
    placed = tier.place_file(src, "a/b/f.dcm", move=True, written=stale)
    assert (placed.size, placed.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert len(fsyncs) == 2  # the pool's, and the tier's own after hashing


def test_the_pool_reports_the_inode_it_synced_and_a_missing_file(tmp_path: Path) -> None:
    src, _ = _spool(tmp_path)
    job = early_sync.start(src)
    st = os.stat(src)
    assert job.result() == (st.st_dev, st.st_ino) == job.result()  # waiting twice is fine
    gone = early_sync.start(tmp_path / "refused-and-removed.dcm")
    with pytest.raises(FileNotFoundError):
        gone.result()
    assert early_sync.synced_inode(Written(1, "0" * 64, gone)) is None  # the tier then syncs itself


def test_a_forked_child_syncs_with_threads_of_its_own(tmp_path: Path) -> None:
    """``xdsi serve --workers`` forks: a child whose parent had started the fsync threads has none of them, and
    a job queued there would wait for ever; the child starts its own (os.register_at_fork)."""
    f = tmp_path / "a.dcm"
    f.write_bytes(b"x" * 1000)
    early_sync.start(f).result()  # the parent's threads are running now
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if its fsync completes within 10 s
        import signal

        signal.alarm(10)
        try:
            dev_ino = early_sync.start(f).result()
            os._exit(0 if dev_ino == (os.stat(f).st_dev, os.stat(f).st_ino) else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_the_write_back_starts_on_the_callers_descriptor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without glibc's AIO, given the open descriptor the caller starts the write-back itself (sync_file_range, not
    waiting) and the pool's fsync still follows; a descriptor the call refuses changes nothing (the fsync alone makes
    the file durable)."""
    monkeypatch.setattr(early_sync.libc_aio, "available", lambda: False)
    assert early_sync._SYNC_FILE_RANGE is not None  # found in libc on Linux
    calls: list[tuple[int, int]] = []
    real = early_sync._SYNC_FILE_RANGE

    def spy(fd: int, offset: int, nbytes: int, flags: int) -> int:
        calls.append((fd, flags))
        return int(real(fd, offset, nbytes, flags))

    monkeypatch.setattr(early_sync, "_SYNC_FILE_RANGE", spy)
    f = tmp_path / "spool.dcm"
    with open(f, "wb") as out:
        out.write(b"x" * 300_000)
        out.flush()
        job = early_sync.start(f, out.fileno())
        st = os.fstat(out.fileno())
        assert job.result() == (st.st_dev, st.st_ino)
        assert calls == [(out.fileno(), early_sync.SYNC_FILE_RANGE_WRITE)]
    refused = early_sync.start(f, -1)  # EBADF from the kernel: ignored here
    assert refused.result() == (st.st_dev, st.st_ino)
    assert early_sync.start(f).result() == (st.st_dev, st.st_ino) and len(calls) == 2  # no descriptor: no call


@pytest.mark.skipif(not libc_aio.available(), reason="glibc's AIO is not usable here")
def test_a_caller_with_the_file_open_has_it_synced_by_libc(tier: tiers.Tier, tmp_path: Path, fsyncs: list[int],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Given the open descriptor, the fsync runs on a glibc thread (no sync_file_range, no job on the pool, no
    os.fsync); the tier waits for it and syncs nothing itself."""
    head_starts: list[int] = []
    monkeypatch.setattr(early_sync, "_SYNC_FILE_RANGE", lambda fd, *_: head_starts.append(fd) or 0)
    queued: list[object] = []
    monkeypatch.setattr(early_sync, "_pool_start", lambda *a: queued.append(a))
    src, data = _spool(tmp_path)
    with open(src, "rb+") as f:
        job = early_sync.start(src, f.fileno())
    assert isinstance(job, libc_aio.AioFsync) and job.path == str(src)
    tier.place_file(src, "a/b/g.dcm", move=True, written=Written(len(data), hashlib.sha256(data).hexdigest(), job))
    assert (tier.root / "a/b/g.dcm").read_bytes() == data
    assert fsyncs == [] and head_starts == [] and queued == []


@pytest.mark.skipif(not libc_aio.available(), reason="glibc's AIO is not usable here")
def test_a_request_libc_refuses_goes_to_the_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, _ = _spool(tmp_path)

    def refuse(fd: int, path: str = "") -> None:
        raise OSError(11, "EAGAIN")

    monkeypatch.setattr(early_sync.libc_aio, "AioFsync", refuse)
    with open(src, "rb") as f:
        job = early_sync.start(src, f.fileno())
    assert isinstance(job, early_sync.Sync) and job.result() == (os.stat(src).st_dev, os.stat(src).st_ino)
