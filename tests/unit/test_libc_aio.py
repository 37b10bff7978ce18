"""glibc's aio_fsync through ctypes (xdsi.storage.libc_aio): the fsync is really run on the file, its errors come back,
its descriptor is never leaked, and a forked child of a process that used it does not."""

from __future__ import annotations

import errno
import gc
import os
from pathlib import Path

import pytest

from xdsi.storage import early_sync, libc_aio

pytestmark = pytest.mark.skipif(not libc_aio.available(), reason="glibc's AIO is not usable here")


def _open_on(fd: int, path: Path) -> bool:
    """Whether descriptor ``fd`` is open on ``path``'s inode (counting all of the process's descriptors would see
    other tests' come and go)."""
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except OSError:
        return False


def test_the_fsync_reports_the_inode_and_closes_its_descriptor(tmp_path: Path) -> None:
    f = tmp_path / "a.dcm"
    with open(f, "wb") as out:
        out.write(b"x" * 200_000)
        out.flush()
        job = libc_aio.AioFsync(out.fileno(), str(f))
        dup = job._fd
        assert dup != out.fileno() and _open_on(dup, f)  # its own duplicate, open while glibc works on it
    assert _open_on(dup, f)  # the caller's closed: the duplicate still is
    st = os.stat(f)
    assert job.result() == (st.st_dev, st.st_ino) == job.result()  # waiting twice is fine
    assert not _open_on(dup, f)  # closed once the fsync is done


def test_an_fsync_error_is_the_kernels(tmp_path: Path) -> None:
    """fsync of a pipe is EINVAL: only a real fsync of that descriptor can answer so."""
    r, w = os.pipe()
    try:
        job = libc_aio.AioFsync(w, "pipe")
        with pytest.raises(OSError) as caught:
            job.result()
        assert caught.value.errno == errno.EINVAL
        assert early_sync.synced_inode(early_sync.Written(0, "0" * 64, job)) is None  # the tier then syncs itself
    finally:
        os.close(r)
        os.close(w)


def test_a_request_nobody_waits_for_closes_its_descriptor(tmp_path: Path) -> None:
    f = tmp_path / "refused.dcm"
    f.write_bytes(b"y" * 1000)
    with open(f, "rb") as src:
        dup = libc_aio.AioFsync(src.fileno(), str(f))._fd  # dropped at once, as for a refused instance
    gc.collect()
    assert not _open_on(dup, f)


def test_a_bad_descriptor_is_refused_at_once() -> None:
    with pytest.raises(OSError):
        libc_aio.AioFsync(-1)


def test_a_forked_child_of_a_user_syncs_without_it(tmp_path: Path) -> None:
    """glibc's AIO threads do not survive fork while its bookkeeping does: a child whose parent used AIO must not wait
    on helper threads it does not have; it syncs on the pool, within 10 s."""
    f = tmp_path / "b.dcm"
    f.write_bytes(b"z" * 1000)
    with open(f, "rb") as src:
        libc_aio.AioFsync(src.fileno(), str(f)).result()
    pid = os.fork()
    if pid == 0:
        import signal

        signal.alarm(10)
        try:
            with open(f, "rb") as src:
                job = early_sync.start(f, src.fileno())
                ok = not libc_aio.available() and isinstance(job, early_sync.Sync)
                ok = ok and job.result() == (os.stat(f).st_dev, os.stat(f).st_ino)
            os._exit(0 if ok else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    assert libc_aio.available()  # the parent goes on using it
