"""Audit trail pieces without a network: PS3.15 messages, RFC 5424 frames, the durable spool, [audit] settings."""

from __future__ import annotations

import base64
import datetime as dt
import re
from pathlib import Path

import pytest

from tests.support.audit_schema import AuditSchemaError, check_audit_message
from xdsi.audit import messages as m
from xdsi.audit.spool import AuditSpool, SpoolFull
from xdsi.audit.syslog import BOM, frame, octet_counted
from xdsi.config import ConfigError, load_settings

SOURCE = m.AuditSource("XDSI", "SITE-1")
US = m.Participant("XDSI", False, network_access_point="192.0.2.10")
PEER = m.Participant("MODALITY", True, network_access_point="192.0.2.20")
STUDY = "1.2.826.0.1.3680043.8.498.1"
CT = "1.2.840.10008.5.1.4.1.1.2"


def _events() -> dict[str, m.AuditEvent]:
    return {
        "start": m.application_activity(SOURCE, US, started=True),
        "stop": m.application_activity(SOURCE, US, started=False),
        "stored": m.instances_transferred(SOURCE, PEER, US, STUDY, "PID-7", [(CT, 3)]),
        "query": m.query(SOURCE, PEER, US, "1.2.840.10008.5.1.4.1.2.2.1", b"\x08\x00\x52\x00", "1.2.840.10008.1.2"),
        "alert": m.security_alert(SOURCE, US, "node_authentication", "192.0.2.99", "TLS handshake failed: unknown CA"),
    }


@pytest.mark.parametrize("name", ["start", "stop", "stored", "query", "alert"])
def test_each_event_is_a_valid_ps315_message(name: str) -> None:
    root = check_audit_message(m.build(_events()[name]))
    ev = root.find("EventIdentification")
    assert ev is not None
    assert re.search(r"(Z|\+00:00)$", ev.get("EventDateTime", "")), "timestamps are UTC with an offset"


def test_instances_transferred_names_patient_study_and_peers() -> None:
    root = check_audit_message(m.build(_events()["stored"]))
    assert root.find("EventIdentification/EventID").get("csd-code") == "110104"
    assert root.find("EventIdentification").get("EventActionCode") == "C"
    roles = {ap.get("UserID"): ap.find("RoleIDCode").get("csd-code") for ap in root.findall("ActiveParticipant")}
    assert roles == {"MODALITY": "110153", "XDSI": "110152"}
    requestor = [ap.get("UserID") for ap in root.findall("ActiveParticipant") if ap.get("UserIsRequestor") == "true"]
    assert requestor == ["MODALITY"]
    addr = {ap.get("UserID"): (ap.get("NetworkAccessPointID"), ap.get("NetworkAccessPointTypeCode")) for ap in root.findall("ActiveParticipant")}
    assert addr["MODALITY"] == ("192.0.2.20", "2")
    objs = {o.get("ParticipantObjectTypeCodeRole"): o for o in root.findall("ParticipantObjectIdentification")}
    assert objs["3"].get("ParticipantObjectID") == STUDY
    assert objs["3"].find("ParticipantObjectDescription/SOPClass").attrib == {"UID": CT, "NumberOfInstances": "3"}
    assert objs["1"].get("ParticipantObjectID") == "PID-7"
    assert root.find("AuditSourceIdentification").attrib == {"AuditSourceID": "XDSI", "AuditEnterpriseSiteID": "SITE-1"}


def test_query_carries_the_query_as_received() -> None:
    root = check_audit_message(m.build(_events()["query"]))
    po = root.find("ParticipantObjectIdentification")
    assert base64.b64decode(po.find("ParticipantObjectQuery").text) == b"\x08\x00\x52\x00"
    assert base64.b64decode(po.find("ParticipantObjectDetail").get("value")) == b"1.2.840.10008.1.2"
    assert po.get("ParticipantObjectTypeCodeRole") == "24"


def test_security_alert_says_what_and_why() -> None:
    root = check_audit_message(m.build(_events()["alert"]))
    assert root.find("EventIdentification/EventTypeCode").get("csd-code") == "110126"
    assert root.find("EventIdentification/EventOutcomeDescription").text == "TLS handshake failed: unknown CA"
    detail = root.find("ParticipantObjectIdentification/ParticipantObjectDetail")
    assert (detail.get("type"), base64.b64decode(detail.get("value"))) == ("Alert Description", b"TLS handshake failed: unknown CA")
    assert root.find("ParticipantObjectIdentification").get("ParticipantObjectID") == "192.0.2.99"


def test_builder_refuses_what_the_schema_refuses() -> None:
    ok = _events()["stored"]
    from dataclasses import replace

    with pytest.raises(ValueError, match="EventActionCode"):
        m.build(replace(ok, action="X"))
    with pytest.raises(ValueError, match="EventOutcomeIndicator"):
        m.build(replace(ok, outcome="1"))
    with pytest.raises(ValueError, match="ActiveParticipant"):
        m.build(replace(ok, participants=[]))
    with pytest.raises(ValueError, match="timezone"):
        m.build(replace(ok, at=dt.datetime(2026, 1, 1)))
    with pytest.raises(ValueError, match="unknown security alert"):
        m.security_alert(SOURCE, US, "application_start", "x", "y")


def _flattened(xml: bytes) -> bytes:
    from lxml import etree

    root = etree.fromstring(xml)
    for desc in root.iter("ParticipantObjectDescription"):
        parent = desc.getparent()
        parent.remove(desc)
        parent.extend(list(desc))
    return etree.tostring(root)


def test_the_checker_can_fail() -> None:
    """The structural check is not a rubber stamp: order, missing attributes and bad codes are caught."""
    from lxml import etree

    good = m.build(_events()["stored"])
    check_audit_message(good)
    reordered = etree.fromstring(good)
    reordered.append(reordered.find("AuditSourceIdentification"))  # after the participant objects: out of order
    for bad in (
        etree.tostring(reordered),
        good.replace(b'EventOutcomeIndicator="0"', b'EventOutcomeIndicator="3"'),
        good.replace(b' UserIsRequestor="true"', b""),
        good.replace(b'csd-code="110104"', b'code="110104"'),
        good.replace(b'EventDateTime="', b'EventDateTime="x'),
        re.sub(rb'(EventDateTime="[^"]*?)(\+00:00|Z)"', rb'\1"', good),  # a local time without its zone
        good.replace(b"<ParticipantObjectName/>", b"").replace(b"<ParticipantObjectName></ParticipantObjectName>", b""),  # neither name nor query (CP-2399)
        _flattened(good),  # SOPClass beside, not inside, ParticipantObjectDescription: the shape we once wrote
    ):
        assert bad != good
        with pytest.raises(AuditSchemaError):
            check_audit_message(bad)


def test_rfc5424_frame() -> None:
    at = dt.datetime(2026, 11, 30, 5, 1, 2, 345678, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    body = m.build(_events()["start"])
    f = frame(body, at=at, hostname="node.example", procid="42")
    assert f.startswith(b"<85>1 2026-11-30T04:01:02.345678Z node.example xdsi 42 IHE+RFC-3881 - " + BOM)
    assert f.endswith(body) and b"\n" not in f
    assert octet_counted(b"abc") == b"3 abc"
    assert octet_counted(f).split(b" ", 1) == [str(len(f)).encode(), f]
    # a header field with a space (not PRINTUSASCII) becomes the NILVALUE instead of breaking the frame
    assert frame(b"x", at=at, hostname="bad host", procid="1").split(b" ")[2] == b"-"


@pytest.fixture()
def spool_file(tmp_path: Path) -> Path:
    return tmp_path / "spool.sqlite"


def test_spool_order_cursor_per_repository_and_restart(spool_file: Path) -> None:
    s = AuditSpool(spool_file, ["tls://a:6514", "udp://b:514"])
    seqs = [s.put(f"m{i}".encode()) for i in range(5)]
    assert seqs == sorted(seqs)
    assert [b for _, b in s.pending("tls://a:6514")] == [b"m0", b"m1", b"m2", b"m3", b"m4"]
    s.delivered("tls://a:6514", seqs[2])
    assert s.status().depth == {"tls://a:6514": 2, "udp://b:514": 5}
    s.close()
    s = AuditSpool(spool_file, ["tls://a:6514", "udp://b:514"])  # a restart keeps everything not yet taken
    assert [b for _, b in s.pending("tls://a:6514")] == [b"m3", b"m4"]
    assert [b for _, b in s.pending("udp://b:514")][:1] == [b"m0"]
    s.delivered("udp://b:514", seqs[4])
    s.delivered("tls://a:6514", seqs[4])
    st = s.status()
    assert st.depth == {"tls://a:6514": 0, "udp://b:514": 0} and st.oldest_pending is None
    s.close()


def test_spool_is_bounded_and_counts_refusals(spool_file: Path) -> None:
    s = AuditSpool(spool_file, ["tls://a:6514"], max_messages=3)
    first = s.put(b"0", at=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc))
    s.put(b"1")
    s.put(b"2")
    with pytest.raises(SpoolFull, match="spool_max_messages"):
        s.put(b"3")
    st = s.status()
    assert st.refused == 1 and st.depth == {"tls://a:6514": 3}
    assert st.oldest_pending == dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    assert [b for _, b in s.pending("tls://a:6514")] == [b"0", b"1", b"2"], "the older evidence is kept"
    s.delivered("tls://a:6514", first)
    s.put(b"3")  # room again once delivered
    assert [b for _, b in s.pending("tls://a:6514")] == [b"1", b"2", b"3"]
    s.close()


def test_audit_settings(tmp_path: Path) -> None:
    cfg = tmp_path / "x.toml"
    cfg.write_text(
        '[audit]\nrepositories = ["tls://arr.example.org:6514", "udp://arr.example.org"]\n'
        'audit_source_id = "XDSI@site"\nenterprise_site_id = "SITE"\nspool_max_messages = 10\nspool_path = "audit.sqlite"\n'
    )
    a = load_settings(cfg, env={}).audit
    assert a.repositories == ("tls://arr.example.org:6514", "udp://arr.example.org")
    assert (a.audit_source_id, a.enterprise_site_id, a.spool_max_messages) == ("XDSI@site", "SITE", 10)
    assert a.spool_path == tmp_path / "audit.sqlite"
    assert load_settings(None, env={}).audit.repositories == ()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('repositories = ["http://arr:80"]', r"\[audit\] repositories: .*tls:// .*udp://"),
        ('repositories = ["tls://arr:99999"]', r"\[audit\] repositories: .*port"),
        ('repositories = ["tls://:6514"]', r"\[audit\] repositories: .*no host"),
        ('repositories = "tls://arr"', r"\[audit\] repositories must be a list"),
        ('repositories = ["udp://a", "udp://a"]', r"twice"),
        ("spool_max_messages = 0", r"\[audit\] spool_max_messages"),
        ('audit_source_type = "0"', r"\[audit\] audit_source_type"),
        ("retry_seconds = -1", r"\[audit\] retry_seconds"),
        ("repository = []", r"unknown key.*\[audit\]"),
    ],
)
def test_audit_settings_errors_name_the_setting(tmp_path: Path, body: str, message: str) -> None:
    cfg = tmp_path / "x.toml"
    cfg.write_text(f"[audit]\n{body}\n")
    with pytest.raises(ConfigError, match=message):
        load_settings(cfg, env={})


def test_alert_limiter_per_key_and_per_kind() -> None:
    """Refusal alerts: per_key per key and interval (the rest counted into the next one), and a budget per kind of
    refusal, so a flood of one kind neither fills the spool nor silences alerts of another kind."""
    from xdsi.audit.ratelimit import AlertLimiter

    lim = AlertLimiter(interval=10.0, burst=5.0, per_key=2)
    key = ("http", "192.0.2.1", 401, None, "/x", "no credentials")
    assert [lim.admit(key) for _ in range(4)] == ["", "", None, None]
    start, sent, quiet = lim._last[key]
    lim._last[key] = (start - 11.0, sent, quiet)  # the interval has passed
    assert lim.admit(key) == " (2 more such refusal(s) not alerted separately)"
    # the http budget (5) is now spent by three distinct keys; the next http key is counted overall
    assert [lim.admit(("http", f"192.0.2.{i}", 401, None, "/x", "no credentials")) for i in (2, 3)] == ["", ""]
    assert lim.admit(("http", "192.0.2.9", 401, None, "/x", "no credentials")) is None
    assert lim.admit(("association", "192.0.2.9", "AE", "XDSI")) == " (1 other refusal(s) not alerted: too many at once)"
