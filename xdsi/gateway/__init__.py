"""The gateway (issue 15): C-FIND, C-MOVE and C-GET answered from remote archives (``[remotes.NAME]``).

``DicomServer`` asks :class:`Gateway` at the top of its C-FIND/C-MOVE/C-GET handlers (after the
requester's rights are checked) whether it takes the request; if it does, the handler yields what
the gateway yields.  Which requests: those on an AE title (the main one or a partition's) whose
``[gateway]`` names remotes and a mode:

* ``forward``: every query goes to the remotes (merged, :mod:`xdsi.gateway.find`), every retrieve
  to the first remote offering ``get`` or ``move`` (:mod:`xdsi.gateway.relay`);
* ``fallback``: answered locally when anything local matches; otherwise as ``forward``.

How a retrieve is served (the seed's table, every combination):

============  ================  ===========================================================
requester     remote offers     what we do
============  ================  ===========================================================
C-GET         get               C-GET from the remote, each instance relayed on the requester's association
C-GET         move only         C-MOVE to us, each instance relayed as it arrives on our storage SCP
C-MOVE        move, knows dest  the C-MOVE forwarded with the requester's destination; counts relayed
C-MOVE        move              C-MOVE to us, each instance relayed to the destination (our ``[peers]``)
C-MOVE        get only          C-GET from the remote, each instance relayed to the destination
============  ================  ===========================================================
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Iterator

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.presentation import StoragePresentationContexts, build_context
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)
from pynetdicom.status import Status

from xdsi.audit import hub as hub_audit
from xdsi.config import GatewaySettings
from xdsi.dimse import direct
from xdsi.dimse.sending import quiet_polling
from xdsi.gateway import relay as r
from xdsi.gateway.find import forward_find
from xdsi.gateway.remotes import RemoteClient, Remotes, next_message_id

log = logging.getLogger(__name__)

MOVE_MODEL = {
    PatientRootQueryRetrieveInformationModelGet: PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet: StudyRootQueryRetrieveInformationModelMove,
}
GET_MODEL = {v: k for k, v in MOVE_MODEL.items()}
FIND_MODEL = {
    PatientRootQueryRetrieveInformationModelGet: PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove: PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet: StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove: StudyRootQueryRetrieveInformationModelFind,
}
for _m in list(MOVE_MODEL.values()):
    MOVE_MODEL[_m] = _m
for _g in list(GET_MODEL.values()):
    GET_MODEL[_g] = _g

__all__ = ["Gateway", "hand_over"]

hand_over = r.hand_over  # the storage SCP's hook: DicomServer.on_store


class Gateway:
    """Decides whether a request goes to the remotes, and serves it if so.  One per DicomServer."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.remotes = Remotes(server.archive.settings, server.client_tls)
        from xdsi.gateway.fetch import Fetcher

        for archive in {id(a): a for a in (server.archive, *server.partitions.values())}.values():
            if archive.settings.gateway.enabled:  # RAD-69 / WADO-RS / WADO-URI of a study only a remote holds
                archive.retrieve.fetch_missing = Fetcher(self, archive)
        if r.INBOX_ROOT is None:  # every worker of one data dir shares it (see relay.py)
            r.INBOX_ROOT = server.archive.settings.temp_dir / "relay"
        if server.archive.settings.gateway.enabled:
            removed = r.sweep(server.archive.settings.temp_dir / "relay")
            if removed:
                log.info("gateway: removed %d relay spool file(s) left by an earlier run", removed)

    # -- which requests -------------------------------------------------------------------------

    @staticmethod
    def _config(archive: Any) -> GatewaySettings:
        return archive.settings.gateway

    def _clients(self, g: GatewaySettings, *services: str) -> list[RemoteClient]:
        out = []
        for name in g.remotes:
            c = self.remotes.client(name)
            if any(c.remote.offers(s) for s in services):
                out.append(c)
        return out

    @staticmethod
    def _held_locally(archive: Any, identifier: Dataset) -> bool:
        try:
            return bool(archive.retrieve.select_by_identifier(identifier))
        except Exception:  # an identifier we cannot use: the local handler answers with its error
            return True

    @staticmethod
    def _holder(clients: list[RemoteClient], identifier: Dataset, retrieve_model: str) -> RemoteClient:
        """The remote to retrieve from: the only one, else the first (in ``[gateway] remotes`` order) whose C-FIND
        for the retrieve identifier has a match; the first when none says so (its answer is then the requester's)."""
        if len(clients) == 1:
            return clients[0]
        find_model = FIND_MODEL.get(retrieve_model, StudyRootQueryRetrieveInformationModelFind)
        for c in clients:
            if c.remote.offers("find") and _has_match(c, identifier, find_model):
                return c
        return clients[0]

    # -- C-FIND ---------------------------------------------------------------------------------

    def find(self, event: Any, archive: Any, model: str) -> Iterator[Any] | None:
        """The forwarded C-FIND's responses, or None: answer locally."""
        g = self._config(archive)
        if not g.enabled:
            return None
        clients = self._clients(g, "find")
        if not clients:
            return None
        identifier = event.identifier
        uid = str(event.request.AffectedSOPClassUID)
        bad = bad_uids(identifier)
        if bad is not None:
            return _refused_find(bad)
        if g.mode == "fallback":
            return self._fallback_find(event, archive, identifier, model, uid, clients)
        return forward_find(event, identifier, uid, clients)

    def _fallback_find(self, event: Any, archive: Any, identifier: Dataset, model: str, uid: str,
                       clients: list[RemoteClient]) -> Iterator[Any]:
        from xdsi.archive.query import QueryError
        from xdsi.dimse import status

        try:
            matches = archive.query.find(identifier, model=model)
            first = next(matches, None)
        except QueryError as exc:
            yield r.failure(status.IDENTIFIER_DOES_NOT_MATCH, str(exc)), None
            return
        if first is None:  # nothing local: the remotes answer
            yield from forward_find(event, identifier, uid, clients)
            return
        yield Status.PENDING, first
        for ds in matches:
            if event.is_cancelled:
                yield Status.CANCEL, None
                return
            yield Status.PENDING, ds

    def _retrieve_through(
        self, event: Any, archive: Any, destination: str | None
    ) -> tuple[GatewaySettings, RemoteClient, Dataset] | Iterator[Any] | None:
        """Whether a C-GET or C-MOVE goes to a remote: None (serve locally), a refusal to yield (bad UIDs, which
        never reach a remote), or the gateway settings, the remote that holds it and the identifier."""
        g = self._config(archive)
        if not g.enabled:
            return None
        clients = self._clients(g, "get", "move")
        if not clients:
            return None
        identifier = event.identifier
        if g.mode == "fallback" and self._held_locally(archive, identifier):
            return None
        bad = bad_uids(identifier, retrieve=True)
        if bad is not None:
            return _refused_retrieve(bad, destination)
        return g, self._holder(clients, identifier, str(event.request.AffectedSOPClassUID)), identifier

    # -- C-GET ----------------------------------------------------------------------------------

    def get(self, event: Any, archive: Any) -> Iterator[Any] | None:
        """The C-GET served through a remote, or None: serve locally."""
        taken = self._retrieve_through(event, archive, None)
        if not isinstance(taken, tuple):  # None (serve locally) or a refusal
            return taken
        g, client, identifier = taken
        how = "get" if client.remote.offers("get") else "move"
        return self._get(event, archive, g, client, how, identifier)

    def _get(self, event: Any, archive: Any, g: GatewaySettings, client: RemoteClient, how: str, identifier: Dataset) -> Iterator[Any]:
        model = str(event.request.AffectedSOPClassUID)
        model = GET_MODEL[model] if how == "get" else MOVE_MODEL[model]
        relay = r.new_relay(archive.settings.temp_dir / "relay", client)
        relay.audit = hub_audit.relay_audit(self.server, event, client.remote)  # None without [audit]
        finish = r.Finisher(relay, archive.store if g.cache else None, client.remote.ae_title)
        undo = r.install_relay_sender(event.assoc, finish)
        what = f"C-GET from {event.assoc.requestor.ae_title.strip()} via {'C-GET' if how == 'get' else 'C-MOVE'} to {client.remote.name}"
        storage = _mirrored_storage_contexts(event.assoc) if how == "get" else []
        try:
            r.start_source(client, how, identifier, model, relay, storage)
            if direct.enable(event.assoc) is not None:  # C-STOREs and Pending responses written, responses read, by this thread
                with quiet_polling(event.assoc):  # the DUL only watches for a C-CANCEL or an A-ABORT meanwhile
                    yield from r.relay_suboperations(event, relay, what)
            else:
                with r.fast_polling(event.assoc):  # the requester's C-STORE responses read without the 1 ms idle sleep
                    yield from r.relay_suboperations(event, relay, what)
        finally:
            undo()
            if finish.expecting is not None:  # the association serves more requests: no read-ahead from this relay's queue
                finish.expecting.expect(None)

    # -- C-MOVE ---------------------------------------------------------------------------------

    def move(self, event: Any, archive: Any, destination: str) -> Iterator[Any] | None:
        """The C-MOVE served through a remote, or None: serve locally."""
        taken = self._retrieve_through(event, archive, destination)
        if not isinstance(taken, tuple):  # None (serve locally) or a refusal
            return taken
        g, client, identifier = taken
        if client.remote.offers("move") and client.remote.knows(destination):
            return self._forward_move(event, client, destination, identifier)
        peer = archive.settings.peer(destination)
        if peer is None:
            return _unknown_destination(event, destination)
        how = "move" if client.remote.offers("move") else "get"
        return self._relay_move(event, archive, g, client, how, peer, destination, identifier)

    def _relay_move(self, event: Any, archive: Any, g: GatewaySettings, client: RemoteClient, how: str, peer: Any,
                    destination: str, identifier: Dataset) -> Iterator[Any]:
        from xdsi.dimse.sending import MoveDestination

        model = str(event.request.AffectedSOPClassUID)
        model = GET_MODEL[model] if how == "get" else MOVE_MODEL[model]
        relay = r.new_relay(archive.settings.temp_dir / "relay", client)
        relay.audit = hub_audit.relay_audit(self.server, event, client.remote, hub_audit.remote_participant(peer))
        finish = r.Finisher(relay, archive.store if g.cache else None, client.remote.ae_title)
        dest = MoveDestination(destination)
        contexts = _native_storage_contexts()
        kwargs: dict[str, Any] = {
            "xdsi_move_destination": dest,
            "contexts": contexts,
            # the sub-association's send_c_store learns our placeholders as soon as its connection opens
            "evt_handlers": [(evt.EVT_CONN_OPEN, lambda e: r.install_relay_sender(e.assoc, finish))],
        }
        if peer.tls:
            kwargs["tls_args"] = (self.server.client_tls(), peer.host)
        what = f"C-MOVE to {destination} via {'C-GET' if how == 'get' else 'C-MOVE'} to {client.remote.name}"
        yield peer.host, peer.port, kwargs
        r.start_source(client, how, identifier, model, relay, contexts if how == "get" else [])
        inner = r.relay_suboperations(event, relay, what)
        try:
            for item in inner:
                yield item
                if isinstance(item, int) and dest.refused is not None:  # the destination did not take the association
                    inner.close()
                    yield r.failure(0xA702, dest.refused), r.failed_identifier([])
                    return
        finally:
            inner.close()

    def _forward_move(self, event: Any, client: RemoteClient, destination: str, identifier: Dataset) -> Iterator[Any]:
        """The C-MOVE sent on to the remote with the requester's destination; its counts relayed as it reports them."""
        model = MOVE_MODEL[str(event.request.AffectedSOPClassUID)]
        relay = r.Relay(self.server.archive.settings.temp_dir / "relay", client.remote.ae_title, next_message_id())
        relay.timeout = client.remote.timeout
        done = threading.Event()

        def run() -> None:
            problem = None
            try:
                with client.association(r.qr_contexts(model)) as assoc:
                    relay.cancel_remote = lambda: assoc.send_c_cancel(relay.msg_id, query_model=model)
                    problem = r.pump_responses(relay, client, "C-MOVE", assoc.send_c_move(identifier, destination, model, msg_id=relay.msg_id))
                    relay.end(problem)  # the final response relayed now, not after our association's release
            except Exception as exc:
                problem = r.remote_failure(exc, client, "C-MOVE forwarded to")
            finally:
                relay.cancel_remote = None
                relay.end(problem)
                done.set()

        yield client.remote.host, client.remote.port, {"xdsi_stand_in": ForwardedSubAssociation()}
        threading.Thread(target=run, name=f"forward-move-{client.remote.name}", daemon=True).start()
        yield from _forwarded_counts(event, relay, f"C-MOVE to {destination} forwarded to {client.remote.name}")


def _forwarded_counts(event: Any, relay: r.Relay, what: str) -> Iterator[Any]:
    """Count, then one outcome placeholder per sub-operation the remote reports (completed, warning; failed at the end)."""
    ex = r.Exchange(event, relay)
    try:
        total = ex.total()
        if total is None:
            if ex.cancelled:
                ex.cancel()
                yield 1
                yield Status.CANCEL, None
                return
            yield 1
            yield r.failure(0xA702, ex.problem or "the remote gave no answer"), r.failed_identifier([])
            return
        if total == 0:
            code = int(ex.final.Status) if ex.final is not None else 0
            if code not in (0x0000, 0xB000):
                comment = str(ex.final.get("ErrorComment", "") or "") if ex.final is not None else ""
                yield 1
                yield r.failure(code if code != 0xA801 else 0xA801, f"remote answered 0x{code:04X} {comment}".strip()), r.failed_identifier([])
                return
            yield 0
            return
        yield total
        reported = [0, 0, 0]  # completed, failed, warning as the remote reported so far
        final_counts: list[int] | None = None
        st_seen = [ex.final] if ex.final is not None else []
        while True:
            for st in st_seen:
                counts = r._counts(st)
                if counts is None:
                    continue
                _, completed, failed, warning = counts
                for _ in range(completed - reported[0]):
                    yield Status.PENDING, Outcome(0x0000)
                for _ in range(warning - reported[2]):
                    yield Status.PENDING, Outcome(0xB000)
                reported = [max(completed, reported[0]), max(failed, reported[1]), max(warning, reported[2])]
                if int(st.Status) not in r.PENDING:
                    final_counts = counts
            st_seen = []
            if final_counts is not None or ex.ended:
                break
            item = ex._next()
            if item is None:  # the requester cancelled
                ex.cancel()
                yield Status.CANCEL, None
                return
            kind, value = item
            if kind == "rsp":
                st_seen = [value[0]]
                if int(value[0].Status) not in r.PENDING:
                    ex.final, ex.final_identifier = value
            elif kind == "end":
                ex.ended = True
                ex.problem = ex.problem or value
        missing = total - reported[0] - reported[2]
        uids = ex.failed_uids()
        reason = ex.problem or "failed at the remote"
        for i in range(max(0, missing)):
            yield Status.PENDING, r.MissingInstance(uids[i] if i < len(uids) else "", reason)
    finally:
        if not ex.ended:
            ex.cancel()
        relay.close()


class Outcome(Dataset):
    """A sub-operation the remote performed itself: the stand-in association 'sends' it by returning its status."""

    def __init__(self, code: int) -> None:
        super().__init__()
        self._xdsi_code = code


class ForwardedSubAssociation:
    """Stands in for the sub-association of a C-MOVE the remote performs itself (pynetdicom's handler
    protocol opens one to the destination otherwise): each placeholder's status is what the remote
    reported for one sub-operation, so pynetdicom's counts and final status follow the remote's."""

    is_established = True
    is_requestor = True

    def __init__(self) -> None:
        self.accepted_contexts: list[Any] = []

    def send_c_store(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(dataset, r.MissingInstance):
            raise LookupError(dataset._xdsi_reason)
        st = Dataset()
        st.Status = getattr(dataset, "_xdsi_code", 0x0000)
        return st

    def release(self) -> None:
        pass

    def abort(self) -> None:
        pass


UID_KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")


def bad_uids(identifier: Dataset, *, retrieve: bool = False) -> str | None:
    """Why the identifier must not be sent to a remote (an invalid UID, a retrieve without its level's key), or None.

    UIDs are checked before they reach anyone's query: ours is protected by the index layer, a remote's
    only by us.  C-FIND keys may be empty (return keys) or lists of UIDs; wildcards are not UID matching.
    """
    from xdsi.uids import is_valid_uid

    try:
        level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
        if level not in LEVELS:
            return f"QueryRetrieveLevel {level!r} is not valid"
        for key in UID_KEYS:
            value = identifier.get(key)
            if value is None or value == "":
                continue
            values = [str(v) for v in value] if not isinstance(value, str) else str(value).split("\\")
            for v in values:
                if not is_valid_uid(v.strip()):
                    return f"{key} {v[:40]!r} is not a valid UID"
        if retrieve:
            need = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}[level]
            if not str(identifier.get(need, "") or "").strip():
                return f"the {level} level unique key {need} is missing"
    except Exception as exc:  # an identifier pydicom cannot decode
        return f"identifier cannot be decoded: {exc.__class__.__name__}"
    return None


def _refused_find(reason: str) -> Iterator[Any]:
    from xdsi.dimse import status

    yield r.failure(status.IDENTIFIER_DOES_NOT_MATCH, reason), None


def _refused_retrieve(reason: str, destination: str | None) -> Iterator[Any]:
    """A900 with nothing sent: pynetdicom answers Success to a count of 0, so one sub-operation is announced and failed
    (as DicomServer does for a local identifier it cannot use); for C-MOVE the destination is not contacted."""
    from xdsi.dimse import status
    from xdsi.dimse.sending import MoveDestination

    if destination is not None:
        yield "0.0.0.0", 0, {"xdsi_move_destination": MoveDestination(destination, connect=False)}
    yield 1
    yield r.failure(status.IDENTIFIER_DOES_NOT_MATCH, reason), r.failed_identifier([])


def _has_match(client: RemoteClient, identifier: Dataset, model: str) -> bool:
    """One C-FIND to ``client`` for the retrieve's identifier: does it hold anything of it?"""
    from xdsi.gateway.remotes import qr_contexts

    try:
        with client.association(qr_contexts(model)) as assoc:
            found = False
            for st, _ds in assoc.send_c_find(identifier, model, msg_id=next_message_id()):
                if getattr(st, "Status", None) in (0xFF00, 0xFF01):
                    found = True
            return found
    except Exception as exc:
        log.info("%s: C-FIND before a retrieve failed: %s", client, exc)
        return False


def _unknown_destination(event: Any, destination: str) -> Iterator[Any]:
    log.warning("C-MOVE from %s to unknown destination %r", event.assoc.requestor.ae_title, destination)
    yield None, None  # pynetdicom answers A801 Move Destination Unknown


def _mirrored_storage_contexts(assoc: Any) -> list[Any]:
    """For a C-GET from the remote: the storage contexts the requester accepted us to send on, so the remote sends what it takes."""
    out: list[Any] = []
    seen: set[tuple[str, str]] = set()
    for cx in sorted(assoc.accepted_contexts, key=lambda c: c.context_id or 0):
        if not getattr(cx, "as_scu", False) or not cx.transfer_syntax:
            continue
        key = (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
        if key in seen or str(cx.abstract_syntax).startswith("1.2.840.10008.5.1.4.1.2."):  # no Q/R models
            continue
        seen.add(key)
        out.append(build_context(key[0], [key[1]]))
    return out[:127]


def _native_storage_contexts() -> list[Any]:
    """What we propose to a C-MOVE destination (or to a remote we C-GET from) when the SOP classes are not known
    up front: pynetdicom's 128 common storage classes, each in Explicit and Implicit VR Little Endian."""
    return [build_context(cx.abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]) for cx in StoragePresentationContexts][:127]
