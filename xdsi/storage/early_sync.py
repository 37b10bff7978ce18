"""A received file's fsync started the moment its last byte is written, while its header is parsed.

Why (issue 14, ingest on one association): a modality sends its next instance only after the
response to the last one, so everything between the last byte received and the C-STORE response
is latency that no second core can hide.  Two steps there needed nothing but the received bytes and
ran one after the other: flushing the spool file to disk (~0.5 ms of waiting on this machine) and
parsing its header (~0.7 ms of CPU).  Now the direct C-STORE reader
(:mod:`xdsi.dimse.receive_direct`) starts the fsync on a small pool as soon as the spool file is
complete and hands a :class:`Written` on with the request; the tier waits for that fsync where it
used to run it (:meth:`xdsi.storage.tiers.Tier.place_file`), before the file is renamed, indexed
or acknowledged.  The order of the durable steps is unchanged: file data, then its directory entry,
then the index row, then the response.  A sync that failed, or that synced another file than the one
about to be renamed (compared by device and inode), is simply done again inline.

The pool has a few threads, not one: fsyncs of several associations then run side by side and the
file system can commit them in one journal transaction, as it did when each association thread
synced its own file.  Where glibc's AIO can be used (:mod:`xdsi.storage.libc_aio`), a caller that
has the file open gets its fsync run by libc instead, without a Python thread.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from queue import SimpleQueue
from typing import Any, Protocol

from xdsi.storage import libc_aio

__all__ = ["Pending", "Sync", "Written", "start", "synced_inode"]

THREADS = 4


class Sync:
    """One fsync on the pool: :meth:`result` waits for it.

    Not a ``concurrent.futures.Future``: submitting through ``ThreadPoolExecutor`` (its Future, a Condition,
    its work item) was ~2 % of the GIL time of a stored instance; this is a lock held until the sync is done.
    """

    __slots__ = ("path", "_done", "_value", "_error")

    def __init__(self, path: str) -> None:
        self.path = path
        self._done = threading.Lock()
        self._done.acquire()
        self._value: tuple[int, int] | None = None
        self._error: BaseException | None = None

    def set_result(self, value: tuple[int, int]) -> None:
        self._value = value
        self._done.release()

    def set_exception(self, error: BaseException) -> None:
        self._error = error
        self._done.release()

    def result(self) -> tuple[int, int]:
        """The (st_dev, st_ino) the fsync covered; re-raises its error.  Waits until it is done (more than once is fine)."""
        self._done.acquire()
        self._done.release()
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value


class Pending(Protocol):
    """An fsync under way (:class:`Sync`, :class:`xdsi.storage.libc_aio.AioFsync`)."""

    path: str

    def result(self) -> tuple[int, int]: ...


@dataclass(frozen=True)
class Written:
    """What the writer of a spool file knows of it: its size and sha256 (hashed as written), and its fsync."""

    size: int
    sha256: str
    synced: Pending | None = None


_queue: SimpleQueue[Sync] = SimpleQueue()
_started = 0
_lock = threading.Lock()


def _worker() -> None:
    while True:
        job = _queue.get()
        try:
            fd = os.open(job.path, os.O_RDONLY | os.O_CLOEXEC)  # Linux syncs a file's data through any descriptor
            try:
                os.fsync(fd)
                st = os.fstat(fd)
            finally:
                os.close(fd)
        except BaseException as exc:  # the file is gone (refused, its association aborted): the waiter, if any, syncs
            job.set_exception(exc)
        else:
            job.set_result((st.st_dev, st.st_ino))


def _after_fork() -> None:
    """A forked child has none of the parent's fsync threads (nor a use for its queued jobs): it starts its own."""
    global _queue, _started, _lock
    _queue, _started, _lock = SimpleQueue(), 0, threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


def _sync_file_range() -> Any:
    """libc's ``sync_file_range`` (Linux), or None where it cannot be called."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    call.restype = ctypes.c_int
    return call


_SYNC_FILE_RANGE = _sync_file_range()
SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start write-back of the range's dirty pages, without waiting


def start(path: Path | str, fd: int | None = None) -> Pending:
    """fsync ``path``; what is returned gives the device and inode it synced (``result()``, which waits).

    ``fd``: the file, open in the caller.  Where glibc's AIO can be used, libc syncs it on a thread of its
    own (:class:`xdsi.storage.libc_aio.AioFsync`, through a duplicate of ``fd``).  Otherwise the pool
    syncs ``path``, and the write-back is started here and now (``sync_file_range``, which does not
    wait for it).  Why: the pool thread takes time to wake and to get the GIL from the association
    thread, which parses the header meanwhile; measured on one association (512 x 512 CT), 0.17 ms
    from submission to the pool's ``open``, and the association thread then waited 0.17 ms for the
    fsync.  With the disk already writing, it waited ~0 (the call itself costs ~0.05 ms).  Only a head
    start: the pool's fsync alone makes the file durable, and reports any error.
    """
    if fd is not None and libc_aio.available():
        try:
            return libc_aio.AioFsync(fd, str(path))
        except OSError:  # glibc refused the request (out of resources, a bad descriptor): the pool syncs by path
            pass
    return _pool_start(path, fd)


def _pool_start(path: Path | str, fd: int | None) -> Sync:
    global _started
    if fd is not None and _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, SYNC_FILE_RANGE_WRITE)  # its failure is the fsync's to report
    if _started < THREADS:
        with _lock:
            while _started < THREADS:
                threading.Thread(target=_worker, name=f"xdsi-fsync-{_started}", daemon=True).start()
                _started += 1
    job = Sync(str(path))
    _queue.put(job)
    return job


def synced_inode(written: Written) -> tuple[int, int] | None:
    """Wait for the early fsync; the (device, inode) it synced, or None if there was none or it failed."""
    if written.synced is None:
        return None
    try:
        return written.synced.result()
    except OSError:
        return None
