"""XUA on the SOAP endpoints of a real ``xdsi serve`` with ``[xua] required = true``.

Requests are built by zeep from the official IHE WSDLs (RAD-69, ITI-43) with a SAML 2.0 assertion,
signed in the test, in a ``wsse:Security`` header (mustUnderstand, as XUA consumers send it).  Only
the valid assertion is served; a stranger's signature, an expired assertion, one for another
audience, a signature-wrapping attack and no assertion at all get the WS-Security fault as a SOAP 1.2
Sender subcode.  ITI-43 retrieves a KOS the server published itself (integrated mode, test registry);
every refusal reaches a real Audit Record Repository (rsyslog) as a PS3.15 User Authentication failure.
"""

from __future__ import annotations

import datetime as dt
import io
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
from lxml import etree
from pydicom import dcmread

from tests.support import rsyslog, saml
from tests.support.audit_schema import check_audit_message
from tests.support.ids import IHE_WSDL, NIST_REPOSITORY, RawResponse, assert_valid, make_study, post_raw, registry_errors, status_of, zeep_client
from tests.support.registry import TestRegistry
from tests.support.server import XdsiProcess, c_store, free_port, wait_until
from tests.support.standards import STANDARDS
from tests.support.xds import PATIENT_CX, PATIENT_ROWS_TOML, ext_id, find_documents
from xdsi.standards import constants as C
from xdsi.xds.codes import CodeTable

pytestmark = pytest.mark.skipif(not rsyslog.available(), reason="needs Debian rsyslog (scripts/test installs it)")

REPOSITORY_WSDL = STANDARDS / "ihe/wsdl/XDS.b_DocumentRepository.wsdl"
AUDIENCE = saml.AUDIENCE
SOURCE_ID = f"XDSI-XUA-{uuid.uuid4().hex[:6]}"
WSSE = "{" + saml.NS_WSSE + "}"


@dataclass
class Env:
    server: XdsiProcess
    study: Any
    idp: saml.Provider
    stranger: saml.Provider
    repo: rsyslog.Rsyslog
    kos_uid: str
    kos_repository: str

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.http_port}{path}"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("xua")
    idp = saml.Provider.create(tmp / "idp")
    stranger = saml.Provider.create(tmp / "stranger", "https://idp.example.org")  # same name, another key
    study = make_study(tmp / "study", series=1, per_series=2)
    with rsyslog.running(tmp / "arr") as repo, TestRegistry(CodeTable.load(), {PATIENT_CX}) as registry:
        cfg = tmp / "xdsi.toml"
        cfg.write_text(
            f'[xua]\nrequired = true\ntrusted_issuers = ["{idp.cert_file}"]\naudience = ["{AUDIENCE}"]\nclock_skew_seconds = 10\n'
            f'[audit]\nrepositories = ["{repo.udp_url}"]\naudit_source_id = "{SOURCE_ID}"\nretry_seconds = 0.2\n'
            f'[xds]\nmode = "integrated"\nregistry_url = "{registry.registry_url}"\nstability_delay = 1\npoll_interval = 0.3\n'
            f'retry_initial = 0.5\nretry_max = 1\ntimeout = 5\nrepository_unique_id = "{NIST_REPOSITORY}"\n' + PATIENT_ROWS_TOML
        )
        server = XdsiProcess(tmp / "data", config=cfg).start()
        try:
            c_store(server, study.files)
            docs = wait_until(lambda: find_documents(registry.registry_url, PATIENT_CX), 60)
            kos_uid = ext_id(docs[0], C.DE_UNIQUE_ID)
            entry = registry.by_unique_id(kos_uid)
            assert entry is not None
            yield Env(server, study, idp, stranger, repo, kos_uid, entry.repository_unique_id)
        finally:
            server.stop()




# -- requests built by zeep, sent raw --------------------------------------------------------------


def _send(client: Any, service: Any, op: str, action: str, security: Any | None, **kw: Any) -> RawResponse:
    headers = [security] if security is not None else []
    env = client.create_message(service, op, _soapheaders=headers, **kw)
    assert_valid(env.find(f"{{{C.NS_SOAP12}}}Body")[0], "ihe")
    if security is not None:
        assert env.find(f"{{{C.NS_SOAP12}}}Header/{WSSE}Security") is not None, "zeep dropped the wsse:Security header"
    return post_raw(client.service_address, etree.tostring(env, xml_declaration=True, encoding="UTF-8"), action=action)


def rad69(e: Env, security: Any | None) -> RawResponse:
    client, service = zeep_client(IHE_WSDL, e.url("/xdsi/ImagingDocumentSource"))
    series_uid, items = next(iter(e.study.series.items()))
    request = {
        "StudyRequest": [
            {
                "studyInstanceUID": e.study.uid,
                "SeriesRequest": [{"seriesInstanceUID": series_uid, "DocumentRequest": [{"RepositoryUniqueId": NIST_REPOSITORY, "DocumentUniqueId": uid} for uid, _ in items]}],
            }
        ],
        "TransferSyntaxUIDList": {"TransferSyntaxUID": ["1.2.840.10008.1.2.1"]},
    }
    return _send(client, service, "ImagingDocumentSource_RetrieveImagingDocumentSet", C.ACTION_RAD69, security, **request)


def iti43(e: Env, security: Any | None) -> RawResponse:
    client, service = zeep_client(REPOSITORY_WSDL, e.url("/xdsi/DocumentRepository"))
    request = {"DocumentRequest": [{"RepositoryUniqueId": e.kos_repository, "DocumentUniqueId": e.kos_uid}]}
    return _send(client, service, "DocumentRepository_RetrieveDocumentSet", C.ACTION_ITI43, security, **request)


def assert_ws_security_fault(resp: RawResponse, subcode: str) -> None:
    """SOAP 1.2 Sender fault, wsse:<subcode> as its Subcode (WSS 1.1 section 12), HTTP 400 (SOAP 1.2 HTTP binding)."""
    s = "{" + C.NS_SOAP12 + "}"
    assert etree.QName(resp.body).localname == "Fault", etree.tostring(resp.body)[:2000]
    assert resp.http.status_code == 400
    assert resp.body.findtext(f"{s}Code/{s}Value").endswith(":Sender")
    value = resp.body.find(f"{s}Code/{s}Subcode/{s}Value")
    prefix, local = value.text.split(":")
    assert local == subcode and value.nsmap[prefix] == saml.NS_WSSE
    assert resp.header("Action").text == C.ACTION_FAULT
    assert not resp.attachments  # nothing of the study went out


def signed(e: Env, provider: saml.Provider | None = None, **kw: Any) -> Any:
    return (provider or e.idp).sign(saml.assertion(**kw))


# -- the cases ------------------------------------------------------------------------------------


@pytest.mark.parametrize("transaction", ["rad69", "iti43"])
def test_valid_assertion_is_served(env: Env, transaction: str) -> None:
    user = f"served-{transaction}@example.org"
    resp = (rad69 if transaction == "rad69" else iti43)(env, saml.security_header(signed(env, user=user)))
    assert resp.http.status_code == 200
    assert status_of(resp.body) == C.STATUS_SUCCESS, registry_errors(resp.body)
    assert_valid(resp.body, "ihe")
    n = len(next(iter(env.study.series.values()))) if transaction == "rad69" else 1
    assert len(resp.attachments) == n
    if transaction == "iti43":
        docs = resp.body.findall(f"{{{C.NS_XDS}}}DocumentResponse")
        assert [d.findtext(f"{{{C.NS_XDS}}}DocumentUniqueId") for d in docs] == [env.kos_uid]
        kos = dcmread(io.BytesIO(resp.document(docs[0].find(f"{{{C.NS_XDS}}}Document"))))
        assert kos.Modality == "KO" and kos.StudyInstanceUID == env.study.uid
    # the identity the server accepted: subject and issuer as ITI-40 3.40.4.2 writes them for the audit trail
    line = f"user '{user}' issuer 'https://idp.example.org'"
    wait_until(lambda: line in env.server.output(), 5)


CASES = {
    "untrusted": ("FailedAuthentication", lambda e: saml.security_header(signed(e, e.stranger))),
    "expired": ("FailedAuthentication", lambda e: saml.security_header(signed(e, not_before=dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)))),
    "wrong-audience": ("FailedAuthentication", lambda e: saml.security_header(signed(e, audience=("urn:another:service",)))),
    "wrapping-sibling": ("InvalidSecurityToken", lambda e: saml.wrap(signed(e), how="sibling-first")),
    "wrapping-moved-signature": ("InvalidSecurityToken", lambda e: saml.wrap(signed(e), how="moved-signature")),
    "none": ("FailedAuthentication", lambda e: None),
}


@pytest.mark.parametrize("transaction", ["rad69", "iti43"])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_or_missing_assertion_gets_the_ws_security_fault(env: Env, case: str, transaction: str) -> None:
    subcode, make = CASES[case]
    resp = (rad69 if transaction == "rad69" else iti43)(env, make(env))
    assert_ws_security_fault(resp, subcode)


def test_refusals_reach_the_audit_repository_as_failed_user_authentication(env: Env) -> None:
    user = f"mallory-{uuid.uuid4().hex[:6]}@evil.example"
    assert_ws_security_fault(rad69(env, saml.security_header(signed(env, env.stranger, user=user, alias="MAL"))), "FailedAuthentication")
    assert_ws_security_fault(rad69(env, None), "FailedAuthentication")

    def found() -> list[Any]:
        out = []
        for line in env.repo.lines():
            _inp, _app, _msgid, msg = line.split(" ", 3)
            xml = msg.lstrip("\ufeff").encode("utf-8")
            if f'AuditSourceID="{SOURCE_ID}"'.encode() in xml and b'csd-code="110114"' in xml:
                out.append(check_audit_message(xml))
        return out

    wait_until(lambda: any(r.find("ActiveParticipant").get("UserID") == user for r in found()), 15)
    msgs = found()
    mine = next(r for r in msgs if r.find("ActiveParticipant").get("UserID") == user)
    ev = mine.find("EventIdentification")
    assert ev.get("EventActionCode") == "E" and ev.get("EventOutcomeIndicator") == "4"
    assert ev.find("EventTypeCode").get("csd-code") == "110122"  # Login
    assert "FailedAuthentication" in ev.findtext("EventOutcomeDescription")
    person, node = mine.findall("ActiveParticipant")
    assert person.get("UserName") == f"MAL<{user}@https://idp.example.org>" and person.get("UserIsRequestor") == "true"
    assert person.get("NetworkAccessPointID") == "127.0.0.1"
    assert node.get("UserID") == env.server.ae_title and node.get("UserIsRequestor") == "false"
    # the request without any assertion names the requester by its address
    assert any(r.find("ActiveParticipant").get("UserID") == "127.0.0.1" and "requires a SAML" in r.find("EventIdentification").findtext("EventOutcomeDescription") for r in msgs)


def test_wsdl_is_still_served_without_an_assertion(env: Env) -> None:
    """GET ?wsdl carries no SOAP header to authenticate: XUA guards the operations, not the service description."""
    import requests

    r = requests.get(env.url("/xdsi/ImagingDocumentSource") + "?wsdl", timeout=10)
    assert r.status_code == 200 and b"ImagingDocumentSource_RetrieveImagingDocumentSet" in r.content


def test_serve_refuses_a_trusted_issuer_file_that_is_no_certificate(tmp_path: Path) -> None:
    bad = tmp_path / "idp.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    cfg = tmp_path / "xdsi.toml"
    cfg.write_text(f'[xua]\nrequired = true\ntrusted_issuers = ["{bad}"]\naudience = "{AUDIENCE}"\n')
    p = subprocess.run([sys.executable, "-m", "xdsi", "serve", "--config", str(cfg), "--data-dir", str(tmp_path / "d"), "--http-port", str(free_port()), "--dicom-port", str(free_port())],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "[xua] trusted_issuers" in lines[0] and "holds no PEM certificate" in lines[0], p.stderr


def test_every_action_of_the_imaging_document_source_is_guarded(env: Env) -> None:
    """RAD-69 (both actions), WADO-WS Rendered and Information (both namespaces): no assertion, no service.

    The assertion is checked before the action is routed or the body validated, so an arbitrary body shows it.
    """
    from tests.support.ids import IdsServer
    from tests.integration.test_soap_transport import envelope
    from xdsi.soap.ids import routes

    ids = IdsServer(env.server, [env.study], NIST_REPOSITORY)
    actions = sorted(routes())
    assert len(actions) >= 5  # RAD-69, its legacy action, WADO-WS rendered (+ swapped namespace), information
    for action in actions:
        data, _ = envelope(ids, action=action, body='<x:Anything xmlns:x="urn:example"/>')
        assert_ws_security_fault(post_raw(env.url("/xdsi/ImagingDocumentSource"), data, action=action), "FailedAuthentication")
