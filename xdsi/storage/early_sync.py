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
synced its own file.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Written", "start", "synced_inode"]

THREADS = 4

_pool: ThreadPoolExecutor | None = None
_lock = threading.Lock()


@dataclass(frozen=True)
class Written:
    """What the writer of a spool file knows of it: its size and sha256 (hashed as written), and its fsync."""

    size: int
    sha256: str
    synced: "Future[tuple[int, int]] | None" = None  # (st_dev, st_ino) of the file the fsync covered


def _fsync(path: str) -> tuple[int, int]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # Linux syncs a file's data through any descriptor of it
    try:
        os.fsync(fd)
        st = os.fstat(fd)
        return st.st_dev, st.st_ino
    finally:
        os.close(fd)


def start(path: Path | str) -> "Future[tuple[int, int]]":
    """fsync ``path`` on the pool; the future gives the device and inode it synced."""
    global _pool
    pool = _pool
    if pool is None:
        with _lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="xdsi-fsync")
            pool = _pool
    return pool.submit(_fsync, str(path))


def synced_inode(written: Written) -> tuple[int, int] | None:
    """Wait for the early fsync; the (device, inode) it synced, or None if there was none or it failed."""
    if written.synced is None:
        return None
    try:
        return written.synced.result()
    except OSError:
        return None
