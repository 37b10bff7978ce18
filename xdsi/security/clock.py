"""Consistent Time (IHE ITI-1 CT) as the peers see it: the clock offset read from their HTTP ``Date`` headers.

xdsi keeps no clock of its own: the host keeps it in time (NTP, the CT Time Client; see the
conformance statement).  What xdsi can add is a witness: every HTTP peer we call (the XDS
registry and repository, the PIXm manager) stamps its answer with ``Date`` (RFC 9110 6.6.1), so
each answer is a reading of that peer's clock.  ``xdsi status`` prints, per peer, the latest
offset and when it was seen, and flags one beyond the 1 s that IHE CT asks of grouped actors
(ITI TF-1 7: median error under one second), so that a node whose host lost its NTP (or
a partner's) is noticed before its audit records and metadata times disagree with the domain's.

How an offset is measured: ``offset = (Date + 0.5 s) - midpoint`` where ``midpoint`` is our
wall clock halfway between sending the request and receiving the response head (``requests``'
``Response.elapsed``).  An HTTP-date has whole seconds and is truncated, so the peer's clock
was somewhere in ``[Date, Date + 1 s)`` when it wrote it: the half second centres that interval.
The reading is then good to ``+-(0.5 s + elapsed / 2)``; that bound is kept with it.

Readings are kept per peer origin (``https://host:port``: one clock per host, whatever the
path) in ``DATA_DIR/clock-offsets.json``, the last :data:`KEEP` each, written aside and renamed
into place under an ``flock`` (the server's publisher thread and an ``xdsi publish`` may both be
writing).  Observing never raises and never delays the caller beyond that small write.

The transports call :func:`observe` as a ``requests`` response hook (a public ``requests``
extension point, so zeep's transport is not subclassed further for it).  Which data directory
the readings go to is process-wide, like logging, and set once by the command that talks to
peers (:func:`install`): the zeep clients are built deep inside the publisher, and passing a
data directory down to each would couple XDS code to status bookkeeping.
"""

from __future__ import annotations

import email.utils
import fcntl
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import urlsplit

__all__ = [
    "FILE_NAME",
    "KEEP",
    "LIMIT",
    "ClockBook",
    "Reading",
    "install",
    "installed",
    "observe",
    "offset_from",
    "peer_of",
    "uninstall",
]

log = logging.getLogger(__name__)

FILE_NAME = "clock-offsets.json"
KEEP = 20  # readings kept per peer
LIMIT = 1.0  # seconds: IHE Consistent Time's one second
_TRUNCATION = 0.5  # an HTTP-date is truncated to the second: the peer's clock was in [Date, Date + 1)


@dataclass(frozen=True)
class Reading:
    """One look at a peer's clock: when (our clock, UTC), how far off it was, and how sure we are."""

    at: datetime  # our clock at the midpoint of the exchange, UTC
    offset: float  # seconds; positive: the peer's clock is ahead of ours
    uncertainty: float  # seconds either way (the Date's truncation and half the exchange's duration)

    @property
    def flagged(self) -> bool:
        return abs(self.offset) > LIMIT

    def as_json(self) -> dict[str, Any]:
        return {"at": self.at.isoformat(timespec="milliseconds"), "offset": round(self.offset, 3), "uncertainty": round(self.uncertainty, 3)}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> "Reading":
        at = datetime.fromisoformat(str(doc["at"]))
        if at.tzinfo is None:
            raise ValueError("a reading's time must carry its offset")
        return cls(at.astimezone(timezone.utc), float(doc["offset"]), float(doc["uncertainty"]))


def offset_from(date_header: str, sent: float, received: float) -> Reading | None:
    """The reading one exchange gives: ``sent`` / ``received`` are our ``time.time()`` around it; None if no usable Date."""
    try:
        peer = email.utils.parsedate_to_datetime(date_header)
    except (TypeError, ValueError, IndexError):
        return None
    if peer is None:
        return None
    if peer.tzinfo is None:  # asctime() form: no zone written, but an HTTP-date is always GMT (RFC 9110 5.6.7)
        peer = peer.replace(tzinfo=timezone.utc)
    duration = max(0.0, received - sent)
    midpoint = sent + duration / 2
    offset = peer.timestamp() + _TRUNCATION - midpoint
    return Reading(datetime.fromtimestamp(midpoint, timezone.utc), offset, _TRUNCATION + duration / 2)


def peer_of(url: str) -> str:
    """``scheme://host:port`` of a URL: one clock per host, whichever service on it answered."""
    parts = urlsplit(url)
    port = parts.port or {"https": 443, "http": 80}.get(parts.scheme, 0)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}:{port}"


class ClockBook:
    """The readings kept in one data directory: the last :data:`KEEP` per peer."""

    def __init__(self, data_dir: Path, keep: int = KEEP) -> None:
        self.path = Path(data_dir) / FILE_NAME
        self.keep = keep
        self._lock = threading.Lock()

    def record(self, peer: str, reading: Reading) -> None:
        """Add a reading; the file is rewritten aside and renamed, under a lock other processes respect too."""
        with self._lock, self._locked():
            doc = self._load()
            readings = doc.setdefault(peer, [])
            readings.append(reading.as_json())
            del readings[: max(0, len(readings) - self.keep)]
            tmp = self.path.with_name(f".{FILE_NAME}.{os.getpid()}.{threading.get_ident()}")
            tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")
            os.replace(tmp, self.path)

    def peers(self) -> dict[str, list[Reading]]:
        """Every peer's readings, oldest first; a damaged file reads as no readings (it is only a witness)."""
        out: dict[str, list[Reading]] = {}
        for peer, rows in self._load().items():
            try:
                out[peer] = [Reading.from_json(r) for r in rows]
            except (KeyError, TypeError, ValueError):
                log.warning("%s: unreadable readings for %s ignored", self.path, peer)
        return out

    def _load(self) -> dict[str, list[dict[str, Any]]]:
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("%s unreadable (%s): starting a new one", self.path, exc)
            return {}
        if not isinstance(doc, dict):
            return {}
        return {str(k): list(v) for k, v in doc.items() if isinstance(v, list)}

    def _locked(self) -> "_FileLock":
        return _FileLock(self.path.with_name(f".{FILE_NAME}.lock"))


class _FileLock:
    """``flock`` on a side file: one writer at a time across processes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> "_FileLock":
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


# -- the process-wide book and the requests hook ------------------------------------------------------

_BOOK: ClockBook | None = None


def install(data_dir: Path) -> ClockBook:
    """Readings of this process go to ``data_dir`` from now on (``xdsi serve``, ``xdsi publish``)."""
    global _BOOK
    _BOOK = ClockBook(data_dir)
    return _BOOK


def uninstall() -> None:
    global _BOOK
    _BOOK = None


def installed() -> ClockBook | None:
    return _BOOK


def observe(response: Any, *args: Any, **kwargs: Any) -> Any:
    """``requests`` response hook: note the peer's ``Date`` against our clock. Never raises; returns the response.

    Called by requests as soon as the response head is parsed (before the body is read), so
    ``time.time()`` here and ``Response.elapsed`` bracket the exchange.
    """
    book = _BOOK
    if book is None:
        return response
    try:
        received = time.time()
        date = response.headers.get("Date")
        if date:
            reading = offset_from(date, received - response.elapsed.total_seconds(), received)
            if reading is not None:
                book.record(peer_of(response.url), reading)
                if reading.flagged:
                    log.warning("clock: %s is %+.1f s from ours (+-%.1f s); IHE Consistent Time wants under %g s: check NTP here and there",
                                peer_of(response.url), reading.offset, reading.uncertainty, LIMIT)
    except Exception as exc:  # a witness must never break the exchange it watches
        log.debug("clock reading from %s not kept: %s", getattr(response, "url", "?"), exc)
    return response


def latest(readings: list[Reading]) -> Reading | None:
    return readings[-1] if readings else None


def median_offset(readings: list[Reading]) -> float | None:
    """The median of the kept offsets: what IHE CT's one second is about, less noisy than one reading."""
    if not readings:
        return None
    xs = sorted(r.offset for r in readings)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def report(data_dir: Path) -> Iterator[str]:
    """``xdsi status`` lines: per peer the latest offset and when, the median, and a flag beyond one second."""
    book = ClockBook(data_dir)
    peers = book.peers()
    if not peers:
        yield "clock:      no readings yet (offsets are read from the Date of XDS registry, repository and PIXm answers)"
        return
    yield f"clock:      offsets seen from peers' HTTP Date (IHE CT: within {LIMIT:g} s)"
    for peer, readings in sorted(peers.items()):
        last = latest(readings)
        assert last is not None
        med = median_offset(readings)
        flag = f"  ** more than {LIMIT:g} s off **" if last.flagged or abs(med or 0.0) > LIMIT else ""
        yield (f"  {peer}: {last.offset:+.2f} s (+-{last.uncertainty:.2f}) at {last.at:%Y-%m-%dT%H:%M:%SZ}, "
               f"median {med:+.2f} s of {len(readings)}{flag}")
