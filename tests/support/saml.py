"""SAML 2.0 identity assertions made in the test: an X-Assertion Provider (key + certificate from ``cryptography``)
that signs with signxml the way IdPs do (enveloped, exclusive c14n, RSA-SHA256, the Signature after the Issuer).

Why made here: a checked-in signed assertion expires; every run issues fresh ones, so the only expired
assertion is the one a test asks for.  :func:`wrap` builds the signature-wrapping attack shapes.
"""

from __future__ import annotations

import copy
import datetime as dt
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from lxml import etree
from signxml import XMLSigner, methods

NS_SAML2 = "urn:oasis:names:tc:SAML:2.0:assertion"
NS_WSSE = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
NS_DS = "http://www.w3.org/2000/09/xmldsig#"
NS_HL7 = "urn:hl7-org:v3"
SAML = f"{{{NS_SAML2}}}"
EXC_C14N = "http://www.w3.org/2001/10/xml-exc-c14n#"
AUDIENCE = "urn:xdsi:test:ImagingDocumentSource"
BEARER = "urn:oasis:names:tc:SAML:2.0:cm:bearer"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass
class Provider:
    """An X-Assertion Provider: its key, its (self-signed, or CA-issued) certificate and that certificate as a PEM file."""

    name: str
    key: rsa.RSAPrivateKey
    cert: x509.Certificate
    cert_file: Path

    @classmethod
    def create(cls, directory: Path, name: str = "https://idp.example.org", *, ca: "Provider | None" = None, is_ca: bool = False) -> "Provider":
        directory.mkdir(parents=True, exist_ok=True)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name.split("//")[-1][:60])])
        now = dt.datetime.now(dt.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca.cert.subject if ca else subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        )
        cert = builder.sign(ca.key if ca else key, hashes.SHA256())
        f = directory / f"{uuid.uuid4().hex[:8]}.pem"
        f.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(name, key, cert, f)

    def sign(self, assertion: Any, *, chain: Sequence[x509.Certificate] = ()) -> Any:
        """The assertion signed (enveloped, Reference to its ID), the certificate (and ``chain``) in KeyInfo."""
        signer = XMLSigner(method=methods.enveloped, signature_algorithm="rsa-sha256", digest_algorithm="sha256", c14n_algorithm=EXC_C14N)
        pem = self.cert.public_bytes(serialization.Encoding.PEM).decode()
        certs = [pem] + [c.public_bytes(serialization.Encoding.PEM).decode() for c in chain]
        return signer.sign(assertion, key=self.key, cert=certs, reference_uri="#" + assertion.get("ID"))


def assertion(
    issuer: str = "https://idp.example.org",
    user: str = "jdoe@example.org",
    *,
    audience: Sequence[str] = (AUDIENCE,),
    not_before: dt.datetime | None = None,
    not_on_or_after: dt.datetime | None = None,
    lifetime: dt.timedelta = dt.timedelta(minutes=5),
    attributes: Mapping[str, Sequence[str | Any]] | None = None,
    alias: str | None = None,
    confirmation: str = BEARER,
    authn: bool = True,
    assertion_id: str | None = None,
) -> Any:
    """An unsigned XUA assertion as ITI-40 profiles it (Subject + bearer confirmation, Conditions, AuthnStatement, attributes)."""
    issued = not_before or _now()
    expires = not_on_or_after or issued + lifetime
    a = etree.Element(SAML + "Assertion", nsmap={"saml2": NS_SAML2}, ID=assertion_id or f"_{uuid.uuid4().hex}", Version="2.0", IssueInstant=_iso(issued))
    etree.SubElement(a, SAML + "Issuer").text = issuer
    etree.SubElement(a, f"{{{NS_DS}}}Signature", nsmap={"ds": NS_DS}, Id="placeholder")
    subject = etree.SubElement(a, SAML + "Subject")
    nid = etree.SubElement(subject, SAML + "NameID", Format="urn:oasis:names:tc:SAML:1.1:nameid-format:emailAddress")
    if alias:
        nid.set("SPProvidedID", alias)
    nid.text = user
    sc = etree.SubElement(subject, SAML + "SubjectConfirmation", Method=confirmation)
    etree.SubElement(sc, SAML + "SubjectConfirmationData", NotOnOrAfter=_iso(expires))
    cond = etree.SubElement(a, SAML + "Conditions", NotBefore=_iso(issued), NotOnOrAfter=_iso(expires))
    if audience:
        ar = etree.SubElement(cond, SAML + "AudienceRestriction")
        for aud in audience:
            etree.SubElement(ar, SAML + "Audience").text = aud
    if authn:
        st = etree.SubElement(a, SAML + "AuthnStatement", AuthnInstant=_iso(issued))
        ctx = etree.SubElement(st, SAML + "AuthnContext")
        etree.SubElement(ctx, SAML + "AuthnContextClassRef").text = "urn:oasis:names:tc:SAML:2.0:ac:classes:PasswordProtectedTransport"
    attrs = attributes if attributes is not None else default_attributes()
    if attrs:
        stmt = etree.SubElement(a, SAML + "AttributeStatement")
        for name, values in attrs.items():
            at = etree.SubElement(stmt, SAML + "Attribute", Name=name)
            for v in values:
                av = etree.SubElement(at, SAML + "AttributeValue")
                if isinstance(v, str):
                    av.text = v
                else:
                    av.append(v)
    return a


def coded(tag: str, code: str, system: str, display: str) -> Any:
    """An HL7 v3 CE value (hl7:Role, hl7:PurposeOfUse) as ITI-40 carries it in an AttributeValue."""
    return etree.Element(f"{{{NS_HL7}}}{tag}", nsmap={None: NS_HL7}, code=code, codeSystem=system, displayName=display)


def default_attributes() -> dict[str, list[Any]]:
    return {
        "urn:oasis:names:tc:xspa:1.0:subject:subject-id": ["Walter H. Brattain IV"],
        "urn:oasis:names:tc:xspa:1.0:subject:organization": ["Family Medical Clinic"],
        "urn:oasis:names:tc:xspa:1.0:subject:organization-id": ["urn:oid:1.2.3.4.5"],
        "urn:ihe:iti:xca:2010:homeCommunityId": ["urn:oid:2.16.840.1.113883.3.190"],
        "urn:oasis:names:tc:xacml:2.0:subject:role": [coded("Role", "46255001", "2.16.840.1.113883.6.96", "Pharmacist")],
        "urn:oasis:names:tc:xspa:1.0:subject:purposeofuse": [coded("PurposeOfUse", "TREATMENT", "2.16.840.1.113883.3.18.7.1", "Treatment")],
    }


def security_header(*assertions: Any) -> Any:
    """A ``wsse:Security`` header (mustUnderstand, as XUA consumers send it) holding ``assertions`` in order."""
    sec = etree.Element(f"{{{NS_WSSE}}}Security", nsmap={"wsse": NS_WSSE, "s": "http://www.w3.org/2003/05/soap-envelope"})
    sec.set("{http://www.w3.org/2003/05/soap-envelope}mustUnderstand", "true")
    for a in assertions:
        sec.append(copy.deepcopy(a))
    return sec


def reparse(el: Any) -> Any:
    """``el`` serialised and parsed again, as the server receives it."""
    return etree.fromstring(etree.tostring(el))


def wrap(signed: Any, evil_user: str = "mallory@evil.example", how: str = "sibling-first") -> Any:
    """Signature-wrapping attacks on a validly signed assertion, as a ``wsse:Security`` element.

    * ``sibling-first``: an unsigned assertion for ``evil_user`` before the signed one;
    * ``nested``: the evil assertion carries the signed one's Signature, the signed assertion hidden in its Advice
      (the Reference still resolves to it, so a verifier that re-finds by ID sees a valid signature);
    * ``same-id``: as ``nested``, and the evil assertion takes the signed one's ID;
    * ``moved-signature``: the signed assertion's Signature moved up into the evil assertion, the signed
      assertion (without it) in the Advice: signature and digest verify, but they cover the nested assertion.
    """
    evil = copy.deepcopy(signed)
    evil.set("ID", f"_{uuid.uuid4().hex}")
    sig = evil.find(f"{{{NS_DS}}}Signature")
    evil.find(f"{SAML}Subject/{SAML}NameID").text = evil_user
    if how == "sibling-first":
        evil.remove(sig)
        return security_header(evil, signed)
    if how in ("nested", "same-id"):
        advice = etree.SubElement(evil, SAML + "Advice")
        advice.append(copy.deepcopy(signed))
        if how == "same-id":
            evil.set("ID", signed.get("ID"))
        return security_header(evil)
    if how == "moved-signature":
        inner = copy.deepcopy(signed)
        inner.remove(inner.find(f"{{{NS_DS}}}Signature"))
        etree.SubElement(evil, SAML + "Advice").append(inner)
        return security_header(evil)
    raise ValueError(how)


def unsigned(a: Any) -> Any:
    """``a`` without its (placeholder) Signature: an assertion nobody signed."""
    a = copy.deepcopy(a)
    for sig in a.findall(f"{{{NS_DS}}}Signature"):
        a.remove(sig)
    return a
