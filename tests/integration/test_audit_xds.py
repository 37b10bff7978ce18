"""The audit trail of XDS-I.b publishing and of our ITI-43 repository, read back from a real Audit Record Repository (rsyslog).

* ``xdsi serve`` in integrated mode: a study received over C-STORE is registered (ITI-42: Export,
  patient = the affinity-domain CX, the submission set), its manifest retrieved over ITI-43 through
  zeep from the official WSDL with one unknown document beside it (an Export for what was returned,
  a failure Export for what was not), then deleted with ``xdsi delete``: the manifest is deprecated
  (ITI-57: Export, action U).
* In-process publisher: ITI-41 (= RAD-68) to the repository double, and the failures: a registry
  that does not know the patient (RegistryError) and one that answers 503 (transport error), outcome 8.

Every message must be valid against the PS3.15 A.5.1 schema.
"""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

import pytest
from lxml import etree

from tests.conftest import make_settings
from tests.support import rsyslog
from tests.support.audit_schema import event, event_types, wait_for_messages
from tests.support.registry import TestRegistry
from tests.support.server import XdsiProcess, c_store
from tests.support.xds import PATIENT_CX, PATIENT_ROWS_TOML, ext_id, find_documents, xds_settings
from xdsi.archive import Archive
from xdsi.audit.trail import AuditTrail
from xdsi.config import AuditSettings, XdsSettings
from xdsi.index.xds_models import DONE
from xdsi.standards import constants as C
from xdsi.tools.synth import StudySpec, write_study
from xdsi.xds.client import RepositoryClient
from xdsi.xds.codes import CodeTable
from xdsi.xds.publisher import Publisher

pytestmark = pytest.mark.skipif(not rsyslog.available(), reason="needs Debian rsyslog + rsyslog-gnutls (scripts/test installs them)")

SUBMISSION_SET_NODE = ("urn:uuid:a54d6aa5-d40d-43f9-88c5-b4633d873bdd", "IHE XDS Metadata")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[rsyslog.Rsyslog]:
    with rsyslog.running(tmp_path_factory.mktemp("arr")) as r:
        yield r


@pytest.fixture
def registry() -> Iterator[TestRegistry]:
    with TestRegistry(CodeTable.load(), {PATIENT_CX}) as reg:
        yield reg


def received(repo: rsyslog.Rsyslog, source: str) -> list[etree._Element]:
    return repo.audit_messages(source)


def wait_for(repo: rsyslog.Rsyslog, source: str, pred: Callable[[etree._Element], bool], count: int, seconds: float = 30.0) -> list[etree._Element]:
    return wait_for_messages(lambda: received(repo, source), pred, count, seconds)


def of_type(code: str) -> Callable[[etree._Element], bool]:
    return lambda r: (code, "IHE Transactions") in event_types(r)


def participants(r: etree._Element) -> list[tuple[str | None, ...]]:
    out = []
    for a in r.findall("ActiveParticipant"):
        role = a.find("RoleIDCode")
        out.append((a.get("UserID"), a.get("AlternativeUserID"), a.get("UserIsRequestor"), role.get("csd-code") if role is not None else None, a.get("NetworkAccessPointID")))
    return out


def objects(r: etree._Element, role: str) -> list[etree._Element]:
    return [o for o in r.findall("ParticipantObjectIdentification") if o.get("ParticipantObjectTypeCodeRole") == role]


def id_type(o: etree._Element) -> tuple[str, str]:
    t = o.find("ParticipantObjectIDTypeCode")
    return t.get("csd-code"), t.get("codeSystemName")


def details(o: etree._Element) -> dict[str, str]:
    return {d.get("type"): base64.b64decode(d.get("value")).decode() for d in o.findall("ParticipantObjectDetail")}


def assert_submission(msg: etree._Element, patient: str, submission_set_uid: str) -> None:
    [p] = objects(msg, "1")
    assert (p.get("ParticipantObjectID"), p.get("ParticipantObjectTypeCode")) == (patient, "1")
    [ss] = objects(msg, "20")
    assert (ss.get("ParticipantObjectID"), ss.get("ParticipantObjectTypeCode"), id_type(ss)) == (submission_set_uid, "2", SUBMISSION_SET_NODE)


# -- xdsi serve, integrated: ITI-42, ITI-43, ITI-57 --------------------------------------------------------------


def test_serve_registers_serves_and_deprecates_audited(tmp_path: Path, repo: rsyslog.Rsyslog, registry: TestRegistry) -> None:
    source = "XDSI-XDS-SERVE"
    spec = StudySpec()
    paths = write_study(tmp_path / "in", spec, series=1, per_series=2)
    cfg = tmp_path / "xdsi.toml"
    cfg.write_text(
        f'[xds]\nmode = "integrated"\nregistry_url = "{registry.registry_url}"\nstability_delay = 1\npoll_interval = 0.3\n'
        "retry_initial = 0.5\nretry_max = 1\ntimeout = 5\n" + PATIENT_ROWS_TOML
        + f'[audit]\nrepositories = ["{repo.udp_url}"]\naudit_source_id = "{source}"\n'
    )
    proc = XdsiProcess(tmp_path / "data", config=cfg, env={"TCP_NODELAY": "1"}).start()
    try:
        assert proc.proc is not None
        pid = str(proc.proc.pid)
        c_store(proc, paths)

        # ITI-42: Export R, us (the Integrated Document Source/Repository) to the registry endpoint
        [reg] = wait_for(repo, source, of_type("ITI-42"), 1)
        assert event(reg) == ("110106", "R", "0")
        assert participants(reg) == [("XDSI", pid, "true", "110153", socket.gethostname()), (registry.registry_url, None, "false", "110152", "127.0.0.1")]
        [ss_uid] = registry.submission_sets
        assert_submission(reg, PATIENT_CX, ss_uid)

        # ITI-43: one Export for the manifest returned, a failure Export for the unknown document
        [doc] = find_documents(registry.registry_url, PATIENT_CX)
        kos_uid = ext_id(doc, C.DE_UNIQUE_ID)
        entry = registry.by_unique_id(kos_uid)
        url = f"http://127.0.0.1:{proc.http_port}/xdsi/DocumentRepository"
        result, got = RepositoryClient(url, timeout=10).retrieve(entry.repository_unique_id, [kos_uid, "1.2.3.4"])
        assert result.status == C.STATUS_PARTIAL_SUCCESS and list(got) == [kos_uid]
        ok, failed = wait_for(repo, source, of_type("ITI-43"), 2)
        assert [event(ok), event(failed)] == [("110106", "R", "0"), ("110106", "R", "4")]
        for msg in (ok, failed):
            assert participants(msg) == [(url, pid, "false", "110153", "127.0.0.1"), ("127.0.0.1", None, "true", "110152", "127.0.0.1")]
        [d] = objects(ok, "3")
        assert (d.get("ParticipantObjectID"), d.get("ParticipantObjectTypeCode")) == (kos_uid, "2")
        assert details(d) == {"Repository Unique ID": entry.repository_unique_id}
        assert [p.get("ParticipantObjectID") for p in objects(ok, "1")] == [PATIENT_CX]  # as registered, not the local PAT001
        [d] = objects(failed, "3")
        assert d.get("ParticipantObjectID") == "1.2.3.4" and objects(failed, "1") == []
        assert "1.2.3.4" in (failed.findtext("EventIdentification/EventOutcomeDescription") or "")

        # ITI-57: the study deleted, its manifest deprecated: Export, action U
        out = subprocess.run([sys.executable, "-m", "xdsi", "delete", "--config", str(cfg), "--data-dir", str(tmp_path / "data"),
                              "--study", spec.study_uid, "--yes"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        [dep] = wait_for(repo, source, of_type("ITI-57"), 1)
        assert event(dep) == ("110106", "U", "0")
        assert participants(dep)[1] == (registry.registry_url, None, "false", "110152", "127.0.0.1")
        [dep_ss] = [u for u in registry.submission_sets if u != ss_uid]
        assert_submission(dep, PATIENT_CX, dep_ss)
        assert registry.by_unique_id(kos_uid).status == C.STATUS_DEPRECATED
    finally:
        proc.stop()


# -- the publisher in-process: ITI-41 (RAD-68) and failures --------------------------------------------------------


def _archive(tmp_path: Path, repo: rsyslog.Rsyslog, source: str, **xds: object) -> Archive:
    mapped = {"patient_ids": xds_settings().patient_ids, "issuer_oids": xds_settings().issuer_oids}
    x = XdsSettings(**{"stability_delay": 0, "retry_initial": 0.2, "retry_max": 1.0, "timeout": 10, **mapped, **xds})  # type: ignore[arg-type]
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'index.sqlite'}", xds=x)
    settings = replace(settings, audit=AuditSettings(repositories=(repo.udp_url,), audit_source_id=source, retry_seconds=0.2, retry_max_seconds=1.0))
    archive = Archive.open(settings)
    archive.audit = AuditTrail(settings)
    archive.audit.start()
    return archive


def _close(archive: Archive) -> None:
    archive.close()
    archive.audit.stop()


def _store(archive: Archive, tmp_path: Path, spec: StudySpec) -> None:
    for p in write_study(tmp_path / "in", spec, series=1, per_series=2):
        assert archive.store.store_file(p).ok


def test_iti41_is_an_export_named_rad68_too(tmp_path: Path, repo: rsyslog.Rsyslog, registry: TestRegistry) -> None:
    source = "XDSI-XDS-ITI41"
    archive = _archive(tmp_path, repo, source, mode="repository", repository_url=registry.repository_url)
    try:
        _store(archive, tmp_path, StudySpec())
        [out] = Publisher(archive).run_once()
        assert out.state == DONE and out.transaction == "ITI-41", out
        [msg] = wait_for(repo, source, of_type("ITI-41"), 1)
        assert event(msg) == ("110106", "R", "0")
        assert event_types(msg) == [("ITI-41", "IHE Transactions"), ("RAD-68", "IHE Transactions")]
        assert participants(msg) == [("XDSI", str(os.getpid()), "true", "110153", socket.gethostname()), (registry.repository_url, None, "false", "110152", "127.0.0.1")]
        [ss_uid] = registry.submission_sets
        assert_submission(msg, PATIENT_CX, ss_uid)
    finally:
        _close(archive)


def test_refused_and_unreachable_registry_are_serious_failures(tmp_path: Path, repo: rsyslog.Rsyslog, registry: TestRegistry) -> None:
    source = "XDSI-XDS-FAIL"
    archive = _archive(tmp_path, repo, source, mode="integrated", registry_url=registry.registry_url)
    try:
        _store(archive, tmp_path, StudySpec())
        pub = Publisher(archive)
        registry.known_patients.clear()  # the affinity domain does not know the patient: XDSUnknownPatientId
        [out] = pub.run_once()
        assert out.state != DONE and "XDSUnknownPatientId" in out.errors, out
        [refused] = wait_for(repo, source, of_type("ITI-42"), 1)
        assert event(refused) == ("110106", "R", "8")
        assert "XDSUnknownPatientId" in (refused.findtext("EventIdentification/EventOutcomeDescription") or "")
        ss_uid = objects(refused, "20")[0].get("ParticipantObjectID")
        assert_submission(refused, PATIENT_CX, ss_uid)
        assert registry.submission_sets == {}  # nothing was registered

        registry.known_patients.add(PATIENT_CX)
        registry.down = True  # HTTP 503
        time.sleep(1.2)  # past the retry delay
        [out] = pub.run_once()
        assert out.state != DONE and out.status == "transport error", out
        _refused, down = wait_for(repo, source, of_type("ITI-42"), 2)
        assert event(down) == ("110106", "R", "8")
        assert "transport error" in (down.findtext("EventIdentification/EventOutcomeDescription") or "")
        assert_submission(down, PATIENT_CX, ss_uid)  # the same submission set, tried again
    finally:
        _close(archive)


def test_publish_command_spools_its_export_for_the_server_to_deliver(tmp_path: Path, repo: rsyslog.Rsyslog, registry: TestRegistry) -> None:
    """``xdsi publish`` records the Export in the durable spool (it starts no sender of its own); ``xdsi serve`` delivers it."""
    source = "XDSI-XDS-CLI"
    spec = StudySpec()
    data = tmp_path / "data"
    cfg = tmp_path / "xdsi.toml"
    cfg.write_text(
        f'[xds]\nmode = "integrated"\nregistry_url = "{registry.registry_url}"\nauto_publish = false\nstability_delay = 3600\ntimeout = 5\n'
        + PATIENT_ROWS_TOML + f'[audit]\nrepositories = ["{repo.udp_url}"]\naudit_source_id = "{source}"\n'
    )

    def xdsi(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "xdsi", *args, "--data-dir", str(data), "--config", str(cfg)], capture_output=True, text=True, timeout=120)

    imp = xdsi("import", "--no-progress", *map(str, write_study(tmp_path / "in", spec, series=1, per_series=1)))
    assert imp.returncode == 0, imp.stderr
    out = xdsi("publish", spec.study_uid)
    assert out.returncode == 0 and "Success" in out.stdout, out.stdout + out.stderr
    status = xdsi("status")
    assert "audit:      1 message(s) pending" in status.stdout, status.stdout  # kept, not sent by the command
    assert received(repo, source) == []
    proc = XdsiProcess(data, config=cfg).start()
    try:
        assert proc.proc is not None
        server_pid = str(proc.proc.pid)
        [msg] = wait_for(repo, source, of_type("ITI-42"), 1)
    finally:
        proc.stop()
    assert event(msg) == ("110106", "R", "0")
    [ss_uid] = registry.submission_sets
    assert_submission(msg, PATIENT_CX, ss_uid)
    user, pid, requestor, role, _nap = participants(msg)[0]
    assert (user, requestor, role) == ("XDSI", "true", "110153")
    assert pid is not None and pid.isdigit() and pid != server_pid  # the process that sent it: the publish command
