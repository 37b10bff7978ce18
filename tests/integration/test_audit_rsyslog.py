"""The audit trail against a real Audit Record Repository: rsyslogd (rsyslog-gnutls) on loopback.

Messages go over mutually authenticated TLS (RFC 5425) and UDP (RFC 5426); rsyslog writes
what it receives to a file, where each message must be a valid PS3.15 audit message.
The repository is down while a burst of 200 events is recorded and started again: all 200
arrive, in order, none twice; the same when xdsi itself restarts in between.  Stopping it
while messages stream over a live connection is measured by bench/audit_outage.py rather
than tested: what then arrives depends on the repository too (see xdsi/audit/sender.py).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import pytest

from tests.support import rsyslog
from tests.support.audit_schema import check_audit_message
from xdsi import cli
from xdsi.audit import messages as m
from xdsi.audit.trail import AuditTrail
from xdsi.config import AuditSettings, Settings

pytestmark = pytest.mark.skipif(not rsyslog.available(), reason="needs Debian rsyslog + rsyslog-gnutls (scripts/test installs them)")

US = m.Participant("XDSI", False, network_access_point="127.0.0.1")
PEER = m.Participant("MODALITY", True, network_access_point="127.0.0.2")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[rsyslog.Rsyslog]:
    with rsyslog.running(tmp_path_factory.mktemp("arr")) as r:
        yield r


def _settings(tmp: Path, repositories: tuple[str, ...], source_id: str = "XDSI-TEST") -> Settings:
    audit = AuditSettings(repositories=repositories, audit_source_id=source_id, enterprise_site_id="SITE", retry_seconds=0.2, retry_max_seconds=1.0)
    return replace(Settings(data_dir=tmp), audit=audit)


def _received(repo: rsyslog.Rsyslog) -> list[tuple[str, str, str, bytes]]:
    """(input, app-name, msgid, XML) for every message rsyslog wrote."""
    out = []
    for line in repo.lines():
        inp, app, msgid, msg = line.split(" ", 3)
        out.append((inp, app, msgid, msg.lstrip("\ufeff").encode("utf-8")))
    return out


def _alert_ids(repo: rsyslog.Rsyslog, prefix: str, inp: str = "imtcp") -> list[str]:
    ids = []
    for i, _, _, xml in _received(repo):
        if i != inp:
            continue
        obj = check_audit_message(xml).find("ParticipantObjectIdentification")
        if obj is not None and obj.get("ParticipantObjectID", "").startswith(prefix):
            ids.append(obj.get("ParticipantObjectID"))
    return ids


def _wait(pred, seconds: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)


def _alert(trail: AuditTrail, subject: str) -> None:
    assert trail.record(m.security_alert(trail.source, US, "node_authentication", subject, "TLS handshake refused: unknown CA"))


def test_events_arrive_over_tls_and_udp_valid(repo: rsyslog.Rsyslog, tmp_path: Path) -> None:
    trail = AuditTrail(_settings(tmp_path, (repo.tls_url, repo.udp_url), "XDSI-EVENTS"), repo.pki.client_context())
    trail.start()
    try:
        study = "1.2.826.0.1.3680043.8.498.77"
        assert trail.record(m.application_activity(trail.source, US, started=True))
        assert trail.record(m.instances_transferred(trail.source, PEER, US, study, "PID-77", [("1.2.840.10008.5.1.4.1.1.2", 2)]))
        assert trail.record(m.query(trail.source, PEER, US, "1.2.840.10008.5.1.4.1.2.2.1", b"query-77", "1.2.840.10008.1.2.1"))
        _alert(trail, "first-77")

        def mine() -> list[tuple[str, str, str, bytes]]:
            return [r for r in _received(repo) if b'AuditSourceID="XDSI-EVENTS"' in r[3]]

        _wait(lambda: len(mine()) >= 8)
        got = mine()
        assert sorted(i for i, *_ in got) == ["imtcp"] * 4 + ["imudp"] * 4
        for inp in ("imtcp", "imudp"):
            events = []
            for i, app, msgid, xml in got:
                if i != inp:
                    continue
                assert (app, msgid) == ("xdsi", "IHE+RFC-3881")
                root = check_audit_message(xml)
                assert root.find("AuditSourceIdentification").attrib == {"AuditSourceID": "XDSI-EVENTS", "AuditEnterpriseSiteID": "SITE"}
                events.append(root.find("EventIdentification/EventID").get("csd-code"))
                if events[-1] == "110104":
                    ids = {o.get("ParticipantObjectTypeCodeRole"): o.get("ParticipantObjectID") for o in root.findall("ParticipantObjectIdentification")}
                    assert ids == {"3": study, "1": "PID-77"}
                    assert {a.get("UserID"): a.get("NetworkAccessPointID") for a in root.findall("ActiveParticipant")} == {"MODALITY": "127.0.0.2", "XDSI": "127.0.0.1"}
            assert events == ["110100", "110104", "110112", "110113"], inp
    finally:
        trail.stop()


def test_burst_while_repository_is_down_arrives_once_in_order(repo: rsyslog.Rsyslog, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = _settings(tmp_path, (repo.tls_url,))
    trail = AuditTrail(settings, repo.pki.client_context())
    trail.start()
    try:
        _alert(trail, "warm-0")
        _wait(lambda: _alert_ids(repo, "warm-") == ["warm-0"])
        assert _alert_ids(repo, "warm-") == ["warm-0"]  # connected, and the connection is then taken away
        repo.stop()
        started = time.monotonic()
        for i in range(200):
            _alert(trail, f"burst-{i:03d}")
        recorded = time.monotonic() - started
        time.sleep(1.0)
        st = trail.status()
        assert st.depth == {repo.tls_url: 200}, "nothing can have been taken while the repository is down"
        assert st.oldest_pending is not None
        # `xdsi status` shows the depth and the oldest pending message
        cfg = tmp_path / "x.toml"
        cfg.write_text(f'[server]\ndata_dir = "{tmp_path}"\n[audit]\nrepositories = ["{repo.tls_url}"]\n')
        assert cli.main(["status", "--config", str(cfg)]) == 0
        out = capsys.readouterr().out
        assert f"audit:      200 message(s) pending, oldest pending {st.oldest_pending:%Y-%m-%dT%H:%M:%SZ}" in out
        assert f"{repo.tls_url}: 200 pending" in out
        repo.start()
        want = [f"burst-{i:03d}" for i in range(200)]
        _wait(lambda: len(_alert_ids(repo, "burst-")) >= 200)
        time.sleep(0.5)  # and nothing more comes
        assert _alert_ids(repo, "burst-") == want
        assert trail.status().depth == {repo.tls_url: 0}
        assert recorded < 5.0, f"recording 200 events took {recorded:.1f}s: record() must not wait on the network"
    finally:
        trail.stop()
        if repo.proc is None:
            repo.start()


def test_spooled_messages_survive_an_xdsi_restart(repo: rsyslog.Rsyslog, tmp_path: Path) -> None:
    settings = _settings(tmp_path, (repo.tls_url,))
    repo.stop()
    try:
        first = AuditTrail(settings, repo.pki.client_context())
        first.start()
        for i in range(100):
            _alert(first, f"restart-{i:03d}")
        first.stop(drain_seconds=0)  # xdsi stops with all 100 undelivered
        repo.start()
        second = AuditTrail(settings, repo.pki.client_context())
        assert second.status().depth == {repo.tls_url: 100}
        second.start()
        try:
            _wait(lambda: len(_alert_ids(repo, "restart-")) >= 100)
            time.sleep(0.5)
            assert _alert_ids(repo, "restart-") == [f"restart-{i:03d}" for i in range(100)]
        finally:
            second.stop()
    finally:
        if repo.proc is None:
            repo.start()


def test_untrusted_repository_is_not_sent_to(repo: rsyslog.Rsyslog, tmp_path: Path) -> None:
    """A repository whose certificate we cannot verify gets nothing; the message waits in the spool."""
    import ssl

    stranger = ssl.create_default_context()  # system CAs: our test CA is not among them
    stranger.load_cert_chain(str(repo.pki.client_cert), str(repo.pki.client_key))
    trail = AuditTrail(_settings(tmp_path, (repo.tls_url,)), stranger)
    trail.start()
    try:
        _alert(trail, "untrusted-0")
        time.sleep(1.5)
        assert trail.status().depth == {repo.tls_url: 1}
        assert _alert_ids(repo, "untrusted-") == []
    finally:
        trail.stop(drain_seconds=0)


def test_xdsi_serve_audits_start_store_find_stop(repo: rsyslog.Rsyslog, tmp_path: Path) -> None:
    """`xdsi serve` with [audit] on UDP: dcmtk storescu and findscu, STOW-RS, then SIGTERM; each event arrives valid."""
    import io
    import subprocess

    import requests
    from pydicom import dcmread

    from tests.support.objects import secondary_capture
    from tests.support.server import XdsiProcess

    data, _sop = secondary_capture(patient_id="AUDIT-PID-1")
    f = tmp_path / "sc.dcm"
    f.write_bytes(data)
    study = str(dcmread(f).StudyInstanceUID)
    cfg = tmp_path / "xdsi.toml"
    cfg.write_text(f'[audit]\nrepositories = ["{repo.udp_url}"]\naudit_source_id = "XDSI-SERVE"\n')
    server = XdsiProcess(tmp_path / "data", config=cfg, env={"TCP_NODELAY": "1"}).start()
    try:
        for _ in range(2):  # two associations with the same study: two Instances Transferred messages
            subprocess.run(["/usr/bin/storescu", "-aet", "STORESCU", "-aec", "XDSI", "127.0.0.1", str(server.dicom_port), str(f)], check=True, capture_output=True)
        subprocess.run(["/usr/bin/findscu", "-S", "-aet", "FINDSCU", "-aec", "XDSI", "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID=AUDIT-PID-1",
                        "-k", "StudyInstanceUID", "127.0.0.1", str(server.dicom_port)], check=True, capture_output=True)
        stow_data, _ = secondary_capture(patient_id="AUDIT-PID-2")
        stow_study = str(dcmread(io.BytesIO(stow_data)).StudyInstanceUID)
        boundary = "audit-boundary"
        body = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + stow_data + f"\r\n--{boundary}--\r\n".encode()
        r = requests.post(f"http://127.0.0.1:{server.http_port}/dicomweb/studies", data=body, timeout=30,
                          headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}', "Accept": "application/dicom+json"})
        assert r.status_code == 200, r.text
    finally:
        assert server.stop() == 0, server.output()

    def mine() -> list:  # type: ignore[type-arg]
        return [check_audit_message(xml) for i, _, _, xml in _received(repo) if b'AuditSourceID="XDSI-SERVE"' in xml]

    _wait(lambda: len(mine()) >= 6, 10)
    got = mine()
    codes = [r.find("EventIdentification/EventID").get("csd-code") for r in got]
    assert codes == ["110100", "110104", "110104", "110112", "110104", "110100"], server.output()
    stow = {o.get("ParticipantObjectTypeCodeRole"): o.get("ParticipantObjectID") for o in got[4].findall("ParticipantObjectIdentification")}
    assert stow == {"3": stow_study, "1": "AUDIT-PID-2"}
    assert [(a.get("UserID"), a.get("UserIsRequestor")) for a in got[4].findall("ActiveParticipant")] == [("127.0.0.1", "true"), ("XDSI", "false")]
    assert [r.find("EventIdentification/EventTypeCode").get("csd-code") for r in (got[0], got[-1])] == ["110120", "110121"]
    for stored in got[1:3]:
        objs = {o.get("ParticipantObjectTypeCodeRole"): o for o in stored.findall("ParticipantObjectIdentification")}
        assert objs["3"].get("ParticipantObjectID") == study
        assert objs["3"].find("ParticipantObjectDescription/SOPClass").attrib == {"UID": "1.2.840.10008.5.1.4.1.1.7", "NumberOfInstances": "1"}
        assert objs["1"].get("ParticipantObjectID") == "AUDIT-PID-1"
        parts = {a.get("UserID"): (a.get("UserIsRequestor"), a.get("NetworkAccessPointID"), a.find("RoleIDCode").get("csd-code")) for a in stored.findall("ActiveParticipant")}
        assert parts == {"STORESCU": ("true", "127.0.0.1", "110153"), "XDSI": ("false", "127.0.0.1", "110152")}
    query = got[3]
    assert {a.get("UserID") for a in query.findall("ActiveParticipant")} == {"FINDSCU", "XDSI"}
    objs = query.findall("ParticipantObjectIdentification")
    assert objs[0].get("ParticipantObjectID") == "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root FIND
    import base64

    from pydicom.filereader import read_dataset

    syntax = base64.b64decode(objs[0].find("ParticipantObjectDetail").get("value")).decode()
    assert syntax in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")
    raw = base64.b64decode(objs[0].find("ParticipantObjectQuery").text)
    ident = read_dataset(io.BytesIO(raw), is_implicit_VR=syntax == "1.2.840.10008.1.2", is_little_endian=True)
    assert ident.PatientID == "AUDIT-PID-1"
    assert objs[1].get("ParticipantObjectID") == "AUDIT-PID-1"
