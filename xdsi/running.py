"""Which listeners a running ``xdsi serve`` has open, for ``xdsi status`` (issue 12).

``xdsi status`` is another process: it can read the configuration, but not whether a server
was started with it, nor with which flags (``--dicom-port 0`` switches the plain DICOM port off
for one run only).  So ``xdsi serve`` writes what it really listens on into
``DATA_DIR/serving.json`` once every listener is bound, and removes it when it stops.  A file
whose process is gone (killed with SIGKILL, a crash) is reported as such, never as running.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from xdsi.config import Settings

__all__ = ["FILE_NAME", "Running", "application_pid", "clear_running", "describe_listeners", "read_running", "write_running"]

FILE_NAME = "serving.json"

# set in a worker of ``xdsi serve --workers N`` (xdsi.supervisor): the supervisor's pid
_APPLICATION_PID: int | None = None


def application_pid() -> int:
    """The process id of the running application: ours, or in a worker the supervisor's.

    Audit messages name the application by it (Alternative User ID, the syslog PROCID): the
    Application Start, every event after it and ``xdsi status`` then show one pid per
    ``xdsi serve``, whichever worker did the work and however often a worker was restarted.
    """
    return _APPLICATION_PID if _APPLICATION_PID is not None else os.getpid()


@dataclass(frozen=True)
class Running:
    """What ``serving.json`` says: the server's pid, when it started (UTC), its listener URLs, and whether it lives."""

    pid: int
    started: datetime
    listeners: tuple[str, ...]
    alive: bool
    workers: int = 1  # worker processes under ``pid`` (``xdsi serve --workers N``); 1: the process itself serves


def describe_listeners(settings: Settings) -> str:
    """``http://h:p/, dicom://h:p, ...`` and which plain ports are off: the start-up line, the log and status say it so."""
    running = [lst.label(settings.host) for lst in settings.listeners()]
    off = [name for name, port in (("dicom_port", settings.dicom_port), ("http_port", settings.http_port)) if not port]
    return ", ".join(running) + (f"; off: {', '.join(off)}" if off else "")


def write_running(settings: Settings, workers: int = 1) -> None:
    """Written aside and renamed into place, so a reader never sees half a file."""
    doc = {
        "workers": workers,
        "pid": os.getpid(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "ae_title": settings.ae_title,
        "listeners": [lst.label(settings.host) for lst in settings.listeners()],
    }
    path = settings.data_dir / FILE_NAME
    tmp = path.with_name(f".{FILE_NAME}.{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def clear_running(settings: Settings) -> None:
    """Remove the file if it is ours (a second server refused at start must not erase the first one's)."""
    path = settings.data_dir / FILE_NAME
    try:
        if json.loads(path.read_text(encoding="utf-8")).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def read_running(data_dir: Path) -> Running | None:
    """None when no server wrote the file (never started, or stopped cleanly) or it cannot be read."""
    try:
        doc = json.loads((data_dir / FILE_NAME).read_text(encoding="utf-8"))
        pid = int(doc["pid"])
        started = datetime.fromisoformat(str(doc["started"]))
        listeners = tuple(str(x) for x in doc["listeners"])
        workers = int(doc.get("workers", 1))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return Running(pid, started, listeners, _alive(pid), workers)


def _alive(pid: int) -> bool:
    """The process lives and (where /proc tells) is an xdsi: a pid reused by another program after a crash is not us."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        pass
    if not Path("/proc/self").exists():  # not Linux: kill() is all we know
        return True
    try:
        return b"xdsi" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # gone meanwhile
        return False
