"""``IheSoap12``: spyne's SOAP 1.2 protocol, extended with what IHE peers need and spyne 2.14 lacks.

spyne's ``Soap12`` dispatches on the body element's QName, parses with its own
parser, validates with a validator that rejects valid IHE requests, writes no
WS-Addressing headers, answers every fault with HTTP 500 and cannot send MTOM.
This subclass keeps spyne's model (the service method is found through
``ctx.method_request_string`` and the body is mapped to the method's
``ComplexModel`` by spyne) and overrides the protocol hooks:

* ``decompose_incoming_envelope``: the SOAP 1.2 processing model of
  :func:`xdsi.wire.soap.parse_envelope` (one Header and one Body,
  ``mustUnderstand``, ``wsse:Security`` accepted and summarised, WS-A checks);
  with ``[xua]`` on, the SAML assertion in ``wsse:Security`` validated
  (:mod:`xdsi.security.xua`) *before* anything else is done for the request,
  a refusal answered with the WS-Security fault, the identity kept as the
  request's :class:`~xdsi.security.principal.Principal`;
  dispatch on ``wsa:Action`` through a :class:`Route` table (legacy actions
  and the swapped WADO namespace too); the body must match the action; at most
  ``max_document_requests`` documents; ``xop:Include`` resolved; the body
  validated against the official schemas *before* spyne maps it;
* ``serialize``: spyne writes the response body, which goes into an envelope
  with the reply's WS-A headers (Action, MessageID, RelatesTo); faults are
  SOAP 1.2 faults with qualified subcodes and ``NotUnderstood`` blocks;
* ``XopDocument`` members become ``xop:Include`` references whose bytes
  :meth:`create_out_string` streams as MIME parts (:class:`MtomWriter`);
* ``fault_to_http_response_code``: the SOAP 1.2 HTTP binding's status (400 for
  Sender, 413 for an over-size message, else 500).

Per-request state lives in ``ctx.udc`` (an :class:`Exchange`), never on the
protocol object, which every request shares.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

from lxml import etree
from spyne import Fault, rpc
from spyne.protocol.soap import Soap12

from xdsi.wire.soap import Envelope, SoapFault, addressing_headers, envelope_element, fault_envelope_element, parse_envelope
from xdsi.soap.models import StreamedDocument, XopDocument, XPathResult, XPathValue
from xdsi.soap.validation import SchemaInvalid, validate
from xdsi.wire.mtom import IncomingMessage, MtomError, MtomWriter, OutgoingAttachment, new_content_id, resolve_xop, xop_include
from xdsi.standards.constants import ACTION_FAULT, NS_WSA, NS_XDS

if TYPE_CHECKING:
    from xdsi.security.principal import Principal
    from xdsi.security.xua import XuaPolicy, XuaRefused

log = logging.getLogger(__name__)

WSA = f"{{{NS_WSA}}}"
_STATUS_TEXT = {400: "400 Bad Request", 413: "413 Content Too Large", 500: "500 Internal Server Error"}


def ihe_operation(request: Any, request_element: str, response: Any, response_element: str) -> Any:
    """``@rpc`` of an IHE operation: one body element in and one out (bare), named as the schemas name them (Clark)."""
    return rpc(request, _body_style="bare", _in_message_name=request_element, _returns=response, _out_message_name=response_element)


def rename_namespace(el: Any, old: str, new: str) -> Any:
    """Move every element of namespace ``old`` to ``new`` (the legacy swapped WADO namespace, in and out)."""
    for e in el.iter():
        if isinstance(e.tag, str) and e.tag.startswith("{" + old + "}"):
            e.tag = "{" + new + "}" + e.tag[len(old) + 2 :]
    etree.cleanup_namespaces(el)
    return el


@dataclass(frozen=True)
class Route:
    """What a ``wsa:Action`` means: which spyne method (by its request element), and how to answer.

    ``body_qnames``: the body element QNames (Clark) this action accepts, before
    ``normalize`` maps a legacy spelling onto ``method`` (the schema's);
    ``denormalize(response_body, request_qname)`` maps the response back into
    the spelling of the request *body* as received (its QName, before
    ``normalize``), which is what the client parses the answer with; the
    action a client sends and the namespace its body uses need not agree.
    """

    method: str
    response_action: str
    body_qnames: frozenset[str]
    normalize: Callable[[Any], Any] | None = None
    denormalize: Callable[[Any, str], Any] | None = None


@dataclass
class Exchange:
    """One SOAP request/response, carried in ``ctx.udc``: what the services and the protocol share."""

    message: IncomingMessage
    context: Any = None  # what the service methods work with (e.g. the Imaging Document Source)
    envelope: Envelope | None = None
    route: Route | None = None
    action: str | None = None
    request_qname: str = ""  # the body element as received, before Route.normalize
    xop: dict[Any, Any] = field(default_factory=dict)
    relates_to: str | None = None
    reply_action: str | None = None
    attachments: list[OutgoingAttachment] = field(default_factory=list)
    closers: list[Callable[[], None]] = field(default_factory=list)
    principal: "Principal | None" = None  # the XUA-authenticated user ([xua]), for the audit trail
    writer: MtomWriter | None = None  # the response message, once create_out_string made it (its file parts can be sendfile'd)

    def on_close(self, fn: Callable[[], None]) -> None:
        """Release ``fn``'s resources when the response is done (streamed, failed or abandoned)."""
        self.closers.append(fn)

    def close(self) -> None:
        for fn in self.closers:
            try:
                fn()
            except Exception:  # releasing one must not keep the others
                log.exception("releasing a SOAP response's resources failed")
        self.closers.clear()
        self.message.close()


#: readers of a request body element (Clark name -> the object the operation receives), used instead of spyne's
#: generic deserialiser for the few large, fixed-shape requests (RAD-69: one element per requested instance)
BODY_READERS: dict[str, Callable[[Any], Any]] = {}
_XSI_NIL = "{http://www.w3.org/2001/XMLSchema-instance}nil"


def text_value(el: Any) -> str | None:
    """An xsd:string element's value as spyne reads it: None when absent or nil, '' when empty."""
    if el is None or el.get(_XSI_NIL) in ("true", "1"):
        return None
    return el.text or ""


def _take_streamed_documents(ctx: Any) -> list[Any] | None:
    """The DocumentResponse list of a RetrieveDocumentSetResponse whose documents are all streamed, taken out of it.

    Those are written by :meth:`IheSoap12._document_responses` after spyne has written the rest
    (the RegistryResponse); None (spyne writes everything) for any other answer, or a document
    response of another shape.
    """
    from xdsi.soap.models import DocumentResponse, RetrieveDocumentSetResponseType

    out = ctx.out_object[0] if isinstance(ctx.out_object, (list, tuple)) and len(ctx.out_object) == 1 else None
    if type(out) is not RetrieveDocumentSetResponseType or not out.DocumentResponse:
        return None
    documents = list(out.DocumentResponse)
    for d in documents:
        if type(d) is not DocumentResponse or not isinstance(d.Document, StreamedDocument):
            return None
        if not all(isinstance(v, str) for v in (d.RepositoryUniqueId, d.DocumentUniqueId, d.mimeType)):
            return None
        if d.HomeCommunityId is not None and not isinstance(d.HomeCommunityId, str):
            return None
    out.DocumentResponse = None
    return documents


class IheFault(Fault):
    """A :class:`SoapFault` travelling through spyne's fault path (spyne catches only its own ``Fault``)."""

    def __init__(self, fault: SoapFault, http_status: int | None = None) -> None:
        super().__init__(f"Client.{fault.code}" if fault.code == "Sender" else f"Server.{fault.code}", fault.reason)
        self.soap_fault = fault
        self.http_status = http_status or fault.http_status


def as_soap_fault(error: Any) -> SoapFault:
    """Any fault spyne raised (mapping, a service method's exception) as the SOAP 1.2 fault to send."""
    if isinstance(error, IheFault):
        return error.soap_fault
    code = str(getattr(error, "faultcode", "Server"))
    if code.startswith("Client"):
        return SoapFault("Sender", str(getattr(error, "faultstring", "") or "the request was not understood"))
    # a service method's unexpected exception: spyne logged it; the peer learns nothing of our internals
    return SoapFault("Receiver", "internal error in the Imaging Document Source; see its log")


class IheSoap12(Soap12):
    """SOAP 1.2 for IHE peers; see the module docstring for what it adds to spyne's ``Soap12``."""

    def __init__(
        self,
        routes: dict[str, Route],
        *,
        max_document_requests: int = 50_000,
        xua: "XuaPolicy | None" = None,
        on_xua_refused: "Callable[[Any, XuaRefused], None] | None" = None,
    ) -> None:
        super().__init__(validator=None, cleanup_namespaces=True)
        self.routes = routes
        self.max_document_requests = max_document_requests
        self.xua = xua  # None: [xua] off, a wsse:Security header is only summarised in the log
        self.on_xua_refused = on_xua_refused  # (spyne context, refusal): the audit of an authentication failure
        self._method_keys: dict[str, str] | None = None
        self.serialization_handlers[XopDocument] = self._xop_to_parent
        self.serialization_handlers[XPathValue] = self._xpath_to_parent

    # -- in ---------------------------------------------------------------------------------------

    def create_in_document(self, ctx: Any, charset: str | None = None) -> None:
        # the root part as bytes: lxml reads the encoding from the XML declaration, parsed in decompose
        ctx.in_document = b"".join(ctx.in_string)

    def decompose_incoming_envelope(self, ctx: Any, message: Any = Soap12.REQUEST) -> None:
        ex: Exchange = ctx.udc
        try:
            env = parse_envelope(ctx.in_document)
        except SoapFault as fault:
            ex.relates_to = fault.relates_to
            raise IheFault(fault) from None
        ex.envelope = env
        ex.relates_to = env.addressing.message_id
        if self.xua is not None:
            self._authenticate(ctx, ex, env)
        try:
            body = self._route(ex, env)
        except SoapFault as fault:
            raise IheFault(fault) from None
        ctx.in_document = env.root
        ctx.in_header_doc = None
        ctx.in_body_doc = body
        ctx.method_request_string = self.method_key(ex.route.method)  # type: ignore[union-attr]

    def _authenticate(self, ctx: Any, ex: Exchange, env: Envelope) -> None:
        """XUA (ITI-40 3.40.4.1.3): validate the assertion, or answer with the WS-Security fault and audit the failure.

        Done before routing and schema validation, so an unauthenticated peer costs no more
        than the envelope parse and learns nothing about the request it sent.
        """
        from xdsi.security.principal import ENVIRON_KEY
        from xdsi.security.xua import XuaRefused

        assert self.xua is not None
        try:
            principal = self.xua.check(env.security.element if env.security is not None else None)
        except XuaRefused as refused:
            log.warning("XUA refused (%s): %s", etree.QName(refused.subcode).localname, refused.detail)
            if self.on_xua_refused is not None:
                try:
                    self.on_xua_refused(ctx, refused)
                except Exception:  # the audit must never change the answer
                    log.exception("auditing a refused XUA assertion failed")
            raise IheFault(SoapFault("Sender", refused.reason, refused.subcode)) from None
        if principal is None:
            return
        ex.principal = principal
        environ = getattr(ctx.transport, "req_env", None)
        if isinstance(environ, dict):
            # the user the request is made for; an HTTP-level identity (bearer, TLS) stays in "xdsi.principal" if set
            environ["xdsi.xua.principal"] = principal
            current = environ.get(ENVIRON_KEY)
            if current is None or getattr(current, "via", None) == "anonymous":
                environ[ENVIRON_KEY] = principal

    def method_key(self, request_element: str) -> str:
        """spyne's key of the ``@rpc`` method whose bare input message is ``request_element`` (Clark)."""
        keys = self._method_keys
        if keys is None:
            keys = {}
            for key, descriptors in self.app.interface.service_method_map.items():
                for d in descriptors:
                    attrs = d.in_message.Attributes
                    keys[f"{{{attrs.sub_ns}}}{attrs.sub_name}"] = key
            self._method_keys = keys
        return keys.get(request_element, request_element)

    def _route(self, ex: Exchange, env: Envelope) -> Any:
        a = env.addressing
        if not a.action:
            raise SoapFault("Sender", "the wsa:Action header is required", f"{WSA}MessageAddressingHeaderRequired")
        if not a.action_must_understand:
            log.warning("wsa:Action %s without mustUnderstand (IHE-WSA101); accepted", a.action)
        route = self.routes.get(a.action)
        if route is None:
            raise SoapFault("Sender", f"action {a.action!r} is not supported by this endpoint", f"{WSA}ActionNotSupported")
        body = env.body
        if body.tag not in route.body_qnames:
            raise SoapFault("Sender", f"the body element {body.tag} does not match the action {a.action}")
        _check_document_count(body, self.max_document_requests)
        ex.request_qname = body.tag
        if route.normalize is not None:
            body = route.normalize(body)
        try:
            ex.xop = resolve_xop(body, ex.message.attachments)
        except MtomError as exc:
            raise SoapFault("Sender", str(exc)) from None
        try:
            validate(body)
        except SchemaInvalid as exc:
            raise SoapFault("Sender", f"the {etree.QName(body).localname} does not conform to its schema: {exc}") from None
        ex.route, ex.action = route, a.action
        return body

    def from_element(self, ctx: Any, cls: Any, element: Any) -> Any:
        """spyne's reader, except for a request body that has a reader of its own in :data:`BODY_READERS`.

        The body has been validated against the official schema already (:meth:`_route`), so such a
        reader only maps elements to attributes; spyne's generic one spent ~0.1 ms of Python per
        element (a 200-instance RAD-69 request: a quarter of the time before the first byte).
        """
        descriptor = getattr(ctx, "descriptor", None)
        if descriptor is not None and cls is descriptor.in_message and element.get(_XSI_NIL) is None:
            reader = BODY_READERS.get(element.tag)
            if reader is not None:
                return reader(element)
        return super().from_element(ctx, cls, element)

    # -- out --------------------------------------------------------------------------------------

    def serialize(self, ctx: Any, message: Any) -> None:
        ex: Exchange = ctx.udc
        if ctx.out_error is not None:
            fault = as_soap_fault(ctx.out_error)
            log.info("SOAP fault %s%s: %s", fault.code, f" ({fault.subcode})" if fault.subcode else "", fault.reason)
            ex.attachments = []
            ctx.out_document = fault_envelope_element(fault, ex.relates_to)
            ctx.out_body_doc = ctx.out_document[-1]
            ex.reply_action = ACTION_FAULT
            return
        documents = _take_streamed_documents(ctx)
        try:
            super().serialize(ctx, message)  # spyne maps the returned ComplexModel into ctx.out_body_doc
        finally:
            if documents is not None:
                ctx.out_object[0].DocumentResponse = documents
        body = ctx.out_body_doc[0]
        if documents is not None:
            self._document_responses(ctx, body, documents)
        route = ex.route
        assert route is not None
        if route.denormalize is not None:
            body = route.denormalize(body, ex.request_qname)
        ctx.out_document = envelope_element(body, addressing_headers(route.response_action, relates_to=ex.relates_to, reply_to=None))
        ex.reply_action = route.response_action

    def create_out_string(self, ctx: Any, charset: str | None = None) -> None:
        """The response as an always-multipart MTOM message, produced chunk by chunk while it is sent."""
        ex: Exchange = ctx.udc
        envelope = etree.tostring(ctx.out_document, xml_declaration=True, encoding="UTF-8")
        writer = MtomWriter(envelope, ex.attachments, action=ex.reply_action)
        ctx.out_string = writer  # spyne passes it through unjoined (chunked=True): read as it is sent
        ex.writer = writer
        ctx.transport.resp_headers["Content-Type"] = writer.content_type

    def fault_to_http_response_code(self, fault: Any) -> str:
        status = fault.http_status if isinstance(fault, IheFault) else as_soap_fault(fault).http_status
        return _STATUS_TEXT.get(status, "500 Internal Server Error")

    def _document_responses(self, ctx: Any, parent: Any, documents: list[Any]) -> None:
        """The ``DocumentResponse`` elements of a RAD-69 / ITI-43 response, written with lxml, as spyne writes them.

        Why: spyne's generic serialiser spent ~0.15 ms of Python per DocumentResponse (a
        200-instance RAD-69 spent about half its time before the first byte there).  These
        elements have one fixed shape (xds-b ``DocumentResponseType``): the optional
        HomeCommunityId, RepositoryUniqueId, DocumentUniqueId, mimeType, and the Document as an
        ``xop:Include`` of an attachment (what :meth:`_xop_to_parent` does for spyne).
        """
        sub = etree.SubElement
        tag = {name: f"{{{NS_XDS}}}{name}" for name in ("DocumentResponse", "HomeCommunityId", "RepositoryUniqueId", "DocumentUniqueId", "mimeType", "Document")}
        for d in documents:
            el = sub(parent, tag["DocumentResponse"])
            if d.HomeCommunityId is not None:
                sub(el, tag["HomeCommunityId"]).text = d.HomeCommunityId
            sub(el, tag["RepositoryUniqueId"]).text = d.RepositoryUniqueId
            sub(el, tag["DocumentUniqueId"]).text = d.DocumentUniqueId
            sub(el, tag["mimeType"]).text = d.mimeType
            inst: StreamedDocument = d.Document
            cid = new_content_id()
            xop_include(sub(el, tag["Document"]), cid)
            ctx.udc.attachments.append(OutgoingAttachment(cid, inst.chunks, inst.content_type))
            if inst.close is not None:
                ctx.udc.on_close(inst.close)

    def _xop_to_parent(self, ctx: Any, cls: Any, inst: StreamedDocument, parent: Any, ns: str, name: str = "Document", **kwargs: Any) -> None:
        elt = self._gen_tag(cls, ns, name, **kwargs)
        cid = new_content_id()
        xop_include(elt, cid)
        parent.append(elt)
        ctx.udc.attachments.append(OutgoingAttachment(cid, inst.chunks, inst.content_type))
        if inst.close is not None:
            ctx.udc.on_close(inst.close)

    def _xpath_to_parent(self, ctx: Any, cls: Any, inst: XPathResult, parent: Any, ns: str, name: str = "XPathResponse", **kwargs: Any) -> None:
        elt = self._gen_tag(cls, ns, name, **kwargs)
        elt.text = inst.text or None
        for e in inst.elements:
            elt.append(e)
        parent.append(elt)


def fault_reply(fault: SoapFault, relates_to: str | None, http_status: int | None = None) -> tuple[str, list[tuple[str, str]], Iterable[bytes]]:
    """(status line, headers, body) of a fault sent before spyne saw the request (an unreadable HTTP body)."""
    envelope = etree.tostring(fault_envelope_element(fault, relates_to), xml_declaration=True, encoding="UTF-8")
    writer = MtomWriter(envelope, (), action=ACTION_FAULT)
    return _STATUS_TEXT.get(http_status or fault.http_status, "500 Internal Server Error"), [("Content-Type", writer.content_type)], writer


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
