"""XUA (IHE ITI-40): the SAML 2.0 identity assertion of a SOAP request, validated as an X-Service Provider.

ITI TF-2 3.40.4.1.3 asks the X-Service Provider to process the ``wsse:Security`` header by the
WS-Security and SAML 2.0 rules (signature valid and chaining to a trusted X-Assertion Provider),
to answer a failure with a WS-Security fault (WSS 1.1 section 12) and to record the identity in
the audit trail as ``alias<user@issuer>`` (3.40.4.2).  The profile of the assertion itself
(3.40.4.1.2): a Subject with a SubjectConfirmation (bearer shall be supported), Conditions whose
AudienceRestriction names the X-Service Provider, an AuthnStatement, a signature by the
X-Assertion Provider; NotOnOrAfter is left to the provider, ProxyRestriction and OneTimeUse may
be ignored.

Signature wrapping is the attack that matters here: a verifier that checks a signature and then
looks the assertion up again in the received tree can be shown a valid signature over one
assertion while it reads another.  So the XML signature is verified by signxml over the received
assertion alone (the Signature must be its direct child, one Reference), and *every* value used
afterwards is read from the element signxml returns as signed (``VerifyResult.signed_xml``), which
must itself be that Assertion; a header with more than one assertion is refused outright.

Which WS-Security fault (WSS 1.1 section 12, as SOAP 1.2 ``env:Sender`` subcodes):
``wsse:InvalidSecurityToken`` when what was sent is not a usable XUA assertion (malformed, not
signed, signed element not the assertion, several assertions, an algorithm or confirmation method
we do not accept); ``wsse:FailedAuthentication`` when a well-formed assertion cannot be
authenticated (no assertion where one is required, signature not by a trusted provider or not
matching the content, outside its validity window, not addressed to us).  The fault reason is kept
short; the precise cause goes to the log and to the audit trail.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from cryptography import x509
from lxml import etree
from signxml import SignatureConfiguration, XMLVerifier
from signxml.exceptions import InvalidSignature, SignXMLException

from xdsi.config import ConfigError, XuaSettings
from xdsi.security.principal import Principal
from xdsi.standards.constants import NS_SAML2, NS_WSSE

__all__ = [
    "XuaPolicy",
    "XuaRefused",
    "Claimed",
    "INVALID_SECURITY_TOKEN",
    "FAILED_AUTHENTICATION",
    "ATTRIBUTE_NAMES",
    "audit_user_name",
    "claimed_identity",
]

log = logging.getLogger(__name__)

SAML = f"{{{NS_SAML2}}}"
DS = "{http://www.w3.org/2000/09/xmldsig#}"
XSI_TYPE = "{http://www.w3.org/2001/XMLSchema-instance}type"
INVALID_SECURITY_TOKEN = f"{{{NS_WSSE}}}InvalidSecurityToken"
FAILED_AUTHENTICATION = f"{{{NS_WSSE}}}FailedAuthentication"
BEARER = "urn:oasis:names:tc:SAML:2.0:cm:bearer"

# ITI TF-2 3.40.4.1.2 (and its options): SAML Attribute Name -> the key it gets in Principal.attributes
ATTRIBUTE_NAMES: Mapping[str, str] = {
    "urn:oasis:names:tc:xspa:1.0:subject:subject-id": "subject-id",
    "urn:oasis:names:tc:xspa:1.0:subject:organization": "organization",
    "urn:oasis:names:tc:xspa:1.0:subject:organization-id": "organization-id",
    "urn:ihe:iti:xca:2010:homeCommunityId": "home-community-id",
    "urn:oasis:names:tc:xspa:1.0:subject:npi": "npi",
    "urn:ihe:iti:xua:2017:subject:provider-identifier": "provider-identifier",
    "urn:oasis:names:tc:xacml:2.0:subject:role": "role",  # Subject-Role Option (hl7:Role, CE)
    "urn:oasis:names:tc:xspa:1.0:subject:purposeofuse": "purpose-of-use",  # PurposeOfUse Option (hl7:PurposeOfUse, CE)
    "urn:oasis:names:tc:xacml:2.0:resource:resource-id": "resource-id",  # patient identifier (CX)
    "urn:ihe:iti:bppc:2007:docid": "bppc-docid",  # Authz-Consent Option
    "urn:ihe:iti:xua:2012:acp": "acp",  # Authz-Consent Option
}
# Conditions sub-elements ITI-40 lets us ignore; any other one makes the assertion Indeterminate (SAML Core 2.5.1)
_IGNORABLE_CONDITIONS = {SAML + "ProxyRestriction", SAML + "OneTimeUse"}
# SAML Core 5.4: enveloped signature, exclusive c14n; SHA-1 stays refused (signxml's default)
_SIGNATURE_CONFIG = SignatureConfiguration(location="./", expect_references=1)
_MAX_VALUE = 256  # characters kept of one attribute value (they end up in logs and audit records)


class XuaRefused(Exception):
    """An assertion (or its absence) the X-Service Provider refuses; ``subcode`` is the WS-Security fault QName (Clark).

    ``reason`` is what the peer is told; ``detail`` the precise cause for our log and the audit trail.
    """

    def __init__(self, subcode: str, reason: str, detail: str | None = None) -> None:
        super().__init__(reason)
        self.subcode = subcode
        self.reason = reason
        self.detail = detail or reason
        self.claimed: Claimed | None = None  # who the refused assertion said the user was (unverified)


@dataclass(frozen=True)
class Claimed:
    """What an assertion *claims* (read unverified from the received tree): only for the audit of a refusal."""

    user: str | None = None
    issuer: str | None = None
    alias: str | None = None


def claimed_identity(security: Any) -> Claimed | None:
    """The NameID / Issuer of the first assertion in a ``wsse:Security`` element, unverified (audit of refusals)."""
    if security is None:
        return None
    a = security.find(SAML + "Assertion")
    if a is None:
        return None
    name_id = a.find(f"{SAML}Subject/{SAML}NameID")
    return Claimed(
        user=_clip(_text(name_id)) or None,
        issuer=_clip(_text(a.find(SAML + "Issuer"))) or None,
        alias=_clip((name_id.get("SPProvidedID") if name_id is not None else None) or "") or None,
    )


def audit_user_name(user: str, issuer: str, alias: str | None = None) -> str:
    """ITI TF-2 3.40.4.2: the ATNA UserName of an XUA-authenticated user, ``alias<user@issuer>``."""
    return f"{alias or ''}<{user}@{issuer}>"


@dataclass(frozen=True)
class XuaPolicy:
    """``[xua]`` made usable: the trusted certificates loaded, the audience and the clock skew.

    :meth:`check` turns a ``wsse:Security`` element (or ``None``) into the request's
    :class:`Principal` (``via="xua"``), ``None`` (no assertion, none required), or raises
    :class:`XuaRefused`.
    """

    required: bool
    trusted: tuple[x509.Certificate, ...]
    audience: frozenset[str]
    clock_skew: dt.timedelta
    rights: frozenset[str] = field(default_factory=lambda: frozenset({"read"}))

    @classmethod
    def from_settings(cls, settings: XuaSettings) -> "XuaPolicy | None":
        """The policy of ``[xua]``, or ``None`` when XUA is off; unreadable certificates are a :class:`ConfigError`."""
        if not settings.enabled:
            return None
        return cls(
            required=settings.required,
            trusted=tuple(c for p in settings.trusted_issuers for c in load_certificates(p)),
            audience=frozenset(settings.audience),
            clock_skew=dt.timedelta(seconds=settings.clock_skew_seconds),
        )

    def check(self, security: Any, now: dt.datetime | None = None) -> Principal | None:
        """Validate the assertion in ``security`` (the ``wsse:Security`` header element, or ``None``)."""
        try:
            assertion = _the_assertion(security)
            if assertion is None:
                if self.required:
                    raise XuaRefused(FAILED_AUTHENTICATION, "this service requires a SAML 2.0 identity assertion (IHE XUA) in a wsse:Security header")
                return None
            return self._validate(assertion, now or dt.datetime.now(dt.timezone.utc))
        except XuaRefused as refused:
            refused.claimed = claimed_identity(security)
            raise

    # -- the steps -------------------------------------------------------------------------------

    def _validate(self, received: Any, now: dt.datetime) -> Principal:
        signed, signer = self._verify_signature(received)
        # from here on only `signed` is read: what the X-Assertion Provider signed, nothing else
        if signed.get("Version") != "2.0":
            raise XuaRefused(INVALID_SECURITY_TOKEN, "the assertion is not a SAML 2.0 assertion", f"Version={signed.get('Version')!r}")
        issuer = _text(_child(signed, "Issuer"))
        if not issuer:
            raise XuaRefused(INVALID_SECURITY_TOKEN, "the SAML assertion has no Issuer")
        issued = _instant(signed.get("IssueInstant"), "IssueInstant")
        if issued > now + self.clock_skew:
            raise XuaRefused(FAILED_AUTHENTICATION, "the SAML assertion is not valid yet", f"IssueInstant {issued.isoformat()} is in the future (now {now.isoformat()})")
        user, alias, name_format, confirmation = self._subject(signed, now)
        self._conditions(signed, now)
        authn = _child(signed, "AuthnStatement")
        if authn is None:
            raise XuaRefused(INVALID_SECURITY_TOKEN, "the SAML assertion has no AuthnStatement (ITI-40 requires one)")
        ctx_ref = _text(authn.find(f"{SAML}AuthnContext/{SAML}AuthnContextClassRef")) or _text(authn.find(f"{SAML}AuthnContext/{SAML}AuthnContextDeclRef"))
        if not ctx_ref:
            raise XuaRefused(INVALID_SECURITY_TOKEN, "the SAML AuthnStatement names no AuthnContextClassRef or AuthnContextDeclRef")
        attributes: dict[str, str] = {
            "assertion-id": _clip(signed.get("ID") or ""),
            "issuer": _clip(issuer),
            "name-id": _clip(user),
            "authn-context": _clip(ctx_ref),
            "subject-confirmation": confirmation,
            "signer": _clip(signer.subject.rfc4514_string()),
            "audit-user-name": audit_user_name(_clip(user), _clip(issuer), _clip(alias) if alias else None),
        }
        if name_format:
            attributes["name-id-format"] = _clip(name_format)
        for key, values in _attributes(signed).items():
            attributes[key] = "~".join(values)  # HL7 repetition separator between values
        log.info("XUA assertion %s verified: user %r issuer %r signed by %s", attributes["assertion-id"], user, issuer, attributes["signer"])
        return Principal(subject=_clip(user), rights=self.rights, via="xua", attributes=attributes)

    def _verify_signature(self, received: Any) -> tuple[Any, x509.Certificate]:
        """(signed Assertion element, signing certificate); the signed element comes from signxml, never from ``received``."""
        sig = _child(received, "Signature", DS)
        if sig is None:
            raise XuaRefused(INVALID_SECURITY_TOKEN, "the SAML assertion is not signed (ITI-40: it is signed by the X-Assertion Provider)")
        data = etree.tostring(received)  # the assertion alone: a reference can only resolve inside it
        last: Exception | None = None
        for cert in self._candidates(sig):
            try:
                result = XMLVerifier().verify(data, x509_cert=cert, expect_config=_SIGNATURE_CONFIG)
            except InvalidSignature as exc:  # not this key, or content changed after signing: try the next trusted one
                last = exc
                continue
            except (SignXMLException, ValueError, etree.LxmlError) as exc:  # structure or algorithm: no key makes it right
                raise XuaRefused(INVALID_SECURITY_TOKEN, "the SAML assertion's signature is malformed or uses an algorithm not accepted here", str(exc)) from None
            signed = result.signed_xml
            if signed is None or signed.tag != SAML + "Assertion" or not received.get("ID") or signed.get("ID") != received.get("ID"):
                # SAML Core 5.4.2: the Reference names the assertion that carries the signature, and nothing else
                what = "nothing" if signed is None else f"{signed.tag} ID={signed.get('ID')!r}"
                raise XuaRefused(INVALID_SECURITY_TOKEN, "the signature does not cover the assertion that carries it", f"signed element: {what}")
            return signed, cert
        raise XuaRefused(FAILED_AUTHENTICATION, "the SAML assertion is not signed by a trusted X-Assertion Provider, or was changed after signing", str(last) if last else "no trusted certificate")

    def _candidates(self, sig: Any) -> list[x509.Certificate]:
        """The certificates to try: the one in KeyInfo when it is trusted or issued by a trusted CA, then every trusted one."""
        out: list[x509.Certificate] = []
        pem = _text(sig.find(f"{DS}KeyInfo/{DS}X509Data/{DS}X509Certificate"))
        if pem:
            try:
                presented = x509.load_der_x509_certificate(_b64(pem))
            except ValueError:
                presented = None
            if presented is not None and (presented in self.trusted or self._issued_by_trusted(presented)):
                out.append(presented)
        out.extend(c for c in self.trusted if c not in out)
        return out

    def _issued_by_trusted(self, cert: x509.Certificate) -> bool:
        """``cert`` was signed by a trusted CA certificate and is within its validity period (one level: provider CA -> signer)."""
        now = dt.datetime.now(dt.timezone.utc)
        if not cert.not_valid_before_utc - self.clock_skew <= now <= cert.not_valid_after_utc + self.clock_skew:
            return False
        for ca in self.trusted:
            try:
                bc = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
            except x509.ExtensionNotFound:
                continue
            if not bc.ca or ca.subject != cert.issuer:
                continue
            try:
                cert.verify_directly_issued_by(ca)
            except Exception:  # a wrong signature, an unsupported key type: not issued by this CA
                continue
            return True
        return False

    def _subject(self, signed: Any, now: dt.datetime) -> tuple[str, str | None, str | None, str]:
        subject = _child(signed, "Subject")
        if subject is None:
            raise XuaRefused(INVALID_SECURITY_TOKEN, "the SAML assertion has no Subject")
        name_id = _child(subject, "NameID")
        if name_id is None:
            what = "an EncryptedID, which is not supported here" if _child(subject, "EncryptedID") is not None else "no NameID"
            raise XuaRefused(INVALID_SECURITY_TOKEN, f"the SAML Subject has {what}")
        user = _text(name_id)
        if not user:
            raise XuaRefused(INVALID_SECURITY_TOKEN, "the SAML Subject NameID is empty")
        confirmations = [c for c in subject if c.tag == SAML + "SubjectConfirmation"]
        if not confirmations:
            raise XuaRefused(INVALID_SECURITY_TOKEN, "the SAML Subject has no SubjectConfirmation (ITI-40 requires one)")
        methods = [str(c.get("Method") or "") for c in confirmations]
        # bearer is what ITI-40 requires us to support; holder-of-key would need a proof of possession we do not check,
        # so such an assertion is refused rather than treated as if anyone holding it were its subject
        bearer = [c for c in confirmations if c.get("Method") == BEARER]
        if not bearer:
            raise XuaRefused(INVALID_SECURITY_TOKEN, "only the bearer subject confirmation method is supported here", f"methods: {methods}")
        failures = []
        for c in bearer:
            data = _child(c, "SubjectConfirmationData")
            try:
                if data is not None:
                    self._window(data, now, "SubjectConfirmationData")
                return user, name_id.get("SPProvidedID"), name_id.get("Format"), BEARER
            except XuaRefused as exc:
                failures.append(exc)
        raise failures[0]

    def _conditions(self, signed: Any, now: dt.datetime) -> None:
        cond = _child(signed, "Conditions")
        if cond is None:
            raise XuaRefused(INVALID_SECURITY_TOKEN, "the SAML assertion has no Conditions (ITI-40: NotBefore and an AudienceRestriction naming this service)")
        self._window(cond, now, "Conditions")
        restrictions = [c for c in cond if c.tag == SAML + "AudienceRestriction"]
        if not restrictions:
            raise XuaRefused(FAILED_AUTHENTICATION, "the SAML assertion has no AudienceRestriction naming this service")
        for r in restrictions:  # SAML Core 2.5.1.4: each AudienceRestriction must be met on its own
            audiences = {_text(a) for a in r if a.tag == SAML + "Audience"}
            if not audiences & self.audience:
                raise XuaRefused(FAILED_AUTHENTICATION, "the SAML assertion is not addressed to this service (AudienceRestriction)", f"audiences {sorted(audiences)}, ours {sorted(self.audience)}")
        for c in cond:
            if isinstance(c.tag, str) and c.tag != SAML + "AudienceRestriction" and c.tag not in _IGNORABLE_CONDITIONS:
                raise XuaRefused(INVALID_SECURITY_TOKEN, f"the SAML assertion has a condition not understood here: {etree.QName(c).localname}")

    def _window(self, el: Any, now: dt.datetime, where: str) -> None:
        nb, noa = el.get("NotBefore"), el.get("NotOnOrAfter")
        if nb is not None and _instant(nb, f"{where} NotBefore") - self.clock_skew > now:
            raise XuaRefused(FAILED_AUTHENTICATION, "the SAML assertion is not valid yet", f"{where} NotBefore {nb}, now {now.isoformat()}")
        if noa is not None and now >= _instant(noa, f"{where} NotOnOrAfter") + self.clock_skew:
            raise XuaRefused(FAILED_AUTHENTICATION, "the SAML assertion has expired", f"{where} NotOnOrAfter {noa}, now {now.isoformat()}")


# -- helpers ---------------------------------------------------------------------------------------


def load_certificates(path: Path) -> list[x509.Certificate]:
    """Every certificate in a PEM file (a provider may roll its key: both certificates in one file)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"[xua] trusted_issuers: cannot read {path}: {exc.strerror or exc}") from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise ConfigError(f"[xua] trusted_issuers: {path} holds no PEM certificate")
    return certs


def _the_assertion(security: Any) -> Any:
    """The one SAML 2.0 Assertion directly in ``wsse:Security`` (None: none); several are refused (which would count?)."""
    if security is None:
        return None
    found = [c for c in security if c.tag == SAML + "Assertion"]
    if len(found) > 1:
        raise XuaRefused(INVALID_SECURITY_TOKEN, "the wsse:Security header carries more than one SAML assertion", f"{len(found)} assertions")
    if not found and any(isinstance(c.tag, str) and c.tag.endswith("}EncryptedAssertion") for c in security):
        raise XuaRefused(INVALID_SECURITY_TOKEN, "encrypted SAML assertions are not supported here")
    return found[0] if found else None


def _child(el: Any, local: str, ns: str = SAML) -> Any:
    """The first direct child ``{ns}local``: never a descendant, so nothing nested elsewhere is picked up."""
    return next((c for c in el if c.tag == ns + local), None)


def _text(el: Any) -> str:
    return "" if el is None else (el.text or "").strip()


def _clip(value: str) -> str:
    return value[:_MAX_VALUE]


def _b64(text: str) -> bytes:
    import base64

    return base64.b64decode(re.sub(r"\s+", "", text))


_FRACTION = re.compile(r"(\.\d{6})\d+")


def _instant(value: str | None, where: str) -> dt.datetime:
    """An xs:dateTime of the assertion; SAML Core 1.3.3 wants UTC, a value without zone is read as UTC."""
    if not value:
        raise XuaRefused(INVALID_SECURITY_TOKEN, f"the SAML assertion has no {where}")
    text = _FRACTION.sub(r"\1", value.strip())
    try:
        t = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise XuaRefused(INVALID_SECURITY_TOKEN, f"the SAML assertion's {where} is not a dateTime", repr(value)) from None
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.timezone.utc)


def _attributes(signed: Any) -> dict[str, list[str]]:
    """ITI-40 attributes by their short key, every AttributeStatement and repetition read (3.40.4.1.2)."""
    out: dict[str, list[str]] = {}
    for statement in (c for c in signed if c.tag == SAML + "AttributeStatement"):
        for attr in (c for c in statement if c.tag == SAML + "Attribute"):
            key = ATTRIBUTE_NAMES.get(str(attr.get("Name") or ""))
            if key is None:
                continue
            for v in (c for c in attr if c.tag == SAML + "AttributeValue"):
                value = _value(v)
                if value:
                    out.setdefault(key, []).append(_clip(value))
    return out


def _value(v: Any) -> str:
    """An AttributeValue as text: plain text, or an HL7 v3 CE (code^displayName^codeSystem, the HL7 CE order) or II."""
    child = next((c for c in v if isinstance(c.tag, str)), None)
    if child is None:
        return _text(v)
    if child.get("code") is not None:  # hl7:Role, hl7:PurposeOfUse (CE)
        return "^".join(_escape(child.get(k) or "") for k in ("code", "displayName", "codeSystem"))
    if child.get("root") is not None:  # hl7:id (II): extension^^^&root&ISO, as a CX would carry it
        return f"{_escape(child.get('extension') or '')}^^^&{child.get('root')}&ISO"
    return " ".join(t.strip() for t in child.itertext() if t.strip())


def _escape(value: str) -> str:
    return value.replace("^", " ").replace("~", " ")



def protocol_options(archive: Any) -> dict[str, Any]:
    """The ``IheSoap12`` keyword arguments of ``[xua]`` for an endpoint serving ``archive`` (empty when XUA is off)."""
    policy = XuaPolicy.from_settings(archive.settings.xua)
    if policy is None:
        return {}

    def refused(ctx: Any, exc: XuaRefused) -> None:
        from xdsi.audit.xua import xua_refused

        xua_refused(archive, getattr(ctx.transport, "req_env", {}) or {}, exc)

    return {"xua": policy, "on_xua_refused": refused}
