"""The HTTP front door: one WSGI application that mounts each protocol adapter under its prefix.

Adapters register themselves in :func:`make_app`; each is a plain WSGI
application that receives the request with its prefix still in ``PATH_INFO``
(werkzeug's ``DispatcherMiddleware`` moves it to ``SCRIPT_NAME``).
"""

from __future__ import annotations

import json
from typing import Any, Callable

from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.wrappers import Request, Response

from xdsi import __version__
from xdsi.archive import Archive
from xdsi.archive.lifecycle import archive_status
from xdsi.dimse.spool import spool_usage

WSGIApp = Callable[..., Any]


def status_app(archive: Archive) -> WSGIApp:
    """``GET /status``: the same figures as ``xdsi status``, as JSON, for monitoring."""

    @Request.application
    def app(request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return Response("method not allowed\n", status=405, headers={"Allow": "GET, HEAD"})
        st = archive_status(archive.index, archive.tiers)
        spool = spool_usage(archive.settings.temp_dir)
        body = {
            "version": __version__,
            "ae_title": archive.settings.ae_title,
            "patients": st.patients,
            "studies": st.studies,
            "series": st.series,
            "instances": st.instances,
            "tiers": {name: {"bytes": st.tier_bytes[name], "files": st.tier_files[name]} for name in st.tier_bytes},
            # transfers in progress (and any a failed transfer left): should drain to 0 when idle
            "spool": {"bytes": spool.bytes, "files": spool.files},
        }
        return Response(json.dumps(body, indent=2) + "\n", mimetype="application/json")

    return app


def not_found(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
    return [b"not found\n"]


def make_app(archive: Archive, partitions: Any = None) -> WSGIApp:
    mounts: dict[str, WSGIApp] = {"/status": status_app(archive)}
    # WADO-URI at /wado[/{AET}], DICOMweb at /dicomweb[/{AET}]; partitions: AE title -> Archive (None: open the configured ones)
    from xdsi.web.mounts import web_mounts
    from xdsi.soap.ids import make_application as make_ids_application

    from xdsi.web.limits import limit_body, safe_headers

    limits = archive.settings.http_limits
    web = web_mounts(archive, partitions)
    mounts["/wado"] = web["/wado"]
    mounts["/dicomweb"] = limit_body(web["/dicomweb"], limits.max_stow_bytes, "DICOMweb")  # STOW-RS; GETs send none
    mounts["/xdsi/ImagingDocumentSource"] = limit_body(make_ids_application(archive), limits.max_mtom_bytes, "SOAP")
    if archive.settings.xds.mode == "integrated":  # issue 4: xdsi is the XDS.b repository of its manifests
        from xdsi.soap.repository import make_application as make_repository_application

        mounts["/xdsi/DocumentRepository"] = limit_body(make_repository_application(archive), limits.max_mtom_bytes, "SOAP")
    for prefix in ("/status", "/wado"):  # these take no request body: refused before it is read
        mounts[prefix] = limit_body(mounts[prefix], 0, prefix)
    return safe_headers(DispatcherMiddleware(not_found, mounts))
