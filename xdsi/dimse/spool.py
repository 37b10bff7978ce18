"""Spool hygiene for incoming C-STOREs: no partial dataset outlives its transfer.

With ``_config.STORE_RECV_CHUNKED_DATASET`` pynetdicom writes each incoming
C-STORE data set into a ``NamedTemporaryFile(delete=False)`` in
:data:`tempfile.tempdir` (our ``settings.temp_dir``) and removes it only after
the C-STORE handler ran.  A transfer that never completes (the peer aborts,
closes the socket, stalls until a timeout, or announces a data set it never
sends) leaves the file behind: pynetdicom keeps it on
``assoc.dimse.message`` and simply drops the message with the association.

:class:`SpoolKeeper` closes that gap through pynetdicom's public events plus
per-association tracking:

* ``EVT_CONN_CLOSE`` (raised on the DUL thread, the only writer of the
  partial file) removes the message still being received at once;
* ``EVT_ABORTED`` / ``EVT_RELEASED`` remove complete C-STOREs still queued
  and never to be served (taken off the queue, so the reactor cannot serve
  one whose file we removed);
* a periodic pass removes what an association left when it ended on a path
  that raises no event, and sweeps spool files older than the longest
  transfer timeout (a crash, another process), skipping any file a live
  association or a running handler still owns.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from pynetdicom import evt

from xdsi.dimse import spool_ahead

log = logging.getLogger(__name__)

# what pynetdicom's NamedTemporaryFile(suffix=".dcm") and the STOW spool (xdsi.wire.multipart) are called
SPOOL_PATTERNS = ("tmp*.dcm", "stow-*.part")


@dataclass(frozen=True)
class SpoolUsage:
    files: int
    bytes: int


def spool_usage(temp_dir: Path) -> SpoolUsage:
    """Files and bytes in the spool directory right now (for ``xdsi status`` and ``/status``); the empty files
    made ahead for the next C-STOREs (:mod:`xdsi.dimse.spool_ahead`) are not counted."""
    files = size = 0
    try:
        entries = list(temp_dir.iterdir())
    except FileNotFoundError:
        return SpoolUsage(0, 0)
    for p in entries:
        try:
            st = p.stat()
        except OSError:  # removed while we looked
            continue
        if p.is_file() and not spool_ahead.waiting(p.name, st.st_size):
            files += 1
            size += st.st_size
    return SpoolUsage(files, size)


def _discard(file: Any, path: Any) -> bool:
    """Close and remove one spool file; True when a file was removed."""
    if file is not None:
        try:
            file.close()
        except Exception:  # pragma: no cover - already closed
            pass
    if path is None:
        return False
    if isinstance(path, tuple):  # (path, offset): a file being *sent*, not ours
        return False
    try:
        Path(path).unlink()
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning("could not remove spool file %s: %s", path, exc)
        return False


class SpoolKeeper:
    """Removes the spool files of failed transfers at once, and sweeps old ones periodically."""

    def __init__(self, temp_dir: Path, max_age: float, interval: float | None = None) -> None:
        self.temp_dir = temp_dir
        self.max_age = max_age
        self.interval = interval if interval is not None else max(1.0, min(60.0, max_age / 4))
        self._lock = threading.Lock()
        self._assocs: set[Any] = set()
        self._in_handler: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.removed = 0  # spool files removed (failed transfers and sweeps), for tests and logs

    # -- pynetdicom event handlers ---------------------------------------------------------

    def handlers(self) -> list[tuple[Any, Any]]:
        return [
            (evt.EVT_CONN_OPEN, self.on_conn_open),
            (evt.EVT_CONN_CLOSE, self.on_conn_close),
            (evt.EVT_ABORTED, self.on_ended),
            (evt.EVT_RELEASED, self.on_ended),
        ]

    def on_conn_open(self, event: Any) -> None:
        with self._lock:
            self._assocs.add(event.assoc)

    def on_conn_close(self, event: Any) -> None:
        """Runs on the DUL thread after the socket closed: the partial message gets no more bytes."""
        self._drop_partial(event.assoc)

    def on_ended(self, event: Any) -> None:
        self._drop_queued(event.assoc)

    # -- the C-STORE handler marks the file it works on ------------------------------------------

    def hold(self, path: Path) -> None:
        with self._lock:
            self._in_handler.add(str(path))

    def release(self, path: Path) -> None:
        with self._lock:
            self._in_handler.discard(str(path))

    # -- removal ---------------------------------------------------------------------------------

    def discard_request(self, req: Any) -> None:
        """Remove the spool file of a C-STORE request that no storage handler will take."""
        file, path = getattr(req, "_dataset_file", None), getattr(req, "_dataset_path", None)
        if file is not None and _discard(file, path):
            req._dataset_file = None
            self.removed += 1

    def _drop_partial(self, assoc: Any) -> None:
        dimse = getattr(assoc, "dimse", None)
        msg = getattr(dimse, "message", None)
        if msg is None or getattr(msg, "_data_set_file", None) is None:
            return
        file, path = msg._data_set_file, msg._data_set_path
        msg._data_set_file = None
        msg._data_set_path = None
        if _discard(file, path):
            self.removed += 1
            log.info("removed the partial C-STORE data set of an unfinished transfer: %s", path)

    def _drop_queued(self, assoc: Any) -> None:
        """Complete C-STOREs still queued when the association ended are never served: remove their files."""
        dimse = getattr(assoc, "dimse", None)
        q = getattr(dimse, "msg_queue", None)
        if q is None:  # an aborted or released association serves nothing more from its queue
            return
        while True:
            try:
                _, msg = q.get(block=False)
            except queue.Empty:
                return
            file, path = getattr(msg, "_dataset_file", None), getattr(msg, "_dataset_path", None)
            if file is not None and _discard(file, path):
                self.removed += 1
                log.info("removed the data set of a C-STORE not served before the association ended: %s", path)

    def reap(self) -> None:
        """Forget ended associations, removing whatever they left."""
        with self._lock:
            ended = [a for a in self._assocs if not a.is_alive() and not getattr(a.dul, "is_alive", lambda: False)()]
            self._assocs.difference_update(ended)
        for assoc in ended:
            self._drop_partial(assoc)
            self._drop_queued(assoc)

    def _owned(self) -> set[str]:
        """Spool paths a live association or a running handler still owns."""
        with self._lock:
            owned = set(self._in_handler)
            assocs = list(self._assocs)
        for assoc in assocs:
            msg = getattr(getattr(assoc, "dimse", None), "message", None)
            path = getattr(msg, "_data_set_path", None)
            if path is not None and not isinstance(path, tuple):
                owned.add(str(path))
            q = getattr(getattr(assoc, "dimse", None), "msg_queue", None)
            for _, queued in list(getattr(q, "queue", ())):
                p = getattr(queued, "_dataset_path", None)
                if p is not None and not isinstance(p, tuple):
                    owned.add(str(p))
        return owned

    def sweep(self, now: float | None = None) -> int:
        """Remove spool files not written to for longer than ``max_age`` and owned by nobody."""
        self.reap()
        now = time.time() if now is None else now
        owned = self._owned()
        removed = 0
        for p in self._candidates():
            try:
                if str(p) in owned or now - p.stat().st_mtime <= self.max_age:
                    continue
                p.unlink()
            except OSError:
                continue
            removed += 1
            log.warning("removed stale spool file %s (untouched for over %.0f s)", p.name, self.max_age)
        self.removed += removed
        return removed

    def _candidates(self) -> Iterable[Path]:
        for pattern in SPOOL_PATTERNS:
            try:
                yield from self.temp_dir.glob(pattern)
            except OSError:  # pragma: no cover - spool directory removed
                return

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self.sweep()
        self._thread = threading.Thread(target=self._run, name="xdsi-spool-sweep", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sweep()
            except Exception:  # pragma: no cover - keep sweeping
                log.exception("spool sweep failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.reap()
