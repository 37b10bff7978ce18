"""Content-Type and Accept parsing (xdsi.wire.media): one parser, RFC 9110 quoted strings and escapes."""

from __future__ import annotations

import pytest

from xdsi.wire.media import MediaRange, parse_accept, parse_content_type


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, ("", {})),
        ("", ("", {})),
        ("Application/DICOM", ("application/dicom", {})),
        ('Multipart/Related; Type="application/dicom"; BOUNDARY=abc', ("multipart/related", {"type": "application/dicom", "boundary": "abc"})),
        # quoted-pair escapes resolved (RFC 9110 5.6.4): the two old parsers disagreed here
        (r'multipart/related; action="urn:a\"b\\c"; boundary="x\y"', ("multipart/related", {"action": 'urn:a"b\\c', "boundary": "xy"})),
        ('multipart/related; start="<a;b,c>"; type="application/xop+xml"', ("multipart/related", {"start": "<a;b,c>", "type": "application/xop+xml"})),
        ('multipart/related; boundary=""', ("multipart/related", {"boundary": ""})),
        ("multipart/related; boundary", ("multipart/related", {})),
        ("text/plain; title*=UTF-8''%E2%82%AC%20rates", ("text/plain", {"title": "\u20ac rates"})),  # RFC 8187
        (";;;", ("", {})),
        # unquoted values run to the next ';' (werkzeug alone would cut them at the first non-token character)
        ("multipart/related; type=application/dicom; boundary=xyz", ("multipart/related", {"type": "application/dicom", "boundary": "xyz"})),
        ("multipart/related; boundary=----=_Part_0_1.2; type=\"application/xop+xml\"", ("multipart/related", {"boundary": "----=_Part_0_1.2", "type": "application/xop+xml"})),
        ("multipart/related; boundary=uuid:0bd2-aa; start=<0.urn:uuid:1@apache.org>", ("multipart/related", {"boundary": "uuid:0bd2-aa", "start": "<0.urn:uuid:1@apache.org>"})),
        ("text/plain; charset = utf-8", ("text/plain", {"charset": "utf-8"})),
    ],
)
def test_parse_content_type(value: str | None, expected: tuple[str, dict[str, str]]) -> None:
    assert parse_content_type(value) == expected


def test_parse_content_type_never_raises_on_garbage() -> None:
    for v in ['"', '; ="', "a/b; x=\"unterminated", "\x00\x7f\xff", "a/b;;;=;=", "=" * 1000, '"' * 999]:
        media, params = parse_content_type(v)
        assert isinstance(media, str) and isinstance(params, dict)


def test_accept_absent_means_anything() -> None:
    assert parse_accept(None) == parse_accept("  ") == [MediaRange("*/*")]


def test_accept_sorted_by_q_stable_and_refusals_dropped() -> None:
    ranges = parse_accept('image/jpeg;q=0.5, application/dicom, image/png; q=0.5, text/html;q=0, image/gif;q=abc, Image/*;q=0.9')
    assert [(r.type, r.q) for r in ranges] == [("application/dicom", 1.0), ("image/*", 0.9), ("image/jpeg", 0.5), ("image/png", 0.5)]


def test_accept_parameters_with_quotes_and_commas() -> None:
    (r1, r2) = parse_accept('multipart/related; type="application/dicom"; transfer-syntax=*, multipart/related; type="application/octet-stream, x"; q=0.2')
    assert r1.type == "multipart/related" and r1.params == {"type": "application/dicom", "transfer-syntax": "*"}
    assert r2.params == {"type": "application/octet-stream, x"} and r2.q == 0.2


@pytest.mark.parametrize(
    "range_, media, ok",
    [("*/*", "image/jpeg", True), ("image/*", "image/jpeg", True), ("image/*", "application/dicom", False), ("image/jpeg", "image/jpeg", True), ("image/jpeg", "image/png", False)],
)
def test_media_range_matches(range_: str, media: str, ok: bool) -> None:
    assert MediaRange(range_).matches(media) is ok


def test_accept_with_unquoted_part_type_and_spaced_q() -> None:
    """WADO-RS clients send ``type=application/dicom`` unquoted; it must not become ``application``."""
    (r1, r2) = parse_accept("multipart/related; type=application/dicom; transfer-syntax=1.2.840.10008.1.2.1, multipart/related; type=application/octet-stream; q = 0.5")
    assert r1.params == {"type": "application/dicom", "transfer-syntax": "1.2.840.10008.1.2.1"} and r1.q == 1.0
    assert r2.params == {"type": "application/octet-stream"} and r2.q == 0.5
