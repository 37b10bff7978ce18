"""zeep clients for the XDS.b registry and repository, built from the official IHE WSDLs.

zeep builds each request from the WSDL and parses each reply (MTOM replies
included); xdsi customises it only where zeep's documented extension points
allow, so a zeep upgrade within the pinned major version cannot break it:

* :class:`IheAddressing`, a zeep ``Plugin``: its ``egress`` puts the IHE
  WS-Addressing headers (ITI TF-2 V.3.2.2: wsa:Action with
  ``mustUnderstand="true"``, wsa:MessageID, wsa:ReplyTo anonymous, wsa:To)
  built by :func:`xdsi.wire.soap.addressing_headers`, in place of zeep's
  own, and swaps in the ebRIM ``SubmitObjectsRequest`` built with lxml
  (:mod:`xdsi.xds.metadata`): ebRIM's ``RegistryObjectList`` uses the abstract
  ``rim:Identifiable`` substitution group, which zeep cannot serialise from
  Python values.  Its ``ingress`` checks that the reply relates to the request.
* :class:`MtomTransport`, a zeep ``Transport`` overriding ``post_xml`` (the
  method zeep documents for customising how the envelope is sent): ITI-41
  and ITI-43 go out as MTOM/XOP (ITI TF-2 V.8/V.9) through
  :class:`xdsi.wire.mtom.MtomWriter`.  Each ``xds:Document`` becomes an
  ``xop:Include`` whose bytes are read from the caller's source only while
  the HTTP body is written, so a Provide and Register of any size is never
  held in memory, nor base64-encoded.

Calls go through ``client.service[operation](...)``; what one call needs
beyond zeep's arguments (the lxml body, the document sources, the action)
travels in a context variable, so one client serves several threads.
"""

from __future__ import annotations

import contextvars
import copy
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Mapping, Union

import requests
from lxml import etree
from zeep import Client, Plugin, Settings as ZeepSettings
from zeep.transports import Transport

from xdsi.config import TlsSettings
from xdsi.wire.soap import readdress
from xdsi.wire.mtom import CHUNK, MtomError, MtomWriter, OutgoingAttachment, new_content_id, read_message, xop_include
from xdsi.standards import constants as C
from xdsi.wire.ebrs import RegistryError, RegistryResult

log = logging.getLogger(__name__)

STANDARDS_DIR = Path(__file__).resolve().parent.parent / "standards" / "ihe"
REGISTRY_WSDL = STANDARDS_DIR / "wsdl" / "XDS.b_DocumentRegistry.wsdl"
REPOSITORY_WSDL = STANDARDS_DIR / "wsdl" / "XDS.b_DocumentRepository.wsdl"
REPOSITORY_XSD = STANDARDS_DIR / "schema" / "IHE" / "XDS.b_DocumentRepository.xsd"

SOAP_HEADER = f"{{{C.NS_SOAP12}}}Header"
SOAP_BODY = f"{{{C.NS_SOAP12}}}Body"
XDS_DOCUMENT = f"{{{C.NS_XDS}}}Document"

#: What a document to send may be: its bytes, a file path, a binary file object or an iterable of byte chunks.
DocumentSource = Union[bytes, bytearray, memoryview, "os.PathLike[str]", IO[bytes], Iterable[bytes]]


class XdsTransportError(Exception):
    """The message did not reach the peer, or the peer did not answer with a SOAP message (retry later)."""


# --------------------------------------------------------------------------------------------------
# Document sources: read only when the HTTP body reaches them
# --------------------------------------------------------------------------------------------------


@dataclass
class _Source:
    """One xds:Document's bytes, produced chunk by chunk; ``size`` is None when it cannot be known up front."""

    doc_id: str
    value: Any
    size: int | None

    @classmethod
    def of(cls, doc_id: str, value: DocumentSource) -> "_Source":
        if isinstance(value, (bytes, bytearray, memoryview)):
            return cls(doc_id, value, memoryview(value).nbytes)
        if isinstance(value, str):
            raise TypeError(f"document {doc_id}: give bytes, a pathlib.Path or an iterable of bytes, not a str")
        if isinstance(value, os.PathLike):
            return cls(doc_id, Path(value), os.stat(value).st_size)
        if hasattr(value, "read") or isinstance(value, Iterable):
            return cls(doc_id, value, None)
        raise TypeError(f"document {doc_id}: {type(value).__name__} is not bytes, a path or an iterable of bytes")

    def chunks(self) -> Iterator[bytes]:
        v = self.value
        if isinstance(v, (bytes, bytearray, memoryview)):
            mv = memoryview(v).cast("B")
            for i in range(0, len(mv), CHUNK):
                yield bytes(mv[i : i + CHUNK])
            return
        if isinstance(v, Path):
            sent = 0
            with open(v, "rb") as f:
                while b := f.read(CHUNK):
                    sent += len(b)
                    yield b
            if sent != self.size:  # the Content-Length already promised is wrong now: abort the request
                raise ValueError(f"document {self.doc_id}: {v} changed size while it was sent ({self.size} -> {sent} bytes)")
            return
        if hasattr(v, "read"):
            while b := v.read(CHUNK):
                yield bytes(b)
            return
        for b in v:
            if not isinstance(b, (bytes, bytearray, memoryview)):
                raise TypeError(f"document {self.doc_id}: a chunk is {type(b).__name__}, not bytes")
            yield bytes(b)


# --------------------------------------------------------------------------------------------------
# One call's context, shared by the plugin and the transport
# --------------------------------------------------------------------------------------------------


@dataclass
class _Call:
    action: str
    body: etree._Element | None = None  # replaces the element of the same name that zeep built
    documents: dict[str, _Source] = field(default_factory=dict)
    message_id: str = ""
    response: requests.Response | None = None
    raw: str = ""


_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("xdsi_xds_call", default=None)


def _action_of(envelope: etree._Element) -> str:
    el = envelope.find(f"{SOAP_HEADER}/{{{C.NS_WSA}}}Action")
    return (el.text or "").strip() if el is not None else ""


class IheAddressing(Plugin):
    """zeep egress/ingress for IHE: WS-Addressing as ITI TF-2 V.3.2.2 wants it, and the lxml body swapped in.

    Without a call context (a plain ``client.service`` call) it adds the
    headers for the operation's own soapAction, which is what the IHE WSDLs give.
    """

    def egress(self, envelope: etree._Element, http_headers: dict[str, str], operation: Any, binding_options: dict[str, Any]) -> tuple[etree._Element, dict[str, str]]:
        call = _CALL.get()
        action = call.action if call is not None else (operation.soapaction or "")
        message_id = readdress(envelope, action, binding_options["address"])
        if call is not None:
            call.message_id = message_id
            if call.body is not None:
                _swap_body(envelope, call.body)
        return envelope, http_headers

    def ingress(self, envelope: etree._Element, http_headers: Any, operation: Any) -> tuple[etree._Element, Any]:
        call = _CALL.get()
        relates = envelope.find(f"{SOAP_HEADER}/{{{C.NS_WSA}}}RelatesTo")
        if call is not None and call.message_id and relates is not None and (relates.text or "").strip() != call.message_id:
            log.warning("reply to %s relates to %r, not to the request %s", call.action, (relates.text or "").strip(), call.message_id)
        return envelope, http_headers


def _swap_body(envelope: etree._Element, body: etree._Element) -> None:
    """Put a copy of ``body`` where zeep rendered the (empty) element of the same name."""
    soap_body = envelope.find(SOAP_BODY)
    target = next(soap_body.iter(body.tag), None) if soap_body is not None else None
    if target is None:
        raise ValueError(f"zeep built no {body.tag} to replace in the request")
    target.getparent().replace(target, copy.deepcopy(body))  # the caller's tree stays untouched


# --------------------------------------------------------------------------------------------------
# The transport: plain SOAP 1.2, or MTOM streamed
# --------------------------------------------------------------------------------------------------


class _Body:
    """An HTTP request body that is an iterable of chunks (requests sends it with chunked encoding)."""

    def __init__(self, writer: MtomWriter) -> None:
        self.writer = writer

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.writer)

    def __repr__(self) -> str:  # zeep logs the message at DEBUG: never the bytes
        return f"<MTOM body {self.writer.content_type}>"


class _SizedBody(_Body):
    """A body whose length is known before it is read: requests sends a Content-Length, not chunked encoding."""

    def __init__(self, writer: MtomWriter, length: int) -> None:
        super().__init__(writer)
        self.length = length

    def __len__(self) -> int:
        return self.length


def _framing_length(writer: MtomWriter) -> int:
    """The bytes the writer adds around the attachments' content (MIME headers, boundaries, envelope)."""
    probe = copy.copy(writer)
    probe.attachments = [OutgoingAttachment(a.content_id, lambda: (), a.content_type) for a in writer.attachments]  # type: ignore[union-attr]
    return sum(len(c) for c in probe)


class MtomTransport(Transport):
    """A zeep transport that sends ITI-41 and ITI-43 as MTOM/XOP, documents streamed from their sources."""

    MTOM_ACTIONS = frozenset({C.ACTION_ITI41, C.ACTION_ITI43})

    def __init__(self, *, timeout: float = 60.0, tls: TlsSettings | None = None) -> None:
        from xdsi.security.tls import https_session

        # https:// endpoints: our [tls] certificate, the peer verified against ca_certificates (ITI-19)
        session = https_session(tls or TlsSettings())
        session.trust_env = False  # never route registry traffic through an environment proxy by accident
        from xdsi.security.clock import observe

        session.hooks["response"].append(observe)  # Consistent Time: the peer's Date against our clock (xdsi status)
        super().__init__(session=session, timeout=timeout, operation_timeout=timeout)

    def post_xml(self, address: str, envelope: etree._Element, headers: dict[str, str]) -> requests.Response:
        call = _CALL.get()
        action = _action_of(envelope)
        headers = {k: v for k, v in headers.items() if k.lower() not in ("soapaction", "content-type")}
        body: Any
        if action in self.MTOM_ACTIONS:
            parts = _xop_documents(envelope, call.documents if call is not None else {})
            writer = MtomWriter(etree.tostring(envelope, xml_declaration=True, encoding="UTF-8"), [a for a, _ in parts], action=action)
            sizes = [size for _, size in parts]
            body = _Body(writer) if None in sizes else _SizedBody(writer, _framing_length(writer) + sum(s or 0 for s in sizes))
            headers["Content-Type"] = writer.content_type
        else:
            body = etree.tostring(envelope, xml_declaration=True, encoding="UTF-8")
            headers["Content-Type"] = f'application/soap+xml; charset=utf-8; action="{action}"'
        try:
            response = self.post(address, body, headers)
        except requests.RequestException as exc:
            raise XdsTransportError(f"{exc.__class__.__name__}: {exc}") from exc
        raw = _soap_text(response)
        if call is not None:
            call.response, call.raw = response, raw
        if response.status_code != 200 and not raw.lstrip().startswith("<"):
            raise XdsTransportError(f"HTTP {response.status_code} from {address}: {response.text[:200]}")
        return response


def _xop_documents(envelope: etree._Element, documents: Mapping[str, _Source]) -> list[tuple[OutgoingAttachment, int | None]]:
    """Every xds:Document with a source becomes an ``xop:Include``; (attachment, size) in document order."""
    out: list[tuple[OutgoingAttachment, int | None]] = []
    seen: set[str] = set()
    for el in envelope.iter(XDS_DOCUMENT):
        doc_id = el.get("id", "")
        source = documents.get(doc_id)
        if source is None:
            continue
        if doc_id in seen:
            raise ValueError(f"two xds:Document elements with id {doc_id}")
        seen.add(doc_id)
        cid = new_content_id()
        xop_include(el, cid)
        out.append((OutgoingAttachment(cid, source.chunks), source.size))
    missing = set(documents) - seen
    if missing:
        raise ValueError(f"no xds:Document in the request for {sorted(missing)}")
    return out


def _soap_text(response: requests.Response) -> str:
    """The SOAP envelope text of a reply, MTOM or not, for the outbox record."""
    ctype = response.headers.get("Content-Type", "")
    if "multipart/related" in ctype.lower():
        try:
            with read_message(io.BytesIO(response.content), ctype) as message:
                return message.envelope.decode("utf-8", "replace")
        except MtomError:  # malformed multipart: keep what arrived
            return response.content[:100000].decode("utf-8", "replace")
    return response.content[:1000000].decode("utf-8", "replace")


# --------------------------------------------------------------------------------------------------
# The clients
# --------------------------------------------------------------------------------------------------


def _result_from(result: Any, raw: str) -> RegistryResult:
    """A RegistryResponse parsed by zeep (a CompoundValue) -> RegistryResult."""
    errors: list[RegistryError] = []
    lst = getattr(result, "RegistryErrorList", None)
    for e in getattr(lst, "RegistryError", None) or []:
        errors.append(RegistryError(e.errorCode or "", e.codeContext or "", e.location or None, e.severity or ""))
    return RegistryResult(status=result.status, errors=errors, raw=raw)


class _WsdlClient:
    """One zeep client per WSDL; :meth:`call` runs one operation with its IHE context."""

    def __init__(self, wsdl: Path, binding: str, address: str, timeout: float, tls: TlsSettings | None = None) -> None:
        self.transport = MtomTransport(timeout=timeout, tls=tls)
        settings = ZeepSettings(strict=True, xml_huge_tree=False, forbid_dtd=True, forbid_entities=True, forbid_external=True)
        self.client = Client(str(wsdl), transport=self.transport, settings=settings, plugins=[IheAddressing()])
        self.service = self.client.create_service(binding, address)
        self.address = address

    def call(self, operation: str, action: str, kwargs: dict[str, Any], body: etree._Element | None = None, documents: Mapping[str, DocumentSource] | None = None) -> tuple[Any, str]:
        """Send ``operation`` with ``action``; ``body`` replaces the element of its name that zeep built.

        Anything zeep raises once the peer has answered (a SOAP Fault, a reply
        that is not the WSDL's) is the peer's problem: :class:`XdsTransportError`,
        retried later.  What goes wrong before that is ours and propagates.
        """
        call = _Call(action=action, body=body, documents={k: _Source.of(k, v) for k, v in (documents or {}).items()})
        token = _CALL.set(call)
        try:
            return self.service[operation](**kwargs), call.raw
        except XdsTransportError:
            raise
        except Exception as exc:
            if call.response is None:
                raise
            raise XdsTransportError(f"{exc.__class__.__name__}: {exc} (HTTP {call.response.status_code})") from exc
        finally:
            _CALL.reset(token)


class RegistryClient:
    """ITI-42 Register Document Set-b and ITI-57 Update Document Set against an XDS.b registry."""

    def __init__(self, url: str, *, timeout: float = 60.0, tls: TlsSettings | None = None) -> None:
        self._c = _WsdlClient(REGISTRY_WSDL, C.REGISTRY_BINDING, url, timeout, tls)

    def register(self, submit_objects_request: etree._Element) -> RegistryResult:
        result, raw = self._c.call(C.OP_REGISTER, C.ACTION_ITI42, {"RegistryObjectList": {}}, submit_objects_request)
        return _result_from(result, raw)

    def update(self, submit_objects_request: etree._Element) -> RegistryResult:
        """ITI-57 has no operation in the ITI-42 WSDL; its body is the same SubmitObjectsRequest, its action differs."""
        result, raw = self._c.call(C.OP_REGISTER, C.ACTION_ITI57, {"RegistryObjectList": {}}, submit_objects_request)
        return _result_from(result, raw)


class RepositoryClient:
    """ITI-41 Provide and Register Document Set-b (RAD-68) and ITI-43 Retrieve Document Set, MTOM both ways."""

    def __init__(self, url: str, *, timeout: float = 60.0, tls: TlsSettings | None = None) -> None:
        self._c = _WsdlClient(REPOSITORY_WSDL, C.REPOSITORY_BINDING, url, timeout, tls)

    def provide_and_register(self, submit_objects_request: etree._Element, documents: Mapping[str, DocumentSource]) -> RegistryResult:
        """ITI-41 / RAD-68: ``documents`` maps each ``xds:Document@id`` to its bytes, a path, or chunks.

        The documents are streamed as MTOM attachments while the request is
        written: bytes and paths with a Content-Length, chunk iterables (read
        once) with chunked transfer encoding.
        """
        kwargs = {
            "SubmitObjectsRequest": {"RegistryObjectList": {}},
            "Document": [{"_value_1": b"", "id": doc_id} for doc_id in documents],
        }
        result, raw = self._c.call(C.OP_PNR, C.ACTION_ITI41, kwargs, submit_objects_request, documents)
        return _result_from(result, raw)

    def retrieve(self, repository_unique_id: str, document_unique_ids: list[str]) -> tuple[RegistryResult, dict[str, tuple[str, bytes]]]:
        """(status, {documentUniqueId: (mimeType, bytes)})."""
        kwargs = {"DocumentRequest": [{"RepositoryUniqueId": repository_unique_id, "DocumentUniqueId": u} for u in document_unique_ids]}
        result, raw = self._c.call(C.OP_RETRIEVE, C.ACTION_ITI43, kwargs)
        docs = {d.DocumentUniqueId: (d.mimeType, d.Document) for d in (result.DocumentResponse or [])}
        return _result_from(result.RegistryResponse, raw), docs
