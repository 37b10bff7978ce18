"""The one renderer shared by WADO-URI, WADO-RS rendered and the SOAP rendered retrieval (RAD-55).

API (stable)::

    render(path_or_dataset, *, content_type="image/jpeg", rows=None, columns=None,
           region=None, window_center=None, window_width=None, frame_number=None,
           image_quality=None, annotation=(), presentation_state=None) -> bytes

Errors are :class:`RenderError` subclasses with ``.parameter`` naming the bad
argument: :class:`InvalidParameter` (bad value), :class:`UnsupportedParameter`
(e.g. a content type we cannot produce), :class:`NotRenderable` (the object
has no decodable pixel data).  :mod:`xdsi.render.params` parses the textual
WADO forms (``parse_region``, ``parse_annotation``, ``parse_int``,
``parse_float``) with the same errors.
"""

from xdsi.render.errors import InvalidParameter, NotRenderable, RenderError, UnsupportedParameter
from xdsi.render.params import GIF, JPEG, PNG, RENDERED_TYPES, parse_annotation, parse_float, parse_int, parse_region
from xdsi.render.renderer import render, target_size

__all__ = [
    "render",
    "target_size",
    "RenderError",
    "InvalidParameter",
    "UnsupportedParameter",
    "NotRenderable",
    "JPEG",
    "PNG",
    "GIF",
    "RENDERED_TYPES",
    "parse_region",
    "parse_annotation",
    "parse_int",
    "parse_float",
]
