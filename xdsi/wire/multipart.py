"""multipart/related (RFC 2387, RFC 2046 5.1) in and out, streaming, with memory bounded by the read size.

Reading is sans-IO: :class:`MultipartParser` is fed bytes as they arrive (any split, down to one
byte) and returns events: :class:`PartStart` (the part's headers), :class:`PartData` (a piece of its
body), :class:`PartEnd`, and :class:`Finished` at the close delimiter.  It never holds a whole part:
besides the unparsed header block (at most ``max_header_bytes``) it keeps only the tail that could
still be the start of a delimiter.  The blocking helpers on top of it read a file-like stream
(:func:`iter_events`, :func:`read_parts` with a per-part sink, :func:`spool_parts` with one temporary
file per part), so STOW-RS, MTOM requests and MTOM answers all use this one reader.

What is accepted, liberal where peers differ and strict where the framing would be ambiguous:
CRLF or bare LF line ends; a preamble and an epilogue (both ignored); transport padding (spaces and
tabs) after a delimiter; folded header lines.  A boundary string followed by anything but ``--`` or
padding and a line end is not a delimiter (RFC 2046: it is part of the body).  A missing close
delimiter, a header block over the limit, a header line without a colon or more than ``max_parts``
parts raise :class:`MultipartError` (:class:`TooManyParts`, also a 413 :class:`RequestTooLarge`).

Writing: :class:`MultipartWriter` produces the delimiters and part headers around iterables of
chunks, so a message of any size is sent one chunk at a time.
"""

from __future__ import annotations

import os
import re
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, BinaryIO, Callable, Iterable, Iterator, Mapping, Union

from xdsi.wire.errors import RequestTooLarge

#: default read size of the blocking helpers: a blocking ``read(n)`` on a request body waits for n bytes,
#: so a smaller read lets a slow upload reach its spool file (and the limits see it) sooner
CHUNK = 64 * 1024
MAX_HEADER_BYTES = 16 * 1024
MAX_BOUNDARY = 200  # RFC 2046 says 70; peers send longer ones, and it bounds the kept tail
MAX_PADDING = 1024  # transport padding after a delimiter we wait for before calling the line malformed


class MultipartError(ValueError):
    """The body is not a well-formed multipart message (the reason says where it broke)."""


class TooManyParts(MultipartError, RequestTooLarge):
    """More parts than the reader's ``max_parts``: raised when the part over the limit starts (HTTP 413)."""

    def __init__(self, reason: str) -> None:
        RequestTooLarge.__init__(self, reason)


# -- events ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartStart:
    """A part begins; ``headers`` by lower-case name (a repeated header keeps its last value)."""

    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PartData:
    """A piece of the current part's body, in order; never empty."""

    data: bytes


@dataclass(frozen=True)
class PartEnd:
    """The current part is complete."""


@dataclass(frozen=True)
class Finished:
    """The close delimiter was read; the rest of the stream is the epilogue and is not read."""


Event = Union[PartStart, PartData, PartEnd, Finished]

_PREAMBLE, _DELIMITER, _HEADERS, _BODY, _DONE = range(5)
_HEADER_END = re.compile(rb"\n\r?\n")
_PAD = b" \t"


def parse_headers(block: bytes) -> dict[str, str]:
    """A MIME header block (lines without the blank line that ends it) -> {lower-case name: value}.

    Folded lines (starting with space or tab) continue the previous header; a line without a colon
    is an error rather than skipped, because it means the framing is not what the sender thinks.
    """
    headers: dict[str, str] = {}
    last: str | None = None
    for raw in re.split(rb"\r?\n", block):
        if not raw:
            continue
        line = raw.decode("latin-1")
        if line[:1] in (" ", "\t"):
            if last is None:
                raise MultipartError(f"malformed MIME header line {line[:80]!r}")
            headers[last] += " " + line.strip()
            continue
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise MultipartError(f"malformed MIME header line {line[:80]!r}")
        last = name.strip().lower()
        headers[last] = value.strip()
    return headers


class MultipartParser:
    """A sans-IO multipart reader: :meth:`feed` bytes, get events; :meth:`close` at the end of the stream.

    ``boundary`` is the Content-Type parameter (without the leading ``--``).  Memory is bounded by
    the size of what is fed plus ``max_header_bytes`` plus the boundary length, whatever the part sizes.
    """

    def __init__(self, boundary: str, *, max_header_bytes: int = MAX_HEADER_BYTES, max_parts: int | None = None) -> None:
        if not boundary or len(boundary) > MAX_BOUNDARY or "\r" in boundary or "\n" in boundary:
            raise MultipartError("missing or invalid multipart boundary")
        self._sep = b"\n--" + boundary.encode("latin-1")
        self._keep = len(self._sep) + 1  # a CR before the LF belongs to the delimiter too
        self.max_header_bytes = max_header_bytes
        self.max_parts = max_parts
        self.parts = 0
        self._buf = b"\n"  # so a delimiter at the very start of the body is found like any other
        self._state = _PREAMBLE
        self._scanned = 0  # how much of the header block was searched for its end already

    @property
    def done(self) -> bool:
        """True once the close delimiter has been read."""
        return self._state == _DONE

    def feed(self, data: bytes) -> list[Event]:
        """Consume ``data`` (any length, any split) and return the events it completes."""
        if self._state == _DONE or not data:
            return []
        self._buf += data
        events: list[Event] = []
        while self._step(events, eof=False):
            pass
        return events

    def close(self) -> list[Event]:
        """The stream ended: returns the last events, or raises :class:`MultipartError` if the message is incomplete."""
        events: list[Event] = []
        if self._state != _DONE:
            while self._step(events, eof=True):
                pass
        if self._state == _PREAMBLE:
            raise MultipartError("no multipart boundary found in the body")
        if self._state == _HEADERS:
            raise MultipartError("truncated multipart part headers")
        if self._state != _DONE:
            raise MultipartError("truncated multipart body: closing boundary missing")
        return events

    # -- the state machine: each step consumes from _buf and returns whether it made progress ----------

    def _step(self, events: list[Event], eof: bool) -> bool:
        if self._state in (_PREAMBLE, _BODY):
            return self._scan(events, eof)
        if self._state == _DELIMITER:
            return self._after_delimiter(events, eof)
        if self._state == _HEADERS:
            return self._headers(events)
        self._buf = b""  # epilogue
        return False

    def _scan(self, events: list[Event], eof: bool) -> bool:
        """Look for the next delimiter; body bytes before it go out as data (the preamble is dropped)."""
        buf, sep, pos = self._buf, self._sep, 0
        while True:
            i = buf.find(sep, pos)
            if i < 0:
                cut = max(0, len(buf) - self._keep)
                self._emit(events, buf[:cut])
                self._buf = buf[cut:]
                return False
            verdict = _delimiter_verdict(buf, i + len(sep), eof)
            if verdict is False:  # the boundary string inside the body, not a delimiter
                pos = i + 1
                continue
            end = i - 1 if i > 0 and buf[i - 1 : i] == b"\r" else i
            self._emit(events, buf[:end])
            if verdict is None:  # cannot tell yet: keep from the candidate on
                if len(buf) - end > len(sep) + 2 + MAX_PADDING:
                    raise MultipartError("malformed multipart delimiter line (transport padding too long)")
                self._buf = buf[end:]
                return False
            if self._state == _BODY:
                events.append(PartEnd())
            self._buf = buf[i + len(sep) :]
            self._state = _DELIMITER
            return True

    def _emit(self, events: list[Event], data: bytes) -> None:
        if data and self._state == _BODY:
            events.append(PartData(data))

    def _after_delimiter(self, events: list[Event], eof: bool) -> bool:
        """``_buf`` starts right after a boundary that :meth:`_scan` confirmed: the close delimiter or a delimiter line."""
        if self._buf.startswith(b"--"):
            events.append(Finished())
            self._state, self._buf = _DONE, b""
            return False
        self._buf = self._buf[self._buf.find(b"\n") + 1 :]  # transport padding and the line end
        self._state, self._scanned = _HEADERS, 0
        return True

    def _headers(self, events: list[Event]) -> bool:
        """Parse the header block once its blank line is in the buffer; the body follows at once."""
        buf = self._buf
        if buf.startswith(b"\n"):  # a part without headers
            block, rest = b"", buf[1:]
        elif buf.startswith(b"\r\n"):
            block, rest = b"", buf[2:]
        elif buf == b"\r":
            return False
        else:
            m = _HEADER_END.search(buf, max(0, self._scanned - 2))  # not from 0 again: one-byte feeds stay linear
            if (m is None and len(buf) > self.max_header_bytes) or (m is not None and m.start() > self.max_header_bytes):
                raise MultipartError(f"multipart part headers too large (more than {self.max_header_bytes} bytes)")
            if m is None:
                self._scanned = len(buf)
                return False
            block, rest = buf[: m.start()].rstrip(b"\r"), buf[m.end() :]
        headers = parse_headers(block)
        self.parts += 1
        if self.max_parts is not None and self.parts > self.max_parts:
            raise TooManyParts(f"multipart message with more than {self.max_parts} parts")
        events.append(PartStart(headers))
        self._buf = rest
        self._state = _BODY
        return True


def _delimiter_verdict(buf: bytes, j: int, eof: bool) -> bool | None:
    """Whether the boundary string ending at ``buf[j]`` is a delimiter: True, False, or None (need more bytes).

    A delimiter is followed by ``--`` (the close delimiter) or by optional spaces/tabs and a line end.
    """
    n = len(buf)
    if j < n and buf[j : j + 1] == b"-":
        if j + 1 < n:
            return buf[j + 1 : j + 2] == b"-"
        return False if eof else None
    k = j
    while k < n and buf[k] in _PAD:
        k += 1
    if k == n:
        return False if eof else None
    c = buf[k : k + 1]
    if c == b"\n":
        return True
    if c == b"\r":
        if k + 1 < n:
            return buf[k + 1 : k + 2] == b"\n"
        return False if eof else None
    return False


# -- blocking helpers over a file-like stream ------------------------------------------------------


def iter_events(
    stream: BinaryIO, boundary: str, *, read_size: int = CHUNK, max_header_bytes: int = MAX_HEADER_BYTES, max_parts: int | None = None
) -> Iterator[Event]:
    """The events of the multipart body in ``stream``, reading ``read_size`` bytes at a time, lazily.

    Reading stops at the close delimiter (the epilogue is left unread); a stream that ends first
    raises :class:`MultipartError`.
    """
    parser = MultipartParser(boundary, max_header_bytes=max_header_bytes, max_parts=max_parts)
    while not parser.done:
        data = stream.read(read_size)
        if not data:
            yield from parser.close()
            return
        yield from parser.feed(data)


PartSink = Callable[[dict[str, str]], IO[bytes]]


def read_parts(stream: BinaryIO, boundary: str, sink: PartSink, **options: int | None) -> int:
    """Read every part: ``sink(headers)`` gives a writable file per part that receives its body as it arrives.

    Returns the number of parts.  ``options`` go to :func:`iter_events`.  The sink owns the files.
    """
    out: IO[bytes] | None = None
    n = 0
    for ev in iter_events(stream, boundary, **options):  # type: ignore[arg-type]
        if isinstance(ev, PartStart):
            out = sink(ev.headers)
            n += 1
        elif isinstance(ev, PartData):
            out.write(ev.data)  # type: ignore[union-attr]
    return n


def spool_parts(stream: BinaryIO, boundary: str, spool_dir: Path, *, prefix: str = "stow-", suffix: str = ".part", **options: int | None) -> Iterator[tuple[dict[str, str], Path]]:
    """Yield (part headers, spooled file) one part at a time.

    The caller owns each file once it is yielded (and must remove it); the next part is not read
    until the caller asks, so at most one part is on disk and one read in memory.  A part being
    spooled when an error (or the caller closing the generator) interrupts it is removed.
    """
    out: IO[bytes] | None = None
    path: Path | None = None
    try:
        for ev in iter_events(stream, boundary, **options):  # type: ignore[arg-type]
            if isinstance(ev, PartStart):
                spool_dir.mkdir(parents=True, exist_ok=True)
                fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=spool_dir)
                path, out = Path(name), os.fdopen(fd, "wb")
                headers = ev.headers
            elif isinstance(ev, PartData):
                out.write(ev.data)  # type: ignore[union-attr]
            elif isinstance(ev, PartEnd):
                out.close()  # type: ignore[union-attr]
                done, out, path = path, None, None
                yield headers, done  # type: ignore[misc]
    finally:
        if out is not None:
            out.close()
        if path is not None:
            path.unlink(missing_ok=True)


# -- writing ---------------------------------------------------------------------------------------

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def _param(name: str, value: str) -> str:
    """``; name=value``, the value quoted (with quoted-pairs) unless it is a token (RFC 9110 5.6.6)."""
    if _TOKEN.match(value):
        return f"; {name}={value}"
    return '; {}="{}"'.format(name, value.replace("\\", "\\\\").replace('"', '\\"'))


class MultipartWriter:
    """A streaming ``multipart/related`` message: iterate :meth:`part` for each part, then send :meth:`end`.

    ``type``, ``start``, ``start_info`` and ``action`` become the Content-Type parameters of the same
    names (RFC 2387; ``action`` as MTOM and ITI TF-2 V.9 use it).  Each part's delimiter carries the
    CRLF that ends the previous part's body, so a part's bytes are exactly its chunks.
    """

    def __init__(
        self,
        type: str | None = None,
        *,
        boundary: str | None = None,
        start: str | None = None,
        start_info: str | None = None,
        action: str | None = None,
    ) -> None:
        self.type = type
        self.boundary = boundary or uuid.uuid4().hex
        self.start = start
        self.start_info = start_info
        self.action = action
        self._first = True

    @property
    def content_type(self) -> str:
        """The HTTP Content-Type header value of the message."""
        ct = "multipart/related"
        for name, value in (("type", self.type), ("boundary", self.boundary), ("start", self.start), ("start-info", self.start_info), ("action", self.action)):
            if value is not None:
                ct += _param(name, value) if name != "type" else f'; type="{value}"'
        return ct

    def head(self, headers: Mapping[str, str]) -> bytes:
        """The delimiter and header block that open the next part (call once per part, in order)."""
        lead = "" if self._first else "\r\n"
        self._first = False
        lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        return f"{lead}--{self.boundary}\r\n{lines}\r\n".encode("latin-1")

    def part(self, headers: Mapping[str, str], chunks: Iterable[bytes]) -> Iterator[bytes]:
        """One part: its head, then each non-empty chunk as the iterable produces it."""
        yield self.head(headers)
        for chunk in chunks:
            if chunk:
                yield chunk

    def end(self) -> bytes:
        """The close delimiter."""
        lead = "" if self._first else "\r\n"
        return f"{lead}--{self.boundary}--\r\n".encode("latin-1")
