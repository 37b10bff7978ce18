"""Sending a batch of claimed forwards: C-STORE to a ``[peers]`` AE, or STOW-RS to a DICOMweb base URL.

C-STORE goes through the archive's outbound DIMSE code, not a copy of it:
:class:`xdsi.dimse.server.ArchiveAE` opens the association (TCP_NODELAY, our
streaming sender installed), :func:`xdsi.dimse.sending.contexts_for` proposes
the stored syntaxes then the native ones, and each instance is a
:class:`~xdsi.dimse.sending.StoredInstance` placeholder that the sender produces
(recalled, converted if the destination refused its stored syntax) and streams
from the file.  A route's ``transfer_syntax`` proposes only that syntax, so the
destination gets it or refuses the context (the forward fails with that reason).

STOW-RS posts ``multipart/related; type="application/dicom"`` to
``{url}/studies``, the parts streamed from the produced files (chunked
transfer coding, never the batch in memory).  200 means every part was stored;
202 and 409 are read for the Referenced and Failed SOP Sequences (PS3.18
10.5.3); anything else fails the whole batch with the HTTP status and text.

Each instance's outcome is reported through ``report(claim, ok, error, final)``
as soon as it is known, so the queue records it before the next one is sent.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from contextlib import ExitStack
from typing import Any, Callable, Iterator, Sequence

from xdsi.routing.queue import Claimed
from xdsi.routing.settings import DIMSE_PRIORITY, RoutingSettings, is_url

log = logging.getLogger(__name__)

Report = Callable[[Claimed, bool, str, bool], None]  # (claim, ok, error, final)
NOT_ARCHIVED = "the instance is no longer archived"


def send_batch(archive: Any, claims: Sequence[Claimed], settings: RoutingSettings, report: Report, stopping: Callable[[], bool]) -> list[Claimed]:
    """Send ``claims`` (one destination, one transfer syntax); returns the claims not attempted (stopping)."""
    if not claims:
        return []
    # read_stamps: a copy read (or stored) within the last minutes is not stamped again per instance (profiled: 11 %)
    refs = {r.sop_instance_uid: r for r in archive.retrieve.select(sop_uids=[c.sop_instance_uid for c in claims], read_stamps=True)}
    todo = []
    for c in claims:
        if c.sop_instance_uid in refs:
            todo.append(c)
        else:
            report(c, False, NOT_ARCHIVED, True)
    if not todo:
        return []
    audit = _audit(archive, todo, refs)
    if audit is not None:
        plain = report

        def report(c: Claimed, ok: bool, error: str, final: bool) -> None:  # noqa: F811 - the same, audited
            plain(c, ok, error, final)
            audit.sent(refs[c.sop_instance_uid], ok, error)

    left: list[Claimed] = []
    try:
        if is_url(todo[0].destination):
            left = _stow(archive, todo, refs, settings, report, stopping)
        else:
            left = _c_store(archive, todo, refs, report, stopping)
        return left
    finally:
        if audit is not None:
            audit.end("stopping: sent again later" if left else None)


def _audit(archive: Any, claims: Sequence[Claimed], refs: dict[str, Any]) -> Any:
    """Begin Transferring (per study) recorded now, Instances Transferred when the batch ends (xdsi.audit.hub), or None
    without [audit].  The destination: the peer's AE title and host, or the DICOMweb URL and its host."""
    from urllib.parse import urlsplit

    from xdsi.audit import hub
    from xdsi.audit import messages as m

    if hub.trail_of(archive) is None:
        return None
    dest = claims[0].destination
    if is_url(dest):
        receiver = m.Participant(dest, False, network_access_point=urlsplit(dest).hostname or None)
    else:
        peer = archive.settings.peer(dest)
        receiver = hub.remote_participant(peer) if peer is not None else m.Participant(dest, False)
    return hub.transfer_audit(archive, receiver, [refs[c.sop_instance_uid] for c in claims])


# -- C-STORE ----------------------------------------------------------------------------------------


def _contexts(claims: Sequence[Claimed], refs: dict[str, Any]) -> list[Any]:
    from pynetdicom.presentation import build_context

    from xdsi.dimse.sending import MAX_CONTEXTS, contexts_for

    ts = claims[0].transfer_syntax
    if not ts:
        return contexts_for({(refs[c.sop_instance_uid].sop_class_uid, refs[c.sop_instance_uid].transfer_syntax_uid) for c in claims})
    classes = sorted({refs[c.sop_instance_uid].sop_class_uid for c in claims})
    return [build_context(cls, [ts]) for cls in classes[:MAX_CONTEXTS]]


def _c_store(archive: Any, claims: Sequence[Claimed], refs: dict[str, Any], report: Report, stopping: Callable[[], bool]) -> list[Claimed]:
    from xdsi.dimse.sending import StoredInstance, hold_reactor, poll_fast, stored_by_peer
    from xdsi.dimse.server import ArchiveAE

    s = archive.settings
    dest = claims[0].destination
    peer = s.peer(dest)
    if peer is None:  # the [peers] table was removed since the row was queued
        for c in claims:
            report(c, False, f"{dest} has no [peers.{dest}] table with host and port", False)
        return []
    ae = ArchiveAE(ae_title=s.ae_title)
    ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = s.acse_timeout, s.dimse_timeout, s.network_timeout
    ae.maximum_pdu_size = s.dimse_limits.max_pdu_size
    kwargs: dict[str, Any] = {"ae_title": peer.ae_title, "contexts": _contexts(claims, refs)}
    if peer.tls:
        from xdsi.security.tls import client_context

        kwargs["tls_args"] = (client_context(s.tls, check_hostname=False), peer.host)
    try:
        assoc = ae.associate(peer.host, peer.port, **kwargs)
    except Exception as exc:  # TLS context, socket errors pynetdicom lets through
        assoc = None
        why = f"{exc.__class__.__name__}: {exc}"
    else:
        why = (
            f"{dest} ({peer.host}:{peer.port}) rejected the association" if assoc.is_rejected
            else f"{dest} ({peer.host}:{peer.port}) could not be reached or aborted the association"
        )
    if assoc is None or not assoc.is_established:
        for c in claims:
            report(c, False, why, False)
        return []
    # an association that only sends C-STOREs, like a C-MOVE sub-association: the same reactor settings
    poll_fast(assoc)
    hold_reactor(assoc)
    left: list[Claimed] = []
    try:
        for i, c in enumerate(claims):
            if stopping():
                left = list(claims[i:])
                break
            ref = refs[c.sop_instance_uid]
            try:
                rsp = assoc.send_c_store(StoredInstance(archive.retrieve, ref), priority=DIMSE_PRIORITY.get(c.priority, 0))
            except Exception as exc:  # not producible, no accepted context, association gone
                report(c, False, f"{exc.__class__.__name__}: {exc}", False)
                continue
            ok, error = stored_by_peer(rsp)
            report(c, ok, error or "", False)
    finally:
        if assoc.is_established:
            assoc.release()
    return left


# -- STOW-RS ----------------------------------------------------------------------------------------


def _stow(archive: Any, claims: Sequence[Claimed], refs: dict[str, Any], settings: RoutingSettings, report: Report,
          stopping: Callable[[], bool]) -> list[Claimed]:
    from xdsi.security.tls import https_session

    if stopping():
        return list(claims)
    url = claims[0].destination + "/studies"
    ts = claims[0].transfer_syntax
    boundary = uuid.uuid4().hex
    produced: list[Claimed] = []
    failed: dict[str, str] = {}
    stack = ExitStack()
    files = []
    for c in claims:  # produced (recalled, converted) before anything is posted: a failure is that instance's alone
        ref = refs[c.sop_instance_uid]
        try:
            p = stack.enter_context(archive.retrieve.produce(ref, [ts] if ts else [ref.transfer_syntax_uid]))
        except Exception as exc:
            failed[c.sop_instance_uid] = f"{exc.__class__.__name__}: {exc}"
            continue
        produced.append(c)
        files.append(p.file_path())

    body = _MultipartBody(files, boundary)

    with stack:
        for c in claims:
            if c.sop_instance_uid in failed:
                report(c, False, failed[c.sop_instance_uid], False)
        if not produced:
            return []
        session = https_session(archive.settings.tls)
        try:
            r = session.post(
                url,
                data=body,
                headers={
                    "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                    "Accept": "application/dicom+json",
                },
                timeout=settings.stow_timeout,
            )
        except Exception as exc:
            why = f"STOW-RS to {url}: {exc.__class__.__name__}: {exc}"
            for c in produced:
                report(c, False, why, False)
            return []
        finally:
            session.close()
    stored, refused = _stow_outcome(r)
    for c in produced:
        uid = c.sop_instance_uid
        if r.status_code == 200 or uid in stored:
            report(c, True, "", False)
        elif uid in refused:
            report(c, False, f"STOW-RS {r.status_code}: failure reason {refused[uid]}", False)
        else:
            report(c, False, f"STOW-RS {r.status_code}: {r.text[:300]}", False)
    return []


class _MultipartBody:
    """The STOW-RS request body, streamed from the files, with its length known in advance.

    requests sends an iterable with ``__len__`` with that Content-Length and no chunked coding: some
    servers refuse chunked uploads, and ours refuses a request that carries both framings.
    """

    def __init__(self, files: Sequence[Any], boundary: str) -> None:
        self.files = list(files)
        self.head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        self.tail = f"--{boundary}--\r\n".encode()
        self.length = sum(len(self.head) + os.path.getsize(f) + 2 for f in self.files) + len(self.tail)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[bytes]:
        for path in self.files:
            yield self.head
            with open(path, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    yield chunk
            yield b"\r\n"
        yield self.tail


def _stow_outcome(r: Any) -> tuple[set[str], dict[str, str]]:
    """The SOP Instance UIDs a STOW-RS response lists as stored, and those it lists as failed (with the reason)."""
    stored: set[str] = set()
    refused: dict[str, str] = {}
    if r.status_code not in (200, 202, 409):
        return stored, refused
    try:
        doc = json.loads(r.content or b"{}")
    except ValueError:
        return stored, refused
    if isinstance(doc, list):  # some servers answer a one-element array
        doc = doc[0] if doc else {}

    def items(tag: str) -> list[dict[str, Any]]:
        return list((doc.get(tag) or {}).get("Value") or []) if isinstance(doc, dict) else []

    def value(item: dict[str, Any], tag: str) -> str:
        v = (item.get(tag) or {}).get("Value") or [""]
        return str(v[0])

    for item in items("00081199"):  # ReferencedSOPSequence
        stored.add(value(item, "00081155"))
    for item in items("00081198"):  # FailedSOPSequence
        refused[value(item, "00081155")] = value(item, "00081197") or "unknown"
    return stored, refused
