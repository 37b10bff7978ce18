"""fsync of an open file by glibc's POSIX AIO (``aio_fsync``): asked for on the caller's thread, run on one of libc's.

Why (issue 14, ingest on one association): the early fsync of a received file
(:mod:`xdsi.storage.early_sync`) ran on a small pool of Python threads.  Each job took the GIL
five times (take the job, ``open``, ``fsync``, ``fstat``, ``close``) while the association thread,
parsing the header meanwhile, wanted it too: every one of those was a hand-off between the two.
glibc runs ``aio_fsync`` on helper threads of its own that never enter the interpreter, so the
request is one call on the association thread and the wait is one ``aio_suspend`` with the GIL
released.  Measured with ``xdsi serve --workers 1`` and dcmtk ``storescu`` (24 interleaved runs each of
300 CTs of 512 x 512): median 0.663 s against 0.696 s per 300 with the pool (~5 %).

Only where the ``struct aiocb`` layout is known: glibc on a 64-bit platform (checked against
``offsetof`` of glibc 2.36 on x86-64; aarch64 shares it).  Elsewhere :func:`available` is False and
the caller uses its thread pool.

A forked child does not use it if its parent did: glibc's AIO state (its helper thread count, its
idle threads' condition) is copied by ``fork`` but its threads are not, so a request there could
wait for ever for a helper that does not exist (``xdsi serve --workers`` forks).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import sys
import threading
import weakref
from typing import Any

__all__ = ["AioFsync", "available"]

SIGEV_NONE = 1  # <signal.h>: no notification; completion is polled (aio_error) or waited for (aio_suspend)


class _SigEvent(ctypes.Structure):
    _fields_ = [
        ("sigev_value", ctypes.c_void_p),
        ("sigev_signo", ctypes.c_int),
        ("sigev_notify", ctypes.c_int),
        ("_rest", ctypes.c_byte * 48),
    ]


class _AioCb(ctypes.Structure):
    """glibc's ``struct aiocb`` on LP64 (168 bytes; ``aio_sigevent`` at 32, ``aio_offset`` at 128)."""

    _fields_ = [
        ("aio_fildes", ctypes.c_int),
        ("aio_lio_opcode", ctypes.c_int),
        ("aio_reqprio", ctypes.c_int),
        ("aio_buf", ctypes.c_void_p),
        ("aio_nbytes", ctypes.c_size_t),
        ("aio_sigevent", _SigEvent),
        ("_next_prio", ctypes.c_void_p),
        ("_abs_prio", ctypes.c_int),
        ("_policy", ctypes.c_int),
        ("_error_code", ctypes.c_int),
        ("_return_value", ctypes.c_ssize_t),
        ("aio_offset", ctypes.c_int64),
        ("_reserved", ctypes.c_byte * 32),
    ]


def _bind() -> Any:
    """libc with the four AIO calls typed, or None where the layout above is not libc's."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    if ctypes.sizeof(ctypes.c_void_p) != 8 or ctypes.sizeof(_AioCb) != 168 or _AioCb.aio_offset.offset != 128:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # glibc >= 2.34 has AIO in libc itself
        if not hasattr(libc, "aio_fsync"):
            libc = ctypes.CDLL("librt.so.1", use_errno=True)
        calls = (libc.aio_fsync, libc.aio_error, libc.aio_return, libc.aio_suspend)
    except (OSError, AttributeError):
        return None
    ptr = ctypes.POINTER(_AioCb)
    calls[0].argtypes, calls[0].restype = (ctypes.c_int, ptr), ctypes.c_int
    calls[1].argtypes, calls[1].restype = (ptr,), ctypes.c_int
    calls[2].argtypes, calls[2].restype = (ptr,), ctypes.c_ssize_t
    calls[3].argtypes, calls[3].restype = (ctypes.POINTER(ptr), ctypes.c_int, ctypes.c_void_p), ctypes.c_int
    return libc


_LIBC = _bind()
_used = False  # this process has asked glibc for an fsync (and so has its helper threads)
_inherited = False  # this process is a fork of one that had: AIO is not used here


def _after_fork() -> None:
    global _inherited
    _inherited = _inherited or _used


os.register_at_fork(after_in_child=_after_fork)


def available() -> bool:
    return _LIBC is not None and not _inherited


def _wait(cb: _AioCb) -> int:
    """Wait until glibc is done with ``cb`` (the GIL released meanwhile); the request's error number, 0 if none."""
    suspend_list = (ctypes.POINTER(_AioCb) * 1)(ctypes.pointer(cb))
    while (err := _LIBC.aio_error(cb)) == errno.EINPROGRESS:
        _LIBC.aio_suspend(suspend_list, 1, None)  # EINTR: look again
    _LIBC.aio_return(cb)  # frees glibc's record of the request
    return int(err)


def _finish(cb: _AioCb, fd: int) -> None:
    """Close ``fd`` once glibc is done with ``cb`` (it uses ``fd`` until then)."""
    _wait(cb)
    os.close(fd)


class AioFsync:
    """An ``fsync`` of a duplicate of the caller's descriptor, running on a glibc thread; :meth:`result` waits for it.

    The duplicate stays open until the fsync is done (glibc reads it until then) and is closed by
    :meth:`result`, or, if nobody asks, when this object goes away (a refused instance).
    """

    __slots__ = ("path", "_cb", "_fd", "_lock", "_value", "_error", "_closer", "__weakref__")

    def __init__(self, fd: int, path: str = "") -> None:
        """Raises ``OSError`` if glibc does not take the request (the caller then syncs another way)."""
        global _used
        if _LIBC is None:
            raise OSError(errno.ENOSYS, "aio_fsync is not available here")
        self.path = path
        self._lock = threading.Lock()
        self._value: tuple[int, int] | None = None
        self._error: OSError | None = None
        self._fd = os.dup(fd)  # the caller may close its own before the fsync has run
        cb = self._cb = _AioCb()
        cb.aio_fildes = self._fd
        cb.aio_sigevent.sigev_notify = SIGEV_NONE
        _used = True
        if _LIBC.aio_fsync(os.O_SYNC, cb) != 0:
            err = ctypes.get_errno()
            os.close(self._fd)
            raise OSError(err, f"aio_fsync: {os.strerror(err)}")
        self._closer = weakref.finalize(self, _finish, cb, self._fd)

    def result(self) -> tuple[int, int]:
        """The (st_dev, st_ino) the fsync covered; raises its error (``OSError``).  Waiting more than once is fine."""
        with self._lock:
            if self._value is None and self._error is None:
                err = _wait(self._cb)
                try:
                    if err:
                        self._error = OSError(err, f"fsync: {os.strerror(err)}", self.path or None)
                    else:
                        try:
                            st = os.fstat(self._fd)
                        except OSError as exc:  # kept, so that asking again raises it rather than closing twice
                            self._error = exc
                        else:
                            self._value = (st.st_dev, st.st_ino)
                finally:
                    self._closer.detach()
                    os.close(self._fd)
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value
