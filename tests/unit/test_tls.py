"""``[tls]`` settings, the start-up checks, and the contexts of :mod:`xdsi.security.tls` in real handshakes.

The handshakes run between our server and client contexts over loopback sockets with certificates
made in the test (tests/support/pki.py); each refusal is checked on the *server* side too, so a test
cannot pass because the client alone gave up.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from tests.support.pki import Issued, TestCA, standard_pki
from xdsi.config import ConfigError, Settings, TlsSettings, load_settings
from xdsi.security.tls import FFDHE2048, PROFILES, check_tls, client_context, server_context
from xdsi.startup import StartupError
from xdsi.web.httpd import tls_environ


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    return standard_pki(tmp_path_factory.mktemp("pki"))


def _tls(pki: dict[str, object], **kw: object) -> TlsSettings:
    server: Issued = pki["server"]  # type: ignore[assignment]
    ca: TestCA = pki["ca"]  # type: ignore[assignment]
    return replace(TlsSettings(certificate=server.cert, private_key=server.key, ca_certificates=ca.pem), **kw)


def _settings(tls: TlsSettings) -> Settings:
    return Settings(https_port=8443, tls=tls)  # nothing binds it: check_tls only reads [tls]


# -- configuration ----------------------------------------------------------------------------------------


def test_tls_table_is_parsed_relative_to_the_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "xdsi.toml"
    cfg.write_text(
        '[server]\nhttps_port = 8443\ndicom_tls_port = 2762\n'
        '[tls]\ncertificate = "pki/node.crt"\nprivate_key = "/etc/xdsi/node.key"\nca_certificates = "pki/cas.pem"\n'
        'require_client_certificate = false\nprofile = "bcp195-strict"\ncrl = "pki/cas.crl"\n'
    )
    s = load_settings(cfg, env={})
    assert (s.https_port, s.dicom_tls_port) == (8443, 2762)
    assert s.tls == TlsSettings(tmp_path / "pki/node.crt", Path("/etc/xdsi/node.key"), tmp_path / "pki/cas.pem", False, "bcp195-strict", tmp_path / "pki/cas.crl")


def test_defaults_are_mutual_bcp195_and_no_tls_port() -> None:
    s = load_settings(None, env={})
    assert (s.https_port, s.dicom_tls_port) == (None, None)
    assert s.tls.require_client_certificate is True and s.tls.profile == "bcp195"


def test_tls_ports_from_the_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "xdsi.toml"
    cfg.write_text('[tls]\ncertificate = "a.crt"\nprivate_key = "a.key"\n')
    s = load_settings(cfg, env={"XDSI_HTTPS_PORT": "9443", "XDSI_DICOM_TLS_PORT": "2762"})
    assert (s.https_port, s.dicom_tls_port) == (9443, 2762)


@pytest.mark.parametrize(
    "text,message",
    [
        ('[tls]\nprofile = "tls1.0"\n', "[tls] profile must be one of bcp195, bcp195-strict, legacy, not 'tls1.0'"),
        ("[tls]\nrequire_client_certificate = 1\n", "[tls] require_client_certificate must be true or false, not 1"),
        ("[tls]\ncertificate = 3\n", "[tls] certificate must be the path of a PEM file, not 3"),
        ('[tls]\ncert = "a"\n', "unknown key(s) in [tls]: cert"),
        ("[server]\nhttps_port = 8443\n", "[server] https_port needs [tls] certificate and private_key"),
        ('[server]\ndicom_tls_port = 2762\n[tls]\ncertificate = "a.crt"\n', "[server] dicom_tls_port needs [tls] certificate and private_key"),
        ("[server]\nhttps_port = 70000\n[tls]\ncertificate = 'a'\nprivate_key = 'b'\n", "https_port 70000 out of range"),
    ],
)
def test_bad_tls_settings_name_the_setting(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "xdsi.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, env={})
    assert str(err.value).startswith(message), str(err.value)


# -- start-up checks ----------------------------------------------------------------------------------------


def test_good_material_gives_a_server_context(pki: dict[str, object]) -> None:
    ctx = check_tls(_settings(_tls(pki)))
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2 and ctx.verify_mode == ssl.CERT_REQUIRED


def test_no_tls_port_no_checks() -> None:
    assert check_tls(Settings(tls=TlsSettings(certificate=Path("/nonexistent")))) is None


def test_missing_key_is_one_line(pki: dict[str, object], tmp_path: Path) -> None:
    missing = tmp_path / "gone.key"
    with pytest.raises(StartupError) as err:
        check_tls(_settings(_tls(pki, private_key=missing)))
    assert str(err.value) == f"[tls] private_key {missing}: cannot read {missing}: No such file or directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a mode-000 file")
def test_unreadable_key_is_one_line(pki: dict[str, object], tmp_path: Path) -> None:
    key = tmp_path / "locked.key"
    key.write_bytes(Path(pki["server"].key).read_bytes())  # type: ignore[attr-defined]
    key.chmod(0)
    with pytest.raises(StartupError) as err:
        check_tls(_settings(_tls(pki, private_key=key)))
    assert str(err.value) == f"[tls] private_key {key}: cannot read {key}: Permission denied"


def test_key_not_matching_the_certificate(pki: dict[str, object], tmp_path: Path) -> None:
    other = pki["ca"].other_key(tmp_path / "other.key")  # type: ignore[attr-defined]
    with pytest.raises(StartupError) as err:
        check_tls(_settings(_tls(pki, private_key=other)))
    assert str(err.value) == f"[tls] private_key {other}: does not match the certificate {pki['server'].cert}"  # type: ignore[attr-defined]


def test_expired_certificate(pki: dict[str, object]) -> None:
    old: Issued = pki["expired"]  # type: ignore[assignment]
    with pytest.raises(StartupError) as err:
        check_tls(_settings(_tls(pki, certificate=old.cert, private_key=old.key)))
    assert str(err.value).startswith(f"[tls] certificate {old.cert}: expired on "), str(err.value)


def test_certificate_expiring_later_is_refused_at_that_date(pki: dict[str, object]) -> None:
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=31)
    with pytest.raises(StartupError, match="expired on"):
        check_tls(_settings(_tls(pki)), now=later)


def test_not_a_certificate(pki: dict[str, object], tmp_path: Path) -> None:
    junk = tmp_path / "junk.crt"
    junk.write_text("hello\n")
    with pytest.raises(StartupError) as err:
        check_tls(_settings(_tls(pki, certificate=junk)))
    assert str(err.value).startswith(f"[tls] certificate {junk}: not a PEM certificate")


def test_mutual_authentication_needs_the_trusted_cas(pki: dict[str, object]) -> None:
    with pytest.raises(StartupError) as err:
        check_tls(_settings(_tls(pki, ca_certificates=None)))
    assert str(err.value).startswith("[tls] ca_certificates (not set): require_client_certificate is true")
    assert check_tls(_settings(_tls(pki, ca_certificates=None, require_client_certificate=False))) is not None


# -- handshakes --------------------------------------------------------------------------------------------


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, hostname: str = "127.0.0.1") -> tuple[Exception | None, Exception | None, dict]:
    """One TLS handshake over loopback: (client error, server error, what the server saw of the session)."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen: dict = {}
    errors: list[Exception | None] = [None]

    def serve() -> None:
        conn, _ = listener.accept()
        conn.settimeout(10)
        try:
            with server.wrap_socket(conn, server_side=True) as tls:
                seen.update(version=tls.version(), cipher=tls.cipher()[0], peer=tls.getpeercert(), environ=tls_environ(tls))
                tls.sendall(b"ok")
                tls.recv(1)
        except (ssl.SSLError, OSError) as exc:
            errors[0] = exc

    t = threading.Thread(target=serve)
    t.start()
    client_error: Exception | None = None
    try:
        with socket.create_connection(listener.getsockname(), timeout=10) as raw:
            with client.wrap_socket(raw, server_hostname=hostname) as tls:
                if tls.recv(2) != b"ok":  # TLS 1.3: a refused client certificate shows at the first read
                    raise ssl.SSLError("no data")
                tls.sendall(b"x")
    except (ssl.SSLError, OSError) as exc:
        client_error = exc
    t.join(10)
    listener.close()
    return client_error, errors[0], seen


def _client(pki: dict[str, object], who: str | None = "client", **kw: object) -> ssl.SSLContext:
    if who is None:
        return client_context(_tls(pki, certificate=None, private_key=None, **kw))
    issued: Issued = pki[who]  # type: ignore[assignment]
    return client_context(_tls(pki, certificate=issued.cert, private_key=issued.key, **kw))


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_mutual_handshake_per_profile(pki: dict[str, object], profile: str) -> None:
    c, s, seen = handshake(server_context(_tls(pki, profile=profile)), _client(pki, profile=profile))
    assert (c, s) == (None, None)
    assert seen["version"] in ("TLSv1.2", "TLSv1.3")
    assert dict(x[0] for x in seen["peer"]["subject"])["commonName"] == "modality.example.org"
    assert seen["environ"] == {"SSL_PROTOCOL": seen["version"], "SSL_CIPHER": seen["cipher"], "SSL_CLIENT_VERIFY": "SUCCESS",
                               "SSL_CLIENT_S_DN": "CN=modality.example.org"}


@pytest.mark.parametrize("who", [None, "stranger", "expired"], ids=["no-client-certificate", "unknown-ca", "expired"])
def test_refused_client(pki: dict[str, object], who: str | None) -> None:
    c, s, seen = handshake(server_context(_tls(pki)), _client(pki, who))
    assert c is not None and s is not None and not seen
    reason = str(s).lower()
    expected = {None: "peer did not return a certificate", "stranger": "certificate verify failed", "expired": "certificate verify failed"}[who]
    assert expected in reason, reason


def test_client_refuses_a_server_from_an_unknown_ca(pki: dict[str, object]) -> None:
    stranger: Issued = pki["stranger"]  # type: ignore[assignment]
    c, _s, _ = handshake(server_context(_tls(pki, certificate=stranger.cert, private_key=stranger.key)), _client(pki))
    assert isinstance(c, ssl.SSLCertVerificationError), c


def test_client_checks_the_host_name(pki: dict[str, object]) -> None:
    c, _s, _ = handshake(server_context(_tls(pki)), _client(pki), hostname="elsewhere.example.org")
    assert isinstance(c, ssl.SSLCertVerificationError) and "mismatch" in str(c).lower(), c


def _old_client(pki: dict[str, object], version: ssl.TLSVersion | None, ciphers: str) -> ssl.SSLContext:
    """A client willing to speak what our profiles refuse (OpenSSL security level 0), with a valid certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_ciphers(ciphers + ":@SECLEVEL=0")
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    else:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # TLS 1.3 suites are not chosen by set_ciphers
    issued: Issued = pki["client"]  # type: ignore[assignment]
    ctx.load_cert_chain(str(issued.cert), str(issued.key))
    return ctx


def test_tls_1_0_is_refused_by_the_server(pki: dict[str, object]) -> None:
    c, s, _ = handshake(server_context(_tls(pki)), _old_client(pki, ssl.TLSVersion.TLSv1, "ALL"))
    assert c is not None and s is not None
    assert "unsupported protocol" in str(s).lower() or "wrong version" in str(s).lower(), s


@pytest.mark.parametrize("profile,cipher,accepted", [
    ("bcp195", "AES128-SHA", False),
    ("bcp195-strict", "DHE-RSA-AES128-GCM-SHA256", False),
    ("bcp195", "DHE-RSA-AES128-GCM-SHA256", True),
    ("legacy", "AES128-SHA", True),
])
def test_tls12_cipher_outside_the_profile_is_refused(pki: dict[str, object], profile: str, cipher: str, accepted: bool) -> None:
    c, s, seen = handshake(server_context(_tls(pki, profile=profile)), _old_client(pki, None, cipher))
    if accepted:
        assert (c, s) == (None, None) and seen["cipher"] == cipher
    else:
        assert s is not None and "no shared cipher" in str(s).lower(), s


def test_dh_group_is_rfc7919_ffdhe2048() -> None:
    """The shipped DH parameters are the RFC 7919 A.1 group, recomputed here from its definition."""
    import base64

    one = 1 << (1918 + 64)  # floor(2^1918 * e) with 64 guard bits: sum of 2^n / k!
    total, term, k = 0, one, 0
    while term:
        total, k = total + term, k + 1
        term //= k
    p = 2**2048 - 2**1984 + ((total >> 64) + 560316) * 2**64 - 1
    # PKCS #3 DHParameter ::= SEQUENCE { prime INTEGER, base INTEGER }, read by hand (cryptography deprecates FFDH)
    der = base64.b64decode("".join(FFDHE2048.read_text().splitlines()[1:-1]))
    assert der[:4] == bytes([0x30, 0x82, 0x01, 0x08]) and der[4:8] == bytes([0x02, 0x82, 0x01, 0x01])
    prime = int.from_bytes(der[8:8 + 0x101], "big")
    assert prime == p and der[8 + 0x101:] == bytes([0x02, 0x01, 0x02])


def test_example_documents_every_tls_key(tmp_path: Path) -> None:
    """The commented [tls] lines and TLS ports of xdsi.example.toml, uncommented, are a valid configuration."""
    import re

    text = (Path(__file__).parents[2] / "xdsi.example.toml").read_text()
    tls_part = text.split("\n[tls]\n", 1)[1].split("\n[", 1)[0]
    settings_lines = re.findall(r"^# (\w+ = .+)$", tls_part, re.M)
    assert {line.split(" = ")[0] for line in settings_lines} == {"certificate", "private_key", "ca_certificates", "require_client_certificate", "profile", "crl"}
    ports = re.findall(r"^# ((?:dicom_tls|https)_port = \d+)$", text, re.M)
    cfg = tmp_path / "x.toml"
    cfg.write_text("[server]\n" + "\n".join(ports) + "\n[tls]\n" + "\n".join(settings_lines) + "\n")
    s = load_settings(cfg, env={})
    assert (s.dicom_tls_port, s.https_port) == (2762, 8443)
    assert s.tls == TlsSettings(Path("/etc/xdsi/tls/node.crt"), Path("/etc/xdsi/tls/node.key"), Path("/etc/xdsi/tls/partners.pem"), True, "bcp195",
                                Path("/etc/xdsi/tls/partners.crl"))


def test_peer_tls_flag(tmp_path: Path) -> None:
    cfg = tmp_path / "x.toml"
    cfg.write_text('[peers.PACS]\nhost = "pacs"\nport = 2762\ntls = true\n[tls]\nca_certificates = "cas.pem"\n')
    s = load_settings(cfg, env={})
    assert s.peers["PACS"].tls is True and s.tls.ca_certificates == tmp_path / "cas.pem"
    cfg.write_text('[peers.WS]\nhost = "ws"\nport = 104\n')
    assert load_settings(cfg, env={}).peers["WS"].tls is False
    for text, message in (
        ('[peers.PACS]\nhost = "pacs"\nport = 2762\ntls = "yes"\n', "[peers.PACS] tls must be true or false, not 'yes'"),
        ('[peers.PACS]\nhost = "pacs"\nport = 2762\ntls = true\n', "[peers.PACS] tls = true needs [tls] ca_certificates (to verify the peer)"),
    ):
        cfg.write_text(text)
        with pytest.raises(ConfigError) as err:
            load_settings(cfg, env={})
        assert str(err.value) == message


def test_revoked_client_certificate_is_refused(pki: dict[str, object], tmp_path: Path) -> None:
    ca: TestCA = pki["ca"]  # type: ignore[assignment]
    revoked = ca.issue("revoked.example.org", server=False)
    crl = ca.crl([revoked], tmp_path / "ca.crl")
    assert check_tls(_settings(_tls(pki, crl=crl))) is not None
    server = server_context(_tls(pki, crl=crl))
    c, s, seen = handshake(server, _client(pki, "client"))
    assert (c, s) == (None, None)  # a certificate not on the list still passes
    issued = {"client": revoked}
    c, s, seen = handshake(server, client_context(_tls(pki, certificate=issued["client"].cert, private_key=issued["client"].key)))
    assert c is not None and s is not None and not seen
    assert "certificate revoked" in str(s), s


def test_crl_problems_at_start(pki: dict[str, object], tmp_path: Path) -> None:
    ca: TestCA = pki["ca"]  # type: ignore[assignment]
    old = ca.crl([], tmp_path / "old.crl", days=-1)
    with pytest.raises(StartupError) as err:
        check_tls(_settings(_tls(pki, crl=old)))
    assert str(err.value).startswith(f"[tls] crl {old}: outdated: its next update was due "), str(err.value)
    junk = tmp_path / "junk.crl"
    junk.write_text("not a crl\n")
    with pytest.raises(StartupError, match=r"^\[tls\] crl .*: not a PEM certificate revocation list"):
        check_tls(_settings(_tls(pki, crl=junk)))
