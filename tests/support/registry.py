"""A strict XDS.b registry + repository for tests: ITI-41 (MTOM), ITI-42, ITI-57 (availability status), ITI-18, ITI-43.

No XDS.b registry can run here, so this one plays the affinity domain.  It is
meant to be at least as strict as a Connectathon registry, so that what it
accepts would be accepted there:

* transport: SOAP 1.2 envelope, IHE WS-Addressing (Action with
  mustUnderstand, MessageID, ReplyTo, Action matching the body), MTOM/XOP
  required for ITI-41 and ITI-43 and answered in MTOM;
* every body is validated against the official schemas
  (``shared/standards/ihe/schema``) with lxml, entity resolution and network
  off, after the XOP infoset is reconstructed;
* the XDS metadata rules of ITI TF-3 4.2.3 / 4.3.1 for DocumentEntry and
  SubmissionSet (required slots, classifications and external identifiers,
  CX / XCN / XON / DTM / CXi syntax, codes within the affinity-domain code
  list, one DocumentEntry per Document, hash and size correct, known patient
  IDs, patient IDs that match, RPLC target known, Approved, same patient;
  it becomes Deprecated) answered with the RegistryErrors of ITI TF-3
  Table 4.2.4.1-2;
* the uniqueness rules of ITI TF-2 3.42.4.1.3.3: a DocumentEntry re-sent with
  a registered uniqueId and the same hash and size is accepted without error
  (a second entry with that uniqueId), a different hash or size is
  ``XDSNonIdenticalHash`` / ``XDSNonIdenticalSize``; only a SubmissionSet or
  Folder uniqueId already used in the registry is
  ``XDSDuplicateUniqueIdInRegistry``, its codeContext naming which and the
  value; one uniqueId twice in a submission is
  ``XDSRegistryDuplicateUniqueIdInMessage``.  ``legacy_document_duplicates=True``
  plays an older registry that (against 3.42.4.1.3.3.1) also answers
  ``XDSDuplicateUniqueIdInRegistry`` for a DocumentEntry;
* the relationship rules of 3.42.4.1.3.5: an RPLC source or target that
  resolves to nothing is ``UnresolvedReferenceException``, a target that is
  not Approved ``XDSRegistryDeprecatedDocumentError``; new Folders (uniqueId,
  patientId, FD-DE HasMember) are accepted and their uniqueIds kept.

It runs as a werkzeug server on 127.0.0.1 in a thread; ``down = True`` makes it
answer HTTP 503, ``lose_replies = n`` commits the next n requests and answers
each with an HTTP 504 instead of its RegistryResponse (a reply lost on the way
back), ``date_skew`` moves the clock its HTTP ``Date`` headers are stamped with (a peer
whose clock is off), and :meth:`stop` / :meth:`start` restart it on the same port.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lxml import etree
from requests_toolbelt.multipart.decoder import MultipartDecoder
from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

from tests.support.server import free_port
from xdsi.wire.xml import make_parser
from xdsi.standards import constants as C
from xdsi.xds.codes import CodeTable

from tests.support.standards import STANDARDS  # noqa: E402

SCHEMA_DIR = STANDARDS / "ihe" / "schema"
if not SCHEMA_DIR.is_dir():  # a checkout without shared/: the byte-identical copies shipped with xdsi
    SCHEMA_DIR = Path(__file__).resolve().parents[2] / "xdsi" / "standards" / "ihe" / "schema"

SAFE_PARSER = make_parser()

_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
_DTM = re.compile(r"^\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2})?)?)?)?)?$")
_CX = re.compile(r"^([^\^&~\\|]+)\^\^\^&([0-2](?:\.(?:0|[1-9][0-9]*))+)&ISO$")
_HEX40 = re.compile(r"^[0-9a-fA-F]{40}$")
_LANG = re.compile(r"^[a-zA-Z]{1,8}(-[a-zA-Z0-9]{1,8})*$")
_ISO_AA = re.compile(r"^[^&]*&[0-2](\.(0|[1-9][0-9]*))+&ISO$")

ERROR_METADATA_UPDATE = "XDSMetadataUpdateError"

AUTHOR_SLOTS = {"authorPerson", "authorInstitution", "authorRole", "authorSpecialty", "authorTelecommunication"}
# DocumentEntry classification schemes -> (CodeType name in the codes file, min, max)
DE_CODED = {
    C.DE_CLASS_CODE: ("classCode", 1, 1),
    C.DE_CONFIDENTIALITY_CODE: ("confidentialityCode", 1, None),
    C.DE_EVENT_CODE: ("eventCodeList", 0, None),
    C.DE_FORMAT_CODE: ("formatCode", 1, 1),
    C.DE_HEALTHCARE_FACILITY_TYPE_CODE: ("healthcareFacilityTypeCode", 1, 1),
    C.DE_PRACTICE_SETTING_CODE: ("practiceSettingCode", 1, 1),
    C.DE_TYPE_CODE: ("typeCode", 1, 1),
}
DE_SINGLE_SLOTS = {"creationTime", "hash", "languageCode", "repositoryUniqueId", "size", "sourcePatientId",
                   "serviceStartTime", "serviceStopTime", "legalAuthenticator"}


def xcn_ok(v: str) -> bool:
    """XCN (ITI TF-3 Table 4.2.3.1.7-2): an ID or a family name; an ID without a name needs an ISO authority."""
    parts = v.split("^")
    if len(parts) > 23 or not (parts[0] or (len(parts) > 1 and parts[1])):
        return False
    if parts[0] and not (len(parts) > 1 and parts[1]) and not (len(parts) > 8 and _ISO_AA.match(parts[8])):
        return False
    return len(parts) <= 8 or not parts[8] or bool(_ISO_AA.match(parts[8]))


def xon_ok(v: str) -> bool:
    """XON: XON.1 required, at most 10 components; an XON.10 that is not an OID needs XON.6 = &OID&ISO."""
    parts = v.split("^")
    if not parts[0] or len(parts) > 10:
        return False
    if len(parts) == 10 and parts[9] and not _OID.match(parts[9]):
        return bool(_ISO_AA.match(parts[5]))
    return True


def cxi_ok(v: str) -> bool:
    """CXi (ITI TF-3 4.2.3.2.28): CXi.1 and CXi.5 required; the study UID form has nothing else."""
    parts = v.split("^")
    if len(parts) < 5 or len(parts) > 6 or not parts[0] or not parts[4]:
        return False
    if parts[4] == C.REFID_STUDY_UID:
        return all(p == "" for p in parts[1:4]) and bool(_OID.match(parts[0]))
    if parts[4] == C.REFID_ACCESSION:
        return bool(_ISO_AA.match(parts[3]))
    return True


@dataclass
class Err:
    code: str
    context: str
    location: str = ""
    severity: str = C.SEVERITY_ERROR


@dataclass
class Entry:
    entry_uuid: str
    unique_id: str
    patient_id: str
    hash: str
    size: int
    repository_unique_id: str
    element: etree._Element
    status: str = C.STATUS_APPROVED


@dataclass
class Request_:
    action: str
    content_type: str
    envelope: bytes


class SoapFault(Exception):
    def __init__(self, code: str, reason: str, http: int = 400) -> None:
        super().__init__(reason)
        self.code, self.reason, self.http = code, reason, http


def _slots(obj: etree._Element) -> dict[str, list[list[str]]]:
    out: dict[str, list[list[str]]] = {}
    for s in obj.findall(C.q("rim", "Slot")):
        out.setdefault(s.get("name", ""), []).append([v.text or "" for v in s.iter(C.q("rim", "Value"))])
    return out


def _name(obj: etree._Element) -> str | None:
    ls = obj.find(f"{C.q('rim', 'Name')}/{C.q('rim', 'LocalizedString')}")
    return None if ls is None else ls.get("value")


class TestRegistry:
    __test__ = False  # not a pytest class

    def __init__(
        self,
        codes: CodeTable,
        known_patients: set[str],
        *,
        repository_unique_id: str = "1.3.6.1.4.1.21367.13.80.999",
        port: int | None = None,
        legacy_document_duplicates: bool = False,
        ssl_context: Any = None,
    ) -> None:
        self.ssl_context = ssl_context  # an ssl.SSLContext: the registry and repository serve HTTPS only
        self.codes = codes
        self.known_patients = set(known_patients)
        self.repository_unique_id = repository_unique_id
        self.port = port or free_port()
        self.schema = etree.XMLSchema(etree.parse(str(SCHEMA_DIR / "IHE" / "XDS.b_DocumentRepository.xsd"), SAFE_PARSER))
        self.entries: dict[str, Entry] = {}  # entryUUID -> entry
        self.submission_sets: dict[str, str] = {}  # uniqueId -> patient id
        self.folders: dict[str, str] = {}  # uniqueId -> patient id
        self.legacy_document_duplicates = legacy_document_duplicates
        self.lose_replies = 0
        self.documents: dict[str, tuple[str, bytes]] = {}  # repository: uniqueId -> (mimeType, bytes)
        self.requests: list[Request_] = []
        self.down = False
        self.lock = threading.Lock()
        self.date_skew = 0.0  # seconds added to the Date header of every answer: a registry whose clock is off
        self._server: Any = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def registry_url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}/registry"

    @property
    def repository_url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}/repository"

    def start(self) -> "TestRegistry":
        registry = self

        class _Handler(WSGIRequestHandler):
            def date_time_string(self, timestamp: float | None = None) -> str:  # the Date header (http.server)
                return super().date_time_string((time.time() if timestamp is None else timestamp) + registry.date_skew)

        self._server = make_server("127.0.0.1", self.port, self.wsgi, threaded=True, ssl_context=self.ssl_context, request_handler=_Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="test-registry", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "TestRegistry":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- queries for tests ----------------------------------------------------------------
    def find_by_patient(self, patient_id: str, status: str = C.STATUS_APPROVED) -> list[Entry]:
        with self.lock:
            return [e for e in self.entries.values() if e.patient_id == patient_id and e.status == status]

    def by_unique_id(self, unique_id: str) -> Entry | None:
        with self.lock:
            return next((e for e in self.entries.values() if e.unique_id == unique_id), None)

    def all_by_unique_id(self, unique_id: str) -> list[Entry]:
        """Every registered DocumentEntry with this uniqueId (ITI-42 allows several with the same hash and size)."""
        with self.lock:
            return [e for e in self.entries.values() if e.unique_id == unique_id]

    def merge_patients(self, subsumed: str, surviving: str) -> int:
        """What a Document Registry does on a Patient Identity Feed merge (ITI-8 A40 / ITI-44): every entry,
        SubmissionSet and Folder of ``subsumed`` is filed under ``surviving``, which must be a known patient.
        The number of DocumentEntries moved."""
        with self.lock:
            assert surviving in self.known_patients, surviving
            moved = [e for e in self.entries.values() if e.patient_id == subsumed]
            for e in moved:
                e.patient_id = surviving
                for ext in e.element.findall(C.q("rim", "ExternalIdentifier")):
                    if ext.get("identificationScheme") == C.DE_PATIENT_ID:
                        ext.set("value", surviving)
            for table in (self.submission_sets, self.folders):
                for uid, pid in list(table.items()):
                    if pid == subsumed:
                        table[uid] = surviving
            return len(moved)

    def count_actions(self, action: str) -> int:
        return sum(1 for r in self.requests if r.action == action)

    # -- WSGI -----------------------------------------------------------------------------
    def wsgi(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        return self._app(environ, start_response)

    @Request.application
    def _app(self, request: Request) -> Response:
        if self.down:
            return Response("registry is down for maintenance\n", status=503, headers={"Retry-After": "1"})
        if request.method != "POST":
            return Response("POST only\n", status=405)
        path = request.path.rstrip("/")
        message_id = ""
        try:
            envelope, attachments, is_mtom = self._read(request)
            action, message_id = self._addressing(envelope)
            body = envelope.find(f"{{{C.NS_SOAP12}}}Body")
            if body is None or len(body) != 1:
                raise SoapFault("Sender", "the SOAP Body must hold exactly one element")
            payload = body[0]
            self.requests.append(Request_(action, request.headers.get("Content-Type", ""), etree.tostring(envelope)))
            handlers = {
                ("/registry", C.ACTION_ITI42): (self.iti42, C.q("lcm", "SubmitObjectsRequest"), False),
                ("/registry", C.ACTION_ITI57): (self.iti57, C.q("lcm", "SubmitObjectsRequest"), False),
                ("/registry", C.ACTION_ITI18): (self.iti18, C.q("query", "AdhocQueryRequest"), False),
                ("/repository", C.ACTION_ITI41): (self.iti41, C.q("xds", "ProvideAndRegisterDocumentSetRequest"), True),
                ("/repository", C.ACTION_ITI43): (self.iti43, C.q("xds", "RetrieveDocumentSetRequest"), True),
            }
            if (path, action) not in handlers:
                raise SoapFault("Sender", f"action {action!r} is not served at {path}")
            handler, element, mtom_required = handlers[(path, action)]
            if payload.tag != element:
                raise SoapFault("Sender", f"wsa:Action {action} does not match the body element {payload.tag}")
            if mtom_required and not is_mtom:
                raise SoapFault("Sender", f"{action} must be sent as MTOM/XOP (ITI TF-2 V.8)")
            documents = self._resolve_xop(payload, attachments)
            if not self.schema.validate(payload):
                err = self.schema.error_log.last_error
                raise SchemaInvalid(f"schema validation failed: line {err.line}: {err.message}")
            with self.lock:
                result, reply_attachments = handler(payload, documents)
                lost = self.lose_replies > 0
                if lost:
                    self.lose_replies -= 1
            if lost:  # done and committed, but the answer never reaches the client (a proxy timed out)
                return Response("gateway timeout: no answer from the registry in time\n", status=504)
            return self._reply(action + "Response" if action != C.ACTION_ITI57 else C.ACTION_ITI57_RESPONSE, message_id, result, reply_attachments, mtom_required)
        except SchemaInvalid as exc:
            code = C.XDS_REPOSITORY_METADATA_ERROR if path == "/repository" else C.XDS_REGISTRY_METADATA_ERROR
            resp = registry_response([Err(code, str(exc))])
            if path == "/repository" and "Retrieve" in (self.requests[-1].action if self.requests else ""):
                resp = retrieve_response([Err(C.XDS_REPOSITORY_ERROR, str(exc))], [])
            return self._reply((self.requests[-1].action if self.requests else "") + "Response", message_id, resp, [], path == "/repository")
        except SoapFault as exc:
            return soap_fault(exc)

    # -- transport ------------------------------------------------------------------------
    def _read(self, request: Request) -> tuple[etree._Element, dict[str, bytes], bool]:
        ctype = request.headers.get("Content-Type", "")
        data = request.get_data()
        attachments: dict[str, bytes] = {}
        if ctype.lower().startswith("multipart/related"):
            if 'application/xop+xml' not in ctype:
                raise SoapFault("Sender", "multipart/related without type=\"application/xop+xml\" is not MTOM")
            try:
                parts = MultipartDecoder(data, ctype).parts
            except Exception as exc:
                raise SoapFault("Sender", f"malformed MIME multipart: {exc}") from None
            start = re.search(r'start="?<?([^">;]+)>?"?', ctype)
            root = None
            for part in parts:
                cid = part.headers.get(b"Content-ID", b"").decode().strip().strip("<>")
                if (start and cid == start.group(1)) or (not start and root is None):
                    if b"application/xop+xml" not in part.headers.get(b"Content-Type", b""):
                        raise SoapFault("Sender", "the MTOM root part must be application/xop+xml")
                    root = part.content
                else:
                    attachments[cid] = part.content
            if root is None:
                raise SoapFault("Sender", "no root part in the MTOM message")
            xml, mtom = root, True
        elif ctype.lower().startswith("application/soap+xml"):
            xml, mtom = data, False
        else:
            raise SoapFault("Sender", f"Content-Type {ctype!r} is neither SOAP 1.2 nor MTOM", http=415)
        try:
            env = etree.fromstring(xml, SAFE_PARSER)
        except etree.XMLSyntaxError as exc:
            raise SoapFault("Sender", f"not well-formed XML: {exc}") from None
        if env.tag != f"{{{C.NS_SOAP12}}}Envelope":
            raise SoapFault("VersionMismatch", "not a SOAP 1.2 envelope")
        if len(env.findall(f"{{{C.NS_SOAP12}}}Header")) != 1 or len(env.findall(f"{{{C.NS_SOAP12}}}Body")) != 1:
            raise SoapFault("Sender", "exactly one Header and one Body are required")
        return env, attachments, mtom

    def _addressing(self, env: etree._Element) -> tuple[str, str]:
        header = env.find(f"{{{C.NS_SOAP12}}}Header")
        actions = header.findall(f"{{{C.NS_WSA}}}Action")
        if len(actions) != 1:
            raise SoapFault("Sender", "exactly one wsa:Action is required (2005/08 namespace)")
        a = actions[0]
        if a.get(f"{{{C.NS_SOAP12}}}mustUnderstand") not in ("1", "true"):
            raise SoapFault("Sender", "IHE-WSA101: wsa:Action must carry mustUnderstand=\"true\"")
        if (a.text or "") != (a.text or "").strip():
            raise SoapFault("Sender", "wsa:Action has leading or trailing whitespace")
        for name in ("MessageID", "ReplyTo", "To", "From", "FaultTo"):
            if len(header.findall(f"{{{C.NS_WSA}}}{name}")) > 1:
                raise SoapFault("Sender", f"wsa:{name} appears more than once")
        mid = header.find(f"{{{C.NS_WSA}}}MessageID")
        if mid is None or not (mid.text or "").strip():
            raise SoapFault("Sender", "wsa:MessageID is required")
        reply = header.find(f"{{{C.NS_WSA}}}ReplyTo/{{{C.NS_WSA}}}Address")
        if reply is None or (reply.text or "").strip() != C.WSA_ANONYMOUS:
            raise SoapFault("Sender", "IHE-WSA102: wsa:ReplyTo with the anonymous address is required")
        return a.text or "", (mid.text or "").strip()

    def _resolve_xop(self, payload: etree._Element, attachments: dict[str, bytes]) -> dict[str, bytes]:
        """Rebuild the XOP infoset (base64 text in place of xop:Include); returns {Document@id: bytes}."""
        docs: dict[str, bytes] = {}
        for inc in list(payload.iter(f"{{{C.NS_XOP}}}Include")):
            parent = inc.getparent()
            cid = inc.get("href", "")
            if not cid.startswith("cid:"):
                raise SoapFault("Sender", f"xop:Include href {cid!r} is not a cid: URL")
            from urllib.parse import unquote

            key = unquote(cid[4:])
            if key not in attachments:
                raise SoapFault("Sender", f"xop:Include refers to a missing MIME part {key}")
            if parent.text and parent.text.strip():
                raise SoapFault("Sender", "an element with xop:Include must have no other content")
            parent.remove(inc)
            parent.text = base64.b64encode(attachments[key]).decode("ascii")
        for d in payload.iter(C.q("xds", "Document")):
            try:
                docs[d.get("id", "")] = base64.b64decode(d.text or "", validate=True)
            except ValueError:
                raise SoapFault("Sender", "xds:Document is not base64") from None
        return docs

    def _reply(self, action: str, relates_to: str, payload: etree._Element, attachments: list[tuple[str, bytes]], mtom: bool) -> Response:
        env = etree.Element(f"{{{C.NS_SOAP12}}}Envelope", nsmap={"s": C.NS_SOAP12, "wsa": C.NS_WSA})
        header = etree.SubElement(env, f"{{{C.NS_SOAP12}}}Header")
        a = etree.SubElement(header, f"{{{C.NS_WSA}}}Action")
        a.set(f"{{{C.NS_SOAP12}}}mustUnderstand", "true")
        a.text = action
        if relates_to:
            etree.SubElement(header, f"{{{C.NS_WSA}}}RelatesTo").text = relates_to
        etree.SubElement(env, f"{{{C.NS_SOAP12}}}Body").append(payload)
        xml = etree.tostring(env, xml_declaration=True, encoding="UTF-8")
        if not mtom:
            return Response(xml, status=200, content_type=f'application/soap+xml; charset=UTF-8; action="{action}"')
        boundary = f"MIMEBoundary_{uuid.uuid4().hex}"
        out = bytearray(
            f'--{boundary}\r\nContent-Type: application/xop+xml; charset=UTF-8; type="application/soap+xml"\r\n'
            f"Content-Transfer-Encoding: binary\r\nContent-ID: <root@registry>\r\n\r\n".encode()
        )
        out += xml + b"\r\n"
        for cid, data in attachments:
            out += f"--{boundary}\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\nContent-ID: <{cid}>\r\n\r\n".encode()
            out += data + b"\r\n"
        out += f"--{boundary}--\r\n".encode()
        ctype = (
            f'multipart/related; boundary="{boundary}"; type="application/xop+xml"; start="<root@registry>"; '
            f'start-info="application/soap+xml"; action="{action}"'
        )
        return Response(bytes(out), status=200, content_type=ctype)

    # -- ITI-42 -----------------------------------------------------------------------------
    def iti42(self, sor: etree._Element, _docs: dict[str, bytes]) -> tuple[etree._Element, list]:
        errors = self.check_submission(sor, require_repository=True)
        if not any(e.severity == C.SEVERITY_ERROR for e in errors):
            self._commit(sor)
        return registry_response(errors), []

    # -- ITI-41 ----------------------------------------------------------------------------
    def iti41(self, pnr: etree._Element, docs: dict[str, bytes]) -> tuple[etree._Element, list]:
        sor = pnr.find(C.q("lcm", "SubmitObjectsRequest"))
        errors: list[Err] = []
        entries = sor.findall(f"{C.q('rim', 'RegistryObjectList')}/{C.q('rim', 'ExtrinsicObject')}")
        ids = [e.get("id", "") for e in entries]
        for de in entries:
            de_id = de.get("id", "")
            if de_id not in docs:
                errors.append(Err(C.XDS_MISSING_DOCUMENT, f"DocumentEntry {de_id} has no Document", de_id))
                continue
            data = docs[de_id]
            s = _slots(de)
            sha1 = hashlib.sha1(data).hexdigest()
            if "hash" in s and s["hash"][0][:1] and s["hash"][0][0].lower() != sha1:
                errors.append(Err(C.XDS_REPOSITORY_METADATA_ERROR, f"hash {s['hash'][0][0]} does not match the document ({sha1})", de_id))
            if "size" in s and s["size"][0][:1] and s["size"][0][0] != str(len(data)):
                errors.append(Err(C.XDS_REPOSITORY_METADATA_ERROR, f"size {s['size'][0][0]} does not match the document ({len(data)})", de_id))
            uid = _ext_id(de, C.DE_UNIQUE_ID)
            if uid in self.documents:
                old = self.documents[uid][1]
                if hashlib.sha1(old).hexdigest() != sha1:
                    errors.append(Err(C.XDS_NON_IDENTICAL_HASH, f"document {uid} already stored with another hash", uid))
                if len(old) != len(data):
                    errors.append(Err(C.XDS_NON_IDENTICAL_SIZE, f"document {uid} already stored with another size", uid))
        for doc_id in docs:
            if doc_id not in ids:
                errors.append(Err(C.XDS_MISSING_DOCUMENT_METADATA, f"Document {doc_id} has no DocumentEntry", doc_id))
        if errors:
            return registry_response(errors), []
        # Expected actions: add repositoryUniqueId / hash / size, store, then register (copying the registry's errors)
        sor = copy.deepcopy(sor)
        stored: list[str] = []
        for de in sor.findall(f"{C.q('rim', 'RegistryObjectList')}/{C.q('rim', 'ExtrinsicObject')}"):
            data = docs[de.get("id", "")]
            _set_slot(de, "repositoryUniqueId", self.repository_unique_id)
            _set_slot(de, "hash", hashlib.sha1(data).hexdigest())
            _set_slot(de, "size", str(len(data)))
            uid = _ext_id(de, C.DE_UNIQUE_ID)
            self.documents.setdefault(uid, (de.get("mimeType", ""), data))
            stored.append(uid)
        if not self.schema.validate(sor):
            raise SchemaInvalid(str(self.schema.error_log.last_error))
        errors = self.check_submission(sor, require_repository=True)
        if any(e.severity == C.SEVERITY_ERROR for e in errors):
            for uid in stored:
                if not any(e.unique_id == uid for e in self.entries.values()):
                    self.documents.pop(uid, None)
            return registry_response(errors), []
        self._commit(sor)
        return registry_response(errors), []

    # -- ITI-57 (availability status only) ----------------------------------------------------
    def iti57(self, sor: etree._Element, _docs: dict[str, bytes]) -> tuple[etree._Element, list]:
        errors: list[Err] = []
        objs = sor.find(C.q("rim", "RegistryObjectList"))
        ss = self._submission_set(objs, errors)
        updates = [a for a in objs.findall(C.q("rim", "Association")) if a.get("associationType") == C.ASSOC_UPDATE_AVAILABILITY_STATUS]
        if not updates:
            errors.append(Err(C.XDS_REGISTRY_METADATA_ERROR, "no UpdateAvailabilityStatus association"))
        for a in updates:
            s = _slots(a)
            target = self.entries.get(a.get("targetObject", ""))
            if target is None:
                errors.append(Err(C.XDS_REGISTRY_METADATA_ERROR, f"unknown DocumentEntry {a.get('targetObject')}", a.get("targetObject", "")))
                continue
            orig = (s.get("OriginalStatus") or [[""]])[0][:1]
            new = (s.get("NewStatus") or [[""]])[0][:1]
            if orig != [target.status]:
                errors.append(Err(ERROR_METADATA_UPDATE, f"OriginalStatus {orig} is not the current status {target.status}", target.entry_uuid))
            if new not in ([C.STATUS_APPROVED], [C.STATUS_DEPRECATED]):
                errors.append(Err(ERROR_METADATA_UPDATE, f"NewStatus {new} is not Approved or Deprecated", target.entry_uuid))
            if ss is not None and ss[1] != target.patient_id:
                errors.append(Err(C.XDS_PATIENT_ID_DOES_NOT_MATCH, "SubmissionSet patientId differs from the DocumentEntry's", target.entry_uuid))
        if not errors:
            for a in updates:
                self.entries[a.get("targetObject", "")].status = _slots(a)["NewStatus"][0][0]
            if ss is not None:
                self.submission_sets[ss[0]] = ss[1]
        return registry_response(errors), []

    # -- ITI-18 ------------------------------------------------------------------------------
    def iti18(self, req: etree._Element, _docs: dict[str, bytes]) -> tuple[etree._Element, list]:
        opt = req.find(C.q("query", "ResponseOption"))
        leaf = opt is not None and opt.get("returnType") == "LeafClass"
        q = req.find(C.q("rim", "AdhocQuery"))
        params = {s.get("name", ""): [v.text or "" for v in s.iter(C.q("rim", "Value"))] for s in q.findall(C.q("rim", "Slot"))}

        def values(name: str) -> list[str]:
            out: list[str] = []
            for raw in params.get(name, []):
                out += [m.group(1) for m in re.finditer(r"'([^']*)'", raw)]
            return out

        qid = q.get("id", "")
        if qid == C.SQ_FIND_DOCUMENTS:
            pid = values("$XDSDocumentEntryPatientId")
            statuses = values("$XDSDocumentEntryStatus")
            if len(pid) != 1 or not statuses:
                return query_response([Err(C.XDS_STORED_QUERY_MISSING_PARAM, "$XDSDocumentEntryPatientId and $XDSDocumentEntryStatus are required")], []), []
            found = [e for e in self.entries.values() if e.patient_id == pid[0] and e.status in statuses]
        elif qid == C.SQ_GET_DOCUMENTS:
            uids, uuids = values("$XDSDocumentEntryUniqueId"), values("$XDSDocumentEntryEntryUUID")
            if not (uids or uuids):
                return query_response([Err(C.XDS_STORED_QUERY_MISSING_PARAM, "$XDSDocumentEntryUniqueId or $XDSDocumentEntryEntryUUID")], []), []
            found = [e for e in self.entries.values() if e.unique_id in uids or e.entry_uuid in uuids]
        else:
            return query_response([Err(C.XDS_UNKNOWN_STORED_QUERY, f"stored query {qid} is not supported here")], []), []
        objs = []
        for e in found:
            if leaf:
                el = copy.deepcopy(e.element)
                el.set("status", e.status)
                objs.append(el)
            else:
                ref = etree.Element(C.q("rim", "ObjectRef"))
                ref.set("id", e.entry_uuid)
                objs.append(ref)
        return query_response([], objs), []

    # -- ITI-43 ----------------------------------------------------------------------------
    def iti43(self, req: etree._Element, _docs: dict[str, bytes]) -> tuple[etree._Element, list]:
        errors: list[Err] = []
        found: list[tuple[str, str, str, bytes]] = []
        for dr in req.findall(C.q("xds", "DocumentRequest")):
            rep = dr.findtext(C.q("xds", "RepositoryUniqueId")) or ""
            uid = dr.findtext(C.q("xds", "DocumentUniqueId")) or ""
            if rep != self.repository_unique_id:
                errors.append(Err(C.XDS_UNKNOWN_REPOSITORY_ID, f"repository {rep} is not this one", uid))
            elif uid not in self.documents:
                errors.append(Err(C.XDS_DOCUMENT_UNIQUE_ID_ERROR, f"document {uid} is not in this repository", uid))
            else:
                mime, data = self.documents[uid]
                found.append((rep, uid, mime, data))
        attachments = []
        for i, (_rep, _uid, _m, data) in enumerate(found):
            attachments.append((f"doc{i}@registry", data))
        return retrieve_response(errors, found), attachments

    # -- the metadata rules ---------------------------------------------------------------------
    def check_submission(self, sor: etree._Element, *, require_repository: bool) -> list[Err]:
        errors: list[Err] = []
        objs = sor.find(C.q("rim", "RegistryObjectList"))
        ids = [o.get("id", "") for o in objs]
        if len(ids) != len(set(ids)):
            errors.append(Err(C.XDS_REGISTRY_METADATA_ERROR, "object ids are not unique in the submission"))
        ss = self._submission_set(objs, errors)
        des = objs.findall(C.q("rim", "ExtrinsicObject"))
        for de in des:
            self._check_document_entry(de, errors, require_repository, ss[1] if ss else None)
        folders = self._folders(objs, errors, ss[1] if ss else None)
        self._check_unique_in_message(objs, errors)
        de_ids = {d.get("id", "") for d in des}
        members = set()
        for a in objs.findall(C.q("rim", "Association")):
            t = a.get("associationType", "")
            if t == C.ASSOC_HAS_MEMBER:
                source = a.get("sourceObject")
                if source in folders:  # FD-DE: a DocumentEntry of this submission filed in a new Folder
                    if a.get("targetObject") not in de_ids:
                        errors.append(Err(C.XDS_UNRESOLVED_REFERENCE, "Folder HasMember target is not a DocumentEntry of this submission", a.get("id", "")))
                    continue
                if ss is None or source != ss[2]:
                    errors.append(Err(C.XDS_REGISTRY_METADATA_ERROR, "HasMember source is not the SubmissionSet", a.get("id", "")))
                members.add(a.get("targetObject", ""))
                if a.get("targetObject") in de_ids and _slots(a).get("SubmissionSetStatus") != [["Original"]]:
                    errors.append(Err(C.XDS_REGISTRY_METADATA_ERROR, "HasMember of a new DocumentEntry needs SubmissionSetStatus=Original", a.get("id", "")))
            elif t == C.ASSOC_RPLC:
                src, tgt = a.get("sourceObject", ""), a.get("targetObject", "")
                if src not in de_ids:
                    errors.append(Err(C.XDS_UNRESOLVED_REFERENCE, "RPLC source is not a DocumentEntry of this submission", src))
                target = self.entries.get(tgt)
                if target is None:
                    errors.append(Err(C.XDS_UNRESOLVED_REFERENCE, f"RPLC target {tgt} is not in the registry", tgt))
                elif target.status != C.STATUS_APPROVED:
                    errors.append(Err(C.XDS_REGISTRY_DEPRECATED_DOCUMENT_ERROR, f"RPLC target {tgt} is not Approved", tgt))
                elif ss is not None and target.patient_id != ss[1]:
                    errors.append(Err(C.XDS_PATIENT_ID_DOES_NOT_MATCH, "RPLC target belongs to another patient", tgt))
            else:
                errors.append(Err(C.XDS_REGISTRY_METADATA_ERROR, f"associationType {t!r} is not accepted in a submission", a.get("id", "")))
        for d in de_ids - members:
            errors.append(Err(C.XDS_REGISTRY_METADATA_ERROR, f"DocumentEntry {d} is not a member of the SubmissionSet", d))
        for f in set(folders) - members:
            errors.append(Err(C.XDS_REGISTRY_METADATA_ERROR, f"Folder {f} is not a member of the SubmissionSet", f))
        return errors

    def _registered_unique_ids(self) -> dict[str, str]:
        """uniqueId -> what holds it, over every registered SubmissionSet, Folder and DocumentEntry."""
        out = {e.unique_id: "a DocumentEntry" for e in self.entries.values()}
        out.update({u: "a Folder" for u in self.folders})
        out.update({u: "a SubmissionSet" for u in self.submission_sets})
        return out

    def _check_unique_in_message(self, objs: etree._Element, errors: list[Err]) -> None:
        """XDSRegistryDuplicateUniqueIdInMessage: one uniqueId on two objects of the submission."""
        seen: set[str] = set()
        for obj in objs:
            for scheme in (C.DE_UNIQUE_ID, C.SS_UNIQUE_ID, C.FOLDER_UNIQUE_ID):
                value = _ext_id(obj, scheme)
                if not value:
                    continue
                if value in seen:
                    errors.append(Err(C.XDS_REGISTRY_DUPLICATE_UNIQUE_ID_IN_MESSAGE, f"uniqueId {value} is used more than once in the submission", obj.get("id", "")))
                seen.add(value)

    def _folders(self, objs: etree._Element, errors: list[Err], ss_pid: str | None) -> dict[str, str]:
        """{Folder id: uniqueId} of the new Folders, checked (ITI TF-3 4.2.3.4; ITI TF-2 3.42.4.1.3.3.2 / .7)."""
        folder_ids = {
            c.get("classifiedObject")
            for c in objs.iter(C.q("rim", "Classification"))
            if c.get("classificationNode") == C.FOLDER_CLASSIFICATION_NODE
        }
        out: dict[str, str] = {}
        registered = self._registered_unique_ids()
        for p in objs.findall(C.q("rim", "RegistryPackage")):
            fid = p.get("id", "")
            if fid not in folder_ids:
                continue
            uid = self._ext(p, C.FOLDER_UNIQUE_ID, errors, fid) or ""
            pid = self._ext(p, C.FOLDER_PATIENT_ID, errors, fid)
            if uid and not _OID.match(uid):
                errors.append(Err(C.XDS_REGISTRY_METADATA_ERROR, f"Folder uniqueId {uid} is not an OID", fid))
            if uid in registered:
                errors.append(Err(C.XDS_DUPLICATE_UNIQUE_ID, f"Folder uniqueId {uid} is not unique: {registered[uid]} in the registry has it", fid))
            self._check_pid(pid, errors, fid)
            if pid and ss_pid and pid != ss_pid:
                errors.append(Err(C.XDS_PATIENT_ID_DOES_NOT_MATCH, "Folder patientId differs from the SubmissionSet's", fid))
            out[fid] = uid
        return out

    def _submission_set(self, objs: etree._Element, errors: list[Err]) -> tuple[str, str, str] | None:
        """(uniqueId, patientId, id) of the one SubmissionSet, after checking it."""
        packages = objs.findall(C.q("rim", "RegistryPackage"))
        ss_ids = {
            c.get("classifiedObject")
            for c in objs.iter(C.q("rim", "Classification"))
            if c.get("classificationNode") == C.SS_CLASSIFICATION_NODE
        }
        folder_ids = {
            c.get("classifiedObject")
            for c in objs.iter(C.q("rim", "Classification"))
            if c.get("classificationNode") == C.FOLDER_CLASSIFICATION_NODE
        }
        sets = [p for p in packages if p.get("id") in ss_ids]
        for p in packages:
            if p.get("id") not in ss_ids and p.get("id") not in folder_ids:
                errors.append(Err(C.XDS_REGISTRY_METADATA_ERROR, f"RegistryPackage {p.get('id')} is labeled neither SubmissionSet nor Folder", p.get("id", "")))
        if len(sets) != 1:
            errors.append(Err(C.XDS_REGISTRY_METADATA_ERROR, f"{len(sets)} SubmissionSets; exactly one is required"))
            return None
        ss = sets[0]
        sid = ss.get("id", "")
        s = _slots(ss)
        if "submissionTime" not in s or len(s["submissionTime"][0]) != 1 or not _DTM.match(s["submissionTime"][0][0]):
            errors.append(Err(C.XDS_REGISTRY_METADATA_ERROR, "SubmissionSet submissionTime missing or not a DTM", sid))
        self._check_author(ss, C.SS_AUTHOR, errors, sid)
        self._check_codes(ss, {C.SS_CONTENT_TYPE_CODE: ("contentTypeCode", 1, 1)}, errors, sid)
        uid = self._ext(ss, C.SS_UNIQUE_ID, errors, sid)
        source = self._ext(ss, C.SS_SOURCE_ID, errors, sid)
        pid = self._ext(ss, C.SS_PATIENT_ID, errors, sid)
        if uid and not _OID.match(uid):
            errors.append(Err(C.XDS_REGISTRY_METADATA_ERROR, f"SubmissionSet uniqueId {uid} is not an OID", sid))
        if source and not _OID.match(source):
            errors.append(Err(C.XDS_REGISTRY_METADATA_ERROR, f"sourceId {source} is not an OID", sid))
        registered = self._registered_unique_ids()
        if uid and uid in registered:  # ITI TF-2 3.42.4.1.3.3.7; codeContext says which object and the value
            errors.append(Err(C.XDS_DUPLICATE_UNIQUE_ID, f"SubmissionSet uniqueId {uid} is not unique: {registered[uid]} in the registry has it", sid))
        self._check_pid(pid, errors, sid)
        return (uid or "", pid or "", sid)

    def _check_pid(self, pid: str | None, errors: list[Err], where: str) -> None:
        if pid is None:
            return
        if not _CX.match(pid):
            errors.append(Err(C.XDS_REGISTRY_METADATA_ERROR, f"patientId {pid!r} is not a CX ID^^^&OID&ISO", where))
        elif pid not in self.known_patients:
            errors.append(Err(C.XDS_UNKNOWN_PATIENT_ID, f"patient {pid} is not known in the affinity domain", where))

    def _check_document_entry(self, de: etree._Element, errors: list[Err], require_repository: bool, ss_pid: str | None) -> None:
        did = de.get("id", "")
        if de.get("objectType") != C.OBJECT_TYPE_STABLE_DOCUMENT:
            errors.append(Err(C.XDS_REGISTRY_METADATA_ERROR, f"objectType {de.get('objectType')} is not the stable DocumentEntry type", did))
        mime = de.get("mimeType", "")
        if not mime or (self.codes.has_type("mimeType") and not self.codes.find("mimeType", mime, "")):
            errors.append(Err(C.XDS_REGISTRY_METADATA_ERROR, f"mimeType {mime!r} is not accepted in this affinity domain", did))
        s = _slots(de)
        for name, occurrences in s.items():
            if len(occurrences) > 1:
                errors.append(Err(C.XDS_REGISTRY_METADATA_ERROR, f"slot {name} appears {len(occurrences)} times", did))
            if name in DE_SINGLE_SLOTS and len(occurrences[0]) != 1:
                errors.append(Err(C.XDS_REGISTRY_METADATA_ERROR, f"slot {name} must have exactly one value", did))
        required = ["creationTime", "languageCode", "sourcePatientId"] + (["hash", "size", "repositoryUniqueId"] if require_repository else [])
        for name in required:
            if name not in s or not s[name][0] or not s[name][0][0]:
                errors.append(Err(C.XDS_REGISTRY_METADATA_ERROR, f"required slot {name} is missing", did))

        def one(name: str) -> str:
            return s[name][0][0] if name in s and s[name][0] else ""

        for name in ("creationTime", "serviceStartTime", "serviceStopTime"):
            if one(name) and not _DTM.match(one(name)):
                errors.append(Err(C.XDS_REGISTRY_METADATA_ERROR, f"{name} {one(name)!r} is not a DTM", did))
        if one("hash") and not _HEX40.match(one("hash")):
            errors.append(Err(C.XDS_REGISTRY_METADATA_ERROR, "hash is not 40 hex digits (SHA-1)", did))
        if one("size") and not one("size").isdigit():
            errors.append(Err(C.XDS_REGISTRY_METADATA_ERROR, "size is not an integer", did))
        if one("repositoryUniqueId") and not _OID.match(one("repositoryUniqueId")):
            errors.append(Err(C.XDS_REGISTRY_METADATA_ERROR, "repositoryUniqueId is not an OID", did))
        if one("languageCode") and not _LANG.match(one("languageCode")):
            errors.append(Err(C.XDS_REGISTRY_METADATA_ERROR, f"languageCode {one('languageCode')!r} is not RFC 3066", did))
        if one("sourcePatientId") and not _CX.match(one("sourcePatientId")):
            errors.append(Err(C.XDS_REGISTRY_METADATA_ERROR, f"sourcePatientId {one('sourcePatientId')!r} is not a CX", did))
        for v in (s.get("sourcePatientInfo") or [[]])[0]:
            if not re.match(r"^PID-\d+\|.+$", v):
                errors.append(Err(C.XDS_REGISTRY_METADATA_ERROR, f"sourcePatientInfo value {v!r} is not PID-n|value", did))
        for v in (s.get(C.SLOT_REFERENCE_ID_LIST) or [[]])[0]:
            if not cxi_ok(v):
                errors.append(Err(C.XDS_REGISTRY_METADATA_ERROR, f"referenceIdList value {v!r} is not a valid CXi", did))
        self._check_author(de, C.DE_AUTHOR, errors, did)
        self._check_codes(de, DE_CODED, errors, did)
        pid = self._ext(de, C.DE_PATIENT_ID, errors, did)
        uid = self._ext(de, C.DE_UNIQUE_ID, errors, did)
        self._check_pid(pid, errors, did)
        if pid and ss_pid and pid != ss_pid:
            errors.append(Err(C.XDS_PATIENT_ID_DOES_NOT_MATCH, "DocumentEntry patientId differs from the SubmissionSet's", did))
        if uid is not None and (not uid or len(uid) > 128):
            errors.append(Err(C.XDS_REGISTRY_METADATA_ERROR, "DocumentEntry uniqueId is empty or too long", did))
        # ITI TF-2 3.42.4.1.3.3.1: the same uniqueId with the same hash and size continues without error
        existing = next((e for e in self.entries.values() if e.unique_id == uid), None)
        if existing is not None:
            if one("hash") and existing.hash != one("hash").lower():
                errors.append(Err(C.XDS_NON_IDENTICAL_HASH, f"{uid}: DocumentEntry uniqueId registered with hash {existing.hash}, not {one('hash')}", did))
            if one("size") and str(existing.size) != one("size"):
                errors.append(Err(C.XDS_NON_IDENTICAL_SIZE, f"{uid}: DocumentEntry uniqueId registered with size {existing.size}, not {one('size')}", did))
            if self.legacy_document_duplicates:  # what older registries answer, against 3.42.4.1.3.3.1
                errors.append(Err(C.XDS_DUPLICATE_UNIQUE_ID, f"DocumentEntry uniqueId {uid} is already registered", uid))
        if did in self.entries:  # ITI TF-2 3.42.4.1.3.7: a UUID once assigned is permanent
            errors.append(Err(C.XDS_REGISTRY_METADATA_ERROR, f"entryUUID {did} is already registered", did))

    def _check_author(self, obj: etree._Element, scheme: str, errors: list[Err], where: str) -> None:
        for c in obj.findall(C.q("rim", "Classification")):
            if c.get("classificationScheme") != scheme:
                continue
            if c.get("nodeRepresentation", None) != "" or c.get("classifiedObject") != where:
                errors.append(Err(C.XDS_REGISTRY_METADATA_ERROR, "author classification needs nodeRepresentation=\"\" and the right classifiedObject", where))
            s = _slots(c)
            extra = set(s) - AUTHOR_SLOTS
            if extra:
                errors.append(Err(C.XDS_REGISTRY_METADATA_ERROR, f"author has unknown slot(s) {sorted(extra)}", where))
            if not (s.get("authorPerson") or s.get("authorInstitution")):
                errors.append(Err(C.XDS_REGISTRY_METADATA_ERROR, "author needs authorPerson or authorInstitution", where))
            for v in (s.get("authorPerson") or [[]])[0]:
                if not xcn_ok(v):
                    errors.append(Err(C.XDS_REGISTRY_METADATA_ERROR, f"authorPerson {v!r} is not a valid XCN", where))
            for v in (s.get("authorInstitution") or [[]])[0]:
                if not xon_ok(v):
                    errors.append(Err(C.XDS_REGISTRY_METADATA_ERROR, f"authorInstitution {v!r} is not a valid XON", where))

    def _check_codes(self, obj: etree._Element, schemes: dict[str, tuple[str, int, int | None]], errors: list[Err], where: str) -> None:
        known = set(schemes) | {C.DE_AUTHOR, C.SS_AUTHOR}
        counts = {k: 0 for k in schemes}
        for c in obj.findall(C.q("rim", "Classification")):
            scheme = c.get("classificationScheme", "")
            if scheme not in known:
                errors.append(Err(C.XDS_REGISTRY_METADATA_ERROR, f"unknown classificationScheme {scheme}", where))
                continue
            if scheme not in schemes:
                continue
            counts[scheme] += 1
            code_type = schemes[scheme][0]
            if c.get("classifiedObject") != where:
                errors.append(Err(C.XDS_REGISTRY_METADATA_ERROR, f"{code_type} classifies {c.get('classifiedObject')}, not {where}", where))
            value = c.get("nodeRepresentation", "")
            s = _slots(c)
            cs = s.get("codingScheme")
            if not value or not cs or len(cs) != 1 or len(cs[0]) != 1:
                errors.append(Err(C.XDS_REGISTRY_METADATA_ERROR, f"{code_type} needs a code and exactly one codingScheme value", where))
                continue
            if not _name(c):
                errors.append(Err(C.XDS_REGISTRY_METADATA_ERROR, f"{code_type} {value} has no display name", where))
            if not self.codes.contains(code_type, value, cs[0][0]):
                errors.append(Err(C.XDS_REGISTRY_METADATA_ERROR, f"{code_type} {value!r} ({cs[0][0]}) is not in the affinity domain's code list", where))
        for scheme, (code_type, lo, hi) in schemes.items():
            n = counts[scheme]
            if n < lo or (hi is not None and n > hi):
                errors.append(Err(C.XDS_REGISTRY_METADATA_ERROR, f"{code_type}: {n} given, {lo}..{hi or 'n'} required", where))

    def _ext(self, obj: etree._Element, scheme: str, errors: list[Err], where: str) -> str | None:
        found = [e for e in obj.findall(C.q("rim", "ExternalIdentifier")) if e.get("identificationScheme") == scheme]
        label = C.EXTERNAL_ID_NAMES[scheme]
        if len(found) != 1:
            errors.append(Err(C.XDS_REGISTRY_METADATA_ERROR, f"{label}: {len(found)} given, exactly one required", where))
            return None
        e = found[0]
        if e.get("registryObject") != where:
            errors.append(Err(C.XDS_REGISTRY_METADATA_ERROR, f"{label} registryObject is not {where}", where))
        if _name(e) != label:
            errors.append(Err(C.XDS_REGISTRY_METADATA_ERROR, f"{label} ExternalIdentifier must be named {label}", where))
        return e.get("value", "")

    def _commit(self, sor: etree._Element) -> None:
        objs = sor.find(C.q("rim", "RegistryObjectList"))
        for de in objs.findall(C.q("rim", "ExtrinsicObject")):
            s = _slots(de)
            entry_uuid = de.get("id", "")
            if not entry_uuid.startswith("urn:uuid:"):
                entry_uuid = f"urn:uuid:{uuid.uuid4()}"
            el = copy.deepcopy(de)
            el.set("id", entry_uuid)
            self.entries[entry_uuid] = Entry(
                entry_uuid=entry_uuid,
                unique_id=_ext_id(de, C.DE_UNIQUE_ID),
                patient_id=_ext_id(de, C.DE_PATIENT_ID),
                hash=s["hash"][0][0].lower(),
                size=int(s["size"][0][0]),
                repository_unique_id=s["repositoryUniqueId"][0][0],
                element=el,
            )
        for a in objs.findall(C.q("rim", "Association")):
            if a.get("associationType") == C.ASSOC_RPLC:
                self.entries[a.get("targetObject", "")].status = C.STATUS_DEPRECATED
        errors: list[Err] = []
        folders = self._folders(objs, errors, None)
        ss = self._submission_set(objs, errors)
        if ss is not None:
            self.submission_sets[ss[0]] = ss[1]
        for fid, uid in folders.items():
            self.folders[uid] = _ext_id(next(p for p in objs if p.get("id") == fid), C.FOLDER_PATIENT_ID)


class SchemaInvalid(Exception):
    pass


def _ext_id(obj: etree._Element, scheme: str) -> str:
    for e in obj.findall(C.q("rim", "ExternalIdentifier")):
        if e.get("identificationScheme") == scheme:
            return e.get("value", "")
    return ""


def _set_slot(obj: etree._Element, name: str, value: str) -> None:
    for s in obj.findall(C.q("rim", "Slot")):
        if s.get("name") == name:
            obj.remove(s)
    s = etree.Element(C.q("rim", "Slot"))
    s.set("name", name)
    vl = etree.SubElement(s, C.q("rim", "ValueList"))
    etree.SubElement(vl, C.q("rim", "Value")).text = value
    slots = obj.findall(C.q("rim", "Slot"))
    (slots[-1].addnext(s) if slots else obj.insert(0, s))


def _error_list(errors: list[Err]) -> etree._Element | None:
    if not errors:
        return None
    el = etree.Element(C.q("rs", "RegistryErrorList"))
    el.set("highestSeverity", C.SEVERITY_ERROR if any(e.severity == C.SEVERITY_ERROR for e in errors) else C.SEVERITY_WARNING)
    for e in errors:
        r = etree.SubElement(el, C.q("rs", "RegistryError"))
        r.set("errorCode", e.code)
        r.set("codeContext", e.context)
        r.set("severity", e.severity)
        if e.location:
            r.set("location", e.location)
    return el


def registry_response(errors: list[Err]) -> etree._Element:
    failed = any(e.severity == C.SEVERITY_ERROR for e in errors)
    rr = etree.Element(C.q("rs", "RegistryResponse"), nsmap={"rs": C.NS_RS})
    rr.set("status", C.STATUS_FAILURE if failed else C.STATUS_SUCCESS)
    el = _error_list(errors)
    if el is not None:
        rr.append(el)
    return rr


def query_response(errors: list[Err], objects: list[etree._Element]) -> etree._Element:
    failed = any(e.severity == C.SEVERITY_ERROR for e in errors)
    resp = etree.Element(C.q("query", "AdhocQueryResponse"), nsmap={"query": C.NS_QUERY, "rim": C.NS_RIM, "rs": C.NS_RS})
    resp.set("status", C.STATUS_FAILURE if failed else C.STATUS_SUCCESS)
    el = _error_list(errors)
    if el is not None:
        resp.append(el)
    lst = etree.SubElement(resp, C.q("rim", "RegistryObjectList"))
    for o in objects:
        lst.append(o)
    return resp


def retrieve_response(errors: list[Err], docs: list[tuple[str, str, str, bytes]]) -> etree._Element:
    resp = etree.Element(C.q("xds", "RetrieveDocumentSetResponse"), nsmap={"xds": C.NS_XDS, "rs": C.NS_RS, "xop": C.NS_XOP})
    failed = any(e.severity == C.SEVERITY_ERROR for e in errors)
    status = C.STATUS_SUCCESS if not failed else (C.STATUS_PARTIAL_SUCCESS if docs else C.STATUS_FAILURE)
    rr = etree.SubElement(resp, C.q("rs", "RegistryResponse"))
    rr.set("status", status)
    el = _error_list(errors)
    if el is not None:
        rr.append(el)
    for i, (rep, uid, mime, _data) in enumerate(docs):
        d = etree.SubElement(resp, C.q("xds", "DocumentResponse"))
        etree.SubElement(d, C.q("xds", "RepositoryUniqueId")).text = rep
        etree.SubElement(d, C.q("xds", "DocumentUniqueId")).text = uid
        etree.SubElement(d, C.q("xds", "mimeType")).text = mime
        doc = etree.SubElement(d, C.q("xds", "Document"))
        etree.SubElement(doc, f"{{{C.NS_XOP}}}Include").set("href", f"cid:doc{i}@registry")
    return resp


def soap_fault(exc: SoapFault) -> Response:
    env = etree.Element(f"{{{C.NS_SOAP12}}}Envelope", nsmap={"s": C.NS_SOAP12})
    body = etree.SubElement(env, f"{{{C.NS_SOAP12}}}Body")
    fault = etree.SubElement(body, f"{{{C.NS_SOAP12}}}Fault")
    code = etree.SubElement(fault, f"{{{C.NS_SOAP12}}}Code")
    etree.SubElement(code, f"{{{C.NS_SOAP12}}}Value").text = f"s:{exc.code}"
    reason = etree.SubElement(fault, f"{{{C.NS_SOAP12}}}Reason")
    t = etree.SubElement(reason, f"{{{C.NS_SOAP12}}}Text")
    t.set("{http://www.w3.org/XML/1998/namespace}lang", "en")
    t.text = exc.reason
    return Response(etree.tostring(env, xml_declaration=True, encoding="UTF-8"), status=exc.http if exc.code != "Receiver" else 500,
                    content_type="application/soap+xml; charset=UTF-8")
