"""The JPIP server (ISO/IEC 15444-9) under ``/jpip``: JPP-streams over HTTP, with sessions and cache models.

Why our own server and not OpenJPEG's (Debian libopenjpip-server, ``opj_server``),
evaluated for issue 16:

* it serves only JP2 files carrying OpenJPEG's own index boxes (``cidx``, made
  by ``opj_compress -jpip``), named by a file path relative to its working
  directory; our JPEG 2000 lives in DICOM Pixel Data fragments, so every
  instance would have to be re-encoded into such a file first, and the target
  would be a path;
* it has no client cache-model field (``model=``), so a stateless client
  cannot say what it holds;
* sessions live in one long-running FastCGI process: run per request (CGI
  mode, no listening socket) there are no sessions at all; and in our trial
  of that mode (QUERY_STRING set, stdin /dev/null) the Debian build wrote
  nothing, spun one CPU for ten minutes and ignored SIGTERM;
* every start also opens a listening TCP socket on port 60000 for its
  auxiliary-channel transport (``init_JPIPserver(60000, 0)`` in its
  ``main``), which we cannot keep to loopback or switch off;
* a request whose query string is ``quitJPIP`` stops the server.

So the protocol is ours, on :mod:`xdsi.jpip.codestream` (packets cut from the
codestream, checked byte for byte) and :mod:`xdsi.jpip.jpp` (messages); the
pixels are OpenJPEG's: JPEG 2000 we did not store is encoded by OpenJPEG
(:mod:`xdsi.jpip.source`), and the tests decode our JPP-streams with
OpenJPEG's own JPIP tools (``opj_jpip_transcode``) and decoder.

Request fields (15444-9 C.1-C.10): ``target`` (SOP Instance UID), ``stream``
(0-based frame), ``fsiz=fx,fy[,round-down|round-up|closest]``, ``roff``,
``rsiz``, ``layers``, ``type=jpp-stream``, ``cnew=http``, ``cid``, ``cclose``,
``model`` (``Hm``, ``H<t>``, ``P<i>``, each with an optional ``:<bytes>``
or, for precincts, ``:L<layers>``; ``-`` before an item removes it), ``len``
(byte limit) and ``tid``.  Any other field is refused with 501 (known to
JPIP, not implemented) or 400 (unknown).  Sessions are small files shared by
the worker processes (:class:`Sessions`), so a channel goes on whichever
worker its next request reaches.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import parse_qsl

from werkzeug.wrappers import Request, Response

from xdsi.archive.retrieve import NotAvailable
from xdsi.jpip import jpp
from xdsi.jpip.codestream import Codestream
from xdsi.jpip.source import CodestreamSource, EncodeFailed, NoStream, NoTarget
from xdsi.jpip.urls import BadTarget, parse_target
from xdsi.wire.errors import HttpError

log = logging.getLogger(__name__)

SUPPORTED = {"target", "stream", "fsiz", "roff", "rsiz", "layers", "type", "cnew", "cid", "cclose", "model", "len", "tid"}
# JPIP request fields (15444-9 Table C.1) we do not implement: 501, not a silent answer for another window
NOT_IMPLEMENTED = {"subtarget", "qid", "path", "context", "comps", "srate", "rold", "roi", "mset", "stream_window",
                   "metareq", "align", "wait", "abandon", "barrier", "need", "tpmodel", "tpneed", "mbh", "sample",
                   "pref", "csf", "handled", "upload", "xpath", "quality", "codestream"}
_NUM = re.compile(r"^[0-9]{1,9}$")
MAX_QUERY = 8192


@dataclass
class Session:
    """One JPIP channel: its target, and per codestream the target id and the bins the client holds."""

    target: str
    stream: int
    tids: dict[int, str]  # codestream (frame) -> target id of the bytes its held bins came from
    model: dict[jpp.BinKey, int] = field(default_factory=dict)

    def dump(self) -> str:
        return json.dumps({"target": self.target, "stream": self.stream, "tids": {str(k): v for k, v in self.tids.items()},
                           "model": [[*k, v] for k, v in self.model.items()]})

    @classmethod
    def load(cls, text: str) -> "Session":
        d = json.loads(text)
        return cls(str(d["target"]), int(d["stream"]), {int(k): str(v) for k, v in d["tids"].items()},
                   {(int(a), int(b), int(c)): int(v) for a, b, c, v in d["model"]})


_CID = re.compile(r"^[0-9a-f]{24}$")


class Sessions:
    """The JPIP channels, one small file each in a folder all worker processes share.

    Why files: ``xdsi serve`` runs one worker process per CPU on shared
    sockets, so a channel's next request usually reaches another worker; each
    request locks its channel's file (``flock``), reads the cache model, and
    writes it back.  Bounded in number and idle time (an idle file goes at the
    next new channel); the channel id is 96 random bits, checked by form
    before it names a file.
    """

    def __init__(self, folder: Path, limit: int, idle_seconds: float) -> None:
        self.folder, self.limit, self.idle = folder, limit, idle_seconds
        folder.mkdir(parents=True, exist_ok=True)

    def _path(self, cid: str) -> Path:
        if not _CID.match(cid):
            raise HttpError(400, f"unknown JPIP channel id {cid[:40]!r}")
        return self.folder / f"{cid}.json"

    def _live(self) -> int:
        now, n = time.time(), 0
        for p in self.folder.glob("*.json"):
            try:
                if now - p.stat().st_mtime > self.idle:
                    p.unlink(missing_ok=True)
                else:
                    n += 1
            except FileNotFoundError:
                pass
        return n

    def new(self, target: str, stream: int, tid: str) -> str:
        if self._live() >= self.limit:
            raise HttpError(503, f"JPIP session limit ({self.limit}) reached; retry later or ask without cnew")
        cid = secrets.token_hex(12)
        fd = os.open(self._path(cid), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(Session(target, stream, {stream: tid}).dump())
        return cid

    @contextmanager
    def session(self, cid: str) -> Iterator[Session]:
        """The channel, locked against this channel's other requests; written back when the block ends without error."""
        path = self._path(cid)
        try:
            fh = open(path, "r+")
        except FileNotFoundError:
            raise HttpError(400, f"unknown JPIP channel id {cid!r} (closed or expired)") from None
        with fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            text = fh.read()
            if not text or time.time() - os.fstat(fh.fileno()).st_mtime > self.idle or not path.exists():
                raise HttpError(400, f"unknown JPIP channel id {cid!r} (closed or expired)")
            s = Session.load(text)
            yield s
            fh.seek(0)
            fh.truncate()
            fh.write(s.dump())

    def close(self, cids: Iterable[str]) -> None:
        for cid in cids:
            if _CID.match(cid.strip()):
                self._path(cid.strip()).unlink(missing_ok=True)

    def __len__(self) -> int:
        return self._live()


def _pair(name: str, value: str) -> tuple[int, int]:
    parts = value.split(",")
    if len(parts) != 2 or not all(_NUM.match(p) for p in parts):
        raise HttpError(400, f"{name} must be two non-negative integers 'x,y', not {value[:40]!r}")
    return int(parts[0]), int(parts[1])


def _number(name: str, value: str) -> int:
    if not _NUM.match(value):
        raise HttpError(400, f"{name} must be a non-negative integer, not {value[:40]!r}")
    return int(value)


def parse_model(value: str, cs: Codestream, csn: int, model: dict[jpp.BinKey, int]) -> None:
    """Apply a ``model=`` field (15444-9 C.9) to ``model``: what the client says it holds (or, with ``-``, does not)."""
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        m = re.fullmatch(r"(-?)(Hm|H([0-9]{1,9})|P([0-9]{1,12}))(?::(L?)([0-9]{1,12}))?", item)
        if m is None:
            raise HttpError(400, f"model item {item[:40]!r} is not Hm, H<tile>, P<precinct> with an optional :<bytes> or :L<layers>")
        minus, whole, tile, prec, is_layers, amount = m.groups()
        if whole == "Hm":
            key = (jpp.MAIN_HEADER, csn, 0)
        elif tile is not None:
            key = (jpp.TILE_HEADER, csn, int(tile))
        else:
            key = (jpp.PRECINCT, csn, int(prec))
        if minus:
            model.pop(key, None)
            continue
        if amount is None:
            held = 1 << 62  # the whole bin
        elif is_layers:
            if key[0] != jpp.PRECINCT:
                raise HttpError(400, f"model item {item[:40]!r}: layers qualify precincts only")
            held = _precinct_bytes(cs, int(prec), int(amount))
        else:
            held = int(amount)
        model[key] = max(model.get(key, 0), held)


def _precinct_bytes(cs: Codestream, pid: int, layers: int) -> int:
    for b in jpp.window_bins(cs, jpp.Window(0, 0, 0, cs.xsiz, cs.ysiz, cs.layers)):
        if b.cls == jpp.PRECINCT and b.in_class == pid:
            return sum(len(p) for p in b.parts[:layers])
    return 0


def frame_window(cs: Codestream, fsiz: tuple[int, int] | None, rounding: str, roff: tuple[int, int] | None,
                 rsiz: tuple[int, int] | None, layers: int | None) -> tuple[jpp.Window, tuple[int, int]]:
    """The window on the reference grid, and the frame size actually served (15444-9 C.4.2-C.4.4)."""
    levels = cs.min_levels
    discard = 0
    if fsiz is not None:
        fx, fy = fsiz
        sizes = [cs.size_at(d) for d in range(levels + 1)]
        if rounding == "round-up":
            fits = [d for d, (w, h) in enumerate(sizes) if w >= fx and h >= fy]
            discard = max(fits) if fits else 0
        elif rounding == "closest":
            discard = min(range(levels + 1), key=lambda d: abs(sizes[d][0] * sizes[d][1] - fx * fy))
        else:  # round-down, the default: the largest resolution that fits; the smallest if none does
            fits = [d for d, (w, h) in enumerate(sizes) if w <= fx and h <= fy]
            discard = min(fits) if fits else levels
    fw, fh = cs.size_at(discard)
    ox, oy = roff or (0, 0)
    sx, sy = rsiz or (fw - ox, fh - oy)
    if ox >= fw or oy >= fh:
        raise HttpError(400, f"roff {ox},{oy} is outside the {fw}x{fh} frame")
    scale = 1 << discard
    x0 = cs.xosiz + ox * scale
    y0 = cs.yosiz + oy * scale
    x1 = min(cs.xsiz, cs.xosiz + (ox + sx) * scale)
    y1 = min(cs.ysiz, cs.yosiz + (oy + sy) * scale)
    return jpp.Window(discard, x0, y0, x1, y1, cs.layers if layers is None else min(layers, cs.layers)), (fw, fh)


class JpipApp:
    """The WSGI application of ``/jpip``: a GET (or POST with the fields as a form body) per JPIP request."""

    def __init__(self, source: CodestreamSource, session_dir: Path, *, max_sessions: int = 64,
                 session_idle_seconds: float = 300.0, openjpeg_dialect: bool = False) -> None:
        self.source = source
        self.sessions = Sessions(session_dir, max_sessions, session_idle_seconds)
        # tile-header bins as OpenJPEG's JPIP client expects them (SOT body and SOD kept), see jpp.tile_header_bin
        self.openjpeg_dialect = openjpeg_dialect

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        request = Request(environ)
        try:
            response = self.answer(request)
        except HttpError as exc:
            response = exc.response()
        return response(environ, start_response)

    def answer(self, request: Request) -> Response:
        if (request.path or "/") not in ("", "/"):
            raise HttpError(404, "JPIP requests go to /jpip itself")
        if request.method not in ("GET", "POST"):
            raise HttpError(405, "JPIP requests are GET (or POST with the request fields as the body)")
        query = request.query_string.decode("latin-1")
        if request.method == "POST":
            query = request.get_data(as_text=True)[: MAX_QUERY + 1]
        if len(query) > MAX_QUERY:
            raise HttpError(400, "the JPIP request is too long")
        fields: dict[str, str] = {}
        for k, v in parse_qsl(query, keep_blank_values=True):
            if k in fields:
                raise HttpError(400, f"request field {k[:40]!r} is given twice")
            fields[k] = v
        for k in fields:
            if k in NOT_IMPLEMENTED:
                raise HttpError(501, f"the JPIP request field {k!r} is not implemented here")
            if k not in SUPPORTED:
                raise HttpError(400, f"{k[:40]!r} is not a JPIP request field")
        if "cclose" in fields:
            self.sessions.close(fields["cclose"].split(","))
            if "target" not in fields and "cid" not in fields:
                return Response(b"", status=200, mimetype="image/jpp-stream")
        if "cid" in fields and "cnew" in fields:
            raise HttpError(400, "cnew and cid in one request")
        if "cid" in fields:
            with self.sessions.session(fields["cid"]) as session:
                return self._answer(request, fields, session, {})
        return self._answer(request, fields, None, {})

    def _answer(self, request: Request, fields: dict[str, str], session: Session | None, headers: dict[str, str]) -> Response:
        try:
            target = parse_target(fields["target"]) if "target" in fields else (session.target if session else "")
        except BadTarget as exc:
            raise HttpError(400, str(exc)) from None
        if not target:
            raise HttpError(400, "a JPIP request needs target=<SOP Instance UID> (or the cid of a session)")
        if session is not None and target != session.target:
            raise HttpError(400, "the target is not the one of this channel")
        kind = fields.get("type", "jpp-stream")
        if kind.split(";")[0].strip() != "jpp-stream":
            raise HttpError(501, f"only type=jpp-stream is served, not {kind[:40]!r}")
        stream = _number("stream", fields["stream"]) if "stream" in fields else (session.stream if session else 0)
        try:
            served = self.source.get(target, stream)
        except (NoTarget, NoStream) as exc:
            raise HttpError(404, str(exc)) from None
        except NotAvailable as exc:  # no tier can deliver it now (e.g. an offline cold tier): try again later
            raise HttpError(503, f"instance {target} is not available now: {exc}") from None
        except EncodeFailed as exc:
            log.warning("JPIP %s stream %d: %s", target, stream, exc)
            raise HttpError(503, str(exc)) from None
        cs = served.codestream
        fsiz = rounding = None
        if "fsiz" in fields:
            parts = fields["fsiz"].split(",")
            rounding = parts[2] if len(parts) == 3 else "round-down"
            if rounding not in ("round-down", "round-up", "closest"):
                raise HttpError(400, f"fsiz rounding {rounding[:20]!r} is not round-down, round-up or closest")
            fsiz = _pair("fsiz", ",".join(parts[:2]))
        roff = _pair("roff", fields["roff"]) if "roff" in fields else None
        rsiz = _pair("rsiz", fields["rsiz"]) if "rsiz" in fields else None
        layers = _number("layers", fields["layers"]) if "layers" in fields else None
        byte_limit = _number("len", fields["len"]) if "len" in fields else None
        window, frame = frame_window(cs, fsiz, rounding or "round-down", roff, rsiz, layers)
        if "cnew" in fields:
            transports = [t.strip() for t in fields["cnew"].split(",")]
            if "http" not in transports:
                raise HttpError(501, "only the http transport is offered for JPIP channels")

        headers["Cache-Control"] = "no-cache"
        new_tid = "tid" in fields and fields["tid"] != served.tid
        if "tid" in fields:
            headers["JPIP-tid"] = served.tid
        if fsiz is not None and frame != fsiz:
            headers["JPIP-fsiz"] = f"{frame[0]},{frame[1]}"
        if rsiz is not None:
            ox, oy = roff or (0, 0)
            served_size = (min(rsiz[0], frame[0] - ox), min(rsiz[1], frame[1] - oy))
            if served_size != rsiz:  # the region was clipped to the frame (15444-9 D.2.5)
                headers["JPIP-rsiz"] = f"{served_size[0]},{served_size[1]}"
        if layers is not None and window.layers != layers:
            headers["JPIP-layers"] = str(window.layers)
        if session is None and "cnew" in fields:  # a new channel: this request is its first
            cid = self.sessions.new(target, stream, served.tid)
            path = (request.script_root or "/jpip").lstrip("/") or "jpip"
            headers["JPIP-cnew"] = f"cid={cid},path={path},transport=http"
            headers["JPIP-tid"] = served.tid
            with self.sessions.session(cid) as fresh:
                return self._respond(fields, fresh, served, stream, window, byte_limit, new_tid, headers)
        return self._respond(fields, session, served, stream, window, byte_limit, new_tid, headers)

    def _respond(self, fields: dict[str, str], session: Session | None, served: Any, stream: int, window: jpp.Window,
                 byte_limit: int | None, new_tid: bool, headers: dict[str, str]) -> Response:
        cs = served.codestream
        if session is not None:
            if session.tids.get(stream, served.tid) != served.tid or new_tid:
                # other bytes behind this codestream now (or the client's cache is of other bytes): its bins are void
                for key in [k for k in session.model if k[1] == stream]:
                    del session.model[key]
            session.tids[stream] = served.tid
            session.stream = stream
            model = session.model
        else:
            model = {}
        if "model" in fields and not (session is None and new_tid):
            parse_model(fields["model"], cs, stream, model)
        body, reason = self._messages(cs, stream, window, model, byte_limit)
        body.append(jpp.eor(reason))
        return Response(body, status=200, headers=headers, content_type="image/jpp-stream")

    def _messages(self, cs: Codestream, stream: int, window: jpp.Window, model: dict[jpp.BinKey, int],
                  byte_limit: int | None) -> tuple[list[bytes], int]:
        msgs, cut = jpp.respond(cs, stream, window, model, byte_limit=byte_limit, openjpeg_dialect=self.openjpeg_dialect)
        if cut:
            return msgs, jpp.EOR_BYTE_LIMIT
        return msgs, jpp.EOR_IMAGE_DONE if jpp.whole_image_held(cs, stream, model) else jpp.EOR_WINDOW_DONE


def make_jpip_app(archive: Any) -> JpipApp:
    """The ``/jpip`` application of the main archive, from its ``[jpip]`` settings."""
    s = archive.settings.jpip
    return JpipApp(CodestreamSource(archive.retrieve, s.cache_bytes), archive.settings.temp_dir / "jpip-sessions",
                   max_sessions=s.max_sessions,
                   session_idle_seconds=s.session_idle_seconds, openjpeg_dialect=s.openjpeg_tile_headers)
