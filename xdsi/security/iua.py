"""IUA Resource Server (IHE ITI-72 Incorporate Access Token): JWT bearer tokens checked with PyJWT.

An IUA Authorization Server issues a signed JWT access token (ITI-71); we, the
Resource Server, accept a request when its token:

* is signed by a key of the issuer's JWKS (from a file or a URL), with an
  asymmetric algorithm from ``[iua] algorithms`` -- never ``none`` nor HS*,
  whose "key" would be the public JWK itself (RFC 8725 2.1 algorithm confusion);
* names our issuer (``iss``) and one of our audiences (``aud``);
* is inside its ``exp`` / ``nbf`` window, give or take ``clock_skew_seconds``;
* carries scopes that ``[iua.scopes]`` maps to rights ("read", "write", "admin").

The JWKS is cached.  A token naming a key id we do not know makes us fetch the
JWKS again -- that is how key rotation reaches us -- but at most once every
``jwks_refresh_seconds``, so a stream of tokens with made-up ``kid`` values
cannot turn us into a flood against the Authorization Server.  A cached JWKS
older than ``jwks_max_age_seconds`` is refetched on next use (a removed key
stops working); when that fetch fails the keys we have are kept and the
failure logged, since refusing every user because the AS blinked is worse.

Only the token is trusted, never anything it does not sign: the subject and
its IUA attributes come from the verified claims.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import jwt
import requests

from xdsi.security.principal import Principal

__all__ = ["TokenError", "JwksCache", "TokenValidator", "RIGHTS", "ASYMMETRIC_ALGORITHMS"]

log = logging.getLogger(__name__)

RIGHTS = ("read", "write", "admin")
# JWS algorithms with a public verification key (RFC 7518, RFC 8037); HS* and "none" are never accepted
ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
MAX_JWKS_BYTES = 1024 * 1024  # a JWKS larger than this is not a JWKS


class TokenError(Exception):
    """A token we refuse: ``error`` is the RFC 6750 3.1 code ("invalid_token", "invalid_request"), ``description`` says why."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error
        self.description = description


@dataclass(frozen=True)
class _KeySet:
    keys: Mapping[str, Mapping[str, Any]]  # kid ("" when the JWK has none) -> JWK
    fetched: float  # time.monotonic() of the fetch


def _parse_jwks(data: bytes, where: str) -> dict[str, Mapping[str, Any]]:
    """The signature keys of a JWKS document by ``kid``; ``ValueError`` naming ``where`` when it is not one."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{where}: not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError(f"{where}: not a JWKS (a JSON object with a \"keys\" array)")
    keys: dict[str, Mapping[str, Any]] = {}
    for jwk in doc["keys"]:
        if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig" or jwk.get("kty") not in ("RSA", "EC", "OKP"):
            continue  # encryption keys, symmetric ("oct") keys and junk never verify a token
        kid = jwk.get("kid", "")
        if not isinstance(kid, str) or kid in keys:
            raise ValueError(f"{where}: key id {kid!r} is not unique")
        keys[kid] = jwk
    if not keys:
        raise ValueError(f"{where}: no signature keys (RSA, EC or OKP with use \"sig\")")
    return keys


class JwksCache:
    """The issuer's keys, from ``source`` (a file path or an http(s) URL), refetched as the module docstring says.

    ``clock`` is injectable so the refetch interval can be tested without sleeping.
    """

    def __init__(
        self,
        source: str | Path,
        *,
        refresh_seconds: float = 60.0,
        max_age_seconds: float = 3600.0,
        timeout: float = 10.0,
        verify: bool | str = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.refresh_seconds = refresh_seconds
        self.max_age_seconds = max_age_seconds
        self.timeout = timeout
        self.verify = verify
        self.clock = clock
        self.fetches = 0  # for tests and status: how often the source was read
        self._lock = threading.Lock()
        self._keys: _KeySet | None = None
        self._last_attempt: float | None = None

    @property
    def is_url(self) -> bool:
        return isinstance(self.source, str) and self.source.startswith(("http://", "https://"))

    def _read(self) -> bytes:
        self.fetches += 1
        if not self.is_url:
            return Path(self.source).read_bytes()
        with requests.get(str(self.source), timeout=self.timeout, verify=self.verify, stream=True, headers={"Accept": "application/json"}) as r:
            r.raise_for_status()
            body = b""
            for chunk in r.iter_content(64 * 1024):
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise ValueError(f"{self.source}: JWKS larger than {MAX_JWKS_BYTES} bytes")
            return body

    def load(self) -> None:
        """Read the source now; raises ``OSError``/``ValueError``/``requests.RequestException`` when it fails (start-up)."""
        with self._lock:
            self._last_attempt = self.clock()
            self._keys = _KeySet(_parse_jwks(self._read(), str(self.source)), self.clock())

    def _refresh(self, why: str, *, wait: bool = True) -> None:
        """Refetch under the lock unless another thread just did, or the last attempt is too recent.

        ``wait=False`` (a JWKS merely getting old): when another thread is already fetching, go on with
        the keys we have rather than queue every request behind a slow authorization server.
        """
        if not self._lock.acquire(blocking=wait):
            return
        try:
            now = self.clock()
            if self._last_attempt is not None and now - self._last_attempt < self.refresh_seconds:
                return
            self._last_attempt = now
            try:
                self._keys = _KeySet(_parse_jwks(self._read(), str(self.source)), now)
                log.info("IUA: JWKS reloaded from %s (%s): key ids %s", self.source, why, sorted(self._keys.keys))
            except (OSError, ValueError, requests.RequestException) as exc:
                log.warning("IUA: JWKS from %s could not be read (%s); keeping the keys we have: %s", self.source, why, exc)
        finally:
            self._lock.release()

    def key(self, kid: str | None) -> Mapping[str, Any]:
        """The JWK for ``kid`` (a token without ``kid`` only when the JWKS holds exactly one key)."""
        ks = self._keys
        if ks is None:
            self._refresh("first use")
        elif self.clock() - ks.fetched > self.max_age_seconds:
            self._refresh("older than jwks_max_age_seconds", wait=False)
        found = self._lookup(kid)
        if found is None and kid is not None:
            self._refresh(f"unknown key id {kid!r}")
            found = self._lookup(kid)
        if found is None:
            if kid is None:
                raise TokenError("invalid_token", "the token names no key (kid) and the issuer has more than one")
            raise TokenError("invalid_token", f"the token is signed with key {kid!r}, which the issuer's JWKS does not hold")
        return found

    def _lookup(self, kid: str | None) -> Mapping[str, Any] | None:
        ks = self._keys
        if ks is None:
            return None
        if kid is None:
            return next(iter(ks.keys.values())) if len(ks.keys) == 1 else None
        return ks.keys.get(kid)


def _claim_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


class TokenValidator:
    """Checks one bearer token and turns it into a :class:`Principal`; see the module docstring."""

    def __init__(
        self,
        keys: JwksCache,
        *,
        issuer: str,
        audience: tuple[str, ...],
        algorithms: tuple[str, ...] = ASYMMETRIC_ALGORITHMS,
        clock_skew_seconds: float = 30.0,
        scopes: Mapping[str, tuple[str, ...]] | None = None,
    ) -> None:
        bad = [a for a in algorithms if a not in ASYMMETRIC_ALGORITHMS]
        if bad or not algorithms:
            raise ValueError(f"algorithms must be among {', '.join(ASYMMETRIC_ALGORITHMS)}, not {bad or 'none'}")
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self.algorithms = algorithms
        self.leeway = clock_skew_seconds
        self.scopes = dict(scopes) if scopes is not None else {r: (r,) for r in RIGHTS}

    def validate(self, token: str) -> Principal:
        """The principal the token speaks for; :class:`TokenError` for anything we refuse."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError as exc:
            raise TokenError("invalid_token", f"not a JWT: {exc}") from None
        alg = header.get("alg")
        if alg not in self.algorithms:
            raise TokenError("invalid_token", f"signature algorithm {alg!r} is not accepted (accepted: {', '.join(self.algorithms)})")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise TokenError("invalid_token", "the kid header is not a string")
        jwk = self.keys.key(kid)
        try:
            # the JWK's own "alg" binds it; a JWK without one takes the token's alg, which from_jwk only builds
            # for the matching key type (an RSA JWK refuses ES256, and HS* is not in self.algorithms)
            key = jwt.PyJWK(dict(jwk), None if jwk.get("alg") else alg)
        except (jwt.PyJWKError, jwt.InvalidKeyError) as exc:  # an EC token naming an RSA key, ...
            raise TokenError("invalid_token", f"key {kid!r} cannot verify {alg}: {exc}") from None
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=list(self.algorithms),
                audience=list(self.audience),
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": ["exp", "iss", "aud"], "enforce_minimum_key_length": True},
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("invalid_token", "the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise TokenError("invalid_token", "the token is not valid yet (nbf/iat in the future)") from None
        except jwt.InvalidAudienceError:
            raise TokenError("invalid_token", "the token is not meant for this service (aud)") from None
        except jwt.InvalidIssuerError:
            raise TokenError("invalid_token", "the token was not issued by the trusted authorization server (iss)") from None
        except jwt.InvalidSignatureError:
            raise TokenError("invalid_token", "the token signature does not verify") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenError("invalid_token", f"the token lacks the {exc.claim!r} claim") from None
        except jwt.PyJWTError as exc:  # InvalidTokenError, InvalidKeyError (a key too short), ...
            raise TokenError("invalid_token", f"the token is not valid: {exc}") from None
        return self._principal(claims)

    def _principal(self, claims: Mapping[str, Any]) -> Principal:
        subject = claims.get("sub") or claims.get("client_id")
        if not isinstance(subject, str) or not subject:
            raise TokenError("invalid_token", "the token names no subject (sub) nor client (client_id)")
        granted = claims.get("scope", claims.get("scp", ""))
        if isinstance(granted, str):
            scope_list = granted.split()
        elif isinstance(granted, list) and all(isinstance(s, str) for s in granted):
            scope_list = list(granted)
        else:
            raise TokenError("invalid_token", "the scope claim is neither a space-separated string nor a list of strings")
        rights = frozenset(r for s in scope_list for r in self.scopes.get(s, ()))
        attributes = {"iss": str(claims["iss"]), "scope": " ".join(scope_list)}
        for name in ("client_id", "jti"):
            if name in claims:
                attributes[name] = _claim_text(claims[name])
        # IUA JWT extension (ITI-71 3.71.4.2.2.1.1): what an audit record wants of the user
        ext = claims.get("extensions")
        iua = ext.get("ihe_iua") if isinstance(ext, dict) else None
        if isinstance(iua, dict):
            for name in ("subject_name", "subject_organization", "subject_organization_id", "subject_role", "purpose_of_use", "home_community_id", "national_provider_identifier", "person_id"):
                if name in iua:
                    attributes[name] = _claim_text(iua[name])[:512]
        return Principal(subject=subject, rights=rights, via="bearer", attributes=attributes)
