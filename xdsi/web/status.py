"""``GET /status`` and the 404 of unknown paths: the small HTTP answers that belong to no protocol."""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, Mapping

from werkzeug.wrappers import Request, Response

from xdsi import __version__
from xdsi.archive import Archive
from xdsi.archive.lifecycle import archive_status
from xdsi.dimse.spool import spool_usage

WSGIApp = Callable[..., Any]
log = logging.getLogger(__name__)


def _routing(archive: Archive) -> dict[str, Any] | None:
    """The archive's routing queue (xdsi.routing.status), or None if it cannot be read now (the rest is still answered)."""
    from xdsi.routing.status import queue_status

    try:
        return queue_status(archive.index, archive.settings)
    except Exception:
        log.exception("/status: routing queue of %s not readable", archive.settings.ae_title)
        return None


def status_app(archive: Archive, partitions: Mapping[str, Archive] | None = None) -> WSGIApp:
    """``GET /status``: the same figures as ``xdsi status``, as JSON, for monitoring.

    ``routing``: the [[routes]] queue, depth and failures per destination; ``partitions``: the same
    for each partition (AE title -> {"routing": ...}), each having an index and queue of its own."""

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
            "tiers": {name: {"bytes": st.tier_bytes[name], "files": st.tier_files[name],
                             # issue 16: copies stored losslessly compressed and the bytes that saves
                             "compressed_files": st.tier_compressed.get(name, 0), "bytes_saved": st.tier_saved.get(name, 0)}
                      for name in st.tier_bytes},
            # transfers in progress (and any a failed transfer left): should drain to 0 when idle
            "spool": {"bytes": spool.bytes, "files": spool.files},
            "routing": _routing(archive),
        }
        others = {aet: a for aet, a in (partitions or {}).items() if a is not archive and aet != archive.settings.ae_title}
        if others:
            body["partitions"] = {aet: {"routing": _routing(a)} for aet, a in sorted(others.items())}
        return Response(json.dumps(body, indent=2) + "\n", mimetype="application/json")

    return app


def not_found(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
    return [b"not found\n"]
