"""The durable audit spool: every message waits here until each repository has taken it.

Why SQLite on disk: a message must survive a repository outage and an xdsi restart
("nothing lost"), and the order of delivery must be the order of the events.  A
single table with an autoincrement sequence gives the order; one cursor row per
repository records the last sequence number that repository took, committed only
after the send succeeded, so a restart resumes exactly where delivery stopped and a
message is never sent twice to the same repository on our account.

The spool is bounded (``[audit] spool_max_messages``): when it is full a new message
is refused, counted and logged as an error, never silently dropped, and never at the
cost of an older message (the older one is the evidence already owed).
"""

from __future__ import annotations

import datetime as dt
import logging
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

__all__ = ["AuditSpool", "SpoolStatus", "SpoolFull"]

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS message (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    created TEXT NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS cursor (
    repository TEXT PRIMARY KEY,
    delivered INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS counter (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


class SpoolFull(RuntimeError):
    """The spool holds ``spool_max_messages`` undelivered messages; the new one was refused."""


@dataclass(frozen=True)
class SpoolStatus:
    """What ``xdsi status`` prints: depth per repository, the oldest waiting message, refusals."""

    depth: dict[str, int]
    oldest_pending: dt.datetime | None
    refused: int


class AuditSpool:
    """Messages in order, with a delivery cursor per repository; safe across threads and restarts."""

    def __init__(self, path: Path, repositories: Sequence[str], max_messages: int = 100_000) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_messages = max_messages
        self.repositories = tuple(repositories)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed message is on disk before put() returns
        self._db.executescript(_SCHEMA)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            # a repository added to the configuration starts at the present: history before it was configured
            # is not replayed to it (it never asked for it); a removed one stops holding messages back
            top = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM message").fetchone()[0]
            for repo in self.repositories:
                self._db.execute("INSERT OR IGNORE INTO cursor (repository, delivered) VALUES (?, ?)", (repo, top))
            marks = ",".join("?" * len(self.repositories))
            self._db.execute(f"DELETE FROM cursor WHERE repository NOT IN ({marks})", self.repositories)
            self._trim()
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def put(self, body: bytes, at: dt.datetime | None = None) -> int | None:
        """Store one framed message for every repository; returns its sequence number.

        Raises :class:`SpoolFull` when the bound is reached (the caller logs it; an audit
        failure never fails the DICOM or HTTP request that caused it).  With no
        repository configured nothing is kept and ``None`` is returned.
        """
        if not self.repositories:
            return None
        at = at or dt.datetime.now(dt.timezone.utc)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                count = self._db.execute("SELECT COUNT(*) FROM message").fetchone()[0]
                if count >= self.max_messages:
                    self._db.execute(
                        "INSERT INTO counter (name, value) VALUES ('refused', 1) ON CONFLICT(name) DO UPDATE SET value = value + 1"
                    )
                    self._db.execute("COMMIT")
                    raise SpoolFull(f"audit spool {self.path} holds {count} undelivered message(s), the [audit] spool_max_messages bound")
                cur = self._db.execute("INSERT INTO message (created, body) VALUES (?, ?)", (at.astimezone(dt.timezone.utc).isoformat(), body))
                self._db.execute("COMMIT")
            except SpoolFull:
                raise
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return int(cur.lastrowid or 0)

    def pending(self, repository: str, limit: int = 100) -> list[tuple[int, bytes]]:
        """The next messages ``repository`` has not taken, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, body FROM message WHERE seq > (SELECT delivered FROM cursor WHERE repository = ?) ORDER BY seq LIMIT ?",
                (repository, limit),
            ).fetchall()
        return [(int(s), bytes(b)) for s, b in rows]

    def delivered(self, repository: str, seq: int) -> None:
        """Record that ``repository`` took every message up to ``seq``; drop those all repositories took."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("UPDATE cursor SET delivered = MAX(delivered, ?) WHERE repository = ?", (seq, repository))
            self._trim()
            self._db.execute("COMMIT")

    def _trim(self) -> None:
        self._db.execute("DELETE FROM message WHERE seq <= (SELECT COALESCE(MIN(delivered), 1 << 62) FROM cursor)")

    def status(self) -> SpoolStatus:
        with self._lock:
            depth = {
                repo: int(n)
                for repo, n in self._db.execute(
                    "SELECT c.repository, (SELECT COUNT(*) FROM message m WHERE m.seq > c.delivered) FROM cursor c ORDER BY c.repository"
                )
            }
            oldest = self._db.execute(
                "SELECT MIN(created) FROM message WHERE seq > (SELECT COALESCE(MIN(delivered), 1 << 62) FROM cursor)"
            ).fetchone()[0]
            refused = self._db.execute("SELECT value FROM counter WHERE name = 'refused'").fetchone()
        return SpoolStatus(depth, dt.datetime.fromisoformat(oldest) if oldest else None, int(refused[0]) if refused else 0)
