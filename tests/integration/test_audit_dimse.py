"""The DIMSE retrieve paths and the archive's life cycle in the audit trail, against a real repository.

``xdsi serve`` with ``[audit]`` sends to Debian's rsyslogd (tests/support/rsyslog.py); the peers
are Debian's dcmtk ``movescu``/``getscu`` (by /usr/bin path) and pynetdicom over DICOM TLS
(dcmtk 3.6.7's movescu/getscu have no TLS options); the move destinations are pynetdicom
Storage SCPs on loopback, one of which refuses chosen instances, one over TLS, and one that is
not listening.  ``xdsi delete`` and ``xdsi migrate`` run as the CLI does, beside the server or
without it.  Every message read back must pass ``check_audit_message``; the assertions name the
event, action, outcome, participants and the patient and study of each message.
"""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pydicom
import pytest
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelMove

from tests.integration.dimse_support import dcmtk_available, run, tool
from tests.support import rsyslog
from tests.support.objects import secondary_capture
from tests.support.pki import Issued, standard_pki
from tests.support.server import XdsiProcess, dead_port, free_port
from xdsi.config import TlsSettings
from xdsi.security.tls import client_context, server_context

pytestmark = [
    pytest.mark.dcmtk,
    pytest.mark.skipif(not rsyslog.available(), reason="needs Debian rsyslog + rsyslog-gnutls (scripts/test installs them)"),
]

SC = str(SecondaryCaptureImageStorage)
SOURCE_ID = "XDSI-AUDIT-DIMSE"


# -- peers -----------------------------------------------------------------------------------------------


class Destination:
    """A pynetdicom Storage SCP on loopback (a C-MOVE destination); it answers 0xA700 for the SOP Instance
    UIDs in ``refuse`` and remembers what it stored, with the certificate of the caller if over TLS."""

    def __init__(self, ae_title: str, ssl_context: Any = None) -> None:
        self.refuse: set[str] = set()
        self.stored: list[str] = []
        self.ae = AE(ae_title=ae_title)
        self.ae.supported_contexts = AllStoragePresentationContexts
        self.server = self.ae.start_server(("127.0.0.1", 0), block=False, ssl_context=ssl_context, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = int(self.server.server_address[1])

    def _store(self, event: Any) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        if uid in self.refuse:
            return 0xA700
        self.stored.append(uid)
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


@dataclass
class Study:
    study_uid: str
    patient_id: str
    files: list[Path]
    sops: list[str]
    series: list[str]


def make_study(folder: Path, patient_id: str, count: int, series: int = 1) -> Study:
    """``count`` Secondary Capture instances of one patient in one study, spread over ``series`` series."""
    study_uid = generate_uid()
    series_uids = [generate_uid() for _ in range(series)]
    files, sops = [], []
    for i in range(count):
        data, sop = secondary_capture(patient_id=patient_id)
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uids[i % series]
        path = folder / f"{patient_id}-{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        sops.append(sop)
    return Study(study_uid, patient_id, files, sops, series_uids)


# -- reading the repository ---------------------------------------------------------------------------------


def messages(repo: rsyslog.Rsyslog, source_id: str = SOURCE_ID) -> list[Any]:
    """Every audit message of ``source_id`` rsyslog wrote, each checked against the PS3.15 schema."""
    return repo.audit_messages(source_id)


def event_id(root: Any) -> str:
    return str(root.find("EventIdentification/EventID").get("csd-code"))


def objects(root: Any) -> dict[str, Any]:
    """ParticipantObjectIdentification by role: "3" the study, "1" the patient, "13" an alert's subject."""
    return {o.get("ParticipantObjectTypeCodeRole"): o for o in root.findall("ParticipantObjectIdentification")}


def about(root: Any, study_uid: str) -> bool:
    study = objects(root).get("3")
    return study is not None and study.get("ParticipantObjectID") == study_uid


def participants(root: Any) -> list[tuple[str, str, str | None, str | None, str | None]]:
    """(UserID, UserIsRequestor, RoleIDCode, NetworkAccessPointID, AlternativeUserID) of each ActiveParticipant."""
    out = []
    for ap in root.findall("ActiveParticipant"):
        role = ap.find("RoleIDCode")
        out.append((ap.get("UserID"), ap.get("UserIsRequestor"), None if role is None else role.get("csd-code"),
                    ap.get("NetworkAccessPointID"), ap.get("AlternativeUserID")))
    return out


def sop_classes(study: Any) -> dict[str, str]:
    """SOPClass UID -> NumberOfInstances of a study object, wherever the schema version puts them."""
    return {sc.get("UID"): sc.get("NumberOfInstances") for sc in study.iter("SOPClass")}


def wait_for(repo: rsyslog.Rsyslog, pred: Callable[[list[Any]], list[Any]], n: int, seconds: float = 15.0, source_id: str = SOURCE_ID) -> list[Any]:
    """The messages of ``source_id`` ``pred`` selects, once there are ``n`` (or what there is after ``seconds``)."""
    deadline = time.monotonic() + seconds
    got: list[Any] = []
    while time.monotonic() < deadline:
        got = pred(messages(repo, source_id))
        if len(got) >= n:
            time.sleep(0.3)  # and nothing more of it comes
            return pred(messages(repo, source_id))
        time.sleep(0.1)
    return got


def for_study(study_uid: str, *codes: str) -> Callable[[list[Any]], list[Any]]:
    """Messages with these EventIDs about one study; 110104 only as sent by us (action R), not the C-STORE received."""
    def pick(ms: list[Any]) -> list[Any]:
        return [r for r in ms if event_id(r) in codes and about(r, study_uid)
                and not (event_id(r) == "110104" and r.find("EventIdentification").get("EventActionCode") != "R")]
    return pick


# -- fixtures -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[rsyslog.Rsyslog]:
    with rsyslog.running(tmp_path_factory.mktemp("arr")) as r:
        yield r


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    cast = standard_pki(tmp_path_factory.mktemp("pki"))
    return {**cast, "dest": cast["ca"].issue("dest.example.org")}  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def peers(pki: dict[str, Any]) -> Iterator[dict[str, Destination]]:
    dest: Issued = pki["dest"]
    tls = server_context(TlsSettings(certificate=dest.cert, private_key=dest.key, ca_certificates=pki["ca"].pem))
    made = {"PLAINDEST": Destination("PLAINDEST"), "TLSDEST": Destination("TLSDEST", tls)}
    try:
        yield made
    finally:
        for d in made.values():
            d.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, repo: rsyslog.Rsyslog, pki: dict[str, Any], peers: dict[str, Destination]) -> Iterator[XdsiProcess]:
    if not dcmtk_available():
        pytest.skip("Debian's dcmtk tools are not installed in /usr/bin")
    d = tmp_path_factory.mktemp("audit-dimse")
    srv: Issued = pki["server"]
    proc = XdsiProcess(d / "data", config=d / "xdsi.toml", env={"TCP_NODELAY": "1"})
    proc.dicom_tls_port = free_port()  # type: ignore[attr-defined]
    with dead_port() as down:  # refuses every connection: a destination that cannot be reached
        (d / "xdsi.toml").write_text(
            f"[server]\ndicom_tls_port = {proc.dicom_tls_port}\n"  # type: ignore[attr-defined]
            f'[peers.PLAINDEST]\nhost = "127.0.0.1"\nport = {peers["PLAINDEST"].port}\n'
            f'[peers.TLSDEST]\nhost = "127.0.0.1"\nport = {peers["TLSDEST"].port}\ntls = true\n'
            f'[peers.DOWNDEST]\nhost = "127.0.0.1"\nport = {down}\n'
            # the requestors of these tests are known peers: only they may associate, and only to our AE title
            + "".join(f'[peers.{aet}]\nhost = "127.0.0.1"\nport = {down}\n' for aet in ("STORESCU", "MOVESCU", "GETSCU", "TLSMOVE", "TLSGET"))
            + "[dimse]\naccept_unknown_peers = false\naccept_any_called_aet = false\n"
            f'[tls]\ncertificate = "{srv.cert}"\nprivate_key = "{srv.key}"\nca_certificates = "{pki["ca"].pem}"\n'
            f'[audit]\nrepositories = ["{repo.udp_url}"]\naudit_source_id = "{SOURCE_ID}"\nretry_seconds = 0.2\n'
        )
        proc.start()
        try:
            yield proc
        finally:
            proc.stop()


def store(server: XdsiProcess, *studies: Study) -> None:
    run([tool("storescu"), "-aet", "STORESCU", "-aec", server.ae_title, "127.0.0.1", str(server.dicom_port),
         *[str(f) for s in studies for f in s.files]])


def tls_ae(ae_title: str) -> AE:
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    ae.add_requested_context(SecondaryCaptureImageStorage)
    return ae


def client_tls(pki: dict[str, Any]) -> Any:
    client: Issued = pki["client"]
    return client_context(TlsSettings(certificate=client.cert, private_key=client.key, ca_certificates=pki["ca"].pem), check_hostname=False)


def study_query(*uids: str) -> pydicom.Dataset:
    q = pydicom.Dataset()
    q.QueryRetrieveLevel, q.StudyInstanceUID = "STUDY", "\\".join(uids)
    return q


US_PLAIN = ("XDSI", "false", "110153", "127.0.0.1", None)  # we send: Source, not the requestor


# -- C-MOVE ------------------------------------------------------------------------------------------------------


def test_c_move_with_dcmtk_movescu_two_studies_two_patients(server: XdsiProcess, repo: rsyslog.Rsyslog, peers: dict[str, Destination],
                                                            tmp_path: Path) -> None:
    """One C-MOVE of two studies of two patients: per study a Begin Transferring (E) and then an Instances
    Transferred (R, outcome 0) naming us (Source), the destination and the C-MOVE SCU (the requestor)."""
    a, b = make_study(tmp_path, "MOVE-PID-A", 2), make_study(tmp_path, "MOVE-PID-B", 1)
    store(server, a, b)
    out = run([tool("movescu"), "-S", "-aet", "MOVESCU", "-aec", server.ae_title, "-aem", "PLAINDEST",
               "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={a.study_uid}\\{b.study_uid}", "127.0.0.1", str(server.dicom_port)])
    assert set(peers["PLAINDEST"].stored) >= set(a.sops + b.sops), out.stdout + out.stderr
    for st, n in ((a, "2"), (b, "1")):
        got = wait_for(repo, for_study(st.study_uid, "110102", "110104"), 2)
        assert [event_id(r) for r in got] == ["110102", "110104"], server.output()
        begin, done = got
        for r, action in ((begin, "E"), (done, "R")):
            ev = r.find("EventIdentification")
            assert (ev.get("EventActionCode"), ev.get("EventOutcomeIndicator")) == (action, "0")
            assert participants(r) == [US_PLAIN, ("PLAINDEST", "false", "110152", "127.0.0.1", None), ("MOVESCU", "true", None, "127.0.0.1", None)]
            objs = objects(r)
            assert objs["1"].get("ParticipantObjectID") == st.patient_id  # one patient per message, the study's own
            assert sop_classes(objs["3"]) == {SC: n}
        assert done.find("EventIdentification/EventOutcomeDescription") is None


def test_c_move_partly_refused_by_the_destination_is_outcome_4(server: XdsiProcess, repo: rsyslog.Rsyslog, peers: dict[str, Destination],
                                                               tmp_path: Path) -> None:
    """The destination refuses one of three instances: Begin Transferring announced 3, Instances Transferred lists the 2
    that arrived, outcome 4 (minor failure) with the reason."""
    st = make_study(tmp_path, "MOVE-PID-PART", 3)
    store(server, st)
    peers["PLAINDEST"].refuse.add(st.sops[1])
    run([tool("movescu"), "-S", "-aet", "MOVESCU", "-aec", server.ae_title, "-aem", "PLAINDEST",
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={st.study_uid}", "127.0.0.1", str(server.dicom_port)], check=False)
    begin, done = wait_for(repo, for_study(st.study_uid, "110102", "110104"), 2)
    assert sop_classes(objects(begin)["3"]) == {SC: "3"}
    ev = done.find("EventIdentification")
    assert (event_id(done), ev.get("EventActionCode"), ev.get("EventOutcomeIndicator")) == ("110104", "R", "4")
    assert sop_classes(objects(done)["3"]) == {SC: "2"}
    why = ev.find("EventOutcomeDescription").text
    assert "1 of 3 instance(s) not sent to PLAINDEST" in why and "0xA700" in why, why
    assert objects(done)["1"].get("ParticipantObjectID") == "MOVE-PID-PART"


def test_c_move_to_an_unreachable_destination_is_on_record(server: XdsiProcess, repo: rsyslog.Rsyslog, tmp_path: Path) -> None:
    """Nothing can be sent (the destination does not answer): no Begin Transferring, and an Instances Transferred
    with outcome 4, no SOP class, saying why; the patient and study are still named."""
    st = make_study(tmp_path, "MOVE-PID-DOWN", 1)
    store(server, st)
    run([tool("movescu"), "-S", "-aet", "MOVESCU", "-aec", server.ae_title, "-aem", "DOWNDEST",
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={st.study_uid}", "127.0.0.1", str(server.dicom_port)], check=False)
    got = wait_for(repo, for_study(st.study_uid, "110102", "110104"), 1)
    assert [event_id(r) for r in got] == ["110104"]
    ev = got[0].find("EventIdentification")
    assert ev.get("EventOutcomeIndicator") == "4"
    why = ev.find("EventOutcomeDescription").text
    assert why == "1 of 1 instance(s) not sent to DOWNDEST: 1 not attempted: destination DOWNDEST could not be reached", why
    assert sop_classes(objects(got[0])["3"]) == {}
    assert objects(got[0])["1"].get("ParticipantObjectID") == "MOVE-PID-DOWN"
    assert ("DOWNDEST", "false", "110152", "127.0.0.1", None) in participants(got[0])


def test_c_move_over_tls_names_both_certificates(server: XdsiProcess, repo: rsyslog.Rsyslog, pki: dict[str, Any], peers: dict[str, Destination],
                                                 tmp_path: Path) -> None:
    """C-MOVE over DICOM TLS to a TLS destination: the requestor's and the destination's certificate subjects each
    come as a node participant (UserID = subject, AlternativeUserID = AETITLES=<its AE>), beside the AE titles."""
    st = make_study(tmp_path, "MOVE-PID-TLS", 1)
    store(server, st)
    assoc = tls_ae("TLSMOVE").associate("127.0.0.1", server.dicom_tls_port, ae_title=server.ae_title, tls_args=(client_tls(pki), "127.0.0.1"))  # type: ignore[attr-defined]
    assert assoc.is_established
    statuses = [int(s.Status) for s, _ in assoc.send_c_move(study_query(st.study_uid), "TLSDEST", StudyRootQueryRetrieveInformationModelMove) if s]
    assoc.release()
    assert statuses[-1] == 0x0000 and st.sops[0] in peers["TLSDEST"].stored
    for r in wait_for(repo, for_study(st.study_uid, "110102", "110104"), 2):
        assert participants(r) == [
            US_PLAIN,
            ("TLSDEST", "false", "110152", "127.0.0.1", None),
            ("CN=dest.example.org", "false", None, "127.0.0.1", "AETITLES=TLSDEST"),
            ("TLSMOVE", "true", None, "127.0.0.1", None),
            ("CN=modality.example.org", "true", None, "127.0.0.1", "AETITLES=TLSMOVE"),
        ]
        assert r.find("EventIdentification").get("EventOutcomeIndicator") == "0"


# -- C-GET ---------------------------------------------------------------------------------------------------------


def test_c_get_with_dcmtk_getscu(server: XdsiProcess, repo: rsyslog.Rsyslog, tmp_path: Path) -> None:
    """C-GET: the requestor is the destination (UserIsRequestor true, Destination role); no third party."""
    st = make_study(tmp_path, "GET-PID-1", 2)
    store(server, st)
    out = tmp_path / "got"
    out.mkdir()
    run([tool("getscu"), "-S", "-aet", "GETSCU", "-aec", server.ae_title, "-od", str(out),
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={st.study_uid}", "127.0.0.1", str(server.dicom_port)])
    assert len(list(out.iterdir())) == 2
    got = wait_for(repo, for_study(st.study_uid, "110102", "110104"), 2)
    assert [(event_id(r), r.find("EventIdentification").get("EventActionCode"), r.find("EventIdentification").get("EventOutcomeIndicator"))
            for r in got] == [("110102", "E", "0"), ("110104", "R", "0")]
    for r in got:
        assert participants(r) == [US_PLAIN, ("GETSCU", "true", "110152", "127.0.0.1", None)]
        assert objects(r)["1"].get("ParticipantObjectID") == "GET-PID-1"
        assert sop_classes(objects(r)["3"]) == {SC: "2"}


def test_c_get_and_c_find_over_tls_carry_the_certificate_subject(server: XdsiProcess, repo: rsyslog.Rsyslog, pki: dict[str, Any],
                                                                tmp_path: Path) -> None:
    """pynetdicom over DICOM TLS: the C-STORE received, the C-FIND Query and the C-GET messages name the peer's
    certificate subject."""
    st = make_study(tmp_path, "GET-PID-TLS", 1)
    sender = tls_ae("TLSGET").associate("127.0.0.1", server.dicom_tls_port, ae_title=server.ae_title, tls_args=(client_tls(pki), "127.0.0.1"))  # type: ignore[attr-defined]
    assert sender.is_established
    assert int(sender.send_c_store(st.files[0]).Status) == 0x0000
    sender.release()
    received: list[str] = []

    def on_store(event: Any) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    assoc = tls_ae("TLSGET").associate("127.0.0.1", server.dicom_tls_port, ae_title=server.ae_title, tls_args=(client_tls(pki), "127.0.0.1"),  # type: ignore[attr-defined]
                                       ext_neg=[build_role(SecondaryCaptureImageStorage, scp_role=True)], evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    q = study_query(st.study_uid)
    q.PatientID = "GET-PID-TLS"
    list(assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind))
    statuses = [int(s.Status) for s, _ in assoc.send_c_get(study_query(st.study_uid), StudyRootQueryRetrieveInformationModelGet) if s]
    assoc.release()
    assert statuses[-1] == 0x0000 and received == st.sops
    node = ("CN=modality.example.org", "true", None, "127.0.0.1", "AETITLES=TLSGET")
    for r in wait_for(repo, for_study(st.study_uid, "110102", "110104"), 2):
        assert participants(r) == [US_PLAIN, ("TLSGET", "true", "110152", "127.0.0.1", None), node]
    stored = wait_for(repo, lambda ms: [r for r in ms if event_id(r) == "110104" and about(r, st.study_uid)
                                        and r.find("EventIdentification").get("EventActionCode") == "C"], 1)
    assert len(stored) == 1
    assert participants(stored[0]) == [("TLSGET", "true", "110153", "127.0.0.1", None), ("XDSI", "false", "110152", "127.0.0.1", None), node]
    queries = wait_for(repo, lambda ms: [r for r in ms if event_id(r) == "110112" and objects(r).get("1") is not None
                                         and objects(r)["1"].get("ParticipantObjectID") == "GET-PID-TLS"], 1)
    assert len(queries) == 1
    assert participants(queries[0])[0][:2] == ("TLSGET", "true") and node in participants(queries[0])


# -- delete ---------------------------------------------------------------------------------------------------------


def xdsi_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xdsi", *args], capture_output=True, text=True, timeout=120, cwd=cwd,
                          env={**os.environ, "TCP_NODELAY": "1"})


def test_xdsi_delete_beside_the_server(server: XdsiProcess, repo: rsyslog.Rsyslog, tmp_path: Path) -> None:
    """``xdsi delete`` of one series: DICOM Instances Accessed (D); then of the rest: DICOM Study Deleted (D).
    The CLI spools, the running server's sender delivers; the operator and the process are named."""
    st = make_study(tmp_path, "DEL-PID-1", 3, series=2)  # series 0: instances 0 and 2; series 1: instance 1
    store(server, st)
    common = ["--config", str(server.config), "--data-dir", str(server.data_dir)]
    dry = xdsi_cli("delete", *common, "--study", st.study_uid)
    assert dry.returncode == 0 and "would delete 3 instance(s)" in dry.stdout
    part = xdsi_cli("delete", *common, "--study", st.study_uid, "--series", st.series[1], "--yes")
    assert part.returncode == 0, part.stderr
    rest = xdsi_cli("delete", *common, "--study", st.study_uid, "--yes")
    assert rest.returncode == 0, rest.stderr
    got = wait_for(repo, for_study(st.study_uid, "110103", "110105"), 2)
    assert [(event_id(r), r.find("EventIdentification").get("EventActionCode"), r.find("EventIdentification").get("EventOutcomeIndicator"))
            for r in got] == [("110103", "D", "0"), ("110105", "D", "0")], "the dry run records nothing"
    assert [sop_classes(objects(r)["3"]) for r in got] == [{SC: "1"}, {SC: "2"}]
    person = f"{__import__('getpass').getuser()}@{socket.gethostname()}"
    for r in got:
        assert objects(r)["1"].get("ParticipantObjectID") == "DEL-PID-1"
        (who, proc) = r.findall("ActiveParticipant")
        assert (who.get("UserID"), who.get("UserIsRequestor")) == (person, "true")
        assert (proc.get("UserIsRequestor"), proc.get("AlternativeUserID"), proc.get("UserName")) == ("false", "AETITLES=XDSI", "xdsi delete")
        assert proc.get("UserID").isdigit()  # the CLI's process id (PS3.15 A.5.2.1)
    assert len({r.findall("ActiveParticipant")[1].get("UserID") for r in got}) == 2, "two runs, two processes"


# -- migration without a server; the next start delivers it and sees the changed settings -------------------------------


def test_migrate_offline_is_delivered_by_the_next_serve_and_a_settings_change_is_alerted(repo: rsyslog.Rsyslog, tmp_path: Path) -> None:
    """``xdsi migrate`` with no server running: the Instances Accessed (U) message waits in the spool (``xdsi status``
    says so) and the next ``xdsi serve`` delivers it.  Restarted with a changed [dimse] bound, the server records one
    Security Alert, Security Configuration (110129), naming the setting."""
    source = "XDSI-AUDIT-MIGRATE"
    data = tmp_path / "data"
    cfg = tmp_path / "xdsi.toml"
    base = (f'[[storage.tiers]]\nname = "hot"\npath = "{data}/hot"\nmigrate_after_days = 0\n'
            f'[[storage.tiers]]\nname = "cold"\npath = "{data}/cold"\n'
            f'[audit]\nrepositories = ["{repo.udp_url}"]\naudit_source_id = "{source}"\nretry_seconds = 0.2\n')
    cfg.write_text(base)
    st = make_study(tmp_path, "MIG-PID-1", 2)
    imported = xdsi_cli("import", "--config", str(cfg), "--data-dir", str(data), *[str(f) for f in st.files])
    assert imported.returncode == 0, imported.stdout + imported.stderr
    moved = xdsi_cli("migrate", "--config", str(cfg), "--data-dir", str(data))
    assert moved.returncode == 0 and "moved 1 stud(ies), 2 file(s)" in moved.stdout, moved.stdout + moved.stderr
    status = xdsi_cli("status", "--config", str(cfg), "--data-dir", str(data))
    assert "audit:      1 message(s) pending" in status.stdout, status.stdout
    assert messages(repo, source) == []

    server = XdsiProcess(data, config=cfg, env={"TCP_NODELAY": "1"}).start()
    try:
        wait_for(repo, lambda ms: [r for r in ms if event_id(r) == "110103"], 1, source_id=source)
    finally:
        server.stop_cleanly()
    got = [r for r in messages(repo, source) if event_id(r) == "110103"]
    assert len(got) == 1
    ev = got[0].find("EventIdentification")
    assert (ev.get("EventActionCode"), ev.get("EventOutcomeIndicator")) == ("U", "0")
    study = objects(got[0])["3"]
    assert study.get("ParticipantObjectID") == st.study_uid and sop_classes(study) == {SC: "2"}
    assert objects(got[0])["1"].get("ParticipantObjectID") == "MIG-PID-1"
    details = {d.get("type"): base64.b64decode(d.get("value")).decode() for d in study.iter("ParticipantObjectDetail")}
    assert details == {"MigratedFrom": "hot", "MigratedTo": "cold"}
    assert got[0].findall("ActiveParticipant")[1].get("UserName") == "xdsi migrate"
    assert [r for r in messages(repo, source) if event_id(r) == "110113"] == [], "the first start with [audit] has nothing to compare"

    cfg.write_text(base + "[dimse]\nmax_associations = 7\n")
    server.start()
    try:
        alerts = wait_for(repo, lambda ms: [r for r in ms if event_id(r) == "110113"], 1, source_id=source)
    finally:
        server.stop_cleanly()
    assert len(alerts) == 1, server.output()
    alert = alerts[0]
    assert alert.find("EventIdentification/EventTypeCode").get("csd-code") == "110129"
    assert "max_associations" in alert.find("EventIdentification/EventOutcomeDescription").text
    # the reporting process, alone: nobody else is known to have asked for the change (PS3.15 A.5.3.11)
    assert [(p[0], p[1], p[2]) for p in participants(alert)] == [("XDSI", "true", "110150")]
    assert objects(alert)["13"].get("ParticipantObjectID") == f"xdsi-settings:{data.resolve()}"


# -- refused associations ---------------------------------------------------------------------------------------------


def alerts_since(repo: rsyslog.Rsyslog, before: int) -> list[Any]:
    return [r for r in messages(repo)[before:] if event_id(r) == "110113"]


def test_unknown_calling_or_called_ae_is_refused_and_alerted(server: XdsiProcess, repo: rsyslog.Rsyslog) -> None:
    """[dimse] accept_unknown_peers = false, accept_any_called_aet = false: dcmtk echoscu from an AE title with no [peers]
    entry, or to an AE title that is not ours, gets A-ASSOCIATE-RJ and a Security Alert (Node Authentication,
    outcome 4) naming the peer and why; the same refusal repeated at once is alerted 3 times, then counted."""
    before = len(messages(repo))
    where = ["127.0.0.1", str(server.dicom_port)]
    out = run([tool("echoscu"), "-aet", "STRANGER", "-aec", server.ae_title, *where], check=False)
    assert out.returncode != 0 and "Rejected" in out.stdout + out.stderr, out.stdout + out.stderr
    for _ in range(3):  # the same refusal again at once: alerted up to 3 times in 10 s, then counted (the 4th)
        run([tool("echoscu"), "-aet", "STRANGER", "-aec", server.ae_title, *where], check=False)
    out = run([tool("echoscu"), "-aet", "STORESCU", "-aec", "NOTUS", *where], check=False)
    assert out.returncode != 0
    assert run([tool("echoscu"), "-aet", "STORESCU", "-aec", server.ae_title, *where]).returncode == 0  # a known peer is served

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and len(alerts_since(repo, before)) < 4:
        time.sleep(0.1)
    time.sleep(0.5)
    got = alerts_since(repo, before)
    assert len(got) == 4, [r.find("EventIdentification/EventOutcomeDescription").text for r in got]
    cases = [(r, "STRANGER", "calling AE title 'STRANGER' not recognised") for r in got[:3]]
    cases.append((got[3], "STORESCU", "called AE title 'NOTUS' not recognised"))
    for r, calling, why in cases:
        ev = r.find("EventIdentification")
        assert (ev.get("EventActionCode"), ev.get("EventOutcomeIndicator")) == ("E", "4")
        assert ev.find("EventTypeCode").get("csd-code") == "110126"
        assert why in ev.find("EventOutcomeDescription").text
        assert participants(r) == [("XDSI", "false", "110150", "127.0.0.1", None), (calling, "true", None, "127.0.0.1", None)]
        assert objects(r)["13"].get("ParticipantObjectID") == "127.0.0.1"


def test_c_get_aborted_by_the_requestor_records_what_was_sent(server: XdsiProcess, repo: rsyslog.Rsyslog, tmp_path: Path) -> None:
    """The C-GET requestor aborts after the first instance: the transfer is still audited when the request ends,
    outcome 4, naming only what the requestor stored and saying that the rest was not sent."""
    import threading

    st = make_study(tmp_path, "GET-PID-ABORT", 4)
    store(server, st)
    received: list[str] = []
    holder: dict[str, Any] = {}

    def on_store(event: Any) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        if len(received) == 2:  # the first was answered; this one never will be
            threading.Thread(target=holder["assoc"].abort).start()  # from another thread, as a user's cancel button would
            time.sleep(0.5)
        return 0x0000

    ae = AE(ae_title="GETSCU")
    ae.dimse_timeout = 2  # pynetdicom's send_c_get waits this long for an answer once its own association is aborted
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(SecondaryCaptureImageStorage)
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title,
                         ext_neg=[build_role(SecondaryCaptureImageStorage, scp_role=True)], evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    holder["assoc"] = assoc
    list(assoc.send_c_get(study_query(st.study_uid), StudyRootQueryRetrieveInformationModelGet))
    assert assoc.is_aborted and received == st.sops[:2]
    begin, done = wait_for(repo, for_study(st.study_uid, "110102", "110104"), 2)
    assert sop_classes(objects(begin)["3"]) == {SC: "4"}
    ev = done.find("EventIdentification")
    assert (event_id(done), ev.get("EventActionCode"), ev.get("EventOutcomeIndicator")) == ("110104", "R", "4")
    # sent = stored and answered by the receiver: the second arrived but its answer never came back
    assert sop_classes(objects(done)["3"]) == {SC: "1"}
    assert "3 of 4 instance(s) not sent to GETSCU" in ev.find("EventOutcomeDescription").text
    assert objects(done)["1"].get("ParticipantObjectID") == "GET-PID-ABORT"
