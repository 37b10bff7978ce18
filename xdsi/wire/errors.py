"""HTTP errors with a reason: raised anywhere a request is read, answered by the adapter that owns it.

They live below the adapters because the body readers (multipart, MTOM, the body-limit wrapper) find
these problems while streaming, long after routing, and every adapter answers them the same way.
"""

from __future__ import annotations

from werkzeug.wrappers import Response


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
