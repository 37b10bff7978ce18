"""CORS for the web adapters: a viewer served from another origin (OHIF) may call DICOMweb and WADO-URI.

Off unless ``[http] cors_origins`` names origins (or ``["*"]``).  For an
allowed ``Origin`` every response gets ``Access-Control-Allow-Origin`` (and
``Expose-Headers``, so a script can read Content-Range, Warning and Location),
errors included, since the status line and the reason of a refusal are what
a viewer needs to show; a preflight ``OPTIONS`` is answered here, before the
adapter, which knows nothing of CORS.  A request from an origin not on the
list gets no CORS headers, so the browser withholds the answer from the script.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

WSGIApp = Callable[..., Any]

ALLOW_METHODS = "GET, HEAD, POST, OPTIONS"
ALLOW_HEADERS = ("Accept", "Content-Type", "Authorization", "Range")
EXPOSE_HEADERS = "Content-Type, Content-Length, Content-Range, Warning, Location"
MAX_AGE = "600"


class Cors:
    """WSGI middleware adding the CORS response headers for the configured origins."""

    def __init__(self, app: WSGIApp, origins: Sequence[str]) -> None:
        self.app = app
        self.any = "*" in origins
        self.origins = frozenset(o.rstrip("/").lower() for o in origins if o != "*")

    def allowed(self, origin: str | None) -> str | None:
        """The Access-Control-Allow-Origin value for ``origin``, or None when it is not allowed."""
        if not origin:
            return None
        if self.any:
            return "*"
        return origin if origin.rstrip("/").lower() in self.origins else None

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        allow = self.allowed(environ.get("HTTP_ORIGIN"))
        if allow is None:
            return self.app(environ, start_response)
        common = [("Access-Control-Allow-Origin", allow), ("Vary", "Origin")]
        if environ.get("REQUEST_METHOD") == "OPTIONS" and environ.get("HTTP_ACCESS_CONTROL_REQUEST_METHOD"):
            requested = [h.strip() for h in environ.get("HTTP_ACCESS_CONTROL_REQUEST_HEADERS", "").split(",") if h.strip()]
            headers = list(ALLOW_HEADERS) + [h for h in requested if h.lower() not in {a.lower() for a in ALLOW_HEADERS}]
            start_response(
                "204 No Content",
                common
                + [
                    ("Access-Control-Allow-Methods", ALLOW_METHODS),
                    ("Access-Control-Allow-Headers", ", ".join(headers)),
                    ("Access-Control-Max-Age", MAX_AGE),
                    ("Content-Length", "0"),
                ],
            )
            return [b""]

        def with_cors(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            names = {k.lower() for k, _v in headers}
            extra = [(k, v) for k, v in common if k.lower() not in names or k == "Vary"]
            extra.append(("Access-Control-Expose-Headers", EXPOSE_HEADERS))
            return start_response(status, list(headers) + extra, exc_info) if exc_info else start_response(status, list(headers) + extra)

        return self.app(environ, with_cors)


def with_cors(app: WSGIApp, origins: Sequence[str]) -> WSGIApp:
    """``app`` itself when no origin is configured (the default), else wrapped."""
    return Cors(app, origins) if origins else app
