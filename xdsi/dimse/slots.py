"""Association slots counted across the worker processes of one node (``xdsi serve --workers N``).

``[dimse] max_associations``, ``max_associations_per_ae`` and ``max_associations_per_address`` are
promises about the node, not about one process: with two workers each counting on its own, one
peer could hold twice its share.  The workers share no memory, so a slot is a byte of a lock file
held with a POSIX record lock (``fcntl.lockf``):

* taking a slot is one non-blocking ``F_SETLK`` on a byte no other process holds; the kernel
  arbitrates between workers, atomically;
* a worker that dies (SIGKILL, a crash) loses its record locks with it, so its slots come back at
  once, with no supervisor bookkeeping and nothing to clean up;
* record locks belong to a process, not a thread, so within one worker the bytes it holds are
  also recorded here in memory, one association per byte.

Each limit has a region of its own (:data:`REGION` bytes: the largest limit allowed), at an offset
taken from a 46-bit hash of what it counts (the listener, the calling AE title, the address).  Two
keys sharing a region would share a limit: with 2**46 regions this does not happen in practice.

Why not the supervisor as a slot broker over a socket: a second protocol, a round trip per
association, and slots to reclaim by hand when a worker dies; the kernel already does all three.
One file descriptor per process is opened and never closed: closing *any* descriptor of a file drops
every record lock the process holds on it (POSIX), so nothing else may open this file.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import threading
from pathlib import Path

from xdsi.config import DimseLimits

__all__ = ["REGION", "SharedSlots"]

REGION = 1 << 16  # slots per limit at most; config allows far fewer associations than this

_lock = threading.Lock()  # guards the tables below and every lockf call of this process
_fds: dict[str, int] = {}  # lock file path -> the one descriptor this process keeps on it
_held: dict[str, set[int]] = {}  # lock file path -> byte offsets this process holds


def _fd(path: Path) -> int:
    key = str(path)
    fd = _fds.get(key)
    if fd is None:
        fd = os.open(key, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        _fds[key] = fd
        _held[key] = set()
    return fd


def _region(*parts: str) -> int:
    digest = hashlib.blake2b("\0".join(parts).encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 18) * REGION  # 46 bits of hash, times the region size: < 2**62


class SharedSlots:
    """The association slots of one listener (``scope``: its AE title), node-wide."""

    def __init__(self, path: Path, scope: str, limits: DimseLimits, max_associations: int) -> None:
        self.path = path
        self.scope = scope
        self.limits = limits
        self.max_associations = max_associations
        self._by_holder: dict[int, list[int]] = {}
        with _lock:
            _fd(path)

    def take(self, holder: int, calling: str, address: str) -> str | None:
        """Take the three slots an association needs; None when taken, else why not (nothing is then held)."""
        wanted = (
            (_region("all", self.scope), self.max_associations,
             f"{self.max_associations} associations open on this node (max_associations {self.max_associations})"),
            (_region("ae", self.scope, calling), self.limits.max_associations_per_ae,
             f"calling AE {calling!r} has {self.limits.max_associations_per_ae} associations open (max_associations_per_ae)"),
            (_region("address", self.scope, address), self.limits.max_associations_per_address,
             f"{address} has {self.limits.max_associations_per_address} associations open (max_associations_per_address)"),
        )
        with _lock:
            taken: list[int] = []
            for base, count, reason in wanted:
                slot = self._grab(base, min(count, REGION))
                if slot is None:
                    self._free(taken)
                    return reason
                taken.append(slot)
            self._by_holder[holder] = taken
        return None

    def release(self, holder: int) -> None:
        """Give back what ``holder`` took (nothing when it took nothing, or already gave it back)."""
        with _lock:
            self._free(self._by_holder.pop(holder, []))

    def held(self) -> int:
        """Associations of this process holding slots here (for tests)."""
        with _lock:
            return len(self._by_holder)

    def _grab(self, base: int, count: int) -> int | None:
        key = str(self.path)
        fd, mine = _fds[key], _held[key]
        for offset in range(base, base + count):
            if offset in mine:
                continue
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
            except OSError as exc:
                if exc.errno in (errno.EACCES, errno.EAGAIN):  # another worker holds it
                    continue
                raise
            mine.add(offset)
            return offset
        return None

    def _free(self, offsets: list[int]) -> None:
        key = str(self.path)
        fd, mine = _fds[key], _held[key]
        for offset in offsets:
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, offset)
            mine.discard(offset)
