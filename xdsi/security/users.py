"""HTTP Basic users for sites without an authorization server: a users file of argon2id hashes and rights.

The file (``[http] users_file``, default ``<data_dir>/users``) has one user a line,
``NAME:HASH:RIGHTS``, like an htpasswd file: ``HASH`` is argon2-cffi's PHC string
(``$argon2id$v=19$m=...``: algorithm, parameters and salt travel with it, so the
cost can be raised later without breaking old entries) and ``RIGHTS`` a comma list
of read, write, admin.  ``#`` starts a comment.  It is written only by
``xdsi users add/remove`` (atomically, mode 0600, under a lock) and re-read by
a running server when it changes, so adding a user needs no restart.

Why the cache and the semaphore: argon2id costs ~50 ms and 64 MiB per check
by design.  A viewer sends hundreds of requests with the same credentials, so
a successful check is remembered for ``CACHE_SECONDS`` (keyed by a keyed hash
of name and password, never the password itself, and only while the user's
hash in the file is unchanged); failures are never cached, and at most
``CONCURRENT_CHECKS`` hashes are computed at once, so a flood of wrong
passwords queues instead of taking gigabytes of memory.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import os
import re
import secrets
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from xdsi.security.principal import Principal

__all__ = ["User", "UsersFile", "UsersError", "BasicAuthenticator", "RIGHTS", "parse_rights", "add_user", "remove_user", "read_users"]

RIGHTS = ("read", "write", "admin")
NAME_RE = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")  # no ':' (RFC 7617 user-id), nothing the file format would trip on
CACHE_SECONDS = 300.0
CACHE_ENTRIES = 1024
CONCURRENT_CHECKS = 4

_hasher = PasswordHasher()  # argon2-cffi's default: RFC 9106 low-memory profile, argon2id


class UsersError(ValueError):
    """The users file or a users command cannot be used as asked; the message names the file (and line)."""


@dataclass(frozen=True)
class User:
    name: str
    hash: str
    rights: frozenset[str]


def parse_rights(text: str) -> frozenset[str]:
    """``"read,write"`` -> rights; an unknown or empty list is a :class:`UsersError`."""
    rights = [r.strip() for r in text.split(",") if r.strip()]
    bad = [r for r in rights if r not in RIGHTS]
    if bad or not rights:
        raise UsersError(f"rights must be a comma list of {', '.join(RIGHTS)}, not {text!r}")
    return frozenset(rights)


def _check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise UsersError(f"user name {name!r}: use 1-64 letters, digits, '.', '_', '@', '-'")
    return name


def read_users(path: Path) -> dict[str, User]:
    """The users in ``path``; :class:`UsersError` naming the line for anything malformed."""
    users: dict[str, User] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsersError(f"{path}: not UTF-8 text") from None
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) != 3:
            raise UsersError(f"{path} line {n}: expected NAME:HASH:RIGHTS")
        name, digest, rights_text = parts
        try:
            _check_name(name)
            rights = parse_rights(rights_text)
        except UsersError as exc:
            raise UsersError(f"{path} line {n}: {exc}") from None
        if not digest.startswith("$argon2"):
            raise UsersError(f"{path} line {n}: the hash is not an argon2 hash (write users with `xdsi users add`)")
        if name in users:
            raise UsersError(f"{path} line {n}: user {name!r} is listed twice")
        users[name] = User(name, digest, rights)
    return users


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock beside the users file, so two ``xdsi users`` commands cannot lose each other's change."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write(path: Path, users: dict[str, User]) -> None:
    lines = ["# xdsi HTTP Basic users: NAME:ARGON2-HASH:RIGHTS -- edit with `xdsi users add/remove`\n"]
    lines += [f"{u.name}:{u.hash}:{','.join(r for r in RIGHTS if r in u.rights)}\n" for u in users.values()]
    fd, tmp = tempfile.mkstemp(prefix=".users.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.writelines(lines)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def add_user(path: Path, name: str, password: str, rights: frozenset[str]) -> bool:
    """Add ``name`` or replace its password and rights; True when it was new."""
    _check_name(name)
    if not password:
        raise UsersError("the password is empty")
    if not rights or not rights <= set(RIGHTS):
        raise UsersError(f"rights must be among {', '.join(RIGHTS)}")
    with _locked(path):
        users = read_users(path) if path.exists() else {}
        new = name not in users
        users[name] = User(name, _hasher.hash(password), frozenset(rights))
        _write(path, users)
    return new


def remove_user(path: Path, name: str) -> bool:
    """Remove ``name``; False when it was not there."""
    with _locked(path):
        users = read_users(path) if path.exists() else {}
        if name not in users:
            return False
        del users[name]
        _write(path, users)
    return True


class UsersFile:
    """The users file as a running server sees it: re-read when its size, mtime or inode changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._users: dict[str, User] = {}
        self.load()

    def load(self) -> None:
        """Read the file now; :class:`UsersError` (or ``OSError``) when it is missing or malformed (start-up)."""
        st = self.path.stat()
        users = read_users(self.path)
        with self._lock:
            self._users, self._stamp = users, (st.st_ino, st.st_size, st.st_mtime_ns)

    def get(self, name: str) -> User | None:
        try:
            st = self.path.stat()
            stamp: tuple[int, int, int] | None = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            stamp = None
        if stamp != self._stamp:
            try:
                users = read_users(self.path) if stamp is not None else {}  # a removed file: nobody
            except (UsersError, OSError) as exc:  # keep serving the last good list rather than lock everyone out
                import logging

                logging.getLogger(__name__).error("users file not reloaded, keeping the previous users: %s", exc)
                users = self._users
            with self._lock:
                self._users, self._stamp = users, stamp
        return self._users.get(name)


class BasicAuthenticator:
    """Checks a Basic user-id and password against a :class:`UsersFile`; see the module docstring for the cache."""

    def __init__(self, users: UsersFile) -> None:
        self.users = users
        self._key = secrets.token_bytes(32)  # per process: cache keys mean nothing outside it
        self._cache: dict[bytes, tuple[str, float]] = {}
        self._cache_lock = threading.Lock()
        self._checks = threading.BoundedSemaphore(CONCURRENT_CHECKS)
        self._dummy = _hasher.hash(secrets.token_hex(16))  # unknown users cost the same as known ones

    def authenticate(self, name: str, password: str) -> Principal | None:
        """The principal for correct credentials, None otherwise (unknown user and wrong password alike)."""
        user = self.users.get(name) if NAME_RE.match(name) else None
        key = hmac.new(self._key, name.encode("utf-8") + b"\0" + password.encode("utf-8"), hashlib.sha256).digest()
        now = time.monotonic()
        if user is not None:
            with self._cache_lock:
                hit = self._cache.get(key)
            if hit is not None and hit[0] == user.hash and hit[1] > now:
                return self._principal(user)
        with self._checks:
            try:
                _hasher.verify(user.hash if user is not None else self._dummy, password)
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                return None
        if user is None:  # the dummy's password is random; never reached in practice
            return None
        with self._cache_lock:
            if len(self._cache) >= CACHE_ENTRIES:
                self._cache.clear()
            self._cache[key] = (user.hash, now + CACHE_SECONDS)
        return self._principal(user)

    @staticmethod
    def _principal(user: User) -> Principal:
        return Principal(subject=user.name, rights=user.rights, via="basic", attributes={})
