"""The Security Alert budget of :class:`~xdsi.audit.ratelimit.AlertLimiter`, shared by the worker processes of a node.

"At most ``per_key`` alerts per refused peer and ``interval``" is a promise about what reaches the
audit repository, so with ``xdsi serve --workers N`` it must hold for the node: a peer whose refused
associations land on two workers would otherwise be alerted twice as often.  The limiter's state (the
window per key, the token bucket per kind, the count held back) lives in a small SQLite database
that every worker opens, and each decision is one ``BEGIN IMMEDIATE`` transaction on it, so the
workers take turns.  ``synchronous=OFF``: this is rate-limiting state, not evidence (the alerts
themselves go to the durable audit spool), so a decision costs no fsync; lost at a crash, it only
lets the next alert through.  ``time.monotonic`` is CLOCK_MONOTONIC, one clock for every process.
Should the database fail, the decision falls back to this process's own in-memory limiter and says so
in the log: an alert is never lost to the limiter's own trouble.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path
from typing import Hashable

from xdsi.audit.ratelimit import AlertLimiter

__all__ = ["SharedAlertLimiter"]

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS window (key TEXT PRIMARY KEY, start REAL NOT NULL, sent INTEGER NOT NULL, quiet INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS bucket (kind TEXT PRIMARY KEY, tokens REAL NOT NULL, refilled REAL NOT NULL);
CREATE TABLE IF NOT EXISTS held (id INTEGER PRIMARY KEY CHECK (id = 0), n INTEGER NOT NULL);
"""


class SharedAlertLimiter(AlertLimiter):
    """:class:`AlertLimiter`'s rules over state shared through ``path`` (SQLite)."""

    def __init__(self, path: Path, **kw: float | int) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=5.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.executescript(_SCHEMA)
        self._failed = False

    def admit(self, key: Hashable) -> str | None:
        with self._lock:
            try:
                return self._admit(key)
            except sqlite3.Error as exc:
                try:
                    self._db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                if not self._failed:
                    log.error("shared alert budget %s unusable (%s); this process counts alone", self.path, exc)
                    self._failed = True
        return super().admit(key)

    def _admit(self, key: Hashable) -> str | None:
        db = self._db
        now = time.monotonic()
        kind = repr(key[0] if isinstance(key, tuple) and key else key)
        k = repr(key)
        db.execute("BEGIN IMMEDIATE")
        row = db.execute("SELECT tokens, refilled FROM bucket WHERE kind = ?", (kind,)).fetchone()
        tokens, refilled = (float(row[0]), float(row[1])) if row else (self.burst, now)
        tokens = min(self.burst, tokens + max(0.0, now - refilled))
        row = db.execute("SELECT start, sent, quiet FROM window WHERE key = ?", (k,)).fetchone()
        start, sent, quiet = (float(row[0]), int(row[1]), int(row[2])) if row else (float("-inf"), 0, 0)
        if now - start >= self.interval:
            start, sent = now, 0
        note: str | None = None
        if sent >= self.per_key:
            db.execute("INSERT OR REPLACE INTO window VALUES (?, ?, ?, ?)", (k, start, sent, quiet + 1))
        elif tokens < 1:
            db.execute("INSERT INTO held VALUES (0, 1) ON CONFLICT(id) DO UPDATE SET n = n + 1")
        else:
            tokens -= 1
            if row is None and db.execute("SELECT COUNT(*) FROM window").fetchone()[0] >= self.max_keys:
                db.execute("DELETE FROM window")  # many peers: forget the old ones rather than grow
            db.execute("INSERT OR REPLACE INTO window VALUES (?, ?, ?, 0)", (k, start, sent + 1))
            h = db.execute("SELECT n FROM held WHERE id = 0").fetchone()
            held = int(h[0]) if h else 0
            db.execute("DELETE FROM held")
            note = (f" ({quiet} more such refusal(s) not alerted separately)" if quiet else "") + (
                f" ({held} other refusal(s) not alerted: too many at once)" if held else "")
        db.execute("INSERT OR REPLACE INTO bucket VALUES (?, ?, ?)", (kind, tokens, now))
        db.execute("COMMIT")
        return note

    def close(self) -> None:
        with self._lock:
            self._db.close()
