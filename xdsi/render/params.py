"""Parsing of the textual rendering parameters shared by WADO-URI (PS3.18 6.2) and WADO-WS (RAD-55).

Both front doors receive strings; parsing them here keeps the accepted syntax
and the error messages identical on both.
"""

from __future__ import annotations

from typing import Iterable

from xdsi.render.errors import InvalidParameter, UnsupportedParameter

JPEG = "image/jpeg"
PNG = "image/png"
GIF = "image/gif"
RENDERED_TYPES = (JPEG, PNG, GIF)
ANNOTATIONS = ("patient", "technique")
MAX_SIZE = 8192  # largest rows/columns we render: bounds the memory one request can take


def parse_int(value: str | int | None, parameter: str, *, low: int, high: int) -> int | None:
    if value is None or value == "":
        return None
    try:
        n = int(str(value).strip())
    except ValueError:
        raise InvalidParameter(parameter, f"{value!r} is not an integer") from None
    if not low <= n <= high:
        raise InvalidParameter(parameter, f"{n} is outside {low}..{high}")
    return n


def parse_float(value: str | float | None, parameter: str) -> float | None:
    if value is None or value == "":
        return None
    try:
        f = float(str(value).strip())
    except ValueError:
        raise InvalidParameter(parameter, f"{value!r} is not a number") from None
    if f != f or f in (float("inf"), float("-inf")):
        raise InvalidParameter(parameter, f"{value!r} is not a finite number")
    return f


def parse_region(value: str | Iterable[float] | None) -> tuple[float, float, float, float] | None:
    """``"xmin,ymin,xmax,ymax"`` as fractions 0..1 of the image, xmin < xmax, ymin < ymax."""
    if value is None or value == "":
        return None
    parts: list[object] = str(value).split(",") if isinstance(value, str) else list(value)
    if len(parts) != 4:
        raise InvalidParameter("region", "needs four numbers xmin,ymin,xmax,ymax")
    try:
        x0, y0, x1, y1 = (float(str(p).strip()) for p in parts)
    except ValueError:
        raise InvalidParameter("region", f"{value!r} is not four numbers") from None
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise InvalidParameter("region", "values must satisfy 0 <= xmin < xmax <= 1 and 0 <= ymin < ymax <= 1")
    return (x0, y0, x1, y1)


def parse_annotation(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"patient,technique"``: which text to burn into the image."""
    if value is None or value == "":
        return ()
    items = str(value).split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:
        a = item.strip().lower()
        if a not in ANNOTATIONS:
            raise InvalidParameter("annotation", f"{item!r} is not one of {', '.join(ANNOTATIONS)}")
        if a not in out:
            out.append(a)
    return tuple(out)


def check_content_type(value: str) -> str:
    ct = value.split(";", 1)[0].strip().lower()
    if ct not in RENDERED_TYPES:
        raise UnsupportedParameter("content_type", f"{value!r} cannot be rendered; use one of {', '.join(RENDERED_TYPES)}")
    return ct


__all__ = [
    "JPEG",
    "PNG",
    "GIF",
    "RENDERED_TYPES",
    "ANNOTATIONS",
    "MAX_SIZE",
    "parse_int",
    "parse_float",
    "parse_region",
    "parse_annotation",
    "check_content_type",
]
