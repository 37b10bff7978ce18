"""WADO-URI (PS3.18 9, formerly Part 18 section 6): one object per GET, as stored DICOM or rendered.

Rendering goes through :func:`xdsi.render.render`, the renderer the SOAP
rendered retrieval also uses; presentation states named by
``presentationUID``/``presentationSeriesUID`` are applied.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

from pydicom import dcmread
from werkzeug.wrappers import Request, Response

from xdsi.archive import Archive, content
from xdsi.archive.retrieve import NotAvailable
from xdsi.render import (
    InvalidParameter,
    NotRenderable,
    RenderError,
    UnsupportedParameter,
    parse_annotation,
    parse_float,
    parse_int,
    parse_region,
    render,
)
from xdsi.render.params import JPEG, MAX_SIZE, RENDERED_TYPES
from xdsi.uids import InvalidUID, validate_uid
from xdsi.web import media
from xdsi.web.http import HttpError, parse_accept

log = logging.getLogger(__name__)

_RENDER_ONLY = ("rows", "columns", "region", "windowCenter", "windowWidth", "frameNumber", "imageQuality", "annotation",
                "presentationUID", "presentationSeriesUID")  # fmt: skip
# WADO-URI parameter name -> renderer parameter name, for error messages in the client's own terms
_PARAM_NAMES = {"rows": "rows", "columns": "columns", "region": "region", "window_center": "windowCenter",
                "window_width": "windowWidth", "frame_number": "frameNumber", "image_quality": "imageQuality",
                "annotation": "annotation", "content_type": "contentType", "object": "objectUID"}  # fmt: skip


def _content_types(request: Request) -> list[str]:
    """The contentType list in preference order (PS3.18 9.1.1.2: comma-separated, may carry q values)."""
    raw = request.args.get("contentType")
    if raw:
        return [r.type for r in parse_accept(raw)]
    return []


class WadoUriApp:
    def __init__(self, archive: Archive) -> None:
        self.archive = archive

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        return self.wsgi(environ, start_response)

    @Request.application
    def wsgi(self, request: Request) -> Response:
        try:
            if request.method not in ("GET", "HEAD"):
                r = HttpError(405, "WADO-URI takes GET").response()
                r.headers["Allow"] = "GET, HEAD"
                return r
            return self.handle(request)
        except HttpError as exc:
            return exc.response()

    def handle(self, request: Request) -> Response:
        args = request.args
        if args.get("requestType") != "WADO":
            raise HttpError(400, "requestType must be WADO")
        try:
            study = validate_uid(_required(args, "studyUID"), "studyUID")
            series = validate_uid(_required(args, "seriesUID"), "seriesUID")
            sop = validate_uid(_required(args, "objectUID"), "objectUID")
        except InvalidUID as exc:
            raise HttpError(400, str(exc)) from None
        if args.get("anonymize"):
            raise HttpError(400, "anonymize is not supported by this server")
        explicit = _content_types(request)
        accept = parse_accept(request.headers.get("Accept"))
        wanted = explicit or [JPEG]
        supported = [t for t in wanted if t in RENDERED_TYPES or t == media.DICOM or t in ("*/*", "image/*")]
        if not supported:
            raise HttpError(406, f"contentType {','.join(wanted)} is not available; use application/dicom or {', '.join(RENDERED_TYPES)}")
        refs = self.archive.retrieve.select(study_uids=[study], series_uids=[series], sop_uids=[sop])
        if not refs:
            raise HttpError(404, "no such object in this archive")
        ref = refs[0]
        try:
            path = self.archive.retrieve.path(ref)
        except NotAvailable as exc:
            raise HttpError(404, str(exc)) from None
        ct = supported[0]
        if ct == "*/*":
            ct = JPEG
        elif ct == "image/*":
            ct = JPEG
        if ct == media.DICOM:
            if not any(r.matches(media.DICOM) for r in accept):
                raise HttpError(406, "the Accept header excludes application/dicom")
            return self.dicom(request, ref, path)
        if not any(r.matches(ct) for r in accept):
            raise HttpError(406, f"the Accept header excludes {ct}")
        if args.get("transferSyntax"):
            raise HttpError(400, "transferSyntax applies to contentType application/dicom only")
        try:
            return self.rendered(request, ct, ref, path)
        except NotRenderable as exc:
            if not explicit:  # default content type for a non-image object is application/dicom
                return self.dicom(request, ref, path)
            raise HttpError(400, f"objectUID: {exc.message}") from None

    def dicom(self, request: Request, ref: Any, path: Any) -> Response:
        bad = [p for p in _RENDER_ONLY if request.args.get(p)]
        if bad:
            raise HttpError(400, f"{', '.join(bad)} cannot be used with contentType application/dicom")
        want = request.args.get("transferSyntax") or media.DEFAULT_TRANSFER_SYNTAX
        try:
            want = validate_uid(want, "transferSyntax")
        except InvalidUID as exc:
            raise HttpError(400, str(exc)) from None
        headers = {"Content-Disposition": f'inline; filename="{ref.sop_instance_uid}.dcm"'}
        if want == ref.transfer_syntax_uid:
            return Response(content.file_chunks(path), status=200, mimetype=media.DICOM, headers={**headers, "Content-Length": str(path.stat().st_size)})
        if not content.can_transcode(ref.transfer_syntax_uid, want):
            raise HttpError(406, f"the object is stored in {ref.transfer_syntax_uid} and cannot be sent in {want}")
        try:
            data = content.transcode(path, want)
        except content.ContentError as exc:
            raise HttpError(406, str(exc)) from None
        return Response(data, status=200, mimetype=media.DICOM, headers=headers)

    def rendered(self, request: Request, ct: str, ref: Any, path: Any) -> Response:
        args = request.args
        try:
            ps = self._presentation_state(args.get("presentationUID"), args.get("presentationSeriesUID"), ref.study_uid)
            data = render(
                path,
                content_type=ct,
                rows=parse_int(args.get("rows"), "rows", low=1, high=MAX_SIZE),
                columns=parse_int(args.get("columns"), "columns", low=1, high=MAX_SIZE),
                region=parse_region(args.get("region")),
                window_center=parse_float(args.get("windowCenter"), "window_center"),
                window_width=parse_float(args.get("windowWidth"), "window_width"),
                frame_number=parse_int(args.get("frameNumber"), "frame_number", low=1, high=2**31 - 1),
                image_quality=parse_int(args.get("imageQuality"), "image_quality", low=1, high=100),
                annotation=parse_annotation(args.get("annotation")),
                presentation_state=ps,
            )
        except NotRenderable:
            raise
        except UnsupportedParameter as exc:
            raise HttpError(406, f"{_PARAM_NAMES.get(exc.parameter, exc.parameter)}: {exc.message}") from None
        except (InvalidParameter, RenderError) as exc:
            raise HttpError(400, f"{_PARAM_NAMES.get(exc.parameter, exc.parameter)}: {exc.message}") from None
        return Response(data, status=200, mimetype=ct)

    def _presentation_state(self, uid: str | None, series: str | None, study: str):  # type: ignore[no-untyped-def]
        if not uid and not series:
            return None
        if not (uid and series):
            raise HttpError(400, "presentationUID and presentationSeriesUID go together")
        try:
            uid, series = validate_uid(uid, "presentationUID"), validate_uid(series, "presentationSeriesUID")
        except InvalidUID as exc:
            raise HttpError(400, str(exc)) from None
        refs = self.archive.retrieve.select(study_uids=[study], series_uids=[series], sop_uids=[uid])
        if not refs:
            raise HttpError(404, "no such presentation state in this study")
        try:
            return dcmread(self.archive.retrieve.path(refs[0]))
        except (NotAvailable, OSError) as exc:
            raise HttpError(404, str(exc)) from None


def _required(args: Any, name: str) -> str:
    v = args.get(name)
    if not v:
        raise HttpError(400, f"{name} is required")
    return v
