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

    The media type and the parameter names are lower-cased; quoted values are unquoted with their
    quoted-pairs resolved and RFC 8187 ``name*=`` values decoded (werkzeug).  An unquoted value is
    everything up to the next ``;``, stripped: werkzeug stops at the first non-token character, but
    peers send ``type=application/dicom``, ``boundary=uuid:...`` and ``boundary=----=_Part_1``
    unquoted, and cutting those would refuse (or misframe) requests that every other server reads.
    An absent or empty value gives ``("", {})``.
    """
    if not value:
        return "", {}
    media, parsed = parse_options_header(value)
    params = {k.lower(): v for k, v in parsed.items()}
    for segment in _segments(value)[1:]:
        name, eq, raw = segment.partition("=")
        name, raw = name.strip().lower(), raw.strip()
        if not eq or not name or name.endswith("*"):
            continue
        if raw.startswith('"'):
            params.setdefault(name, raw.strip('"'))  # werkzeug's unescaped value when it could read the quoted string
        else:
            params[name] = raw
    return media.strip().lower(), params


def _segments(value: str) -> list[str]:
    """``value`` split at each ``;`` outside a quoted string (a backslash escapes the next character inside one)."""
    out, cur, quoted, escaped = [], [], False, False
    for ch in value:
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ";" and not quoted:
            out.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur))
    return out


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
