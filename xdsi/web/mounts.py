"""Mount points of the web adapters, with partition routing.

``/wado`` and ``/dicomweb`` serve the main archive; ``/wado/{AET}`` and
``/dicomweb/{AET}/...`` serve the partition with that AE title (the main AE
title works too).  Each partition has its own :class:`Archive`, so the
adapters behind a prefix can only ever see that partition's data.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

from xdsi.archive import Archive
from xdsi.web.cors import with_cors
from xdsi.web.dicomweb import DicomWebApp
from xdsi.wire.errors import HttpError
from xdsi.web.wado_uri import WadoUriApp

WSGIApp = Callable[..., Any]


class PartitionRouter:
    """Strips a leading ``/{AET}`` naming a partition and hands the request to that partition's app."""

    def __init__(self, default: WSGIApp, by_aet: Mapping[str, WSGIApp]) -> None:
        self.default = default
        self.by_aet = dict(by_aet)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "") or ""
        segment, _, rest = path.lstrip("/").partition("/")
        if segment and segment in self.by_aet:
            environ = dict(environ)
            environ["SCRIPT_NAME"] = environ.get("SCRIPT_NAME", "") + "/" + segment
            environ["PATH_INFO"] = "/" + rest if rest else ""
            return self.by_aet[segment](environ, start_response)
        return self.default(environ, start_response)


def _error_app(status: int, reason: str) -> WSGIApp:
    return lambda environ, start_response: HttpError(status, reason).response()(environ, start_response)


def web_mounts(archive: Archive, partitions: Mapping[str, Archive] | None = None) -> dict[str, WSGIApp]:
    """``partitions``: AE title -> Archive (the main archive may be included); ``None`` opens the configured ones."""
    if partitions is None:
        from xdsi.archive.partitions import Partitions

        partitions = Partitions.open(archive)
    wado = {aet: WadoUriApp(a) for aet, a in partitions.items()}
    dicomweb = {aet: DicomWebApp(a) for aet, a in partitions.items()}
    main_aet = archive.settings.ae_title
    wado.setdefault(main_aet, WadoUriApp(archive))
    dicomweb.setdefault(main_aet, DicomWebApp(archive))
    origins = archive.settings.cors_origins  # CORS on every answer of both, errors included; off by default
    return {
        # /wado/{unknown} is a 404, not the main archive
        "/wado": with_cors(PartitionRouter(_only_root(wado[main_aet]), wado), origins),
        "/dicomweb": with_cors(PartitionRouter(dicomweb[main_aet], dicomweb), origins),
    }


def _only_root(app: WSGIApp) -> WSGIApp:
    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if (environ.get("PATH_INFO") or "/") not in ("", "/"):
            return _error_app(404, "no such partition")(environ, start_response)
        return app(environ, start_response)

    return wrapped
