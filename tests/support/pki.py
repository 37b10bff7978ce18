"""Certificates made in the test (the ``cryptography`` package): a CA, node certificates, the bad ones.

Why made here and not checked in: a checked-in certificate expires and the suite turns red on a
date; every run makes a fresh CA, so the only expired certificate is the one a test asks for.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, written as PEM files."""

    cert: Path
    key: Path


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write_key(key: rsa.RSAPrivateKey, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    path.chmod(0o600)
    return path


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def standard_pki(directory: Path) -> dict[str, object]:
    """The usual cast: our CA, a server and a client it signed, an expired one, and a stranger's from another CA."""
    ca, stranger = TestCA(directory / "ca"), TestCA(directory / "other", "unknown CA")
    return {
        "ca": ca,
        "server": ca.issue("127.0.0.1"),
        "client": ca.issue("modality.example.org", server=False),
        "expired": ca.issue("old.example.org", expired=True),
        "stranger": stranger.issue("stranger.example.org"),
        "dir": directory,
    }


class TestCA:
    """A self-signed CA in ``directory``; :meth:`issue` writes leaf certificates it signed."""

    __test__ = False  # not a pytest class

    def __init__(self, directory: Path, name: str = "xdsi test CA") -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.key = _key()
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.timezone.utc)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = directory / f"{name.replace(' ', '-')}.pem"
        self.pem.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, cn: str, *, days: float = 30, expired: bool = False, server: bool = True, client: bool = True, also: tuple[str, ...] = ()) -> Issued:
        """A leaf for ``cn`` (also its DNS/IP subjectAltName, and ``also``'s); ``expired``: validity ended yesterday."""
        key = _key()
        now = dt.datetime.now(dt.timezone.utc)
        start, end = (now - dt.timedelta(days=10), now - dt.timedelta(days=1)) if expired else (now - dt.timedelta(hours=1), now + dt.timedelta(days=days))
        sans = [_san(name) for name in (cn, *also)]
        usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        stem = f"{cn}{'-expired' if expired else ''}-{cert.serial_number % 100000}"
        cert_path = self.dir / f"{stem}.crt"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return Issued(cert_path, _write_key(key, self.dir / f"{stem}.key"))

    def crl(self, revoked: list[Issued], path: Path, *, days: float = 7) -> Path:
        """A PEM CRL of this CA revoking ``revoked``, next update in ``days`` (negative: already outdated)."""
        now = dt.datetime.now(dt.timezone.utc)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.name)
            .last_update(now - dt.timedelta(days=1) + (dt.timedelta(days=days) if days < 0 else dt.timedelta()))
            .next_update(now + dt.timedelta(days=days))
        )
        for issued in revoked:
            serial = x509.load_pem_x509_certificate(issued.cert.read_bytes()).serial_number
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now - dt.timedelta(hours=1)).build()
            )
        path.write_bytes(builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        return path

    def other_key(self, path: Path) -> Path:
        """A fresh key that matches no certificate (for the key-mismatch check)."""
        return _write_key(_key(), path)
