"""The DIMSE adapter: pynetdicom SCPs that translate DICOM messages into archive service calls.

Services: Verification, Storage (every storage SOP class pynetdicom knows, the
usual transfer syntaxes, stored as received), Query/Retrieve Patient and Study
Root FIND/MOVE/GET, and Storage Commitment Push Model.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, _config, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.transport import ThreadedAssociationServer
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.status import Status

from xdsi.archive import Archive, jpip_header
from xdsi.archive.query import QueryError
from xdsi.archive.store import Expected, Outcome
from xdsi.dimse import associate_cache, cheap_contexts, direct, find_responses, status, wakeup
from xdsi.dimse import accept_balance  # issue 14 (workers): load-aware accept
from xdsi.dimse import affinity  # issue 14 (workers): a worker's threads pinned to its CPU while the node is busy
from xdsi.dimse import reactor_pause, receive_direct, spool_ahead, store_polling, store_responses  # issue 14 (ingest): own line, to keep merges clean
from xdsi.dimse.commitment import CommitmentSCP
from xdsi.dimse.limits import ConnectionGovernor
from xdsi.dimse.policy import NOT_AUTHORIZED, Decision, DimsePolicy
from xdsi.dimse.spool import SpoolKeeper
from xdsi.gateway import Gateway, hand_over as gateway_hand_over
from xdsi.dimse.sending import (
    SENDING_LOOP_DELAY,
    MoveDestination,
    RefusedSubAssociation,
    StoredInstance,
    contexts_for,
    failed_identifier,
    fast_polling,
    hold_reactor,
    poll_fast,
    quiet_polling,
    install_streaming_sender,
    prefer_requestor_syntaxes,
    refusal_reason,
)
from xdsi.dimse.sending import offer_jpip_for_get, refuse_jpip_store, with_jpip_contexts  # issue 16: JPIP Referenced
from xdsi.security.tls import handshake_failure
from xdsi.uids import InvalidUID

log = logging.getLogger(__name__)

STORAGE_TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
    # issue 16: HTJ2K Lossless, Lossless RPCL, HTJ2K (pydicom decodes them; a compressing tier stores .202)
    "1.2.840.10008.1.2.4.201",
    "1.2.840.10008.1.2.4.202",
    "1.2.840.10008.1.2.4.203",
]
# the SOP classes we accept C-STOREs for; Verification and the Q/R models are never among them
STORAGE_SOP_CLASSES = frozenset(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)
QR_FIND = {PatientRootQueryRetrieveInformationModelFind: "PATIENT", StudyRootQueryRetrieveInformationModelFind: "STUDY"}
QR_MOVE_GET = [
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelGet,
]


def set_nodelay(sock: Any) -> None:
    """Nagle + delayed ACK stall every DIMSE exchange ~40 ms on loopback; switch Nagle off."""
    try:
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:  # pragma: no cover - socket already closed
        pass


def _on_conn_open(event: Any) -> None:
    set_nodelay(getattr(getattr(event.assoc.dul, "socket", None), "socket", None))


_ASSOCIATING_DELAY = "_xdsi_associating_delay"


def _poll_fast_while_associating(event: Any) -> None:
    """``EVT_CONN_OPEN`` of an association we request: its DUL polls every 0.1 ms until :func:`_end_fast_polling`.

    Why: pynetdicom's DUL sleeps ``_run_loop_delay`` (1 ms) whenever a loop found nothing to do, so
    sending our A-ASSOCIATE-RQ and noticing the peer's A-ASSOCIATE-AC each waited up to a millisecond;
    a C-MOVE opens one such association per request, on the way to its first sub-operation.
    """
    dul = getattr(event.assoc, "dul", None)
    previous = getattr(dul, "_run_loop_delay", None)
    if previous is not None and not hasattr(dul, _ASSOCIATING_DELAY):
        setattr(dul, _ASSOCIATING_DELAY, previous)
        dul._run_loop_delay = min(previous, SENDING_LOOP_DELAY)


def _end_fast_polling(assoc: Any) -> None:
    """The DUL's own delay again once the association is established (or not)."""
    dul = getattr(assoc, "dul", None)
    previous = getattr(dul, _ASSOCIATING_DELAY, None) if dul is not None else None
    if previous is not None:
        delattr(dul, _ASSOCIATING_DELAY)
        dul._run_loop_delay = previous


class ArchiveAE(AE):
    """An AE whose outgoing associations (move sub-operations, commitment reports) use TCP_NODELAY."""

    adopt: socket.socket | None = None  # the next server listens on this bound socket (xdsi serve --workers N)

    def make_server(self, address: Any, *args: Any, server_class: Any = None, **kwargs: Any):  # type: ignore[no-untyped-def]
        """pynetdicom's ``make_server`` (``start_server`` asks it for a threaded server): ours instead."""
        if server_class is ThreadedAssociationServer:
            server_class = GovernedAssociationServer
            if self.adopt is not None:
                server_class, kwargs["adopted"], self.adopt = AdoptedAssociationServer, self.adopt, None
        return super().make_server(address, *args, server_class=server_class, **kwargs)

    def associate(self, *args: Any, **kwargs: Any):  # type: ignore[no-untyped-def]
        """pynetdicom's ``associate``, plus: the streaming sender, and no A801 for a known destination.

        A C-MOVE sub-association carries a :class:`MoveDestination` (from the
        handler's kwargs).  When the destination does not take the
        association, the refusal is recorded there and pynetdicom gets a
        :class:`RefusedSubAssociation`, so the handler answers with failed
        sub-operations instead of pynetdicom's A801 Move Destination Unknown.
        """
        stand_in = kwargs.pop("xdsi_stand_in", None)  # a C-MOVE the gateway forwards: the remote does the sub-operations
        if stand_in is not None:
            return stand_in
        destination: MoveDestination | None = kwargs.pop("xdsi_move_destination", None)
        if destination is not None and not destination.connect:
            return RefusedSubAssociation("not connected: the request failed")
        handlers = list(kwargs.pop("evt_handlers", None) or [])
        handlers.append((evt.EVT_CONN_OPEN, _poll_fast_while_associating))
        handlers.append((evt.EVT_CONN_OPEN, _on_conn_open))
        handlers.append((evt.EVT_CONN_OPEN, direct.on_conn_open))  # before the DUL sends: direct writes can be enabled
        handlers.append((evt.EVT_RELEASED, direct.on_released))  # our release returns without pynetdicom's 10 ms sleep
        if destination is not None:  # tells "could not be reached" from "aborted" in the refusal (and the audit)
            handlers.append((evt.EVT_CONN_OPEN, destination.on_connected))
        assoc = super().associate(*args, evt_handlers=handlers, **kwargs)
        reactor_pause.install(assoc)  # pynetdicom's pause before a send made reliable (its reactor could take our response)
        _end_fast_polling(assoc)
        if destination is not None and not assoc.is_established:
            destination.refused = refusal_reason(assoc, destination)
            log.error("C-MOVE: %s", destination.refused)
            sock = getattr(assoc.dul, "socket", None)  # as pynetdicom does for a failed sub-association
            if sock is not None:
                sock.close()
            return RefusedSubAssociation(destination.refused)
        if destination is not None and destination.audited:  # the destination's TLS certificate, for the audit trail
            from xdsi.security.tls import certificate_subject

            destination.tls_subject = certificate_subject(getattr(assoc.dul.socket, "socket", None))
        if destination is not None:  # a C-MOVE sub-association lives only while it sends: poll fast throughout
            hold_reactor(assoc)
            destination.writer = direct.enable(assoc)  # type: ignore[attr-defined]  # the C-MOVE handler tells it what comes next
            if destination.writer is None:  # type: ignore[attr-defined]  # else C-STOREs written and their responses read directly
                poll_fast(assoc)  # else pynetdicom's DUL reads the responses: poll for them often
        install_streaming_sender(assoc)
        return assoc


class GovernedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, plus a deep listen backlog and no work for connections already closed.

    Measured (issue 9): socketserver listens with a backlog of 5, and pynetdicom
    spends ~20 ms per accepted connection (two threads and a deep copy of our
    170 presentation contexts) before it reads a byte, so after a connect/close
    storm every further SYN waited for the client's 1 s retry and a real
    association queued behind hundreds of dead ones.
    """

    request_queue_size = 512  # listen() backlog, capped by the kernel's net.core.somaxconn

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept; a TLS connection is wrapped but its handshake waits for the connection's own thread.

        pynetdicom completes the handshake inside ``accept`` on a blocking socket: one peer that
        connected and said nothing stopped every other TLS association (measured: indefinitely).
        """
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """The TLS handshake (bounded by the ACSE timeout), then pynetdicom's association; a refusal is logged."""
        if isinstance(request, ssl.SSLSocket):
            previous = request.gettimeout()
            try:
                request.settimeout(self.ae.acse_timeout or 30)
                request.do_handshake()
                request.settimeout(previous)
            except (ssl.SSLError, OSError) as exc:
                reason = handshake_failure(exc)
                log.warning("DICOM TLS handshake with %s:%s refused: %s", client_address[0], client_address[1], reason)
                refused = getattr(self.ae, "on_tls_refused", None)  # the Security Alert audit, when [audit] is on
                if refused is not None:
                    refused("DICOM", str(client_address[0]), reason)
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """socketserver's hook before a connection gets its thread: drop one the peer already closed."""
        return not peer_closed(request)


class AdoptedAssociationServer(GovernedAssociationServer):
    """The same server on a listening socket the supervisor bound and every worker inherited.

    The socket is made non-blocking (its one open file is shared, so every worker sees the same
    flag): the workers woken by a new connection race for it and the losers get EAGAIN, which
    socketserver ignores, instead of blocking in ``accept`` until the next connection.  Closing
    never calls ``shutdown()``, which would stop the listener for every worker, not just this one.

    With the node's :mod:`xdsi.dimse.accept_balance` (``xdsi serve --workers N``), a worker holding
    more connections than a live peer leaves a waiting connection to that peer for a moment before
    it accepts it anyway: connections arriving together spread evenly over the workers.
    """

    def __init__(self, *args: Any, adopted: socket.socket, **kwargs: Any) -> None:
        self._adopted = adopted
        self.balance = accept_balance.current()
        self._serving = False
        super().__init__(*args, **kwargs)
        if self.balance is not None:  # a connection that ends is no longer this worker's load: say so at once
            self.bind(evt.EVT_CONN_CLOSE, _connection_closed)

    def server_bind(self) -> None:
        self.socket.close()  # the unbound socket socketserver made for us
        self.socket = self._adopted
        self.socket.settimeout(0.0)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        """Listening already (the supervisor chose the backlog); peers may now leave connections to us."""
        if self.balance is not None and not self._serving:
            self._serving = True
            self.balance.serving()

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept when it is this worker's turn (:meth:`AcceptBalance.turn`); the connection counts from now."""
        balance = self.balance
        if balance is None:
            return super().get_request()
        balance.turn(self.socket)
        client, address = super().get_request()  # EAGAIN when a peer took it meanwhile: socketserver waits for the next
        balance.accepted(client)
        return client, address

    def service_actions(self) -> None:
        """The server loop's idle tick: also publish this worker's load again (connections that ended)."""
        super().service_actions()
        if self.balance is not None:
            self.balance.refresh()
            affinity.on_request()  # a worker with no association left follows the node too (quiet: free again)

    def server_close(self) -> None:
        if self.balance is not None and self._serving:
            self._serving = False
            self.balance.stopped()
        self.socket.close()


def _connection_closed(_event: Any) -> None:
    balance = accept_balance.current()
    if balance is not None:
        balance.refresh()
        affinity.on_request()


def peer_closed(sock: socket.socket) -> bool:
    """True if the peer has already closed (EOF or reset waiting), without consuming any data.

    A TLS socket cannot be peeked (its bytes are records to decrypt, and ``MSG_PEEK`` raises), and
    its peer has just completed a handshake: it is never judged closed here.
    """
    if isinstance(sock, ssl.SSLSocket):
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class DicomServer:
    """One DICOM listener.

    ``partitions`` (AE title -> Archive) lets the listener serve several AE
    titles: each association is answered from the archive of the AE title the
    peer called, so a partition's studies are stored, found and retrieved only
    through its own AE title.  Any other called AE title gets the main archive.
    """

    def __init__(self, archive: Archive, partitions: Mapping[str, Archive] | None = None) -> None:
        self.archive = archive
        self.partitions = dict(partitions or {})
        s = archive.settings
        # Receive C-STORE data straight into a spool file; send stored files in chunks.
        # pynetdicom keeps these process-wide, so they are set by the server that needs them,
        # not as a side effect of importing this module.
        _config.STORE_RECV_CHUNKED_DATASET = True
        _config.STORE_SEND_CHUNKED_DATASET = True
        # pynetdicom's "standard" log handlers decode every PDU again just to describe it, and raise
        # (logged with a traceback) on values a hostile peer chooses, e.g. an A-ASSOCIATE-RJ with an
        # invalid Source; our own log lines say what the service did.
        _config.LOG_HANDLER_LEVEL = "none"
        # pynetdicom formats every C-FIND/C-GET/C-MOVE Pending identifier for a debug line even when
        # debug logging is off: ~7 % of the server's time answering a 1,000-match C-FIND
        _config.LOG_RESPONSE_IDENTIFIERS = False
        # ... and decodes and formats every C-FIND/C-GET/C-MOVE request identifier for an INFO line nobody
        # handles (LOG_HANDLER_LEVEL "none"): ~6 % of a one-match C-FIND; the audit trail records queries
        _config.LOG_REQUEST_IDENTIFIERS = False
        self.ae = ArchiveAE(ae_title=s.ae_title)
        # association slots are counted by the governor (only peers whose A-ASSOCIATE-RQ arrived);
        # pynetdicom's own count includes silent and already-closed connections, so keep it out of the way
        self.governor = ConnectionGovernor(s.dimse_limits, s.max_associations, s.acse_timeout, s.network_timeout)
        self.ae.maximum_associations = s.max_associations + s.dimse_limits.max_pending + 1024
        self.ae.dimse_timeout = s.dimse_timeout
        self.ae.acse_timeout = s.acse_timeout
        self.ae.network_timeout = s.network_timeout
        # the Maximum Length Received we advertise; the governor's PduGuard refuses larger PDUs unread
        self.ae.maximum_pdu_size = s.dimse_limits.max_pdu_size
        self.ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            # scp_role/scu_role: accept SCP/SCU role selection so C-GET requestors can receive
            self.ae.add_supported_context(cx.abstract_syntax, STORAGE_TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
        for uid in list(QR_FIND) + QR_MOVE_GET:
            self.ae.add_supported_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.ae.add_supported_context(StorageCommitmentPushModel, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        cheap_contexts.make_cheap(self.ae._supported_contexts.values())  # copied per association: 15.7 -> ~0.3 ms
        self.commitment = CommitmentSCP(self.ae, self.archive_for)
        # a spool file untouched for longer than the longest timeout belongs to no live transfer
        self.spool = SpoolKeeper(s.temp_dir, max_age=max(s.dimse_timeout, s.acse_timeout, s.network_timeout))
        self._server: Any = None
        self._tls_server: Any = None
        self._prepared = False  # spool keeper and association governor started (by the first listener)
        self._client_tls: ssl.SSLContext | None = None
        self.audit: Any = None  # an xdsi.audit.dimse.DimseAudit, set before start() when [audit] is configured
        # who may associate and do what (issue 13). on_policy_refused(decision, operation) is told of each
        # refusal (operation None: the association was rejected), e.g. for a Security Alert; it must not raise
        self.policy = DimsePolicy.for_archives(s, self.partitions)
        self.on_policy_refused: Callable[[Decision, str | None], None] | None = None
        self._policy_logged = False
        self.gateway = Gateway(self)  # [gateway]: C-FIND/C-MOVE/C-GET answered from remote archives (issue 15)

    def archive_for(self, assoc: Any) -> Archive:
        """The archive of the AE title this association called."""
        called = getattr(getattr(assoc.requestor, "primitive", None), "called_ae_title", None)
        if isinstance(called, bytes):
            called = called.decode("ascii", "replace")
        return self.partitions.get(str(called or "").strip(), self.archive)

    # -- handlers -----------------------------------------------------------------

    def _handlers(self) -> list[tuple[Any, Any]]:
        return [
            *self.governor.handlers(),
            (evt.EVT_CONN_OPEN, _on_conn_open),
            (evt.EVT_CONN_OPEN, direct.on_conn_open),  # the DUL's writes serialised with direct ones (C-GET, C-MOVE)
            (evt.EVT_CONN_OPEN, associate_cache.on_conn_open),  # a request seen before is not decoded again
            (evt.EVT_REQUESTED, self.offer_jpip),  # issue 16: before the requestor's order is applied
            (evt.EVT_REQUESTED, prefer_requestor_syntaxes),
            (evt.EVT_REQUESTED, affinity.on_request),  # issue 14: this worker's threads on its CPU while the node is busy
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_C_FIND, self.on_find),
            (evt.EVT_C_MOVE, self.on_move),
            (evt.EVT_C_GET, self.on_get),
            (evt.EVT_N_ACTION, self.on_n_action),
            *self.spool.handlers(),
            *(self.audit.handlers() if self.audit is not None else []),
            # last: the governor has taken a slot (or rejected), and every other EVT_REQUESTED handler (the audit's
            # keeps the TLS certificate subject) has seen the request while its socket is open; rejecting closes it
            (evt.EVT_REQUESTED, self.on_requested),  # who may associate (issue 13); skips a request already rejected
        ]

    def offer_jpip(self, event: Any) -> None:
        """EVT_REQUESTED: JPIP Referenced (.94/.95) for the storage contexts a C-GET requestor receives on (issue 16).

        Added to this association's own copy of our contexts, for the SOP
        classes the requestor asked us to send (SCP role), and only when
        ``[server] public_url`` is set (:func:`xdsi.archive.jpip_header.offered`):
        a peer storing to us is never offered it (the archive keeps no
        instance without its pixels).
        """
        if event.assoc.is_rejected or event.assoc.is_aborted:
            return
        offer_jpip_for_get(event.assoc, jpip_header.offered(self.archive_for(event.assoc).settings))

    def on_requested(self, event: Any) -> None:
        """The A-ASSOCIATE-RQ is in: accept, or A-ASSOCIATE-RJ as :class:`DimsePolicy` decides."""
        assoc = event.assoc
        if assoc.is_rejected or assoc.is_aborted:  # the governor has already answered it
            return
        decision = self.policy.on_association(assoc)
        if decision.accepted:
            return
        c = decision.caller
        log.warning("DICOM association from %s (%s) to %s rejected: %s", c.calling_ae, c.address, c.called_ae, decision.reason)
        assoc.acse.send_reject(decision.result, decision.source, decision.diagnostic)
        if self.audit is not None:  # Security Alert (Node Authentication), rate-limited per peer
            try:  # before kill(): it closes the socket, whose TLS certificate the alert names
                self.audit.association_refused(assoc, decision.reason)
            except Exception:  # an audit failure must not change the answer
                log.exception("DICOM: auditing a rejected association failed")
        assoc.kill()
        self._report_refusal(decision, None)

    def _refused(self, assoc: Any, operation: str) -> str | None:
        """Why this association's peer may not do ``operation`` (reported), or None."""
        reason = self.policy.refusal(assoc, operation)
        if reason is not None:
            if self.audit is not None:  # Security Alert, Use of Restricted Function (rate-limited; never raises)
                self.audit.operation_refused(assoc.xdsi_policy_decision.caller, operation, self.archive.settings.ae_title,
                                            str(getattr(assoc.acceptor, "address", "") or "") or None)
            self._report_refusal(assoc.xdsi_policy_decision, operation)
        return reason

    def _report_refusal(self, decision: Decision, operation: str | None) -> None:
        if self.on_policy_refused is None:
            return
        try:
            self.on_policy_refused(decision, operation)
        except Exception:  # an audit failure must not change the answer
            log.exception("DICOM: reporting a policy refusal failed")

    def on_n_action(self, event: Any) -> Any:
        """Storage Commitment needs the peer's ``commit`` right."""
        refused = self._refused(event.assoc, "commit")
        if refused is not None:
            return _failure(NOT_AUTHORIZED, refused), None
        return self.commitment.on_n_action(event)

    def on_echo(self, event: Any) -> Any:
        """C-ECHO: Success.  pynetdicom routes a C-STORE by its command's SOP Class, so a C-STORE
        naming Verification lands here: refuse it (0122, Verification is no storage class) and
        drop the data set pynetdicom spooled for it, which its Verification SCP would leave behind."""
        req = event.request
        if req.__class__.__name__ != "C_STORE":
            return Status.SUCCESS
        self.spool.discard_request(req)
        log.warning("C-STORE from %s on the Verification SOP Class refused", event.assoc.requestor.ae_title)
        return status.SOP_CLASS_NOT_SUPPORTED

    def on_store(self, event: Any) -> Any:
        """Store one C-STORE data set, refusing anything that is not what the transfer declared.

        PS3.4 B.2.3 / PS3.7 C: a command whose Affected SOP Class is not the
        presentation context's abstract syntax, or is no storage class at all
        (Verification), gets 0122 SOP Class Not Supported; a data set of
        another SOP Class or Instance than the command names gets A900 Data
        Set Does Not Match; one that does not parse in the negotiated
        transfer syntax, or lacks valid identifying UIDs, gets C000 Cannot
        Understand.  Nothing refused is stored; the spool file goes with the
        handler (pynetdicom removes it when we return).
        """
        affinity.on_request()  # the node may have become busy (or quiet) since this association began
        req = event.request
        calling = event.assoc.requestor.ae_title
        refused = self._refused(event.assoc, "store")
        if refused is not None:
            return _failure(NOT_AUTHORIZED, refused)
        path = Path(event.dataset_path)
        abstract = str(event.context.abstract_syntax)
        command_class = str(req.AffectedSOPClassUID or "")
        if command_class != abstract or abstract not in STORAGE_SOP_CLASSES:
            reason = (
                f"{command_class} is not a storage SOP class"
                if command_class == abstract
                else f"command SOP Class {command_class} is not the context's {abstract}"
            )
            log.warning("C-STORE from %s refused: %s", calling, reason)
            return _failure(status.SOP_CLASS_NOT_SUPPORTED, reason)
        if (refusal := refuse_jpip_store(event)) is not None:  # issue 16: no data set without its pixels is stored
            log.warning("C-STORE from %s refused: %s", calling, refusal)
            return _failure(status.CANNOT_UNDERSTAND, refusal)
        if (relayed := gateway_hand_over(event)) is not None:  # an instance a remote sends for a gateway retrieve
            return relayed
        expect = Expected(sop_class_uid=abstract, sop_instance_uid=str(req.AffectedSOPInstanceUID or ""))
        store_responses.install(event.assoc)  # Success C-STORE-RSP encoded straight to bytes (idempotent)
        wakeup.install(event.assoc) or store_polling.install(event.assoc)  # loops wake on activity, not a 1 ms timer
        self.spool.hold(path)
        archive = self.archive_for(event.assoc)
        try:
            # the metadata journal line is written right after the response is sent (store_responses.after_response)
            assoc = event.assoc
            result = archive.store.store_file(path, source_ae=calling, move=True, expect=expect,
                                              defer=lambda work: store_responses.after_response(assoc, work),
                                              written=getattr(req, receive_direct.WRITTEN, None))
        finally:
            self.spool.release(path)
        if self.audit is not None and result.ok:  # a duplicate too: the peer did send it to us
            self.audit.stored(event, archive, result.study_uid, result.sop_class_uid, replaced=result.outcome is Outcome.REPLACED)
        if result.outcome in (Outcome.STORED, Outcome.REPLACED):
            return Status.SUCCESS
        if result.outcome is Outcome.DUPLICATE:
            return Status.SUCCESS  # PS3.4 B.2.3: a duplicate is not an error for the sender
        if result.outcome is Outcome.REJECTED:
            code = status.DATASET_DOES_NOT_MATCH if result.mismatch else status.CANNOT_UNDERSTAND
        else:
            code = status.OUT_OF_RESOURCES
        log.warning("C-STORE from %s refused (0x%04X): %s", calling, code, result.reason)
        return _failure(code, result.reason)

    def on_find(self, event: Any) -> Iterator[Any]:
        refused = self._refused(event.assoc, "find")
        if refused is not None:
            yield _failure(NOT_AUTHORIZED, refused), None
            return
        model = QR_FIND.get(event.request.AffectedSOPClassUID, "STUDY")
        if self.audit is not None:
            self.audit.queried(event)
        if (forwarded := self.gateway.find(event, self.archive_for(event.assoc), model)) is not None:
            yield from forwarded
            return
        find_responses.install(event.assoc)  # Pending responses from a command set encoded once per request
        wakeup.install(event.assoc)  # this association's next requests are not held by pynetdicom's 1 ms polls
        try:
            identifier = event.identifier
            query = self.archive_for(event.assoc).query
            syntax = event.context.transfer_syntax
            if syntax in find_responses.ENCODED_SYNTAXES:
                # little endian: identifiers encoded from the index rows and streamed to the DUL here;
                # pynetdicom only sends the final status (find_responses.stream_pending)
                encoded = query.find_encoded(identifier, model=model, implicit_vr=find_responses.ENCODED_SYNTAXES[syntax])
                outcome = find_responses.stream_pending(event, encoded)
                if outcome == "cancelled":
                    yield Status.CANCEL, None
                return  # "done": pynetdicom answers Success; "aborted": nothing left to answer
            for ds in query.find(identifier, model=model):
                if event.is_cancelled:
                    yield Status.CANCEL, None
                    return
                yield Status.PENDING, ds
        except QueryError as exc:
            yield _failure(status.IDENTIFIER_DOES_NOT_MATCH, str(exc)), None
        except Exception as exc:  # a malformed identifier pydicom cannot decode
            log.exception("C-FIND failed")
            yield _failure(status.FIND_UNABLE_TO_PROCESS, f"{exc.__class__.__name__}"), None

    def _select(self, event: Any):  # type: ignore[no-untyped-def]
        return self.archive_for(event.assoc).retrieve.select_by_identifier(event.identifier)

    def on_move(self, event: Any) -> Iterator[Any]:
        dest = event.move_destination.strip() if isinstance(event.move_destination, str) else event.move_destination.decode().strip()
        refused = self._refused(event.assoc, "move")
        if refused is not None:  # before the destination is looked up: a refused peer learns nothing of our AE table
            yield from _refuse_retrieve(refused, MoveDestination(dest, connect=False))
            return
        if (forwarded := self.gateway.move(event, self.archive_for(event.assoc), dest)) is not None:
            yield from forwarded
            return
        peer = self.archive.settings.peer(dest)  # one AE table for the whole process
        if peer is None:
            log.warning("C-MOVE from %s to unknown destination %r", event.assoc.requestor.ae_title, dest)
            yield None, None  # pynetdicom answers A801 Move Destination unknown
            return
        try:
            refs = self._select(event)
        except (InvalidUID, ValueError) as exc:
            # pynetdicom answers Success to zero sub-operations before asking us again, so announce one
            # and fail the request; the destination is not contacted
            yield peer.host, peer.port, {"xdsi_move_destination": MoveDestination(dest, connect=False)}
            yield 1
            yield _failure(status.IDENTIFIER_DOES_NOT_MATCH, str(exc)), failed_identifier([])
            return
        pairs = {(r.sop_class_uid, r.transfer_syntax_uid) for r in refs}
        destination = MoveDestination(dest, audited=self.audit is not None)
        kwargs: dict[str, Any] = {"xdsi_move_destination": destination}
        if pairs:
            kwargs["contexts"] = with_jpip_contexts(contexts_for(pairs), pairs, jpip_header.offered(self.archive.settings))
        if peer.tls:
            kwargs["tls_args"] = (self.client_tls(), peer.host)
        yield peer.host, peer.port, kwargs
        direct.enable(event.assoc)  # Pending C-MOVE responses written straight to the socket
        yield len(refs)
        # pynetdicom has now tried the sub-association
        retrieval = None
        if self.audit is not None and refs:
            from xdsi.audit import messages as m

            retrieval = self.audit.retrieval(event, self.archive_for(event.assoc), refs,
                                             destination=m.Participant(dest, False, network_access_point=peer.host),
                                             destination_subject=destination.tls_subject)
        if destination.refused is not None:
            if retrieval is not None:  # nothing was sent: the attempt is on record, with why
                retrieval.end(note=destination.refused)
            # PS3.4 C.4.2.1.5: A702 Refused: Out of Resources - Unable to perform sub-operations;
            # every instance is a failed sub-operation and is listed
            yield _failure(status.UNABLE_TO_PERFORM_SUBOPERATIONS, destination.refused), failed_identifier(
                r.sop_instance_uid for r in refs
            )
            return
        yield from self._suboperations(event, refs, retrieval, getattr(destination, "writer", None))

    def on_get(self, event: Any) -> Iterator[Any]:
        refused = self._refused(event.assoc, "get")
        if refused is not None:
            yield from _refuse_retrieve(refused, None)
            return
        if (forwarded := self.gateway.get(event, self.archive_for(event.assoc))) is not None:
            yield from forwarded
            return
        try:
            refs = self._select(event)
        except (InvalidUID, ValueError) as exc:
            yield 1  # pynetdicom answers Success to zero sub-operations before asking us again
            yield _failure(status.IDENTIFIER_DOES_NOT_MATCH, str(exc)), failed_identifier([])
            return
        install_streaming_sender(event.assoc)
        direct.enable(event.assoc)  # C-STOREs and Pending responses written straight to the socket
        yield len(refs)
        retrieval = self.audit.retrieval(event, self.archive_for(event.assoc), refs) if self.audit is not None and refs else None
        yield from self._suboperations(event, refs, retrieval, direct.writer_of(event.assoc))

    def _suboperations(self, event: Any, refs: list[Any], retrieval: Any = None, sender: Any = None) -> Iterator[Any]:
        """One placeholder per instance; the sender produces it (recall, conversion) when it is its turn.

        A placeholder whose instance cannot be produced or sent makes
        ``send_c_store`` raise, which pynetdicom counts as a failed
        sub-operation and lists in Failed SOP Instance UID List.

        ``retrieval`` (an :class:`xdsi.audit.dimse.RetrieveAudit`, when [audit] is on) hears when the
        sub-operations start, how each one ended, and when the request is over: pynetdicom asks
        for the next placeholder only after the previous C-STORE was answered, so the end comes
        after the last one and before our final C-MOVE/C-GET response; on a cancel or abort the
        generator is closed and ``finally`` still records what was sent.

        ``sender``: the :class:`direct.DirectWriter` that sends the C-STOREs (the C-GET association's,
        the C-MOVE sub-association's), told which stored file comes next so it reads it while the
        peer answers the one before (:class:`Upcoming`).
        """
        source = self.archive_for(event.assoc).retrieve
        upcoming = Upcoming(source, refs)
        requestor = direct.writer_of(event.assoc)
        moving = sender is not None and requestor is not None and sender is not requestor  # C-MOVE: two associations
        if sender is not None:
            sender.expect(upcoming)
        if moving:
            requestor.hold_pending = True
            sender.after_send = requestor.flush
        if retrieval is not None:
            retrieval.begin()
        try:
            with ExitStack() as polling:
                if direct.writer_of(event.assoc) is not None:  # responses read by the sending thread: no DUL polling for them
                    polling.enter_context(quiet_polling(event.assoc))
                else:
                    polling.enter_context(fast_polling(event.assoc))
                if moving:  # the sub-association's C-STORE responses too: its DUL only watches for an abort meanwhile
                    polling.enter_context(quiet_polling(sender.assoc))
                yield from self._placeholders(event, source, refs, retrieval, upcoming)
        finally:
            if sender is not None:
                sender.expect(None)
            if moving:
                sender.after_send = None
                requestor.hold_pending = False
                try:
                    requestor.flush()  # the last Pending response, before pynetdicom's final one
                except Exception:  # noqa: BLE001 - the requestor is gone; pynetdicom finds out
                    log.debug("the last Pending C-MOVE response was not sent", exc_info=True)
            if retrieval is not None:
                if not event.assoc.is_established and retrieval.note is None:
                    retrieval.note = "the association ended before every instance was sent"
                retrieval.end()

    def _placeholders(self, event: Any, source: Any, refs: list[Any], retrieval: Any, upcoming: "Upcoming") -> Iterator[Any]:
        """The Pending placeholders of :meth:`_suboperations`, until done or cancelled."""
        for n, ref in enumerate(refs):
            upcoming.index = n + 1
            if event.is_cancelled:
                if retrieval is not None:
                    retrieval.note = "cancelled by the requestor (C-CANCEL)"
                yield Status.CANCEL, None  # pynetdicom adds the failed UIDs it counted
                return
            placeholder = Placeholder(source, ref)
            if retrieval is not None:
                placeholder._xdsi_on_sent = retrieval.sent
            yield Status.PENDING, placeholder

    # -- lifecycle --------------------------------------------------------------

    def _prepare(self) -> None:
        """What any listener needs, done once: the plain port may be off (``dicom_port = 0``) and TLS the only one."""
        if self._prepared:
            return
        self._prepared = True
        tempfile.tempdir = str(self.archive.settings.temp_dir)  # spool C-STOREs on the data disk
        self.spool.temp_dir = Path(tempfile.tempdir)
        spool_ahead.configure(self.spool.max_age)  # files made ahead never wait long enough for the keeper to sweep them
        self.spool.start()
        self.governor.start()

    def start(self, host: str, port: int, sock: socket.socket | None = None) -> None:
        """Listen on ``host:port``, or serve ``sock``, a listening socket bound by the supervisor."""
        self._prepare()
        self.ae.adopt = sock
        self._server = self.ae.start_server((host, port), block=False, evt_handlers=self._handlers())
        set_nodelay(self._server.socket)
        log.info("DICOM %s listening on %s:%d", self.ae.ae_title, host, self._server.server_address[1])
        self._log_policy()

    def client_tls(self) -> ssl.SSLContext:
        """Our outbound DICOM TLS context ([peers.X] tls = true), built once: the peer's chain is verified
        against [tls] ca_certificates; its host name is not (DICOM peers are configured by address and AE title)."""
        if self._client_tls is None:
            from xdsi.security.tls import client_context

            self._client_tls = client_context(self.archive.settings.tls, check_hostname=False)
        return self._client_tls

    def start_tls(self, host: str, port: int, context: "ssl.SSLContext", sock: socket.socket | None = None) -> None:
        """A listener of the same AE, DICOM over TLS (PS3.15 B.1), beside :meth:`start`'s or alone.

        Same handlers, same association governor: a TLS peer is one more peer, not a second archive.
        """
        self._prepare()
        self.ae.adopt = sock
        self._tls_server = self.ae.start_server((host, port), block=False, evt_handlers=self._handlers(), ssl_context=context)
        set_nodelay(self._tls_server.socket)
        log.info("DICOM %s listening with TLS on %s:%d", self.ae.ae_title, host, self._tls_server.server_address[1])
        self._log_policy()

    def _log_policy(self) -> None:
        """Once, after the first listener is bound (a busy port stays a one-line error): whom DIMSE accepts."""
        if self._policy_logged:
            return
        self._policy_logged = True
        level = logging.INFO if self.policy.accept_unknown or self.policy.settings.peers else logging.WARNING
        log.log(level, "DICOM %s: %s", self.ae.ae_title, self.policy.describe())

    @property
    def port(self) -> int | None:
        """The plain DICOM port listened on; None when it is off (``dicom_port = 0``) or not started."""
        return None if self._server is None else int(self._server.server_address[1])

    @property
    def tls_port(self) -> int | None:
        return None if self._tls_server is None else int(self._tls_server.server_address[1])

    def stop(self, grace: float = 10.0) -> None:
        """Stop listening, then abort the associations still open.

        pynetdicom's DUL threads are not daemons, so an idle peer that keeps
        its association open would hold the process until the network
        timeout.  Aborting is safe: an operation not yet answered was never
        acknowledged, and the store path leaves nothing half-indexed.  Each
        association thread then gets ``grace`` seconds to finish the handler
        it is running before the archive closes under it.
        """
        listening = [srv for srv in (self._tls_server, self._server) if srv is not None]
        self._tls_server = self._server = None
        for srv in listening:
            srv.shutdown()
        if listening:  # associations of either listener (a TLS-only node has no plain one)
            open_assocs = list(self.ae.active_associations)
            for assoc in open_assocs:
                if assoc.is_established:
                    log.info("aborting association with %s on shutdown", assoc.requestor.ae_title if assoc.is_acceptor else assoc.acceptor.ae_title)
                assoc.abort()
            deadline = time.monotonic() + grace
            for assoc in open_assocs:
                assoc.join(max(0.0, deadline - time.monotonic()))
        self.governor.stop()
        spool_ahead.drain()  # the empty spool files made ahead go with the server (another one starts them again)
        self.spool.stop()
        self.commitment.stop()


class Placeholder(StoredInstance):
    """A :class:`StoredInstance` whose two UIDs are kept as raw elements, converted only if read.

    Why: setting them as attributes made pydicom look the keywords up and validate both UIDs for every
    sub-operation (~13 us each, of a sub-operation's ~0.4 ms of CPU); they come from the index, which
    holds only valid UIDs, and pynetdicom reads them only for a failed sub-operation.
    """

    def __init__(self, source: Any, ref: Any) -> None:
        Dataset.__init__(self)
        direct.put_identity(self, ref.sop_class_uid, ref.sop_instance_uid)
        self._xdsi_source = source
        self._xdsi_ref = ref


class Upcoming:
    """The stored file of the instance a C-GET/C-MOVE sends after the current one, for the sender to read ahead.

    ``index`` is advanced by the handler as it hands out placeholders.  Only a copy on the hot tier is
    named, and nothing is recalled or stamped for it here (:meth:`RetrieveService.hot_path`); whether
    the instance is then sent as stored or converted is decided when its turn comes, and the sender
    uses what it read only if it is sending that very file.
    """

    def __init__(self, source: Any, refs: list[Any]) -> None:
        self.source = source
        self.refs = refs
        self.index = 0

    def __call__(self) -> Path | None:
        if self.index >= len(self.refs):
            return None
        return self.source.hot_path(self.refs[self.index])


def _refuse_retrieve(reason: str, destination: MoveDestination | None) -> Iterator[Any]:
    """C-MOVE / C-GET answered 0124 Refused: Not Authorized, with nothing sent.

    pynetdicom's handler protocol has no status before the sub-operation count (and answers
    Success to a count of 0), so one sub-operation is announced and the request failed at
    once, as for an identifier we cannot use; for C-MOVE the destination is never contacted.
    """
    if destination is not None:
        yield "0.0.0.0", 0, {"xdsi_move_destination": destination}
    yield 1
    yield _failure(NOT_AUTHORIZED, reason), failed_identifier([])


def _aet(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value or "").strip()


def _failure(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds
