"""The XDS.b zeep clients: ITI-41 streamed as MTOM from bytes, paths or chunks; IHE WS-A; no private zeep API.

A document far larger than the memory bound is sent to a sink that reads the
request with the streaming MTOM reader and hashes the attachment: the client
must never hold the message (tracemalloc peak, chunks produced while the peer
is already receiving), and what arrives must be the exact bytes.
"""

from __future__ import annotations

import ast
import hashlib
import io
import os
import threading
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from lxml import etree
from werkzeug.serving import make_server
from werkzeug.wsgi import get_input_stream

from tests.integration.test_xds_registry_rules import good
from tests.support.registry import TestRegistry
from tests.support.xds import PATIENT_CX
from xdsi.wire.soap import addressing_headers, build_envelope, parse_envelope
from xdsi.wire.mtom import MtomWriter, read_message, resolve_xop
from xdsi.standards import constants as C
from xdsi.xds.client import RegistryClient, RepositoryClient, XdsTransportError
from xdsi.xds.codes import CodeTable

ROOT = Path(__file__).resolve().parents[2]
BIG = 48 * 1024 * 1024  # the document
SENDING = 8 * 1024 * 1024  # what the whole process (client and sink) may have allocated at its peak once the document is sent
BOUND = 16 * 1024 * 1024  # the same for the whole call: urllib3 reading a chunked reply has a ~10 MB transient of its own
PIECE = 256 * 1024


@pytest.fixture(scope="module")
def registry() -> Iterator[TestRegistry]:
    with TestRegistry(CodeTable.load(), {PATIENT_CX}) as reg:
        yield reg


@dataclass
class Seen:
    headers: dict[str, str] = field(default_factory=dict)
    envelope: bytes = b""
    documents: dict[str, tuple[int, str]] = field(default_factory=dict)  # Document@id -> (size, sha1)
    received: int = 0  # request body bytes read so far


class Sink:
    """An ITI-41 peer that reads the MTOM request with bounded memory (attachments spooled to disk) and says Success."""

    def __init__(self, spool: Path) -> None:
        self.spool = spool
        self.seen = Seen()
        self.server = make_server("127.0.0.1", 0, self.wsgi, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/repository"

    def wsgi(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        seen = self.seen = Seen(headers={k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")})
        seen.headers["content-length"] = environ.get("CONTENT_LENGTH", "")
        seen.headers["content-type"] = environ.get("CONTENT_TYPE", "")
        stream = get_input_stream(environ)

        class Counting(io.RawIOBase):
            def read(self, n: int = -1) -> bytes:
                b = stream.read(n)
                seen.received += len(b)
                return b

        with read_message(Counting(), seen.headers["content-type"], spool_dir=str(self.spool)) as msg:  # type: ignore[arg-type]
            seen.envelope = msg.envelope
            env = parse_envelope(msg.envelope)
            for el, att in resolve_xop(env.body, msg.attachments).items():
                h = hashlib.sha1()
                for chunk in att.chunks():
                    h.update(chunk)
                seen.documents[el.get("id")] = (att.size, h.hexdigest())
        answer = etree.Element(C.q("rs", "RegistryResponse"), status=C.STATUS_SUCCESS, nsmap={"rs": C.NS_RS})
        writer = MtomWriter(build_envelope(answer, addressing_headers(C.ACTION_ITI41_RESPONSE, relates_to=env.addressing.message_id, reply_to=None)), action=C.ACTION_ITI41_RESPONSE)
        start_response("200 OK", [("Content-Type", writer.content_type)])
        return writer

    def __enter__(self) -> "Sink":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sink]:
    with Sink(tmp_path_factory.mktemp("spool")) as s:
        yield s


def _peak_while(fn: Callable[[], Any]) -> tuple[Any, int]:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_iti41_big_document_from_chunks_is_streamed(sink: Sink) -> None:
    req, doc, _ = good(include_repository=False)
    client = RepositoryClient(sink.url, timeout=60)  # WSDL parsed before the measurement
    digest = hashlib.sha1()
    produced_at: list[int] = []  # bytes the peer had received when each chunk was produced
    sending_peak: list[int] = []
    seed = os.urandom(PIECE)

    def chunks() -> Iterator[bytes]:
        for i in range(BIG // PIECE):
            produced_at.append(sink.seen.received)
            b = i.to_bytes(8, "big") + seed[8:]
            digest.update(b)
            yield b
        sending_peak.append(tracemalloc.get_traced_memory()[1])

    result, peak = _peak_while(lambda: client.provide_and_register(req, {doc.entry_uuid: chunks()}))
    assert result.success, result.raw
    assert sink.seen.documents == {doc.entry_uuid: (BIG, digest.hexdigest())}
    print(f"ITI-41 from chunks: peak {sending_peak[0] / 2**20:.1f} MiB traced once a {BIG / 2**20:.0f} MiB document was sent, {peak / 2**20:.1f} MiB for the call")
    assert sending_peak[0] < SENDING, f"peak {sending_peak[0] / 2**20:.1f} MiB while sending a {BIG / 2**20:.0f} MiB document"
    assert peak < BOUND, f"peak {peak / 2**20:.1f} MiB during the ITI-41 call with a {BIG / 2**20:.0f} MiB document"
    # produced lazily: when the last chunk was made, the peer had already read most of the document
    assert len(produced_at) == BIG // PIECE and produced_at[-1] > BIG // 2
    assert sink.seen.headers.get("transfer-encoding", "").lower() == "chunked"  # length unknown up front
    assert len(sink.seen.envelope) < 64 * 1024  # the envelope carries an xop:Include, not base64
    inc = parse_envelope(sink.seen.envelope).body.find(f"{C.q('xds', 'Document')}/{{{C.NS_XOP}}}Include")
    assert inc is not None and inc.getparent().text is None and inc.tail is None


def test_iti41_big_document_from_a_path_has_a_content_length(sink: Sink, tmp_path: Path) -> None:
    req, doc, _ = good(include_repository=False)
    path = tmp_path / "big.bin"
    digest = hashlib.sha1()
    with path.open("wb") as f:
        for i in range(BIG // PIECE):
            b = os.urandom(PIECE)
            digest.update(b)
            f.write(b)
    client = RepositoryClient(sink.url, timeout=60)
    result, peak = _peak_while(lambda: client.provide_and_register(req, {doc.entry_uuid: path}))
    assert result.success, result.raw
    assert sink.seen.documents == {doc.entry_uuid: (BIG, digest.hexdigest())}
    print(f"ITI-41 from a path: peak {peak / 2**20:.1f} MiB traced for a {BIG / 2**20:.0f} MiB file")
    assert peak < BOUND, f"peak {peak / 2**20:.1f} MiB while sending a {BIG / 2**20:.0f} MiB file"
    assert int(sink.seen.headers["content-length"]) == sink.seen.received > BIG
    assert "chunked" not in sink.seen.headers.get("transfer-encoding", "").lower()


@pytest.mark.parametrize("form", ["bytes", "path", "chunks", "file"])
def test_iti41_every_document_form_is_accepted_by_the_strict_registry(registry: TestRegistry, tmp_path: Path, form: str) -> None:
    req, doc, data = good(include_repository=False)
    path = tmp_path / "kos.dcm"
    path.write_bytes(data)
    source = {
        "bytes": lambda: data,
        "path": lambda: path,
        "chunks": lambda: (data[i : i + 1000] for i in range(0, len(data), 1000)),
        "file": lambda: io.BytesIO(data),
    }[form]()
    r = RepositoryClient(registry.repository_url).provide_and_register(req, {doc.entry_uuid: source})
    assert r.success, r.error_text()
    assert registry.documents[doc.unique_id][1] == data
    assert registry.requests[-1].content_type.startswith("multipart/related")
    assert f'action="{C.ACTION_ITI41}"' in registry.requests[-1].content_type


def test_the_callers_submission_is_left_as_it_was(registry: TestRegistry) -> None:
    req, doc, data = good(include_repository=False)
    before = etree.tostring(req)
    assert RepositoryClient(registry.repository_url).provide_and_register(req, {doc.entry_uuid: data}).success
    assert req.getparent() is None and etree.tostring(req) == before


def test_ihe_addressing_headers_once_each(registry: TestRegistry) -> None:
    req, doc, _ = good()
    assert RegistryClient(registry.registry_url).register(req).success
    env = etree.fromstring(registry.requests[-1].envelope)
    header = env.find(f"{{{C.NS_SOAP12}}}Header")
    wsa = [etree.QName(h).localname for h in header if etree.QName(h).namespace == C.NS_WSA]
    assert sorted(wsa) == ["Action", "MessageID", "ReplyTo", "To"]  # zeep's own headers replaced, not doubled
    action = header.find(f"{{{C.NS_WSA}}}Action")
    assert action.text == C.ACTION_ITI42 and action.get(f"{{{C.NS_SOAP12}}}mustUnderstand") == "true"
    assert header.find(f"{{{C.NS_WSA}}}MessageID").text.startswith("urn:uuid:")
    assert header.find(f"{{{C.NS_WSA}}}ReplyTo/{{{C.NS_WSA}}}Address").text == C.WSA_ANONYMOUS
    assert header.find(f"{{{C.NS_WSA}}}To").text == registry.registry_url


def test_a_soap_fault_is_a_transport_error_and_a_bad_document_is_the_callers(registry: TestRegistry) -> None:
    req, doc, _ = good()
    with pytest.raises(XdsTransportError, match="HTTP 400"):  # ITI-42 sent to the repository endpoint: a Sender fault
        RegistryClient(registry.repository_url).register(req)
    with pytest.raises(TypeError, match="not a str"):
        RepositoryClient(registry.repository_url).provide_and_register(req, {doc.entry_uuid: "/some/path"})  # type: ignore[dict-item]


# zeep names that are not its public extension points: the client must not reach for them
PRIVATE = {"_binding", "_create", "process_reply", "_binding_options", "_operations", "_proxy", "_set_http_headers", "process_error"}
PUBLIC_MODULES = {"zeep", "zeep.transports", "zeep.plugins", "zeep.exceptions", "zeep.helpers"}


def _python_files() -> list[Path]:
    """The product, and the test helpers that drive the XDS clients (tests/support/ids.py, a RAD-69
    conformance helper outside this client, still reads ``service._binding_options``)."""
    return sorted((ROOT / "xdsi").rglob("*.py")) + [ROOT / "tests" / "support" / "xds.py", ROOT / "tests" / "support" / "registry.py"]


def test_zeep_is_used_only_through_its_public_api() -> None:
    bad: list[str] = []
    for path in _python_files():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "zeep":
                if node.module not in PUBLIC_MODULES or any(a.name.startswith("_") for a in node.names):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} from {node.module} import {[a.name for a in node.names]}")
            elif isinstance(node, ast.Import):
                bad += [f"{path.relative_to(ROOT)}:{node.lineno} import {a.name}" for a in node.names if a.name.startswith("zeep.") and a.name not in PUBLIC_MODULES]
            elif isinstance(node, ast.Attribute) and node.attr in PRIVATE:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}")
    assert not bad, bad
    # the clients customise zeep with a Transport subclass and a Plugin, nothing else
    from zeep import Plugin
    from zeep.transports import Transport

    from xdsi.xds.client import IheAddressing, MtomTransport

    assert issubclass(MtomTransport, Transport) and issubclass(IheAddressing, Plugin)
    def own(cls: type) -> set[str]:
        return {k for k in vars(cls) if not k.startswith("__")}

    assert own(MtomTransport) - {"MTOM_ACTIONS"} == {"post_xml"}  # and __init__, which only configures the session
    assert own(IheAddressing) == {"egress", "ingress"}
