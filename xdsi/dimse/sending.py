"""C-STORE sub-operations of C-MOVE and C-GET: what we propose, what we accept, what we send.

pynetdicom's C-GET and C-MOVE services accept only a decoded ``Dataset`` from
the handler, which would put each instance (a 1 GB whole-slide image
included) in memory.  We hand them a small placeholder (:class:`StoredInstance`)
that names the instance, and wrap the sending association's ``send_c_store``
so that the retrieval service produces it in a transfer syntax the peer
accepted for its SOP class (``archive.retrieve.produce``) and pynetdicom's
chunked sender streams that file: the stored file byte for byte when the
peer accepted the stored syntax, else a converted copy spooled to disk.

Anything that goes wrong for one instance (no accepted context for its SOP
class, not recallable, not convertible) raises inside ``send_c_store``
before a C-STORE request goes out; pynetdicom counts that as a failed
sub-operation and lists the SOP Instance UID in Failed SOP Instance UID List.

C-MOVE (we are the requestor of the sub-association): :func:`contexts_for`
proposes, for each SOP class, the stored syntax(es), then Explicit VR Little
Endian and Implicit VR Little Endian, each in a presentation context of its
own so the destination says yes or no to each and we choose per instance.

C-GET (the requestor proposes, we accept one syntax per context): pynetdicom
picks in the acceptor's order; :func:`prefer_requestor_syntaxes` makes it the
requestor's order, because the requestor knows what it wants to receive
(``getscu +xy`` asks for JPEG Baseline and must get the stored JPEG bytes).
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.presentation import build_context

from xdsi.archive import transcode
from xdsi.dimse import direct
from xdsi.jpip.urls import JPIP_SYNTAXES

log = logging.getLogger(__name__)

NATIVE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)  # what every storage SCP takes; Implicit is mandatory
MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: odd context IDs 1..255


class NoAcceptedContext(LookupError):
    """The peer accepted no presentation context we could send this instance's SOP class on."""


class StoredInstance(Dataset):
    """A placeholder for an archived instance: carries identity and where to ask for it, not content."""

    def __init__(self, source: Any, ref: Any) -> None:
        super().__init__()
        self.SOPClassUID = ref.sop_class_uid
        self.SOPInstanceUID = ref.sop_instance_uid
        self._xdsi_source = source  # the archive's RetrieveService
        self._xdsi_ref = ref


def accepted_syntaxes(assoc: Any, sop_class: str, stored_ts: str, *, native_first: bool) -> list[str]:
    """Transfer syntaxes the peer accepted for ``sop_class`` with us as the storage SCU, best first.

    The stored syntax comes first (sent unchanged).  For a C-MOVE
    (``native_first``) the uncompressed syntaxes follow, so an instance whose
    stored syntax was refused is decoded rather than re-encoded; for a C-GET
    the requestor's context order is kept, since it proposed them.
    """
    found: list[str] = []
    for cx in sorted(assoc.accepted_contexts, key=lambda c: c.context_id or 0):
        if cx.abstract_syntax != sop_class or not cx.transfer_syntax or not getattr(cx, "as_scu", True):
            continue
        ts = str(cx.transfer_syntax[0])
        if ts not in found:
            found.append(ts)
    head = [stored_ts] if stored_ts in found and not jpip_before(found, stored_ts, native_first) else []
    if native_first:
        head += [ts for ts in NATIVE if ts in found and ts not in head]
    return head + [ts for ts in found if ts not in head]


# -- C-GET: accept in the requestor's order -----------------------------------------------------


def _honoured(ts: str) -> bool:
    """A syntax we accept ahead of our own order when the requestor prefers it.

    Every syntax we produce (Explicit/Implicit VR Little Endian, Explicit VR
    Big Endian, Deflated Explicit VR Little Endian; JPEG 2000 and RLE where
    the encoder is installed) and every encapsulated (compressed) syntax,
    which instances stored in it are sent in unchanged.  The accepted context
    carries every instance of its SOP class on the association: instances
    stored otherwise are converted to it, or, where that cannot be done (a
    compressed syntax we do not encode, Pixel Data of more than 16 bits in
    big endian), refused one by one as failed sub-operations.
    """
    return transcode.can_encode(ts) or UID(ts).is_encapsulated


def requestor_choice(proposed: Sequence[str], ours: Sequence[str]) -> str | None:
    """The syntax we accept for one proposed storage context of a C-GET requestor, or None for pynetdicom's.

    The requestor's first proposed syntax that we support and :func:`_honoured`;
    if it proposed none (only private or unknown syntaxes), pynetdicom's
    negotiation in our order decides.
    """
    for ts in proposed:
        if ts in ours and _honoured(ts):
            return ts
    return None


def prefer_requestor_syntaxes(event: Any) -> None:
    """EVT_REQUESTED: for storage contexts the requestor wants us to send on (SCP role), choose in its order.

    pynetdicom accepts, per requested context, the first of *our* transfer
    syntaxes that the requestor listed (one list per SOP class for all the
    requestor's contexts).  For the contexts we are to send on, we narrow the
    requested context to the one syntax :func:`requestor_choice` picks, so
    each context gets the requestor's own first choice and
    ``[JPEG Baseline, Explicit VR LE]`` gets JPEG Baseline.
    """
    assoc = event.assoc
    roles = assoc.requestor.role_selection
    want_scp = {uid for uid, item in roles.items() if item.scp_role}
    if not want_scp:
        return
    ours = {cx.abstract_syntax: [str(t) for t in cx.transfer_syntax] for cx in assoc.acceptor.supported_contexts}
    for cx in assoc.requestor.primitive.presentation_context_definition_list or []:
        if cx.abstract_syntax not in want_scp or cx.abstract_syntax not in ours:
            continue
        chosen = requestor_choice([str(t) for t in cx.transfer_syntax], ours[cx.abstract_syntax])
        if chosen is not None:
            cx.transfer_syntax = [chosen]


# -- the sender -----------------------------------------------------------------------------------

# How long pynetdicom's DUL reactor sleeps when it finds nothing to do (its ``_run_loop_delay``, 1 ms).
# Every C-STORE sub-operation waits for the peer's response through that loop, and a 1 ms poll is a
# fifth of the ~5 ms one 512x512 CT takes on loopback; polling ten times as often while we send
# measured +13 % C-GET MB/s (getscu).  Only for the duration of a retrieve: an idle association
# polling every 100 us would cost CPU for nothing.
SENDING_LOOP_DELAY = 0.0001


def poll_fast(assoc: Any) -> float | None:
    """Let ``assoc``'s DUL reactor poll at :data:`SENDING_LOOP_DELAY`; returns the delay it had (None: no DUL).

    ``_run_loop_delay`` is pynetdicom's (3.0) only knob for the reactor's idle sleep; it is read
    on every loop, so setting it on a running association takes effect at once.  An object
    without a DUL (a :class:`RefusedSubAssociation`) is left alone.
    """
    dul = getattr(assoc, "dul", None)
    previous = getattr(dul, "_run_loop_delay", None)
    if previous is not None:
        dul._run_loop_delay = min(previous, SENDING_LOOP_DELAY)
    return previous


@contextmanager
def fast_polling(assoc: Any) -> Iterator[None]:
    """:func:`poll_fast` while the block runs (the sub-operations of a C-GET), then the reactor's own delay again."""
    previous = poll_fast(assoc)
    try:
        yield
    finally:
        if previous is not None:
            assoc.dul._run_loop_delay = previous


# While the sending thread writes and reads a C-GET's or C-MOVE's sub-operations itself (xdsi.dimse.direct), the
# DUL reactors of the associations involved only watch for a C-CANCEL or an A-ABORT; polling every 1 ms
# (pynetdicom's default) woke each of them a thousand times a second to take the GIL from the sender.
DIRECT_LOOP_DELAY = 0.005


@contextmanager
def quiet_polling(assoc: Any, delay: float = DIRECT_LOOP_DELAY) -> Iterator[None]:
    """The DUL reactor of ``assoc`` idles ``delay`` between polls while the block runs, then its own delay again."""
    dul = getattr(assoc, "dul", None)
    previous = getattr(dul, "_run_loop_delay", None)
    if previous is not None:
        dul._run_loop_delay = max(previous, delay)
    try:
        yield
    finally:
        if previous is not None:
            dul._run_loop_delay = previous


class HeldCheckpoint(threading.Event):
    """A C-MOVE sub-association's reactor checkpoint that keeps the reactor paused between C-STOREs.

    pynetdicom's ``Association.send_c_store`` clears ``_reactor_checkpoint``, waits until the
    association's reactor thread notices and pauses (it looks every 1 ms, ``time.sleep(0.001)`` in
    ``_run_reactor``), sends, and sets the checkpoint again.  On a requestor association that
    does nothing but send, that was ~1 ms of every sub-operation (8 % of the C-MOVE handler's
    samples spinning in that wait).  With this checkpoint installed, ``set()`` leaves the
    reactor paused while the association is established and sending; it is a real ``set()``
    once the association is released, aborted, killed or its DUL has stopped, so the
    reactor always gets to see the end and exit (pynetdicom's ``release``, ``abort`` and
    ``kill`` all call ``set()`` after marking that state, and :meth:`DicomServer.stop` aborts).
    """

    def __init__(self, assoc: Any) -> None:
        super().__init__()
        self._assoc = assoc

    def set(self) -> None:
        a = self._assoc
        if a.is_established and not a._sent_abort and not a._kill and a.dul.is_alive():
            return  # stay paused: the next send_c_store finds the reactor already out of the way
        super().set()


def hold_reactor(assoc: Any) -> None:
    """Install :class:`HeldCheckpoint` on an established sub-association (one that only sends C-STOREs).

    pynetdicom (3.0) reads ``assoc._reactor_checkpoint`` on every reactor loop, so the new
    event is the one waited on from the next loop; it starts set, as the old one is.
    """
    if getattr(assoc, "dul", None) is None or not hasattr(assoc, "_reactor_checkpoint"):
        return
    checkpoint = HeldCheckpoint(assoc)
    threading.Event.set(checkpoint)  # running, like the checkpoint it replaces; the first send pauses it
    assoc._reactor_checkpoint = checkpoint


def _peer(assoc: Any) -> str:
    return str(assoc.acceptor.ae_title if assoc.is_requestor else assoc.requestor.ae_title).strip()


def _dul_established(assoc: Any) -> bool:
    """The DUL is still in Sta6 (association established): with the reactor held paused, nobody else
    notices that the peer aborted or closed between two sub-operations."""
    dul = getattr(assoc, "dul", None)
    machine = getattr(dul, "state_machine", None)
    return machine is None or (dul.is_alive() and machine.current_state == "Sta6")


def install_streaming_sender(assoc: Any) -> None:
    """Wrap ``assoc.send_c_store`` (once) so :class:`StoredInstance` placeholders are produced and streamed."""
    if getattr(assoc, "_xdsi_streaming", False):
        return
    original: Callable[..., Any] = assoc.send_c_store
    syntaxes: dict[tuple[str, str], list[str]] = {}

    def send_c_store(dataset: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(dataset, StoredInstance):
            return original(dataset, *args, **kwargs)
        ref = dataset._xdsi_ref
        if not assoc.is_established or (assoc.is_requestor and not _dul_established(assoc)):
            # the peer released or aborted: fail the remaining instances without recalling or converting them
            raise ConnectionError(f"association with {_peer(assoc)} is no longer established")
        key = (ref.sop_class_uid, ref.transfer_syntax_uid)
        accepted = syntaxes.get(key)
        if accepted is None:  # the accepted contexts do not change during an association: sorted and filtered once per pair
            accepted = syntaxes[key] = accepted_syntaxes(
                assoc, ref.sop_class_uid, ref.transfer_syntax_uid, native_first=assoc.is_requestor
            )
        if not accepted:
            raise NoAcceptedContext(
                f"{_peer(assoc)} accepted no presentation context for {UID(ref.sop_class_uid).name} ({ref.sop_instance_uid})"
            )
        try:
            produced = dataset._xdsi_source.produce(ref, accepted)
        except Exception as exc:
            log.error("cannot send %s to %s (accepted %s): %s", ref.sop_instance_uid, _peer(assoc), ", ".join(accepted), exc)
            raise
        with produced:
            if not produced.unchanged:
                log.info(
                    "sending %s to %s as %s (stored as %s)",
                    ref.sop_instance_uid, _peer(assoc), UID(produced.transfer_syntax).name, UID(ref.transfer_syntax_uid).name,
                )
            writer = direct.writer_of(assoc)
            if writer is not None:
                status = writer.send_c_store(
                    produced.file_path(), ref.sop_class_uid, ref.sop_instance_uid, produced.transfer_syntax, *args, **kwargs
                )
                if status is not None:
                    return status
            return original(produced.file_path(), *args, **kwargs)

    def audited_send_c_store(dataset: Any, *args: Any, **kwargs: Any) -> Any:
        """``send_c_store``, telling the placeholder's audit (``_xdsi_on_sent``, set only when [audit] is on)
        whether the receiver stored the instance: the audit lists what was actually sent, not what was meant."""
        on_sent = getattr(dataset, "_xdsi_on_sent", None) if isinstance(dataset, StoredInstance) else None
        if on_sent is None:
            return send_c_store(dataset, *args, **kwargs)
        try:
            rsp = send_c_store(dataset, *args, **kwargs)
        except Exception as exc:
            on_sent(dataset._xdsi_ref, False, f"{exc.__class__.__name__}: {exc}")
            raise
        ok, why = stored_by_peer(rsp)
        on_sent(dataset._xdsi_ref, ok, why)
        return rsp

    assoc.send_c_store = audited_send_c_store
    assoc._xdsi_streaming = True


def stored_by_peer(rsp: Any) -> tuple[bool, str | None]:
    """Whether a C-STORE response says the peer kept the instance (Success or Warning, PS3.4 B.2.3), and if not why."""
    from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

    code = getattr(rsp, "Status", None)
    if code is None:
        return False, "no C-STORE response (association aborted or timed out)"
    category = STORAGE_SERVICE_CLASS_STATUS.get(int(code), ("Failure", "unknown status"))[0]
    if category in ("Success", "Warning"):
        return True, None
    comment = str(getattr(rsp, "ErrorComment", "") or "")
    return False, f"C-STORE status 0x{int(code):04X}" + (f" ({comment})" if comment else "")


# -- C-MOVE: what we propose ------------------------------------------------------------------------


def _grouped(pairs: set[tuple[str, str]], level: int) -> list[Any]:
    """Contexts for the (SOP class, stored syntax) pairs at one level of grouping (0 = none).

    0: one context per (class, stored syntax), then (class, Explicit) and (class, Implicit)
       for the native syntaxes not already stored: the destination answers each on its own.
    1: stored compressed syntaxes one per context; one [Explicit, Implicit] context per class
       (a stored native syntax listed first in it).
    2: one context per class with all its stored compressed syntaxes, one native context per class.
    3: only the native context per class: everything decoded, nothing sent as stored-compressed.
    """
    classes: dict[str, list[str]] = {}
    for sop_class, ts in sorted(pairs):
        classes.setdefault(sop_class, []).append(ts)
    out: list[Any] = []
    for sop_class, stored in classes.items():
        compressed = [ts for ts in stored if ts not in NATIVE]
        stored_native = [ts for ts in NATIVE if ts in stored]
        native = stored_native + [ts for ts in NATIVE if ts not in stored_native]
        if level == 0:
            out += [build_context(sop_class, [ts]) for ts in stored + [t for t in NATIVE if t not in stored]]
            continue
        if level == 1:
            out += [build_context(sop_class, [ts]) for ts in compressed]
        elif level == 2 and compressed:
            out.append(build_context(sop_class, compressed))
        out.append(build_context(sop_class, native))
    return out


def contexts_for(pairs: set[tuple[str, str]]) -> list[Any]:
    """Presentation contexts to propose to a move destination for these (SOP class, stored syntax) pairs.

    The first grouping level that fits in 128 contexts is used.  If even one
    native context per SOP class does not fit (more than 128 SOP classes in
    one selection), the first 128 classes are proposed and the instances of
    the others become failed sub-operations.
    """
    for level in range(4):
        cxs = _grouped(pairs, level)
        if len(cxs) <= MAX_CONTEXTS:
            if level:
                log.info("C-MOVE: %d SOP class/syntax pairs need grouping level %d to fit %d contexts", len(pairs), level, MAX_CONTEXTS)
            return cxs
    log.warning("C-MOVE: %d SOP classes in one selection; only the first %d are proposed", len(cxs), MAX_CONTEXTS)
    return cxs[:MAX_CONTEXTS]


# -- C-MOVE: a destination that does not take the association ----------------------------------------


@dataclass
class MoveDestination:
    """Handed to :meth:`ArchiveAE.associate` through the C-MOVE handler's association kwargs.

    pynetdicom answers A801 Move Destination Unknown when the sub-association
    is not established, which sends people to check their AE configuration
    although the destination was known.  The archive's AE records the refusal
    here and gives pynetdicom a :class:`RefusedSubAssociation` instead, so
    the handler can fail every sub-operation (A702, all UIDs listed).
    """

    ae_title: str
    refused: str | None = None
    connect: bool = True  # False: the request is answered with a failure, do not open the association
    audited: bool = False  # [audit] is on: keep the destination's TLS certificate subject
    tls_subject: str | None = None
    connected: bool = False  # the TCP (and TLS) connection was made: EVT_CONN_OPEN came

    def on_connected(self, _event: Any) -> None:
        self.connected = True


class RefusedSubAssociation:
    """Stands in for a sub-association that was rejected, aborted or never connected: sends nothing."""

    is_established = True  # so pynetdicom goes on to ask the handler, which fails every sub-operation
    is_requestor = True

    def __init__(self, reason: str) -> None:
        self.reason = reason
        self.accepted_contexts: list[Any] = []

    def send_c_store(self, *args: Any, **kwargs: Any) -> Any:
        raise ConnectionError(self.reason)

    def release(self) -> None:
        pass

    def abort(self) -> None:
        pass


def refusal_reason(assoc: Any, destination: MoveDestination) -> str:
    """Short enough for Error Comment (64 characters) with a 16-character AE title."""
    if assoc.is_rejected:
        what = "rejected the association"
    elif not destination.connected:  # pynetdicom reports a refused or timed-out connect as an abort
        what = "could not be reached"
    elif assoc.is_aborted:
        what = "aborted (accepted no context?)"
    else:
        what = "could not be reached"
    return f"destination {destination.ae_title} {what}"


def failed_identifier(uids: Iterable[str]) -> Dataset:
    ds = Dataset()
    ds.FailedSOPInstanceUIDList = list(uids)
    return ds


__all__: Sequence[str] = (
    "MoveDestination",
    "NoAcceptedContext",
    "RefusedSubAssociation",
    "StoredInstance",
    "accepted_syntaxes",
    "contexts_for",
    "failed_identifier",
    "fast_polling",
    "hold_reactor",
    "poll_fast",
    "quiet_polling",
    "install_streaming_sender",
    "prefer_requestor_syntaxes",
    "refusal_reason",
    "requestor_choice",
    "stored_by_peer",
    "offer_jpip_for_get",
    "refuse_jpip_store",
    "with_jpip_contexts",
    "jpip_before",
)


# -- issue 16: JPIP Referenced (.94/.95) ------------------------------------------------------------


def offer_jpip_for_get(assoc: Any, offered: bool) -> None:
    """EVT_REQUESTED: accept JPIP Referenced on the storage contexts a C-GET requestor receives on (SCP role).

    pynetdicom negotiates against the association's own copy of our
    contexts (``assoc.acceptor.supported_contexts``, deep-copied per
    association), so the two syntaxes are appended there, last (our order
    never prefers them; :func:`prefer_requestor_syntaxes` applies the
    requestor's), for the SOP classes the requestor asked us to send and only
    when ``offered``.  The listener's own contexts never list them: a peer
    storing to us cannot have a JPIP Referenced context accepted, since a
    JPIP Referenced data set has no Pixel Data, only a URL to someone's
    pixels, and the archive does not store such an instance (PS3.4 B.1 note:
    "storage of incomplete information").
    """
    if not offered:
        return
    want_scp = {uid for uid, item in assoc.requestor.role_selection.items() if item.scp_role}
    if not want_scp:
        return
    for cx in assoc.acceptor.supported_contexts:
        if cx.abstract_syntax in want_scp:
            for ts in JPIP_SYNTAXES:
                if ts not in cx.transfer_syntax:
                    cx.add_transfer_syntax(ts)


def refuse_jpip_store(event: Any) -> str | None:
    """Why a C-STORE is refused because its context is JPIP Referenced (a C-GET requestor that also stores), or None."""
    ts = str(getattr(event.context, "transfer_syntax", "") or "")
    if ts in JPIP_SYNTAXES:
        return f"a data set in {UID(ts).name} has no Pixel Data (only a Pixel Data Provider URL); such instances are not stored"
    return None


def with_jpip_contexts(contexts: list[Any], pairs: set[tuple[str, str]], offered: bool) -> list[Any]:
    """C-MOVE: one more context per SOP class, [JPIP Referenced, JPIP Referenced Deflate], while they fit.

    Only when JPIP Referenced is offered (``[server] public_url``).  The
    destination's acceptance of it is its statement that a header with a
    Pixel Data Provider URL will do; the sender still prefers the stored
    syntax and the uncompressed ones when they were accepted too
    (:func:`accepted_syntaxes` with ``native_first``), so a destination that
    accepts everything keeps getting pixels, and one that accepts only JPIP
    Referenced for a class gets headers for what our JPIP server can serve
    (other instances of the class fail as sub-operations, as for any
    syntax that cannot be produced).
    """
    if not offered:
        return contexts
    out = list(contexts)
    for sop_class in sorted({c for c, _ in pairs}):
        if len(out) >= MAX_CONTEXTS:
            log.info("C-MOVE: no room for more JPIP Referenced contexts (%d proposed already)", len(out))
            break
        out.append(build_context(sop_class, list(JPIP_SYNTAXES)))
    return out


def jpip_before(found: Sequence[str], stored_ts: str, native_first: bool) -> bool:
    """C-GET: the requestor proposed JPIP Referenced ahead of the stored syntax; its order stands (issue 16).

    :func:`accepted_syntaxes` puts the stored syntax first (sent unchanged);
    a C-GET requestor whose contexts ask for JPIP Referenced before it wants
    the header, so the stored syntax keeps its place after it.  C-MOVE
    (``native_first``) keeps the stored syntax first: a destination accepting
    JPIP Referenced among others is not asking for it.
    """
    if native_first:
        return False
    first_jpip = next((i for i, t in enumerate(found) if t in JPIP_SYNTAXES), None)
    return first_jpip is not None and first_jpip < list(found).index(stored_ts)
