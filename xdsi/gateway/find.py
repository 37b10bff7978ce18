"""C-FIND forwarded to remote archives in parallel, answers merged and de-duplicated by UID.

Each remote that offers ``find`` gets the requester's identifier on an association of its own, in a
thread of its own; matches are passed on as they arrive (the requester sees the first match after
the fastest remote's first match, not after the slowest remote's last), each entity once: the
first answer for a Study/Series/SOP Instance UID (Patient ID at PATIENT level) wins.  The key is
added to what we forward when the requester did not ask for it, and removed from what we return.

Statuses (PS3.4 C.4.1.1.4): the requester's C-CANCEL is passed on to every remote still answering
and answered FE00 Cancel; a remote that fails, cannot be reached or does not finish within its
``find_timeout`` does not fail the whole query: the final status is then B001 (a Warning: "matching
reached response limit, subsequent request may return additional matches", the one C-FIND status
that says "this answer may be incomplete") with an Error Comment naming the remote(s), instead of
the silent Success a dropped remote would give.  Only when every remote failed and nothing matched
is the answer a Failure (A700 Out of Resources: no archive could answer).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

from pydicom.dataset import Dataset
from pynetdicom.status import Status

from xdsi.gateway.remotes import RemoteClient, RemoteUnavailable, next_message_id, qr_contexts

log = logging.getLogger(__name__)

UNIQUE_KEY = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}
INCOMPLETE_WARNING = 0xB001
OUT_OF_RESOURCES = 0xA700
PENDING = (0xFF00, 0xFF01)
POLL = 0.05  # how often the requester's C-CANCEL is looked for while waiting for remotes


def status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


@dataclass
class _Source:
    """One remote being asked: its thread, association (for C-CANCEL and abort) and outcome."""

    client: RemoteClient
    msg_id: int
    assoc: Any = None
    done: bool = False
    problem: str | None = None
    cancel_sent: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def name(self) -> str:
        return self.client.remote.name


def _ask(src: _Source, identifier: Dataset, model: str, out: "queue.Queue[tuple[_Source, Any]]") -> None:
    """Thread body: the remote's matches into ``out``, then ``(src, None)`` when it is over."""
    try:
        with src.client.association(qr_contexts(model)) as assoc:
            with src.lock:
                src.assoc = assoc
            for st, ds in assoc.send_c_find(identifier, model, msg_id=src.msg_id):
                code = getattr(st, "Status", None)
                if code is None:
                    src.problem = src.problem or "no response (timed out or aborted)"
                    break
                if code in PENDING:
                    if ds is not None:
                        out.put((src, ds))
                    continue
                if code == Status.CANCEL and src.cancel_sent:
                    break
                if code not in (0x0000,):
                    comment = str(getattr(st, "ErrorComment", "") or "")
                    src.problem = src.problem or f"status 0x{code:04X}" + (f" {comment}" if comment else "")
                break
    except RemoteUnavailable as exc:
        log.warning("C-FIND forwarded: %s", exc)
        src.problem = src.problem or "unreachable"  # a timeout already reported stays the reason
    except Exception as exc:  # a remote that answers nonsense must not take the query down
        log.warning("C-FIND forwarded to %s failed: %s: %s", src.client, exc.__class__.__name__, exc)
        src.problem = src.problem or f"{exc.__class__.__name__}"
    finally:
        out.put((src, None))


def forward_find(
    event: Any, identifier: Dataset, model: str, clients: Sequence[RemoteClient], local: Iterable[Dataset] = ()
) -> Iterator[tuple[Any, Dataset | None]]:
    """The EVT_C_FIND handler's (status, identifier) pairs for a query forwarded to ``clients``.

    ``local``: matches of our own archive to merge first (none in forward mode).
    """
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    key = UNIQUE_KEY.get(level)
    asked = Dataset()
    asked.update(identifier)
    added_key = key is not None and key not in identifier
    if added_key:
        setattr(asked, key, "")
    seen: set[str] = set()

    def fresh(ds: Dataset) -> Dataset | None:
        if key is not None:
            value = str(ds.get(key, "") or "")
            if value:
                if value in seen:
                    return None
                seen.add(value)
            if added_key and key in ds:
                delattr(ds, key)
        return ds

    for ds in local:
        if event.is_cancelled:
            yield Status.CANCEL, None
            return
        if (ds := fresh(ds)) is not None:
            yield Status.PENDING, ds

    out: "queue.Queue[tuple[_Source, Any]]" = queue.Queue()
    sources = [_Source(c, next_message_id()) for c in clients]
    for src in sources:
        threading.Thread(target=_ask, args=(src, asked, model, out), name=f"find-{src.name}", daemon=True).start()
    deadline = {id(s): time.monotonic() + s.client.remote.find_timeout for s in sources}
    running = len(sources)
    matched = 0
    while running:
        if event.is_cancelled:
            _cancel(sources, model)
            yield Status.CANCEL, None
            return
        try:
            src, ds = out.get(timeout=POLL)
        except queue.Empty:
            now = time.monotonic()
            for s in sources:
                if not s.done and now > deadline[id(s)] and s.problem is None:
                    s.problem = f"no answer in {s.client.remote.find_timeout:g} s"
                    log.warning("C-FIND forwarded to %s: %s; answering without it", s.client, s.problem)
                    s.done = True  # not waited for any more; its thread ends on its own (abort, or its connect timeout)
                    running -= 1
                    _abort(s)
            continue
        if ds is None:
            if not src.done:
                src.done = True
                running -= 1
            continue
        if src.problem is not None:  # timed out already: its late matches are not mixed in
            continue
        if (ds := fresh(ds)) is not None:
            matched += 1
            yield Status.PENDING, ds
    failed = [s for s in sources if s.problem is not None]
    for s in failed:
        log.warning("C-FIND forwarded to %s: %s", s.client, s.problem)
    if failed and len(failed) == len(sources) and not matched and not seen:
        yield status(OUT_OF_RESOURCES, "no remote answered: " + "; ".join(f"{s.name} {s.problem}" for s in failed)), None
    elif failed:  # the Error Comment holds 64 characters: names first, so every failed remote is named
        names = ", ".join(s.name for s in failed)
        yield status(INCOMPLETE_WARNING, f"incomplete: {names}: " + "; ".join(str(s.problem) for s in failed)), None
    else:
        yield Status.SUCCESS, None


def _cancel(sources: Sequence[_Source], model: str) -> None:
    """C-CANCEL to every remote still answering (PS3.7 9.3.2.3); its thread ends on the Cancel response."""
    for s in sources:
        with s.lock:
            assoc = s.assoc
        if s.done or assoc is None or s.cancel_sent:
            continue
        s.cancel_sent = True
        try:
            assoc.send_c_cancel(s.msg_id, query_model=model)
        except Exception as exc:  # already released
            log.debug("C-CANCEL to %s: %s", s.client, exc)


def _abort(s: _Source) -> None:
    with s.lock:
        assoc = s.assoc
    if assoc is not None:
        try:
            assoc.abort()
        except Exception:  # pragma: no cover - already gone
            pass


def find_each(identifier: Dataset, model: str, clients: Sequence[RemoteClient]) -> tuple[list[tuple[RemoteClient, Dataset]], dict[str, str]]:
    """One C-FIND to each of ``clients`` in parallel, for callers that are not a requester's association (prefetch).

    Unlike :func:`forward_find` nothing is merged: each match comes with the remote that answered it (the
    caller retrieves from the remote that holds the study).  A remote that fails or does not finish within
    its ``find_timeout`` is left out with its reason in the second value (remote name -> problem); what it
    answered until then is not used, as a partial answer could make "the last N studies" wrong.
    """
    out: "queue.Queue[tuple[_Source, Any]]" = queue.Queue()
    sources = [_Source(c, next_message_id()) for c in clients]
    for src in sources:
        threading.Thread(target=_ask, args=(src, identifier, model, out), name=f"find-{src.name}", daemon=True).start()
    deadline = {id(s): time.monotonic() + s.client.remote.find_timeout for s in sources}
    answers: dict[int, list[Dataset]] = {id(s): [] for s in sources}
    running = len(sources)
    while running:
        try:
            src, ds = out.get(timeout=POLL)
        except queue.Empty:
            now = time.monotonic()
            for s in sources:
                if not s.done and now > deadline[id(s)]:
                    s.problem = s.problem or f"no answer in {s.client.remote.find_timeout:g} s"
                    s.done = True
                    running -= 1
                    _abort(s)
            continue
        if ds is None:
            if not src.done:
                src.done = True
                running -= 1
        elif not src.done:
            answers[id(src)].append(ds)
    matches = [(s.client, ds) for s in sources if s.problem is None for ds in answers[id(s)]]
    return matches, {s.name: str(s.problem) for s in sources if s.problem is not None}
