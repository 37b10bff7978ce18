"""A SOAP 1.2 + WS-Addressing + MTOM endpoint as a WSGI application, shared by every IHE web service here.

What it does for each POST, in order: read the body (plain or MTOM, streamed,
no size limit beyond the root-part cap); parse the envelope with the
hardened parser; check WS-Addressing; dispatch on ``wsa:Action`` to an
:class:`Operation`, then check the body element's QName against it; swap
``xop:Include`` for attachments; validate the body against the schemas; call
the operation; and send its answer as an MTOM ``multipart/related`` message
(always multipart, action in the Content-Type, RelatesTo = the request's
MessageID), streamed from the iterable of attachments the operation
returns.  Faults are sent the same way, with the WS-A fault action.

``GET ?wsdl`` serves the endpoint's WSDL and ``GET ?xsd=PATH`` the schemas
it includes, with every schemaLocation rewritten to those URLs so that a
client (zeep in strict mode) can load the WSDL from the endpoint alone.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from lxml import etree
from wsgiref.util import request_uri

from werkzeug.wsgi import get_input_stream

from xdsi.soap.envelope import (
    Envelope,
    SoapFault,
    addressing_headers,
    build_envelope,
    fault_envelope,
    parse_envelope,
)
from xdsi.soap.validation import SCHEMA_DIR, SchemaInvalid, validate
from xdsi.wire.errors import MalformedBody, RequestTooLarge
from xdsi.wire.mtom import Attachment, IncomingMessage, MtomError, MtomWriter, OutgoingAttachment, read_message, resolve_xop
from xdsi.wire.xml import make_parser
from xdsi.xdsconst import ACTION_FAULT, NS_WSA

log = logging.getLogger(__name__)

WSDL_NS = "http://schemas.xmlsoap.org/wsdl/"
XSD_NS = "http://www.w3.org/2001/XMLSchema"
SOAP12_WSDL_NS = "http://schemas.xmlsoap.org/wsdl/soap12/"


@dataclass
class RequestContext:
    """What an operation may need beyond its body element."""

    envelope: Envelope
    message: IncomingMessage
    xop: dict[Any, Attachment]
    action: str
    environ: dict[str, Any]


@dataclass
class Reply:
    body: Any  # lxml element
    action: str
    attachments: Iterable[OutgoingAttachment] = ()


@dataclass
class Operation:
    name: str
    body_qnames: frozenset[str]  # Clark notation; the first element's QName must be one of these
    handler: Callable[[Any, RequestContext], Reply]
    normalize: Callable[[Any], Any] | None = None  # e.g. map a legacy namespace onto the schema's


@dataclass
class SoapEndpoint:
    operations: dict[str, Operation]  # by wsa:Action
    wsdl_file: Path
    schema_dir: Path = SCHEMA_DIR
    max_root_bytes: int = 32 * 1024 * 1024  # [http] max_soap_envelope
    spool_dir: str | None = None
    max_parts: int = 10_000  # [http] max_mtom_parts
    max_document_requests: int = 50_000  # [http] max_document_requests
    _xsd_cache: dict[tuple[str, str], bytes] = field(default_factory=dict)

    # -- WSGI --------------------------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method in ("GET", "HEAD"):
            return self._get(environ, start_response)
        if method != "POST":
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD, POST"), ("Content-Type", "text/plain")])
            return [b"use POST for SOAP requests, GET ?wsdl for the WSDL\n"]
        return self._post(environ, start_response)

    def _post(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        relates_to: str | None = None
        message: IncomingMessage | None = None
        try:
            try:
                content_type = environ.get("CONTENT_TYPE", "")
                declared = int(environ.get("CONTENT_LENGTH") or 0) if str(environ.get("CONTENT_LENGTH") or "").isdigit() else 0
                if declared > self.max_root_bytes and not content_type.lower().lstrip().startswith("multipart/"):
                    raise RequestTooLarge(f"SOAP envelope of {declared} bytes is larger than the maximum of {self.max_root_bytes}")
                stream = get_input_stream(environ, safe_fallback=False)
                message = read_message(stream, content_type, max_root_bytes=self.max_root_bytes, spool_dir=self.spool_dir, max_parts=self.max_parts)
            except RequestTooLarge:
                raise  # answered 413 below, not as a malformed message
            except MtomError as exc:
                raise SoapFault("Sender", f"malformed MIME/MTOM message: {exc}") from None
            env = parse_envelope(message.envelope)
            relates_to = env.addressing.message_id
            reply = self._dispatch(env, message, environ)
            body = build_envelope(reply.body, addressing_headers(reply.action, relates_to=relates_to, reply_to=None))
            writer = MtomWriter(body, reply.attachments, action=reply.action)
            start_response("200 OK", [("Content-Type", writer.content_type)])
            return _closing(writer, message)
        except (RequestTooLarge, MalformedBody) as exc:
            # 413 (RFC 9110 15.5.14) or 400 for the HTTP body itself, with a Sender fault so a SOAP client still gets an envelope
            log.info("SOAP request refused: %s", exc.reason)
            status = "413 Content Too Large" if exc.status == 413 else "400 Bad Request"
            return self._fault(SoapFault("Sender", exc.reason), relates_to, start_response, message, status=status)
        except SoapFault as fault:
            log.info("SOAP fault %s%s: %s", fault.code, f" ({fault.subcode})" if fault.subcode else "", fault.reason)
            return self._fault(fault, relates_to or fault.relates_to, start_response, message)
        except Exception:
            log.exception("internal error answering a SOAP request")
            fault = SoapFault("Receiver", "internal error in the Imaging Document Source; see its log")
            return self._fault(fault, relates_to, start_response, message)

    def _fault(
        self, fault: SoapFault, relates_to: str | None, start_response: Callable[..., Any], message: IncomingMessage | None, status: str | None = None
    ) -> Iterable[bytes]:
        if message is not None:
            message.close()
        writer = MtomWriter(fault_envelope(fault, relates_to), (), action=ACTION_FAULT)
        if status is None:
            status = "400 Bad Request" if fault.http_status == 400 else "500 Internal Server Error"
        start_response(status, [("Content-Type", writer.content_type)])
        return writer

    def _dispatch(self, env: Envelope, message: IncomingMessage, environ: dict[str, Any]) -> Reply:
        a = env.addressing
        if not a.action:
            raise SoapFault("Sender", "the wsa:Action header is required", f"{{{NS_WSA}}}MessageAddressingHeaderRequired")
        if not a.action_must_understand:
            log.warning("wsa:Action %s without mustUnderstand (IHE-WSA101); accepted", a.action)
        op = self.operations.get(a.action)
        if op is None:
            raise SoapFault("Sender", f"action {a.action!r} is not supported by this endpoint", f"{{{NS_WSA}}}ActionNotSupported")
        body = env.body
        if body.tag not in op.body_qnames:
            raise SoapFault("Sender", f"the body element {body.tag} does not match the action {a.action}")
        _check_document_count(body, self.max_document_requests)
        if op.normalize is not None:
            body = op.normalize(body)
        try:
            xop = resolve_xop(body, message.attachments)
        except MtomError as exc:
            raise SoapFault("Sender", str(exc)) from None
        try:
            validate(body)
        except SchemaInvalid as exc:
            raise SoapFault("Sender", f"the {etree.QName(body).localname} does not conform to its schema: {exc}") from None
        ctx = RequestContext(envelope=env, message=message, xop=xop, action=a.action, environ=environ)
        return op.handler(body, ctx)

    # -- WSDL and schemas --------------------------------------------------------------------------

    def _get(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        from urllib.parse import parse_qs

        qs = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        base = request_uri(environ, include_query=False)
        if "wsdl" in {k.lower() for k in qs}:
            data = self.wsdl(base)
        elif "xsd" in qs:
            data = self.xsd(base, qs["xsd"][0])
            if data is None:
                start_response("404 Not Found", [("Content-Type", "text/plain")])
                return [b"no such schema\n"]
        else:
            start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
            ops = "\n".join(f"  {name}" for name in sorted({op.name for op in self.operations.values()}))
            return [f"SOAP 1.2 endpoint; WSDL at {base}?wsdl\noperations:\n{ops}\n".encode()]
        start_response("200 OK", [("Content-Type", "text/xml; charset=utf-8"), ("Content-Length", str(len(data)))])
        return [data] if environ.get("REQUEST_METHOD") != "HEAD" else []

    def wsdl(self, base: str) -> bytes:
        root = etree.parse(str(self.wsdl_file), make_parser()).getroot()
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
        root = etree.parse(str(path), make_parser()).getroot()
        here = posixpath.dirname(rel)
        for el in root.iter(f"{{{XSD_NS}}}include", f"{{{XSD_NS}}}import"):
            loc = el.get("schemaLocation")
            if loc and "://" not in loc:
                el.set("schemaLocation", f"{base}?xsd={posixpath.normpath(posixpath.join(here, loc))}")
        data = etree.tostring(root, xml_declaration=True, encoding="UTF-8")
        self._xsd_cache[key] = data
        return data


def _check_document_count(body: Any, limit: int) -> None:
    """Refuse a request naming more than ``limit`` documents, before schema validation and retrieval.

    Counted over every ``*DocumentRequest`` element (RAD-69, ITI-43 and the
    WADO-WS forms), stopping at the first one past the limit.  A Sender fault
    rather than a RegistryError: the request as a whole is refused, and the
    client must split it (322k DocumentRequests once peaked at 942 MB).
    """
    n = 0
    for el in body.iter(etree.Element):
        if etree.QName(el).localname.endswith("DocumentRequest"):
            n += 1
            if n > limit:
                raise SoapFault("Sender", f"the request names more than {limit} documents; send at most {limit} DocumentRequests per request")


def _closing(writer: MtomWriter, message: IncomingMessage) -> Iterable[bytes]:
    """Stream the writer and release the request's spooled attachments when the response is done."""
    try:
        yield from writer
    except Exception:
        # headers are sent: the only honest signal left is to cut the connection
        log.exception("streaming the response failed; aborting it")
        raise
    finally:
        writer.close()
        message.close()
