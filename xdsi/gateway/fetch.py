"""On-demand fetch (issue 15): a study asked for over HTTP (RAD-69, WADO-RS, WADO-URI) that we do not hold
but a remote does is retrieved from it (C-MOVE to us, or C-GET), archived on the first tier, then served.

The retrieve service asks :meth:`Fetcher.__call__` when a selection by Study Instance UID found nothing
(``RetrieveService.fetch_missing``, set for archives whose gateway is on).  One fetch per study at a
time: a second request for the same study waits for the first and then reads what it stored.  A
published manifest may therefore reference a study the PACS still holds: the first consumer's
retrieve brings it in.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Iterable

from collections import Counter

from pydicom.dataset import Dataset
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelMove

from xdsi.audit import hub as hub_audit
from xdsi.gateway import relay as r
from xdsi.uids import is_valid_uid

log = logging.getLogger(__name__)


class _Detached:
    """Stands in for the requester's event in :class:`relay.Exchange`: nobody cancels a fetch, nobody goes away."""

    is_cancelled = False

    class assoc:  # noqa: N801 - attribute shape of pynetdicom's event.assoc
        is_established = True


class Fetcher:
    """Fetch whole studies from the gateway's remotes into one archive."""

    def __init__(self, gateway: Any, archive: Any) -> None:
        self.gateway = gateway
        self.archive = archive
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def __call__(self, study_uids: Iterable[str], client: Any = None) -> bool:
        """Fetch each study not held; True when at least one instance was stored (the caller selects again).

        ``client``: the remote to fetch from (a prefetch knows which remote answered for the study); None:
        chosen among the gateway's remotes."""
        stored = 0
        for uid in dict.fromkeys(study_uids):
            if not is_valid_uid(uid):
                continue
            with self._guard:
                lock = self._locks.setdefault(uid, threading.Lock())
            with lock:
                if self.archive.retrieve.select(study_uids=[uid], read_stamps=True):  # fetched while we waited
                    stored += 1
                    continue
                stored += self._fetch(uid, client)
        return stored > 0

    def _fetch(self, study_uid: str, client: Any = None) -> int:
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = study_uid
        if client is None:
            clients = self.gateway._clients(self.archive.settings.gateway, "get", "move")
            if not clients:
                return 0
            client = self.gateway._holder(clients, identifier, StudyRootQueryRetrieveInformationModelMove)
        how = "get" if client.remote.offers("get") else "move"
        model = StudyRootQueryRetrieveInformationModelGet if how == "get" else StudyRootQueryRetrieveInformationModelMove
        relay = r.new_relay(self.archive.settings.temp_dir / "relay", client)
        from xdsi.gateway import _native_storage_contexts

        r.start_source(client, how, identifier, model, relay, _native_storage_contexts() if how == "get" else [])
        ex = r.Exchange(_Detached, relay)
        stored = failed = 0
        classes: Counter[str] = Counter()  # SOP classes stored, for the audit trail
        patient = ""
        try:
            if ex.total() is None:
                log.warning("fetch of study %s from %s: %s", study_uid, client.remote.name, ex.problem or "no answer")
                self._audit(client, study_uid, patient, classes, 0, relay, ex.problem or "no answer")
                return 0
            relay.announce()
            for arrived in ex.rest():
                try:
                    patient = patient or arrived.patient_id
                    result = self.archive.store.store_file(arrived.materialize(), source_ae=client.remote.ae_title, move=True)
                    if result.ok:
                        stored += 1
                        classes[result.sop_class_uid or arrived.sop_class_uid] += 1
                    else:
                        failed += 1
                        log.warning("fetched %s not stored: %s", arrived.sop_instance_uid, result.reason)
                finally:
                    arrived.drop()
                    relay.consumed()
        finally:
            relay.close()
            ex.discard()
        log.info("fetched study %s from %s (%s): %d stored, %d refused%s", study_uid, client.remote.name,
                 "C-GET" if how == "get" else "C-MOVE", stored, failed, f"; {ex.problem}" if ex.problem else "")
        self._audit(client, study_uid, patient, classes, failed, relay, ex.problem)
        return stored

    def _audit(self, client: Any, study_uid: str, patient: str, classes: Counter[str], failed: int, relay: r.Relay,
               problem: str | None) -> None:
        """Import from the remote (:func:`xdsi.audit.hub.fetch_audit`), when [audit] is on; also when nothing came."""
        trail = hub_audit.trail_of(self.archive)
        if trail is None:
            return
        if not patient and classes:
            from xdsi.audit.dimse import patient_of

            try:
                patient = patient_of(self.archive, study_uid)
            except Exception:
                log.exception("audit: patient of fetched study %s not found", study_uid)
        hub_audit.fetch_audit(trail, hub_audit.us(self.archive.settings), hub_audit.remote_participant(client.remote), study_uid,
                              patient, classes.items(), failed, relay.refused, problem)
