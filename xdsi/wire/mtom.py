"""MTOM/XOP packaging (W3C SOAP MTOM, XOP; ITI TF-2 Appendix V.8-V.9), streaming in both directions.

Writing: :class:`MtomWriter` turns an envelope plus lazily opened attachments
into an iterable of byte chunks, so a response of any size leaves the server
one attachment (and one read buffer) at a time.  It always produces a
``multipart/related`` message, even with no attachment, because .NET/WCF
rejects a single-part ``application/xop+xml`` body.

Reading: :func:`read_message` accepts a plain ``application/soap+xml`` body or
a ``multipart/related`` one, scanning the stream for boundaries with a
bounded buffer; attachments go to spooled temporary files (memory up to
``spool_memory`` bytes each, then disk), the root part is capped at
``max_root_bytes``.  :func:`resolve_xop` then swaps each ``xop:Include`` for
its attachment, matching ``cid:`` references both percent-encoded and not
(RFC 2392), and :func:`binary_content` gives one reader for a base64Binary
element whether its content came inline or as an attachment.

This module knows MIME and XOP only: nothing of IHE, so the XDS publishing
side (ITI-41/43) uses the same reader and writer.
"""

from __future__ import annotations

import base64
import binascii
import io
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import IO, Any, BinaryIO, Callable, Iterable, Iterator
from urllib.parse import quote, unquote

from lxml import etree

from xdsi.wire.errors import RequestTooLarge
from xdsi.wire.media import parse_content_type
from xdsi.wire.multipart import MultipartError, MultipartWriter, TooManyParts, read_parts
from xdsi.wire.regions import FileChunks, Item
from xdsi.standards.constants import MIME_SOAP12, MIME_XOP, NS_XOP

CHUNK = 256 * 1024
XOP_INCLUDE = f"{{{NS_XOP}}}Include"


class MtomError(ValueError):
    """The HTTP body is not a well-formed SOAP/MTOM message; the SOAP layer answers with a Sender fault."""


class MtomTooLarge(MtomError, RequestTooLarge):
    """An envelope or part count over its configured maximum: a Sender fault sent with HTTP 413."""

    def __init__(self, reason: str) -> None:
        RequestTooLarge.__init__(self, reason)


def normalize_cid(value: str) -> str:
    """One spelling of a Content-ID or ``cid:`` URL: no angle brackets, no scheme, percent-decoded."""
    v = value.strip()
    if v.lower().startswith("cid:"):
        v = v[4:]
    if v.startswith("<") and v.endswith(">"):
        v = v[1:-1]
    return unquote(v)


def cid_href(content_id: str) -> str:
    """The ``cid:`` URL for a Content-ID, percent-encoded as RFC 2392 requires."""
    return "cid:" + quote(content_id, safe="@.!$&'()*+,;=:-_~")


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


@dataclass
class OutgoingAttachment:
    """An attachment whose bytes are produced only when the writer reaches it.

    ``chunks`` is called once, at that moment, so a stored instance is recalled
    from a cold tier, or transcoded, just before it is sent.
    """

    content_id: str
    chunks: Callable[[], Iterable[bytes]]
    content_type: str = "application/octet-stream"
    close: Callable[[], None] | None = None  # releases what was produced for it (a spool) if it is never streamed


def new_content_id(domain: str = "xdsi") -> str:
    return f"{uuid.uuid4().hex}@{domain}"


def xop_include(parent: Any, content_id: str) -> Any:
    """Put ``<xop:Include href="cid:..."/>`` into ``parent`` (an element of base64Binary type), no whitespace."""
    parent.text = None
    inc = etree.SubElement(parent, XOP_INCLUDE, nsmap={"xop": NS_XOP})
    inc.set("href", cid_href(content_id))
    return inc


class MtomWriter:
    """A ``multipart/related`` MTOM message: root envelope first, then each attachment as it is read.

    Iterate the writer for the body; ``content_type`` is the HTTP header value,
    with the SOAP action as the ``action`` parameter (ITI TF-2 V.9, CP-ITI-914).
    The framing is :class:`xdsi.wire.multipart.MultipartWriter`'s.
    """

    def __init__(self, envelope: bytes, attachments: Iterable[OutgoingAttachment] = (), *, action: str | None = None) -> None:
        self.envelope = envelope
        self.attachments = attachments
        self.action = action
        self.root_cid = f"root.{uuid.uuid4().hex}@xdsi"
        self.boundary = f"MIMEBoundary_{uuid.uuid4().hex}"
        self._regions_taken = False

    def _framing(self) -> MultipartWriter:
        return MultipartWriter(MIME_XOP, boundary=self.boundary, start=f"<{self.root_cid}>", start_info=MIME_SOAP12, action=self.action)

    @property
    def content_type(self) -> str:
        return self._framing().content_type

    def _root_headers(self) -> dict[str, str]:
        root_type = f'{MIME_XOP}; charset=UTF-8; type="{MIME_SOAP12}"'
        if self.action:
            root_type = f'{MIME_XOP}; charset=UTF-8; type="{MIME_SOAP12}; action=\\"{self.action}\\""'
        return {"Content-Type": root_type, "Content-Transfer-Encoding": "binary", "Content-ID": f"<{self.root_cid}>"}

    def close(self) -> None:
        """Release every attachment's produced bytes (after streaming, or when the client went away)."""
        if isinstance(self.attachments, (list, tuple)):  # a one-shot iterable cannot be walked again
            for att in self.attachments:
                if att.close is not None:
                    att.close()

    def __iter__(self) -> Iterator[bytes]:
        """The message, freshly produced on each iteration (the XDS client re-sends one on a retry)."""
        if self._regions_taken:
            return
        yield from self._message(regions=False)  # type: ignore[misc]  # no FileRegion without regions=True

    def regions(self) -> Iterator[Item]:
        """The message once, an attachment that is a whole file (:class:`FileChunks`) as a :class:`FileRegion`.

        For a server that sends file ranges itself (:class:`xdsi.web.httpd.RegionGateway`).  Once this is
        taken, iterating the writer yields nothing: the message is not produced a second time.
        """
        self._regions_taken = True
        return self._message(regions=True)

    def _message(self, regions: bool) -> Iterator[Item]:
        w = self._framing()  # fresh per message: the framing knows whether a part was written
        yield w.head(self._root_headers()) + self.envelope
        for att in self.attachments:
            headers = {"Content-Type": att.content_type, "Content-Transfer-Encoding": "binary", "Content-ID": f"<{att.content_id}>"}
            if regions and isinstance(att.chunks, FileChunks):
                yield w.head(headers)
                yield att.chunks.region()
                continue
            yield from w.part(headers, _produced(att))
        yield w.end()


def _produced(att: OutgoingAttachment) -> Iterator[bytes]:
    """The attachment's chunks, produced only when the writer reaches its body (after its part head)."""
    yield from att.chunks()


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


@dataclass
class Attachment:
    """One received MIME part (or one inline base64 value), readable as a file."""

    content_id: str
    content_type: str
    file: BinaryIO
    size: int
    headers: dict[str, str] = field(default_factory=dict)

    def open(self) -> BinaryIO:
        self.file.seek(0)
        return self.file

    def read(self) -> bytes:
        return self.open().read()

    def chunks(self, chunk_size: int = CHUNK) -> Iterator[bytes]:
        f = self.open()
        while True:
            b = f.read(chunk_size)
            if not b:
                return
            yield b

    def close(self) -> None:
        self.file.close()


@dataclass
class IncomingMessage:
    """A received SOAP message: the root XML bytes and its attachments by normalised Content-ID."""

    envelope: bytes
    attachments: dict[str, Attachment]
    mtom: bool
    action_param: str | None = None  # the HTTP Content-Type action, for logging; dispatch uses wsa:Action

    def close(self) -> None:
        for a in self.attachments.values():
            a.close()

    def __enter__(self) -> "IncomingMessage":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Capped(io.BytesIO):
    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def write(self, b: Any) -> int:
        if self.tell() + len(b) > self.limit:
            raise MtomTooLarge(f"SOAP envelope larger than {self.limit} bytes")
        return super().write(b)


def read_message(
    stream: BinaryIO,
    content_type: str,
    *,
    max_root_bytes: int = 64 * 1024 * 1024,
    spool_memory: int = 1024 * 1024,
    spool_dir: str | None = None,
    max_parts: int = 10_000,
) -> IncomingMessage:
    """Read a SOAP 1.2 request body: plain ``application/soap+xml`` or MTOM ``multipart/related``.

    Raises :class:`MtomTooLarge` (a :class:`RequestTooLarge`, 413) for an envelope over ``max_root_bytes``
    or more than ``max_parts`` MIME parts, as soon as the part that passes the
    limit starts (a million tiny parts once cost 1.6 GB of bookkeeping).
    """
    media, params = parse_content_type(content_type)
    if media != "multipart/related":
        data = _Capped(max_root_bytes)
        while True:
            b = stream.read(CHUNK)
            if not b:
                break
            data.write(b)
        return IncomingMessage(data.getvalue(), {}, mtom=False, action_param=params.get("action"))

    start = normalize_cid(params["start"]) if params.get("start") else None
    parts: list[tuple[dict[str, str], IO[bytes]]] = []

    def sink(headers: dict[str, str]) -> IO[bytes]:
        cid = normalize_cid(headers.get("content-id", ""))
        is_root = (start is not None and cid == start) or (start is None and not parts)
        f: IO[bytes] = _Capped(max_root_bytes) if is_root else tempfile.SpooledTemporaryFile(spool_memory, dir=spool_dir)
        parts.append((headers, f))
        return f

    try:
        try:
            read_parts(stream, params.get("boundary", ""), sink, read_size=CHUNK, max_parts=max_parts)
        except TooManyParts:
            raise MtomTooLarge(f"MTOM message with more than {max_parts} MIME parts") from None
        except MultipartError as exc:
            raise MtomError(str(exc)) from None
        if not parts:
            raise MtomError("multipart/related message without parts")
        root_i = next((i for i, (h, _f) in enumerate(parts) if start is None or normalize_cid(h.get("content-id", "")) == start), None)
        if root_i is None:
            raise MtomError(f"no MIME part has the start Content-ID <{start}>")
    except Exception:
        for _h, f in parts:
            f.close()
        raise
    root_headers, root_file = parts[root_i]
    envelope = root_file.getvalue()  # type: ignore[attr-defined]
    cte = root_headers.get("content-transfer-encoding", "binary").lower()
    try:
        if cte == "base64":
            envelope = base64.b64decode(envelope, validate=False)
    except (binascii.Error, ValueError) as exc:
        for _h, f in parts:
            f.close()
        raise MtomError(f"the root part is not valid base64 ({exc})") from None
    attachments: dict[str, Attachment] = {}
    for i, (h, f) in enumerate(parts):
        if i == root_i:
            continue
        size = f.tell()
        if h.get("content-transfer-encoding", "binary").lower() == "base64":
            f.seek(0)
            decoded = tempfile.SpooledTemporaryFile(spool_memory, dir=spool_dir)
            try:
                base64.decode(f, decoded)  # type: ignore[arg-type]
            except (binascii.Error, ValueError) as exc:
                decoded.close()
                for j, (_h, g) in enumerate(parts):
                    if j != root_i:
                        g.close()
                for a in attachments.values():
                    a.close()
                raise MtomError(f"MIME part {i + 1} is not valid base64 ({exc})") from None
            f.close()
            f, size = decoded, decoded.tell()
        f.seek(0)
        cid = normalize_cid(h.get("content-id", "")) or f"part{i}"
        attachments[cid] = Attachment(cid, parse_content_type(h.get("content-type", "application/octet-stream"))[0], f, size, h)  # type: ignore[arg-type]
    return IncomingMessage(envelope, attachments, mtom=True, action_param=params.get("action"))


def resolve_xop(root: Any, attachments: dict[str, Attachment]) -> dict[Any, Attachment]:
    """Replace every ``xop:Include`` under ``root`` by nothing and return {parent element: attachment}.

    After this the tree validates against the schemas (an empty base64Binary
    is valid), and :func:`binary_content` finds the bytes.
    """
    found: dict[Any, Attachment] = {}
    for inc in list(root.iter(XOP_INCLUDE)):
        href = inc.get("href") or ""
        att = attachments.get(normalize_cid(href))
        if att is None:
            raise MtomError(f"xop:Include href={href!r} names no attachment of this message")
        parent = inc.getparent()
        parent.remove(inc)
        parent.text = None
        found[parent] = att
    return found


def binary_content(element: Any, resolved: dict[Any, Attachment], spool_memory: int = 1024 * 1024) -> Attachment:
    """The bytes of a base64Binary element, from its XOP attachment or from inline base64 text."""
    att = resolved.get(element)
    if att is not None:
        return att
    text = "".join(element.itertext())
    f = tempfile.SpooledTemporaryFile(spool_memory)
    try:
        f.write(base64.b64decode("".join(text.split()), validate=True))
    except (binascii.Error, ValueError) as exc:
        f.close()
        raise MtomError(f"{etree.QName(element).localname}: not valid base64 ({exc})") from None
    size = f.tell()
    f.seek(0)
    return Attachment(content_id="", content_type="application/octet-stream", file=f, size=size)  # type: ignore[arg-type]
