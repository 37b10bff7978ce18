"""The routing queue's state for ``GET /status`` and ``xdsi status`` (issue 15): depth and failures per destination.

One shape for both, computed by :meth:`xdsi.routing.queue.RouteQueue.summary` (which the status line
of ``xdsi status`` already used), so monitoring and the operator read the same figures; partitions
each have their own index and therefore their own queue.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from xdsi.routing.models import GAVE_UP, PENDING, SENDING, SENT


def _iso(value: Any) -> str | None:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value is not None else None


def queue_status(index: Any, settings: Any) -> dict[str, Any]:
    """``{"queued", "failing", "given_up", "destinations": {dest: {...}}}`` of the queue in ``index``.

    ``queued`` counts rows pending or being sent; ``failing`` those still open after a failed attempt;
    ``given_up`` those past the retry limit; each destination also has ``sent`` and its last error."""
    from xdsi.routing.queue import RouteQueue

    summary = RouteQueue(SimpleNamespace(index=index, settings=settings), settings.routes, settings.routing).summary()
    dests: dict[str, Any] = {}
    for d in summary:
        st = d["states"]
        error, at, retry = d["last_error"] or (None, None, None)
        dests[d["destination"]] = {
            "queued": st.get(PENDING, 0) + st.get(SENDING, 0),
            "failing": d["failing"],
            "sent": st.get(SENT, 0),
            "given_up": st.get(GAVE_UP, 0),
            "last_error": error,
            "last_error_at": _iso(at),
            "next_attempt_at": _iso(retry),
        }
    return {
        "queued": sum(d["queued"] for d in dests.values()),
        "failing": sum(d["failing"] for d in dests.values()),
        "given_up": sum(d["given_up"] for d in dests.values()),
        "destinations": dests,
    }
