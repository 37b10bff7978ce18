"""WADO-URI (PS3.18 9, formerly Part 18 section 6): one object per GET, as stored DICOM or rendered.

Everything goes through the retrieval service: the object (converted to the
requested transfer syntax before the status line), rendering with the one
parameter parser and presentation-state loader the other front doors use.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

from werkzeug.wrappers import Request, Response

from xdsi.archive import Archive
from xdsi.archive.retrieve import CannotProvide, InstanceRef, NotAvailable, PresentationStateError
from xdsi.archive.transcode import TranscodeError
from xdsi.audit import http as audit_http
from xdsi.audit.messages import TRANSACTION
from xdsi.render import InvalidParameter, NotRenderable, RenderError, UnsupportedParameter
from xdsi.render.params import JPEG, RENDERED_TYPES
from xdsi.render.request import RenderRequest, parse_render_request
from xdsi.uids import InvalidUID, validate_uid
from xdsi.web import media
from xdsi.wire.errors import HttpError
from xdsi.wire.media import parse_accept

log = logging.getLogger(__name__)

_RENDER_ONLY = ("rows", "columns", "region", "windowCenter", "windowWidth", "frameNumber", "imageQuality", "annotation",
                "presentationUID", "presentationSeriesUID")  # fmt: skip
# WADO-URI parameter name -> renderer parameter name, for error messages in the client's own terms
_PARAM_NAMES = {"rows": "rows", "columns": "columns", "region": "region", "window_center": "windowCenter",
                "window_width": "windowWidth", "frame_number": "frameNumber", "image_quality": "imageQuality",
                "annotation": "annotation", "content_type": "contentType", "object": "objectUID",
                "presentation_uid": "presentationUID", "presentation_series_uid": "presentationSeriesUID"}  # fmt: skip


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
        except Exception as exc:  # an answer with a reason (and CORS headers) rather than the server's bare 500
            log.exception("WADO-URI %s failed", request.url)
            return HttpError(500, f"internal error: {exc.__class__.__name__}: {exc}").response()

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
        refs = self.archive.retrieve.select(study_uids=[study], series_uids=[series], sop_uids=[sop], fetch_remote=True)
        if not refs:
            raise HttpError(404, "no such object in this archive")
        ref = refs[0]
        ct = supported[0]
        if ct in ("*/*", "image/*"):
            ct = JPEG
        if ct == media.DICOM:
            if not any(r.matches(media.DICOM) for r in accept):
                raise HttpError(406, "the Accept header excludes application/dicom")
            return self.dicom(request, ref)
        if not any(r.matches(ct) for r in accept):
            raise HttpError(406, f"the Accept header excludes {ct}")
        if args.get("transferSyntax"):
            raise HttpError(400, "transferSyntax applies to contentType application/dicom only")
        try:
            return self.rendered(request, ct, ref)
        except NotRenderable as exc:
            if not explicit:  # default content type for a non-image object is application/dicom
                return self.dicom(request, ref)
            raise HttpError(400, f"objectUID: {exc.message}") from None

    def dicom(self, request: Request, ref: InstanceRef) -> Response:
        """The object as a Part 10 file, produced (recalled, converted into a spool) before the status line."""
        bad = [p for p in _RENDER_ONLY if request.args.get(p)]
        if bad:
            raise HttpError(400, f"{', '.join(bad)} cannot be used with contentType application/dicom")
        want = request.args.get("transferSyntax") or media.DEFAULT_TRANSFER_SYNTAX
        try:
            want = validate_uid(want, "transferSyntax")
        except InvalidUID as exc:
            raise HttpError(400, str(exc)) from None
        audit = self._audit(request)
        try:
            try:
                produced = self.archive.retrieve.produce(ref, [want])
            except CannotProvide:
                raise HttpError(406, f"the object is stored in {ref.transfer_syntax_uid} and cannot be sent in {want}") from None
            except NotAvailable as exc:
                raise HttpError(404, str(exc)) from None
            except TranscodeError as exc:
                raise HttpError(406, f"the object cannot be provided in {want}: {exc}") from None
            except OSError as exc:
                raise HttpError(500, f"the object cannot be read: {exc}") from None
        except HttpError as exc:
            if audit is not None:  # asked for a patient's object and refused: recorded, outcome 4
                audit.omit(ref.study_uid, f"{ref.sop_instance_uid}: {exc.reason}")
                audit.close()
            raise
        headers = {"Content-Disposition": f'inline; filename="{ref.sop_instance_uid}.dcm"', "Content-Length": str(produced.size)}
        chunks = produced.chunks()
        if audit is not None:
            audit.intend(ref.study_uid, ref.sop_class_uid)
            chunks = audit.track(chunks, ref.study_uid, ref.sop_class_uid)
        r = Response(chunks, status=200, mimetype=media.DICOM, headers=headers)
        r.call_on_close(produced.close)
        if audit is not None:
            r.call_on_close(audit.close)  # when the body is closed: sent whole, or the client went away
        return r

    def _audit(self, request: Request) -> audit_http.Transfer | None:
        """The audit trail's record of this retrieve (RAD-55 WADO Retrieve), for a GET when auditing is on."""
        if request.method != "GET":
            return None  # HEAD sends no object
        return audit_http.transfer(self.archive, request.environ, TRANSACTION["RAD-55"], "WADO-URI")

    def rendered(self, request: Request, ct: str, ref: InstanceRef) -> Response:
        args = request.args
        req = RenderRequest(
            content_types=(ct,),
            rows=args.get("rows"),
            columns=args.get("columns"),
            region=args.get("region"),
            window_center=args.get("windowCenter"),
            window_width=args.get("windowWidth"),
            frame_number=args.get("frameNumber"),
            image_quality=args.get("imageQuality"),
            annotation=args.get("annotation"),
            presentation_uid=args.get("presentationUID"),
            presentation_series_uid=args.get("presentationSeriesUID"),
        )
        retrieve = self.archive.retrieve
        try:
            params = parse_render_request(req)
            ps = None
            if params.presentation is not None:
                try:
                    ps = retrieve.presentation_state(ref.study_uid, *params.presentation)
                except PresentationStateError as exc:
                    raise HttpError(400 if exc.reason == "sop_class" else 404, f"presentationUID: {exc.message}") from None
            data = retrieve.render(ref, params, ps)
        except NotRenderable:
            raise
        except UnsupportedParameter as exc:
            raise HttpError(406, f"{_PARAM_NAMES.get(exc.parameter, exc.parameter)}: {exc.message}") from None
        except (InvalidParameter, RenderError) as exc:
            raise HttpError(400, f"{_PARAM_NAMES.get(exc.parameter, exc.parameter)}: {exc.message}") from None
        except NotAvailable as exc:
            raise HttpError(404, str(exc)) from None
        audit = self._audit(request)
        if audit is None:
            return Response(data, status=200, mimetype=ct)
        # a rendering of the instance is a disclosure of it: audited as the instance sent (PS3.15 A.5.3.7)
        audit.intend(ref.study_uid, ref.sop_class_uid)
        r = Response(audit.track([data], ref.study_uid, ref.sop_class_uid), status=200, mimetype=ct, headers={"Content-Length": str(len(data))})
        r.call_on_close(audit.close)
        return r


def _required(args: Any, name: str) -> str:
    v = args.get(name)
    if not v:
        raise HttpError(400, f"{name} is required")
    return v
