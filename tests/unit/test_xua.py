"""XUA assertion validation (:mod:`xdsi.security.xua`) with assertions signed in the test by signxml.

Each refusal is checked for its WS-Security fault code and for the cause it names, and the
signature-wrapping shapes are shown to be real attacks first (signxml itself accepts the signature)
before our validator is shown to refuse them.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Iterator

import pytest
from lxml import etree
from signxml import SignatureConfiguration, XMLVerifier

from tests.support import saml
from tests.support.audit_schema import check_audit_message
from xdsi.audit import messages as m
from xdsi.config import ConfigError, XuaSettings, load_settings
from xdsi.security.principal import Principal
from xdsi.security.xua import FAILED_AUTHENTICATION, INVALID_SECURITY_TOKEN, XuaPolicy, XuaRefused, audit_user_name

UTC = dt.timezone.utc


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, saml.Provider]:
    d = tmp_path_factory.mktemp("xua-pki")
    ca = saml.Provider.create(d / "ca", "https://ca.example.org", is_ca=True)
    return {
        "idp": saml.Provider.create(d / "idp"),
        "stranger": saml.Provider.create(d / "stranger", "https://idp.example.org"),  # same name, other key
        "ca": ca,
        "ca_signed": saml.Provider.create(d / "leaf", "https://idp2.example.org", ca=ca),
    }


@pytest.fixture(scope="module")
def policy(pki: dict[str, saml.Provider]) -> XuaPolicy:
    p = XuaPolicy.from_settings(XuaSettings(required=True, trusted_issuers=(pki["idp"].cert_file,), audience=(saml.AUDIENCE,), clock_skew_seconds=30))
    assert p is not None
    return p


def check(policy: XuaPolicy, security: Any, now: dt.datetime | None = None) -> Principal | None:
    """As the server sees it: the header serialised and parsed again."""
    return policy.check(saml.reparse(security) if security is not None else None, now)


def refused(policy: XuaPolicy, security: Any, now: dt.datetime | None = None) -> XuaRefused:
    with pytest.raises(XuaRefused) as info:
        check(policy, security, now)
    return info.value


def test_valid_assertion_gives_the_principal_with_the_iti40_attributes(policy: XuaPolicy, pki: dict[str, saml.Provider]) -> None:
    a = pki["idp"].sign(saml.assertion(user="jdoe@example.org", alias="JD"))
    p = check(policy, saml.security_header(a))
    assert p is not None and p.subject == "jdoe@example.org" and p.via == "xua" and p.rights == frozenset({"read"})
    at = p.attributes
    assert at["issuer"] == "https://idp.example.org" and at["assertion-id"] == a.get("ID")
    assert at["audit-user-name"] == "JD<jdoe@example.org@https://idp.example.org>"  # ITI-40 3.40.4.2
    assert at["subject-id"] == "Walter H. Brattain IV" and at["organization"] == "Family Medical Clinic"
    assert at["organization-id"] == "urn:oid:1.2.3.4.5" and at["home-community-id"] == "urn:oid:2.16.840.1.113883.3.190"
    assert at["role"] == "46255001^Pharmacist^2.16.840.1.113883.6.96"
    assert at["purpose-of-use"] == "TREATMENT^Treatment^2.16.840.1.113883.3.18.7.1"
    assert at["subject-confirmation"] == saml.BEARER and at["signer"] == "CN=idp.example.org"


def test_repeated_attribute_values_are_all_kept(policy: XuaPolicy, pki: dict[str, saml.Provider]) -> None:
    attrs = {
        "urn:oasis:names:tc:xacml:2.0:subject:role": [saml.coded("Role", "46255001", "2.16.840.1.113883.6.96", "Pharmacist"), saml.coded("Role", "309343006", "2.16.840.1.113883.6.96", "Physician")],
        "urn:oasis:names:tc:xacml:2.0:resource:resource-id": ["543797436^^^&1.2.840.113619.6.197&ISO"],
    }
    p = check(policy, saml.security_header(pki["idp"].sign(saml.assertion(attributes=attrs))))
    assert p is not None
    assert p.attributes["role"] == "46255001^Pharmacist^2.16.840.1.113883.6.96~309343006^Physician^2.16.840.1.113883.6.96"
    assert p.attributes["resource-id"] == "543797436^^^&1.2.840.113619.6.197&ISO"
    assert "subject-id" not in p.attributes


def test_certificate_issued_by_a_trusted_ca_is_trusted(pki: dict[str, saml.Provider]) -> None:
    ca_policy = XuaPolicy.from_settings(XuaSettings(trusted_issuers=(pki["ca"].cert_file,), audience=(saml.AUDIENCE,)))
    assert ca_policy is not None
    leaf = pki["ca_signed"]
    p = check(ca_policy, saml.security_header(leaf.sign(saml.assertion(issuer=leaf.name))))
    assert p is not None and p.attributes["signer"] == "CN=idp2.example.org"
    # the CA's trust does not extend to a self-signed stranger
    assert refused(ca_policy, saml.security_header(pki["stranger"].sign(saml.assertion()))).subcode == FAILED_AUTHENTICATION


def test_untrusted_signer_is_failed_authentication(policy: XuaPolicy, pki: dict[str, saml.Provider]) -> None:
    r = refused(policy, saml.security_header(pki["stranger"].sign(saml.assertion())))
    assert r.subcode == FAILED_AUTHENTICATION and "trusted" in r.reason
    assert r.claimed is not None and r.claimed.user == "jdoe@example.org" and r.claimed.issuer == "https://idp.example.org"


def test_content_changed_after_signing_is_failed_authentication(policy: XuaPolicy, pki: dict[str, saml.Provider]) -> None:
    a = pki["idp"].sign(saml.assertion())
    a.find(f"{saml.SAML}Subject/{saml.SAML}NameID").text = "admin@example.org"
    r = refused(policy, saml.security_header(a))
    assert r.subcode == FAILED_AUTHENTICATION and "Digest mismatch" in r.detail


@pytest.mark.parametrize(
    "when, cause",
    [
        (dt.timedelta(hours=-2), "expired"),  # issued two hours ago, five minutes of life
        (dt.timedelta(hours=2), "not valid yet"),
    ],
)
def test_outside_the_validity_window_is_failed_authentication(policy: XuaPolicy, pki: dict[str, saml.Provider], when: dt.timedelta, cause: str) -> None:
    issued = dt.datetime.now(UTC).replace(microsecond=0) + when
    r = refused(policy, saml.security_header(pki["idp"].sign(saml.assertion(not_before=issued))))
    assert r.subcode == FAILED_AUTHENTICATION and cause in r.reason


def test_clock_skew_is_honoured_at_both_ends(policy: XuaPolicy, pki: dict[str, saml.Provider]) -> None:
    now = dt.datetime.now(UTC).replace(microsecond=0)
    a = saml.security_header(pki["idp"].sign(saml.assertion(not_before=now, lifetime=dt.timedelta(minutes=1))))
    assert check(policy, a, now - dt.timedelta(seconds=20)) is not None  # 20 s early, 30 s skew allowed
    assert check(policy, a, now + dt.timedelta(seconds=80)) is not None  # 20 s past NotOnOrAfter
    assert "not valid yet" in refused(policy, a, now - dt.timedelta(seconds=40)).reason
    assert "expired" in refused(policy, a, now + dt.timedelta(seconds=100)).reason


def test_wrong_or_missing_audience_is_failed_authentication(policy: XuaPolicy, pki: dict[str, saml.Provider]) -> None:
    r = refused(policy, saml.security_header(pki["idp"].sign(saml.assertion(audience=("urn:some:other:service",)))))
    assert r.subcode == FAILED_AUTHENTICATION and "AudienceRestriction" in r.reason and "urn:some:other:service" in r.detail
    assert refused(policy, saml.security_header(pki["idp"].sign(saml.assertion(audience=())))).subcode == FAILED_AUTHENTICATION
    # an affinity-domain audience next to ours is fine (ITI-40 allows both in one restriction)
    assert check(policy, saml.security_header(pki["idp"].sign(saml.assertion(audience=("urn:oid:1.2.3.affinity", saml.AUDIENCE))))) is not None


def test_no_assertion_when_required_is_failed_authentication(policy: XuaPolicy, pki: dict[str, saml.Provider]) -> None:
    assert refused(policy, None).subcode == FAILED_AUTHENTICATION
    r = refused(policy, saml.security_header())  # a Security header with no token in it
    assert r.subcode == FAILED_AUTHENTICATION and r.claimed is None


def test_not_required_serves_without_but_still_refuses_a_bad_one(pki: dict[str, saml.Provider]) -> None:
    optional = XuaPolicy.from_settings(XuaSettings(required=False, trusted_issuers=(pki["idp"].cert_file,), audience=(saml.AUDIENCE,)))
    assert optional is not None
    assert check(optional, None) is None
    assert refused(optional, saml.security_header(pki["stranger"].sign(saml.assertion()))).subcode == FAILED_AUTHENTICATION


def test_unsigned_assertion_is_invalid_security_token(policy: XuaPolicy) -> None:
    r = refused(policy, saml.security_header(saml.unsigned(saml.assertion())))
    assert r.subcode == INVALID_SECURITY_TOKEN and "not signed" in r.reason


@pytest.mark.parametrize("how", ["moved-signature", "nested", "same-id"])
def test_signature_wrapping_the_signature_still_verifies_for_signxml(pki: dict[str, saml.Provider], how: str) -> None:
    """The attack shapes are real: a verifier that trusts 'a valid signature somewhere' would have been fooled.

    (``moved-signature``: signxml verifies it, and returns the *nested* assertion as what was signed.)
    """
    signed = pki["idp"].sign(saml.assertion())
    evil = saml.reparse(saml.wrap(signed, how=how))[0]
    if how == "moved-signature":
        result = XMLVerifier().verify(evil, x509_cert=pki["idp"].cert, expect_config=SignatureConfiguration(location="./"))
        assert result.signed_xml.get("ID") == signed.get("ID") != evil.get("ID")
        assert evil.find(f"{saml.SAML}Subject/{saml.SAML}NameID").text == "mallory@evil.example"


@pytest.mark.parametrize("how", ["sibling-first", "moved-signature", "nested", "same-id"])
def test_signature_wrapping_is_refused(policy: XuaPolicy, pki: dict[str, saml.Provider], how: str) -> None:
    signed = pki["idp"].sign(saml.assertion())
    r = refused(policy, saml.wrap(signed, how=how))
    expected = {"sibling-first": INVALID_SECURITY_TOKEN, "moved-signature": INVALID_SECURITY_TOKEN, "same-id": INVALID_SECURITY_TOKEN, "nested": FAILED_AUTHENTICATION}
    assert r.subcode == expected[how], (r.reason, r.detail)
    if how == "sibling-first":
        assert "more than one" in r.reason
    if how == "moved-signature":
        assert "does not cover the assertion" in r.reason


def test_the_signed_assertion_alone_is_still_accepted(policy: XuaPolicy, pki: dict[str, saml.Provider]) -> None:
    """The control for the wrapping tests: the same signed assertion, alone, passes."""
    signed = pki["idp"].sign(saml.assertion())
    p = check(policy, saml.security_header(signed))
    assert p is not None and p.subject == "jdoe@example.org"


def test_sha1_signatures_are_refused(policy: XuaPolicy, pki: dict[str, saml.Provider]) -> None:
    from signxml import XMLSigner, methods

    class Sha1Signer(XMLSigner):  # what an old IdP still sends; signxml refuses to make it by default
        def check_deprecated_methods(self) -> None:
            pass

    signer = Sha1Signer(method=methods.enveloped, signature_algorithm="rsa-sha1", digest_algorithm="sha1", c14n_algorithm=saml.EXC_C14N)
    a = saml.assertion()
    signed = signer.sign(a, key=pki["idp"].key, cert=[pki["idp"].cert], reference_uri="#" + a.get("ID"))
    r = refused(policy, saml.security_header(signed))
    assert r.subcode == INVALID_SECURITY_TOKEN and "SHA1" in r.detail


@pytest.mark.parametrize(
    "change, cause",
    [
        (lambda a: a.remove(a.find(f"{saml.SAML}AuthnStatement")), "AuthnStatement"),
        (lambda a: a.find(f"{saml.SAML}Subject/{saml.SAML}SubjectConfirmation").set("Method", "urn:oasis:names:tc:SAML:2.0:cm:holder-of-key"), "bearer"),
        (lambda a: a.find(f"{saml.SAML}Subject").remove(a.find(f"{saml.SAML}Subject/{saml.SAML}NameID")), "NameID"),
        (lambda a: a.set("Version", "1.1"), "SAML 2.0"),
        (lambda a: a.remove(a.find(f"{saml.SAML}Conditions")), "Conditions"),
        (lambda a: a.find(f"{saml.SAML}Conditions").append(a.makeelement(f"{saml.SAML}Condition")), "not understood"),
    ],
    ids=["no-authn-statement", "holder-of-key", "no-name-id", "version", "no-conditions", "unknown-condition"],
)
def test_assertions_outside_the_iti40_profile_are_invalid_tokens(policy: XuaPolicy, pki: dict[str, saml.Provider], change: Any, cause: str) -> None:
    a = saml.assertion()
    change(a)
    r = refused(policy, saml.security_header(pki["idp"].sign(a)))
    assert r.subcode == INVALID_SECURITY_TOKEN and cause in r.reason, r.reason


def test_one_time_use_and_proxy_restriction_may_be_ignored(policy: XuaPolicy, pki: dict[str, saml.Provider]) -> None:
    a = saml.assertion()
    cond = a.find(f"{saml.SAML}Conditions")
    cond.append(a.makeelement(f"{saml.SAML}OneTimeUse"))
    cond.append(a.makeelement(f"{saml.SAML}ProxyRestriction", Count="1"))
    assert check(policy, saml.security_header(pki["idp"].sign(a))) is not None


# -- [xua] settings ----------------------------------------------------------------------------------


def _load(tmp_path: Path, text: str) -> Any:
    cfg = tmp_path / "xdsi.toml"
    cfg.write_text(text)
    return load_settings(cfg, env={})


def test_settings_parse_relative_paths_and_single_strings(tmp_path: Path, pki: dict[str, saml.Provider]) -> None:
    local = tmp_path / "idp.pem"
    local.write_bytes(pki["idp"].cert_file.read_bytes() + pki["ca"].cert_file.read_bytes())  # a rolled key: two certificates
    s = _load(tmp_path, '[xua]\nrequired = true\ntrusted_issuers = ["idp.pem"]\naudience = "urn:xdsi:ids"\nclock_skew_seconds = 5\n')
    assert s.xua == XuaSettings(required=True, trusted_issuers=(local,), audience=("urn:xdsi:ids",), clock_skew_seconds=5.0)
    p = XuaPolicy.from_settings(s.xua)
    assert p is not None and len(p.trusted) == 2
    assert load_settings(None, env={}).xua.enabled is False


@pytest.mark.parametrize(
    "body, message",
    [
        ("required = true\naudience = 'urn:x'", "required = true needs trusted_issuers"),
        ("trusted_issuers = ['{idp}']", "needs audience"),
        ("trusted_issuers = ['{missing}']\naudience = 'urn:x'", "cannot read"),
        ("trusted_issuers = ['{garbage}']\naudience = 'urn:x'", "holds no PEM certificate"),
        ("required = 'yes'", "required must be true or false"),
        ("clock_skew_seconds = -1", "clock_skew_seconds"),
        ("audience = 3", "audience must be a URI"),
        ("issuer = 'x'", "unknown key(s) in [xua]"),
    ],
)
def test_bad_settings_are_one_line_config_errors(tmp_path: Path, pki: dict[str, saml.Provider], body: str, message: str) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    text = "[xua]\n" + body.format(idp=pki["idp"].cert_file, missing=tmp_path / "nope.pem", garbage=garbage) + "\n"
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    assert message in str(info.value) and "\n" not in str(info.value)


# -- the audit of a refusal ----------------------------------------------------------------------------


class _Trail:
    enabled = True
    source = m.AuditSource("XDSI-TEST")

    def __init__(self) -> None:
        from xdsi.audit.ratelimit import AlertLimiter

        self.events: list[m.AuditEvent] = []
        self.alerts = AlertLimiter()

    def record(self, event: m.AuditEvent) -> bool:
        self.events.append(event)
        return True


class _Archive:
    def __init__(self) -> None:
        from xdsi.config import Settings

        self.settings = Settings(ae_title="XDSI")
        self.audit = _Trail()


def test_refusal_is_audited_as_a_failed_user_authentication(policy: XuaPolicy, pki: dict[str, saml.Provider]) -> None:
    from xdsi.audit.xua import xua_refused

    r = refused(policy, saml.security_header(pki["stranger"].sign(saml.assertion(user="jdoe@example.org", alias="JD"))))
    archive = _Archive()
    xua_refused(archive, {"REMOTE_ADDR": "192.0.2.7", "SERVER_NAME": "ids.example.org"}, r)
    (event,) = archive.audit.events
    root = check_audit_message(m.build(event))
    ev = root.find("EventIdentification")
    assert ev.get("EventActionCode") == "E" and ev.get("EventOutcomeIndicator") == "4"
    assert ev.find("EventID").get("csd-code") == "110114" and ev.find("EventTypeCode").get("csd-code") == "110122"
    assert "FailedAuthentication" in ev.findtext("EventOutcomeDescription")
    person, node = root.findall("ActiveParticipant")
    assert person.get("UserID") == "jdoe@example.org" and person.get("UserIsRequestor") == "true"
    assert person.get("UserName") == audit_user_name("jdoe@example.org", "https://idp.example.org", "JD") == "JD<jdoe@example.org@https://idp.example.org>"
    assert person.get("NetworkAccessPointID") == "192.0.2.7" and person.get("AlternativeUserID") == "192.0.2.7"
    assert node.get("UserID") == "XDSI" and node.get("UserIsRequestor") == "false" and node.get("NetworkAccessPointID") == "ids.example.org"
    assert node.find("RoleIDCode").get("csd-code") == "110150"


def test_refusal_without_any_assertion_names_the_requester(policy: XuaPolicy) -> None:
    from xdsi.audit.xua import xua_refused

    r = refused(policy, None)
    archive = _Archive()
    xua_refused(archive, {"REMOTE_ADDR": "192.0.2.8", "SSL_CLIENT_S_DN": "CN=consumer.example.org"}, r)
    (event,) = archive.audit.events
    person = check_audit_message(m.build(event)).find("ActiveParticipant")
    assert person.get("UserID") == "CN=consumer.example.org" and person.get("NetworkAccessPointID") == "192.0.2.8"


def test_audit_is_skipped_when_off_and_never_raises(policy: XuaPolicy) -> None:
    from xdsi.audit.xua import xua_refused

    archive = _Archive()
    archive.audit.enabled = False
    xua_refused(archive, {}, refused(policy, None))
    assert archive.audit.events == []

    class Broken(_Trail):
        def record(self, event: m.AuditEvent) -> bool:
            raise RuntimeError("spool on fire")

    archive.audit = Broken()
    xua_refused(archive, {}, refused(policy, None))  # logged, not raised


# -- the Principal handed on with the request (in-process WSGI, the real spyne application) ---------


@pytest.fixture(scope="module")
def ids_app(tmp_path_factory: pytest.TempPathFactory, pki: dict[str, saml.Provider]) -> Iterator[tuple[Any, list[Any]]]:
    """The RAD-69 endpoint with [xua] on, and the (Exchange, environ) of every request it finished."""
    from tests.conftest import make_settings
    from xdsi.archive import Archive
    from xdsi.soap import ids

    settings = make_settings(tmp_path_factory.mktemp("xua-app"), xua=XuaSettings(required=False, trusted_issuers=(pki["idp"].cert_file,), audience=(saml.AUDIENCE,)))
    archive = Archive.open(settings)
    seen: list[Any] = []
    try:
        app = ids.make_application(archive)
        app.event_manager.add_listener("wsgi_return", lambda ctx: seen.append((ctx.udc, ctx.transport.req_env)))
        yield app, seen
    finally:
        archive.close()


def _rad69_envelope(security: Any | None) -> bytes:
    from xdsi.standards import constants as C
    from xdsi.wire.soap import addressing_headers, build_envelope

    body = etree.fromstring(
        f'<iherad:RetrieveImagingDocumentSetRequest xmlns:iherad="{C.NS_IHERAD}" xmlns:ihe="{C.NS_XDS}">'
        '<iherad:StudyRequest studyInstanceUID="1.2.3"><iherad:SeriesRequest seriesInstanceUID="1.2.3.4"><ihe:DocumentRequest>'
        "<ihe:RepositoryUniqueId>1.2.3.5</ihe:RepositoryUniqueId><ihe:DocumentUniqueId>1.2.3.4.5</ihe:DocumentUniqueId>"
        "</ihe:DocumentRequest></iherad:SeriesRequest></iherad:StudyRequest><iherad:TransferSyntaxUIDList>"
        "<iherad:TransferSyntaxUID>1.2.840.10008.1.2.1</iherad:TransferSyntaxUID></iherad:TransferSyntaxUIDList></iherad:RetrieveImagingDocumentSetRequest>".encode()
    )
    return build_envelope(body, addressing_headers(C.ACTION_RAD69, to="http://localhost/") + ([security] if security is not None else []))


def _post(app: Any, data: bytes, **environ: Any) -> tuple[int, bytes]:
    from werkzeug.test import Client

    resp = Client(app).post("/", data=data, content_type="application/soap+xml; charset=utf-8", environ_base=environ)
    return resp.status_code, resp.get_data()


def test_the_principal_reaches_the_exchange_and_the_environ(ids_app: tuple[Any, list[Any]], pki: dict[str, saml.Provider]) -> None:
    from xdsi.security.principal import ENVIRON_KEY

    app, seen = ids_app
    seen.clear()
    status, _ = _post(app, _rad69_envelope(saml.security_header(pki["idp"].sign(saml.assertion(user="nurse@example.org")))))
    assert status == 200
    (exchange, environ), = seen
    assert exchange.principal is not None and exchange.principal.subject == "nurse@example.org" and exchange.principal.via == "xua"
    assert environ[ENVIRON_KEY] is exchange.principal and environ["xdsi.xua.principal"] is exchange.principal


def test_an_http_level_identity_is_kept_next_to_the_xua_user(ids_app: tuple[Any, list[Any]], pki: dict[str, saml.Provider]) -> None:
    from xdsi.security.principal import ENVIRON_KEY

    app, seen = ids_app
    seen.clear()
    system = Principal("CN=consumer.example.org", frozenset({"read"}), "tls")
    status, _ = _post(app, _rad69_envelope(saml.security_header(pki["idp"].sign(saml.assertion(user="nurse@example.org")))), **{ENVIRON_KEY: system})
    assert status == 200
    (exchange, environ), = seen
    assert environ[ENVIRON_KEY] is system and environ["xdsi.xua.principal"].subject == "nurse@example.org"


def test_without_an_assertion_nothing_is_claimed_and_a_bad_one_is_a_fault(ids_app: tuple[Any, list[Any]], pki: dict[str, saml.Provider]) -> None:
    from xdsi.security.principal import ENVIRON_KEY

    app, seen = ids_app
    seen.clear()
    assert _post(app, _rad69_envelope(None))[0] == 200  # required = false: served anonymously
    (exchange, environ), = seen
    assert exchange.principal is None and ENVIRON_KEY not in environ
    status, body = _post(app, _rad69_envelope(saml.security_header(pki["stranger"].sign(saml.assertion()))))
    assert status == 400 and b"FailedAuthentication" in body and b"wss-wssecurity-secext-1.0.xsd" in body


def test_the_example_configuration_documents_xua_with_its_defaults() -> None:
    example = Path(__file__).resolve().parents[2] / "xdsi.example.toml"
    s = load_settings(example, env={})
    assert s.xua == XuaSettings()
    text = example.read_text()
    assert all(f"\n{k} = " in text or f"\n# {k} = " in text for k in ("required", "trusted_issuers", "audience", "clock_skew_seconds"))
