"""A response body of byte strings and file ranges, so a server can send the ranges with ``sendfile``.

Why: a WADO-RS or RAD-69 answer is almost entirely stored files.  Read
into Python and written back out, every byte is copied three times
(``read`` into a bytes object, cheroot's chunked framing joining it with its
size line, ``send`` into the kernel) and costs the GIL each time.  A
:class:`RegionBody` is an ordinary WSGI iterable of ``bytes`` (any server,
any middleware, TLS: the file ranges are read in :data:`READ_CHUNK` pieces),
and also offers :meth:`RegionBody.regions`, which yields the file ranges as
:class:`FileRegion` objects, for a server that can hand them to the kernel
(``socket.sendfile``: :class:`xdsi.web.httpd.RegionGateway` on plain HTTP).

The items come from an iterator consumed once, by whichever of the two ways
the server uses, so an instance recalled or transcoded lazily is produced
once, when it is reached.  ``after`` of a region runs once it was sent whole
(the audit counts the instance as sent there); the body's ``close`` runs
every close callback exactly once, whether the body was sent whole, cut
short, or never iterated at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Union

READ_CHUNK = 256 * 1024  # the copy path (TLS, other servers): the read size the retrieve paths used before


class RegionError(OSError):
    """A file range could not be read whole (the file is shorter than announced): the response must be cut."""


@dataclass(frozen=True)
class FileRegion:
    """``length`` bytes of the file at ``path`` from ``offset``; ``after`` runs once they are all sent."""

    path: Path
    offset: int
    length: int
    after: Callable[[], None] | None = None

    def chunks(self, chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
        """The range by positional reads; raises :class:`RegionError` if the file ends early."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            pos, end = self.offset, self.offset + self.length
            while pos < end:
                b = os.pread(fd, min(chunk_size, end - pos), pos)
                if not b:
                    raise RegionError(f"{self.path}: {end - pos} bytes missing at offset {pos}")
                pos += len(b)
                yield b
        finally:
            os.close(fd)


Item = Union[bytes, FileRegion]


def item_length(item: Item) -> int:
    return item.length if isinstance(item, FileRegion) else len(item)


class RegionBody:
    """A WSGI response iterable over ``items`` (bytes and :class:`FileRegion`), see the module docstring.

    ``length``: the exact number of body bytes when known (the caller sets Content-Length from it).
    """

    def __init__(self, items: Iterable[Item], *, length: int | None = None, on_close: Iterable[Callable[[], None]] = ()) -> None:
        self._items = iter(items)
        self.length = length
        self._on_close = list(on_close)
        self._closed = False

    def call_on_close(self, fn: Callable[[], None]) -> None:
        self._on_close.append(fn)

    def regions(self) -> Iterator[Item]:
        """The items as they are: a server that sends :class:`FileRegion` itself calls each one's ``after``."""
        return self._items

    def __iter__(self) -> Iterator[bytes]:
        for item in self._items:
            if isinstance(item, FileRegion):
                yield from item.chunks()
                if item.after is not None:
                    item.after()
            elif item:
                yield item

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        close = getattr(self._items, "close", None)
        errors: list[BaseException] = []
        for fn in ([close] if close is not None else []) + self._on_close:
            try:
                fn()
            except Exception as exc:  # every callback runs; the first failure is raised after
                errors.append(exc)
        if errors:
            raise errors[0]


class FileChunks:
    """A whole file as a "produce my chunks" callable (what RAD-69's documents are) that can also be a :class:`FileRegion`.

    Calling it reads the file in pieces, as any chunk producer; :meth:`region`
    gives the same bytes as a range a server can ``sendfile``.  Either way
    ``after`` callbacks run once, when the file was sent whole; ``close`` (the
    owner releasing a spool) is not this object's business.
    """

    def __init__(self, path: Path, length: int, after: Iterable[Callable[[], None]] = ()) -> None:
        self.path = path
        self.length = length
        self._after = list(after)

    def then(self, fn: Callable[[], None]) -> "FileChunks":
        """The same file with ``fn`` also run once it has been sent whole."""
        return FileChunks(self.path, self.length, [*self._after, fn])

    def _done(self) -> None:
        for fn in self._after:
            fn()

    def region(self) -> FileRegion:
        return FileRegion(self.path, 0, self.length, self._done)

    def __call__(self) -> Iterator[bytes]:
        yield from FileRegion(self.path, 0, self.length).chunks()
        self._done()
