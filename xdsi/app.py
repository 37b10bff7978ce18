"""The HTTP side composed in one place: each protocol adapter built from the archive and mounted.

The adapters do not know each other: ``web`` (WADO-URI, DICOMweb, status) and
``soap`` (the spyne applications of the Imaging Document Source and the ITI-43
repository) are both built here from the same :class:`Archive` and mounted
under their prefixes with werkzeug's ``DispatcherMiddleware`` (which moves the
prefix to ``SCRIPT_NAME``).  Body limits and header hygiene wrap them here too,
so every adapter gets the same ones, and so does the access check
(:mod:`xdsi.web.auth`: who is asking and whether they may), outside them all.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from werkzeug.middleware.dispatcher import DispatcherMiddleware

from xdsi.archive import Archive

WSGIApp = Callable[..., Any]

IDS_PATH = "/xdsi/ImagingDocumentSource"
REPOSITORY_PATH = "/xdsi/DocumentRepository"


def soap_applications(archive: Archive) -> dict[str, Any]:
    """The spyne WSGI applications by mount point (the repository only in ``[xds] mode = integrated``)."""
    from xdsi.soap import ids, repository

    apps = {IDS_PATH: ids.make_application(archive)}
    if archive.settings.xds.mode == "integrated":  # xdsi is the XDS.b repository of its manifests
        apps[REPOSITORY_PATH] = repository.make_application(archive)
    return apps


def make_app(archive: Archive, partitions: Mapping[str, Archive] | None = None) -> WSGIApp:
    """The whole HTTP application; ``partitions``: AE title -> Archive (``None``: open the configured ones)."""
    from xdsi.web.auth import protect
    from xdsi.web.limits import limit_body, safe_headers
    from xdsi.web.mounts import web_mounts
    from xdsi.web.status import not_found, status_app

    limits = archive.settings.http_limits
    if partitions is None:  # opened here rather than in web_mounts: /status reports their routing queues too
        from xdsi.archive.partitions import Partitions

        partitions = Partitions.open(archive)
    web = web_mounts(archive, partitions)
    mounts: dict[str, WSGIApp] = {
        # these take no request body: refused before it is read
        "/status": limit_body(status_app(archive, partitions), 0, "/status"),
        "/wado": limit_body(web["/wado"], 0, "/wado"),
        "/dicomweb": limit_body(web["/dicomweb"], limits.max_stow_bytes, "DICOMweb"),  # STOW-RS; GETs send none
    }
    if archive.settings.jpip.enabled:  # issue 16: JPIP under /jpip (xdsi.jpip.server); a POSTed request is a short form
        from xdsi.jpip.server import make_jpip_app

        mounts["/jpip"] = limit_body(make_jpip_app(archive), 16 * 1024, "JPIP")
    for path, app in soap_applications(archive).items():
        mounts[path] = limit_body(app, limits.max_mtom_bytes, "SOAP")
    # the access check sees every request first: nothing is routed, read or spooled for a requester it refuses
    return safe_headers(protect(DispatcherMiddleware(not_found, mounts), archive))
