"""Who may use the HTTP services: authentication and the right each route needs, as one WSGI middleware.

It wraps the whole HTTP application (``xdsi.app.make_app``), so no adapter is
reachable without it and none needs to know about it:

* ``[http] auth = "bearer"``: an IUA access token (RFC 6750 ``Authorization:
  Bearer``), checked by :mod:`xdsi.security.iua`;
* ``"basic"``: a user of the users file (:mod:`xdsi.security.users`);
* ``"none"``: everyone may do everything; ``xdsi serve`` refuses this on a
  non-loopback address unless ``allow_anonymous = true`` is written down
  (:func:`check_startup`).

The right a request needs (:func:`required_right`): ``read`` to query and
retrieve (QIDO-RS, WADO-RS, WADO-URI, RAD-69/WADO-WS, ITI-43, ``?wsdl``),
``write`` to store (STOW-RS), ``admin`` for ``/status`` and deletes.  A CORS
preflight carries no credentials by design (Fetch standard) and is let through
to the CORS layer; every other request, unknown paths included, must
authenticate.  The SOAP endpoints may instead be left to XUA alone
(``[http] soap_auth = "xua"``, only with ``[xua] required = true``): IHE
consumers of RAD-69 and ITI-43 identify their user with a SAML assertion in
``wsse:Security`` and send no bearer token.

Refusals: 401 with a ``WWW-Authenticate`` challenge when credentials are
missing or wrong (RFC 6750 3 / RFC 7617 2), 400 ``invalid_request`` for a
malformed Authorization header, 403 (``error="insufficient_scope"`` for
bearer) when the right is missing.  On the SOAP endpoints the body is a SOAP
1.2 fault with the WS-Security subcode ``wsse:FailedAuthentication`` (WSS 1.1
section 12: "the security token could not be authenticated or authorized"),
so a SOAP client sees a fault it can parse.  Every refusal is a Security Alert
in the audit trail when one runs (:mod:`xdsi.audit.access`).

The authenticated identity goes into the environ as
``environ["xdsi.principal"]`` (:class:`xdsi.security.principal.Principal`) for
the adapters and their audit records.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from pathlib import Path
from typing import Any, Callable, Iterable

from xdsi.config import AUTH_RIGHTS, Settings, is_loopback_host
from xdsi.security.principal import ENVIRON_KEY, Principal

__all__ = ["HttpAuth", "Refusal", "required_right", "check_startup", "build_authenticator", "protect", "users_path"]

log = logging.getLogger(__name__)

WSGIApp = Callable[..., Any]
REALM = "xdsi"
SOAP_PATHS = ("/xdsi/",)  # the SOAP endpoints (RAD-69/WADO-WS, ITI-43) are mounted under this prefix
_TOKEN68 = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")  # RFC 6750 2.1 b64token




def users_path(settings: Settings) -> Path:
    """The users file of ``[http] auth = "basic"``: ``[http] users_file``, else ``<data_dir>/users``."""
    return settings.auth.users_file or (settings.data_dir / "users").resolve()


def required_right(method: str, path: str) -> str | None:
    """The right a request needs: ``read``, ``write``, ``admin``, or None (a path we do not serve: any identity)."""
    method = method.upper()
    if path == "/status" or path.startswith("/status/"):
        return "admin"
    if path == "/dicomweb" or path.startswith("/dicomweb/"):
        if method == "DELETE":
            return "admin"
        if method in ("POST", "PUT", "PATCH"):
            return "write"  # STOW-RS
        return "read"
    if path == "/wado" or path.startswith("/wado/"):
        return "read"
    if path == "/jpip" or path.startswith("/jpip/"):
        return "read"  # JPIP (issue 16): pixel data, whatever the method (a POST carries only the request fields)
    if any(path.startswith(p) for p in SOAP_PATHS):
        return "read"  # RAD-69, WADO-WS, ITI-43 and their ?wsdl: all retrieve or describe, none stores
    return None


class Refusal(Exception):
    """A request we do not serve: status, the reason, and the ``WWW-Authenticate`` challenge to send (if any)."""

    def __init__(self, status: int, reason: str, challenge: str | None = None, principal: Principal | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.challenge = challenge
        self.principal = principal


def _quoted(text: str) -> str:
    """RFC 6750 3: error_description is %x20-21 / %x23-5B / %x5D-7E (no '"' nor '\\')."""
    return "".join(c if 0x20 <= ord(c) < 0x7F and c not in '"\\' else "'" if c == '"' else " " for c in text)[:200]


class HttpAuth:
    """The authentication scheme in force: who the request is (a :class:`Principal`) or a :class:`Refusal`."""

    def __init__(self, mode: str, *, tokens: Any = None, users: Any = None, soap_by_xua: bool = False) -> None:
        self.mode = mode
        self.tokens = tokens  # xdsi.security.iua.TokenValidator for "bearer"
        self.users = users  # xdsi.security.users.BasicAuthenticator for "basic"
        self.soap_by_xua = soap_by_xua  # [http] soap_auth = "xua": the SOAP endpoints are XUA's to guard

    def challenge(self, error: str | None = None, description: str | None = None, scope: str | None = None) -> str:
        if self.mode == "basic":
            return f'Basic realm="{REALM}", charset="UTF-8"'
        parts = [f'Bearer realm="{REALM}"']
        if error:
            parts.append(f'error="{error}"')
        if description:
            parts.append(f'error_description="{_quoted(description)}"')
        if scope:
            parts.append(f'scope="{scope}"')
        return ", ".join(parts)

    def identify(self, environ: dict[str, Any]) -> Principal:
        """The requester; :class:`Refusal` (401/400) when it cannot be authenticated."""
        if self.mode == "none":
            subject = str(environ.get("SSL_CLIENT_S_DN") or "")
            who = subject or str(environ.get("REMOTE_ADDR") or "") or "anonymous"
            return Principal(subject=who, rights=frozenset(AUTH_RIGHTS), via="tls" if subject else "anonymous", attributes={})
        header = str(environ.get("HTTP_AUTHORIZATION") or "").strip()
        scheme, _, credentials = header.partition(" ")
        credentials = credentials.strip()
        wanted = "bearer" if self.mode == "bearer" else "basic"
        if not header or scheme.lower() != wanted:
            # RFC 6750 3.1: a request without authentication information gets the challenge without an error code
            raise Refusal(401, f"{wanted.capitalize()} credentials are required", self.challenge())
        if self.mode == "bearer":
            if not _TOKEN68.match(credentials):
                raise Refusal(400, "the Authorization header does not hold one bearer token", self.challenge("invalid_request", "malformed bearer token"))
            from xdsi.security.iua import TokenError

            try:
                return self.tokens.validate(credentials)
            except TokenError as exc:
                status = 400 if exc.error == "invalid_request" else 401
                raise Refusal(status, f"bearer token refused: {exc.description}", self.challenge(exc.error, exc.description)) from None
        try:
            decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            raise Refusal(400, "the Basic credentials are not base64 of UTF-8 user-id:password") from None
        name, sep, password = decoded.partition(":")
        if not sep:
            raise Refusal(400, "the Basic credentials have no ':' between user-id and password")
        principal = self.users.authenticate(name, password)
        if principal is None:
            raise Refusal(401, f"user {name[:64]!r}: unknown user or wrong password", self.challenge())
        return principal

    def authorize(self, principal: Principal, right: str | None) -> None:
        """:class:`Refusal` 403 when ``principal`` lacks ``right``."""
        if right is None or right in principal.rights:
            return
        have = ", ".join(sorted(principal.rights)) or "none"
        if self.mode == "bearer":
            # RFC 6750 3: "scope" names the scope(s) that would do, i.e. those [iua.scopes] maps to the right
            granting = " ".join(sorted(sc for sc, rights in self.tokens.scopes.items() if right in rights)) or right
            challenge = self.challenge("insufficient_scope", f"this request needs the {right} right", scope=_quoted(granting))
            raise Refusal(403, f"the token grants {have}; this request needs {right!r}", challenge, principal)
        raise Refusal(403, f"user {principal.subject!r} has the rights {have}; this request needs {right!r}", None, principal)


def build_authenticator(settings: Settings) -> HttpAuth:
    """The :class:`HttpAuth` for ``settings``: JWKS or users file loaded now, so that a broken one stops start-up.

    Raises ``OSError`` / ``ValueError`` (the users or JWKS file); a ``jwks_url`` that does not answer is only
    logged: the server starts and refuses tokens until the authorization server's keys can be fetched.
    """
    a = settings.auth
    # never without XUA actually required: check_startup refuses that configuration, and so does this (in-process apps)
    soap_by_xua = a.soap_auth == "xua" and settings.xua.required and settings.xua.enabled
    if a.mode == "bearer":
        from xdsi.security.iua import JwksCache, TokenValidator

        i = a.iua
        verify: bool | str = str(i.jwks_ca_certificates) if i.jwks_ca_certificates else True
        keys = JwksCache(i.jwks_url or i.jwks_file, refresh_seconds=i.jwks_refresh_seconds, max_age_seconds=i.jwks_max_age_seconds, verify=verify)  # type: ignore[arg-type]
        if keys.is_url:
            import requests

            try:
                keys.load()
            except (OSError, ValueError, requests.RequestException) as exc:
                log.warning("IUA: the JWKS at %s could not be fetched (%s): bearer tokens are refused until it can", i.jwks_url, exc)
        else:
            keys.load()
        validator = TokenValidator(keys, issuer=i.issuer, audience=i.audience, algorithms=i.algorithms, clock_skew_seconds=i.clock_skew_seconds, scopes=i.scopes)
        return HttpAuth("bearer", tokens=validator, soap_by_xua=soap_by_xua)
    if a.mode == "basic":
        from xdsi.security.users import BasicAuthenticator, UsersFile

        return HttpAuth("basic", users=BasicAuthenticator(UsersFile(users_path(settings))), soap_by_xua=soap_by_xua)
    return HttpAuth("none")


def check_startup(archive: Any) -> HttpAuth:
    """Refuse to serve anonymously on the network, and load the credentials store; the result is kept on the archive.

    Raises :class:`xdsi.startup.StartupError` naming the setting, before anything listens.
    """
    from xdsi.startup import StartupError

    s = archive.settings
    if s.auth.soap_auth == "xua" and s.auth.mode != "none" and not (s.xua.required and s.xua.enabled):
        raise StartupError("[http] soap_auth", '"xua"', None, "leaves the SOAP endpoints to XUA: needs [xua] required = true and trusted_issuers")
    http_listens = bool(s.http_port) or bool(s.https_port)  # 0 / None: that listener is off
    if s.auth.mode == "none" and not s.auth.allow_anonymous and http_listens and not is_loopback_host(s.host):
        raise StartupError(
            "[server] host", s.host, "--host",
            'anyone who reaches this address could read and store every study: set [http] auth = "bearer" or "basic", '
            'or write [http] allow_anonymous = true to serve without authentication',
        )
    try:
        auth = build_authenticator(s)
    except FileNotFoundError as exc:
        if s.auth.mode == "basic":
            raise StartupError("[http] users_file", exc.filename, None, "no users file: add users with `xdsi users add NAME --rights read`") from None
        raise StartupError("[iua] jwks_file", exc.filename, None, "not found") from None
    except (OSError, ValueError) as exc:
        setting = "[http] users_file" if s.auth.mode == "basic" else "[iua] jwks_file"
        raise StartupError(setting, users_path(s) if s.auth.mode == "basic" else s.auth.iua.jwks_file, None, str(exc)) from None
    if s.auth.mode != "none" and s.http_port and not is_loopback_host(s.host):
        # not refused (a TLS-terminating proxy may sit in front), but the operator must know
        log.warning("[http] auth = %r on plain http_port %s at %s: credentials and tokens cross the network in clear "
                    "unless a TLS proxy fronts it; prefer https_port", s.auth.mode, s.http_port, s.host)
    archive.http_auth = auth
    return auth


def _refusal_response(refusal: Refusal, environ: dict[str, Any], start_response: Callable[..., Any], cors: Any) -> Iterable[bytes]:
    path = str(environ.get("PATH_INFO") or "")
    headers: list[tuple[str, str]] = []
    if refusal.challenge:
        headers.append(("WWW-Authenticate", refusal.challenge))
    status_line = {400: "400 Bad Request", 401: "401 Unauthorized", 403: "403 Forbidden"}[refusal.status]
    if any(path.startswith(p) for p in SOAP_PATHS) and environ.get("REQUEST_METHOD") == "POST":
        from xdsi.standards.constants import NS_WSSE
        from xdsi.wire.soap import SoapFault, fault_envelope

        body = fault_envelope(SoapFault("Sender", refusal.reason, f"{{{NS_WSSE}}}FailedAuthentication"), None)
        headers.append(("Content-Type", "application/soap+xml; charset=utf-8"))
    else:
        from xdsi.wire.errors import warning_value

        body = (refusal.reason + "\n").encode("utf-8")
        headers += [("Content-Type", "text/plain; charset=utf-8"), ("Warning", warning_value(refusal.reason))]
    headers.append(("Content-Length", str(len(body))))
    if cors is not None and (path.startswith("/dicomweb") or path.startswith("/wado")):
        allow = cors.allowed(environ.get("HTTP_ORIGIN"))
        if allow is not None:  # a viewer's script must see the 401 to ask its user to log in
            headers += [("Access-Control-Allow-Origin", allow), ("Vary", "Origin"), ("Access-Control-Expose-Headers", "WWW-Authenticate, Warning")]
    start_response(status_line, headers)
    return [body]


def protect(app: WSGIApp, archive: Any) -> WSGIApp:
    """``app`` behind the access check of ``archive.settings`` (the :class:`HttpAuth` kept by :func:`check_startup`, or a new one)."""
    auth: HttpAuth = getattr(archive, "http_auth", None) or build_authenticator(archive.settings)
    cors = None
    if archive.settings.cors_origins:
        from xdsi.web.cors import Cors

        cors = Cors(app, archive.settings.cors_origins)  # only its origin check is used here

    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method = str(environ.get("REQUEST_METHOD") or "GET")
        if method == "OPTIONS" and environ.get("HTTP_ACCESS_CONTROL_REQUEST_METHOD") and environ.get("HTTP_ORIGIN"):
            return app(environ, start_response)  # CORS preflight: browsers send it without credentials
        path = str(environ.get("PATH_INFO") or "")
        if auth.soap_by_xua and any(path.startswith(p) for p in SOAP_PATHS):
            return app(environ, start_response)  # [http] soap_auth = "xua": XUA (required) checks every SOAP request itself
        try:
            principal = auth.identify(environ)
            auth.authorize(principal, required_right(method, path))
        except Refusal as refusal:
            log.info("HTTP %s %s from %s refused (%d): %s", method, path[:200], environ.get("REMOTE_ADDR"), refusal.status, refusal.reason)
            from xdsi.audit.access import http_access_refused

            http_access_refused(archive, environ, refusal.status, refusal.reason, refusal.principal)
            return _refusal_response(refusal, environ, start_response, cors)
        environ[ENVIRON_KEY] = principal
        return app(environ, start_response)

    wrapped.__wrapped__ = app  # type: ignore[attr-defined]
    return wrapped
