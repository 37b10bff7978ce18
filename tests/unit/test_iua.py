"""IUA bearer tokens (PyJWT), the argon2 users file, [http] auth / [iua] settings and the start-up refusal.

Keys, JWKS and tokens are made here with ``cryptography`` and PyJWT; the JWKS is read
from a file and from a real HTTP server on loopback (key rotation, refetch limit).
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from werkzeug.test import Client

from tests.support.jwks import JwksServer
from xdsi.config import AuthSettings, ConfigError, IuaSettings, Settings, load_settings
from xdsi.security.iua import JwksCache, TokenError, TokenValidator
from xdsi.security.principal import Principal
from xdsi.security.users import BasicAuthenticator, UsersError, UsersFile, add_user, read_users, remove_user
from xdsi.startup import StartupError
from xdsi.config import is_loopback_host as is_loopback
from xdsi.web.auth import HttpAuth, check_startup, protect, required_right

ISS = "https://as.example.org/oauth2"
AUD = "https://imaging.example.org/"


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {
        "rsa1": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "rsa2": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ec": ec.generate_private_key(ec.SECP256R1()),
    }


def jwk_of(private: Any, kid: str, alg: str | None = "RS256") -> dict[str, Any]:
    pub = private.public_key()
    jwk = (RSAAlgorithm.to_jwk(pub, as_dict=True) if isinstance(pub, rsa.RSAPublicKey) else ECAlgorithm.to_jwk(pub, as_dict=True))
    jwk.update({"kid": kid, "use": "sig"})
    if alg:
        jwk["alg"] = alg
    return jwk


def token(private: Any, kid: str | None = "k1", alg: str = "RS256", **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": ISS, "aud": AUD, "sub": "dr.who", "exp": now + 300, "iat": now, "scope": "read"}
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(body, private, algorithm=alg, headers={"kid": kid} if kid else None)


def write_jwks(path: Path, *jwks: dict[str, Any]) -> Path:
    path.write_text(json.dumps({"keys": list(jwks)}))
    return path


def validator(source: Any, **kw: Any) -> TokenValidator:
    cache = source if isinstance(source, JwksCache) else JwksCache(source)
    return TokenValidator(cache, issuer=ISS, audience=(AUD,), **kw)


def refused(v: TokenValidator, tok: str) -> str:
    with pytest.raises(TokenError) as info:
        v.validate(tok)
    assert info.value.error == "invalid_token"
    return info.value.description


def test_valid_token_gives_subject_rights_and_iua_attributes(keys: dict[str, Any], tmp_path: Path) -> None:
    v = validator(write_jwks(tmp_path / "jwks.json", jwk_of(keys["rsa1"], "k1")))
    ext = {"ihe_iua": {"subject_name": "Dr Who", "subject_organization": "Gallifrey Hospital", "purpose_of_use": {"code": "TREAT"}}}
    p = v.validate(token(keys["rsa1"], scope="read write", client_id="viewer", jti="t-1", extensions=ext))
    assert p == Principal("dr.who", frozenset({"read", "write"}), "bearer", p.attributes)
    assert p.attributes["client_id"] == "viewer" and p.attributes["jti"] == "t-1" and p.attributes["iss"] == ISS
    assert p.attributes["subject_name"] == "Dr Who" and p.attributes["subject_organization"] == "Gallifrey Hospital"
    assert json.loads(p.attributes["purpose_of_use"]) == {"code": "TREAT"}
    # "scp" as a list (some servers), and a scope we do not map grants nothing
    assert v.validate(token(keys["rsa1"], scope=None, scp=["admin", "openid"])).rights == frozenset({"admin"})
    assert v.validate(token(keys["rsa1"], scope="openid profile")).rights == frozenset()
    # no sub: the client is the subject
    assert v.validate(token(keys["rsa1"], sub=None, client_id="svc")).subject == "svc"
    assert "subject" in refused(v, token(keys["rsa1"], sub=None))


def test_every_claim_check(keys: dict[str, Any], tmp_path: Path) -> None:
    v = validator(write_jwks(tmp_path / "jwks.json", jwk_of(keys["rsa1"], "k1")), clock_skew_seconds=30)
    now = int(time.time())
    assert "signature" in refused(v, token(keys["rsa2"], kid="k1"))  # right kid, wrong key
    assert "aud" in refused(v, token(keys["rsa1"], aud="https://other.example.org/"))
    assert "iss" in refused(v, token(keys["rsa1"], iss="https://evil.example.org/"))
    assert "expired" in refused(v, token(keys["rsa1"], exp=now - 60))
    v.validate(token(keys["rsa1"], exp=now - 10))  # within the clock skew
    assert "not valid yet" in refused(v, token(keys["rsa1"], nbf=now + 120))
    v.validate(token(keys["rsa1"], nbf=now + 10))
    assert "'exp'" in refused(v, token(keys["rsa1"], exp=None))
    assert "'aud'" in refused(v, token(keys["rsa1"], aud=None))
    assert "not a JWT" in refused(v, "abc.def")
    tampered = token(keys["rsa1"]).split(".")
    tampered[1] = base64.urlsafe_b64encode(json.dumps({"iss": ISS, "aud": AUD, "sub": "root", "exp": now + 300, "scope": "admin"}).encode()).decode().rstrip("=")
    assert "signature" in refused(v, ".".join(tampered))
    # audience given as a list in the token: one of them must be ours
    assert v.validate(token(keys["rsa1"], aud=["x", AUD])).subject == "dr.who"


def test_algorithm_confusion_and_none_refused(keys: dict[str, Any], tmp_path: Path) -> None:
    v = validator(write_jwks(tmp_path / "jwks.json", jwk_of(keys["rsa1"], "k1")))
    unsigned = jwt.encode({"iss": ISS, "aud": AUD, "sub": "x", "exp": int(time.time()) + 60}, None, algorithm="none", headers={"kid": "k1"})
    assert "'none' is not accepted" in refused(v, unsigned)
    # HS256 keyed with the public key's PEM: the classic RS/HS confusion
    pem = keys["rsa1"].public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    import hmac as _hmac
    import hashlib

    def b64(b: bytes) -> str:
        return base64.urlsafe_b64encode(b).decode().rstrip("=")

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode())
    body = b64(json.dumps({"iss": ISS, "aud": AUD, "sub": "x", "exp": int(time.time()) + 60, "scope": "admin"}).encode())
    sig = b64(_hmac.new(pem, f"{head}.{body}".encode(), hashlib.sha256).digest())
    assert "'HS256' is not accepted" in refused(v, f"{head}.{body}.{sig}")
    # a JWK bound to RS256 does not verify an RS512 token, even by the same key
    assert "algorithm" in refused(v, token(keys["rsa1"], alg="RS512"))
    with pytest.raises(ValueError):
        validator(tmp_path / "jwks.json", algorithms=("RS256", "HS256"))


def test_jwk_without_alg_takes_the_token_alg_of_its_own_key_type(keys: dict[str, Any], tmp_path: Path) -> None:
    src = write_jwks(tmp_path / "jwks.json", jwk_of(keys["rsa1"], "r", alg=None), jwk_of(keys["ec"], "e", alg=None))
    v = validator(src)
    assert v.validate(token(keys["rsa1"], kid="r", alg="PS256")).subject == "dr.who"
    assert v.validate(token(keys["ec"], kid="e", alg="ES256")).subject == "dr.who"
    assert "cannot verify" in refused(v, token(keys["ec"], kid="r", alg="ES256"))  # an EC token against the RSA JWK
    assert "more than one" in refused(v, token(keys["rsa1"], kid=None))
    # one key: a token without kid may use it
    v1 = validator(write_jwks(tmp_path / "one.json", jwk_of(keys["ec"], "e", alg="ES256")))
    assert v1.validate(token(keys["ec"], kid=None, alg="ES256")).subject == "dr.who"


def test_jwks_file_rotation_refetch_at_most_every_n_seconds(keys: dict[str, Any], tmp_path: Path) -> None:
    src = write_jwks(tmp_path / "jwks.json", jwk_of(keys["rsa1"], "k1"))
    now = [1000.0]
    cache = JwksCache(src, refresh_seconds=60, max_age_seconds=3600, clock=lambda: now[0])
    cache.load()
    v = validator(cache)
    new = token(keys["rsa2"], kid="k2")
    assert "does not hold" in refused(v, new)  # unknown kid, but load() was just now: no refetch yet
    assert cache.fetches == 1
    write_jwks(src, jwk_of(keys["rsa1"], "k1"), jwk_of(keys["rsa2"], "k2"))  # the AS rotates in a new key
    for _ in range(20):  # a burst of unknown kids costs nothing within the interval
        refused(v, token(keys["rsa2"], kid="made-up"))
    assert cache.fetches == 1
    now[0] += 61
    assert v.validate(new).subject == "dr.who"
    assert cache.fetches == 2
    # the old key is retired; until max age, a token by it still verifies from cache ...
    write_jwks(src, jwk_of(keys["rsa2"], "k2"))
    assert v.validate(token(keys["rsa1"], kid="k1")).subject == "dr.who"
    # ... after max age the JWKS is read again and the retired key refused
    now[0] += 3601
    assert "does not hold" in refused(v, token(keys["rsa1"], kid="k1"))
    assert cache.fetches == 3
    # an unreadable JWKS later keeps the keys we have
    src.write_text("not json")
    now[0] += 3601
    assert v.validate(new).subject == "dr.who"


@pytest.fixture(scope="module")
def jwks_server() -> Iterator[JwksServer]:
    srv = JwksServer()
    try:
        yield srv
    finally:
        srv.stop()


def test_jwks_url_fetched_cached_and_refetched_on_unknown_kid(keys: dict[str, Any], jwks_server: Any) -> None:
    jwks_server.keys = [jwk_of(keys["rsa1"], "k1")]
    jwks_server.hits = 0
    now = [0.0]
    cache = JwksCache(jwks_server.url("/jwks"), refresh_seconds=5, clock=lambda: now[0])
    v = validator(cache)
    for _ in range(5):
        assert v.validate(token(keys["rsa1"])).subject == "dr.who"
    assert jwks_server.hits == 1  # fetched on first use, then cached
    jwks_server.keys = [jwk_of(keys["rsa1"], "k1"), jwk_of(keys["rsa2"], "k2")]
    now[0] += 6
    assert v.validate(token(keys["rsa2"], kid="k2")).subject == "dr.who"  # rotation honoured
    assert jwks_server.hits == 2
    for _ in range(10):
        refused(v, token(keys["rsa2"], kid="nope"))
    assert jwks_server.hits == 2  # within refresh_seconds of the last fetch: no more requests


def test_jwks_url_unreachable_refuses_tokens(keys: dict[str, Any]) -> None:
    from tests.support.server import free_port

    now = [0.0]
    cache = JwksCache(f"http://127.0.0.1:{free_port()}/jwks", refresh_seconds=1, timeout=2, clock=lambda: now[0])
    v = validator(cache)
    assert "does not hold" in refused(v, token(keys["rsa1"]))  # no keys at all: refused, not an exception


# -- users file ----------------------------------------------------------------------------------


def test_users_file_add_verify_remove(tmp_path: Path) -> None:
    path = tmp_path / "users"
    assert add_user(path, "alice", "s3cret pass", frozenset({"read"}))
    assert add_user(path, "bob", "hunter2", frozenset({"read", "write", "admin"}))
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    text = path.read_text()
    assert "s3cret" not in text and "hunter2" not in text and "$argon2id$" in text
    users = read_users(path)
    assert users["alice"].rights == frozenset({"read"}) and users["bob"].rights == frozenset({"read", "write", "admin"})
    auth = BasicAuthenticator(UsersFile(path))
    assert auth.authenticate("alice", "s3cret pass") == Principal("alice", frozenset({"read"}), "basic", {})
    assert auth.authenticate("alice", "s3cret pass") is not None  # cached
    assert auth.authenticate("alice", "wrong") is None
    assert auth.authenticate("carol", "s3cret pass") is None
    assert auth.authenticate("bad:name", "x") is None
    # a new password replaces the old one at once in a running server (the cached success is bound to the old hash)
    time.sleep(0.01)
    assert not add_user(path, "alice", "new pass", frozenset({"read", "write"}))
    assert auth.authenticate("alice", "s3cret pass") is None
    assert auth.authenticate("alice", "new pass").rights == frozenset({"read", "write"})  # type: ignore[union-attr]
    assert remove_user(path, "alice") and not remove_user(path, "alice")
    assert auth.authenticate("alice", "new pass") is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("alice:plain:read\n", "line 1: the hash is not an argon2 hash"),
        ("# c\nalice:$argon2id$x:read,fly\n", "line 2: rights must be"),
        ("alice:$argon2id$x\n", "line 1: expected NAME:HASH:RIGHTS"),
        ("a:$argon2id$x:read\na:$argon2id$y:read\n", "line 2: user 'a' is listed twice"),
        ("bad name:$argon2id$x:read\n", "line 1: user name"),
    ],
)
def test_users_file_errors_name_the_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "users"
    path.write_text(content)
    with pytest.raises(UsersError, match=message):
        read_users(path)


def test_users_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import io

    from xdsi import cli

    data = tmp_path / "data"
    monkeypatch.setattr("sys.stdin", io.StringIO("pw one\n"))
    assert cli.main(["users", "add", "alice", "--rights", "read,write", "--password-stdin", "--data-dir", str(data)]) == 0
    assert "added alice (read,write)" in capsys.readouterr().out
    assert BasicAuthenticator(UsersFile(data / "users")).authenticate("alice", "pw one") is not None
    assert cli.main(["users", "--data-dir", str(data), "list"]) == 0
    assert capsys.readouterr().out == "alice\tread,write\n"
    assert cli.main(["users", "add", "bob", "--rights", "read,root", "--password-stdin", "--data-dir", str(data)]) == 2
    assert "rights must be a comma list of read, write, admin, not 'read,root'" in capsys.readouterr().err
    assert cli.main(["users", "remove", "alice", "--data-dir", str(data)]) == 0
    assert cli.main(["users", "remove", "alice", "--data-dir", str(data)]) == 1


# -- settings --------------------------------------------------------------------------------------


def _toml(tmp: Path, text: str) -> Path:
    p = tmp / "xdsi.toml"
    p.write_text(text)
    return p


def test_auth_settings_parse(tmp_path: Path) -> None:
    s = load_settings(_toml(tmp_path, f"""
[http]
auth = "bearer"
[iua]
issuer = "{ISS}"
audience = ["{AUD}", "xdsi"]
jwks_file = "keys/jwks.json"
clock_skew_seconds = 5
jwks_refresh_seconds = 10
algorithms = ["ES256"]
[iua.scopes]
"user/*.read" = "read"
"system/*.*" = ["read", "write"]
"""), env={})
    assert s.auth.mode == "bearer" and s.auth.iua.audience == (AUD, "xdsi")
    assert s.auth.iua.jwks_file == tmp_path / "keys/jwks.json"
    assert (s.auth.iua.clock_skew_seconds, s.auth.iua.jwks_refresh_seconds, s.auth.iua.algorithms) == (5.0, 10.0, ("ES256",))
    assert s.auth.iua.scopes == {"user/*.read": ("read",), "system/*.*": ("read", "write")}
    b = load_settings(_toml(tmp_path, '[http]\nauth = "basic"\nusers_file = "u.txt"\nallow_anonymous = true\n'), env={})
    assert (b.auth.mode, b.auth.users_file, b.auth.allow_anonymous) == ("basic", tmp_path / "u.txt", True)
    assert load_settings(env={}).auth == AuthSettings()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[http]\nauth = "oauth"\n', "[http] auth must be one of none, bearer, basic, not 'oauth'"),
        ('[http]\nauth = "bearer"\n', "[http] auth = \"bearer\" needs [iua] issuer and audience"),
        (f'[http]\nauth = "bearer"\n[iua]\nissuer = "{ISS}"\naudience = "x"\n', "exactly one of [iua] jwks_url or jwks_file"),
        (f'[http]\nauth = "bearer"\n[iua]\nissuer = "{ISS}"\naudience = "x"\njwks_file = "a"\njwks_url = "https://a/b"\n', "exactly one of"),
        ('[iua]\nalgorithms = ["RS256", "HS256"]\n', "[iua] algorithms must be a list of"),
        ('[iua]\njwks_url = "ftp://x/y"\n', "[iua] jwks_url 'ftp://x/y' must be an http:// or https:// URL"),
        ('[iua]\nclock_skew_seconds = -1\n', "[iua] clock_skew_seconds must be a number of seconds from 0 to 600"),
        ('[iua.scopes]\nread = "everything"\n', "[iua.scopes] 'read' must name rights among read, write, admin"),
        ('[iua]\nkeys = 1\n', "unknown key(s) in [iua]: keys"),
        ('[http]\nallow_anonymous = "yes"\n', "[http] allow_anonymous must be true or false"),
    ],
)
def test_auth_settings_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(_toml(tmp_path, text), env={})
    assert message in str(info.value)


def test_is_loopback() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.9.9.9", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "", "10.0.0.7", "imaging.example.org"))


def test_required_rights() -> None:
    table = {
        ("GET", "/dicomweb/studies"): "read",
        ("GET", "/dicomweb/RADIO/studies/1.2/series/3.4/instances/5.6/frames/1"): "read",
        ("POST", "/dicomweb/studies"): "write",
        ("POST", "/dicomweb/RADIO/studies/1.2"): "write",
        ("DELETE", "/dicomweb/studies/1.2"): "admin",
        ("GET", "/wado"): "read",
        ("GET", "/status"): "admin",
        ("POST", "/xdsi/ImagingDocumentSource"): "read",
        ("GET", "/xdsi/ImagingDocumentSource"): "read",  # ?wsdl
        ("POST", "/xdsi/DocumentRepository"): "read",
        ("GET", "/"): None,
        ("GET", "/statusx"): None,
    }
    assert {k: required_right(*k) for k in table} == table


def test_start_refused_on_network_without_auth(tmp_path: Path) -> None:
    for host in ("0.0.0.0", "::", "10.1.2.3"):
        with pytest.raises(StartupError) as info:
            check_startup(SimpleNamespace(settings=Settings(data_dir=tmp_path, host=host)))
        assert str(info.value).startswith(f"[server] host {host} (--host): anyone who reaches this address")
        assert "allow_anonymous = true" in str(info.value)
    with pytest.raises(StartupError):  # HTTPS only, plain HTTP off: still anyone with a certificate of the CA
        check_startup(SimpleNamespace(settings=replace(Settings(data_dir=tmp_path, host="0.0.0.0", http_port=0), https_port=8443)))
    for s in (
        Settings(data_dir=tmp_path),  # loopback
        Settings(data_dir=tmp_path, host="0.0.0.0", auth=AuthSettings(allow_anonymous=True)),
        Settings(data_dir=tmp_path, host="0.0.0.0", http_port=0),  # no HTTP listener at all (DICOM only)
    ):
        holder = SimpleNamespace(settings=s)
        assert check_startup(holder).mode == "none" and holder.http_auth.mode == "none"  # type: ignore[attr-defined]
    # basic with no users file: one line naming the setting and what to do
    with pytest.raises(StartupError, match=r"\[http\] users_file .*/users: no users file: add users with `xdsi users add"):
        check_startup(SimpleNamespace(settings=Settings(data_dir=tmp_path, host="0.0.0.0", auth=AuthSettings(mode="basic"))))
    (tmp_path / "users").write_text("alice:nohash:read\n")
    with pytest.raises(StartupError, match=r"line 1: the hash is not an argon2 hash"):
        check_startup(SimpleNamespace(settings=Settings(data_dir=tmp_path, auth=AuthSettings(mode="basic"))))
    bearer = AuthSettings(mode="bearer", iua=IuaSettings(issuer=ISS, audience=(AUD,), jwks_file=tmp_path / "missing.json"))
    with pytest.raises(StartupError, match=r"\[iua\] jwks_file .*missing.json: not found"):
        check_startup(SimpleNamespace(settings=Settings(data_dir=tmp_path, auth=bearer)))
    (tmp_path / "bad.json").write_text('{"keys": [{"kty": "oct", "k": "AAAA"}]}')
    with pytest.raises(StartupError, match=r"no signature keys"):
        check_startup(SimpleNamespace(settings=Settings(data_dir=tmp_path, auth=replace(bearer, iua=replace(bearer.iua, jwks_file=tmp_path / "bad.json")))))


# -- the middleware, in process (the real server is tests/integration/test_http_auth.py) ------------


def _app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    p = environ["xdsi.principal"]
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"{p.subject} {p.via} {','.join(sorted(p.rights))}".encode()]


def test_middleware_bearer_answers(keys: dict[str, Any], tmp_path: Path) -> None:
    v = validator(write_jwks(tmp_path / "jwks.json", jwk_of(keys["rsa1"], "k1")))
    holder = SimpleNamespace(settings=Settings(data_dir=tmp_path, cors_origins=("https://viewer.example.org",)), http_auth=HttpAuth("bearer", tokens=v), audit=None)
    c = Client(protect(_app, holder))
    r = c.get("/dicomweb/studies")
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == 'Bearer realm="xdsi"'
    r = c.get("/dicomweb/studies", headers={"Authorization": "Bearer a b"})
    assert r.status_code == 400 and 'error="invalid_request"' in r.headers["WWW-Authenticate"]
    r = c.get("/dicomweb/studies", headers={"Authorization": f"Bearer {token(keys['rsa2'])}", "Origin": "https://viewer.example.org"})
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"] == 'Bearer realm="xdsi", error="invalid_token", error_description="the token signature does not verify"'
    assert r.headers["Access-Control-Allow-Origin"] == "https://viewer.example.org" and "WWW-Authenticate" in r.headers["Access-Control-Expose-Headers"]
    r = c.post("/dicomweb/studies", headers={"Authorization": f"Bearer {token(keys['rsa1'])}"})
    assert r.status_code == 403
    assert r.headers["WWW-Authenticate"] == 'Bearer realm="xdsi", error="insufficient_scope", error_description="this request needs the write right", scope="write"'
    custom = SimpleNamespace(settings=holder.settings, audit=None,
                             http_auth=HttpAuth("bearer", tokens=validator(tmp_path / "jwks.json", scopes={"user/*.write": ("write",), "system/*.*": ("read", "write")})))
    r = Client(protect(_app, custom)).post("/dicomweb/studies", headers={"Authorization": f"Bearer {token(keys['rsa1'], scope='user/*.read')}"})
    assert r.status_code == 403 and r.headers["WWW-Authenticate"].endswith('scope="system/*.* user/*.write"')  # the scopes that would do
    r = c.get("/dicomweb/studies", headers={"Authorization": f"bearer {token(keys['rsa1'])}"})  # the scheme is case-insensitive
    assert r.status_code == 200 and r.get_data(as_text=True) == "dr.who bearer read"
    # CORS preflight passes without credentials
    calls = []

    def preflight(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        calls.append(environ)
        start_response("204 No Content", [])
        return [b""]

    pre = Client(protect(preflight, holder))
    assert pre.options("/dicomweb/studies", headers={"Origin": "https://viewer.example.org", "Access-Control-Request-Method": "GET"}).status_code == 204
    assert len(calls) == 1
    # SOAP: a SOAP 1.2 fault with the WS-Security subcode, status 401
    r = c.post("/xdsi/ImagingDocumentSource", data=b"<x/>", headers={"Content-Type": "application/soap+xml"})
    assert r.status_code == 401 and r.headers["Content-Type"].startswith("application/soap+xml")
    from lxml import etree

    fault = etree.fromstring(r.data)
    ns = {"s": "http://www.w3.org/2003/05/soap-envelope"}
    assert fault.findtext(".//s:Code/s:Value", namespaces=ns) == "s:Sender"
    sub = fault.find(".//s:Code/s:Subcode/s:Value", namespaces=ns)
    prefix, local = sub.text.split(":")
    assert (sub.nsmap[prefix], local) == ("http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd", "FailedAuthentication")


def test_middleware_basic_and_none(tmp_path: Path) -> None:
    add_user(tmp_path / "users", "alice", "pw", frozenset({"read"}))
    holder = SimpleNamespace(settings=Settings(data_dir=tmp_path), http_auth=HttpAuth("basic", users=BasicAuthenticator(UsersFile(tmp_path / "users"))), audit=None)
    c = Client(protect(_app, holder))

    def basic(user: str, pw: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()}

    r = c.get("/wado")
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == 'Basic realm="xdsi", charset="UTF-8"'
    assert c.get("/wado", headers=basic("alice", "nope")).status_code == 401
    assert c.get("/wado", headers={"Authorization": "Basic !!!"}).status_code == 400
    assert c.get("/wado", headers=basic("alice", "pw")).get_data(as_text=True) == "alice basic read"
    r = c.get("/status", headers=basic("alice", "pw"))
    assert r.status_code == 403 and "WWW-Authenticate" not in r.headers and "needs 'admin'" in r.get_data(as_text=True)
    anon = Client(protect(_app, SimpleNamespace(settings=Settings(data_dir=tmp_path), audit=None)))
    assert anon.get("/status", environ_base={"REMOTE_ADDR": "127.0.0.5"}).get_data(as_text=True) == "127.0.0.5 anonymous admin,read,write"
    tls = anon.get("/status", environ_base={"REMOTE_ADDR": "127.0.0.5", "SSL_CLIENT_S_DN": "CN=ws1"})
    assert tls.get_data(as_text=True) == "CN=ws1 tls admin,read,write"


def test_the_example_configuration_documents_http_auth_and_iua_with_defaults() -> None:
    example = Path(__file__).resolve().parents[2] / "xdsi.example.toml"
    assert load_settings(example, env={}).auth == AuthSettings()
    text = example.read_text()
    for key in ("auth", "allow_anonymous", "users_file", "soap_auth", *(k for k in IuaSettings.__dataclass_fields__ if k != "scopes")):
        assert f"\n{key} = " in text or f"\n# {key} = " in text, key
    assert "\n[iua.scopes]\n" in text


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")  # the test's own signing with the weak key
def test_a_short_rsa_key_is_refused(tmp_path: Path) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    v = validator(write_jwks(tmp_path / "jwks.json", jwk_of(weak, "weak")))
    assert "2048" in refused(v, token(weak, kid="weak"))  # PyJWT's minimum key length, enforced (RFC 7518 3.3)


def test_soap_left_to_xua_only_when_xua_is_required(tmp_path: Path) -> None:
    from xdsi.config import XuaSettings

    add_user(tmp_path / "users", "alice", "pw", frozenset({"read"}))
    basic = AuthSettings(mode="basic", soap_auth="xua")
    with pytest.raises(StartupError, match=r'\[http\] soap_auth "xua": leaves the SOAP endpoints to XUA: needs \[xua\] required = true'):
        check_startup(SimpleNamespace(settings=Settings(data_dir=tmp_path, auth=basic)))
    with pytest.raises(StartupError):
        check_startup(SimpleNamespace(settings=Settings(data_dir=tmp_path, auth=basic, xua=XuaSettings(required=False, trusted_issuers=(tmp_path / "idp.pem",)))))
    # an in-process app built without check_startup does not skip the check either
    loose = SimpleNamespace(settings=Settings(data_dir=tmp_path, auth=basic), audit=None)
    assert Client(protect(_app, loose)).post("/xdsi/ImagingDocumentSource", data=b"<x/>").status_code == 401
    holder = SimpleNamespace(settings=Settings(data_dir=tmp_path, auth=basic, xua=XuaSettings(required=True, trusted_issuers=(tmp_path / "idp.pem",))), audit=None)
    check_startup(holder)
    seen: list[dict[str, Any]] = []

    def soap(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append(environ)
        start_response("200 OK", [])
        return [b""]

    c = Client(protect(soap, holder))
    assert c.post("/xdsi/ImagingDocumentSource", data=b"<x/>").status_code == 200  # XUA's to refuse, not ours
    assert c.get("/xdsi/DocumentRepository?wsdl").status_code == 200
    assert "xdsi.principal" not in seen[0]
    assert c.get("/dicomweb/studies").status_code == 401  # everything else still needs the HTTP credentials
    assert c.get("/status").status_code == 401
    with pytest.raises(ConfigError, match="soap_auth must be one of http, xua"):
        load_settings(_toml(tmp_path, '[http]\nsoap_auth = "none"\n'), env={})
