"""Who may use the HTTP services, against a real ``xdsi serve`` (issue 13, HTTP part).

Bearer: an RSA key pair and a JWKS made here, the JWKS served by a real HTTP server
(the Authorization Server's ``jwks_uri``), tokens signed here with PyJWT: wrong
signature, wrong audience, wrong issuer, expired, not yet valid, missing scope -> 401/403
with RFC 6750 challenges; the right token -> 200, through dicomweb-client (QIDO, WADO-RS
with pixels compared to pydicom's decoding of the original, STOW), WADO-URI and RAD-69
(request built by zeep from the official WSDL).  A refused SOAP request gets a SOAP 1.2
fault with the ``wsse:FailedAuthentication`` subcode, which zeep raises as a Fault.  Key
rotation: a token by a new key works once the JWKS has it.  With ``soap_auth = "xua"`` RAD-69 is
served on a SAML assertion alone while DICOMweb still wants the token.  Every refusal arrives as a
Security Alert in a real Audit Record Repository (rsyslogd) and validates against the
PS3.15 schema.

Basic: a users file written by ``xdsi users add`` (argon2id), requests with user:password.

And ``xdsi serve`` refuses a wildcard address with ``auth = "none"`` unless
``allow_anonymous = true``.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import jwt
import numpy as np
import pydicom
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import rsa
from dicomweb_client.api import DICOMwebClient
from jwt.algorithms import RSAAlgorithm
from lxml import etree

from tests.support import rsyslog
from tests.support.jwks import JwksServer
from tests.support.audit_schema import check_audit_message
from tests.support.ids import IHE_WSDL, NIST_REPOSITORY, make_study, populate, zeep_client
from tests.support.server import XdsiProcess, free_port
from xdsi import cli
from xdsi.standards.constants import ACTION_RAD69, NS_SOAP12, NS_WSSE, NS_XDS

ISS = "https://as.example.org/realms/imaging"
AUD = "https://imaging.example.org/"
SOURCE_ID = "XDSI-HTTP-AUTH"
RAD69_OP = "ImagingDocumentSource_RetrieveImagingDocumentSet"


# -- the Authorization Server side: keys, JWKS endpoint, tokens -----------------------------------


def _jwk(private: Any, kid: str) -> dict[str, Any]:
    jwk = RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    jwk.update({"kid": kid, "use": "sig", "alg": "RS256"})
    return jwk


class AuthServer:
    """The Authorization Server's keys and its JWKS endpoint on loopback."""

    def __init__(self) -> None:
        self.key1 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.key2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # rotated in by a test
        self.evil = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.http = JwksServer([_jwk(self.key1, "k1")])

    @property
    def jwks_url(self) -> str:
        return self.http.url("/protocol/openid-connect/certs")

    def token(self, scope: str = "read", key: Any = None, kid: str = "k1", **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": ISS, "aud": AUD, "sub": "dr.who", "client_id": "viewer", "exp": now + 300, "iat": now, "scope": scope,
                "extensions": {"ihe_iua": {"subject_name": "Dr Who", "subject_organization": "Gallifrey General"}}}
        body.update(claims)
        return jwt.encode({k: v for k, v in body.items() if v is not None}, key or self.key1, algorithm="RS256", headers={"kid": kid})

    def stop(self) -> None:
        self.http.stop()


@pytest.fixture(scope="module")
def auth_server() -> Iterator[AuthServer]:
    a = AuthServer()
    try:
        yield a
    finally:
        a.stop()


@pytest.fixture(scope="module")
def arr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[rsyslog.Rsyslog | None]:
    with rsyslog.running_if_available(tmp_path_factory.mktemp("arr")) as r:
        yield r


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return make_study(tmp_path_factory.mktemp("study"), series=1, per_series=2, patient_id="AUTH01")


@pytest.fixture(scope="module")
def bearer_server(tmp_path_factory: pytest.TempPathFactory, auth_server: AuthServer, arr: rsyslog.Rsyslog | None, study: Any) -> Iterator[XdsiProcess]:
    base = tmp_path_factory.mktemp("bearer")
    populate(base / "data", study.files)
    audit = f'[audit]\nrepositories = ["{arr.udp_url}"]\naudit_source_id = "{SOURCE_ID}"\nretry_seconds = 0.2\n' if arr else ""
    cfg = base / "xdsi.toml"
    cfg.write_text(f"""
[http]
auth = "bearer"
[iua]
issuer = "{ISS}"
audience = "{AUD}"
jwks_url = "{auth_server.jwks_url}"
jwks_refresh_seconds = 1
clock_skew_seconds = 30
{audit}""")
    proc = XdsiProcess(base / "data", config=cfg, env={"XDSI_REPOSITORY_UNIQUE_ID": NIST_REPOSITORY}).start()
    try:
        yield proc
    finally:
        proc.stop()


def url(server: XdsiProcess, path: str) -> str:
    return f"http://127.0.0.1:{server.http_port}{path}"


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


def challenge(r: requests.Response) -> dict[str, str]:
    """The parameters of a ``WWW-Authenticate: Bearer k="v", ...`` challenge (RFC 6750 3: quoted values, no '"' inside)."""
    import re

    scheme, _, rest = r.headers["WWW-Authenticate"].partition(" ")
    assert scheme == "Bearer"
    params = re.findall(r'\s*([a-z_]+)="([^"]*)"\s*(?:,|$)', rest)
    assert ", ".join(f'{k}="{v}"' for k, v in params) == rest, rest  # nothing left over
    return dict(params)


def security_alerts(arr: rsyslog.Rsyslog, path: str, status: int, expect: int, seconds: float = 20.0) -> list[Any]:
    """The Security Alerts of our server about ``path`` answered ``status`` that reached the repository (schema-checked),
    waiting until there are ``expect`` of them (the module's tests share one server, so they are told apart by path and status)."""
    deadline = time.monotonic() + seconds
    while True:
        found = []
        for line in arr.lines():
            _inp, _app, _msgid, msg = line.split(" ", 3)
            xml = msg.lstrip("\ufeff").encode("utf-8")
            if f'AuditSourceID="{SOURCE_ID}"'.encode() not in xml or b'csd-code="110113"' not in xml:
                continue
            root = check_audit_message(xml)
            if root.find("ParticipantObjectIdentification").get("ParticipantObjectID") == path and \
                    root.findtext("EventIdentification/EventOutcomeDescription").startswith(f"HTTP {status} "):
                found.append(root)
        if len(found) >= expect or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def assert_alert(root: Any, status: int, reason: str, user: str) -> None:
    ev = root.find("EventIdentification")
    assert (ev.get("EventActionCode"), ev.get("EventOutcomeIndicator")) == ("E", "4")
    assert ev.find("EventID").get("csd-code") == "110113"
    assert ev.find("EventTypeCode").get("csd-code") == "110132"  # Use of Restricted Function
    assert ev.findtext("EventOutcomeDescription").startswith(f"HTTP {status} ") and reason in ev.findtext("EventOutcomeDescription")
    ours, theirs = root.findall("ActiveParticipant")
    assert (ours.get("UserID"), ours.get("UserIsRequestor"), ours.get("NetworkAccessPointID")) == ("XDSI", "false", "127.0.0.1")
    assert ours.find("RoleIDCode").get("csd-code") == "110150"
    assert (theirs.get("UserID"), theirs.get("UserIsRequestor"), theirs.get("NetworkAccessPointID")) == (user, "true", "127.0.0.1")


# -- bearer ----------------------------------------------------------------------------------------


def test_no_token_is_401_everywhere_and_audited(bearer_server: XdsiProcess, arr: rsyslog.Rsyslog | None) -> None:
    for path in ("/dicomweb/studies", "/wado?requestType=WADO", "/status", "/xdsi/ImagingDocumentSource?wsdl", "/nothing-here"):
        r = requests.get(url(bearer_server, path), timeout=10)
        assert r.status_code == 401, path
        assert r.headers["WWW-Authenticate"] == 'Bearer realm="xdsi"', path  # RFC 6750 3.1: no error code without credentials
    # Basic credentials to a bearer server: no bearer token, so the same challenge
    r = requests.get(url(bearer_server, "/dicomweb/studies"), auth=("dr.who", "pw"), timeout=10)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == 'Bearer realm="xdsi"'
    if arr is None:
        pytest.skip("no rsyslogd: the Security Alerts are not checked")
    alerts = security_alerts(arr, "/dicomweb/studies", 401, 2)
    assert len(alerts) == 2
    assert_alert(alerts[0], 401, "Bearer credentials are required", "127.0.0.1")


def test_bad_tokens_are_401_invalid_token(bearer_server: XdsiProcess, auth_server: AuthServer, arr: rsyslog.Rsyslog | None) -> None:
    now = int(time.time())
    cases = {
        "wrong signature": (auth_server.token(key=auth_server.evil), "the token signature does not verify"),
        "wrong audience": (auth_server.token(aud="https://other.example.org/"), "the token is not meant for this service (aud)"),
        "wrong issuer": (auth_server.token(iss="https://evil.example.org/"), "the token was not issued by the trusted authorization server (iss)"),
        "expired": (auth_server.token(exp=now - 120, iat=now - 420), "the token has expired"),
        "not yet valid": (auth_server.token(nbf=now + 600), "the token is not valid yet (nbf/iat in the future)"),
        "unknown key": (auth_server.token(key=auth_server.evil, kid="evil"), "the token is signed with key 'evil', which the issuer's JWKS does not hold"),
    }
    for what, (tok, description) in cases.items():
        r = requests.get(url(bearer_server, "/dicomweb/studies/1.2.3/series"), headers=bearer(tok), timeout=10)
        assert r.status_code == 401, what
        assert challenge(r) == {"realm": "xdsi", "error": "invalid_token", "error_description": description}, what
    r = requests.get(url(bearer_server, "/dicomweb/studies/1.2.3/series"), headers={"Authorization": "Bearer not a token"}, timeout=10)
    assert r.status_code == 400 and challenge(r)["error"] == "invalid_request"
    if arr is not None:
        alerts = security_alerts(arr, "/dicomweb/studies/1.2.3/series", 401, len(cases))
        assert len(alerts) == len(cases)
        assert len(security_alerts(arr, "/dicomweb/studies/1.2.3/series", 400, 1)) == 1  # the malformed header
        assert_alert(alerts[0], 401, "the token signature does not verify", "127.0.0.1")


def test_missing_scope_is_403_insufficient_scope(bearer_server: XdsiProcess, auth_server: AuthServer, study: Any, arr: rsyslog.Rsyslog | None) -> None:
    reader = auth_server.token("read")
    r = requests.post(url(bearer_server, "/dicomweb/studies"), headers={**bearer(reader), "Content-Type": "multipart/related; type=\"application/dicom\"; boundary=x"}, data=b"--x--\r\n", timeout=10)
    assert r.status_code == 403
    assert challenge(r) == {"realm": "xdsi", "error": "insufficient_scope", "error_description": "this request needs the write right", "scope": "write"}
    r = requests.get(url(bearer_server, "/status"), headers=bearer(reader), timeout=10)
    assert r.status_code == 403 and challenge(r)["scope"] == "admin"
    # a token with scopes we do not map grants nothing
    r = requests.get(url(bearer_server, "/dicomweb/studies"), headers=bearer(auth_server.token("openid profile")), timeout=10)
    assert r.status_code == 403 and challenge(r)["scope"] == "read"
    if arr is not None:
        alerts = security_alerts(arr, "/status", 403, 1)
        assert len(alerts) == 1
        assert_alert(alerts[0], 403, "needs 'admin'", "dr.who")  # the authenticated user is named
        assert alerts[0].findall("ActiveParticipant")[1].get("AlternativeUserID") == "127.0.0.1"


def test_right_token_dicomweb_client_wado_uri_and_status(bearer_server: XdsiProcess, auth_server: AuthServer, study: Any, tmp_path: Path) -> None:
    client = DICOMwebClient(url(bearer_server, "/dicomweb"), headers=bearer(auth_server.token("read")))
    found = client.search_for_studies(search_filters={"PatientID": "AUTH01"})
    assert [s["0020000D"]["Value"][0] for s in found] == [study.uid]
    series_uid, [(sop, path), _] = next(iter(study.series.items()))
    got = client.retrieve_instance(study.uid, series_uid, sop)
    want = pydicom.dcmread(path)
    assert got.SOPInstanceUID == sop
    assert np.array_equal(got.pixel_array, want.pixel_array)
    r = requests.get(url(bearer_server, "/wado"), params={"requestType": "WADO", "studyUID": study.uid, "seriesUID": series_uid, "objectUID": sop, "contentType": "application/dicom"},
                     headers=bearer(auth_server.token("read")), timeout=30)
    assert r.status_code == 200
    import io

    assert np.array_equal(pydicom.dcmread(io.BytesIO(r.content)).pixel_array, want.pixel_array)
    # STOW with the write scope, then found by QIDO
    from xdsi.tools.synth import StudySpec, write_study

    spec = StudySpec(patient_id="AUTH02", study_uid=f"2.25.{uuid.uuid4().int}")
    files = write_study(tmp_path / "stow", spec, series=1, per_series=1)
    writer = DICOMwebClient(url(bearer_server, "/dicomweb"), headers=bearer(auth_server.token("read write")))
    writer.store_instances([pydicom.dcmread(f) for f in files])
    assert [s["0020000D"]["Value"][0] for s in writer.search_for_studies(search_filters={"PatientID": "AUTH02"})] == [spec.study_uid]
    r = requests.get(url(bearer_server, "/status"), headers=bearer(auth_server.token("admin")), timeout=10)
    assert r.status_code == 200 and r.json()["studies"] >= 2


def _rad69_envelope(study: Any) -> tuple[bytes, list[str]]:
    client, service = zeep_client(IHE_WSDL, "http://unused/")
    series = [{"seriesInstanceUID": s, "DocumentRequest": [{"RepositoryUniqueId": NIST_REPOSITORY, "DocumentUniqueId": sop} for sop, _ in items]}
              for s, items in study.series.items()]
    env = client.create_message(service, RAD69_OP, StudyRequest=[{"studyInstanceUID": study.uid, "SeriesRequest": series}],
                                TransferSyntaxUIDList={"TransferSyntaxUID": ["1.2.840.10008.1.2.1"]})
    return etree.tostring(env, xml_declaration=True, encoding="UTF-8"), [sop for items in study.series.values() for sop, _ in items]


def test_rad69_needs_the_token_and_refusal_is_a_ws_security_fault(bearer_server: XdsiProcess, auth_server: AuthServer, study: Any) -> None:
    import zeep
    from requests_toolbelt.multipart.decoder import MultipartDecoder

    endpoint = url(bearer_server, "/xdsi/ImagingDocumentSource")
    # zeep from the official WSDL, no token: the fault it raises carries the WS-Security subcode
    client, service = zeep_client(IHE_WSDL, endpoint)
    series = [{"seriesInstanceUID": s, "DocumentRequest": [{"RepositoryUniqueId": NIST_REPOSITORY, "DocumentUniqueId": sop} for sop, _ in items]}
              for s, items in study.series.items()]
    with pytest.raises(zeep.exceptions.Fault) as info:
        service.ImagingDocumentSource_RetrieveImagingDocumentSet(
            StudyRequest=[{"studyInstanceUID": study.uid, "SeriesRequest": series}], TransferSyntaxUIDList={"TransferSyntaxUID": ["1.2.840.10008.1.2.1"]})
    assert info.value.code == "s:Sender"  # zeep gives the Value text as sent
    assert [etree.QName(q.namespace, q.localname) for q in info.value.subcodes] == [etree.QName(NS_WSSE, "FailedAuthentication")]
    assert "Bearer credentials are required" in info.value.message
    # the same request with a read token is served: every document, byte for byte the stored file
    envelope, sops = _rad69_envelope(study)
    ct = f'application/soap+xml; charset=utf-8; action="{ACTION_RAD69}"'
    r = requests.post(endpoint, data=envelope, headers={"Content-Type": ct}, timeout=30)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == 'Bearer realm="xdsi"'
    r = requests.post(endpoint, data=envelope, headers={"Content-Type": ct, **bearer(auth_server.token("write"))}, timeout=30)
    assert r.status_code == 403 and "FailedAuthentication" in r.text
    r = requests.post(endpoint, data=envelope, headers={"Content-Type": ct, **bearer(auth_server.token("read"))}, timeout=30)
    assert r.status_code == 200, r.text[:2000]
    parts = MultipartDecoder(r.content, r.headers["Content-Type"]).parts
    root = etree.fromstring(parts[0].content)
    uids = [d.findtext(f"{{{NS_XDS}}}DocumentUniqueId") for d in root.iter(f"{{{NS_XDS}}}DocumentResponse")]
    assert sorted(uids) == sorted(sops)
    files = {p.read_bytes() for items in study.series.values() for _s, p in items}
    assert {p.content for p in parts[1:]} == files


def test_key_rotation_is_honoured(bearer_server: XdsiProcess, auth_server: AuthServer) -> None:
    tok = auth_server.token(key=auth_server.key2, kid="k2")
    assert requests.get(url(bearer_server, "/dicomweb/studies"), headers=bearer(tok), timeout=10).status_code == 401
    hits = auth_server.http.hits  # type: ignore[attr-defined]
    for _ in range(5):  # unknown kids within jwks_refresh_seconds: no request to the authorization server each time
        requests.get(url(bearer_server, "/dicomweb/studies"), headers=bearer(auth_server.token(key=auth_server.evil, kid="x")), timeout=10)
    assert auth_server.http.hits - hits <= 1  # type: ignore[attr-defined]
    auth_server.http.keys = [_jwk(auth_server.key1, "k1"), _jwk(auth_server.key2, "k2")]  # type: ignore[attr-defined]
    time.sleep(1.2)  # jwks_refresh_seconds = 1
    r = requests.get(url(bearer_server, "/dicomweb/studies"), headers=bearer(tok), timeout=10)
    assert r.status_code == 200, r.text
    assert requests.get(url(bearer_server, "/dicomweb/studies"), headers=bearer(auth_server.token()), timeout=10).status_code == 200


# -- bearer for DICOMweb, XUA for SOAP ---------------------------------------------------------------


@pytest.fixture(scope="module")
def xua_server(tmp_path_factory: pytest.TempPathFactory, auth_server: AuthServer, study: Any) -> Iterator[Any]:
    from tests.support import saml

    base = tmp_path_factory.mktemp("bearer-xua")
    populate(base / "data", study.files)
    idp = saml.Provider.create(base / "idp")
    cfg = base / "xdsi.toml"
    cfg.write_text(f"""
[http]
auth = "bearer"
soap_auth = "xua"
[iua]
issuer = "{ISS}"
audience = "{AUD}"
jwks_url = "{auth_server.jwks_url}"
[xua]
required = true
trusted_issuers = ["{idp.cert_file}"]
audience = ["{saml.AUDIENCE}"]
""")
    proc = XdsiProcess(base / "data", config=cfg, env={"XDSI_REPOSITORY_UNIQUE_ID": NIST_REPOSITORY}).start()
    proc.idp = idp  # type: ignore[attr-defined]
    try:
        yield proc
    finally:
        proc.stop()


def test_soap_left_to_xua_serves_an_assertion_without_a_bearer_token(xua_server: Any, auth_server: AuthServer, study: Any) -> None:
    from requests_toolbelt.multipart.decoder import MultipartDecoder

    from tests.support import saml

    endpoint = url(xua_server, "/xdsi/ImagingDocumentSource")
    ct = f'application/soap+xml; charset=utf-8; action="{ACTION_RAD69}"'
    envelope, sops = _rad69_envelope(study)
    # no assertion: XUA's WS-Security fault (SOAP 1.2 binding: Sender -> 400), not our 401
    r = requests.post(endpoint, data=envelope, headers={"Content-Type": ct}, timeout=30)
    assert r.status_code == 400 and "FailedAuthentication" in r.text and "WWW-Authenticate" not in r.headers
    # a signed assertion in wsse:Security, no bearer token: served
    env = etree.fromstring(envelope)
    header = env.find(f"{{{NS_SOAP12}}}Header")
    header.append(saml.security_header(xua_server.idp.sign(saml.assertion(user="consumer@hospital.example"))))
    r = requests.post(endpoint, data=etree.tostring(env, xml_declaration=True, encoding="UTF-8"), headers={"Content-Type": ct}, timeout=30)
    assert r.status_code == 200, r.text[:2000]
    parts = MultipartDecoder(r.content, r.headers["Content-Type"]).parts
    root = etree.fromstring(parts[0].content)
    assert sorted(d.findtext(f"{{{NS_XDS}}}DocumentUniqueId") for d in root.iter(f"{{{NS_XDS}}}DocumentResponse")) == sorted(sops)
    # the rest of the HTTP side still wants the bearer token
    assert requests.get(url(xua_server, "/dicomweb/studies"), timeout=10).status_code == 401
    assert requests.get(url(xua_server, "/dicomweb/studies"), headers=bearer(auth_server.token()), timeout=10).status_code == 200


# -- basic -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def basic_server(tmp_path_factory: pytest.TempPathFactory, study: Any) -> Iterator[XdsiProcess]:
    base = tmp_path_factory.mktemp("basic")
    data = base / "data"
    populate(data, study.files)
    for name, pw, rights in (("alice", "correct horse", "read"), ("bob", "battery staple", "read,write,admin")):
        r = subprocess.run([sys.executable, "-m", "xdsi", "users", "add", name, "--rights", rights, "--password-stdin", "--data-dir", str(data)],
                           input=pw + "\n", capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    from tests.support.pki import standard_pki

    pki = standard_pki(base / "pki")
    server_cert, ca = pki["server"], pki["ca"]
    https_port = free_port()
    cfg = base / "xdsi.toml"
    cfg.write_text(f'[server]\nhttps_port = {https_port}\n[http]\nauth = "basic"\n'
                   f'[tls]\ncertificate = "{server_cert.cert}"\nprivate_key = "{server_cert.key}"\nca_certificates = "{ca.pem}"\n')  # type: ignore[attr-defined]
    proc = XdsiProcess(data, config=cfg).start()
    proc.https_port, proc.pki = https_port, pki  # type: ignore[attr-defined]
    try:
        yield proc
    finally:
        proc.stop()


def test_basic_auth_with_hashed_users_file(basic_server: XdsiProcess, study: Any) -> None:
    from dicomweb_client.session_utils import create_session_from_user_pass

    text = (basic_server.data_dir / "users").read_text()
    assert "correct horse" not in text and text.count("$argon2id$") == 2
    r = requests.get(url(basic_server, "/dicomweb/studies"), timeout=10)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == 'Basic realm="xdsi", charset="UTF-8"'
    assert requests.get(url(basic_server, "/dicomweb/studies"), auth=("alice", "wrong"), timeout=10).status_code == 401
    assert requests.get(url(basic_server, "/dicomweb/studies"), auth=("mallory", "correct horse"), timeout=10).status_code == 401
    client = DICOMwebClient(url(basic_server, "/dicomweb"), session=create_session_from_user_pass("alice", "correct horse"))
    assert [s["0020000D"]["Value"][0] for s in client.search_for_studies()] == [study.uid]
    r = requests.get(url(basic_server, "/status"), auth=("alice", "correct horse"), timeout=10)
    assert r.status_code == 403 and "WWW-Authenticate" not in r.headers
    r = requests.post(url(basic_server, "/dicomweb/studies"), auth=("alice", "correct horse"), data=b"--x--\r\n",
                      headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=x'}, timeout=10)
    assert r.status_code == 403
    assert requests.get(url(basic_server, "/status"), auth=("bob", "battery staple"), timeout=10).json()["studies"] == 1
    # the HTTPS listener (mutual TLS) asks for the same credentials: a client certificate is not a user
    client_cert, ca = basic_server.pki["client"], basic_server.pki["ca"]  # type: ignore[attr-defined]
    https = f"https://127.0.0.1:{basic_server.https_port}/status"  # type: ignore[attr-defined]
    tls = {"cert": (str(client_cert.cert), str(client_cert.key)), "verify": str(ca.pem), "timeout": 10}
    r = requests.get(https, **tls)  # type: ignore[arg-type]
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == 'Basic realm="xdsi", charset="UTF-8"'
    assert requests.get(https, auth=("bob", "battery staple"), **tls).json()["studies"] == 1  # type: ignore[arg-type]
    # removing a user takes effect in the running server, without a restart
    assert cli.main(["users", "remove", "alice", "--data-dir", str(basic_server.data_dir)]) == 0
    assert requests.get(url(basic_server, "/dicomweb/studies"), auth=("alice", "correct horse"), timeout=10).status_code == 401


# -- start-up --------------------------------------------------------------------------------------


def test_serve_on_a_wildcard_address_without_auth_is_refused(tmp_path: Path) -> None:
    http_port = free_port()
    cmd = [sys.executable, "-m", "xdsi", "serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path / "data"), "--dicom-port", str(free_port()), "--http-port", str(http_port)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        'xdsi: [server] host 0.0.0.0 (--host): anyone who reaches this address could read and store every study: '
        'set [http] auth = "bearer" or "basic", or write [http] allow_anonymous = true to serve without authentication'
    ]
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{http_port}/status", timeout=2)
    # allow_anonymous written down: the check passes (the servers are built; not started, so nothing binds 0.0.0.0 here)
    from xdsi.config import load_settings
    from xdsi.server import Servers

    cfg = tmp_path / "xdsi.toml"
    cfg.write_text("[http]\nallow_anonymous = true\n")
    servers = Servers(load_settings(cfg, env={}, overrides={"host": "0.0.0.0", "data_dir": tmp_path / "data"}))
    try:
        assert servers.archive.http_auth.mode == "none"  # type: ignore[attr-defined]
    finally:
        servers.stop(quiet=True)
