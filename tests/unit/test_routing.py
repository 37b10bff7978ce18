"""Routing rules and the forward queue on a real index (SQLite and PostgreSQL), without the network.

What is sent over the wire, to real peers, is in tests/integration/test_routing.py.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import pytest
from pydicom import dcmread
from sqlalchemy import select

from tests.conftest import make_settings
from xdsi.archive import Archive
from xdsi.config import ConfigError, load_settings
from xdsi.routing import conditions
from xdsi.routing.models import GAVE_UP, PENDING, SENDING, SENT, RouteForward
from xdsi.routing.queue import RouteQueue, utcnow
from xdsi.routing.settings import RoutingSettings, routes_from
from xdsi.tools.synth import StudySpec, write_study

PEERS = {"WSA": object(), "WSB": object()}


def _routes(*tables: dict) -> tuple:  # type: ignore[type-arg]
    return routes_from(list(tables), PEERS)


# -- settings ---------------------------------------------------------------------------------------


def test_routes_parsed_from_toml(tmp_path: Path) -> None:
    cfg = tmp_path / "xdsi.toml"
    cfg.write_text(
        """
[peers.WSA]
host = "127.0.0.1"
port = 11113

[[routes]]
name = "ct"
calling_aet = "CT1"
modality = ["CT", "PT"]
study_description = "re:.*thorax.*"
destinations = ["WSA", "https://pacs.example.org/dicomweb/"]
delay = 30
transfer_syntax = "1.2.840.10008.1.2.1"
priority = "high"

[routing]
retry_initial = 0.5
max_attempts = 5
"""
    )
    s = load_settings(cfg, env={})
    (r,) = s.routes
    assert r.name == "ct" and r.destinations == ("WSA", "https://pacs.example.org/dicomweb")
    assert {c.key for c in r.conditions} == {"calling_aet", "modality", "study_description"}
    assert (r.delay, r.transfer_syntax, r.priority) == (30, "1.2.840.10008.1.2.1", 2)
    assert s.routing.retry_initial == 0.5 and s.routing.max_attempts == 5
    # partitions inherit the routes (a called_aet condition tells them apart)
    assert load_settings(env={}).routes == ()


@pytest.mark.parametrize(
    "table, message",
    [
        ({"destinations": ["NOPE"]}, "no [peers.NOPE]"),
        ({"destinations": ["WSA"], "modality": "re:(CT"}, "not a valid regular expression"),
        ({"destinations": ["WSA"], "colour": "red"}, "unknown key"),
        ({"destinations": ["WSA"], "priority": "urgent"}, "priority must be one of"),
        ({"destinations": ["WSA"], "transfer_syntax": "1.2.3"}, "not a transfer syntax"),
        ({"destinations": ["WSA"], "delay": -1}, "delay must be"),
        ({"modality": "CT"}, "needs destinations"),
        ({"destinations": []}, "non-empty list"),
    ],
)
def test_bad_routes_refused_with_the_setting_named(table: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        _routes(table)


def test_duplicate_route_names_refused() -> None:
    with pytest.raises(ConfigError, match="unique"):
        _routes({"name": "a", "destinations": "WSA"}, {"name": "a", "destinations": "WSB"})


def test_patterns_glob_case_insensitive_and_regex_whole_value() -> None:
    (r,) = _routes({"destinations": "WSA", "calling_aet": ["ct?", "re:MR[0-9]+"], "study_description": "*chest*"})
    cond = {c.key: c for c in r.conditions}
    assert cond["calling_aet"].matches("CT1") and cond["calling_aet"].matches("mr12")
    assert not cond["calling_aet"].matches("CT12") and not cond["calling_aet"].matches("XMR1")
    assert cond["study_description"].matches("CT Chest w/o") and not cond["study_description"].matches("HEAD")
    assert not cond["calling_aet"].matches(None)  # an unknown value never matches


# -- the queue on an index -----------------------------------------------------------------------------


@pytest.fixture
def routed(tmp_path: Path, index_url: str) -> Iterator[Archive]:
    routes = _routes(
        {"name": "ct-a", "calling_aet": "CT1", "modality": "CT", "destinations": ["WSA"]},
        {"name": "all-b", "calling_aet": ["CT1", "MR1"], "destinations": ["WSB", "WSA"], "priority": "low"},
    )
    settings = make_settings(tmp_path, index_url, duplicate_policy="replace")
    settings = replace(settings, routes=routes, routing=RoutingSettings(retry_initial=60, retry_max=600, batch=3, max_attempts=3))
    a = Archive.open(settings)
    try:
        yield a
    finally:
        a.close()


def _store(archive: Archive, tmp_path: Path, aet: str, n: int, **spec: str) -> list[Path]:
    files = write_study(tmp_path / f"in-{aet}-{n}-{len(list(tmp_path.iterdir()))}", StudySpec(**spec), per_series=n)
    for f in files:
        assert archive.store.store_file(f, source_ae=aet).ok
    return files


def _rows(archive: Archive) -> list[RouteForward]:
    with archive.index.read_session() as s:
        return list(s.scalars(select(RouteForward).order_by(RouteForward.pk)))


def test_rules_evaluated_into_one_row_per_destination_and_instance(routed: Archive, tmp_path: Path) -> None:
    q = RouteQueue(routed, routed.settings.routes, routed.settings.routing)
    ct = _store(routed, tmp_path, "CT1", 3)
    mr = _store(routed, tmp_path, "MR1", 2, modality="MR", patient_id="P2")
    _store(routed, tmp_path, "OTHER", 2, patient_id="P3")  # matches no route
    assert q.evaluate_new() == 7
    rows = _rows(routed)
    got = sorted((r.destination, r.sop_instance_uid, r.route) for r in rows)
    ct_uids = [dcmread(f).SOPInstanceUID for f in ct]
    mr_uids = [dcmread(f).SOPInstanceUID for f in mr]
    # CT1's CT: WSA by "ct-a" (the higher priority route decides its options), WSB by "all-b"; MR1's MR: both by "all-b"
    want = sorted([("WSA", u, "ct-a") for u in ct_uids] + [("WSB", u, "all-b") for u in ct_uids]
                  + [("WSA", u, "all-b") for u in mr_uids] + [("WSB", u, "all-b") for u in mr_uids])
    assert got == want
    assert all(r.state == PENDING and r.attempts == 0 and len(r.sha256) == 64 for r in rows)
    # evaluating again (a restart re-reading from an old cursor) adds nothing
    assert q.evaluate_new() == 0
    from xdsi.routing.models import RouteCursor

    with routed.index.session() as s:
        s.get(RouteCursor, "instances").instance_pk = 0
    restarted = RouteQueue(routed, routed.settings.routes, routed.settings.routing)  # a new process, nothing remembered
    assert restarted.evaluate_new() == 7
    assert len(_rows(routed)) == len(want)


def test_without_routes_the_cursor_follows_the_newest_instance(routed: Archive, tmp_path: Path) -> None:
    """No routes: nothing is queued and the cursor moves to the newest instance, so routes configured later
    apply from then on, not to what arrived while there were none."""
    from sqlalchemy import func

    from xdsi.index.models import Instance
    from xdsi.routing.models import RouteCursor

    q = RouteQueue(routed, (), routed.settings.routing)
    _store(routed, tmp_path, "CT1", 3)
    q.evaluate_new()
    with routed.index.read_session() as s:
        newest = s.scalar(select(func.max(Instance.pk)))
        assert s.get(RouteCursor, "instances").instance_pk == newest
    assert _rows(routed) == []
    with_routes = RouteQueue(routed, routed.settings.routes, routed.settings.routing)
    assert with_routes.evaluate_new() == 0 and _rows(routed) == []
    _store(routed, tmp_path, "CT1", 1)
    assert with_routes.evaluate_new() == 1 and len(_rows(routed)) == 2  # WSA by "ct-a", WSB by "all-b"


def test_replaced_instance_is_queued_again_same_bytes_are_not(routed: Archive, tmp_path: Path) -> None:
    q = RouteQueue(routed, routed.settings.routes, routed.settings.routing)
    routed.store.listeners.append(q.stored)  # as the routing service registers it
    (f,) = _store(routed, tmp_path, "CT1", 1)
    q.evaluate_new()
    with routed.index.session() as s:
        for r in s.scalars(select(RouteForward)):
            r.state, r.sent_at = SENT, utcnow()
    assert routed.store.store_file(f, source_ae="CT1").ok  # same bytes again (replace policy): a new index row...
    q.evaluate_new()
    assert {r.state for r in _rows(routed)} == {SENT}  # ...but nothing to send again
    ds = dcmread(f)
    ds.SeriesDescription = "corrected"
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed, enforce_file_format=True)
    assert routed.store.store_file(changed, source_ae="CT1").ok
    q.evaluate_new()
    rows = _rows(routed)
    assert len(rows) == 2 and {r.state for r in rows} == {PENDING}
    assert all(r.attempts == 0 for r in rows)


def test_claim_settle_backoff_and_give_up(routed: Archive, tmp_path: Path) -> None:
    q = RouteQueue(routed, routed.settings.routes, routed.settings.routing)
    _store(routed, tmp_path, "CT1", 4)
    q.evaluate_new()
    claims = q.claim()
    assert len(claims) == 3  # batch = 3
    assert len({(c.destination, c.transfer_syntax) for c in claims}) == 1
    assert claims[0].destination == "WSA"  # the "ct-a" rows (medium) before "all-b" (low)
    first = claims[0]
    assert q.settle(first, True)
    assert q.settle(claims[1], False, "C-STORE status 0xA700")
    q.release(claims[2:])
    by_pk = {r.pk: r for r in _rows(routed)}
    assert by_pk[first.pk].state == SENT
    failed = by_pk[claims[1].pk]
    assert failed.state == PENDING and failed.attempts == 1 and failed.last_error == "C-STORE status 0xA700"
    assert failed.next_attempt_at.replace(tzinfo=None) > utcnow().replace(tzinfo=None) + timedelta(seconds=50)
    assert by_pk[claims[2].pk].state == PENDING and by_pk[claims[2].pk].attempts == 0
    # the failed row is not due now; at its time it is, until max_attempts (3)
    assert claims[1].pk not in {c.pk for c in q.claim()}
    later = utcnow()
    for _ in range(2):
        later += timedelta(hours=1)
        again = [c for c in q.claim(now=later) if c.pk == claims[1].pk]
        assert again
        q.settle(again[0], False, "refused")
        q.release([c for c in q.claim(now=later)])  # hand the others back
    assert {r.pk: r for r in _rows(routed)}[claims[1].pk].state == GAVE_UP
    # a settle for a row that is no longer ours is ignored
    assert not q.settle(first, False, "late")
    summary = {d["destination"]: d for d in q.summary()}
    assert summary["WSA"]["states"][SENT] == 1 and summary["WSA"]["states"][GAVE_UP] == 1


def test_stability_window_holds_rows_until_the_study_is_quiet(routed: Archive, tmp_path: Path) -> None:
    routes = _routes({"name": "late", "destinations": "WSA", "delay": 3600})
    q = RouteQueue(routed, routes, routed.settings.routing)
    _store(routed, tmp_path, "X", 2)
    q.evaluate_new()
    assert q.claim() == []
    rows = _rows(routed)
    assert all(r.state == PENDING and r.attempts == 0 for r in rows)
    assert all(r.next_attempt_at.replace(tzinfo=None) > utcnow().replace(tzinfo=None) + timedelta(minutes=59) for r in rows)
    assert len(q.claim(now=utcnow() + timedelta(hours=2))) == 2


def test_manual_queue_resends_sent_rows_but_not_one_in_flight(routed: Archive, tmp_path: Path) -> None:
    q = RouteQueue(routed, (), routed.settings.routing)
    files = _store(routed, tmp_path, "CT1", 2)
    study = dcmread(files[0]).StudyInstanceUID
    pks = q.queue_study(study, "WSA")
    assert len(pks) == 2
    claims = q.claim(pks=pks)
    q.settle(claims[0], True)  # claims[1] stays in flight (SENDING, lease valid)
    again = q.queue_study(study, "WSA")
    assert again == [claims[0].pk]
    states = {r.pk: r.state for r in _rows(routed)}
    assert states == {claims[0].pk: PENDING, claims[1].pk: SENDING}
    assert q.queue_study("1.2.3.4.5.6", "WSA") == []


def test_order_attributes_come_from_the_registered_lookup(routed: Archive, tmp_path: Path) -> None:
    """The HL7 extension point: a route on patient_location matches only what the order store says."""
    routes = _routes({"name": "icu", "patient_location": "ICU*", "destinations": "WSA"})
    q = RouteQueue(routed, routes, routed.settings.routing)
    asked: list[tuple[str, str]] = []

    def lookup(session, accession: str, patient_id: str):  # type: ignore[no-untyped-def]
        asked.append((accession, patient_id))
        assert session is not None
        return {"patient_location": "ICU-3", "ordering_physician": "HOUSE^G"} if accession == "ACC-ICU" else None

    conditions.register_order_lookup(lookup)
    try:
        icu = _store(routed, tmp_path, "CT1", 2, accession="ACC-ICU", patient_id="P9")
        _store(routed, tmp_path, "CT1", 1, accession="ACC-WARD", patient_id="P8")
        q.evaluate_new()
    finally:
        conditions.register_order_lookup(None)
    assert sorted(r.sop_instance_uid for r in _rows(routed)) == sorted(dcmread(f).SOPInstanceUID for f in icu)
    assert set(asked) == {("ACC-ICU", "P9"), ("ACC-WARD", "P8")} and len(asked) == 2  # once per order, not per instance
    # with no provider, an order condition matches nothing (never a guess)
    _store(routed, tmp_path, "CT1", 1, accession="ACC-ICU", patient_id="P9")
    before = len(_rows(routed))
    q.evaluate_new()
    assert len(_rows(routed)) == before


def test_department_read_from_the_stored_header_only_when_a_route_asks(routed: Archive, tmp_path: Path) -> None:
    routes = _routes({"name": "cardio", "department": "cardio*", "destinations": "WSA"})
    q = RouteQueue(routed, routes, routed.settings.routing)
    files = write_study(tmp_path / "dept", StudySpec(patient_id="P7"), per_series=2)
    ds = dcmread(files[0])
    ds.InstitutionalDepartmentName = "Cardiology"
    ds.save_as(files[0], enforce_file_format=True)
    for f in files:
        assert routed.store.store_file(f, source_ae="X").ok
    q.evaluate_new()
    assert [r.sop_instance_uid for r in _rows(routed)] == [ds.SOPInstanceUID]


def test_example_file_documents_routing_with_the_defaults(tmp_path: Path) -> None:
    """xdsi.example.toml: [routing] holds every key at its default, and its commented [[routes]] parses as written."""
    from xdsi.routing.settings import ROUTE_KEYS, ROUTING_KEYS

    example = Path(__file__).resolve().parents[2] / "xdsi.example.toml"
    text = example.read_text()
    assert load_settings(example, env={}).routing == RoutingSettings()
    assert all(f"\n{k} = " in text for k in ROUTING_KEYS)
    block = text[text.index("# [[routes]]"):text.index("[routing]")]
    uncommented = "\n".join(line[2:] for line in block.splitlines() if line.startswith("# "))
    cfg = tmp_path / "x.toml"
    cfg.write_text(text.replace("[routing]", uncommented + "\n\n[routing]"))
    (route,) = load_settings(cfg, env={}).routes
    assert route.name == "ct-reading-room" and route.destinations == ("WORKSTATION1", "https://pacs.example.org/dicomweb")
    documented = {k for k in ROUTE_KEYS if f"{k} = " in uncommented or k in text[: text.index("[routing]")]}
    assert documented == ROUTE_KEYS


def test_called_aet_is_the_archive_that_stored_the_instance(tmp_path: Path) -> None:
    """A partition is an archive of its own: its queue matches called_aet against the partition's AE title."""
    routes = _routes({"name": "part", "called_aet": "RESEARCH", "destinations": "WSA"})
    settings = replace(make_settings(tmp_path, None), ae_title="RESEARCH", routes=routes)
    a = Archive.open(settings)
    try:
        q = RouteQueue(a, routes, RoutingSettings())
        _store(a, tmp_path, "CT1", 2)
        q.evaluate_new()
        assert len(_rows(a)) == 2
        other = RouteQueue(a, _routes({"name": "main", "called_aet": "XDSI", "destinations": "WSA"}), RoutingSettings())
        from xdsi.routing.models import RouteCursor

        with a.index.session() as s:
            s.get(RouteCursor, "instances").instance_pk = 0
        with a.index.session() as s:
            for r in s.scalars(select(RouteForward)):
                s.delete(r)
        other.evaluate_new()
        assert _rows(a) == []
    finally:
        a.close()


def test_small_windows_reach_every_instance(routed: Archive, tmp_path: Path) -> None:
    """Passes of two instances each get through five (on PostgreSQL the cursor waits for rows to settle,
    and rows already evaluated must not hide the ones after them)."""
    q = RouteQueue(routed, _routes({"name": "all", "destinations": "WSA"}), routed.settings.routing)
    files = _store(routed, tmp_path, "X", 5)
    passes = 0
    while q.evaluate_new(limit=2):
        passes += 1
        assert passes < 10
    assert sorted(r.sop_instance_uid for r in _rows(routed)) == sorted(dcmread(f).SOPInstanceUID for f in files)
    assert q.evaluate_new(limit=2) == 0
