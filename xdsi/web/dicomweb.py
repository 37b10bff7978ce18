"""DICOMweb: WADO-RS, QIDO-RS and STOW-RS (PS3.18 10.4-10.6) over one archive (one partition).

Routing is a ``werkzeug.routing.Map``; every handler validates UIDs first,
calls the archive services and streams its answer: instances and frames part
by part, metadata series by series from the per-series journals
(:mod:`xdsi.archive.metadata`), STOW bodies part by part through a spool file
into :meth:`StoreService.store_file`.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections import Counter, defaultdict
from typing import Any, Callable, Iterable, Iterator

from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response

from xdsi.archive import Archive
from xdsi.archive import content
from xdsi.archive.header import InvalidDataset, read_header
from xdsi.archive.metadata import BULK_TOKEN
from xdsi.archive.query import QueryError
from xdsi.archive.produced import Produced
from xdsi.archive.produced import FrameSet
from xdsi.archive.retrieve import CannotProvide, InstanceRef, NotAvailable
from xdsi.archive.transcode import TranscodeError
from xdsi.archive.store import Outcome
from xdsi.audit import http as audit_http
from xdsi.render import RenderError, UnsupportedParameter
from xdsi.render.params import RENDERED_TYPES
from xdsi.render.request import RenderRequest, parse_render_request
from xdsi.uids import InvalidUID, validate_uid
from xdsi.web import frames as frame_forms
from xdsi.web import media
from xdsi.web.qido import JsonRowEncoder, build_query, uid_of
from xdsi.wire.errors import HttpError, warning_value
from xdsi.wire.media import MediaRange, parse_accept, parse_content_type
from xdsi.wire.multipart import MultipartError, MultipartWriter, spool_parts
from xdsi.wire.regions import FileRegion, Item, RegionBody, item_length

log = logging.getLogger(__name__)

_I = "/studies/<study>/series/<series>/instances/<sop>"
URLS = Map(
    [
        Rule("/studies", endpoint="studies", methods=["GET", "POST"]),
        Rule("/series", endpoint="qido_series", methods=["GET"]),
        Rule("/instances", endpoint="qido_instances", methods=["GET"]),
        Rule("/studies/<study>", endpoint="study", methods=["GET", "POST"]),
        Rule("/studies/<study>/metadata", endpoint="metadata", methods=["GET"]),
        Rule("/studies/<study>/series", endpoint="qido_series", methods=["GET"]),
        Rule("/studies/<study>/instances", endpoint="qido_instances", methods=["GET"]),
        Rule("/studies/<study>/series/<series>", endpoint="retrieve", methods=["GET"]),
        Rule("/studies/<study>/series/<series>/metadata", endpoint="metadata", methods=["GET"]),
        Rule("/studies/<study>/series/<series>/instances", endpoint="qido_instances", methods=["GET"]),
        Rule(_I, endpoint="retrieve", methods=["GET"]),
        Rule(_I + "/metadata", endpoint="metadata", methods=["GET"]),
        Rule(_I + "/rendered", endpoint="rendered", methods=["GET"]),
        Rule(_I + "/frames/<frames>", endpoint="frames", methods=["GET"]),
        Rule(_I + "/frames/<frames>/rendered", endpoint="rendered", methods=["GET"]),
        Rule(_I + "/bulkdata/<tag>", endpoint="bulkdata", methods=["GET"]),
    ],
    strict_slashes=False,
    merge_slashes=False,
)


def _uids(values: dict[str, str]) -> dict[str, str]:
    names = {"study": "Study Instance UID", "series": "Series Instance UID", "sop": "SOP Instance UID"}
    try:
        return {k: validate_uid(v, names[k]) if k in names else v for k, v in values.items()}
    except InvalidUID as exc:
        raise HttpError(400, str(exc)) from None


def _wants(accept: list[MediaRange], *types: str) -> MediaRange | None:
    for r in accept:
        if any(r.matches(t) for t in types):
            return r
    return None


class DicomWebApp:
    def __init__(self, archive: Archive) -> None:
        self.archive = archive

    # -- WSGI ----------------------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        return self.wsgi(environ, start_response)

    @Request.application
    def wsgi(self, request: Request) -> Response:
        adapter = URLS.bind_to_environ(request.environ)
        try:
            endpoint, values = adapter.match()
            return getattr(self, "on_" + endpoint)(request, **_uids(values))
        except HttpError as exc:
            return exc.response()
        except NotFound:
            return HttpError(404, "no such DICOMweb resource").response()
        except MethodNotAllowed as exc:
            r = HttpError(405, "method not allowed").response()
            r.headers["Allow"] = ", ".join(exc.valid_methods or [])
            return r
        except HTTPException as exc:
            return HttpError(exc.code or 400, exc.description or "bad request").response()
        except Exception as exc:  # an answer with a reason (and CORS headers) rather than the server's bare 500
            log.exception("DICOMweb %s %s failed", request.method, request.path)
            return HttpError(500, f"internal error: {exc.__class__.__name__}: {exc}").response()

    def base(self, request: Request) -> str:
        public_url = self.archive.settings.public_url  # [server] public_url: behind a proxy, the URL clients use
        return f"{public_url}{request.script_root}" if public_url else public_base(request)

    # -- dispatch of shared paths --------------------------------------------------------------

    def on_studies(self, request: Request) -> Response:
        if request.method == "POST":
            return self.stow(request, None)
        return self.qido(request, "STUDY", {})

    def on_study(self, request: Request, study: str) -> Response:
        if request.method == "POST":
            return self.stow(request, study)
        return self.on_retrieve(request, study)

    def on_qido_series(self, request: Request, study: str | None = None) -> Response:
        return self.qido(request, "SERIES", {"StudyInstanceUID": study} if study else {})

    def on_qido_instances(self, request: Request, study: str | None = None, series: str | None = None) -> Response:
        fixed = {k: v for k, v in (("StudyInstanceUID", study), ("SeriesInstanceUID", series)) if v}
        return self.qido(request, "IMAGE", fixed)

    # -- QIDO-RS -------------------------------------------------------------------------------

    def qido(self, request: Request, level: str, fixed: dict[str, str]) -> Response:
        accept = parse_accept(request.headers.get("Accept"))
        if not _wants(accept, media.DICOM_JSON, media.JSON):
            raise HttpError(406, "QIDO-RS answers application/dicom+json only")
        lim = self.archive.settings.http_limits
        q = build_query(level, request.args, fixed, max_value=lim.max_query_value, max_wildcards=lim.max_query_wildcards)
        base = self.base(request)
        patient = request.args.get("PatientID") or request.args.get("00100020")
        if patient and any(c in patient for c in "*?,\\"):
            patient = None  # a pattern or list names no one patient; the query itself is in the record
        try:
            # DICOM JSON straight from the index rows, no Dataset per match (xdsi.web.qido.JsonRowEncoder)
            fields, results = self.archive.query.find_rows(q.identifier, "STUDY", limit=q.limit, offset=q.offset, fuzzy=q.fuzzy)
            encoder = JsonRowEncoder(fields)
            first = next(results, None)
        except QueryError as exc:
            audit_http.qido_query(self.archive, request.environ, patient, failure=str(exc))
            raise HttpError(400, str(exc)) from None
        audit_http.qido_query(self.archive, request.environ, patient)  # the query as asked, when it ran (issue 12)

        def url(d: dict) -> str:  # type: ignore[type-arg]
            u = f"{base}/studies/{uid_of(d, '0020000D')}"
            if level in ("SERIES", "IMAGE"):
                u += f"/series/{uid_of(d, '0020000E')}"
            if level == "IMAGE":
                u += f"/instances/{uid_of(d, '00080018')}"
            return u

        def body() -> Iterator[bytes]:
            yield b"["
            sep = b""
            for row in ([first] if first is not None else []):
                yield sep + json.dumps(encoder.encode(row, url), ensure_ascii=False).encode("utf-8")
                sep = b","
            for row in results:
                yield sep + json.dumps(encoder.encode(row, url), ensure_ascii=False).encode("utf-8")
                sep = b","
            yield b"]"

        if first is None:
            r = Response(b"[]", status=200, mimetype=media.DICOM_JSON)
        else:
            r = Response(body(), status=200, mimetype=media.DICOM_JSON)
        if q.ignored:
            r.headers["Warning"] = warning_value(f"The following attributes are not supported for matching and were ignored: {', '.join(q.ignored)}")
        return r

    # -- WADO-RS: instances --------------------------------------------------------------------

    def _select(self, study: str, series: str | None = None, sop: str | None = None) -> list[InstanceRef]:
        refs = self.archive.retrieve.select(  # read at once: a fresh read stamp is not asked for again per instance
            study_uids=[study], series_uids=[series] if series else [], sop_uids=[sop] if sop else [], read_stamps=True,
            fetch_remote=True,  # a study only a gateway remote holds is fetched first (issue 15)
        )
        if not refs:
            what = "instance" if sop else "series" if series else "study"
            raise HttpError(404, f"no such {what} in this archive")
        return refs

    def on_retrieve(self, request: Request, study: str, series: str | None = None, sop: str | None = None) -> Response:
        accept = parse_accept(request.headers.get("Accept"))
        choices = [
            r
            for r in accept
            if (r.type == media.MULTIPART_RELATED and MediaRange(r.params.get("type", media.DICOM).lower()).matches(media.DICOM))
            or r.matches(media.MULTIPART_RELATED) and r.type != media.MULTIPART_RELATED
        ]
        if not choices:
            raise HttpError(406, 'instances are sent as multipart/related; type="application/dicom"')
        refs = self._select(study, series, sop)
        retrieve = self.archive.retrieve
        # the audit trail's view of this response: what it will send, what it could not, what it did (issue 12)
        audit = audit_http.transfer(self.archive, request.environ, None, "WADO-RS") if request.method == "GET" else None  # HEAD sends none
        # every instance is produced (recalled, converted into a spool) before the status line is sent
        produced: list[tuple[InstanceRef, Produced]] = []
        omitted: list[str] = []
        refusals: list[HttpError] = []
        try:
            for ref in refs:
                try:
                    produced.append((ref, retrieve.produce(ref, _accepted_syntaxes(choices, ref.transfer_syntax_uid))))
                except (CannotProvide, NotAvailable, TranscodeError, OSError) as exc:
                    if not isinstance(exc, CannotProvide):
                        log.error("WADO-RS: %s cannot be sent: %s", ref.sop_instance_uid, exc)
                    refusals.append(_production_error(ref.sop_instance_uid, exc))
                    omitted.append(f"{ref.sop_instance_uid}: {exc}")
                    if audit is not None:
                        audit.omit(ref.study_uid, f"{ref.sop_instance_uid}: {exc}")
        except BaseException:
            for _ref, p in produced:
                p.close()
            raise
        if not produced:  # nothing to send: the first reason, with its status, before any header
            if audit is not None:
                audit.close()
            raise refusals[0]
        writer = MultipartWriter(media.DICOM)
        if audit is not None:
            for ref, _p in produced:
                audit.intend(ref.study_uid, ref.sop_class_uid)

        def sent(ref: InstanceRef, p: Produced) -> Callable[[], None]:
            def after() -> None:
                p.close()  # a transcoded spool goes as soon as it is sent
                if audit is not None:
                    audit.sent(ref.study_uid, ref.sop_class_uid)

            return after

        # every part is known now (heads, sizes): a Content-Length instead of chunked framing, and each
        # file handed to the server as a range it can sendfile (xdsi.wire.regions)
        items: list[Item] = []
        for ref, p in produced:
            items.append(writer.head({"Content-Type": f"{media.DICOM}; transfer-syntax={p.transfer_syntax}"}))
            items.append(FileRegion(p.file_path(), 0, p.size, sent(ref, p)))
        items.append(writer.end())

        def close() -> None:
            for _ref, p in produced:
                p.close()
            if audit is not None:  # when the server closes the body: complete, or the client went away
                audit.close()

        body = RegionBody(items, length=sum(item_length(i) for i in items), on_close=[close])
        r = Response(body, status=200, content_type=writer.content_type, direct_passthrough=True)
        r.headers["Content-Length"] = str(body.length)
        for reason in omitted[:20]:
            r.headers.add("Warning", warning_value(f"omitted {reason}"))
        return r

    # -- WADO-RS: metadata ---------------------------------------------------------------------

    def on_metadata(self, request: Request, study: str, series: str | None = None, sop: str | None = None) -> Response:
        accept = parse_accept(request.headers.get("Accept"))
        if not _wants(accept, media.DICOM_JSON, media.JSON):
            raise HttpError(406, "metadata is available as application/dicom+json only")
        refs = self._select(study, series, sop)
        md = self.archive.metadata
        assert md is not None
        base = self.base(request)
        gzip_ok = "gzip" in request.accept_encodings and request.accept_encodings["gzip"] > 0
        # the attributes of a patient's instances leave the archive: audited as those instances sent (issue 12)
        audit = self._audit(request, "WADO-RS metadata", refs)

        def items() -> Iterator[bytes]:
            yield b"["
            sep = b""
            for ref, text in md.iter_json(refs, complete=sop is None):
                prefix = f"{base}/studies/{ref.study_uid}/series/{ref.series_uid}/instances/{ref.sop_instance_uid}/bulkdata/"
                yield sep + text.replace(BULK_TOKEN, prefix).encode("utf-8")
                sep = b","
                if audit is not None:  # resumed: the server took the instance's JSON (gzip: compressed it)
                    audit.sent(ref.study_uid, ref.sop_class_uid)
            yield b"]"

        if not gzip_ok:
            return _closing(Response(items(), status=200, mimetype=media.DICOM_JSON), audit)

        def gz() -> Iterator[bytes]:
            z = zlib.compressobj(6, zlib.DEFLATED, 31)
            pending: list[bytes] = []
            size = 0
            for chunk in items():
                pending.append(chunk)
                size += len(chunk)
                if size >= 1 << 16:
                    out = z.compress(b"".join(pending))
                    pending, size = [], 0
                    if out:
                        yield out
            yield z.compress(b"".join(pending)) + z.flush()

        r = Response(gz(), status=200, mimetype=media.DICOM_JSON)
        r.headers["Content-Encoding"] = "gzip"
        r.headers["Vary"] = "Accept-Encoding"
        return _closing(r, audit)

    # -- WADO-RS: frames and bulk data ---------------------------------------------------------

    def _one(self, study: str, series: str, sop: str) -> InstanceRef:
        ref = self.archive.retrieve.instance(study, series, sop)  # one Core query: asked once per frame by viewers
        if ref is None:
            raise HttpError(404, "no such instance in this archive")
        return ref

    def on_frames(self, request: Request, study: str, series: str, sop: str, frames: str) -> Response:
        numbers = _frame_list(frames, self.archive.settings.http_limits.max_frames)
        accept = frame_forms.frame_accept(request)  # the accept query parameter first (PS3.18 8.3.3.1)
        ref = self._one(study, series, sop)
        retrieve = self.archive.retrieve
        audit = self._audit(request, "WADO-RS frames", [ref])
        try:
            info = retrieve.frame_info(ref)
            for n in numbers:  # a frame that does not exist is a 404 whatever form was asked for
                if n > info.frames:
                    raise content.NoSuchPart(f"frame {n} does not exist (the instance has {info.frames})")
            form, passed_over = frame_forms.choose(accept, info, len(numbers), lambda ts: retrieve.frame_encoding_refusal(ref, ts))
            if form is None:
                offered = ", ".join(info.media_types)
                raise HttpError(
                    406,
                    f"frames of this instance ({info.transfer_syntax}) are available as "
                    f"application/octet-stream{' (native, decoded)' if info.decodable else ''}{', ' + offered if offered else ''}"
                    "; transfer-syntax=* sends them as stored"
                    + "".join(f"; {why}" for why in passed_over[:5]),
                )
            if form.target is not None:
                frame_set = retrieve.encoded_frames(ref, numbers, form.target)  # re-encoded (HTJ2K ...) before the status line
            else:
                frame_set = retrieve.frames(ref, numbers, stored=form.stored)  # produced before the status line
        except content.NoSuchPart as exc:
            raise _refused(audit, ref, HttpError(404, str(exc))) from None
        except content.CannotConvert as exc:
            raise _refused(audit, ref, HttpError(406, str(exc))) from None
        except NotAvailable as exc:
            raise _refused(audit, ref, HttpError(404, str(exc))) from None
        except OSError as exc:
            raise _refused(audit, ref, HttpError(500, f"frames of {sop} cannot be read: {exc}")) from None
        except HttpError as exc:
            raise _refused(audit, ref, exc) from None
        part_type = form.part_type or frame_set.media_type
        loc = f"{self.base(request)}/studies/{study}/series/{series}/instances/{sop}/frames/"
        ctype = f"{part_type}; transfer-syntax={frame_set.transfer_syntax}"
        if form.single:
            return self._single_frame(request, ref, form, frame_set, ctype, loc, audit)
        writer = MultipartWriter(part_type)

        # every frame is a range of a file (the stored one, or the spool it was produced into): known lengths,
        # a Content-Length, and ranges the server can sendfile (xdsi.wire.regions)
        items: list[Item] = []
        last = len(frame_set.spans) - 1
        for i, (n, offset, length) in enumerate(frame_set.spans):
            items.append(writer.head({"Content-Type": ctype, "Content-Location": loc + str(n)}))
            done = (lambda: audit.sent(ref.study_uid, ref.sop_class_uid)) if audit is not None and i == last else None
            items.append(FileRegion(frame_set.path, offset, length, done))  # the last frame sent: every frame asked for was
        items.append(writer.end())
        close = [frame_set.close] + ([audit.close] if audit is not None else [])
        body = RegionBody(items, length=sum(item_length(i) for i in items), on_close=close)
        r = Response(body, status=200, content_type=writer.content_type, direct_passthrough=True)
        r.headers["Content-Length"] = str(body.length)
        return r

    def _single_frame(self, request: Request, ref: InstanceRef, form: frame_forms.FrameForm, frame_set: FrameSet,
                      ctype: str, loc: str, audit: audit_http.Transfer | None) -> Response:  # fmt: skip
        """One frame as the whole body, honouring one ``bytes`` Range (xdsi.web.frames: 206, 416, If-Range)."""
        ((n, offset, length),) = frame_set.spans
        etag = frame_forms.entity_tag(ref.copies[0][3] if ref.copies else "", n, frame_set.transfer_syntax, form)
        bounds = frame_forms.byte_range(request, length, etag)
        headers = {"Accept-Ranges": "bytes", "Content-Location": loc + str(n)}
        if etag is not None:
            headers["ETag"] = etag
        if bounds is False:
            frame_set.close()
            if audit is not None:  # nothing of the instance is sent
                audit.forget(ref.study_uid, ref.sop_class_uid)
                audit.close()
            r = HttpError(416, f"range not satisfiable: frame {n} is {length} bytes").response()
            r.headers.update(headers)
            r.headers["Content-Range"] = f"bytes */{length}"
            return r
        start, end = bounds if bounds else (0, length)
        done = (lambda: audit.sent(ref.study_uid, ref.sop_class_uid)) if audit is not None else None  # any part discloses it
        close = [frame_set.close] + ([audit.close] if audit is not None else [])
        body = RegionBody([FileRegion(frame_set.path, offset + start, end - start, done)], length=end - start, on_close=close)
        r = Response(body, status=206 if bounds else 200, content_type=ctype, direct_passthrough=True)
        r.headers.update(headers)
        r.headers["Content-Length"] = str(end - start)
        if bounds:
            r.headers["Content-Range"] = f"bytes {start}-{end - 1}/{length}"
        return r

    def on_bulkdata(self, request: Request, study: str, series: str, sop: str, tag: str) -> Response:
        if not (len(tag) == 8 and all(c in "0123456789abcdefABCDEF" for c in tag)):
            raise HttpError(400, f"bulk data tag {tag!r} is not 8 hexadecimal digits")
        accept = parse_accept(request.headers.get("Accept"))
        multipart = None
        for r in accept:
            if r.type == media.MULTIPART_RELATED and MediaRange(r.params.get("type", media.OCTET_STREAM).lower()).matches(media.OCTET_STREAM):
                multipart = True
                break
            if r.type != media.MULTIPART_RELATED and r.matches(media.OCTET_STREAM):
                multipart = False
                break
        if multipart is None:
            raise HttpError(406, "bulk data is sent as application/octet-stream (single part or multipart/related)")
        ref = self._one(study, series, sop)
        try:
            value = self.archive.retrieve.bulk(ref, int(tag, 16))
        except content.NoSuchPart as exc:
            raise HttpError(404, str(exc)) from None
        except content.CannotConvert as exc:
            raise HttpError(406, str(exc)) from None
        except NotAvailable as exc:
            raise HttpError(404, str(exc)) from None
        audit = self._audit(request, "WADO-RS bulk data", [ref])
        length = value.length
        start, end, status = 0, length, 200
        rng = request.range
        if request.headers.get("Range"):
            if rng is None or rng.units != "bytes" or len(rng.ranges) != 1:
                raise HttpError(416, "only one bytes range is supported")
            bounds = rng.range_for_length(length)
            if bounds is None:
                r = HttpError(416, f"range not satisfiable for a value of {length} bytes").response()
                r.headers["Content-Range"] = f"bytes */{length}"
                return r
            start, end = bounds
            status = 206
        headers = {"Content-Range": f"bytes {start}-{end - 1}/{length}"} if status == 206 else {}
        try:
            chunks = value.chunks(start, end)
        except content.ContentError as exc:
            raise _refused(audit, ref, HttpError(406, str(exc))) from None
        if audit is not None:
            chunks = audit.track(chunks, ref.study_uid, ref.sop_class_uid)
        if not multipart:
            r = Response(chunks, status=status, mimetype=media.OCTET_STREAM)
            r.headers.update(headers)
            r.headers["Content-Length"] = str(end - start)
            r.headers["Accept-Ranges"] = "bytes"
            return _closing(r, audit)
        writer = MultipartWriter(media.OCTET_STREAM)

        def body() -> Iterator[bytes]:
            yield from writer.part({"Content-Type": media.OCTET_STREAM, **headers}, chunks)
            yield writer.end()

        r = Response(body(), status=status, content_type=writer.content_type)
        r.headers["Accept-Ranges"] = "bytes"
        return _closing(r, audit)

    # -- WADO-RS: rendered ---------------------------------------------------------------------

    def on_rendered(self, request: Request, study: str, series: str, sop: str, frames: str | None = None) -> Response:
        accept = parse_accept(request.headers.get("Accept"))
        ct = next((t for r in accept for t in RENDERED_TYPES if r.matches(t)), None)
        if ct is None:
            raise HttpError(406, f"rendered images are available as {', '.join(RENDERED_TYPES)}")
        numbers = _frame_list(frames) if frames else [1]
        if len(numbers) != 1:
            raise HttpError(400, "render one frame at a time")
        args = request.args
        rows = columns = source = None
        if args.get("viewport"):
            vp = args["viewport"].split(",")
            if len(vp) not in (2, 6):
                raise HttpError(400, "viewport is vw,vh or vw,vh,sx,sy,sw,sh")
            columns, rows = vp[0], vp[1]
            source = ",".join(vp[2:]) if len(vp) == 6 else None
        center = width = None
        if args.get("window"):
            w = args["window"].split(",")
            if len(w) not in (2, 3):
                raise HttpError(400, "window is center,width[,function]")
            center, width = w[0], w[1]
        req = RenderRequest(
            content_types=(ct,), rows=rows, columns=columns, viewport_source=source, window_center=center,
            window_width=width, frame_number=str(numbers[0]), image_quality=args.get("quality"),
            annotation=args.get("annotation"),
        )  # fmt: skip
        ref = self._one(study, series, sop)
        try:
            params = parse_render_request(req)
            data = self.archive.retrieve.render(ref, params)
        except UnsupportedParameter as exc:
            raise HttpError(406, str(exc)) from None
        except RenderError as exc:
            raise HttpError(404 if exc.parameter == "frame_number" else 400, _rs_render_reason(exc)) from None
        except NotAvailable as exc:
            raise HttpError(404, str(exc)) from None
        audit = self._audit(request, "WADO-RS rendered", [ref])
        if audit is None:
            return Response(data, status=200, mimetype=ct)
        # a rendering discloses the instance: audited as the instance sent (PS3.15 A.5.3.7)
        r = Response(audit.track([data], ref.study_uid, ref.sop_class_uid), status=200, mimetype=ct, headers={"Content-Length": str(len(data))})
        return _closing(r, audit)

    def _audit(self, request: Request, what: str, refs: list[InstanceRef]) -> audit_http.Transfer | None:
        """The audit record of a response sending ``refs`` (what it sets out to send), None when auditing is off."""
        if request.method != "GET":
            return None
        audit = audit_http.transfer(self.archive, request.environ, None, what)
        if audit is not None:
            for ref in refs:
                audit.intend(ref.study_uid, ref.sop_class_uid)
        return audit

    # -- STOW-RS -------------------------------------------------------------------------------

    def stow(self, request: Request, study: str | None) -> Response:
        ctype, params = parse_content_type(request.headers.get("Content-Type"))
        if ctype != media.MULTIPART_RELATED:
            raise HttpError(415, 'STOW-RS takes multipart/related; type="application/dicom"')
        part_default = params.get("type", "").lower()
        if part_default and part_default != media.DICOM:
            raise HttpError(415, f"part type {part_default!r} is not supported; only application/dicom")
        accept = parse_accept(request.headers.get("Accept"))
        if not _wants(accept, media.DICOM_JSON, media.JSON):
            raise HttpError(406, "the STOW-RS response is available as application/dicom+json only")
        base = self.base(request)
        spool = self.archive.settings.temp_dir
        stored: list[dict] = []
        failed: list[dict] = []
        reasons: list[str] = []
        studies: set[str] = set()
        audited: dict[str, Counter[str]] = defaultdict(Counter)  # study -> SOP classes stored, for the audit trail
        parts = 0
        try:
            for headers, path in spool_parts(request.stream, params.get("boundary", ""), spool):
                parts += 1
                try:
                    self._stow_part(headers, path, part_default, study, base, stored, failed, reasons, studies, audited)
                finally:
                    path.unlink(missing_ok=True)
        except MultipartError as exc:
            if not parts:
                raise HttpError(400, str(exc)) from None
            reasons.append(str(exc))
            failed.append(_sop_item("", "", media.FAILURE_CANNOT_UNDERSTAND))
        if not parts:
            raise HttpError(400, "the request has no parts")
        if self.archive.audit is not None:
            from xdsi.audit.dimse import patient_of
            from xdsi.audit.http import stow_received

            stow_received(self.archive, request.environ, audited, patient_of)
        body: dict[str, Any] = {}
        if len(studies) == 1:
            body[media.TAG_RETRIEVE_URL] = {"vr": "UR", "Value": [f"{base}/studies/{next(iter(studies))}"]}
        if failed:
            body[media.TAG_FAILED_SOP_SEQUENCE] = {"vr": "SQ", "Value": failed}
        if stored:
            body[media.TAG_REFERENCED_SOP_SEQUENCE] = {"vr": "SQ", "Value": stored}
        status = 200 if not failed else (202 if stored else 409)
        r = Response(json.dumps(body), status=status, mimetype=media.DICOM_JSON)
        for reason in reasons[:20]:
            r.headers.add("Warning", warning_value(reason))
        return r

    def _stow_part(self, headers, path, part_default, study, base, stored, failed, reasons, studies, audited) -> None:  # type: ignore[no-untyped-def]
        ptype, _ = parse_content_type(headers.get("content-type"))
        ptype = ptype or part_default or media.DICOM
        if ptype != media.DICOM:
            failed.append(_sop_item("", "", media.FAILURE_CANNOT_UNDERSTAND))
            reasons.append(f"part of type {ptype} ignored: only application/dicom is accepted")
            return
        if study is not None:
            try:
                header = read_header(path)
            except InvalidDataset as exc:
                failed.append(_sop_item("", "", media.FAILURE_CANNOT_UNDERSTAND))
                reasons.append(str(exc))
                return
            if header.study_uid != study:
                failed.append(_sop_item(header.sop_class_uid, header.sop_instance_uid, media.FAILURE_DATASET_DOES_NOT_MATCH))
                reasons.append(f"{header.sop_instance_uid}: Study Instance UID {header.study_uid} is not the target study {study}")
                return
        result = self.archive.store.store_file(path, source_ae="", move=True)
        if result.ok:
            studies.add(result.study_uid)
            audited[result.study_uid][result.sop_class_uid] += 1
            item = _sop_item(result.sop_class_uid, result.sop_instance_uid, None)
            item[media.TAG_RETRIEVE_URL] = {"vr": "UR", "Value": [f"{base}/studies/{result.study_uid}"]}
            stored.append(item)
            return
        code = media.FAILURE_CANNOT_UNDERSTAND if result.outcome is Outcome.REJECTED else media.FAILURE_OUT_OF_RESOURCES
        failed.append(_sop_item(result.sop_class_uid, result.sop_instance_uid, code))
        reasons.append(f"{result.sop_instance_uid or 'part ' + str(len(stored) + len(failed))}: {result.reason}")


def _closing(r: Response, audit: audit_http.Transfer | None) -> Response:
    """``r``, recording ``audit`` when the server closes its body: sent whole, or the client went away."""
    if audit is not None:
        r.call_on_close(audit.close)
    return r


def _refused(audit: audit_http.Transfer | None, ref: InstanceRef, exc: HttpError) -> HttpError:
    """``exc``, after recording that ``ref`` was asked for and not sent (outcome 4, no Begin Transferring)."""
    if audit is not None:
        audit.forget(ref.study_uid, ref.sop_class_uid)
        audit.omit(ref.study_uid, f"{ref.sop_instance_uid}: {exc.reason}")
        audit.close()
    return exc


def public_base(request: Request) -> str:
    """The URL prefix of this partition's resources as the client reached it.

    dicomweb-client sends ``Host`` without the port; when the host named is
    the address we listen on (a direct connection, not a proxy's virtual
    host) and our port is not the scheme's default, the port is restored so
    that RetrieveURL and BulkDataURI values work.
    """
    host = request.host
    env = request.environ
    port = str(env.get("SERVER_PORT", ""))
    if ":" not in host.rsplit("]", 1)[-1] and host == env.get("SERVER_NAME") and port not in ("", "80", "443"):
        host = f"{host}:{port}"
    return f"{request.scheme}://{host}{request.script_root}"


def _sop_item(sop_class: str, sop_uid: str, failure: int | None) -> dict:
    item: dict[str, Any] = {}
    item[media.TAG_REFERENCED_SOP_CLASS] = {"vr": "UI", "Value": [sop_class]} if sop_class else {"vr": "UI"}
    item[media.TAG_REFERENCED_SOP_INSTANCE] = {"vr": "UI", "Value": [sop_uid]} if sop_uid else {"vr": "UI"}
    if failure is not None:
        item[media.TAG_FAILURE_REASON] = {"vr": "US", "Value": [failure]}
    return item


def _frame_list(text: str, max_frames: int = 10_000) -> list[int]:
    """The frame numbers of a ``frames/{list}`` path: at most ``max_frames``, each once.

    Duplicates are refused (400) rather than answered: ``frames/1,1,1,...``
    once turned a 20 KB request into an 85 MB answer.  With duplicates gone the
    answer is bounded by the instance's own frames ([http] max_frames).
    """
    items = text.split(",")
    if len(items) > max_frames:
        raise HttpError(400, f"more than {max_frames} frames in one request")
    if not all(x.strip().isascii() and x.strip().isdigit() for x in items if x.strip()):
        raise HttpError(400, f"frame list {text[:100]!r} is not comma-separated numbers")
    numbers = [int(x) for x in items if x.strip()]
    if not numbers or any(n < 1 for n in numbers):
        raise HttpError(400, "frame numbers start at 1")
    if len(set(numbers)) != len(numbers):
        raise HttpError(400, "a frame number is repeated in the frame list")
    return numbers


def _accepted_syntaxes(choices: list[MediaRange], stored: str) -> list[str]:
    """The transfer syntaxes the Accept ranges name, in order: ``*`` is the stored one, none is the PS3.18 default."""
    out: list[str] = []
    for r in choices:
        want = r.params.get("transfer-syntax")
        ts = stored if want == "*" else (want or media.DEFAULT_TRANSFER_SYNTAX)
        if ts not in out:
            out.append(ts)
    return out


def _production_error(sop: str, exc: Exception) -> HttpError:
    if isinstance(exc, CannotProvide):
        return HttpError(406, str(exc))
    if isinstance(exc, NotAvailable):
        return HttpError(404, str(exc))
    if isinstance(exc, TranscodeError):
        return HttpError(406, f"instance {sop} cannot be provided in the requested transfer syntax: {exc}")
    return HttpError(500, f"instance {sop} cannot be read: {exc}")


def _rs_render_reason(exc: RenderError) -> str:
    names = {"window_center": "window", "window_width": "window", "image_quality": "quality", "rows": "viewport",
             "columns": "viewport", "region": "viewport", "frame_number": "frame"}  # fmt: skip
    return f"{names.get(exc.parameter, exc.parameter)}: {exc.message}"
