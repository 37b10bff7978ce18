"""Start-up failures as one line that names the setting to change.

A busy port or a data directory that cannot be created is the operator's to fix, not a
bug: a 30-line traceback hides the one fact that matters (which setting, which flag).
Configuration mistakes found while parsing are :class:`xdsi.config.ConfigError`; the
ones only the operating system can reveal (bind, mkdir, write) are :class:`StartupError`,
reported the same way by :mod:`xdsi.cli` with exit status 2.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from xdsi.config import Settings

__all__ = ["StartupError", "check_directories", "directory_settings", "listen_error", "path_error"]


class StartupError(RuntimeError):
    """A setting the process cannot start with: ``[section] key VALUE (--flag): reason``."""

    def __init__(self, setting: str, value: object, flag: str | None, reason: str) -> None:
        self.setting, self.value, self.flag, self.reason = setting, value, flag, reason
        super().__init__(f"{setting} {value}" + (f" ({flag})" if flag else "") + f": {reason}")


@dataclass(frozen=True)
class DirectorySetting:
    """A directory the archive writes to, and the setting (and flag) that chose it."""

    setting: str
    flag: str | None
    path: Path


def directory_settings(settings: Settings, prefix: str = "[server]", flag: str | None = "--data-dir") -> list[DirectorySetting]:
    """Every directory :meth:`xdsi.archive.Archive.open` creates or writes, per setting, partitions included."""
    dirs = [DirectorySetting(f"{prefix} data_dir", flag, Path(settings.data_dir))]
    st = settings.effective_storage
    for tier in st.tiers:
        if settings.storage is None:  # the default tier lives under data_dir
            dirs.append(DirectorySetting(f"{prefix} data_dir", flag, Path(tier.path)))
        else:
            tiers = "[[storage.tiers]]" if prefix == "[server]" else f"[[{prefix.strip('[]')}.tiers]]"
            dirs.append(DirectorySetting(f"{tiers} {tier.name} path", None, Path(tier.path)))
    url = settings.effective_index_url
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        db = Path(url.split("///", 1)[1])
        where, fl = (f"{prefix} data_dir", flag) if settings.index_url is None else ("[index] url", None)
        dirs.append(DirectorySetting(where, fl, db.parent))
    if prefix == "[server]":
        if settings.xds.enabled and settings.xds.keep_dir is not None:
            dirs.append(DirectorySetting("[xds] keep_dir", None, Path(settings.xds.keep_dir)))
        for name in settings.partitions:
            dirs.extend(directory_settings(settings.for_partition(name), f"[partitions.{name}]", None))
    return dirs


def _errno(exc: OSError) -> int | None:
    if exc.errno is not None:
        return exc.errno
    # cheroot re-raises bind errors as a bare message: "No socket could be created -- ((...): [Errno 98] ...)"
    m = re.search(r"\[Errno (\d+)\]", str(exc))
    return int(m.group(1)) if m else None


def _reason(exc: OSError) -> str:
    code = _errno(exc)
    if code is None:
        return str(exc)
    text = os.strerror(code)
    return text[:1].lower() + text[1:]


def path_error(d: DirectorySetting, exc: OSError, doing: str) -> StartupError:
    """``[server] data_dir /x/y (--data-dir): cannot create /x/y: not a directory``."""
    where = Path(exc.filename) if exc.filename else d.path
    reason = _reason(exc)
    if _errno(exc) in (errno.ENOTDIR, errno.EEXIST):  # name the file in the way, not just "not a directory"
        for parent in [*reversed(where.parents), where]:
            if parent.exists() and not parent.is_dir():
                reason = f"{parent} is a file, not a directory"
                break
    return StartupError(d.setting, d.path, d.flag, f"cannot {doing} {where}: {reason}")


def check_directories(settings: Settings) -> None:
    """Create every directory the archive writes to and prove it writable, before anything starts.

    Why a probe file rather than ``os.access``: access() answers for the real user id and
    knows nothing of read-only mounts on some systems; writing is the only honest test.
    """
    for d in directory_settings(settings):
        try:
            d.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise path_error(d, exc, "create") from None
        try:
            with tempfile.TemporaryFile(dir=d.path, prefix=".xdsi-probe-"):
                pass
        except OSError as exc:  # name the folder, not the probe file's random name
            raise path_error(d, OSError(exc.errno, exc.strerror, str(d.path)), "write in") from None


def listen_error(setting: str, flag: str | None, port: int, host: str, exc: OSError) -> StartupError:
    """The setting to blame for a failed bind: the host for an address we do not have, else the port."""
    reason = _reason(exc)
    code = _errno(exc)
    if isinstance(exc, socket.gaierror) or code == errno.EADDRNOTAVAIL:
        return StartupError("[server] host", host, "--host", f"cannot listen on {host}: {reason}")
    if code == errno.EACCES and 0 < port < 1024:
        reason += " (ports below 1024 need privileges)"
    return StartupError(setting, port, flag, reason)
