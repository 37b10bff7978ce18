"""Per-endpoint request-body limits and safe response headers, as WSGI middleware around every mount.

Why here and not in cheroot: cheroot has one ``max_request_body_size`` for
the whole server, and STOW-RS may legitimately send gigabytes where
``/status`` takes nothing.  Each mount gets its own maximum:

* a declared Content-Length above it is answered 413 before one body byte is
  read (and the HTTP server closes the connection rather than drain it, see
  :mod:`xdsi.web.httpd`);
* a chunked body is counted while the application streams it, and the read
  that passes the maximum raises :class:`RequestTooLarge` (413);
* a resource that takes no body (maximum 0) refuses any body with 413.

How fast a body must arrive is not decided here but in the HTTP server
(:mod:`xdsi.web.httpd`, ``[http] min_body_rate``), which alone sees the
socket; a body too slow surfaces in the application as :class:`BodyTooSlow`
from a ``wsgi.input`` read, and the server answers 408 and closes.

Every response header is also passed through :func:`header_text`, so no
adapter can make the server emit a non-Latin-1 header (a 500 from cheroot).
"""

from __future__ import annotations

import logging
from typing import Any, BinaryIO, Callable, Iterable

from xdsi.wire.errors import HttpError, MalformedBody, RequestTooLarge, header_text

log = logging.getLogger(__name__)

WSGIApp = Callable[..., Any]


class BodyTooSlow(MalformedBody):
    """408: the request body arrived slower than ``[http] min_body_rate``; raised from a ``wsgi.input`` read.

    A :class:`MalformedBody` so every adapter's existing "the body itself is
    bad" path (spool cleanup, a Sender fault for SOAP) handles it without
    knowing about rates; the HTTP server makes the status 408 and closes the
    connection whatever the adapter answered (:class:`xdsi.web.httpd.GuardedRequest`).
    """

    def __init__(self, reason: str) -> None:
        HttpError.__init__(self, 408, reason)


class LimitedInput:
    """``wsgi.input`` that raises :class:`RequestTooLarge` once more than ``limit`` bytes have been read."""

    def __init__(self, stream: BinaryIO, limit: int, what: str) -> None:
        self.stream = stream
        self.limit = limit
        self.what = what
        self.count = 0

    def _account(self, data: bytes) -> bytes:
        self.count += len(data)
        if self.count > self.limit:
            raise RequestTooLarge(f"{self.what} request body larger than {self.limit} bytes")
        return data

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:  # never an unbounded read: at most one byte past the limit
            size = self.limit - self.count + 1
        try:
            return self._account(self.stream.read(size))
        except ValueError as exc:  # cheroot's ChunkedRFile: "Bad chunked transfer size", ...
            raise MalformedBody(f"malformed request body: {exc}") from None

    def readline(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = self.limit - self.count + 1
        try:
            return self._account(self.stream.readline(size))
        except ValueError as exc:
            raise MalformedBody(f"malformed request body: {exc}") from None

    def __iter__(self) -> Any:
        while True:
            line = self.readline(64 * 1024)
            if not line:
                return
            yield line


def _declared_length(environ: dict[str, Any]) -> int | None:
    raw = (environ.get("CONTENT_LENGTH") or "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        return None


def has_body(environ: dict[str, Any]) -> bool:
    n = _declared_length(environ)
    return bool(n) or "chunked" in (environ.get("HTTP_TRANSFER_ENCODING") or "").lower()


def limit_body(app: WSGIApp, limit: int, what: str) -> WSGIApp:
    """Wrap ``app`` so its request body is at most ``limit`` bytes (0: it takes no body)."""

    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if has_body(environ):
            declared = _declared_length(environ)
            if limit == 0:
                return _refuse(HttpError(413, f"{what} takes no request body"), environ, start_response)
            if declared is not None and declared > limit:
                return _refuse(RequestTooLarge(f"{what} request body of {declared} bytes is larger than the maximum of {limit}"), environ, start_response)
            environ["wsgi.input"] = LimitedInput(environ["wsgi.input"], limit, what)
        try:
            return app(environ, start_response)
        except (RequestTooLarge, MalformedBody) as exc:  # raised while the application read the body, before it answered
            return _refuse(exc, environ, start_response)

    wrapped.__wrapped__ = app  # type: ignore[attr-defined]  # what is mounted, for inspection
    return wrapped


def _refuse(exc: HttpError, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    log.info("%s %s refused: %s", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"), exc.reason)
    return exc.response()(environ, start_response)  # the unread rest of the body is not drained (xdsi.web.httpd)


def safe_headers(app: WSGIApp) -> WSGIApp:
    """Make every response header value ASCII (see :func:`xdsi.wire.errors.header_text`)."""

    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        def sr(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            clean = [(k, v if _is_safe(v) else header_text(v)) for k, v in headers]
            return start_response(status, clean, exc_info) if exc_info is not None else start_response(status, clean)

        return app(environ, sr)

    wrapped.__wrapped__ = app  # type: ignore[attr-defined]
    return wrapped


def _is_safe(value: str) -> bool:
    return value.isascii() and all(0x20 <= ord(c) < 0x7F or c == "\t" for c in value)
