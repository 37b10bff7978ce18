"""The DICOM peer policy (issue 13.1) against a real ``xdsi serve``: dcmtk and pynetdicom as the peers.

One server for the module, with ``accept_unknown_peers = false``, a peer per right switched off,
peers pinned to an address (``hosts``) or a certificate (``tls_subject``), and a partition only one
peer may use.  Every refusal is checked for its exact answer (A-ASSOCIATE-RJ result/source/reason,
DIMSE status 0124H) and for what it must not have done (nothing stored, nothing sent); every
refused peer is shown doing what it *is* allowed, so the refusal is the right's, not a broken peer.
"""

from __future__ import annotations

import io
import ssl
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    SecondaryCaptureImageStorage,
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from tests.integration.dimse_support import dcmtk_available, run, tool
from tests.support import rsyslog
from tests.support.audit_schema import check_audit_message
from tests.support.objects import secondary_capture
from tests.support.pki import Issued, TestCA, standard_pki
from tests.support.server import XdsiProcess, free_port
from xdsi.config import TlsSettings
from xdsi.security.tls import client_context
from xdsi.uids import new_uid

pytestmark = [pytest.mark.dcmtk, pytest.mark.skipif(not dcmtk_available(), reason="dcmtk not installed")]

NOT_AUTHORIZED = 0x0124
TIMEOUT = 30


class Destination:
    """A C-MOVE destination (pynetdicom Storage SCP on loopback) that records what it received."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self.ae = AE(ae_title="DEST")
        self.ae.add_supported_context(SecondaryCaptureImageStorage)
        self.server = self.ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = int(self.server.server_address[1])

    def _store(self, event: Any) -> int:
        self.received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    return standard_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def dest() -> Iterator[Destination]:
    d = Destination()
    try:
        yield d
    finally:
        d.server.shutdown()


AUDIT_SOURCE = "XDSI-DIMSE-POLICY"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[rsyslog.Rsyslog | None]:
    """The Audit Record Repository (Debian's rsyslogd); None where it is not installed (the alert tests skip)."""
    with rsyslog.running_if_available(tmp_path_factory.mktemp("arr")) as r:
        yield r


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, pki: dict[str, object], dest: Destination,
           repo: rsyslog.Rsyslog | None) -> Iterator[XdsiProcess]:
    d = tmp_path_factory.mktemp("dimse-policy")
    srv: Issued = pki["server"]  # type: ignore[assignment]
    ca: TestCA = pki["ca"]  # type: ignore[assignment]
    proc = XdsiProcess(d / "data", config=d / "xdsi.toml")
    proc.dicom_tls_port = free_port()  # type: ignore[attr-defined]
    proc.studyx_port = free_port()  # type: ignore[attr-defined]
    (d / "xdsi.toml").write_text(
        f"[server]\ndicom_tls_port = {proc.dicom_tls_port}\n"  # type: ignore[attr-defined]
        "[dimse]\naccept_unknown_peers = false\n"
        '[peers.FULL]\nhosts = ["127.0.0.1"]\n'
        "[peers.NOSTORE]\nstore = false\n"
        "[peers.NOFIND]\nfind = false\n"
        "[peers.FINDLESS]\nfind = false\n"  # refused C-FINDs only in the alert test: no earlier refusal shares its budget
        "[peers.NOMOVE]\nmove = false\n"
        "[peers.NOGET]\nget = false\n"
        "[peers.NOCOMMIT]\ncommit = false\n"
        '[peers.ALT]\nhosts = ["127.0.0.2"]\n'
        f'[peers.DEST]\nhost = "127.0.0.1"\nport = {dest.port}\nstore = false\nfind = false\nmove = false\nget = false\ncommit = false\n'
        '[peers.RESEARCH]\nhosts = ["127.0.0.0/8"]\n'
        '[peers.MODALITY]\ntls_subject = "CN=modality.example.org"\nfind = false\n'
        '[peers.PINNED]\ntls_subject = "CN=someone-else.example.org"\n'
        f'[partitions.STUDYX]\npeers = ["RESEARCH"]\ndicom_port = {proc.studyx_port}\n'  # type: ignore[attr-defined]
        f'[tls]\ncertificate = "{srv.cert}"\nprivate_key = "{srv.key}"\nca_certificates = "{ca.pem}"\n'
        + (f'[audit]\nrepositories = ["{repo.udp_url}"]\naudit_source_id = "{AUDIT_SOURCE}"\n' if repo is not None else "")
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def _ae(calling: str, *contexts: str) -> AE:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    for cx in contexts or (Verification,):
        ae.add_requested_context(cx)
    return ae


def _associate(server: XdsiProcess, calling: str, *contexts: str, called: str = "XDSI", tls: ssl.SSLContext | None = None,
               bind: str | None = None, **kw: Any) -> Any:
    port = server.dicom_tls_port if tls is not None else server.dicom_port  # type: ignore[attr-defined]
    if tls is not None:
        kw["tls_args"] = (tls, "127.0.0.1")
    if bind is not None:
        kw["bind_address"] = (bind, 0)
    return _ae(calling, *contexts).associate("127.0.0.1", port, ae_title=called, **kw)


def _rj(assoc: Any) -> tuple[int, int, int]:
    """The A-ASSOCIATE-RJ (result, source, reason) the server answered."""
    assert assoc.is_rejected, "the association was not rejected"
    p = assoc.acceptor.primitive
    return (p.result, p.result_source, p.diagnostic)


def _echo_ok(assoc: Any) -> bool:
    try:
        assert assoc.is_established
        return getattr(assoc.send_c_echo(), "Status", None) == 0x0000
    finally:
        assoc.release()


def _store(server: XdsiProcess, calling: str, data: bytes, called: str = "XDSI") -> int:
    assoc = _associate(server, calling, SecondaryCaptureImageStorage, called=called)
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(pydicom.dcmread(io.BytesIO(data))).Status)
    finally:
        assoc.release()


def _find(server: XdsiProcess, calling: str, patient_id: str, called: str = "XDSI") -> tuple[list[str], int]:
    """(Study Instance UIDs found, final status)."""
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.PatientID = patient_id
    q.StudyInstanceUID = ""
    assoc = _associate(server, calling, StudyRootQueryRetrieveInformationModelFind, called=called)
    assert assoc.is_established
    try:
        rsps = list(assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind))
    finally:
        assoc.release()
    found = [str(ds.StudyInstanceUID) for st, ds in rsps if st.Status in (0xFF00, 0xFF01)]
    return found, int(rsps[-1][0].Status)


def _study_query(study_uid: str) -> Dataset:
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = study_uid
    return q


def _get(server: XdsiProcess, calling: str, study_uid: str) -> tuple[int, list[str], Any]:
    """(final status, SOP Instance UIDs received as C-STORE sub-operations, final response)."""
    received: list[str] = []

    def on_store(event: Any) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    ae = _ae(calling, StudyRootQueryRetrieveInformationModelGet, SecondaryCaptureImageStorage)
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title="XDSI", ext_neg=[build_role(SecondaryCaptureImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        rsps = list(assoc.send_c_get(_study_query(study_uid), StudyRootQueryRetrieveInformationModelGet))
    finally:
        assoc.release()
    return int(rsps[-1][0].Status), received, rsps[-1][0]


def _move(server: XdsiProcess, calling: str, study_uid: str, destination: str = "DEST") -> int:
    assoc = _associate(server, calling, StudyRootQueryRetrieveInformationModelMove)
    assert assoc.is_established
    try:
        rsps = list(assoc.send_c_move(_study_query(study_uid), destination, StudyRootQueryRetrieveInformationModelMove))
    finally:
        assoc.release()
    return int(rsps[-1][0].Status)


def _tls(pki: dict[str, object], who: str) -> ssl.SSLContext:
    issued: Issued = pki[who]  # type: ignore[assignment]
    return client_context(TlsSettings(certificate=issued.cert, private_key=issued.key, ca_certificates=pki["ca"].pem))  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def stored(server: XdsiProcess) -> tuple[str, str]:
    """One instance in the main archive, stored by FULL: (Study Instance UID, SOP Instance UID)."""
    data, uid = secondary_capture(patient_id="POLICY01")
    assert _store(server, "FULL", data) == 0x0000
    return str(pydicom.dcmread(io.BytesIO(data)).StudyInstanceUID), uid


# -- association --------------------------------------------------------------------------------


def test_wrong_called_ae_is_rejected(server: XdsiProcess) -> None:
    out = run([tool("echoscu"), "-aet", "FULL", "-aec", "WRONG", "127.0.0.1", str(server.dicom_port)], check=False)
    assert out.returncode != 0 and "Called AE Title Not Recognized" in out.stdout + out.stderr
    assert _rj(_associate(server, "FULL", called="ANY-SCP")) == (1, 1, 7)  # rejected-permanent, service-user, called AE
    assert _echo_ok(_associate(server, "FULL"))  # the same peer, calling our AE title


def test_unknown_calling_ae_is_rejected_and_nothing_stored(server: XdsiProcess, tmp_path: Path) -> None:
    data, uid = secondary_capture(patient_id="STRANGER01")
    f = tmp_path / "sc.dcm"
    f.write_bytes(data)
    out = run([tool("storescu"), "-aec", "XDSI", "127.0.0.1", str(server.dicom_port), str(f)], check=False)  # calling AE STORESCU
    assert out.returncode != 0 and "Calling AE Title Not Recognized" in out.stdout + out.stderr
    assert _rj(_associate(server, "STRANGER")) == (1, 1, 3)  # rejected-permanent, service-user, calling AE
    assert _find(server, "FULL", "STRANGER01") == ([], 0x0000)
    assert server.logged("calling AE title 'STORESCU' not recognised: not in [peers]"), server.output()[-3000:]


def test_known_ae_from_a_host_outside_its_hosts_is_rejected(server: XdsiProcess) -> None:
    assert _rj(_associate(server, "ALT")) == (1, 1, 3)  # ALT may only call from 127.0.0.2
    assert _echo_ok(_associate(server, "ALT", bind="127.0.0.2"))
    assert _rj(_associate(server, "FULL", bind="127.0.0.2")) == (1, 1, 3)  # FULL only from 127.0.0.1
    assert server.logged("calling AE title 'FULL' not recognised: called from 127.0.0.2, outside its hosts"), server.output()[-3000:]


def test_dcmtk_known_ae_from_its_host_is_accepted(server: XdsiProcess) -> None:
    run([tool("echoscu"), "-aet", "FULL", "-aec", "XDSI", "127.0.0.1", str(server.dicom_port)])


# -- rights: pynetdicom, exact statuses ---------------------------------------------------------


def test_store_refused_without_store_right(server: XdsiProcess) -> None:
    data, uid = secondary_capture(patient_id="NOSTORE01")
    assert _store(server, "NOSTORE", data) == NOT_AUTHORIZED
    assert _find(server, "NOSTORE", "NOSTORE01") == ([], 0x0000)  # not stored; and NOSTORE may still find
    assert _store(server, "NOFIND", data) == 0x0000  # a peer with the right stores the same object


def test_find_refused_without_find_right(server: XdsiProcess, stored: tuple[str, str]) -> None:
    assert _find(server, "NOFIND", "POLICY01") == ([], NOT_AUTHORIZED)  # one final response, no match leaked
    assert _find(server, "FULL", "POLICY01") == ([stored[0]], 0x0000)


def test_get_refused_without_get_right(server: XdsiProcess, stored: tuple[str, str]) -> None:
    status, received, final = _get(server, "NOGET", stored[0])
    assert (status, received) == (NOT_AUTHORIZED, [])
    assert final.NumberOfCompletedSuboperations == 0
    status, received, _ = _get(server, "NOMOVE", stored[0])
    assert (status, received) == (0x0000, [stored[1]])


def test_move_refused_without_move_right(server: XdsiProcess, dest: Destination, stored: tuple[str, str]) -> None:
    before = len(dest.received)
    assert _move(server, "NOMOVE", stored[0]) == NOT_AUTHORIZED
    assert _move(server, "NOMOVE", stored[0], destination="NOWHERE") == NOT_AUTHORIZED  # refused before the AE table is consulted
    assert len(dest.received) == before
    assert _move(server, "NOGET", stored[0]) == 0x0000
    assert dest.received[before:] == [stored[1]]


def test_commit_refused_without_commit_right(server: XdsiProcess, stored: tuple[str, str]) -> None:
    info = Dataset()
    info.TransactionUID = new_uid()
    item = Dataset()
    item.ReferencedSOPClassUID = SecondaryCaptureImageStorage
    item.ReferencedSOPInstanceUID = stored[1]
    info.ReferencedSOPSequence = [item]
    statuses = {}
    for calling in ("NOCOMMIT", "FULL"):
        assoc = _associate(server, calling, StorageCommitmentPushModel)
        assert assoc.is_established
        try:
            st, _ = assoc.send_n_action(info, 1, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1")
            statuses[calling] = int(st.Status)
        finally:
            assoc.release()
    assert statuses == {"NOCOMMIT": NOT_AUTHORIZED, "FULL": 0x0000}


def test_a_destination_without_rights_still_receives_moves(server: XdsiProcess, dest: Destination, stored: tuple[str, str]) -> None:
    """[peers.DEST] with every right off is a C-MOVE destination: rights are about what it may ask, not receive."""
    assert _echo_ok(_associate(server, "DEST"))  # a known peer, accepted; C-ECHO needs no right
    assert _find(server, "DEST", "POLICY01") == ([], NOT_AUTHORIZED)
    before = len(dest.received)
    assert _move(server, "FULL", stored[0]) == 0x0000
    assert dest.received[before:] == [stored[1]]


# -- rights: dcmtk ------------------------------------------------------------------------------


def _dcmtk_text(out: Any) -> str:
    return str(out.stdout) + str(out.stderr)


def test_dcmtk_storescu_refused_without_store_right(server: XdsiProcess, tmp_path: Path) -> None:
    data, uid = secondary_capture(patient_id="NOSTORE02")
    f = tmp_path / "sc.dcm"
    f.write_bytes(data)
    out = run([tool("storescu"), "-v", "-aet", "NOSTORE", "-aec", "XDSI", "127.0.0.1", str(server.dicom_port), str(f)], check=False)
    assert "Received Store Response" in _dcmtk_text(out) and "0x124" in _dcmtk_text(out)  # dcmtk 3.6.7 names it "Unknown Status: 0x124"
    assert _find(server, "FULL", "NOSTORE02") == ([], 0x0000)
    run([tool("storescu"), "-aet", "FULL", "-aec", "XDSI", "127.0.0.1", str(server.dicom_port), str(f)])
    assert len(_find(server, "FULL", "NOSTORE02")[0]) == 1


def test_dcmtk_findscu_refused_without_find_right(server: XdsiProcess, stored: tuple[str, str]) -> None:
    args = ["-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID=POLICY01", "-k", "StudyInstanceUID", "127.0.0.1", str(server.dicom_port)]
    out = run([tool("findscu"), "-v", "-aet", "NOFIND", "-aec", "XDSI", *args])
    assert "Received Final Find Response (Unknown Status: 0x124)" in _dcmtk_text(out)
    assert stored[0] not in _dcmtk_text(out)
    assert stored[0] in _dcmtk_text(run([tool("findscu"), "-v", "-aet", "FULL", "-aec", "XDSI", *args]))


def test_dcmtk_getscu_refused_without_get_right(server: XdsiProcess, stored: tuple[str, str], tmp_path: Path) -> None:
    args = ["-S", "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={stored[0]}", "127.0.0.1", str(server.dicom_port)]
    refused, allowed = tmp_path / "refused", tmp_path / "allowed"
    refused.mkdir()
    allowed.mkdir()
    out = run([tool("getscu"), "-v", "-aet", "NOGET", "-aec", "XDSI", "-od", str(refused), *args], check=False)
    assert "Received C-GET Response (Unknown Status: 0x124)" in _dcmtk_text(out)
    assert list(refused.iterdir()) == []
    run([tool("getscu"), "-aet", "FULL", "-aec", "XDSI", "-od", str(allowed), *args], check=False)
    assert [p.name for p in allowed.iterdir()] == [f"SC.{stored[1]}"]


def test_dcmtk_movescu_refused_without_move_right(server: XdsiProcess, dest: Destination, stored: tuple[str, str]) -> None:
    args = ["-S", "-aem", "DEST", "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={stored[0]}", "127.0.0.1", str(server.dicom_port)]
    before = len(dest.received)
    out = run([tool("movescu"), "-v", "-aet", "NOMOVE", "-aec", "XDSI", *args], check=False)
    assert "Received Final Move Response (Unknown Status: 0x124)" in _dcmtk_text(out)
    assert len(dest.received) == before
    run([tool("movescu"), "-aet", "FULL", "-aec", "XDSI", *args])
    assert dest.received[before:] == [stored[1]]


# -- partitions ---------------------------------------------------------------------------------


def test_partition_is_only_for_its_peers(server: XdsiProcess) -> None:
    data, uid = secondary_capture(patient_id="STUDYX01")
    assert _store(server, "RESEARCH", data, called="STUDYX") == 0x0000
    assert _rj(_associate(server, "FULL", called="STUDYX")) == (1, 1, 3)
    out = run([tool("findscu"), "-S", "-aet", "FULL", "-aec", "STUDYX", "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID=STUDYX01",
               "-k", "StudyInstanceUID", "127.0.0.1", str(server.dicom_port)], check=False)
    assert out.returncode != 0 and "Calling AE Title Not Recognized" in _dcmtk_text(out)
    study = str(pydicom.dcmread(io.BytesIO(data)).StudyInstanceUID)
    assert _find(server, "RESEARCH", "STUDYX01", called="STUDYX") == ([study], 0x0000)
    assert _find(server, "FULL", "STUDYX01") == ([], 0x0000)  # not in the main archive either
    assert _find(server, "RESEARCH", "STUDYX01") == ([], 0x0000)  # RESEARCH may use the main AE title, which holds none of it


def test_partition_port_serves_only_the_partition_to_its_peers(server: XdsiProcess) -> None:
    """The partition's own dicom_port: its AE title for its peers; the main AE title is not served there."""
    port = server.studyx_port  # type: ignore[attr-defined]
    ae = _ae("RESEARCH")
    assert _echo_ok(ae.associate("127.0.0.1", port, ae_title="STUDYX"))
    assert _rj(ae.associate("127.0.0.1", port, ae_title="XDSI")) == (1, 1, 7)  # before: answered from the partition's archive
    assert _rj(_ae("FULL").associate("127.0.0.1", port, ae_title="STUDYX")) == (1, 1, 3)
    out = run([tool("echoscu"), "-aet", "FULL", "-aec", "STUDYX", "127.0.0.1", str(port)], check=False)
    assert out.returncode != 0 and "Calling AE Title Not Recognized" in _dcmtk_text(out)


# -- TLS certificate subject --------------------------------------------------------------------


def test_tls_subject_must_match(server: XdsiProcess, pki: dict[str, object]) -> None:
    client = _tls(pki, "client")  # CN=modality.example.org
    assert _echo_ok(_associate(server, "MODALITY", tls=client))
    assert _rj(_associate(server, "MODALITY")) == (1, 1, 3)  # plain DICOM: no certificate at all
    assert _rj(_associate(server, "PINNED", tls=client)) == (1, 1, 3)  # someone else's certificate
    assert server.logged("calling AE title 'PINNED' not recognised: certificate 'CN=modality.example.org', not its tls_subject"), server.output()[-3000:]


def test_dcmtk_tls_subject(server: XdsiProcess, pki: dict[str, object]) -> None:
    client: Issued = pki["client"]  # type: ignore[assignment]
    tls = ["+tls", str(client.key), str(client.cert), "+cf", str(pki["ca"].pem)]  # type: ignore[attr-defined]
    port = str(server.dicom_tls_port)  # type: ignore[attr-defined]
    run([tool("echoscu"), "-aet", "MODALITY", "-aec", "XDSI", *tls, "127.0.0.1", port])
    out = run([tool("echoscu"), "-aet", "PINNED", "-aec", "XDSI", *tls, "127.0.0.1", port], check=False)
    assert out.returncode != 0 and "Calling AE Title Not Recognized" in _dcmtk_text(out)


def test_refused_peers_leave_the_server_serving(server: XdsiProcess) -> None:
    """Many rejections in a row (each one a slot taken and given back) do not lock out a real peer."""
    for _ in range(40):
        assert _rj(_associate(server, "STRANGER")) == (1, 1, 3)
    threads = [threading.Thread(target=lambda: _rj(_associate(server, "STRANGER"))) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert _echo_ok(_associate(server, "FULL"))


def test_the_server_log_has_no_tracebacks(server: XdsiProcess) -> None:
    """Every refusal above was an answer, not an exception in a handler (runs after them: module order)."""
    assert "Traceback" not in server.output()
    assert server.logged("INFO xdsi.dimse.server: DICOM XDSI: accepting only the 12 AE title(s) in [peers], called AE title(s) STUDYX, XDSI"), server.output()[-3000:]


# -- the refusal hook, in process -------------------------------------------------------------------


def test_refusals_are_reported_to_the_hook_and_a_failing_hook_changes_no_answer(tmp_path: Path) -> None:
    """``DicomServer.on_policy_refused(decision, operation)``: what an audit trail (Security Alert) is fed."""
    from xdsi.archive import Archive
    from xdsi.config import DimsePolicySettings, PeerRights, Settings
    from xdsi.dimse.server import DicomServer

    settings = Settings(data_dir=tmp_path / "data", dimse_policy=DimsePolicySettings(
        accept_unknown_peers=False, peers={"NOFIND": PeerRights("NOFIND", find=False)}))
    archive = Archive.open(settings)
    dicom = DicomServer(archive)
    seen: list[tuple[Any, str | None]] = []
    dicom.on_policy_refused = lambda decision, operation: seen.append((decision, operation))
    dicom.start("127.0.0.1", 0)
    q = _study_query("1.2.3")
    try:
        stranger = _ae("STRANGER").associate("127.0.0.1", dicom.port, ae_title="XDSI")
        assert _rj(stranger) == (1, 1, 3)
        assoc = _ae("NOFIND", StudyRootQueryRetrieveInformationModelFind).associate("127.0.0.1", dicom.port, ae_title="XDSI")
        assert [int(st.Status) for st, _ in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind)] == [NOT_AUTHORIZED]
        assoc.release()
        assert [(d.caller.calling_ae, d.caller.address, d.diagnostic, op) for d, op in seen] == [
            ("STRANGER", "127.0.0.1", 3, None), ("NOFIND", "127.0.0.1", None, "find")]
        assert seen[0][0].reason == "calling AE title 'STRANGER' not recognised: not in [peers] (accept_unknown_peers is off)"

        def broken(decision: Any, operation: str | None) -> None:
            raise RuntimeError("audit spool gone")

        dicom.on_policy_refused = broken
        assert _rj(_ae("STRANGER").associate("127.0.0.1", dicom.port, ae_title="XDSI")) == (1, 1, 3)
        assoc = _ae("NOFIND", StudyRootQueryRetrieveInformationModelFind).associate("127.0.0.1", dicom.port, ae_title="XDSI")
        assert [int(st.Status) for st, _ in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind)] == [NOT_AUTHORIZED]
        assoc.release()
    finally:
        dicom.stop()
        archive.close()


# -- Security Alerts (with an Audit Record Repository) -----------------------------------------------


def _alerts(repo: rsyslog.Rsyslog, event_type: str, text: str, n: int, seconds: float = 15.0) -> list[Any]:
    """Security Alerts (110113) of our source with ``event_type`` whose description has ``text``, once there are ``n``."""
    deadline = time.monotonic() + seconds
    got: list[Any] = []
    while True:
        got = []
        for line in repo.lines():
            msg = line.split(" ", 3)[3].lstrip("\ufeff").encode("utf-8")
            if f'AuditSourceID="{AUDIT_SOURCE}"'.encode() not in msg:
                continue
            root = check_audit_message(msg)  # every message valid against the PS3.15 schema
            ev = root.find("EventIdentification")
            if ev.find("EventID").get("csd-code") == "110113" and ev.find("EventTypeCode").get("csd-code") == event_type \
                    and text in ev.find("EventOutcomeDescription").text:
                got.append(root)
        if len(got) >= n or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def _participants(root: Any) -> list[tuple[str | None, ...]]:
    return [(ap.get("UserID"), ap.get("UserIsRequestor"), None if ap.find("RoleIDCode") is None else ap.find("RoleIDCode").get("csd-code"),
             ap.get("NetworkAccessPointID"), ap.get("AlternativeUserID")) for ap in root.findall("ActiveParticipant")]


def test_a_refused_operation_is_a_security_alert_once_per_peer_and_interval(server: XdsiProcess, repo: rsyslog.Rsyslog | None,
                                                                              stored: tuple[str, str]) -> None:
    """C-FIND refused four times at once: three Security Alerts (Use of Restricted Function), naming the peer, the
    operation and the setting; the fourth is counted in the next alert, not alerted on its own."""
    if repo is None:
        pytest.skip("needs Debian rsyslog + rsyslog-gnutls")
    assert _find(server, "NOGET", "POLICY01")[1] == 0x0000  # a peer with the right raises no alert
    for _ in range(4):
        assert _find(server, "FINDLESS", "POLICY01") == ([], NOT_AUTHORIZED)
    alert, *_more = _alerts(repo, "110132", "C-FIND from FINDLESS at 127.0.0.1 to XDSI refused (0124H Refused: Not Authorized)", 3)
    assert len(_more) == 2
    time.sleep(1.0)
    assert len(_alerts(repo, "110132", "C-FIND from FINDLESS", 4, seconds=0)) == 3  # the fourth refusal was held back
    assert len(_alerts(repo, "110132", "C-FIND from NOGET", 1, seconds=0)) == 0
    ev = alert.find("EventIdentification")
    assert (ev.get("EventActionCode"), ev.get("EventOutcomeIndicator")) == ("E", "4")
    assert "[peers.FINDLESS] find = false" in ev.find("EventOutcomeDescription").text
    assert _participants(alert) == [("XDSI", "false", "110150", "127.0.0.1", None), ("FINDLESS", "true", None, "127.0.0.1", None)]
    (subject,) = alert.findall("ParticipantObjectIdentification")
    assert (subject.get("ParticipantObjectID"), subject.get("ParticipantObjectTypeCodeRole")) == ("127.0.0.1", "13")


def test_a_refused_operation_over_tls_names_the_certificate(server: XdsiProcess, repo: rsyslog.Rsyslog | None, pki: dict[str, object]) -> None:
    if repo is None:
        pytest.skip("needs Debian rsyslog + rsyslog-gnutls")
    q = Dataset()
    q.QueryRetrieveLevel, q.PatientID, q.StudyInstanceUID = "STUDY", "POLICY01", ""
    assoc = _associate(server, "MODALITY", StudyRootQueryRetrieveInformationModelFind, tls=_tls(pki, "client"))
    assert assoc.is_established
    try:
        assert [int(st.Status) for st, _ in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind)] == [NOT_AUTHORIZED]
    finally:
        assoc.release()
    (alert,) = _alerts(repo, "110132", "C-FIND from MODALITY", 1)
    assert _participants(alert) == [("XDSI", "false", "110150", "127.0.0.1", None), ("MODALITY", "true", None, "127.0.0.1", None),
                                    ("CN=modality.example.org", "true", None, "127.0.0.1", "AETITLES=MODALITY")]


def test_a_rejected_association_is_a_node_authentication_alert(server: XdsiProcess, repo: rsyslog.Rsyslog | None) -> None:
    """The policy's A-ASSOCIATE-RJ goes to the issue 12 alert (xdsi.audit.dimse), with the policy's reason."""
    if repo is None:
        pytest.skip("needs Debian rsyslog + rsyslog-gnutls")
    assert _rj(_associate(server, "INTRUDER", bind="127.0.0.3")) == (1, 1, 3)
    (alert,) = _alerts(repo, "110126", "calling AE title 'INTRUDER' not recognised: not in [peers] (accept_unknown_peers is off)", 1)
    assert ("INTRUDER", "true", None, "127.0.0.3", None) in _participants(alert)
