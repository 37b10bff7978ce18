"""TLS for every interface (IHE ITI-19 Authenticate Node): one place that builds the ``ssl.SSLContext`` s.

Why one module: the DICOM TLS port (pynetdicom), the HTTPS port (cheroot) and the outbound
clients must agree on protocol versions, cipher suites and which peers are trusted; a second
hand-built context is where a weaker profile would slip in unnoticed.

Profiles (``[tls] profile``):

* ``bcp195`` (default; the ATNA "BCP195 TLS Secure Node" option): TLS 1.2 or later; for TLS 1.2
  only the AEAD suites with forward secrecy that BCP 195 (RFC 9325 4.2) recommends
  (ECDHE/DHE with AES-GCM); TLS 1.3 suites as OpenSSL offers them (all are AEAD with PFS).
* ``bcp195-strict``: TLS 1.2 or later, ECDHE with AES-GCM only (no finite-field DHE, no CBC).
* ``legacy``: TLS 1.2 or later, the ``bcp195`` suites plus the original ITI-19 suite
  TLS_RSA_WITH_AES_128_CBC_SHA, for peers that still offer only that.  TLS 1.0/1.1 are never
  enabled: RFC 8996 deprecates them and Debian's OpenSSL refuses them anyway.

Start-up checks (:func:`check_tls`) turn an unusable certificate or key into one
:class:`xdsi.startup.StartupError` line naming the ``[tls]`` setting, before anything listens.
"""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path
from typing import TYPE_CHECKING

from xdsi.config import Settings, TlsSettings
from xdsi.startup import StartupError

if TYPE_CHECKING:
    import requests

__all__ = ["PROFILES", "certificate_subject", "check_tls", "client_context", "handshake_failure", "https_session", "server_context"]

# OpenSSL names of the TLS 1.2 suites per profile (TLS 1.3 suites are configured separately by OpenSSL)
_BCP195_STRICT = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384"
_BCP195 = _BCP195_STRICT + ":DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384"
_LEGACY = _BCP195 + ":AES128-SHA"
PROFILES: dict[str, str] = {"bcp195": _BCP195, "bcp195-strict": _BCP195_STRICT, "legacy": _LEGACY}

# RFC 7919 ffdhe2048 (written by ``openssl genpkey -genparam -algorithm DH -pkeyopt group:ffdhe2048``): Python's
# server context has no DH group of its own, so without it the DHE suites BCP 195 lists are never chosen
FFDHE2048 = Path(__file__).with_name("ffdhe2048.pem")


def _base(ctx: ssl.SSLContext, tls: TlsSettings) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(PROFILES[tls.profile])
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    return ctx


def _trust(ctx: ssl.SSLContext, tls: TlsSettings) -> None:
    """The CAs we accept peers from, and their revocation lists (leaf certificates checked against them)."""
    if tls.ca_certificates is not None:
        ctx.load_verify_locations(cafile=str(tls.ca_certificates))
    if tls.crl is not None:
        ctx.load_verify_locations(cafile=str(tls.crl))
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


def server_context(tls: TlsSettings) -> ssl.SSLContext:
    """The context of our TLS listeners: our certificate, and (by default) a client certificate from a CA we trust."""
    if tls.certificate is None or tls.private_key is None:
        raise ValueError("[tls] certificate and private_key are needed to serve TLS")
    ctx = _base(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), tls)
    ctx.load_dh_params(str(FFDHE2048))
    ctx.load_cert_chain(str(tls.certificate), str(tls.private_key))
    _trust(ctx, tls)
    # mutual authentication is ITI-19's point; CERT_OPTIONAL still verifies a certificate that is offered
    if tls.require_client_certificate:
        ctx.verify_mode = ssl.CERT_REQUIRED
    elif tls.ca_certificates is not None:
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def client_context(tls: TlsSettings, *, check_hostname: bool = True) -> ssl.SSLContext:
    """The context of our outbound connections: verify the peer against ``ca_certificates``, present our certificate.

    ``check_hostname`` is for HTTPS (RFC 9110 4.3.4); DICOM peers are configured by address and AE title,
    and a DICOM TLS certificate often names the node, not the address we dial, so callers may turn it off.
    """
    ctx = _base(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), tls)
    ctx.check_hostname = check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    _trust(ctx, tls)
    if tls.certificate is not None and tls.private_key is not None:
        ctx.load_cert_chain(str(tls.certificate), str(tls.private_key))
    return ctx


def https_session(tls: TlsSettings) -> "requests.Session":
    """A requests session for our outbound HTTPS: our certificate, and the peer verified against ``ca_certificates``.

    Why a subclass: requests lets ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` in the environment override a
    session's ``verify``, which would silently trust the system CAs instead of our partners'.  Host names are
    checked (requests always does).  Without ``ca_certificates`` the system CAs are used.
    """
    import requests

    class _Pinned(requests.Session):
        def merge_environment_settings(self, url, proxies, stream, verify, cert):  # type: ignore[no-untyped-def]
            merged = super().merge_environment_settings(url, proxies, stream, verify, cert)
            merged["verify"], merged["cert"] = self.verify, self.cert
            return merged

    session = _Pinned()
    session.verify = str(tls.ca_certificates) if tls.ca_certificates is not None else True
    if tls.certificate is not None and tls.private_key is not None:
        session.cert = (str(tls.certificate), str(tls.private_key))
    return session


def handshake_failure(exc: BaseException) -> str:
    """Why a handshake failed, for the log (and the Security Alert audit): OpenSSL's reason and, for a
    refused certificate, the verification message ("certificate has expired", "unable to get local issuer ...")."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"{exc.reason}: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    return str(exc) or type(exc).__name__


def _read(setting: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise StartupError(setting, path, None, f"cannot read {path}: {exc.strerror or exc}") from None


def check_tls(settings: Settings, now: dt.datetime | None = None) -> ssl.SSLContext | None:
    """Prove the ``[tls]`` material usable and return the server context; ``None`` when no TLS port is configured.

    Why before anything listens: a listener that starts and then fails every handshake looks
    like a network problem to the partner; a refusal to start names the file to fix.
    """
    if settings.https_port is None and settings.dicom_tls_port is None and not any(p.dicom_tls_port for p in settings.partitions.values()):
        return None
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    tls = settings.tls
    if tls.certificate is None:
        raise StartupError("[tls] certificate", "(not set)", None, "a TLS port is configured but no certificate")
    if tls.private_key is None:
        raise StartupError("[tls] private_key", "(not set)", None, "a TLS port is configured but no private key")
    cert_pem = _read("[tls] certificate", tls.certificate)
    key_pem = _read("[tls] private_key", tls.private_key)
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise StartupError("[tls] certificate", tls.certificate, None, f"not a PEM certificate: {exc}") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise StartupError("[tls] private_key", tls.private_key, None, "the key is encrypted; give an unencrypted PEM key readable only by xdsi") from None
    except ValueError as exc:
        raise StartupError("[tls] private_key", tls.private_key, None, f"not a PEM private key: {exc}") from None
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, pub) != cert.public_key().public_bytes(der, pub):
        raise StartupError("[tls] private_key", tls.private_key, None, f"does not match the certificate {tls.certificate}")
    now = now or dt.datetime.now(dt.timezone.utc)
    if cert.not_valid_after_utc < now:
        raise StartupError("[tls] certificate", tls.certificate, None, f"expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC")
    if cert.not_valid_before_utc > now:
        raise StartupError("[tls] certificate", tls.certificate, None, f"not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC")
    if tls.ca_certificates is not None:
        try:
            cas = x509.load_pem_x509_certificates(_read("[tls] ca_certificates", tls.ca_certificates))
        except ValueError as exc:
            raise StartupError("[tls] ca_certificates", tls.ca_certificates, None, f"no PEM certificates: {exc}") from None
        if not cas:
            raise StartupError("[tls] ca_certificates", tls.ca_certificates, None, "holds no certificate")
    elif tls.require_client_certificate:
        raise StartupError("[tls] ca_certificates", "(not set)", None, "require_client_certificate is true, so the CAs of the peers we trust are needed")
    if tls.crl is not None:
        crl_pem = _read("[tls] crl", tls.crl)
        try:
            crl = x509.load_pem_x509_crl(crl_pem)
        except ValueError as exc:
            raise StartupError("[tls] crl", tls.crl, None, f"not a PEM certificate revocation list: {exc}") from None
        if crl.next_update_utc is not None and crl.next_update_utc < now:
            # OpenSSL refuses every peer of that CA against an outdated CRL: say so at start, not per handshake
            raise StartupError("[tls] crl", tls.crl, None, f"outdated: its next update was due {crl.next_update_utc:%Y-%m-%d %H:%M:%S} UTC")
    try:
        return server_context(tls)
    except ssl.SSLError as exc:
        raise StartupError("[tls] certificate", tls.certificate, None, f"OpenSSL refused it: {exc.reason or exc}") from None


def certificate_subject(sock: object) -> str | None:
    """RFC 4514 subject of the peer certificate on a TLS socket (verified by the handshake), else None."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        der = sock.getpeercert(binary_form=True)
    except (ValueError, OSError, AttributeError):  # handshake not done, or closed (ssl then has no _sslobj)
        return None
    if not der:
        return None
    from cryptography import x509

    try:
        return x509.load_der_x509_certificate(der).subject.rfc4514_string()
    except ValueError:  # pragma: no cover - OpenSSL accepted it, so it parses
        return None
