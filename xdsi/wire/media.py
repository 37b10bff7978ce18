"""Content-Type and Accept header values (RFC 9110 8.3, 12.5.1), parsed one way for every adapter and client.

Built on werkzeug's ``parse_options_header``/``parse_list_header`` so quoted strings, backslash
escapes (quoted-pair) and RFC 2231 parameters are handled as the RFC says, once; the two
hand-written parsers this replaces disagreed on backslashes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from werkzeug.http import parse_list_header, parse_options_header


@dataclass(frozen=True)
class MediaRange:
    """One element of an Accept header: lower-case ``type/subtype`` (wildcards kept), parameters and weight."""

    type: str  # lower-case "type/subtype"
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    def matches(self, media_type: str) -> bool:
        """Whether this range accepts ``media_type`` (lower-case, no parameters): exact, ``type/*`` or ``*/*``."""
        if self.type in ("*/*", media_type):
            return True
        major, _, minor = self.type.partition("/")
        return minor == "*" and media_type.split("/", 1)[0] == major


def parse_content_type(value: str | None) -> tuple[str, dict[str, str]]:
    """``'Multipart/Related; type="a"; boundary=b'`` -> ``('multipart/related', {'type': 'a', 'boundary': 'b'})``.

    The media type and the parameter names are lower-cased, values are unquoted with their
    quoted-pairs resolved; an absent or empty value gives ``("", {})``.
    """
    if not value:
        return "", {}
    media, params = parse_options_header(value)
    return media.strip().lower(), {k.lower(): v for k, v in params.items()}


def parse_accept(header: str | None) -> list[MediaRange]:
    """Media ranges by descending q (stable: equal weights keep the client's order); absent or blank means ``*/*``.

    A range with q=0 (or a q that is not a number) is dropped: the client refuses it.
    """
    if not header or not header.strip():
        return [MediaRange("*/*")]
    ranges: list[MediaRange] = []
    for item in parse_list_header(header):
        media, params = parse_content_type(item)
        if not media:
            continue
        q = 1.0
        if "q" in params:
            try:
                q = float(params.pop("q"))
            except ValueError:
                q = 0.0
        if q > 0:
            ranges.append(MediaRange(media, params, q))
    return sorted(ranges, key=lambda r: -r.q)
