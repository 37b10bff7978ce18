"""``SoapApplication``: spyne's ``WsgiApplication`` with xdsi's streaming MTOM transport and the official WSDL.

What the subclass changes, and why:

* **Request bodies** are read by the streaming MTOM reader
  (:func:`xdsi.wire.mtom.read_message`) before spyne sees them: attachments
  spooled to temporary files, the root part capped at ``max_root_bytes``, the
  part count at ``max_parts``.  spyne then receives only the root envelope
  (spyne's own MTOM input needs ~17x the payload in memory and fails on a root
  part with an XML declaration).  An unreadable body is answered here with a
  Sender fault (HTTP 400, or 413 over a limit).
* **Responses** are whatever :meth:`IheSoap12.create_out_string` produced: an
  MTOM writer that reads each attachment only when it reaches it.  spyne passes
  it through unjoined (``chunked=True``); this class wraps it so the request's
  spools and the produced documents are released when the response ends,
  also when the client goes away mid-stream.
* **GET** ``?wsdl`` serves the official IHE/DICOM WSDL (not spyne's generated
  one, which zeep cannot use for IHE) and ``?xsd=PATH`` the schemas it
  includes, every ``schemaLocation`` rewritten to those URLs so a client (zeep
  in strict mode) can load the WSDL from the endpoint alone.
* The per-request :class:`~xdsi.soap.protocol.Exchange` is put in ``ctx.udc``
  by a ``wsgi_call`` event listener (spyne's hook for user context).
"""

from __future__ import annotations

import io
import logging
from itertools import chain
import posixpath
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import parse_qs
from wsgiref.util import request_uri

from lxml import etree
from spyne import Application
from spyne import const as spyne_const
from spyne.server.wsgi import WsgiApplication
from werkzeug.wsgi import get_input_stream

from xdsi.soap.protocol import Exchange, fault_reply
from xdsi.standards.constants import MIME_SOAP12
from xdsi.wire.errors import MalformedBody, RequestTooLarge
from xdsi.wire.media import parse_content_type
from xdsi.wire.mtom import MtomError, MtomWriter, read_message
from xdsi.wire.soap import SoapFault
from xdsi.wire.xml import make_parser

log = logging.getLogger(__name__)

# spyne closes each method context with a full gc.collect() (at most once a second) "to have file
# descriptors returned in a timely manner".  It does so in handle_rpc, before the response is
# streamed, so every SOAP request paid a collection of the whole heap: ~0.1 s, 8 % of RAD-69
# throughput on a 2,000-document study (py-spy, bench/retrieve.py).  Here every spool and produced
# document is closed explicitly (Exchange.close), so spyne's own constant turns the collection off.
spyne_const.MIN_GC_INTERVAL = float("inf")

WSDL_NS = "http://schemas.xmlsoap.org/wsdl/"
XSD_NS = "http://www.w3.org/2001/XMLSchema"
SOAP12_WSDL_NS = "http://schemas.xmlsoap.org/wsdl/soap12/"
EXCHANGE_KEY = "xdsi.soap.exchange"
MESSAGE_KEY = "xdsi.soap.message"


class SoapApplication(WsgiApplication):
    """The WSGI application of one spyne ``Application`` (an IHE endpoint); see the module docstring."""

    def __init__(
        self,
        app: Application,
        *,
        context: Any,
        wsdl_file: Path,
        schema_dir: Path,
        max_root_bytes: int = 32 * 1024 * 1024,
        spool_dir: str | None = None,
        max_parts: int = 10_000,
    ) -> None:
        # the root part was read and capped at max_root_bytes already; spyne re-reads it from memory
        super().__init__(app, chunked=True, max_content_length=max_root_bytes, block_length=256 * 1024)
        self.context = context
        self.wsdl_file = wsdl_file
        self.schema_dir = schema_dir
        self.max_root_bytes = max_root_bytes
        self.spool_dir = spool_dir
        self.max_parts = max_parts
        self._xsd_cache: dict[tuple[str, str], bytes] = {}
        self.event_manager.add_listener("wsgi_call", self._begin)

    def _begin(self, ctx: Any) -> None:
        env = ctx.transport.req_env
        ex = Exchange(message=env[MESSAGE_KEY], context=self.context)
        ctx.udc = ex
        env[EXCHANGE_KEY] = ex

    # -- WSGI --------------------------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any], wsgi_url: str | None = None) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method in ("GET", "HEAD"):
            return self._get(environ, start_response)
        if method != "POST":
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD, POST"), ("Content-Type", "text/plain")])
            return [b"use POST for SOAP requests, GET ?wsdl for the WSDL\n"]
        try:
            message = self._read(environ)
        except (RequestTooLarge, MalformedBody) as exc:
            # 413 (RFC 9110 15.5.14) or 400 for the HTTP body itself, with a Sender fault so a SOAP client still gets an envelope
            log.info("SOAP request refused: %s", exc.reason)
            status, headers, body = fault_reply(SoapFault("Sender", exc.reason), None, exc.status)
            start_response(status, headers)
            return body
        except MtomError as exc:
            status, headers, body = fault_reply(SoapFault("Sender", f"malformed MIME/MTOM message: {exc}"), None)
            start_response(status, headers)
            return body
        inner = dict(environ)
        inner.update(
            {
                "wsgi.input": io.BytesIO(message.envelope),
                "CONTENT_LENGTH": str(len(message.envelope)),
                "CONTENT_TYPE": f"{MIME_SOAP12}; charset=utf-8",
                MESSAGE_KEY: message,
            }
        )
        try:
            result = self.handle_rpc(inner, start_response)
        except BaseException:
            ex = inner.get(EXCHANGE_KEY)
            (ex.close if ex is not None else message.close)()
            raise
        ex = inner.get(EXCHANGE_KEY)
        return _Closing(result, ex or message, getattr(ex, "writer", None))

    def _read(self, environ: dict[str, Any]) -> Any:
        content_type = environ.get("CONTENT_TYPE", "")
        length = str(environ.get("CONTENT_LENGTH") or "")
        declared = int(length) if length.isdigit() else 0
        if declared > self.max_root_bytes and not parse_content_type(content_type)[0].startswith("multipart/"):
            raise RequestTooLarge(f"SOAP envelope of {declared} bytes is larger than the maximum of {self.max_root_bytes}")
        stream = get_input_stream(environ, safe_fallback=False)
        return read_message(stream, content_type, max_root_bytes=self.max_root_bytes, spool_dir=self.spool_dir, max_parts=self.max_parts)

    # -- WSDL and schemas --------------------------------------------------------------------------

    def _get(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        qs = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        base = request_uri(environ, include_query=False)
        if "wsdl" in {k.lower() for k in qs}:
            data = self.wsdl(base)
        elif "xsd" in qs:
            found = self.xsd(base, qs["xsd"][0])
            if found is None:
                start_response("404 Not Found", [("Content-Type", "text/plain")])
                return [b"no such schema\n"]
            data = found
        else:
            start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
            ops = "\n".join(f"  {name}" for name in sorted(self.operation_names()))
            return [f"SOAP 1.2 endpoint; WSDL at {base}?wsdl\noperations:\n{ops}\n".encode()]
        start_response("200 OK", [("Content-Type", "text/xml; charset=utf-8"), ("Content-Length", str(len(data)))])
        return [data] if environ.get("REQUEST_METHOD") != "HEAD" else []

    def operation_names(self) -> set[str]:
        """The operations the spyne services declare (``@rpc`` methods)."""
        return {m.operation_name for s in self.app.services for m in s.public_methods.values()}

    def wsdl(self, base: str) -> bytes:
        root = etree.parse(str(self.wsdl_file), make_parser(remove_comments=True)).getroot()
        wsdl_dir = self.wsdl_file.parent
        for el in root.iter(f"{{{XSD_NS}}}include", f"{{{XSD_NS}}}import"):
            loc = el.get("schemaLocation")
            if loc:
                rel = (wsdl_dir / loc).resolve().relative_to(self.schema_dir.resolve()).as_posix()
                el.set("schemaLocation", f"{base}?xsd={rel}")
        for addr in root.iter(f"{{{SOAP12_WSDL_NS}}}address"):
            addr.set("location", base)
        return etree.tostring(root, xml_declaration=True, encoding="UTF-8")

    def xsd(self, base: str, rel: str) -> bytes | None:
        rel = posixpath.normpath(rel.replace("\\", "/")).lstrip("/")
        if rel.startswith("..") or not rel.endswith(".xsd"):
            return None
        key = (base, rel)
        if key in self._xsd_cache:
            return self._xsd_cache[key]
        path = (self.schema_dir / rel).resolve()
        if not path.is_file() or self.schema_dir.resolve() not in path.parents:
            return None
        root = etree.parse(str(path), make_parser(remove_comments=True)).getroot()
        here = posixpath.dirname(rel)
        for el in root.iter(f"{{{XSD_NS}}}include", f"{{{XSD_NS}}}import"):
            loc = el.get("schemaLocation")
            if loc and "://" not in loc:
                el.set("schemaLocation", f"{base}?xsd={posixpath.normpath(posixpath.join(here, loc))}")
        data = etree.tostring(root, xml_declaration=True, encoding="UTF-8")
        self._xsd_cache[key] = data
        return data


class _Closing:
    """spyne's response, streamed; the request's spools and produced documents released when it is done.

    It is a plain WSGI iterable of bytes; :meth:`regions` offers the same message with each
    attachment that is a whole file as a :class:`~xdsi.wire.regions.FileRegion`, so the HTTP server
    can ``sendfile`` it (:class:`xdsi.web.httpd.RegionGateway`).  spyne's result is
    ``chain(writer, ())``: once the writer's regions are taken, iterating the result gives nothing
    more of it.
    """

    def __init__(self, result: Iterable[bytes], owner: Any, writer: MtomWriter | None) -> None:
        self.result = result
        self.owner = owner
        self.writer = writer
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        return self._stream(iter(self.result))  # type: ignore[return-value]

    def regions(self) -> Iterator[Any]:
        if self.writer is None:
            return self._stream(iter(self.result))
        return self._stream(chain(self.writer.regions(), self.result))

    def _stream(self, items: Iterator[Any]) -> Iterator[Any]:
        try:
            yield from items
        except Exception:
            # headers are sent: the only honest signal left is to cut the connection
            log.exception("streaming the response failed; aborting it")
            raise
        finally:
            self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            close = getattr(self.result, "close", None)
            if close is not None:
                close()
        finally:
            self.owner.close()
