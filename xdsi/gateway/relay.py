"""Retrieve through a remote archive, instance by instance, as the remote delivers (issue 15).

Sources (how instances come from the remote), feeding one :class:`Relay`:

* **move to us**: we send the remote a C-MOVE whose destination is our own AE title (as the remote
  knows us, ``move_destination``) and whose Message ID is unique in the process; the remote opens
  a storage association to us, and our C-STORE handler hands each arriving instance to the relay
  whose (remote AE title, Move Originator Message ID) it carries (:func:`hand_over`, the one-line
  hook in ``DicomServer.on_store``) instead of archiving it;
* **get**: we send the remote a C-GET on an association where we took the SCP role for the storage
  SOP classes; its C-STORE sub-operations come back on that association.

Sinks (where they go): the requester's own association as C-STORE sub-operations of its C-GET, or a
C-MOVE destination's association (:class:`RelaySubAssociation`).  Either way each instance is sent
on as soon as it arrived (the data set streamed from the spool file pynetdicom wrote, unchanged when
the requester accepted its transfer syntax, converted otherwise), and then either archived (the
gateway's ``cache``) or deleted.

Several processes (``xdsi serve --workers N``): the remote's storage association may be accepted by
another worker than the one waiting for the instances.  Each move-to-us relay therefore also has an
inbox directory, ``<temp_dir>/relay/inbox-<remote AE>-<our AE>-<Message ID>`` (its creation reserves the
Message ID across processes); a worker that receives an instance for a relay it does not hold moves
the spool file there (the name carries SOP Class, SOP Instance and transfer syntax) before answering
the C-STORE, and the waiting worker picks it up: the requester's side whenever its queue runs dry,
and the source thread before it queues each of the remote's responses and the end (so an instance
always comes before the response that counts it, and nothing is left in the inbox when the source
removes it).  An instance refused there (not what was asked for) is recorded in the inbox too, for
the relay's audit.  In one process the in-memory queue is used.

Counts: pynetdicom's C-GET/C-MOVE SCP needs the number of sub-operations before the first one; it
comes from the remote's first Pending response (Remaining + Completed + Failed + Warning) or, if
the remote sends none, its final response; instances that arrive before then wait in the spool.
Each relayed instance is one sub-operation, each instance the remote failed to deliver is a failed
one (with its SOP Instance UID when the remote lists it), so the requester's counts add up.  The
requester's C-CANCEL is passed on to the remote (C-CANCEL) and answered FE00 at once; instances
that arrive after it are refused and removed.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from pydicom.dataset import Dataset
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.status import Status

from xdsi.archive import transcode
from xdsi.dimse import accept_balance, direct, receive_direct
from xdsi.dimse.direct import parse_command
from xdsi.gateway import identity, receive
from xdsi.dimse.sending import NoAcceptedContext, accepted_syntaxes, failed_identifier, poll_fast
from xdsi.gateway.remotes import RemoteClient, RemoteUnavailable, next_message_id, qr_contexts

log = logging.getLogger(__name__)

PENDING = (0xFF00, 0xFF01)
INBOX_POLL = 0.01  # how often a relay with an inbox looks into it while its queue is empty
POLL = 0.05  # how often the requester's C-CANCEL and association are looked at while waiting
HIGH_WATER = 8  # instances spooled ahead of the requester before the remote's C-STORE is answered
# instances held in memory ahead of the requester once the count is out: the flow control above keeps a remote's
# association at most one past HIGH_WATER, so only several associations delivering to one relay at once reach this
MEMORY_AHEAD = 2 * HIGH_WATER
REFUSED_CLOSED = 0xA700  # C-STORE Out of Resources: an instance for a relay already cancelled or over
COUNT_KEYS = ("NumberOfRemainingSuboperations", "NumberOfCompletedSuboperations", "NumberOfFailedSuboperations",
              "NumberOfWarningSuboperations")


@dataclass
class Arrived:
    """One instance the remote delivered, spooled; ours until it is sent on and archived or deleted."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    study_uid: str = ""  # from the data set when it was checked here ("" when another worker checked it)
    patient_id: str = ""
    # the instance's bytes (a Part 10 file) while they are only in memory (receive.MemorySpool): ``path`` does not
    # exist until :meth:`materialize` writes them there
    data: receive.InstanceBytes | None = None

    def materialize(self) -> Path:
        """``path``, written from :attr:`data` first if the instance was only in memory (for what needs a file)."""
        if self.data is not None:
            receive.write_new(self.path, self.data)
            self.data = None
        return self.path

    def drop(self) -> None:
        """The instance is no longer wanted: its file removed, its bytes let go."""
        self.data = None
        _unlink(self.path)


class Relay:
    """What one retrieve receives from the remote: instances and the remote's responses, in order."""

    def __init__(self, spool_dir: Path, remote_ae: str, msg_id: int) -> None:
        self.spool_dir = spool_dir
        self.remote_ae = remote_ae
        self.msg_id = msg_id
        self.items: "queue.Queue[tuple[str, Any]]" = queue.Queue()
        self.closed = False
        self.announced = False  # the count is out: from now on the remote waits when we are HIGH_WATER ahead
        self.ahead = 0
        self._cond = threading.Condition()
        self.cancel_remote: Callable[[], None] | None = None  # set by the source once its request is out
        self.timeout = 60.0
        self.originator = ""  # our AE title as we called the remote (its Move Originator AE Title)
        self.inbox: Path | None = None  # move-to-us relays: where other processes put what they receive for us
        # what every delivered instance must be (set from the retrieve identifier before the request goes out);
        # None only for relays nobody asked anything through (unit tests of the hand-over)
        self.expected: identity.Expected | None = None
        self.refused: list[tuple[str, str]] = []  # (SOP Instance UID, reason) of deliveries refused as not asked for
        self.audit: Any = None  # an xdsi.audit.hub.RelayAudit when [audit] is on (set by the gateway)
        # the spool file the sink sends next, if it has arrived (Exchange.upcoming, set while a sink runs)
        self.upcoming: Callable[[], Path | None] | None = None
        self.skipped_pending = 0  # the remote's Pending responses dropped undecoded (skip_pending)
        self.via_inbox = 0  # instances another process received for this relay (from_inbox)
        self.spilled = 0  # instances received into memory but written to the spool to wait there (deliver)
        self.total: int | None = None  # sub-operations the remote announced (announce)
        self.received = 0  # instances that came, here or through the inbox
        self.cancelling = False  # the requester cancelled: the remote's answer is awaited now
        self.source_ended = False  # end() was called
        # wakes the DUL of our association to the remote when it reads lazily (start_move_source, wakeup.read_lazily)
        self.wake_source: Callable[[], None] | None = None
        self.sent_files: list[Path] = []  # sent, not cached, removal deferred to the wait for the next response (Finisher)
        self._spool_made = False
        self._listed_ns = 0  # time.time_ns() when a listing of the inbox last began (drain_inbox(quick=True))
        # called once, when the first instance is queued (the source's end of expecting the remote's association)
        self.on_first_arrival: Callable[[], None] | None = None

    def spool_name(self, suffix: str) -> Path:
        """A new name in the spool directory for a file this relay takes over (the directory made once per relay).

        Unique without a random draw per file (a system call each: issue 15): this process's ID and random token
        (``receive.process_tag``) and a counter; ``relay-`` so that :func:`sweep` knows it.
        """
        if not self._spool_made:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
            self._spool_made = True
        return self.spool_dir / f"relay-{receive.process_tag()}-{next(_NAMES)}{suffix}"

    # -- the source side --------------------------------------------------------------------------

    def deliver(self, path: Path, sop_class: str, sop_uid: str, ts: str, head: bytes | None = None,
                content: receive.InstanceBytes | None = None) -> int:
        """An instance arrived (C-STORE handler thread): take the spool file (or ``content``) over; the C-STORE status.

        ``head``: the spool file's first bytes as the direct reader wrote them (identity.check), if it kept them.
        ``content``: the instance's bytes when it was received into memory (no file at ``path``)."""
        if self.closed:
            log.info("relay %s/%d: %s arrived after the retrieve ended; refused", self.remote_ae, self.msg_id, sop_uid)
            return REFUSED_CLOSED
        study = patient = ""
        if self.expected is not None:
            reason, ds = identity.check(self.expected, path, sop_class, sop_uid, head, content)
            if reason is not None:  # never taken over: pynetdicom removes its spool file
                self.refused.append((sop_uid, reason))
                return identity.refuse(self.remote_ae, self.msg_id, sop_uid, reason)
            study, patient = str(ds.get("StudyInstanceUID", "") or ""), str(ds.get("PatientID", "") or "")
        own = self.spool_name(".dcm")
        if content is None:
            os.replace(path, own)  # pynetdicom's unlink of its spool name afterwards finds nothing: fine
        elif self.ahead >= (MEMORY_AHEAD if self.announced else HIGH_WATER):
            # what waits beyond that waits on disk, so memory holds a bounded number of instances per relay whatever the
            # study.  Before the count is out nothing holds the remote back (HIGH_WATER); after it, the flow control
            # below does, and the bound is only reached by several associations delivering at once.  Why not
            # HIGH_WATER then too: with a remote faster than the requester the queue stands at HIGH_WATER, and every
            # instance was written, read back and unlinked (an ext4 create and delete each, ~0.1 ms; issue 15)
            try:
                receive.write_new(own, content)
            except OSError as exc:
                log.error("relay %s/%d: %s not spooled: %s", self.remote_ae, self.msg_id, sop_uid, exc)
                return REFUSED_CLOSED
            content = None
            self.spilled += 1
        if not self._enqueue([Arrived(own, sop_class, sop_uid, ts, study, patient, content)]):
            log.info("relay %s/%d: %s arrived as the retrieve ended; refused", self.remote_ae, self.msg_id, sop_uid)
            return REFUSED_CLOSED
        self._count_arrivals(1)
        with self._cond:  # flow control: hold the remote's C-STORE response while the requester is far behind
            self._cond.wait_for(lambda: self.closed or not self.announced or self.ahead <= HIGH_WATER, timeout=self.timeout)
        return 0x0000

    def _enqueue(self, arrived: list[Arrived]) -> bool:
        """Queue instances for the sink, or remove them if the relay is closed (False).

        Under the lock that :meth:`close` takes to set ``closed``: an instance is either queued before
        close() empties the queue, or removed here; never left behind in the spool.
        """
        first = None
        with self._cond:
            queued = not self.closed
            if queued:
                self.ahead += len(arrived)
                for a in arrived:
                    self.items.put(("instance", a))
                first, self.on_first_arrival = self.on_first_arrival, None
        if first is not None:
            first()
        if queued:
            return True
        for a in arrived:
            a.drop()
        return False

    def _take_refusal(self, name: str) -> None:
        assert self.inbox is not None
        own = self.spool_name(".refused")
        try:
            os.replace(self.inbox / name, own)  # claimed: the source and the sink thread never both count it
        except FileNotFoundError:
            return
        try:
            data = json.loads(own.read_text())
            self.refused.append((str(data["sop_instance_uid"]), str(data["reason"])))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("relay %s/%d: unreadable refusal record (%s)", self.remote_ae, self.msg_id, exc)
        finally:
            _unlink(own)

    def drain_inbox(self, quick: bool = False) -> None:
        """Source side: queue what other processes put in the inbox, ahead of the response about to be queued.

        The remote sends a C-MOVE response only after our C-STORE responses for the instances it
        counts, and another worker answers its C-STORE only once the file is in the inbox; so
        draining here, in the thread that receives the responses, keeps instance-before-response
        order in the queue and leaves nothing in the inbox when the source removes it (unregister).

        ``quick`` (a Pending response dropped undecoded, :func:`skip_pending`: nothing is queued after it, so this
        drain only makes the sink see an instance sooner): the inbox is listed only if it may have changed since
        a listing began, by its modification time (one ``stat`` instead of open, two reads and a close per relayed
        instance when this process receives them all).  Linux stamps a directory change with the coarse clock, at
        most a tick behind ``time.time_ns()``, so a time :data:`INBOX_SETTLED` before a listing began says every
        change was older than that listing.  Should a file system's coarser stamps make this skip a listing it
        should not have, the instance is only later: the sink lists the inbox whenever its queue runs dry, and
        every response queued and the end are preceded by a full listing.
        """
        if self.inbox is None:
            return
        if quick and self._listed_ns:
            try:
                changed = os.stat(self.inbox).st_mtime_ns
            except OSError:
                changed = self._listed_ns
            if changed < self._listed_ns - INBOX_SETTLED_NS:
                return
        self._listed_ns = time.time_ns()
        arrived = self.from_inbox()
        if arrived:
            self._enqueue(arrived)

    def response(self, st: Dataset, identifier: Dataset | None) -> None:
        self.drain_inbox()
        self.items.put(("rsp", (st, identifier)))

    def end(self, problem: str | None = None) -> None:
        """Source side: nothing more will come (once; later calls do nothing)."""
        with self._cond:
            if self.source_ended:
                return
            self.source_ended = True
        self.drain_inbox()
        self.items.put(("end", problem))

    # -- the sink side ----------------------------------------------------------------------------

    def consumed(self) -> None:
        with self._cond:
            self.ahead -= 1
            self._cond.notify_all()

    def announce(self, total: int | None = None) -> None:
        with self._cond:
            self.announced = True
            self.total = total
            self._cond.notify_all()

    def reading_lazily(self) -> bool:
        """Whether the source's association may leave the remote's responses unread for a while
        (:func:`xdsi.dimse.wakeup.read_lazily`): the count is out and instances are still to come, so every response
        before the last is a Pending one the relay drops.  False once all have come, or the retrieve is cancelled or
        over: the final response is then read as soon as it arrives."""
        return self.announced and not self.closed and not self.cancelling and self.total is not None and self.received < self.total

    def _count_arrivals(self, n: int) -> None:
        with self._cond:
            self.received += n
            done = self.total is not None and self.received >= self.total
        if done:
            self.wake()

    def wake(self) -> None:
        """The source's DUL looks at the remote's responses again at once (see :meth:`reading_lazily`)."""
        wake = self.wake_source
        if wake is not None:
            wake()

    def remove_sent(self) -> None:
        """Remove the spool files of instances already sent (the sink's thread: :class:`Finisher`)."""
        while self.sent_files:
            _unlink(self.sent_files.pop())

    def close(self) -> None:
        """No more instances wanted: refuse what still comes, remove what is spooled and unsent (and what was sent)."""
        self.remove_sent()
        with self._cond:
            self.closed = True
            self._cond.notify_all()
        self.wake()
        if self.inbox is not None:
            try:
                (self.inbox / CLOSED).touch()
            except OSError:
                pass
            for arrived in self.from_inbox():
                arrived.drop()
        while True:
            try:
                kind, value = self.items.get_nowait()
            except queue.Empty:
                return
            if kind == "instance":
                value.drop()


    def from_inbox(self) -> list[Arrived]:
        """Instances another process put in our inbox, oldest first, taken out of it (and the refusals it
        recorded there, added to :attr:`refused`)."""
        if self.inbox is None:
            return []
        try:
            listing = os.listdir(self.inbox)
        except FileNotFoundError:
            return []
        for name in sorted(n for n in listing if n.endswith(REFUSED)):
            self._take_refusal(name)
        names = sorted(n for n in listing if n.endswith(".dcm"))
        out = []
        for name in names:
            parts = name[:-4].split("_")
            if len(parts) != 5:
                continue
            _, _, sop_class, sop_uid, ts = parts
            own = self.spool_name(".dcm")
            try:
                os.replace(self.inbox / name, own)
            except FileNotFoundError:  # the other side (source or sink thread) took it first
                continue
            except OSError:
                shutil.move(str(self.inbox / name), str(own))
            out.append(Arrived(own, sop_class, sop_uid, ts))
        if out:
            self._count_arrivals(len(out))
        self.via_inbox += len(out)
        return out


CLOSED = ".closed"
INBOX_SETTLED_NS = 50_000_000  # drain_inbox(quick=True): an inbox unchanged since this long before a listing began
_NAMES = itertools.count()  # Relay.spool_name
REFUSED = ".refused"  # in an inbox: an instance another process refused for this relay (JSON: UID and reason)
EXPECTED = ".expected.json"  # in an inbox: the relay's identity.Expected, for the process that receives
INBOX_ROOT: Path | None = None  # <main temp_dir>/relay: the same for every worker of one data dir (set by Gateway)


def inbox_path(remote_ae: str, originator: str, msg_id: int) -> Path | None:
    if INBOX_ROOT is None:
        return None
    safe = ["".join(c if c.isalnum() else f"%{ord(c):02x}" for c in aet) for aet in (remote_ae, originator)]
    return INBOX_ROOT / f"inbox-{safe[0]}-{safe[1]}-{msg_id}"


def _deliver_to_inbox(inbox: Path, path: Path, sop_class: str, sop_uid: str, ts: str, timeout: float, head: bytes | None = None) -> int:
    """Another process's relay: move the spool file into its inbox, then hold the C-STORE response while it is far behind."""
    if (inbox / CLOSED).exists():
        return REFUSED_CLOSED
    try:
        text = (inbox / EXPECTED).read_text()
        expected = None if text.strip() == "null" else identity.Expected.from_json(text)
    except (OSError, ValueError, TypeError) as exc:  # fail closed: a missing or broken expectation checks nothing
        reason = f"the relay's expected identity is unreadable ({exc.__class__.__name__})"
        _record_refusal(inbox, sop_uid, reason)
        return identity.refuse(inbox.name, 0, sop_uid, reason)
    reason = identity.check(expected, path, sop_class, sop_uid, head)[0] if expected is not None else None
    if reason is not None:
        _record_refusal(inbox, sop_uid, reason)
        return identity.refuse(inbox.name, 0, sop_uid, reason)
    name = f"{time.time_ns():020d}_{os.getpid()}_{sop_class}_{sop_uid}_{ts}.dcm"
    try:
        os.replace(path, inbox / name)
    except OSError:
        shutil.move(str(path), str(inbox / name))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (inbox / CLOSED).exists():
        try:
            waiting = sum(1 for n in os.listdir(inbox) if n.endswith(".dcm"))
        except FileNotFoundError:
            break
        if waiting <= HIGH_WATER:
            break
        time.sleep(0.005)
    return 0x0000


def _record_refusal(inbox: Path, sop_uid: str, reason: str) -> None:
    """Tell the relay's process (its audit: outcome and description) about an instance refused here.

    Written before the C-STORE response, so before the remote's next C-MOVE response: the relay's
    source thread finds it when it drains the inbox ahead of that response.
    """
    name = f"{time.time_ns():020d}_{os.getpid()}_{uuid.uuid4().hex}"
    try:
        tmp = inbox / f"{name}.tmp"
        tmp.write_text(json.dumps({"sop_instance_uid": sop_uid, "reason": reason}))
        os.replace(tmp, inbox / f"{name}{REFUSED}")
    except OSError as exc:  # the refusal itself stands; only the relay's audit misses it
        log.warning("relay inbox %s: refusal of %s not recorded (%s)", inbox.name, sop_uid, exc)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


# -- the registry the storage SCP asks ----------------------------------------------------------------

_relays: dict[tuple[str, str, int], Relay] = {}
_lock = threading.Lock()


def register(relay: Relay) -> None:
    """Known to this process's storage SCP, and (with an inbox root) to the other workers': the inbox directory's
    creation reserves the Message ID, so a number another process is using is not used twice."""
    for _ in range(64):
        inbox = inbox_path(relay.remote_ae, relay.originator, relay.msg_id)
        if inbox is None:
            break
        try:
            inbox.parent.mkdir(parents=True, exist_ok=True)
            inbox.mkdir()
            relay.inbox = inbox
            # before the request goes out, so before anything can arrive ("null": a relay nobody asked through)
            tmp = inbox / (EXPECTED + ".tmp")
            tmp.write_text(relay.expected.to_json() if relay.expected is not None else "null")
            os.replace(tmp, inbox / EXPECTED)
            break
        except FileExistsError:
            relay.msg_id = next_message_id()
    with _lock:
        _relays[(relay.remote_ae, relay.originator, relay.msg_id)] = relay


def unregister(relay: Relay) -> None:
    with _lock:
        _relays.pop((relay.remote_ae, relay.originator, relay.msg_id), None)
    if relay.inbox is not None:
        # a file created while rmtree runs (close()'s CLOSED marker, a late delivery) makes its rmdir fail: again
        for _ in range(10):
            shutil.rmtree(relay.inbox, ignore_errors=True)
            if not relay.inbox.exists():
                break
            time.sleep(0.01)


def hand_over(event: Any) -> int | None:
    """EVT_C_STORE hook: the C-STORE status if this instance belongs to a pending relay, else None (archive it).

    Matched by the calling AE title (the remote's), the Move Originator AE Title (ours, as we called the
    remote) and the Move Originator Message ID (our C-MOVE's), which the remote copies into each C-STORE
    sub-operation (PS3.4 C.4.2.2, PS3.7 9.1.1.1).  A C-STORE without them is never taken for a relay: it
    may be anything the remote pushes to us, and relaying it to a requester who did not ask would be a
    disclosure.

    An instance received into memory (``receive.MemorySpool``) goes to a relay of this process as bytes; for
    anything else (archived, or another worker's relay) its spool file is made first.
    """
    req = event.request
    spool = receive.memory_spool(req)
    mid = getattr(req, "MoveOriginatorMessageID", None)
    originator = str(getattr(req, "MoveOriginatorApplicationEntityTitle", None) or "").strip()
    relay = inbox = None
    if mid is not None and originator and (_relays or INBOX_ROOT is not None):
        calling = str(event.assoc.requestor.ae_title).strip()
        with _lock:
            relay = _relays.get((calling, originator, int(mid)))
        if relay is None:
            inbox = inbox_path(calling, originator, int(mid))
            if inbox is not None and not inbox.is_dir():
                inbox = None
    if spool is not None and relay is None:
        try:
            spool.materialize()
        except OSError as exc:  # the disk is full: the sender hears Out of Resources, nothing is half kept
            log.error("C-STORE %s: spool file not written: %s", req.AffectedSOPInstanceUID, exc)
            return REFUSED_CLOSED
        spool = None
    if relay is None and inbox is None:
        return None
    _receive_fast(event.assoc)
    head = getattr(req, receive_direct.HEAD, None)
    if relay is None:
        assert inbox is not None
        return _deliver_to_inbox(inbox, Path(event.dataset_path), str(req.AffectedSOPClassUID), str(req.AffectedSOPInstanceUID),
                                 str(event.context.transfer_syntax), 60.0, head)
    content = None if spool is None else spool.buffer  # identity.check takes the head from it when the DUL read it
    return relay.deliver(Path(event.dataset_path), str(req.AffectedSOPClassUID), str(req.AffectedSOPInstanceUID),
                         str(event.context.transfer_syntax), head, content)


def _wake_on_activity(assoc: Any) -> None:
    """Our association to the remote (its C-MOVE responses come on it): its DUL waits in ``select`` for them
    instead of waking every 1 ms (measured ~0.4 ms of CPU per relayed instance, most of it idle polling)."""
    from xdsi.dimse import wakeup

    if getattr(assoc, "dul", None) is not None and not wakeup.install(assoc):
        poll_fast(assoc)


def _receive_fast(assoc: Any) -> None:
    """The remote's storage association, as the archive's own C-STORE path has it (``DicomServer.on_store``):
    Success responses encoded straight to bytes, and both pynetdicom loops woken by activity, not 1 ms polls.

    Why: the remote sends its next instance only once it has our C-STORE response, so every poll on the
    way (request decoded -> handler, response queued -> socket) is paid once per relayed instance:
    measured (bench/gateway.py) the larger part of a C-GET via C-MOVE was spent waiting for the remote.
    """
    from xdsi.dimse import store_polling, store_responses, wakeup
    from xdsi.gateway import receive

    if getattr(assoc, "dimse", None) is None or getattr(assoc, "dul", None) is None:  # a stand-in without pynetdicom's loops
        return
    receive.install(assoc)  # the next C-STOREs' File Meta written as bytes, not by pydicom
    store_responses.install(assoc)
    if not wakeup.install(assoc):
        if assoc.is_requestor:  # store_polling's checkpoint is an acceptor's reactor gate
            poll_fast(assoc)
        else:
            store_polling.install(assoc)


# -- sources ----------------------------------------------------------------------------------------


PENDING_PASS_EVERY = 1.0  # seconds: a Pending response still reaches pynetdicom's waiting thread at least this often
_COMMAND_LAST = 0x03  # PDV control header: a command set's last (here: only) fragment (PS3.8 E.2)


def _plain_pending(primitive: Any, msg_id: int) -> bool:
    """A P-DATA that is exactly one whole C-MOVE-RSP command set: Pending, to ``msg_id``, no identifier, nothing optional
    that a Pending response may carry but the relay would have to look at (an Error Comment, a Failed SOP list)."""
    if primitive.__class__ is not P_DATA or len(primitive.presentation_data_value_list) != 1:
        return False
    _, data = primitive.presentation_data_value_list[0]
    if not data or data[0] != _COMMAND_LAST:
        return False
    fields = parse_command(bytes(data[1:]))
    if fields is None or not fields.keys() <= _PENDING_FIELDS:
        return False
    return (_ushort(fields.get(0x0100)) == MOVE_RSP and _ushort(fields.get(0x0120)) == msg_id
            and _ushort(fields.get(0x0900)) in PENDING and _ushort(fields.get(0x0800)) == NO_DATA_SET)


# Command Group Length, Affected SOP Class UID, Command Field, Message ID Being Responded To, Command Data Set Type,
# Status, the four sub-operation counts (PS3.7 C.4.2.1.1): what a plain Pending C-MOVE-RSP holds
_PENDING_FIELDS = frozenset((0x0000, 0x0002, 0x0100, 0x0120, 0x0800, 0x0900, 0x1020, 0x1021, 0x1022, 0x1023))
MOVE_RSP, NO_DATA_SET = 0x8021, 0x0101


def _ushort(value: bytes | None) -> int | None:
    return int.from_bytes(value, "little") if value is not None and len(value) == 2 else None


def skip_pending(assoc: Any, relay: Relay) -> None:
    """Our C-MOVE association to the remote: its Pending responses are looked at by the DUL and dropped once the sink
    has the total, instead of decoded into pydicom Datasets and handed to the thread waiting in ``send_c_move``.

    Why (issue 15): the remote sends one per instance, and after the first counted one the relay uses none of them
    (``pump_responses(every=False)`` drops them anyway, :meth:`Exchange.rest` skips them); pynetdicom's decoding
    (``decode_msg``, ``message_to_primitive``), the queue hand-off and the generator's status Dataset were measured
    ~0.4-0.7 ms per relayed instance.  What still happens for each: the inbox is drained, as ``pump_responses`` does
    ahead of a response (instances another worker received come before it).  One at least every
    :data:`PENDING_PASS_EVERY` seconds goes through as before, so the waiting thread's DIMSE timeout measures the
    remote's silence, not the length of the study; anything else (the final response, a Pending one with an
    identifier or a comment, a response split over PDVs, other PDUs) is pynetdicom's.
    """
    dimse = getattr(assoc, "dimse", None)
    if dimse is None or getattr(dimse, "_xdsi_skip_pending", False):
        return
    original = dimse.receive_primitive
    passed = [time.monotonic()]

    def receive_primitive(primitive: Any) -> None:
        now = time.monotonic()
        if dimse.message is None and relay.announced and now - passed[0] < PENDING_PASS_EVERY and _plain_pending(primitive, relay.msg_id):
            try:
                relay.drain_inbox(quick=True)
            except Exception:  # noqa: BLE001 - the response then goes the usual way, whose pump drains again
                log.exception("relay %s/%d: inbox not drained by the DUL", relay.remote_ae, relay.msg_id)
            else:
                relay.skipped_pending += 1
                return
        passed[0] = now
        original(primitive)

    dimse.receive_primitive = receive_primitive
    dimse._xdsi_skip_pending = True


def pump_responses(relay: Relay, client: RemoteClient, op: str, responses: Any, every: bool = True) -> str | None:
    """The remote's C-MOVE/C-GET responses into ``relay`` until its final one; the problem if one never came.

    ``every`` False (a relay, whose sink counts the instances it sends, not the remote's Pending counts): once
    the sink has the total (:meth:`Relay.announce`), a Pending response is not queued, only the inbox drained
    ahead of it (instances before the response that counts them, as :meth:`Relay.response` does).  Why: each one
    woke the sink for nothing it uses (``Exchange.rest`` skips them), one wake-up and two inbox listings per
    relayed instance (issue 15).  The forwarded C-MOVE (its sink relays the remote's counts) takes every one.
    """
    for st, ident in responses:
        code = getattr(st, "Status", None)
        if code is None:  # pynetdicom's timeout or abort: an empty response
            return f"{client.remote.name}: no {op} response in {client.remote.timeout:g} s"
        if not every and relay.announced and int(code) in PENDING:
            relay.drain_inbox()
            continue
        relay.response(st, ident)
    return None


def remote_failure(exc: Exception, client: RemoteClient, what: str) -> str:
    """The problem a retrieve from a remote ended with: its unavailability as such, anything else logged whole."""
    if isinstance(exc, RemoteUnavailable):
        return str(exc)
    log.exception("%s %s failed", what, client)
    return f"{client.remote.name}: {exc.__class__.__name__}"


def start_move_source(client: RemoteClient, identifier: Dataset, model: str, relay: Relay) -> threading.Thread:
    """C-MOVE to us from the remote, in a thread; its responses go into ``relay``."""
    if relay.expected is None:
        relay.expected = identity.Expected.of(identifier)

    def run() -> None:
        problem = None
        expected_back: Callable[[], None] = lambda: None
        try:
            with client.association(qr_contexts(model)) as assoc:
                relay.cancel_remote = lambda: assoc.send_c_cancel(relay.msg_id, query_model=model)
                _wake_on_activity(assoc)
                skip_pending(assoc, relay)
                from xdsi.dimse import wakeup

                # its Pending responses, dropped anyway, read in batches while instances are still to come
                relay.wake_source = wakeup.read_lazily(assoc, relay.reading_lazily)
                # the remote's storage association is best accepted by this worker: the instances then go from one
                # association to the other in memory, not through the inbox (xdsi.dimse.accept_balance)
                balance = accept_balance.current()
                if balance is not None:
                    expected_back = relay.on_first_arrival = balance.expect()
                problem = pump_responses(relay, client, "C-MOVE", assoc.send_c_move(identifier, client.move_destination, model, msg_id=relay.msg_id),
                                         every=False)
                # the remote's final response is in, so every instance it sent is too: the requester has its final
                # response now, not after our association's release (5-20 ms in bench/gateway.py, issue 15); what
                # other workers put in the inbox before it is queued first, and the inbox is gone before the end
                relay.drain_inbox()
                unregister(relay)
                relay.end(problem)
        except Exception as exc:
            problem = remote_failure(exc, client, "C-MOVE to")
        finally:
            expected_back()
            relay.cancel_remote = relay.wake_source = None
            relay.end(problem)
            # only now: until the remote's last response, a late instance (after a cancel) is refused, not archived
            unregister(relay)

    register(relay)
    t = threading.Thread(target=run, name=f"relay-move-{client.remote.name}", daemon=True)
    t.start()
    return t


def start_get_source(client: RemoteClient, identifier: Dataset, model: str, relay: Relay, storage: list[Any]) -> threading.Thread:
    """C-GET from the remote, in a thread, taking the SCP role for ``storage`` contexts; instances and responses into ``relay``."""
    if relay.expected is None:
        relay.expected = identity.Expected.of(identifier)

    def on_store(event: Any) -> int:
        req = event.request
        spool = receive.memory_spool(req)
        return relay.deliver(Path(event.dataset_path), str(req.AffectedSOPClassUID), str(req.AffectedSOPInstanceUID),
                             str(event.context.transfer_syntax), getattr(req, receive_direct.HEAD, None),
                             None if spool is None else spool.buffer)

    def run() -> None:
        problem = None
        contexts = qr_contexts(model) + storage[: 128 - 1]
        try:
            from pynetdicom import evt

            with client.association(contexts, scp_roles=[str(cx.abstract_syntax) for cx in storage[:127]],
                                    handlers=[(evt.EVT_C_STORE, on_store)]) as assoc:
                relay.cancel_remote = lambda: assoc.send_c_cancel(relay.msg_id, query_model=model)
                _receive_fast(assoc)  # the remote's C-STOREs come on this association
                problem = pump_responses(relay, client, "C-GET", assoc.send_c_get(identifier, model, msg_id=relay.msg_id), every=False)
                relay.end(problem)  # the final response is in: no more C-STOREs on this association (as for a C-MOVE)
        except Exception as exc:
            problem = remote_failure(exc, client, "C-GET from")
        finally:
            relay.cancel_remote = None
            relay.end(problem)

    t = threading.Thread(target=run, name=f"relay-get-{client.remote.name}", daemon=True)
    t.start()
    return t


# -- placeholders and sending -------------------------------------------------------------------------


class RelayedInstance(Dataset):
    """The placeholder yielded to pynetdicom for an instance that arrived: identity only, the bytes are in a file.

    The two UIDs are put in as raw elements (:func:`xdsi.dimse.direct.put_identity`, as a local retrieve's
    placeholder): through ``setattr`` each placeholder cost 16 us, a third of the Python between one
    sub-operation's response and the next request (issue 15); this way 6 us.
    """

    def __init__(self, arrived: Arrived) -> None:
        super().__init__()
        direct.put_identity(self, arrived.sop_class_uid, arrived.sop_instance_uid)
        object.__setattr__(self, "_xdsi_arrived", arrived)


class MissingInstance(Dataset):
    """A sub-operation the remote failed (or never delivered): counted and listed as failed, nothing sent."""

    def __init__(self, sop_instance_uid: str, reason: str) -> None:
        super().__init__()
        if sop_instance_uid:
            self.SOPInstanceUID = sop_instance_uid
        self._xdsi_reason = reason

    def __bool__(self) -> bool:
        """Always true: pynetdicom's C-GET/C-MOVE SCP tests ``status is Pending and dataset``, and an empty
        Dataset (a missing instance whose UID the remote did not list) is false, so the sub-operation
        would be skipped, neither failed nor sent, and the final response would be Success with
        Remaining > 0.  True, it reaches ``send_c_store``, which raises, and is counted failed."""
        return True


SENT_FILES_KEPT = 2  # sent spool files whose removal may wait (Finisher): never more, whatever the sender does


class Finisher:
    """What happens to an arrived instance once it is sent on: archived (``cache``) or deleted."""

    def __init__(self, relay: Relay, store: Any | None, source_ae: str) -> None:
        self.relay = relay
        self.store = store
        self.source_ae = source_ae
        self.syntaxes: dict[tuple[str, str], list[str]] = {}  # (SOP class, arrived syntax) -> accepted syntaxes on the sink
        self.expecting: Any = None  # the DirectWriter told to read the next instance ahead (relay.upcoming)

    def sent(self, arrived: Arrived, ok: bool, reason: str = "") -> None:
        """The receiver's answer for ``arrived`` (before the file is archived or removed): for the audit trail."""
        audit = self.relay.audit
        if audit is None:
            return
        try:
            if not arrived.study_uid:  # checked by another worker: read what the audit needs while the file is here
                ds = identity.read_identity(arrived.path)
                arrived.study_uid, arrived.patient_id = str(ds.get("StudyInstanceUID", "") or ""), str(ds.get("PatientID", "") or "")
            audit.arrived(arrived.study_uid, arrived.patient_id, arrived.sop_class_uid)
            audit.sent(arrived.study_uid, arrived.sop_class_uid, ok, reason)
        except Exception:  # the relay goes on regardless of its audit
            log.exception("audit of relayed %s failed", arrived.sop_instance_uid)

    def __call__(self, arrived: Arrived) -> None:
        try:
            if self.store is not None:
                result = self.store.store_file(arrived.materialize(), source_ae=self.source_ae, move=True)
                if not result.ok:
                    log.warning("relayed %s not cached: %s", arrived.sop_instance_uid, result.reason)
        except Exception:
            log.exception("caching relayed %s failed", arrived.sop_instance_uid)
        finally:
            if arrived.data is not None:  # sent from memory, not cached: no file was made
                arrived.data = None
            elif self.store is None and self.expecting is not None and len(self.relay.sent_files) < SENT_FILES_KEPT:
                # removed by Exchange.upcoming, which the sender calls while the receiver takes the next instance in:
                # the unlink of half a megabyte (~0.1 ms) is then no longer between one response and the next request
                self.relay.sent_files.append(arrived.path)
            else:
                _unlink(arrived.path)
            self.relay.consumed()


def send_relayed(assoc: Any, original: Callable[..., Any], dataset: Any, finish: Finisher, *args: Any, **kwargs: Any) -> Any:
    """Send a :class:`RelayedInstance` on ``assoc`` (unchanged if its syntax was accepted, else converted)."""
    if isinstance(dataset, MissingInstance):
        raise LookupError(dataset._xdsi_reason)
    if not isinstance(dataset, RelayedInstance):
        return original(dataset, *args, **kwargs)
    arrived: Arrived = dataset._xdsi_arrived
    converted: Path | None = None
    try:
        if not assoc.is_established:
            raise ConnectionError("the association is no longer established")
        key = (arrived.sop_class_uid, arrived.transfer_syntax_uid)
        accepted = finish.syntaxes.get(key)
        if accepted is None:  # the accepted contexts do not change during an association: sorted and filtered once per pair
            accepted = finish.syntaxes[key] = accepted_syntaxes(assoc, *key, native_first=assoc.is_requestor)
        if not accepted:
            raise NoAcceptedContext(f"no accepted presentation context for {arrived.sop_class_uid} ({arrived.sop_instance_uid})")
        choice = transcode.choose(arrived.transfer_syntax_uid, accepted, transcode.facts(arrived.materialize())
                                  if arrived.transfer_syntax_uid not in accepted else None)
        if choice is None:
            raise transcode.TranscodeError(f"{arrived.sop_instance_uid} ({arrived.transfer_syntax_uid}) cannot be sent as any of {', '.join(accepted)}")
        path = arrived.path
        if not choice.unchanged:
            converted = arrived.path.with_suffix(".converted.dcm")
            with open(converted, "wb") as out:
                transcode.write_converted(arrived.materialize(), choice.transfer_syntax, out)
            path = converted
        content = arrived.data if converted is None else None  # sent from memory when it is only there
        rsp = None
        writer = direct.writer_of(assoc)
        if writer is not None and finish.expecting is not writer and finish.relay.upcoming is not None:
            writer.expect(finish.relay.upcoming)  # the next arrived file read while the receiver answers this one
            finish.expecting = writer
        if writer is not None:  # written to the socket and answered by this thread (xdsi.dimse.direct), as local retrieves are
            rsp = writer.send_c_store(path, arrived.sop_class_uid, arrived.sop_instance_uid, choice.transfer_syntax, *args,
                                      content=content, **kwargs)
        if rsp is None:  # no direct writer, or a file pynetdicom must read (unusual File Meta)
            rsp = original(arrived.materialize() if converted is None else path, *args, **kwargs)
        code = getattr(rsp, "Status", None)
        finish.sent(arrived, code is not None and (code == 0 or 0xB000 <= code <= 0xBFFF),
                    "no response" if code is None else f"C-STORE status 0x{int(code):04X}")
        return rsp
    except Exception as exc:  # not sent (no context, not convertible, association gone): pynetdicom counts it failed
        finish.sent(arrived, False, f"{exc.__class__.__name__}: {exc}")
        raise
    finally:
        if converted is not None:
            _unlink(converted)
        finish(arrived)


def install_relay_sender(assoc: Any, finish: Finisher) -> Callable[[], None]:
    """Wrap the requester association's ``send_c_store`` for the relay's placeholders; returns the undo."""
    original = assoc.send_c_store

    def send_c_store(dataset: Any, *args: Any, **kwargs: Any) -> Any:
        return send_relayed(assoc, original, dataset, finish, *args, **kwargs)

    assoc.send_c_store = send_c_store

    def undo() -> None:
        assoc.send_c_store = original

    return undo


# -- the retrieve handlers ------------------------------------------------------------------------------


def _counts(st: Dataset) -> list[int] | None:
    values = [st.get(k) for k in COUNT_KEYS]
    if any(v is None or v == "" for v in values[1:]):
        return None
    return [int(v or 0) for v in values]


class Exchange:
    """Reads the relay's items for one retrieve: the total, the instances in order, the remote's outcome."""

    def __init__(self, event: Any, relay: Relay) -> None:
        self.event = event
        self.relay = relay
        self.buffered: list[Arrived] = []
        self.final: Dataset | None = None
        self.final_identifier: Dataset | None = None
        self.problem: str | None = None
        self.ended = False
        self.cancelled = False
        self.pending: list[tuple[str, Any]] = []

    def _next(self) -> tuple[str, Any] | None:
        """The next item, or None when the requester cancelled or went away (checked every POLL).

        Instances in the relay's inbox (put there by another process) come before a response or the end:
        the remote answers only after our C-STORE response, which comes after the file is in the inbox.
        """
        poll = POLL if self.relay.inbox is None else INBOX_POLL
        while True:
            if self.event.is_cancelled or not self.event.assoc.is_established:
                self.cancelled = True
                return None
            if self.pending:
                return self.pending.pop(0)
            try:
                item = self.relay.items.get(timeout=poll)
            except queue.Empty:
                item = None
            if self.relay.inbox is not None and (item is None or item[0] != "instance"):
                taken = self.relay.from_inbox()
                with self.relay._cond:
                    self.relay.ahead += len(taken)
                self.pending = [("instance", a) for a in taken]
                if item is not None:
                    self.pending.append(item)
                continue
            if item is not None:
                return item

    def total(self) -> int | None:
        """Sub-operations the remote announces (None: it ended without saying, or the requester cancelled)."""
        while True:
            item = self._next()
            if item is None:
                return None
            kind, value = item
            if kind == "instance":
                self.buffered.append(value)
            elif kind == "rsp":
                st, ident = value
                counts = _counts(st)
                if int(st.Status) in PENDING:
                    if counts is not None and counts[0] is not None:
                        self.relay.announce(sum(counts))
                        return sum(counts)
                    continue
                self.final, self.final_identifier = st, ident
                return sum(counts[1:]) + (counts[0] or 0) if counts is not None else len(self.buffered)
            else:
                self.ended, self.problem = True, value
                return None

    def rest(self) -> Iterator[Arrived]:
        """Every instance (buffered first) until the remote's final response and the source's end."""
        while self.buffered:
            yield self.buffered.pop(0)
        while not self.ended:
            item = self._next()
            if item is None:
                return
            kind, value = item
            if kind == "instance":
                yield value
            elif kind == "rsp":
                st, ident = value
                if int(st.Status) not in PENDING:
                    self.final, self.final_identifier = st, ident
                    log.info("relay %s/%d: remote final 0x%04X counts %s", self.relay.remote_ae, self.relay.msg_id,
                             int(st.Status), _counts(st))
            else:
                self.ended = True
                self.problem = self.problem or value

    def upcoming(self) -> Path | None:
        """The spool file of the instance :meth:`rest` hands out next, if it is already here (for the sender's read-ahead).

        A guess, read from another thread's queue without taking anything: the sender uses what it read only if
        the file it is then asked to send is this one, unchanged (``DirectWriter._claim``).  Called while the
        receiver answers the instance just sent, so the files already sent are removed here too.
        """
        self.relay.remove_sent()
        for arrived in self.buffered[:1]:
            return _file_of(arrived)
        for kind, value in self.pending[:1]:
            return _file_of(value) if kind == "instance" else None
        try:
            kind, value = self.relay.items.queue[0]
        except IndexError:
            return None
        return _file_of(value) if kind == "instance" else None

    def discard(self) -> None:
        """Remove what was taken but never handed out (the retrieve cancelled, the requester gone, an error)."""
        for arrived in self.buffered:
            arrived.drop()
        self.buffered.clear()
        for kind, value in self.pending:  # taken from the inbox ahead of a response, never returned
            if kind == "instance":
                value.drop()
        self.pending.clear()

    def failed_uids(self) -> list[str]:
        ident = self.final_identifier
        value = ident.get("FailedSOPInstanceUIDList", []) if ident is not None else []
        if isinstance(value, str):
            return [value] if value else []
        return [str(v) for v in value]

    def cancel(self) -> None:
        self.relay.cancelling = True
        self.relay.wake()
        cancel = self.relay.cancel_remote
        if cancel is not None:
            try:
                cancel()
            except Exception as exc:
                log.debug("C-CANCEL to the remote: %s", exc)


def _file_of(arrived: Arrived) -> Path | None:
    """The spool file to read ahead for ``arrived``; None when its bytes are in memory (nothing to read)."""
    return arrived.path if arrived.data is None else None


def failure(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


def relay_suboperations(event: Any, relay: Relay, what: str, on_count: Callable[[int], None] | None = None) -> Iterator[Any]:
    """Yields the count, then one placeholder per sub-operation (pynetdicom's C-GET/C-MOVE protocol after the destination).

    ``what`` names the retrieve in log lines.  Cleans up (relay closed, remote cancelled if still
    running, unsent files removed) however the generator ends.
    """
    ex = Exchange(event, relay)
    relay.upcoming = ex.upcoming
    sent = 0
    last: Arrived | None = None
    t_start = time.monotonic()
    try:
        total = ex.total()
        if total is None and ex.cancelled:
            ex.cancel()
            yield max(1, len(ex.buffered))
            yield Status.CANCEL, None
            return
        if total is None:  # the remote ended without a response: unreachable, refused, timed out
            reason = ex.problem or "the remote gave no answer"
            log.warning("%s: %s", what, reason)
            yield 1
            yield failure(0xA702, reason), failed_identifier([])
            return
        if total == 0:
            code = int(ex.final.Status) if ex.final is not None else 0
            if code not in (0x0000, 0xB000):
                comment = str(ex.final.get("ErrorComment", "") or "") if ex.final is not None else ""
                reason = f"remote answered 0x{code:04X}" + (f" {comment}" if comment else "")
                log.warning("%s: %s", what, reason)
                yield 1
                yield failure(0xA702 if code == 0xA801 else code, reason), failed_identifier([])
                return
            yield 0
            return
        if on_count is not None:
            on_count(total)
        t_count = time.monotonic()
        yield total
        sending = 0.0
        for arrived in ex.rest():
            if sent >= total:
                log.warning("%s: the remote sent more instances than it announced (%d); %s dropped", what, total, arrived.sop_instance_uid)
                arrived.drop()
                relay.consumed()
                continue
            sent += 1
            t = time.monotonic()
            last = arrived
            yield Status.PENDING, RelayedInstance(arrived)
            last = None
            sending += time.monotonic() - t
        log.info("%s: %d relayed, count known after %.3f s, then %.3f s (%.3f s sending, the rest waiting for the remote); "
                 "%d Pending responses not decoded, %d instances received by another process, %d waited on disk", what, sent,
                 t_count - t_start, time.monotonic() - t_count, sending, relay.skipped_pending, relay.via_inbox, relay.spilled)
        if ex.cancelled:
            ex.cancel()
            yield Status.CANCEL, None
            return
        missing = total - sent
        if missing > 0:
            uids = ex.failed_uids()
            reason = ex.problem or "the remote did not deliver it"
            log.warning("%s: %d of %d instances not delivered by the remote (%s)", what, missing, total, reason)
            for i in range(missing):
                yield Status.PENDING, MissingInstance(uids[i] if i < len(uids) else "", reason)
    finally:
        relay.upcoming = None
        if not ex.ended:
            ex.cancel()
        relay.close()
        if relay.audit is not None:  # recorded to the spool once the requester has had every sub-operation
            relay.audit.end(relay.refused, "cancelled" if ex.cancelled else ex.problem)
        ex.discard()
        if last is not None:  # yielded but never sent (the requester went away): its file is ours to remove
            last.drop()


def start_source(client: RemoteClient, how: str, identifier: Dataset, model: str, relay: Relay, storage: list[Any]) -> None:
    if how == "move":
        start_move_source(client, identifier, model, relay)
    else:
        start_get_source(client, identifier, model, relay, storage)


def sweep(spool_dir: Path, older_than: float = 3600.0) -> int:
    """Remove relay spool files older than ``older_than`` seconds (left by a crash); newer ones may be another
    process's live relay (``xdsi serve --workers``).  Returns how many were removed."""
    removed = 0
    cutoff = time.time() - older_than
    try:
        entries = list(spool_dir.iterdir())
    except FileNotFoundError:
        return 0
    for p in entries:
        try:
            if p.name.startswith("relay-") and p.stat().st_mtime < cutoff:
                p.unlink()
                removed += 1
            elif p.name.startswith("inbox-") and p.is_dir() and p.stat().st_mtime < cutoff:
                shutil.rmtree(p, ignore_errors=True)  # a crashed process's relay: nobody waits for what would land there
                removed += 1
        except OSError:
            continue
    return removed


def new_relay(spool_dir: Path, client: RemoteClient) -> Relay:
    relay = Relay(spool_dir, client.remote.ae_title, next_message_id())
    relay.originator = client.calling_ae
    relay.timeout = client.remote.timeout
    return relay
