"""How often a refusal may become a Security Alert: a peer that repeats a refused request in a loop
(or cycles through AE titles, tokens or paths) must not fill the bounded audit spool and crowd out
the records of patient data, nor cost a disk write per attempt.

One limiter per audit trail, shared by every interface (DIMSE associations and operations, HTTP
401/403, XUA): at most ``per_key`` alerts per key (who was refused, how and why) and ``interval``
seconds, so a client that simply tries twice is audited twice, and ``burst`` alerts at once per
kind of refusal (the key's first element: association, operation, http, xua), refilled at one per
second, so that no mix of keys can flood the spool either, and a flood of refused associations
does not silence the alerts about known peers overstepping their rights.  What was held back is counted and said in the next alert
that goes out for the same key (or, for the overall budget, the next alert at all), so the record
still tells how many refusals there were.
"""

from __future__ import annotations

import threading
import time
from typing import Hashable

__all__ = ["AlertLimiter"]


class AlertLimiter:
    def __init__(self, interval: float = 10.0, burst: float = 20.0, per_key: int = 3, max_keys: int = 4096) -> None:
        self.interval = interval
        self.per_key = per_key
        self.burst = burst
        self.max_keys = max_keys
        self._lock = threading.Lock()
        self._last: dict[Hashable, tuple[float, int, int]] = {}  # key -> (window start, alerts in it, held back since)
        self._tokens: dict[Hashable, tuple[float, float]] = {}  # kind -> (tokens, when refilled)
        self._held_overall = 0

    def admit(self, key: Hashable) -> str | None:
        """None: hold this alert back.  Else the note to append to the alert's description ("" when none)."""
        now = time.monotonic()
        kind = key[0] if isinstance(key, tuple) and key else key
        with self._lock:
            tokens, refilled = self._tokens.get(kind, (self.burst, now))
            tokens = min(self.burst, tokens + max(0.0, now - refilled))
            self._tokens[kind] = (tokens, now)
            start, sent, quiet = self._last.get(key, (float("-inf"), 0, 0))
            if now - start >= self.interval:
                start, sent = now, 0
            if sent >= self.per_key:
                self._last[key] = (start, sent, quiet + 1)
                return None
            if tokens < 1:
                self._held_overall += 1
                return None
            self._tokens[kind] = (tokens - 1, now)
            if key not in self._last and len(self._last) >= self.max_keys:  # many peers: forget the old ones rather than grow
                self._last.clear()
            self._last[key] = (start, sent + 1, 0)
            held, self._held_overall = self._held_overall, 0
        note = f" ({quiet} more such refusal(s) not alerted separately)" if quiet else ""
        return note + (f" ({held} other refusal(s) not alerted: too many at once)" if held else "")
