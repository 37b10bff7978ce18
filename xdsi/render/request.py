"""One rendering request, parsed once, for every front door (WADO-URI, WADO-RS rendered, WADO-WS RAD-55).

Each front door copies what it received, as strings, into a :class:`RenderRequest`
(WADO-RS maps ``viewport`` and ``window`` onto the same fields); the one parser,
:func:`parse_render_request`, checks every value and returns typed
:class:`RenderParams`, or raises a :class:`~xdsi.render.errors.RenderError`
naming the renderer parameter at fault, which each front door reports in its
own vocabulary.  So a parameter is accepted or refused identically whichever
protocol carried it.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdsi.render.errors import InvalidParameter, UnsupportedParameter
from xdsi.render.params import JPEG, MAX_SIZE, RENDERED_TYPES, parse_annotation, parse_float, parse_int, parse_region
from xdsi.uids import is_valid_uid

CHARSET_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:*;=")


@dataclass(frozen=True)
class RenderRequest:
    """Rendering parameters as received (``None`` when absent); names as in WADO-URI/WADO-WS.

    ``content_types`` is the requester's list in preference order (WADO-URI and
    WADO-RS pass the one type they negotiated).  ``viewport_source`` is the
    WADO-RS ``viewport`` source rectangle ``sx,sy,sw,sh`` in pixels, turned into
    a ``region`` once the image size is known (:meth:`RenderParams.resolved`).
    """

    content_types: tuple[str, ...] = (JPEG,)
    rows: str | None = None
    columns: str | None = None
    region: str | None = None
    window_center: str | None = None
    window_width: str | None = None
    frame_number: str | None = None
    image_quality: str | None = None
    annotation: str | None = None
    presentation_uid: str | None = None
    presentation_series_uid: str | None = None
    anonymize: str | None = None
    charsets: tuple[str, ...] = ()
    viewport_source: str | None = None


@dataclass(frozen=True)
class RenderParams:
    """A checked request: the keyword arguments of :func:`xdsi.render.render` plus what the service resolves."""

    content_type: str
    rows: int | None = None
    columns: int | None = None
    region: tuple[float, float, float, float] | None = None
    window_center: float | None = None
    window_width: float | None = None
    frame_number: int | None = None
    image_quality: int | None = None
    annotation: tuple[str, ...] = ()
    presentation: tuple[str, str] | None = None  # (series UID, SOP Instance UID) of a presentation state
    viewport_source: tuple[float, float, float, float] | None = None

    def render_kwargs(self) -> dict[str, object]:
        return {
            "content_type": self.content_type,
            "rows": self.rows,
            "columns": self.columns,
            "region": self.region,
            "window_center": self.window_center,
            "window_width": self.window_width,
            "frame_number": self.frame_number,
            "image_quality": self.image_quality,
            "annotation": self.annotation,
        }

    def resolved(self, image_rows: int, image_columns: int) -> "RenderParams":
        """The viewport source rectangle (pixels) as a region of an image of this size (PS3.18 8.3.5.1.3)."""
        if self.viewport_source is None:
            return self
        sx, sy, sw, sh = self.viewport_source
        w, h = float(image_columns), float(image_rows)
        if sw <= 0 or sh <= 0 or sx < 0 or sy < 0 or sx + sw > w or sy + sh > h:
            raise InvalidParameter("region", "the viewport source rectangle is outside the image")
        from dataclasses import replace

        return replace(self, region=(sx / w, sy / h, (sx + sw) / w, (sy + sh) / h), viewport_source=None)


def _given(value: str | None) -> str | None:
    return value.strip() if value is not None and value.strip() != "" else None


def parse_render_request(r: RenderRequest) -> RenderParams:
    """Check every parameter of ``r``; raise the RenderError of the first bad one."""
    anonymize = _given(r.anonymize)
    if anonymize is not None:
        if anonymize.lower() == "yes":
            raise UnsupportedParameter("anonymize", "this server does not anonymize")
        raise InvalidParameter("anonymize", f"{anonymize[:40]!r} is not 'yes'")
    wanted = [c.split(";", 1)[0].strip().lower() for c in r.content_types]
    content_type = next((c for c in wanted if c in RENDERED_TYPES), None)
    if content_type is None:
        raise UnsupportedParameter(
            "content_type", f"none of {', '.join(wanted) or '(none)'} can be rendered; use {', '.join(RENDERED_TYPES)}"
        )
    for cs in r.charsets:
        if not cs.strip() or not set(cs.strip()) <= CHARSET_CHARS:
            raise InvalidParameter("charset", f"{cs[:40]!r} is not a character set name")
    p = RenderParams(
        content_type=content_type,
        rows=parse_int(r.rows, "rows", low=1, high=MAX_SIZE),
        columns=parse_int(r.columns, "columns", low=1, high=MAX_SIZE),
        region=parse_region(r.region),
        window_center=parse_float(r.window_center, "window_center"),
        window_width=parse_float(r.window_width, "window_width"),
        image_quality=parse_int(r.image_quality, "image_quality", low=1, high=100),
        frame_number=parse_int(r.frame_number, "frame_number", low=1, high=2**31 - 1),
        annotation=parse_annotation(r.annotation),
        presentation=_presentation(r),
        viewport_source=_viewport_source(r.viewport_source),
    )
    if (p.window_center is None) != (p.window_width is None):
        raise InvalidParameter(
            "window_width" if p.window_width is None else "window_center", "window center and width must be given together"
        )
    if p.window_width is not None and p.window_width <= 0:
        raise InvalidParameter("window_width", "must be positive")
    if p.image_quality is not None and content_type != JPEG:
        raise InvalidParameter("image_quality", f"applies to image/jpeg only, not {content_type}")
    if p.region is not None and p.viewport_source is not None:
        raise InvalidParameter("region", "give a region or a viewport source rectangle, not both")
    return p


def _presentation(r: RenderRequest) -> tuple[str, str] | None:
    uid, series = r.presentation_uid, r.presentation_series_uid
    if uid is None and series is None:
        return None
    if series is None or _given(series) is None:
        raise InvalidParameter("presentation_uid", "a presentation UID needs its presentation series UID")
    if uid is None or _given(uid) is None:
        raise InvalidParameter("presentation_series_uid", "a presentation series UID without a presentation UID")
    uid, series = uid.strip(), series.strip()
    if not is_valid_uid(uid):
        raise InvalidParameter("presentation_uid", f"{uid[:80]!r} is not a valid UID")
    if not is_valid_uid(series):
        raise InvalidParameter("presentation_series_uid", f"{series[:80]!r} is not a valid UID")
    return series, uid


def _viewport_source(value: str | None) -> tuple[float, float, float, float] | None:
    if _given(value) is None:
        return None
    parts = str(value).split(",")
    if len(parts) != 4:
        raise InvalidParameter("region", "the viewport source rectangle is sx,sy,sw,sh")
    try:
        sx, sy, sw, sh = (float(p) for p in parts)
    except ValueError:
        raise InvalidParameter("region", "the viewport source rectangle must be numbers") from None
    return sx, sy, sw, sh
