"""``xdsi serve`` sends its audit trail over RFC 5425 with the ``[tls]`` certificate: a real rsyslogd (rsyslog-gnutls)
that requires a client certificate from its CA receives the Application Start; without ``[tls]`` it receives nothing."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.support import rsyslog
from tests.support.audit_schema import check_audit_message
from tests.support.server import XdsiProcess

pytestmark = pytest.mark.skipif(not rsyslog.available(), reason="needs Debian rsyslog + rsyslog-gnutls (scripts/test installs them)")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[rsyslog.Rsyslog]:
    with rsyslog.running(tmp_path_factory.mktemp("arr")) as r:
        yield r


def _starts(repo: rsyslog.Rsyslog, source_id: str) -> list[str]:
    """The inputs (imtcp = TLS, imudp) on which an Application Start of ``source_id`` arrived."""
    out = []
    for line in repo.lines():
        inp, _app, _msgid, msg = line.split(" ", 3)
        xml = msg.lstrip("\ufeff").encode("utf-8")
        if f'AuditSourceID="{source_id}"'.encode() in xml:
            root = check_audit_message(xml)
            if root.find("EventIdentification/EventTypeCode").get("csd-code") == "110120":  # Application Start
                out.append(inp)
    return out


@pytest.mark.parametrize("with_tls", [True, False], ids=["our-certificate", "no-tls-table"])
def test_audit_over_tls_uses_our_certificate(repo: rsyslog.Rsyslog, tmp_path: Path, with_tls: bool) -> None:
    source = f"XDSI-TLS-{with_tls}"
    tls = f'[tls]\ncertificate = "{repo.pki.client_cert}"\nprivate_key = "{repo.pki.client_key}"\nca_certificates = "{repo.pki.ca}"\n'
    cfg = tmp_path / "xdsi.toml"
    cfg.write_text(f'[audit]\nrepositories = ["{repo.tls_url}"]\naudit_source_id = "{source}"\nretry_seconds = 0.2\n' + (tls if with_tls else ""))
    server = XdsiProcess(tmp_path / "data", config=cfg).start()
    try:
        deadline = time.monotonic() + (10 if with_tls else 3)
        while time.monotonic() < deadline and not _starts(repo, source):
            time.sleep(0.1)
    finally:
        server.stop()
    assert _starts(repo, source) == (["imtcp"] if with_tls else []), server.output()


def _queries(repo: rsyslog.Rsyslog, source_id: str) -> list[str]:
    """The Patient IDs queried for in the C-FIND Query messages of ``source_id`` that arrived, in order."""
    out = []
    for line in repo.lines():
        _inp, _app, _msgid, msg = line.split(" ", 3)
        xml = msg.lstrip("\ufeff").encode("utf-8")
        if f'AuditSourceID="{source_id}"'.encode() in xml:
            root = check_audit_message(xml)
            if root.find("EventIdentification/EventID").get("csd-code") == "110112":
                out += [o.get("ParticipantObjectID") for o in root.findall("ParticipantObjectIdentification") if o.get("ParticipantObjectTypeCodeRole") == "1"]
    return out


def test_audit_burst_survives_repository_outage_and_xdsi_restart(repo: rsyslog.Rsyslog, tmp_path: Path) -> None:
    """200 C-FINDs audited while the repository is down, `xdsi serve` stopped and started again, then the
    repository comes back: every Query arrives once, in order (the spool is on disk, the cursor moves on ACK)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind
    from pydicom.dataset import Dataset

    source = "XDSI-RESTART"
    tls = f'[tls]\ncertificate = "{repo.pki.client_cert}"\nprivate_key = "{repo.pki.client_key}"\nca_certificates = "{repo.pki.ca}"\n'
    cfg = tmp_path / "xdsi.toml"
    cfg.write_text(f'[audit]\nrepositories = ["{repo.tls_url}"]\naudit_source_id = "{source}"\nretry_seconds = 0.2\nretry_max_seconds = 0.5\n' + tls)
    repo.stop()
    try:
        server = XdsiProcess(tmp_path / "data", config=cfg, env={"TCP_NODELAY": "1"}).start()
        try:
            ae = AE(ae_title="FINDSCU")
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
            assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title="XDSI")
            assert assoc.is_established
            for i in range(200):  # each query names its own Patient ID, so order and duplicates show
                ident = Dataset()
                ident.QueryRetrieveLevel = "STUDY"
                ident.PatientID = f"F{i:03d}"
                ident.StudyInstanceUID = ""
                for status, _ in assoc.send_c_find(ident, StudyRootQueryRetrieveInformationModelFind):
                    assert status is not None
            assoc.release()
        finally:
            assert server.stop() == 0, server.output()
        assert _queries(repo, source) == []
    finally:
        repo.start()
    server = XdsiProcess(tmp_path / "data", config=cfg).start()  # the same data dir: the same spool
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(_queries(repo, source)) < 200:
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        assert server.stop() == 0, server.output()
    assert _queries(repo, source) == [f"F{i:03d}" for i in range(200)]
