"""The hub's audit trail (issue 15): routing forwards and prefetch pushes, on a real index and a real storage SCP.

The trail here keeps the events in memory; each is serialised by the production builder and checked
against the PS3.15 schema (tests/support/audit_schema.py).  Relayed retrieves and on-demand fetches
are audited end to end against rsyslog in tests/integration/test_gateway_safety.py.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage

from tests.conftest import make_settings
from tests.support.audit_schema import check_audit_message, event
from tests.support.server import free_port
from xdsi.archive import Archive
from xdsi.audit import messages as m
from xdsi.config import Peer
from xdsi.routing.queue import RouteQueue
from xdsi.routing.service import RoutingService
from xdsi.routing.settings import RoutingSettings, routes_from
from xdsi.routing.status import queue_status
from xdsi.tools.synth import StudySpec, write_study

CT = "1.2.840.10008.5.1.4.1.1.2"


class Trail:
    """An enabled AuditTrail that keeps what it is given (as xdsi.audit.trail.AuditTrail.record would spool it)."""

    enabled = True

    def __init__(self) -> None:
        self.source = m.AuditSource("HUB-TEST")
        self.events: list[Any] = []

    def record(self, ev: m.AuditEvent) -> bool:
        self.events.append(check_audit_message(m.build(ev)))
        return True


@pytest.fixture(scope="module")
def workstation() -> Iterator[dict[str, Any]]:
    """A pynetdicom storage SCP on loopback: what it stored, by SOP Instance UID."""
    got: dict[str, str] = {}

    def on_store(e: Any) -> int:
        got[str(e.request.AffectedSOPInstanceUID)] = str(e.assoc.requestor.ae_title)
        return 0x0000

    ae = AE(ae_title="WSA")
    ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        yield {"port": port, "got": got}
    finally:
        server.shutdown()


@pytest.fixture()
def routed(tmp_path: Path, workstation: dict[str, Any]) -> Iterator[tuple[Archive, Trail, list[Path], StudySpec]]:
    peers = {"WSA": Peer("WSA", "127.0.0.1", workstation["port"]), "WSDOWN": Peer("WSDOWN", "127.0.0.1", free_port())}
    routes = routes_from([{"name": "all", "destinations": ["WSA", "WSDOWN"]}], peers)
    settings = make_settings(tmp_path, None, peers=peers)
    settings = replace(settings, routes=routes, routing=RoutingSettings(retry_initial=60, retry_max=600, batch=10, max_attempts=3))
    a = Archive.open(settings)
    trail = Trail()
    a.audit = trail  # as xdsi.server wires it when [audit] has a repository
    spec = StudySpec(patient_id="HUB1", patient_name="HUB^ONE", accession="H1")
    files = write_study(tmp_path / "in", spec, per_series=3)
    for f in files:
        assert a.store.store_file(f, source_ae="CT1").ok
    try:
        yield a, trail, files, spec
    finally:
        a.close()


def _of(trail: Trail, code: str, dest: str) -> list[Any]:
    out = []
    for r in trail.events:
        ids = [(ap.get("UserID"), (ap.find("RoleIDCode").get("csd-code") if ap.find("RoleIDCode") is not None else None))
               for ap in r.findall("ActiveParticipant")]
        if event(r)[0] == code and (dest, "110152") in ids:
            out.append(r)
    return out


def _classes(r: Any) -> dict[str, str]:
    return {sc.get("UID"): sc.get("NumberOfInstances") for sc in r.iter("SOPClass")}


def _patient(r: Any) -> str:
    return next(o.get("ParticipantObjectID") for o in r.findall("ParticipantObjectIdentification") if o.get("ParticipantObjectTypeCodeRole") == "1")


def test_routing_forward_audited_per_destination_batch(routed: Any, workstation: dict[str, Any]) -> None:
    archive, trail, files, spec = routed
    q = RouteQueue(archive, archive.settings.routes, archive.settings.routing)
    svc = RoutingService.__new__(RoutingService)  # step() only needs the queue
    assert svc.step(q) and svc.step(q)  # one batch per destination
    # WSA took all three: Begin Transferring then Instances Transferred (R, outcome 0), the study and patient named
    (begin,) = _of(trail, "110102", "WSA")
    (done,) = _of(trail, "110104", "WSA")
    assert event(done)[1:] == ("R", "0") and _classes(done) == {CT: "3"} and _classes(begin) == {CT: "3"}
    assert _patient(done) == spec.patient_id
    # WSDOWN could not be reached: on record as a minor failure with the reason, nothing counted as sent
    (failed,) = _of(trail, "110104", "WSDOWN")
    assert event(failed)[1:] == ("R", "4") and _classes(failed) == {}
    assert "could not be reached" in failed.find("EventIdentification/EventOutcomeDescription").text
    # /status and `xdsi status` read the same: WSA sent, WSDOWN queued again and failing
    st = queue_status(archive.index, archive.settings)
    assert st["destinations"]["WSA"]["sent"] == 3 and st["destinations"]["WSA"]["queued"] == 0
    down = st["destinations"]["WSDOWN"]
    assert (down["queued"], down["failing"], down["sent"]) == (3, 3, 0) and "could not be reached" in down["last_error"]
    assert (st["queued"], st["failing"], st["given_up"]) == (3, 3, 0)
    assert down["next_attempt_at"] and down["last_error_at"]


def test_prefetch_push_audited(routed: Any, workstation: dict[str, Any]) -> None:
    from xdsi.audit.hub import audited_push
    from xdsi.hl7.prefetch import push_studies

    archive, trail, files, spec = routed
    done, errors = audited_push(archive, "WSA", [spec.study_uid], push_studies)
    assert (done, errors) == (3, [])
    (begin,) = _of(trail, "110102", "WSA")
    (sent,) = _of(trail, "110104", "WSA")
    assert event(sent)[1:] == ("R", "0") and _classes(sent) == {CT: "3"} and _patient(sent) == spec.patient_id
    done, errors = audited_push(archive, "WSDOWN", [spec.study_uid], push_studies)
    assert done == 0 and errors
    (failed,) = _of(trail, "110104", "WSDOWN")
    assert event(failed)[1:] == ("R", "4") and _classes(failed) == {}
