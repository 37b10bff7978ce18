"""Sending the cases' requests and checking what every answer must be, whatever the case.

Requests are built by zeep from a WSDL (the official IHE one for RAD-69) and
validated against the schemas before they are sent, so a failing case is the
target's fault, not the tool's.  zeep's WS-Addressing headers are replaced by
the ones ITI TF-2 V.3.2.2 asks for (Action mustUnderstand, ReplyTo anonymous,
To = the URL) because a strict target may refuse a request without them.  Answers are read
with xdsi's streaming multipart reader, attachments go to files in a scratch
folder, and each body is validated against the official schemas.
"""

from __future__ import annotations

import base64
import copy
import functools
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import requests
from lxml import etree

from xdsi.standards.constants import MIME_XOP, NS_IHERAD, NS_SOAP12, NS_WADO, NS_WSA, NS_XDS, NS_XOP
from xdsi.wire.media import parse_content_type
from xdsi.wire.mtom import normalize_cid
from xdsi.wire.multipart import MultipartError, read_parts
from xdsi.wire.soap import parse_xml, readdress
from xdsi.wire.xml import make_parser

PACKAGE = Path(__file__).resolve().parents[1]
IHE_DIR = PACKAGE / "standards" / "ihe"
IHE_WSDL = IHE_DIR / "wsdl" / "XDS-I.b_ImagingDocumentSource.wsdl"  # official IHE RAD-69 WSDL
WADO_WSDL = PACKAGE / "soap" / "wsdl" / "ImagingDocumentSource.wsdl"  # no official WADO-WS WSDL exists (FACTS §0)
WADO_XSD = PACKAGE / "soap" / "schemas" / "DICOM" / "dicom.wado.ws.2011.xsd"  # dcm4che's reconstruction, the one in use

FAIL, WARN = "fail", "warn"
MAX_ROOT_PART = 64 * 1024 * 1024  # the SOAP part of an answer is read into memory; documents never are


@dataclass(frozen=True)
class Finding:
    level: str  # FAIL: the target breaks a rule the case tests; WARN: a recommendation not followed
    text: str


@dataclass
class Checks:
    """What one case found; ``require`` failures fail it, ``advise`` ones are reported only."""

    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def require(self, ok: bool, text: str) -> bool:
        if not ok:
            self.findings.append(Finding(FAIL, text))
        return ok

    def advise(self, ok: bool, text: str) -> bool:
        if not ok:
            self.findings.append(Finding(WARN, text))
        return ok

    def note(self, text: str) -> None:
        self.notes.append(text)

    @property
    def failed(self) -> bool:
        return any(f.level == FAIL for f in self.findings)


# -- schemas ---------------------------------------------------------------------------------------


def _compile(entries: dict[str, Path]) -> etree.XMLSchema:
    imports = "".join(f'<xs:import namespace="{ns}" schemaLocation="{p.as_uri()}"/>' for ns, p in entries.items())
    doc = f'<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema" targetNamespace="urn:xdsi:conformance:wrapper">{imports}</xs:schema>'
    return etree.XMLSchema(etree.fromstring(doc.encode(), make_parser(), base_url=(PACKAGE / "w.xsd").as_uri()))


@functools.lru_cache(maxsize=None)
def schema(kind: str) -> etree.XMLSchema:
    """``ihe``: the IHE-published RAD-69/ITI-43 schemas; ``wado``: the WADO-WS schema; ``information``: xdsi's own."""
    if kind == "ihe":
        return _compile({NS_IHERAD: IHE_DIR / "schema/IHE/XDSI.b_ImagingDocumentSource.xsd", NS_XDS: IHE_DIR / "schema/IHE/XDS.b_DocumentRepository.xsd"})
    if kind == "wado":
        return _compile({NS_WADO: WADO_XSD})
    if kind == "information":  # PS3.18 published no schema for it: the one xdsi serves is all there is
        from xdsi.soap.validation import message_schema

        return message_schema()
    raise ValueError(kind)


def schema_errors(element: Any, kind: str) -> list[str]:
    """Validation problems of a body element, with xop:Include children removed as the XOP infoset says."""
    el = copy.deepcopy(element)
    for inc in list(el.iter(f"{{{NS_XOP}}}Include")):
        inc.getparent().remove(inc)
    s = schema(kind)
    if s.validate(etree.ElementTree(el)):
        return []
    return [f"line {e.line}: {e.message}" for e in list(s.error_log)[:3]]


# -- exchanges -------------------------------------------------------------------------------------


@dataclass
class Answer:
    """One answer as received: HTTP, the SOAP envelope, and the attachments as files."""

    request_message_id: str
    http_status: int
    content_type: str
    media: str
    envelope: Any = None
    body: Any = None  # the first child of soap:Body
    headers: list[Any] = field(default_factory=list)
    attachments: dict[str, Path] = field(default_factory=dict)
    problem: str = ""  # why the answer could not be read at all
    seconds: float = 0.0

    def header(self, local: str) -> Any:
        return next((h for h in self.headers if etree.QName(h).namespace == NS_WSA and etree.QName(h).localname == local), None)

    @property
    def is_fault(self) -> bool:
        return self.body is not None and self.body.tag == f"{{{NS_SOAP12}}}Fault"

    def fault_text(self) -> str:
        if not self.is_fault:
            return ""
        return " ".join(t.strip() for t in self.body.itertext() if t.strip())[:500]

    def fault_subcodes(self) -> list[str]:
        return [(v.text or "").strip() for v in self.body.iter(f"{{{NS_SOAP12}}}Value")] if self.is_fault else []


class Exchange:
    """zeep clients per WSDL, and raw POSTs whose answers are streamed to ``workdir``."""

    def __init__(self, url: str, workdir: Path, *, timeout: float = 120, session: requests.Session | None = None, evidence: Path | None = None) -> None:
        self.url = url
        self.workdir = workdir
        self.timeout = timeout
        self.http = session or requests.Session()
        self.evidence = evidence  # keep each request and answer envelope here (a monitor asks for them)
        self._n = 0

    def build(self, wsdl: Path, operation: str, **params: Any) -> Any:
        """The request envelope zeep makes from ``wsdl``, with ITI TF-2 V.3.2.2 addressing completed."""
        client, service = _zeep(wsdl, self.url)
        env = client.create_message(service, operation, **params)
        readdress(env, env.find(f"{{{NS_SOAP12}}}Header").findtext(f"{{{NS_WSA}}}Action"), self.url)  # zeep's WS-A is not IHE's
        return env

    def send(self, envelope: Any) -> Answer:
        """POST the envelope (``action`` in the Content-Type, CP-ITI-914) and read the answer to files."""
        header = envelope.find(f"{{{NS_SOAP12}}}Header")
        action = header.findtext(f"{{{NS_WSA}}}Action")
        msg_id = header.findtext(f"{{{NS_WSA}}}MessageID")
        data = etree.tostring(envelope, xml_declaration=True, encoding="UTF-8")
        self._n += 1
        folder = self.workdir / f"answer-{self._n:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        try:
            resp = self.http.post(
                self.url,
                data=data,
                headers={"Content-Type": f'application/soap+xml; charset=UTF-8; action="{action}"'},
                stream=True,
                timeout=self.timeout,
                verify=self.http.verify,  # per request: REQUESTS_CA_BUNDLE would override the session's (requests #3829)
            )
        except requests.RequestException as exc:
            return Answer(msg_id, 0, "", "", problem=f"no answer: {exc}")
        try:
            answer = _read_answer(resp, msg_id, folder)
        finally:
            resp.close()
        answer.seconds = time.monotonic() - t0
        if self.evidence is not None:
            self.evidence.mkdir(parents=True, exist_ok=True)
            (self.evidence / f"{self._n:02d}-request.xml").write_bytes(data)
            if answer.envelope is not None:
                text = etree.tostring(answer.envelope, xml_declaration=True, encoding="UTF-8")
                (self.evidence / f"{self._n:02d}-response.xml").write_bytes(text)
            (self.evidence / f"{self._n:02d}-response.txt").write_text(
                f"HTTP {answer.http_status}\nContent-Type: {answer.content_type}\n{answer.problem}\n"
                + "".join(f"part {cid}: {p.stat().st_size} bytes\n" for cid, p in answer.attachments.items() if p.exists()),
                encoding="utf-8",
            )
        return answer


@functools.lru_cache(maxsize=8)
def _zeep(wsdl: Path, url: str) -> tuple[Any, Any]:
    """A zeep client and service per WSDL and URL: reading a WSDL costs more than a whole exchange."""
    import zeep

    client = zeep.Client(str(wsdl), settings=zeep.Settings(strict=True, xml_huge_tree=False))
    binding = next(iter(next(iter(client.wsdl.services.values())).ports.values())).binding.name
    return client, client.create_service(binding, url)


def _read_answer(resp: requests.Response, msg_id: str, folder: Path) -> Answer:
    ct = resp.headers.get("Content-Type", "")
    media, params = parse_content_type(ct)
    answer = Answer(msg_id, resp.status_code, ct, media)
    root = io.BytesIO()
    if media == "multipart/related":
        # every part to a file; the root is the part named by ``start``, else the first (RFC 2387)
        parts: list[tuple[str, str, Path]] = []  # (content-id, content-type, file)
        files: list[IO[bytes]] = []

        def sink(headers: dict[str, str]) -> IO[bytes]:
            path = folder / f"{len(parts):05d}.part"
            parts.append((normalize_cid(headers.get("content-id", "")), headers.get("content-type", ""), path))
            f = open(path, "wb")
            files.append(f)
            return f

        raw = resp.raw
        raw.decode_content = True
        try:
            read_parts(raw, params.get("boundary", ""), sink, read_size=256 * 1024)
        except MultipartError as exc:
            answer.problem = f"malformed multipart answer: {exc}"
            return answer
        finally:
            for f in files:
                f.close()
        start = normalize_cid(params.get("start", ""))
        root_part = next((p for p in parts if start and p[0] == start), parts[0] if parts else None)
        if root_part is None:
            answer.problem = "multipart answer without parts"
            return answer
        if not root_part[1].lower().startswith(MIME_XOP):
            answer.problem = f"the root part is {root_part[1]!r}, not {MIME_XOP} (ITI TF-2 V.9)"
            return answer
        if root_part[2].stat().st_size > MAX_ROOT_PART:
            answer.problem = f"the root part has {root_part[2].stat().st_size} bytes; more than {MAX_ROOT_PART} is not read"
            return answer
        root.write(root_part[2].read_bytes())
        answer.attachments = {cid or f"part-{k}": path for k, (cid, _ct, path) in enumerate(parts) if (cid, _ct, path) != root_part}
    else:
        for chunk in resp.iter_content(256 * 1024):
            root.write(chunk)
            if root.tell() > MAX_ROOT_PART:
                answer.problem = f"the answer has more than {MAX_ROOT_PART} bytes of XML; not read"
                return answer
    try:
        env = parse_xml(root.getvalue())
    except Exception as exc:  # noqa: BLE001  (anything unparsable is a finding, not a crash)
        answer.problem = f"the answer is not XML: {str(exc)[:200]}; first bytes {root.getvalue()[:120]!r}"
        return answer
    answer.envelope = env
    if env.tag != f"{{{NS_SOAP12}}}Envelope":
        answer.problem = f"the answer's root is {env.tag}, not a SOAP 1.2 Envelope"
        return answer
    hdr = env.find(f"{{{NS_SOAP12}}}Header")
    answer.headers = list(hdr) if hdr is not None else []
    body = env.find(f"{{{NS_SOAP12}}}Body")
    answer.body = body[0] if body is not None and len(body) else None
    if answer.body is None:
        answer.problem = "the SOAP Body is empty"
    return answer


def document_file(answer: Answer, element: Any, folder: Path, name: str) -> Path | None:
    """The file an ``ihe:Document`` stands for: its XOP attachment, or its inline base64 written out."""
    inc = element.find(f"{{{NS_XOP}}}Include")
    if inc is not None:
        return answer.attachments.get(normalize_cid(inc.get("href", "")))
    text = (element.text or "").strip()
    if not text:
        return None
    path = folder / f"{name}.inline"
    path.write_bytes(base64.b64decode(text))
    return path


def check_transport(answer: Answer, checks: Checks, *, response_action: str, body_tag: str, schema_kind: str) -> bool:
    """ITI TF-2 V and 3.43.5: SOAP 1.2, MTOM/XOP, WS-Addressing reply headers, the body valid. False: unusable."""
    if not checks.require(not answer.problem, answer.problem or "answer unreadable"):
        return False
    if answer.is_fault:
        checks.require(False, f"SOAP Fault instead of a {etree.QName(body_tag).localname}: {answer.fault_text()}")
        return False
    checks.require(answer.http_status == 200, f"HTTP status {answer.http_status}, expected 200")
    checks.require(
        answer.media == "multipart/related" and MIME_XOP in answer.content_type,
        f"answer is {answer.content_type!r}, not MTOM/XOP multipart/related (ITI TF-2 V.8, RAD-69 via ITI-43 3.43.5)",
    )
    checks.advise(f'action="{response_action}"' in answer.content_type.replace("'", '"'), f"no action=\"{response_action}\" in the Content-Type (CP-ITI-914)")
    act = answer.header("Action")
    checks.require(act is not None and (act.text or "") == response_action, f"wsa:Action is {None if act is None else act.text!r}, expected {response_action!r}")
    if act is not None:
        checks.require(act.get(f"{{{NS_SOAP12}}}mustUnderstand") in ("1", "true"), "wsa:Action without mustUnderstand=\"true\" (IHE-WSA101)")
    rel = answer.header("RelatesTo")
    checks.require(rel is not None and (rel.text or "").strip() == answer.request_message_id, "wsa:RelatesTo missing or not the request's MessageID")
    if not checks.require(answer.body.tag == body_tag, f"body is {answer.body.tag}, expected {body_tag}"):
        return False
    errs = schema_errors(answer.body, schema_kind)
    checks.require(not errs, f"answer invalid against the {schema_kind} schema: {'; '.join(errs)}")
    for inc in answer.body.iter(f"{{{NS_XOP}}}Include"):
        checks.require(normalize_cid(inc.get("href", "")) in answer.attachments, f"xop:Include {inc.get('href')!r} has no MIME part")
    return True


# -- a whole run -----------------------------------------------------------------------------------


def run(
    url: str, subject: Any, *, case_ids: list[str] | None = None, max_documents: int = 20, timeout: float = 120, workdir: Path | None = None, evidence: Path | None = None,
    session: requests.Session | None = None,
) -> list[Any]:
    """Every case (or those named) against ``url``, in catalogue order; scratch files are removed after each case.

    ``evidence``: a folder that keeps, per case, each request envelope and each answer's SOAP part.
    ``session``: carries TLS settings (CA bundle, client certificate) to every exchange.
    """
    import shutil
    import tempfile

    from xdsi.conformance.cases import CASES, Context, Skip, ToolError
    from xdsi.conformance.report import ERROR, FAILED, PASS, SKIP, CaseResult

    chosen = [c for c in CASES if case_ids is None or c.id in case_ids]
    results = []
    with tempfile.TemporaryDirectory(prefix="xdsi-conformance-", dir=workdir) as tmp:
        session = session or requests.Session()
        for case in chosen:
            scratch = Path(tmp) / case.id
            scratch.mkdir()
            ctx = Context(subject, Exchange(url, scratch, timeout=timeout, session=session, evidence=None if evidence is None else evidence / case.id), scratch, max_documents)
            checks = Checks()
            t0 = time.monotonic()
            try:
                case.run(ctx, checks)
                outcome = FAILED if checks.failed else PASS
            except Skip as exc:
                outcome = SKIP
                checks.note(str(exc))
            except ToolError as exc:
                outcome = ERROR
                checks.note(f"tool error: {exc}")
            except requests.RequestException as exc:
                outcome = FAILED
                checks.require(False, f"HTTP exchange failed: {exc}")
            except Exception as exc:  # noqa: BLE001  (one broken case must not hide the others' results)
                outcome = ERROR
                checks.note(f"tool error: {type(exc).__name__}: {exc}")
            results.append(CaseResult(case, outcome, checks.findings, checks.notes, time.monotonic() - t0))
            shutil.rmtree(scratch, ignore_errors=True)  # a study's worth of documents never piles up
    return results
