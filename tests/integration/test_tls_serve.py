"""``xdsi serve`` with ``[server] dicom_tls_port`` and ``https_port``: real peers over TLS, and the refusals.

Peers: Debian's dcmtk ``storescu +tls``, a pynetdicom SCU with an ``ssl.SSLContext``, ``requests``
with a client certificate; certificates made in the test (tests/support/pki.py).  One server for the
module; every refusal is followed by proof that the port still serves.
"""

from __future__ import annotations

import io
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pydicom
import pytest
import requests
from pynetdicom import AE
from pynetdicom.sop_class import SecondaryCaptureImageStorage, Verification

from tests.integration.dimse_support import run, tool
from tests.support.ids import NIST_REPOSITORY
from tests.support.objects import secondary_capture
from tests.support.pki import Issued, TestCA, standard_pki
from tests.support.server import XdsiProcess, free_port
from xdsi.config import TlsSettings
from xdsi.security.tls import client_context

pytestmark = pytest.mark.dcmtk


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    d = tmp_path_factory.mktemp("pki")
    cast = standard_pki(d)
    ca = cast["ca"]
    return {**cast, "dest": ca.issue("dest.example.org"), "registry": ca.issue("localhost")}


class TlsDestination:
    """A pynetdicom Storage SCP listening with TLS only, requiring a client certificate from our test CA."""

    def __init__(self, pki: dict[str, object]) -> None:
        from pynetdicom import evt
        from pynetdicom.presentation import AllStoragePresentationContexts

        from xdsi.security.tls import server_context

        dest: Issued = pki["dest"]  # type: ignore[assignment]
        self.received: list[tuple[pydicom.Dataset, str]] = []  # (dataset with its file meta, the caller's certificate CN)
        self.ae = AE(ae_title="TLSDEST")
        self.ae.supported_contexts = AllStoragePresentationContexts
        ctx = server_context(TlsSettings(certificate=dest.cert, private_key=dest.key, ca_certificates=pki["ca"].pem))  # type: ignore[attr-defined]
        self.server = self.ae.start_server(("127.0.0.1", 0), block=False, ssl_context=ctx, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = self.server.server_address[1]

    def _store(self, event):  # type: ignore[no-untyped-def]
        ds = event.dataset
        ds.file_meta = event.file_meta
        subject = dict(x[0] for x in event.assoc.dul.socket.socket.getpeercert()["subject"])
        self.received.append((ds, subject["commonName"]))
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def tls_dest(pki: dict[str, object]) -> Iterator[TlsDestination]:
    d = TlsDestination(pki)
    try:
        yield d
    finally:
        d.stop()


class TlsCommitRequester:
    """A modality asking for Storage Commitment over TLS, whose report listener is TLS-only with a client certificate required."""

    def __init__(self, pki: dict[str, object]) -> None:
        from pynetdicom import evt
        from pynetdicom.sop_class import StorageCommitmentPushModel

        from xdsi.security.tls import server_context

        me: Issued = pki["dest"]  # type: ignore[assignment]
        self.pki = pki
        self.reports: list[tuple[Any, str]] = []  # (event information, CN of the certificate xdsi presented)
        self.ae = AE(ae_title="TLSCOMMIT")
        self.ae.add_requested_context(StorageCommitmentPushModel)
        self.ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
        ctx = server_context(TlsSettings(certificate=me.cert, private_key=me.key, ca_certificates=pki["ca"].pem))  # type: ignore[attr-defined]
        self.server = self.ae.start_server(("127.0.0.1", 0), block=False, ssl_context=ctx, evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._report)])
        self.port = self.server.server_address[1]

    def _report(self, event):  # type: ignore[no-untyped-def]
        subject = dict(x[0] for x in event.assoc.dul.socket.socket.getpeercert()["subject"])
        self.reports.append((event.event_information, subject["commonName"]))
        return 0x0000, None

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def tls_commit(pki: dict[str, object]) -> Iterator[TlsCommitRequester]:
    r = TlsCommitRequester(pki)
    try:
        yield r
    finally:
        r.stop()


class UdpAuditReceiver:
    """A loopback RFC 5426 receiver for the audit trail: every datagram, as text, collected by a thread."""

    def __init__(self) -> None:
        import socket
        import threading

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65535)
            except OSError:
                continue
            self.messages.append(data.decode("utf-8", "replace"))

    def wait_for(self, *needles: str, timeout: float = 10) -> str:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for msg in list(self.messages):
                if all(n in msg for n in needles):
                    return msg
            time.sleep(0.05)
        raise AssertionError(f"no audit message with {needles!r} among {len(self.messages)}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def _check_alert(frame: str) -> None:
    """The RFC 5424 frame's AuditMessage is valid (tests/support/audit_schema) and names the refused peer."""
    from tests.support.audit_schema import check_audit_message

    root = check_audit_message(frame[frame.index("<AuditMessage"):].encode("utf-8"))
    assert root.find("EventIdentification/EventID").get("csd-code") == "110113"
    assert "110126" in [e.get("csd-code") for e in root.iterfind("EventIdentification/EventTypeCode")]  # DCM 110126 Node Authentication
    assert "127.0.0.1" in [p.get("NetworkAccessPointID") for p in root.iterfind("ActiveParticipant")]


@pytest.fixture(scope="module")
def audit_rx() -> Iterator[UdpAuditReceiver]:
    rx = UdpAuditReceiver()
    try:
        yield rx
    finally:
        rx.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, pki: dict[str, object], tls_dest: TlsDestination, tls_commit: TlsCommitRequester,
           audit_rx: UdpAuditReceiver) -> Iterator[XdsiProcess]:
    d = tmp_path_factory.mktemp("tls-serve")
    srv: Issued = pki["server"]  # type: ignore[assignment]
    proc = XdsiProcess(d / "data", config=d / "xdsi.toml", env={"XDSI_REPOSITORY_UNIQUE_ID": NIST_REPOSITORY})
    proc.dicom_tls_port, proc.https_port = free_port(), free_port()  # type: ignore[attr-defined]
    (d / "xdsi.toml").write_text(
        f"[server]\ndicom_tls_port = {proc.dicom_tls_port}\nhttps_port = {proc.https_port}\n"  # type: ignore[attr-defined]
        f'[peers.TLSDEST]\nhost = "127.0.0.1"\nport = {tls_dest.port}\ntls = true\n'
        f'[peers.TLSCOMMIT]\nhost = "127.0.0.1"\nport = {tls_commit.port}\ntls = true\n'
        f'[audit]\nrepositories = ["udp://127.0.0.1:{audit_rx.port}"]\n'
        f'[tls]\ncertificate = "{srv.cert}"\nprivate_key = "{srv.key}"\nca_certificates = "{pki["ca"].pem}"\n'  # type: ignore[attr-defined]
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def _ctx(pki: dict[str, object], who: str | None) -> ssl.SSLContext:
    ca: TestCA = pki["ca"]  # type: ignore[assignment]
    if who is None:
        return client_context(TlsSettings(ca_certificates=ca.pem))
    issued: Issued = pki[who]  # type: ignore[assignment]
    return client_context(TlsSettings(certificate=issued.cert, private_key=issued.key, ca_certificates=ca.pem))


def _https(server: XdsiProcess, pki: dict[str, object], path: str, who: str | None = "client") -> requests.Response:
    ca: TestCA = pki["ca"]  # type: ignore[assignment]
    cert = None
    if who is not None:
        issued: Issued = pki[who]  # type: ignore[assignment]
        cert = (str(issued.cert), str(issued.key))
    return requests.get(f"https://127.0.0.1:{server.https_port}{path}", cert=cert, verify=str(ca.pem), timeout=10)  # type: ignore[attr-defined]


REASONS = {
    None: "PEER_DID_NOT_RETURN_A_CERTIFICATE",
    "stranger": "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate",
    "expired": "CERTIFICATE_VERIFY_FAILED: certificate has expired",
}


def _logged(server: XdsiProcess, prefix: str, reason: str, before: int) -> str:
    """Wait for the server's log line of a refused handshake after line ``before``; the line."""
    import time

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for line in server.log[before:]:
            if prefix in line and reason in line:
                return line
        time.sleep(0.05)
    raise AssertionError(f"no {prefix!r} ... {reason!r} in the log:\n" + "".join(server.log[before:]))


def _store_pynetdicom(server: XdsiProcess, ctx: ssl.SSLContext, data: bytes) -> int | None:
    """C-STORE over TLS; the status, or None when no association was established."""
    ae = AE(ae_title="TLSSCU")
    ae.add_requested_context(SecondaryCaptureImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", server.dicom_tls_port, ae_title=server.ae_title, tls_args=(ctx, "127.0.0.1"))  # type: ignore[attr-defined]
    if not assoc.is_established:
        return None
    try:
        st = assoc.send_c_store(pydicom.dcmread(io.BytesIO(data)))
        return int(st.Status)
    finally:
        assoc.release()


def _has_instance(server: XdsiProcess, pki: dict[str, object], sop_uid: str) -> bool:
    r = _https(server, pki, f"/dicomweb/instances?SOPInstanceUID={sop_uid}")
    assert r.status_code in (200, 204), r.text
    return r.status_code == 200 and sop_uid in r.text


def test_pynetdicom_stores_over_tls_and_https_finds_it(server: XdsiProcess, pki: dict[str, object]) -> None:
    data, uid = secondary_capture(patient_id="TLS01")
    assert _store_pynetdicom(server, _ctx(pki, "client"), data) == 0x0000
    assert _has_instance(server, pki, uid)


def test_dcmtk_storescu_with_tls(server: XdsiProcess, pki: dict[str, object], tmp_path: Path) -> None:
    data, uid = secondary_capture(patient_id="TLS02")
    f = tmp_path / "sc.dcm"
    f.write_bytes(data)
    client: Issued = pki["client"]  # type: ignore[assignment]
    run([tool("storescu"), "-aec", server.ae_title, "+tls", str(client.key), str(client.cert), "+cf", str(pki["ca"].pem),  # type: ignore[attr-defined]
         "127.0.0.1", str(server.dicom_tls_port), str(f)])  # type: ignore[attr-defined]
    assert _has_instance(server, pki, uid)


def test_dcmtk_storescu_plain_tcp_to_the_tls_port_is_refused(server: XdsiProcess, pki: dict[str, object], tmp_path: Path) -> None:
    data, uid = secondary_capture(patient_id="TLS03")
    f = tmp_path / "sc.dcm"
    f.write_bytes(data)
    out = run([tool("storescu"), "-aec", server.ae_title, "127.0.0.1", str(server.dicom_tls_port), str(f)], check=False)  # type: ignore[attr-defined]
    assert out.returncode != 0
    assert not _has_instance(server, pki, uid)


@pytest.mark.parametrize("who", [None, "stranger", "expired"], ids=["no-client-certificate", "unknown-ca", "expired"])
def test_dicom_tls_refuses_untrusted_clients(server: XdsiProcess, pki: dict[str, object], who: str | None, audit_rx: UdpAuditReceiver) -> None:
    data, uid = secondary_capture(patient_id="TLS04")
    before = len(server.log)
    ctx = _ctx(pki, who)
    try:
        status = _store_pynetdicom(server, ctx, data)
    except (ssl.SSLError, OSError):
        status = None
    assert status is None
    assert not _has_instance(server, pki, uid)
    assert "refused" in _logged(server, "DICOM TLS handshake with 127.0.0.1:", REASONS[who], before)
    # and audited: a Security Alert (DCM 110113) of type Node Authentication naming the reason, valid per PS3.15
    _check_alert(audit_rx.wait_for("110113", "DICOM TLS handshake refused: " + REASONS[who]))
    assert _store_pynetdicom(server, _ctx(pki, "client"), secondary_capture(patient_id="TLS05")[0]) == 0  # still serving


def test_https_serves_a_client_with_a_trusted_certificate(server: XdsiProcess, pki: dict[str, object]) -> None:
    r = _https(server, pki, "/status")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/json")


@pytest.mark.parametrize("who", [None, "stranger", "expired"], ids=["no-client-certificate", "unknown-ca", "expired"])
def test_https_refuses_untrusted_clients(server: XdsiProcess, pki: dict[str, object], who: str | None, audit_rx: UdpAuditReceiver) -> None:
    before = len(server.log)
    with pytest.raises((requests.exceptions.SSLError, requests.exceptions.ConnectionError)):
        _https(server, pki, "/status", who)
    assert "refused" in _logged(server, "HTTPS: TLS handshake with 127.0.0.1:", REASONS[who], before)
    _check_alert(audit_rx.wait_for("110113", "HTTPS TLS handshake refused: " + REASONS[who]))
    assert _https(server, pki, "/status").status_code == 200  # still serving


def test_https_refuses_tls_1_0(server: XdsiProcess, pki: dict[str, object]) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1
    client: Issued = pki["client"]  # type: ignore[assignment]
    ctx.load_cert_chain(str(client.cert), str(client.key))
    import socket

    before = len(server.log)
    with socket.create_connection(("127.0.0.1", server.https_port), timeout=10) as raw:  # type: ignore[attr-defined]
        with pytest.raises(ssl.SSLError) as err:
            with ctx.wrap_socket(raw) as tls:
                tls.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
                tls.recv(100)
    assert "version" in str(err.value).lower() or "protocol" in str(err.value).lower(), err.value
    _logged(server, "HTTPS: TLS handshake with 127.0.0.1:", "UNSUPPORTED_PROTOCOL", before)


def test_plain_ports_still_serve(server: XdsiProcess) -> None:
    r = requests.get(f"http://127.0.0.1:{server.http_port}/status", timeout=10)
    assert r.status_code == 200


def test_serve_refuses_an_expired_certificate_in_one_line(tmp_path: Path, pki: dict[str, object]) -> None:
    old: Issued = pki["expired"]  # type: ignore[assignment]
    cfg = tmp_path / "xdsi.toml"
    cfg.write_text(f'[server]\nhttps_port = {free_port()}\n[tls]\ncertificate = "{old.cert}"\nprivate_key = "{old.key}"\nca_certificates = "{pki["ca"].pem}"\n')  # type: ignore[attr-defined]
    out = subprocess.run([sys.executable, "-m", "xdsi", "serve", "--config", str(cfg), "--data-dir", str(tmp_path / "d"), "--dicom-port", str(free_port()), "--http-port", str(free_port())],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"xdsi: [tls] certificate {old.cert}: expired on "), out.stderr


@pytest.mark.parametrize("port", ["dicom_tls_port", "https_port"])
def test_a_silent_connection_does_not_hold_the_tls_listener(server: XdsiProcess, pki: dict[str, object], port: str) -> None:
    """A peer that connects and never starts its handshake must not stop others from connecting."""
    import socket
    import time

    silent = [socket.create_connection(("127.0.0.1", getattr(server, port)), timeout=10) for _ in range(3)]
    try:
        time.sleep(0.2)
        t0 = time.monotonic()
        if port == "dicom_tls_port":
            assert _store_pynetdicom(server, _ctx(pki, "client"), secondary_capture(patient_id="TLS06")[0]) == 0
        else:
            assert _https(server, pki, "/status").status_code == 200
        assert time.monotonic() - t0 < 5
    finally:
        for s in silent:
            s.close()


def test_rad69_through_zeep_over_https_with_a_client_certificate(server: XdsiProcess, pki: dict[str, object]) -> None:
    """The served WSDL loaded by zeep over mutual TLS, and a RAD-69 through it: the stored bytes come back."""
    import zeep
    from zeep.transports import Transport

    data, uid = secondary_capture(patient_id="TLS07")
    assert _store_pynetdicom(server, _ctx(pki, "client"), data) == 0
    ds = pydicom.dcmread(io.BytesIO(data))
    client_cert: Issued = pki["client"]  # type: ignore[assignment]
    session = requests.Session()
    session.trust_env = False  # else REQUESTS_CA_BUNDLE in the environment overrides session.verify (requests' known quirk)
    session.cert, session.verify = (str(client_cert.cert), str(client_cert.key)), str(pki["ca"].pem)  # type: ignore[attr-defined]
    url = f"https://127.0.0.1:{server.https_port}/xdsi/ImagingDocumentSource"  # type: ignore[attr-defined]
    client = zeep.Client(url + "?wsdl", settings=zeep.Settings(strict=True), transport=Transport(session=session))
    res = client.service.ImagingDocumentSource_RetrieveImagingDocumentSet(
        StudyRequest=[{"studyInstanceUID": ds.StudyInstanceUID, "SeriesRequest": [
            {"seriesInstanceUID": ds.SeriesInstanceUID, "DocumentRequest": [{"RepositoryUniqueId": NIST_REPOSITORY, "DocumentUniqueId": uid}]}]}],
        TransferSyntaxUIDList={"TransferSyntaxUID": ["1.2.840.10008.1.2.1"]},
    )  # fmt: skip
    assert res.RegistryResponse.status == "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"
    out = pydicom.dcmread(io.BytesIO(res.DocumentResponse[0].Document))
    assert out.SOPInstanceUID == uid and out.PixelData == ds.PixelData
    # and zeep without our certificate gets no WSDL at all
    bare = requests.Session()
    bare.trust_env = False
    bare.verify = str(pki["ca"].pem)  # type: ignore[attr-defined]
    with pytest.raises((requests.exceptions.SSLError, requests.exceptions.ConnectionError)):
        zeep.Client(url + "?wsdl", transport=Transport(session=bare))


def test_dcmtk_findscu_and_pynetdicom_get_with_tls(server: XdsiProcess, pki: dict[str, object], tmp_path: Path) -> None:
    """Query and retrieve over the TLS port with dcmtk: the instance comes back with its pixels intact."""
    data, uid = secondary_capture(patient_id="TLS08")
    assert _store_pynetdicom(server, _ctx(pki, "client"), data) == 0
    ds = pydicom.dcmread(io.BytesIO(data))
    client: Issued = pki["client"]  # type: ignore[assignment]
    tls = ["+tls", str(client.key), str(client.cert), "+cf", str(pki["ca"].pem)]  # type: ignore[attr-defined]
    where = ["127.0.0.1", str(server.dicom_tls_port)]  # type: ignore[attr-defined]
    found = tmp_path / "found"
    found.mkdir()
    run([tool("findscu"), "-S", "-aec", server.ae_title, *tls, "-X", "-od", str(found),
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={ds.StudyInstanceUID}", "-k", "PatientID", *where])  # fmt: skip
    answers = [pydicom.dcmread(p) for p in found.iterdir()]
    assert [(a.StudyInstanceUID, a.PatientID) for a in answers] == [(ds.StudyInstanceUID, "TLS08")]
    # dcmtk 3.6.7's getscu has no TLS options ("Unknown option +tls"): C-GET over TLS with pynetdicom
    from pynetdicom import build_role, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

    received: list[pydicom.Dataset] = []

    def on_store(event):  # type: ignore[no-untyped-def]
        got = event.dataset
        got.file_meta = event.file_meta  # the transfer syntax it came in, for pydicom's pixel decoding
        received.append(got)
        return 0x0000

    ae = AE(ae_title="TLSGET")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(SecondaryCaptureImageStorage)
    assoc = ae.associate("127.0.0.1", server.dicom_tls_port, ae_title=server.ae_title, tls_args=(_ctx(pki, "client"), "127.0.0.1"),  # type: ignore[attr-defined]
                         ext_neg=[build_role(SecondaryCaptureImageStorage, scp_role=True)], evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    query = pydicom.Dataset()
    query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", ds.StudyInstanceUID
    statuses = [int(st.Status) for st, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet) if st]
    assoc.release()
    assert statuses[-1] == 0x0000
    assert len(received) == 1
    out = received[0]
    assert out.SOPInstanceUID == uid
    assert (out.pixel_array == ds.pixel_array).all()


def test_c_move_to_a_tls_peer(server: XdsiProcess, pki: dict[str, object], tls_dest: TlsDestination) -> None:
    """[peers.X] tls = true: the C-MOVE sub-association uses TLS with our certificate; the pixels arrive intact."""
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

    data, uid = secondary_capture(patient_id="TLS09")
    assert _store_pynetdicom(server, _ctx(pki, "client"), data) == 0
    ds = pydicom.dcmread(io.BytesIO(data))
    ae = AE(ae_title="TLSMOVE")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", server.dicom_tls_port, ae_title=server.ae_title, tls_args=(_ctx(pki, "client"), "127.0.0.1"))  # type: ignore[attr-defined]
    assert assoc.is_established
    query = pydicom.Dataset()
    query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", ds.StudyInstanceUID
    statuses = [int(st.Status) for st, _ in assoc.send_c_move(query, "TLSDEST", StudyRootQueryRetrieveInformationModelMove) if st]
    assoc.release()
    assert statuses[-1] == 0x0000, [hex(x) for x in statuses]
    got = [(d, cn) for d, cn in tls_dest.received if d.SOPInstanceUID == uid]
    assert len(got) == 1
    out, caller = got[0]
    assert caller == "127.0.0.1"  # xdsi presented its own [tls] certificate
    assert (out.pixel_array == ds.pixel_array).all()


def test_xdsi_retrieve_over_https(server: XdsiProcess, pki: dict[str, object], tmp_path: Path) -> None:
    """``xdsi retrieve https://...`` with [tls] in its config: byte-exact; without a client certificate: one clear line."""
    data, uid = secondary_capture(patient_id="TLS10")
    assert _store_pynetdicom(server, _ctx(pki, "client"), data) == 0
    ds = pydicom.dcmread(io.BytesIO(data))
    client: Issued = pki["client"]  # type: ignore[assignment]
    url = f"https://127.0.0.1:{server.https_port}/xdsi/ImagingDocumentSource"  # type: ignore[attr-defined]

    def retrieve(tls_table: str, out: Path) -> subprocess.CompletedProcess[str]:
        cfg = tmp_path / f"{out.name}.toml"
        cfg.write_text(f"[tls]\n{tls_table}")
        return subprocess.run([sys.executable, "-m", "xdsi", "retrieve", url, "--config", str(cfg), "--data-dir", str(tmp_path / "client-data"),
                               "--study", ds.StudyInstanceUID, "--series", ds.SeriesInstanceUID, "--instance", uid, "--out", str(out),
                               "--repository-unique-id", NIST_REPOSITORY, "--no-progress"], capture_output=True, text=True, timeout=60)  # fmt: skip

    ok = retrieve(f'certificate = "{client.cert}"\nprivate_key = "{client.key}"\nca_certificates = "{pki["ca"].pem}"\n', tmp_path / "ok")  # type: ignore[attr-defined]
    assert ok.returncode == 0, ok.stderr
    got = pydicom.dcmread(tmp_path / "ok" / f"{uid}.dcm")
    assert got.SOPInstanceUID == uid and got.PixelData == ds.PixelData
    bare = retrieve(f'ca_certificates = "{pki["ca"].pem}"\n', tmp_path / "bare")  # type: ignore[attr-defined]
    assert bare.returncode == 1
    assert bare.stderr.splitlines()[-1].startswith(f"xdsi retrieve: TLS with {url} failed: "), bare.stderr
    assert "Traceback" not in bare.stderr



def test_publish_iti41_to_an_https_repository_with_our_certificate(tmp_path: Path, pki: dict[str, object]) -> None:
    """Repository mode over mutual TLS: ITI-41 reaches an HTTPS-only repository that requires our certificate."""
    from tests.conftest import make_settings
    from tests.support.registry import TestRegistry
    from tests.support.xds import PATIENT_CX, xds_settings
    from xdsi.archive import Archive
    from xdsi.config import XdsSettings
    from xdsi.index.xds_models import DONE
    from xdsi.security.tls import server_context
    from xdsi.standards import constants as C
    from xdsi.tools.synth import StudySpec, write_study
    from xdsi.xds.codes import CodeTable
    from xdsi.xds.publisher import Publisher

    reg_cert: Issued = pki["registry"]  # type: ignore[assignment]
    ours: Issued = pki["server"]  # type: ignore[assignment]
    ca: TestCA = pki["ca"]  # type: ignore[assignment]
    ctx = server_context(TlsSettings(certificate=reg_cert.cert, private_key=reg_cert.key, ca_certificates=ca.pem))
    mapped = {"patient_ids": xds_settings().patient_ids, "issuer_oids": xds_settings().issuer_oids}
    with TestRegistry(CodeTable.load(), {PATIENT_CX}, ssl_context=ctx) as registry:
        # the registry's certificate names localhost: by its address the host name check refuses it
        good = registry.repository_url.replace("127.0.0.1", "localhost")
        assert good.startswith("https://")
        cases = [
            # the repository's refusal reaches the client as an alert or a bare EOF, by timing: only "SSLError" is sure
            ("no-cert", good, TlsSettings(ca_certificates=ca.pem), "SSLError"),
            ("wrong-host", registry.repository_url, TlsSettings(ours.cert, ours.key, ca.pem), "IP address mismatch"),
            ("ok", good, TlsSettings(ours.cert, ours.key, ca.pem), None),
        ]
        for name, url, tls, error in cases:
            x = XdsSettings(**{"stability_delay": 0, "retry_initial": 0.2, "retry_max": 1.0, "timeout": 10, **mapped,  # type: ignore[arg-type]
                               "mode": "repository", "repository_url": url})
            archive = Archive.open(make_settings(tmp_path / name, None, xds=x, tls=tls))
            try:
                for p in write_study(tmp_path / f"study-{name}", StudySpec(), series=1, per_series=2):
                    assert archive.store.store_file(p).ok
                [out] = Publisher(archive).run_once()
                if error is None:
                    assert out.state == DONE, out
                else:
                    assert out.state != DONE and error in out.errors, out
            finally:
                archive.close()
        assert registry.count_actions(C.ACTION_ITI41) == 1  # only the publisher with our certificate got through


def test_storage_commitment_report_to_a_tls_peer(server: XdsiProcess, pki: dict[str, object], tls_commit: TlsCommitRequester) -> None:
    """N-ACTION over the TLS port, released at once: the N-EVENT-REPORT comes on a new TLS association with our certificate."""
    import time

    from pynetdicom.sop_class import StorageCommitmentPushModel, StorageCommitmentPushModelInstance

    data, uid = secondary_capture(patient_id="TLS11")
    assert _store_pynetdicom(server, _ctx(pki, "client"), data) == 0
    info = pydicom.Dataset()
    info.TransactionUID = pydicom.uid.generate_uid()
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = SecondaryCaptureImageStorage, uid
    info.ReferencedSOPSequence = [item]
    assoc = tls_commit.ae.associate("127.0.0.1", server.dicom_tls_port, ae_title=server.ae_title, tls_args=(_ctx(pki, "client"), "127.0.0.1"))  # type: ignore[attr-defined]
    assert assoc.is_established
    st, _ = assoc.send_n_action(info, 1, StorageCommitmentPushModel, StorageCommitmentPushModelInstance)
    assoc.release()  # before the report: xdsi must open its own association, with TLS
    assert st is not None and st.Status == 0
    deadline = time.monotonic() + 15
    while not any(r.TransactionUID == info.TransactionUID for r, _ in tls_commit.reports) and time.monotonic() < deadline:
        time.sleep(0.05)
    [(report, caller)] = [(r, cn) for r, cn in tls_commit.reports if r.TransactionUID == info.TransactionUID]
    assert caller == "127.0.0.1"  # xdsi's own [tls] certificate
    assert [i.ReferencedSOPInstanceUID for i in report.ReferencedSOPSequence] == [uid]


def test_many_finds_on_one_tls_association(server: XdsiProcess, pki: dict[str, object]) -> None:
    """After its first C-FIND a TLS association's DUL waits in select() on the TLS socket (xdsi.dimse.wakeup):
    decrypted data buffered in the SSL object must still be read, so every later query is answered."""
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    data, uid = secondary_capture(patient_id="TLSMANY")
    assert _store_pynetdicom(server, _ctx(pki, "client"), data) == 0
    study = pydicom.dcmread(io.BytesIO(data)).StudyInstanceUID
    ae = AE(ae_title="TLSFIND")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(FIND)
    assoc = ae.associate("127.0.0.1", server.dicom_tls_port, ae_title=server.ae_title, tls_args=(_ctx(pki, "client"), "127.0.0.1"))  # type: ignore[attr-defined]
    assert assoc.is_established
    try:
        for i in range(40):
            q = pydicom.Dataset()
            q.QueryRetrieveLevel, q.PatientID, q.StudyInstanceUID = "STUDY", "TLSMANY", ""
            answers = [(int(st.Status), ident.StudyInstanceUID if ident is not None else None)
                       for st, ident in assoc.send_c_find(q, FIND, msg_id=i + 1)]
            assert answers == [(0xFF00, study), (0x0000, None)], f"query {i}"
    finally:
        assoc.release()
    assert assoc.is_released
