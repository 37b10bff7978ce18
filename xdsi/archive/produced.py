"""Bytes that exist before anyone announces them: produced instances and frame sets, spooled on disk.

A retrieve adapter must not answer "200" or "Success" and then fail half-way
through the body.  So :meth:`RetrieveService.produce` and
:meth:`RetrieveService.frames` do every step that can fail (recall, decode,
re-encode) into a spool file under ``settings.temp_dir`` before they return;
what they return only reads that file.  Memory stays at one read chunk; disk
holds what is being sent.  The spool is removed when its chunks have been
read, on ``close()``, or at the latest when the object is garbage-collected.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from pathlib import Path
from typing import Iterator

CHUNK = 256 * 1024


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def new_spool(spool_dir: Path, prefix: str) -> tuple[int, Path]:
    """A new spool file (fd, path) under ``spool_dir``; the caller writes it and hands it to a result."""
    spool_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=".spool", dir=spool_dir)
    return fd, Path(name)


def _read(path: Path, start: int, length: int | None, chunk_size: int) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        fh.seek(start)
        left = length
        while left is None or left > 0:
            b = fh.read(chunk_size if left is None else min(chunk_size, left))
            if not b:
                return
            if left is not None:
                left -= len(b)
            yield b


class _Spooled:
    """Owns at most one spool file; removes it once."""

    def __init__(self, path: Path, spooled: bool) -> None:
        self._path = path
        self._finalizer = weakref.finalize(self, _unlink, str(path)) if spooled else None

    @property
    def spooled(self) -> bool:
        return self._finalizer is not None

    def close(self) -> None:
        """Remove the spool (nothing to do for a stored file, which is never removed)."""
        if self._finalizer is not None:
            self._finalizer()

    @property
    def closed(self) -> bool:
        return self._finalizer is not None and not self._finalizer.alive

    def __enter__(self):  # type: ignore[no-untyped-def]
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Produced(_Spooled):
    """One instance as a Part 10 file in ``transfer_syntax``: the stored file (``unchanged``) or a spool.

    ``chunks()`` streams it once and then removes the spool; ``file_path()`` is
    for the one library that sends from a file (pynetdicom's C-STORE sender),
    whose caller must ``close()`` afterwards.
    """

    def __init__(self, transfer_syntax: str, path: Path, *, unchanged: bool, spooled: bool) -> None:
        super().__init__(path, spooled)
        self.transfer_syntax = transfer_syntax
        self.unchanged = unchanged
        self.size = path.stat().st_size

    def chunks(self, chunk_size: int = CHUNK) -> Iterator[bytes]:
        if self.closed:
            raise ValueError("this produced instance was closed")
        try:
            yield from _read(self._path, 0, None, chunk_size)
        finally:
            self.close()

    def file_path(self) -> Path:
        if self.closed:
            raise ValueError("this produced instance was closed")
        return self._path

    def __repr__(self) -> str:
        return f"Produced({self.transfer_syntax}, {self.size} bytes, unchanged={self.unchanged})"


class FrameSet(_Spooled):
    """Requested frames, in request order, all produced: each part is ``(frame number, chunks)``.

    ``transfer_syntax`` and ``media_type`` describe the bytes: a stored
    bitstream of an encapsulated syntax has its PS3.18 Table 8.7.3-5 media type,
    native frames are ``application/octet-stream`` in Explicit VR Little Endian.
    Frames that are plain ranges of a little-endian stored file are read from
    it directly (nothing to fail); every other kind is produced into a spool.
    """

    def __init__(self, transfer_syntax: str, media_type: str, path: Path, spans: list[tuple[int, int, int]], *, spooled: bool) -> None:
        super().__init__(path, spooled)
        self.transfer_syntax = transfer_syntax
        self.media_type = media_type
        self.spans = spans  # (frame number, file offset, length)

    @property
    def path(self) -> Path:
        """The file the spans are ranges of (a spool lives until :meth:`close`)."""
        if self.closed:
            raise ValueError("this frame set was closed")
        return self._path

    @property
    def numbers(self) -> list[int]:
        return [n for n, _o, _l in self.spans]

    def parts(self, chunk_size: int = CHUNK) -> Iterator[tuple[int, Iterator[bytes]]]:
        """Each frame's chunks; the spool is opened once and unlinked at once (the open file stays readable)."""
        if self.closed:
            raise ValueError("this frame set was closed")
        fh = open(self._path, "rb")
        self.close()  # POSIX: the name goes now, the bytes when the last reader drops the file
        for n, offset, length in self.spans:
            yield n, _read_open(fh, offset, length, chunk_size)


def _read_open(fh, start: int, length: int, chunk_size: int) -> Iterator[bytes]:  # type: ignore[no-untyped-def]
    """``length`` bytes at ``start`` by positional reads, so frames read in any interleaving stay right."""
    pos, end = start, start + length
    while pos < end:
        b = os.pread(fh.fileno(), min(chunk_size, end - pos), pos)
        if not b:
            return
        pos += len(b)
        yield b


class BulkValue:
    """A top-level element value: ``length`` known before anything is sent, ``chunks(start, end)`` for a range."""

    def __init__(self, length: int, first: Iterator[bytes], more) -> None:  # type: ignore[no-untyped-def]
        self.length = length
        self._first = first
        self._more = more

    def chunks(self, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        end = self.length if end is None else end
        if start == 0 and end == self.length and self._first is not None:
            first, self._first = self._first, None
            return first
        return self._more(start, end)
