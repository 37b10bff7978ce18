"""``GET /status`` and the 404 of unknown paths: the small HTTP answers that belong to no protocol."""

from __future__ import annotations

import json
from typing import Any, Callable

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
