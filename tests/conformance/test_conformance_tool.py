"""``xdsi conformance URL``: every case passes against a real ``xdsi serve``; a broken IDS fails the right ones.

The broken Imaging Document Source is a proxy in front of the same xdsi that
spoils one thing at a time (an error code, a wrong repository accepted, the
status, an echo, an addressing header), so each mode must fail exactly the
cases that test that rule and no others.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import requests
from lxml import etree
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from tests.support.ids import NIST_REPOSITORY, Study, make_study, populate
from tests.support.server import XdsiProcess
from xdsi.cli import main
from xdsi.conformance.cases import CASES
from xdsi.conformance.report import FAILED, PASS, SKIP, failed
from xdsi.conformance.runner import run
from xdsi.conformance.subject import from_kos
from xdsi.standards.constants import NS_IHERAD, NS_RS, NS_WSA, NS_XDS, STATUS_PARTIAL_SUCCESS, STATUS_SUCCESS, XDS_UNKNOWN_REPOSITORY_ID

ENDPOINT = "/xdsi/ImagingDocumentSource"
ALL = {c.id for c in CASES}


@dataclass
class Target:
    proc: XdsiProcess
    study: Study
    kos: Path
    other: Study  # a second study on the target, for ids_2018-4811 case 04

    def subject(self) -> Any:
        """The UIDs from the KOS file, with the other study a KOS cannot name."""
        subject = from_kos(self.kos)
        subject.other_study_uid = self.other.uid
        return subject

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proc.http_port}{ENDPOINT}"


def _store_kos(data_dir: Path, study_uid: str, out: Path) -> Path:
    """The study's KOS as xdsi's publisher builds it, stored in the study like a published manifest."""
    from xdsi.archive import Archive
    from xdsi.config import Settings
    from xdsi.xds.manifest import RetrieveInfo, build_kos, load_study

    archive = Archive.open(Settings(data_dir=data_dir))
    try:
        snap = load_study(archive.index, study_uid)
        assert snap is not None
        manifest = build_kos(snap, RetrieveInfo(ae_title="XDSI", location_uid=NIST_REPOSITORY, wado_rs_base="http://127.0.0.1/dicomweb"), now=datetime.now(timezone.utc))
        out.write_bytes(manifest.data)
        assert archive.store.store_file(out).ok
    finally:
        archive.close()
    return out


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    tmp = tmp_path_factory.mktemp("conformance")
    study = make_study(tmp / "s1", series=2, per_series=3)
    other = make_study(tmp / "s2", series=1, per_series=1, patient_id="PAT002", patient_name="ROE^RICHARD")
    data = tmp / "xdsi-data"
    populate(data, study.files + other.files)
    kos = _store_kos(data, study.uid, tmp / "kos.dcm")
    proc = XdsiProcess(data, env={"XDSI_REPOSITORY_UNIQUE_ID": NIST_REPOSITORY}).start()
    try:
        yield Target(proc, study, kos, other)
    finally:
        proc.stop()


def outcomes(results: list[Any]) -> dict[str, str]:
    return {r.case.id: r.outcome for r in results}


def failing(results: list[Any]) -> set[str]:
    return {r.case.id for r in results if r.outcome == FAILED}


# -- against xdsi ----------------------------------------------------------------------------------


def test_cli_every_case_passes_against_xdsi(target: Target, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--study: instances by QIDO-RS, repositoryUniqueId from the study's KOS found the same way."""
    junit = tmp_path / "junit.xml"
    rc = main(["conformance", target.url, "--study", target.study.uid, "--junit", str(junit)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"repository: {NIST_REPOSITORY}" in out
    for case in CASES:
        assert f"{case.id}" in out
    suite = etree.parse(str(junit)).getroot()[0]
    cases = suite.findall("testcase")
    assert {c.get("name") for c in cases} == ALL
    assert suite.get("failures") == "0" and suite.get("errors") == "0" and suite.get("skipped") == "0"
    assert all(c.find("failure") is None and c.find("skipped") is None for c in cases)


def test_kos_file_every_case_passes(target: Target) -> None:
    subject = target.subject()
    assert subject.repository_unique_id == NIST_REPOSITORY
    assert {s: [i.sop_instance_uid for i in items] for s, items in subject.series.items()} == {
        s: [sop for sop, _f in items] for s, items in target.study.series.items()
    }
    results = run(target.url, subject)
    assert set(outcomes(results).values()) == {PASS}, [(r.case.id, r.findings, r.notes) for r in results if r.outcome != PASS]
    # the good retrieves really asked for what they say
    assert any("6 document(s) requested" in n for r in results if r.case.id == "rad69-4803c-study" for n in r.notes)


def test_cli_local_data_dir(target: Target, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["conformance", target.url, "--study", target.study.uid, "--local", "--data-dir", str(target.proc.data_dir),
               "--repository-unique-id", NIST_REPOSITORY, "--case", "rad69-4803c-study", "--case", "rad69-4811-01-repository",
               "--case", "rad69-4811-04-other-study"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "local data directory" in out and out.count("PASS") == 3


def test_cli_refuses_what_it_cannot_test(target: Target, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conformance", target.url, "--study", "1.2.3.4.5.6.7.8.9.999"]) == 2  # not on the target
    assert "not found" in capsys.readouterr().err
    assert main(["conformance", target.url, "--study", "../etc"]) == 2  # never reaches a URL
    assert main(["conformance", target.url, "--kos", str(target.study.files[0])]) == 2  # an image, not a KOS
    assert "Key Object Selection" in capsys.readouterr().err
    assert main(["conformance", target.url, "--kos", str(target.kos), "--case", "no-such-case"]) == 2
    assert main(["conformance", target.url, "--kos", str(target.kos), "--repository-unique-id", "1.2.x"]) == 2
    assert "'1.2.x' is not a valid" in capsys.readouterr().err


def test_wrong_repository_id_fails_against_a_correct_target(target: Target) -> None:
    """A consumer configured with the wrong repositoryUniqueId sees the good retrieves fail, not pass."""
    subject = from_kos(target.kos, "1.3.6.1.4.1.21367.13.80.999")
    results = run(target.url, subject, case_ids=["rad69-4803a-single", "rad69-4811-01-repository"])
    assert outcomes(results) == {"rad69-4803a-single": FAILED, "rad69-4811-01-repository": PASS}


# -- against a broken Imaging Document Source ------------------------------------------------------

Mutation = Callable[[Any], None]  # edits a parsed SOAP envelope in place


@dataclass
class Broken:
    """A proxy to the real xdsi that spoils requests or answers as ``mode`` says."""

    upstream: str
    study_uid: str
    mode: str = ""
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{ENDPOINT}"

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        return self.app(environ, start_response)

    @Request.application  # type: ignore[misc]
    def app(self, request: Request) -> Response:
        data = request.get_data()
        env = etree.fromstring(data)
        action = env.findtext(f".//{{{NS_WSA}}}Action") or ""
        if self.mode == "fault-for-wado" and "wado" in action:
            return Response(_fault(env), status=500, content_type="application/soap+xml; charset=utf-8")
        if self.mode == "any-repository":  # success for a wrong repository
            for el in env.iter(f"{{{NS_XDS}}}RepositoryUniqueId"):
                el.text = NIST_REPOSITORY
            data = etree.tostring(env, xml_declaration=True, encoding="UTF-8")
        if self.mode == "ignores-study":  # a bare SOP Instance UID lookup: the study named is not checked
            for el in env.iter(f"{{{NS_IHERAD}}}StudyRequest"):
                el.set("studyInstanceUID", self.study_uid)
            data = etree.tostring(env, xml_declaration=True, encoding="UTF-8")
        if self.mode == "ignores-syntax":  # answers in Explicit VR LE whatever was asked
            for el in env.iter(f"{{{NS_IHERAD}}}TransferSyntaxUID"):
                el.text = "1.2.840.10008.1.2.1"
            data = etree.tostring(env, xml_declaration=True, encoding="UTF-8")
        up = requests.post(self.upstream, data=data, headers={"Content-Type": request.headers["Content-Type"]}, timeout=60)
        if self.mode == "plain-soap":  # no MTOM packaging: the root part alone as application/soap+xml
            root = self._spoil(up, root_only=True)
            return Response(root, status=up.status_code, content_type='application/soap+xml; charset=UTF-8')
        return Response(self._spoil(up), status=up.status_code, content_type=up.headers["Content-Type"])

    def _spoil(self, up: requests.Response, root_only: bool = False) -> bytes:
        from requests_toolbelt.multipart.decoder import MultipartDecoder

        dec = MultipartDecoder(up.content, up.headers["Content-Type"])
        boundary = dec.boundary
        parts = list(dec.parts)
        root = etree.fromstring(parts[0].content)
        MUTATIONS.get(self.mode, lambda e: None)(root)
        if root_only:
            return etree.tostring(root, xml_declaration=True, encoding="UTF-8")
        contents = [p.content for p in parts]
        if self.mode == "swap-documents" and len(parts) >= 3:  # each DocumentResponse gets another instance's file
            contents[1], contents[2] = contents[2], contents[1]
        if self.mode == "other-patient" and len(parts) >= 2 and contents[1][128:132] == b"DICM":  # first document, another patient
            contents[1] = _with_patient(contents[1], "OTHER^PATIENT", "OTHER01")
        out = []
        for i, p in enumerate(parts):
            head = b"".join(k + b": " + v + b"\r\n" for k, v in p.headers.items())
            body = etree.tostring(root, xml_declaration=True, encoding="UTF-8") if i == 0 else contents[i]
            out.append(b"--" + boundary + b"\r\n" + head + b"\r\n" + body + b"\r\n")
        if self.mode == "root-last":  # allowed: the Content-Type's start parameter names the root part
            out.append(out.pop(0))
        return b"".join(out) + b"--" + boundary + b"--\r\n"


def _with_patient(data: bytes, name: str, pid: str) -> bytes:
    import io

    from pydicom import dcmread

    ds = dcmread(io.BytesIO(data))
    ds.PatientName, ds.PatientID = name, pid
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _fault(env: Any) -> bytes:
    msg = env.findtext(f".//{{{NS_WSA}}}MessageID")
    return f"""<?xml version="1.0"?><s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope" xmlns:a="{NS_WSA}">
<s:Header><a:Action s:mustUnderstand="true">http://www.w3.org/2005/08/addressing/fault</a:Action><a:RelatesTo>{msg}</a:RelatesTo></s:Header>
<s:Body><s:Fault><s:Code><s:Value>s:Sender</s:Value><s:Subcode><s:Value>a:ActionNotSupported</s:Value></s:Subcode></s:Code>
<s:Reason><s:Text xml:lang="en">not offered</s:Text></s:Reason></s:Fault></s:Body></s:Envelope>""".encode()


def _wrong_code(env: Any) -> None:
    for e in env.iter(f"{{{NS_RS}}}RegistryError"):
        if e.get("errorCode") == XDS_UNKNOWN_REPOSITORY_ID:
            e.set("errorCode", "XDSDocumentUniqueIdError")


def _partial_as_success(env: Any) -> None:
    for rr in env.iter(f"{{{NS_RS}}}RegistryResponse"):
        if rr.get("status") == STATUS_PARTIAL_SUCCESS:
            rr.set("status", STATUS_SUCCESS)


def _drop_home_community(env: Any) -> None:
    for el in list(env.iter(f"{{{NS_XDS}}}HomeCommunityId")):
        el.getparent().remove(el)


def _drop_relates_to(env: Any) -> None:
    for el in list(env.iter(f"{{{NS_WSA}}}RelatesTo")):
        el.getparent().remove(el)


def _rename_mime_type(env: Any) -> None:
    for el in env.iter(f"{{{NS_XDS}}}mimeType"):
        el.tag = f"{{{NS_XDS}}}MimeType"


def _text_in_error(env: Any) -> None:
    for e in env.iter(f"{{{NS_RS}}}RegistryError"):
        e.text = "details belong in codeContext"


MUTATIONS: dict[str, Mutation] = {
    "wrong-code": _wrong_code,
    "partial-as-success": _partial_as_success,
    "drop-home-community": _drop_home_community,
    "drop-relates-to": _drop_relates_to,
    "text-in-error": _text_in_error,
    "schema-invalid": _rename_mime_type,
}
RETURNING = {"rad69-4803a-single", "rad69-4803b-series", "rad69-4803c-study", "rad69-4820-home-community", "rad69-transfer-syntax", "rad69-partial-success"}
ERROR_CASES = {c.id for c in CASES if "4811" in c.id or c.id in ("rad69-unknown-series", "rad69-partial-success", "wado-rendered-unknown")}


@pytest.fixture(scope="module")
def broken(target: Target) -> Iterator[Broken]:
    proxy = Broken(target.url, target.study.uid)
    server = make_server("127.0.0.1", 0, proxy, threaded=True)
    proxy.port = server.server_port
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        server.shutdown()
        thread.join(10)


@pytest.mark.parametrize("mode", ["", "root-last"])
def test_the_double_unspoiled_passes(broken: Broken, target: Target, mode: str) -> None:
    """The proxy itself is transparent: every failure below comes from its mode (root-last is conformant MTOM)."""
    broken.mode = mode
    results = run(broken.url, target.subject())
    assert set(outcomes(results).values()) == {PASS}, [(r.case.id, r.findings) for r in results if r.outcome != PASS]


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("wrong-code", {"rad69-4811-01-repository"}),
        ("any-repository", {"rad69-4811-01-repository"}),
        ("ignores-study", {"rad69-4811-04-other-study", "rad69-4811-04-unknown-study", "rad69-4811-05-empty-study"}),
        ("partial-as-success", {"rad69-partial-success"}),
        ("drop-home-community", {"rad69-4820-home-community"}),
        ("text-in-error", ERROR_CASES),
        ("drop-relates-to", ALL),
        ("plain-soap", ALL),
        ("ignores-syntax", {"rad69-transfer-syntax", "rad69-4811-08-empty-syntax", "rad69-4811-09-unsupported-syntax"}),
        ("swap-documents", {"rad69-4803b-series", "rad69-4803c-study", "rad69-4820-home-community"}),
        ("schema-invalid", RETURNING | {"wado-rendered-jpeg"}),
        ("other-patient", {"rad69-4803b-series", "rad69-4803c-study", "rad69-4820-home-community"}),
    ],
)
def test_broken_ids_fails_the_right_cases(broken: Broken, target: Target, mode: str, expected: set[str]) -> None:
    broken.mode = mode
    results = run(broken.url, target.subject())
    assert failing(results) == expected, [(r.case.id, r.findings) for r in results if r.outcome != PASS]
    assert failed(results)
    assert {r.outcome for r in results if r.case.id not in expected} <= {PASS}
    if mode == "other-patient":  # a single document under another patient than the manifest's is reported, not failed
        (single,) = [r for r in results if r.case.id == "rad69-4803a-single"]
        assert any("Patient ID 'OTHER01' differs" in w for w in single.warnings), single.findings


def test_broken_ids_cli_exit_status_and_junit(broken: Broken, target: Target, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken.mode = "wrong-code"
    junit = tmp_path / "j.xml"
    rc = main(["conformance", broken.url, "--kos", str(target.kos), "--other-study", target.other.uid, "--junit", str(junit), "--save", str(tmp_path / "evidence")])
    out = capsys.readouterr().out
    assert rc == 1
    assert "lacks XDSUnknownRepositoryId" in out
    # the evidence a monitor asks for: the request as sent and the answer as received
    kept = tmp_path / "evidence" / "rad69-4811-01-repository"
    assert b"XDSDocumentUniqueIdError" in (kept / "01-response.xml").read_bytes()
    assert b"RetrieveImagingDocumentSetRequest" in (kept / "01-request.xml").read_bytes()
    suite = etree.parse(str(junit)).getroot()[0]
    assert suite.get("failures") == "1"
    (bad,) = [c for c in suite.findall("testcase") if c.find("failure") is not None]
    assert bad.get("name") == "rad69-4811-01-repository"


def test_operation_not_offered_is_skipped_not_failed(broken: Broken, target: Target) -> None:
    """A target without WADO-WS answers ActionNotSupported: those cases are skipped, the run still passes."""
    broken.mode = "fault-for-wado"
    results = run(broken.url, target.subject())
    wado = {c.id for c in CASES if c.group == "WADO-WS"}
    assert {k: v for k, v in outcomes(results).items() if k in wado} == dict.fromkeys(wado, SKIP)
    assert not failed(results)


# -- the tool's own side: its requests, its input ---------------------------------------------------


def test_requests_are_what_a_strict_ids_expects(tmp_path: Path) -> None:
    """zeep's envelope completed per ITI TF-2 V.3.2.2 and valid against the official IHE schema."""
    from xdsi.conformance.cases import OP_RAD69
    from xdsi.conformance.runner import IHE_WSDL, Exchange, schema_errors
    from xdsi.standards.constants import ACTION_RAD69, NS_SOAP12

    url = "http://127.0.0.1:9/xdsi/ImagingDocumentSource"
    env = Exchange(url, tmp_path).build(
        IHE_WSDL, OP_RAD69,
        StudyRequest=[{"studyInstanceUID": "1.2.3", "SeriesRequest": [{"seriesInstanceUID": "1.2.4", "DocumentRequest": [{"RepositoryUniqueId": "1.2.5", "DocumentUniqueId": "1.2.6"}]}]}],
        TransferSyntaxUIDList={"TransferSyntaxUID": ["1.2.840.10008.1.2.1"]},
    )  # fmt: skip
    w = f"{{{NS_WSA}}}"
    header = env.find(f"{{{NS_SOAP12}}}Header")
    action = header.find(w + "Action")
    assert action.text == ACTION_RAD69 and action.get(f"{{{NS_SOAP12}}}mustUnderstand") == "true"  # IHE-WSA101
    assert header.findtext(f"{w}ReplyTo/{w}Address") == "http://www.w3.org/2005/08/addressing/anonymous"  # IHE-WSA102
    assert header.findtext(w + "To") == url and header.findtext(w + "MessageID").startswith("urn:uuid:")
    assert schema_errors(env.find(f"{{{NS_SOAP12}}}Body")[0], "ihe") == []
    # and the official schema does catch a bad body: the check is not vacuous
    body = env.find(f"{{{NS_SOAP12}}}Body")[0]
    body.remove(body.find(f"{{{NS_IHERAD}}}TransferSyntaxUIDList"))
    assert schema_errors(body, "ihe")


def test_kos_without_one_retrieve_location_needs_the_repository(target: Target, tmp_path: Path) -> None:
    from pydicom import dcmread

    from xdsi.conformance.subject import SubjectError

    ds = dcmread(target.kos)
    series = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    series[0].RetrieveLocationUID = "1.2.3.4"  # two repositories in one manifest
    two = tmp_path / "two.dcm"
    ds.save_as(two)
    with pytest.raises(SubjectError, match="more than one Retrieve Location UID"):
        from_kos(two)
    assert from_kos(two, NIST_REPOSITORY).repository_unique_id == NIST_REPOSITORY
    series[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID = "1.2.3/../x"  # never reaches a request
    ds.save_as(two)
    with pytest.raises(SubjectError, match="UID"):
        from_kos(two, NIST_REPOSITORY)


def _self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    import subprocess

    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    subprocess.run(
        ["/usr/bin/openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def test_https_with_mutual_tls(target: Target, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A Connectathon IDS is behind ATNA mutual TLS: --ca trusts its CA, --cert/--key present ours."""
    import ssl

    server_cert, server_key = _self_signed(tmp_path, "127.0.0.1")
    client_cert, client_key = _self_signed(tmp_path, "consumer")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(server_cert, server_key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(client_cert)
    front = Broken(target.url, target.study.uid)
    server = make_server("127.0.0.1", 0, front, threaded=True, ssl_context=ctx)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"https://127.0.0.1:{server.server_port}{ENDPOINT}"
        base = ["conformance", url, "--kos", str(target.kos), "--case", "rad69-4803a-single", "--case", "rad69-4811-01-repository"]
        assert main([*base, "--ca", str(server_cert), "--cert", str(client_cert), "--key", str(client_key)]) == 0
        assert capsys.readouterr().out.count("PASS") == 2
        assert main([*base, "--ca", str(server_cert)]) == 1  # no client certificate: the handshake fails
        assert "no answer" in capsys.readouterr().out
        assert main([*base, "--cert", str(client_cert), "--key", str(client_key)]) == 1  # server not trusted
        assert "CERTIFICATE_VERIFY_FAILED" in capsys.readouterr().out
    finally:
        server.shutdown()
        thread.join(10)
