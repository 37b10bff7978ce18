"""HTTP plumbing shared by the web adapters: errors with reasons, Accept parsing, multipart in and out."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from werkzeug.wrappers import Response

STREAM_CHUNK = 1 << 16
MAX_PART_HEADER = 16 * 1024


class HttpError(Exception):
    """An error answer: status and a short reason (sent as text and in a ``Warning: 299`` header, PS3.18 8.6.1)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason

    def response(self) -> Response:
        reason = self.reason.replace("\r", " ").replace("\n", " ")
        r = Response(reason + "\n", status=self.status, mimetype="text/plain")
        r.headers["Warning"] = warning_value(reason)
        return r


class MalformedBody(HttpError):
    """400: the request body's transfer framing is broken (e.g. a bad chunk size), found while reading it."""

    def __init__(self, reason: str) -> None:
        super().__init__(400, reason)


class RequestTooLarge(HttpError):
    """413: a request body (or its part count) over the endpoint's configured maximum, found while streaming it."""

    def __init__(self, reason: str) -> None:
        super().__init__(413, reason)


def header_text(text: str) -> str:
    """``text`` made safe for an HTTP header value: ASCII only, no control characters.

    Header values go on the wire as Latin-1 (PEP 3333), and a reason may echo
    anything a client sent (a UID in Arabic-Indic digits made cheroot answer
    500), so each non-ASCII character is written as ``U+XXXX``: readable, and
    no backslash to clash with quoted-string escapes.
    """
    return "".join(c if 0x20 <= ord(c) < 0x7F else (" " if ord(c) < 0x20 or ord(c) == 0x7F else f"U+{ord(c):04X}") for c in text)


def warning_value(reason: str, code: int = 299) -> str:
    """A ``Warning`` header value (RFC 7234 5.5, PS3.18 8.6.1): ``299 xdsi "reason"``, ASCII, at most ~200 characters."""
    return f'{code} xdsi "{header_text(reason)[:200].replace(chr(34), chr(39)).replace(chr(92), chr(92) * 2)}"'


@dataclass(frozen=True)
class MediaRange:
    type: str  # lower-case "type/subtype"
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    def matches(self, media_type: str) -> bool:
        if self.type in ("*/*", media_type):
            return True
        major, _, minor = self.type.partition("/")
        return minor == "*" and media_type.split("/", 1)[0] == major


def _split_params(text: str) -> list[str]:
    """Split on ';' or ',' outside double quotes."""
    out, cur, quoted = [], [], False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch in ";," and not quoted:
            out.append("".join(cur))
            out.append(ch)
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


def parse_accept(header: str | None) -> list[MediaRange]:
    """Media ranges by descending q (stable); an absent header means ``*/*``."""
    if not header or not header.strip():
        return [MediaRange("*/*")]
    ranges: list[MediaRange] = []
    tokens = _split_params(header)
    current: list[str] = []

    def flush() -> None:
        if not current or not current[0].strip():
            return
        mt = current[0].strip().lower()
        params: dict[str, str] = {}
        q = 1.0
        for p in current[1:]:
            k, _, v = p.partition("=")
            k, v = k.strip().lower(), v.strip().strip('"')
            if k == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
            elif k:
                params[k] = v
        if q > 0:
            ranges.append(MediaRange(mt, params, q))

    for t in tokens:
        if t == ",":
            flush()
            current = []
        elif t != ";":
            current.append(t)
    flush()
    return sorted(ranges, key=lambda r: -r.q)


def parse_content_type(value: str | None) -> tuple[str, dict[str, str]]:
    if not value:
        return "", {}
    parts = [p for p in _split_params(value) if p not in (";", ",")]
    params = {}
    for p in parts[1:]:
        k, _, v = p.partition("=")
        if k.strip():
            params[k.strip().lower()] = v.strip().strip('"')
    return parts[0].strip().lower(), params


# -- multipart/related out -----------------------------------------------------------------------


class MultipartWriter:
    """Streams ``multipart/related`` parts; each part is an iterable of byte chunks."""

    def __init__(self, part_type: str) -> None:
        self.boundary = uuid.uuid4().hex
        self.part_type = part_type

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="{self.part_type}"; boundary={self.boundary}'

    def part(self, chunks: Iterable[bytes], content_type: str, extra: dict[str, str] | None = None) -> Iterator[bytes]:
        head = f"--{self.boundary}\r\nContent-Type: {content_type}\r\n"
        for k, v in (extra or {}).items():
            head += f"{k}: {v}\r\n"
        yield (head + "\r\n").encode("ascii")
        yield from chunks
        yield b"\r\n"

    def end(self) -> bytes:
        return f"--{self.boundary}--\r\n".encode("ascii")


# -- multipart/related in ------------------------------------------------------------------------


class MultipartError(ValueError):
    pass


def spool_parts(stream: BinaryIO, boundary: str, spool_dir: Path) -> Iterator[tuple[dict[str, str], Path]]:
    """Yield (part headers, spooled file) one part at a time, reading the body in chunks.

    The caller owns each file once it is yielded (and must remove it); the
    next part is not read until the caller asks, so at most one part is on
    disk and one chunk in memory.
    """
    if not boundary or len(boundary) > 200:
        raise MultipartError("missing or invalid multipart boundary")
    delim = b"--" + boundary.encode("latin-1")
    body_delim = b"\r\n" + delim
    buf = b""
    eof = False

    def fill() -> bool:
        nonlocal buf, eof
        if eof:
            return False
        chunk = stream.read(STREAM_CHUNK)
        if not chunk:
            eof = True
            return False
        buf += chunk
        return True

    # preamble: up to the first delimiter
    while True:
        i = buf.find(delim)
        if i >= 0 and (i == 0 or buf[i - 2 : i] == b"\r\n"):
            buf = buf[i + len(delim) :]
            break
        if len(buf) > len(delim):
            buf = buf[-len(delim) :]
        if not fill():
            raise MultipartError("no multipart boundary found in the body")
    while True:
        while len(buf) < 2 and fill():
            pass
        if buf.startswith(b"--"):
            return  # close delimiter
        # transport padding then CRLF ends the delimiter line; the header block ends at the next blank line
        while True:
            eol = buf.find(b"\r\n")
            end = buf.find(b"\r\n\r\n", eol) if eol >= 0 else -1
            if end >= 0:
                break
            if len(buf) > MAX_PART_HEADER:
                raise MultipartError("multipart part headers too large")
            if not fill():
                raise MultipartError("truncated multipart part headers")
        head = buf[eol + 2 : end] if end > eol else b""
        buf = buf[end + 4 :]
        headers: dict[str, str] = {}
        for line in head.decode("latin-1").split("\r\n"):
            k, sep, v = line.partition(":")
            if sep:
                headers[k.strip().lower()] = v.strip()
        fd, name = _temp(spool_dir)
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                while True:
                    i = buf.find(body_delim)
                    if i >= 0:
                        out.write(buf[:i])
                        buf = buf[i + len(body_delim) :]
                        break
                    keep = len(body_delim)
                    if len(buf) > keep:
                        out.write(buf[:-keep])
                        buf = buf[-keep:]
                    if not fill():
                        raise MultipartError("truncated multipart body: closing boundary missing")
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        yield headers, path


def _temp(spool_dir: Path) -> tuple[int, str]:
    import tempfile

    spool_dir.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(prefix="stow-", suffix=".part", dir=spool_dir)
