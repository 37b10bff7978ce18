"""File-like test streams for the body readers."""

from __future__ import annotations

import io


class Trickle(io.RawIOBase):
    """A stream that returns at most ``n`` bytes per read, to put boundaries across reads; ``pos`` is how far it was read."""

    def __init__(self, data: bytes, n: int) -> None:
        self.data, self.n, self.pos = data, n, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        chunk = self.data[self.pos : self.pos + min(self.n, size if size > 0 else self.n)]
        self.pos += len(chunk)
        return chunk
