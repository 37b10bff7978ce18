"""What the HTTP adapters tell the audit trail: STOW-RS, QIDO-RS, WADO-RS/WADO-URI/RAD-69 deliveries,
WADO-WS Information/XPath queries and ITI-43 exports; who asked, from where, about which patient and study.

The requester of an HTTP transaction has no AE title: PS3.15 A.5.3 lets UserID be the
client's identity as known (the TLS certificate subject when the client presented one,
else its address), with the address as NetworkAccessPointID.  We are named by our AE
title (or, for SOAP, the endpoint URI the client invoked, as ITI TF-2 3.43.6.1 asks) with
our process id as AlternativeUserID and the Host the client used.

Every function here is called by an adapter once per request, checks ``trail.enabled``
first (no work at all when auditing is off), never raises (an audit bug is logged and
the response goes out regardless) and only spools to SQLite: the network is the
sender thread's business.

Retrieves are audited when the response *ends* (the WSGI iterable is closed, or the
SOAP exchange released): what was actually written is known only then.  Per study a
"Begin Transferring DICOM Instances" (what the response set out to send, stamped with
the time it started) and a "DICOM Instances Transferred", action R (what it did send),
the pair PS3.15 A.5.3.3 defines "allowing comparison of what was intended to be sent and
what was actually sent"; outcome 4 with the reason when part of the request was not
provided or the client went away mid-stream.

Off the response path: cheroot writes the last chunk of a chunked response only after
the body's ``close()`` returned, and ``trail.record`` commits to the spool (an fsync,
~2.6 ms each here, two per retrieve) after the patient is looked up in the index; done
in ``close()`` the client waited for all of it before its response was complete.  So the
recording is handed to one worker thread per trail (:func:`_later`: FIFO, so records
keep their order; bounded, recording inline rather than dropping when it is full), and
``xdsi serve`` drains it (:func:`drain`) after the HTTP servers stopped and before the
index and the trail close.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import queue
import threading
import time
import weakref
from collections import Counter, defaultdict
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from xdsi.audit import messages as m
from xdsi.running import application_pid

__all__ = [
    "drain",
    "stow_received",
    "requester",
    "qido_query",
    "Transfer",
    "transfer",
    "information_query",
    "DocumentExport",
    "document_export",
]

log = logging.getLogger(__name__)

MAX_QUERY_BYTES = 16 * 1024  # of a SOAP envelope kept as ParticipantObjectQuery (base64: ~22 KB, fits a UDP datagram)
MAX_WAITING = 10_000  # recordings queued for the worker; beyond, the caller records inline (slower, nothing dropped)


class _Worker:
    """One thread recording, in order, what the HTTP adapters hand over for one audit trail."""

    def __init__(self) -> None:
        self.queue: queue.Queue[Callable[[], None]] = queue.Queue(MAX_WAITING)
        self.thread = threading.Thread(target=self._run, name="audit-http", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            fn = self.queue.get()
            try:
                fn()
            except Exception:  # one bad record must not stop the others
                log.exception("audit: recording failed")
            finally:
                self.queue.task_done()

    def drain(self, timeout: float) -> bool:
        """Wait until everything handed over so far is recorded; False when ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        with self.queue.all_tasks_done:
            while self.queue.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.queue.all_tasks_done.wait(left)
        return True


_workers: "weakref.WeakKeyDictionary[Any, _Worker]" = weakref.WeakKeyDictionary()
_workers_lock = threading.Lock()


def _later(trail: Any, fn: Callable[[], None]) -> None:
    """Run ``fn`` (which records into ``trail``) on the trail's worker, after what was handed over before."""
    with _workers_lock:
        worker = _workers.get(trail)
        if worker is None:
            worker = _workers[trail] = _Worker()
    try:
        worker.queue.put_nowait(fn)
    except queue.Full:  # the spool cannot keep up: slow this response rather than lose its record
        log.warning("audit: %d recordings waiting; recording inline", MAX_WAITING)
        fn()


def drain(trail: Any, timeout: float = 10.0) -> None:
    """Record everything the HTTP adapters handed over for ``trail``; called by ``xdsi serve`` when it stops."""
    with _workers_lock:
        worker = _workers.get(trail)
    if worker is not None and not worker.drain(timeout):
        log.error("audit: HTTP recordings still waiting after %.0f s at shutdown", timeout)


def _trail(archive: Any) -> Any:
    """The archive's audit trail when auditing is on, else None (the adapters then do nothing more)."""
    trail = getattr(archive, "audit", None)
    return trail if trail is not None and trail.enabled else None


def requester(environ: Mapping[str, Any]) -> m.Participant:
    addr = str(environ.get("REMOTE_ADDR") or "") or None
    subject = str(environ.get("SSL_CLIENT_S_DN") or "")  # set by a TLS front end or our HTTPS adapter
    return m.Participant(subject or addr or "UNKNOWN", True, network_access_point=addr)


def human_requestor(environ: Mapping[str, Any]) -> list[m.Participant]:
    """The user the request was authenticated as (bearer token, Basic, an XUA assertion), when there is one.

    ITI TF-2 3.41/3.43 list a "Human Requestor (if known)" beside the machines: UserID the
    user's identity, UserIsRequestor true, no role (we have no access-control role code to
    give).  A TLS-only identity is the requesting node itself, already named by :func:`requester`.
    """
    from xdsi.security.principal import ENVIRON_KEY

    principal = environ.get(ENVIRON_KEY)
    via = getattr(principal, "via", "")
    subject = str(getattr(principal, "subject", "") or "")
    if not subject or via in ("tls", "anonymous", ""):
        return []
    return [m.Participant(subject, True, network_access_point=str(environ.get("REMOTE_ADDR") or "") or None)]


def us(archive: Any, environ: Mapping[str, Any]) -> m.Participant:
    host = str(environ.get("SERVER_NAME") or "") or None
    return m.Participant(archive.settings.ae_title, False, network_access_point=host)


def _us(archive: Any, environ: Mapping[str, Any], endpoint: bool = False) -> m.Participant:
    """Us as the process serving the request: AE title (or the SOAP endpoint URI), process id, host reached."""
    host = str(environ.get("SERVER_NAME") or "") or None
    user = _endpoint_uri(environ) if endpoint else archive.settings.ae_title
    return m.Participant(user, False, network_access_point=host, alternative_user_id=str(application_pid()))


def _endpoint_uri(environ: Mapping[str, Any]) -> str:
    """The URI the client invoked, without the query: what ITI TF-2 calls the "SOAP endpoint URI"."""
    from wsgiref.util import request_uri

    return request_uri(dict(environ), include_query=False)


def _patient(archive: Any, study_uid: str) -> str:
    """The study's Patient ID through the index service (``xdsi.audit.dimse.patient_of``); "" when unknown."""
    from xdsi.audit.dimse import patient_of

    try:
        return patient_of(archive, study_uid) or ""
    except Exception:  # the index is busy or gone: audit what we know rather than nothing
        log.exception("audit: patient of study %s not found", study_uid)
        return ""


def _registered_patient(archive: Any, document_uid: str) -> str:
    """The affinity-domain CX a manifest was registered under (ITI TF-2: "the patient ID in HL7 CX format"); "" if not registered."""
    from xdsi.xds.repository import registered_patient

    try:
        return registered_patient(archive, document_uid)
    except Exception:
        log.exception("audit: registered patient of document %s not found", document_uid)
        return ""


def stow_received(archive: Any, environ: Mapping[str, Any], studies: Mapping[str, Counter[str]], patient_of: Any) -> None:
    """One DICOM Instances Transferred (action C) per study a STOW-RS request stored; never raises."""
    trail = getattr(archive, "audit", None)
    if trail is None or not trail.enabled or not studies:
        return
    try:
        sender, receiver = requester(environ), us(archive, environ)
        sender = m.Participant(sender.user_id, True, None, sender.network_access_point)
        for study_uid, classes in studies.items():
            patient = patient_of(archive, study_uid) or "UNKNOWN"
            trail.record(m.instances_transferred(trail.source, sender, receiver, study_uid, patient, sorted(classes.items())))
    except Exception:  # the STOW answer goes out regardless
        log.exception("audit of a STOW-RS request failed")


# -- QIDO-RS -------------------------------------------------------------------------------------------------


def qido_query(archive: Any, environ: Mapping[str, Any], patient_id: str | None, failure: str | None = None) -> None:
    """One Query (110112) per QIDO-RS request: the path and query string as received, RAD-129; never raises.

    The ParticipantObjectID is the Study Root C-FIND SOP Class UID, the information model
    QIDO-RS searches; the query itself is the request target (path: the level and any
    study/series it is scoped to; query string: the keys), so the record reads like the
    C-FIND identifier does for DIMSE.  ``failure`` (a refused query) gives outcome 4.
    """
    trail = _trail(archive)
    if trail is None:
        return
    try:
        target = (str(environ.get("SCRIPT_NAME") or "") + str(environ.get("PATH_INFO") or "")).encode("latin-1", "replace")
        qs = str(environ.get("QUERY_STRING") or "").encode("latin-1", "replace")
        query = target + (b"?" + qs if qs else b"")
        details = [("QueryTruncatedFrom", str(len(query)).encode("ascii"))] if len(query) > MAX_QUERY_BYTES else []
        event = m.query(
            trail.source, requester(environ), _us(archive, environ), m.STUDY_ROOT_FIND, query[:MAX_QUERY_BYTES],
            event_type=m.TRANSACTION["RAD-129"], patient_id=patient_id or None,
            outcome=m.OUTCOME["minor"] if failure else m.OUTCOME["success"], outcome_description=failure, details=details,
            others=human_requestor(environ),
        )
        _later(trail, lambda: trail.record(event))
    except Exception:
        log.exception("audit of a QIDO-RS request failed")


# -- retrieves: WADO-RS, WADO-URI, RAD-69 ----------------------------------------------------------------


class Transfer:
    """What one retrieve response sets out to send, per study, and what it did send; audited once, when it ends.

    The adapter says what it will send (:meth:`intend`), what it could not provide
    (:meth:`omit`), wraps each instance's chunks with :meth:`track` (an instance counts as
    sent once its last chunk was handed to the server), and calls :meth:`close` when the
    response is closed; a close before every tracked instance was sent is a client that went
    away (or a stream that failed), outcome 4.
    """

    def __init__(self, archive: Any, trail: Any, environ: Mapping[str, Any], event_type: m.Code | None, what: str, endpoint: bool = False) -> None:
        self.archive = archive
        self.trail = trail
        self.what = what
        self.event_type = event_type
        self.receiver = requester(environ)
        self.sender = _us(archive, environ, endpoint)
        self.others = human_requestor(environ)
        self.started = dt.datetime.now(dt.timezone.utc)
        self._lock = threading.Lock()
        self._intended: dict[str, Counter[str]] = defaultdict(Counter)
        self._sent: dict[str, Counter[str]] = defaultdict(Counter)
        self._omitted: dict[str, list[str]] = defaultdict(list)
        self._closed = False

    def intend(self, study_uid: str, sop_class_uid: str) -> None:
        with self._lock:
            self._intended[study_uid][sop_class_uid] += 1

    def forget(self, study_uid: str, sop_class_uid: str) -> None:
        """Take back an :meth:`intend` for an instance that turned out not to be sendable after all."""
        with self._lock:
            c = self._intended.get(study_uid)
            if c is not None and c[sop_class_uid] > 0:
                c[sop_class_uid] -= 1
                if c[sop_class_uid] == 0:
                    del c[sop_class_uid]

    def omit(self, study_uid: str, reason: str) -> None:
        """An instance of ``study_uid`` that was asked for and will not be sent (not available, no syntax...)."""
        with self._lock:
            self._omitted[study_uid].append(reason)

    def sent(self, study_uid: str, sop_class_uid: str) -> None:
        with self._lock:
            self._sent[study_uid][sop_class_uid] += 1

    def track(self, chunks: Iterable[bytes], study_uid: str, sop_class_uid: str) -> Iterator[bytes]:
        """``chunks``, counted as one sent instance of ``study_uid`` once the last chunk is taken."""
        yield from chunks
        self.sent(study_uid, sop_class_uid)

    def tracked(self, produce: Callable[[], Iterable[bytes]], study_uid: str, sop_class_uid: str) -> Callable[[], Iterator[bytes]]:
        """A ``produce`` callable (RAD-69's lazily produced documents) whose chunks are tracked."""
        return lambda: self.track(produce(), study_uid, sop_class_uid)

    def close(self) -> None:
        """Record the messages; idempotent, never raises (it runs in the response's close path)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            intended = {s: Counter(c) for s, c in self._intended.items()}
            sent = {s: Counter(c) for s, c in self._sent.items()}
            omitted = {s: list(r) for s, r in self._omitted.items()}
        ended = dt.datetime.now(dt.timezone.utc)

        def record() -> None:
            try:
                self._record(intended, sent, omitted, ended)
            except Exception:
                log.exception("audit of a %s response failed", self.what)

        _later(self.trail, record)

    def _record(self, intended: dict[str, Counter[str]], sent: dict[str, Counter[str]], omitted: dict[str, list[str]], ended: dt.datetime) -> None:
        src = self.trail.source
        for study_uid in dict.fromkeys([*intended, *omitted]):
            patient = _patient(self.archive, study_uid)
            if not patient and not intended.get(study_uid):
                continue  # asked for a study we do not hold: nothing of a patient was disclosed
            patient = patient or "UNKNOWN"
            want = intended.get(study_uid, Counter())
            got = sent.get(study_uid, Counter())
            if want:
                begin = m.begin_transferring(src, self.sender, self.receiver, study_uid, patient, sorted(want.items()), others=self.others)
                self.trail.record(m.with_transaction(begin, self.event_type, self.started))  # stamped with when the response started
            problems = []
            n_want, n_got = sum(want.values()), sum(got.values())
            if n_got < n_want:
                problems.append(f"{self.what}: {n_got} of {n_want} instance(s) sent; the client went away or the stream failed")
            if omitted.get(study_uid):
                reasons = omitted[study_uid]
                problems.append(f"{len(reasons)} requested instance(s) not provided: " + "; ".join(reasons[:5]) + ("; ..." if len(reasons) > 5 else ""))
            outcome = m.OUTCOME["minor"] if problems else m.OUTCOME["success"]
            done = m.instances_sent(src, self.sender, self.receiver, study_uid, patient, sorted(got.items()), others=self.others,
                                    outcome=outcome, outcome_description=" | ".join(problems) or None)
            self.trail.record(m.with_transaction(done, self.event_type, ended))  # when the response ended, not when this ran


def transfer(archive: Any, environ: Mapping[str, Any], event_type: m.Code | None, what: str, endpoint: bool = False) -> Transfer | None:
    """A :class:`Transfer` for one retrieve response, or None when auditing is off (nothing is tracked then)."""
    trail = _trail(archive)
    if trail is None:
        return None
    try:
        return Transfer(archive, trail, environ, event_type, what, endpoint)
    except Exception:
        log.exception("audit of a %s response cannot be tracked", what)
        return None


# -- WADO-WS Information / XPath -------------------------------------------------------------------------


def information_query(archive: Any, environ: Mapping[str, Any], action: str, envelope: bytes, study_uids: Sequence[str], failure: str | None = None) -> None:
    """RetrieveImagingDocumentSetInformation (XPath over the Native DICOM Model): a Query per study asked about.

    FACTS.md and the RAD TF say nothing of auditing this WADO-WS operation; PS3.15 A.5.3.10
    Query is what it is (metadata selected by an expression), so: the SOAP envelope as received
    as ParticipantObjectQuery, identified by the operation's action URI (there is no SOP class),
    one message per study (one patient per message), the study and its patient named.
    """
    trail = _trail(archive)
    if trail is None:
        return
    try:
        asker, server, human = requester(environ), _us(archive, environ, endpoint=True), human_requestor(environ)
        outcome = m.OUTCOME["minor"] if failure else m.OUTCOME["success"]
        details: list[tuple[str, bytes]] = []
        if len(envelope) > MAX_QUERY_BYTES:
            # an envelope of megabytes (the SOAP limit allows it) would make every message of it that large, and
            # too large for a UDP repository: its start is kept, and its true size said
            details.append(("QueryTruncatedFrom", str(len(envelope)).encode("ascii")))
            envelope = envelope[:MAX_QUERY_BYTES]
        at = dt.datetime.now(dt.timezone.utc)
        studies = list(dict.fromkeys(study_uids)) or [""]

        def record() -> None:
            for study_uid in studies:
                patient = _patient(archive, study_uid) if study_uid else ""
                event = m.query(trail.source, asker, server, action, envelope, patient_id=patient or None, study_uid=study_uid or None,
                                uri_id=True, outcome=outcome, outcome_description=failure, details=details, others=human)
                trail.record(dataclasses.replace(event, at=at))

        _later(trail, record)
    except Exception:
        log.exception("audit of a WADO-WS Information request failed")


# -- ITI-43 at the integrated repository ------------------------------------------------------------------


class DocumentExport:
    """The documents one ITI-43 response returns (tracked while streamed) and those it refused; audited at close.

    ITI TF-2 3.43.6.1: an Export per patient for the documents retrieved (outcome 0, or 4 when
    the client went away before a document was written) and a failure Export for those not
    retrieved (4 when others were returned, 8 when none was).  The patient is the one the
    manifest was registered under (the affinity-domain CX), or, for a manifest not yet
    registered, the Patient ID of its study in the archive.
    """

    def __init__(self, archive: Any, trail: Any, environ: Mapping[str, Any]) -> None:
        self.archive = archive
        self.trail = trail
        self.consumer = requester(environ)
        self.repository = _us(archive, environ, endpoint=True)
        self.others = human_requestor(environ)
        self._found: list[tuple[str, str, str | None, str]] = []  # (document, repository, home, study)
        self._sent: set[str] = set()
        self._failed: list[tuple[str, str, str | None, str]] = []  # (document, repository, home, reason)
        self._lock = threading.Lock()
        self._closed = False

    def found(self, document_uid: str, repository_uid: str, home: str | None, study_uid: str) -> None:
        self._found.append((document_uid, repository_uid, home, study_uid))

    def failed(self, document_uid: str, repository_uid: str, home: str | None, reason: str) -> None:
        self._failed.append((document_uid, repository_uid, home, reason))

    def tracked(self, produce: Callable[[], Iterable[bytes]], document_uid: str) -> Callable[[], Iterator[bytes]]:
        def chunks() -> Iterator[bytes]:
            yield from produce()
            with self._lock:
                self._sent.add(document_uid)

        return chunks

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sent = set(self._sent)
        ended = dt.datetime.now(dt.timezone.utc)

        def record() -> None:
            try:
                self._record(sent, ended)
            except Exception:
                log.exception("audit of an ITI-43 response failed")

        _later(self.trail, record)

    def _record(self, sent: set[str], ended: dt.datetime) -> None:
        src = self.trail.source
        by_patient: dict[str, list[tuple[str, str, str | None, str]]] = defaultdict(list)
        for doc in self._found:
            by_patient[_registered_patient(self.archive, doc[0]) or _patient(self.archive, doc[3])].append(doc)
        for patient, docs in by_patient.items():
            cut = [d for d, *_ in docs if d not in sent]
            desc = f"{len(cut)} of {len(docs)} document(s) not written: the client went away or the stream failed" if cut else None
            ok = m.documents_exported(src, self.repository, self.consumer, [(d, r, h) for d, r, h, _s in docs], patient or None,
                                      m.OUTCOME["minor"] if cut else m.OUTCOME["success"], desc, others=self.others)
            self.trail.record(dataclasses.replace(ok, at=ended))
        if self._failed:
            reasons = "; ".join(r for *_x, r in self._failed[:5]) + ("; ..." if len(self._failed) > 5 else "")
            outcome = m.OUTCOME["minor"] if self._found else m.OUTCOME["serious"]
            failed = m.documents_exported(src, self.repository, self.consumer, [(d, r, h) for d, r, h, _x in self._failed], None,
                                          outcome, f"{len(self._failed)} document(s) not retrieved: {reasons}", others=self.others)
            self.trail.record(dataclasses.replace(failed, at=ended))


def document_export(archive: Any, environ: Mapping[str, Any]) -> DocumentExport | None:
    """A :class:`DocumentExport` for one ITI-43 request, or None when auditing is off."""
    trail = _trail(archive)
    if trail is None:
        return None
    try:
        return DocumentExport(archive, trail, environ)
    except Exception:
        log.exception("audit of an ITI-43 response cannot be tracked")
        return None
