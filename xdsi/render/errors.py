"""Why a rendering request was refused, carrying the request parameter at fault.

Each front door maps these to its own protocol: WADO-URI and WADO-RS to HTTP
400/406, the SOAP rendered retrieval (RAD-55 WADO-WS) to its own error codes.
``parameter`` uses the renderer's keyword names (``rows``, ``region``,
``window_center`` ...), never a protocol's spelling, so each adapter keeps its
own mapping.
"""

from __future__ import annotations


class RenderError(ValueError):
    """Base class: the image cannot be rendered as asked."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(f"{parameter}: {message}")
        self.parameter = parameter
        self.message = message


class InvalidParameter(RenderError):
    """A parameter value is malformed or out of range (HTTP 400)."""


class UnsupportedParameter(RenderError):
    """A well-formed value this renderer does not support, e.g. an unknown output media type (HTTP 406 for content_type)."""


class NotRenderable(RenderError):
    """The object itself cannot be rendered (no pixel data, undecodable transfer syntax); ``parameter`` is ``"object"``."""


__all__ = ["RenderError", "InvalidParameter", "UnsupportedParameter", "NotRenderable"]
