"""``[[routes]]`` and ``[routing]``: which instances go where, and how the queue retries.

A route is a set of conditions (every one must match; a condition holding a
list matches when any of its patterns does) and the destinations an instance
matching them is forwarded to::

    [[routes]]
    name = "ct-to-reading-room"
    calling_aet = "CT1"                  # glob, case-insensitive; "re:CT[0-9]+" is a regular expression
    modality = ["CT", "PT"]
    destinations = ["WSA", "https://pacs.example.org/dicomweb"]   # [peers.WSA] with host/port, or a STOW-RS base URL
    delay = 60                           # seconds the study must have been unchanged before sending
    transfer_syntax = "1.2.840.10008.1.2.1"   # "" (default): as stored
    priority = "high"                    # high | medium (default) | low: queue order and C-STORE Priority

Parsed here, outside :mod:`xdsi.config`, so the routing engine keeps its own
vocabulary; ``config`` calls :func:`routing_from` and keeps the results at
the end of :class:`xdsi.config.Settings`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from xdsi.routing.conditions import CONDITION_KEYS, Condition, compile_patterns

PRIORITIES = {"high": 2, "medium": 1, "low": 0}  # queue order, higher first
DIMSE_PRIORITY = {2: 1, 1: 0, 0: 2}  # queue priority -> C-STORE Priority (PS3.7 9.3.1.1: 0 medium, 1 high, 2 low)
ROUTE_KEYS = {"name", "destinations", "delay", "transfer_syntax", "priority", *CONDITION_KEYS}
ROUTING_KEYS = {"retry_initial", "retry_max", "retry_factor", "max_attempts", "poll_interval", "batch", "stow_timeout", "parallel"}
MANUAL = "manual"  # RouteForward.route of what `xdsi route` queues


@dataclass(frozen=True)
class Route:
    """One ``[[routes]]`` table, its patterns compiled."""

    name: str
    conditions: tuple[Condition, ...]
    destinations: tuple[str, ...]
    delay: int = 0
    transfer_syntax: str = ""
    priority: int = PRIORITIES["medium"]

    @property
    def uses(self) -> frozenset[str]:
        """The attributes its conditions read (so that costly ones are looked up only when a route needs them)."""
        return frozenset(c.key for c in self.conditions)


@dataclass(frozen=True)
class RoutingSettings:
    """``[routing]``: the queue's retry schedule and pacing."""

    retry_initial: float = 10.0  # seconds before the first retry; doubled (retry_factor) up to retry_max
    retry_max: float = 600.0
    retry_factor: float = 2.0
    max_attempts: int = 0  # 0: retry for ever (`xdsi status` shows the failing rows); else give up after that many
    poll_interval: float = 1.0  # how often the worker looks for due rows and new instances when nothing wakes it
    batch: int = 100  # instances sent on one association / in one STOW-RS request
    stow_timeout: float = 120.0  # seconds a STOW-RS request may take (connect and each read)
    parallel: int = 4  # destinations sent to at once (one association or request each): one slow peer does not hold up the others


def is_url(destination: str) -> bool:
    return destination.startswith(("http://", "https://"))


def _error(message: str) -> Exception:
    from xdsi.config import ConfigError

    return ConfigError(message)


def _seconds(where: str, value: object, *, zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (value == 0 and not zero):
        raise _error(f"{where} must be a number of seconds {'>= 0' if zero else '> 0'}, not {value!r}")
    return float(value)


def _strings(where: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise _error(f"{where} must be a string or a non-empty list of strings, not {value!r}")


def routing_settings_from(raw: object) -> RoutingSettings:
    from xdsi.config import _check_keys

    t = _check_keys("[routing]", raw, ROUTING_KEYS)
    kw: dict[str, Any] = {}
    for key in ("retry_initial", "retry_max", "poll_interval", "stow_timeout"):
        if key in t:
            kw[key] = _seconds(f"[routing] {key}", t[key])
    if "retry_factor" in t:
        f = t["retry_factor"]
        if isinstance(f, bool) or not isinstance(f, (int, float)) or f < 1:
            raise _error(f"[routing] retry_factor must be a number >= 1, not {f!r}")
        kw["retry_factor"] = float(f)
    for key, low in (("max_attempts", 0), ("batch", 1), ("parallel", 1)):
        if key in t:
            v = t[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise _error(f"[routing] {key} must be an integer >= {low}, not {v!r}")
            kw[key] = v
    s = RoutingSettings(**kw)
    if s.retry_max < s.retry_initial:
        raise _error(f"[routing] retry_max ({s.retry_max:g}) is less than retry_initial ({s.retry_initial:g})")
    return s


def route_from(i: int, raw: object, peers: Mapping[str, Any]) -> Route:
    from xdsi.config import _check_keys, validate_ae_title

    t = _check_keys(f"[[routes]] #{i + 1}", raw, ROUTE_KEYS)
    name = t.get("name", f"route-{i + 1}")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", name) or name == MANUAL:
        raise _error(f"[[routes]] #{i + 1} name must be 1-64 letters, digits, '_', '.', ':' or '-' (and not {MANUAL!r}), not {name!r}")
    where = f"[[routes]] {name!r}"
    if "destinations" not in t:
        raise _error(f"{where} needs destinations (AE titles from [peers] with host and port, or STOW-RS URLs)")
    destinations: list[str] = []
    for d in _strings(f"{where} destinations", t["destinations"]):
        if is_url(d):
            destinations.append(d.rstrip("/"))
            continue
        aet = validate_ae_title(d, f"{where} destination")
        if aet not in peers:
            raise _error(f"{where} destination {aet!r} has no [peers.{aet}] table with host and port (or give an http(s):// STOW-RS URL)")
        destinations.append(aet)
    conditions = tuple(
        Condition(key, compile_patterns(f"{where} {key}", _strings(f"{where} {key}", t[key]), _error))
        for key in sorted(CONDITION_KEYS) if key in t
    )
    delay = t.get("delay", 0)
    if isinstance(delay, bool) or not isinstance(delay, int) or delay < 0:
        raise _error(f"{where} delay must be a whole number of seconds >= 0, not {delay!r}")
    ts = t.get("transfer_syntax", "")
    if not isinstance(ts, str):
        raise _error(f"{where} transfer_syntax must be a transfer syntax UID or \"\", not {ts!r}")
    if ts:
        from pydicom.uid import UID

        if not UID(ts).is_transfer_syntax:
            raise _error(f"{where} transfer_syntax {ts!r} is not a transfer syntax UID pydicom knows")
    prio = t.get("priority", "medium")
    if prio not in PRIORITIES:
        raise _error(f"{where} priority must be one of {', '.join(PRIORITIES)}, not {prio!r}")
    return Route(name, conditions, tuple(dict.fromkeys(destinations)), delay, ts, PRIORITIES[prio])


def routes_from(raw: object, peers: Mapping[str, Any]) -> tuple[Route, ...]:
    """``[[routes]]`` (an array of tables), destinations checked against ``peers`` ([peers.AET] with host/port)."""
    if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
        raise _error("routes must be an array of tables: [[routes]]")
    routes = tuple(route_from(i, r, peers) for i, r in enumerate(raw))
    names = [r.name for r in routes]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise _error(f"[[routes]] names must be unique: {', '.join(dup)}")
    return routes
