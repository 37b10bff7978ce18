"""Issue 12: a partition with a DICOM port of its own gets a DICOM TLS port of its own (``[partitions.X] dicom_tls_port``).

Before, a partition's own port was plain only: with ``[tls]`` configured the node still had an
unauthenticated DICOM port, the opposite of what an ATNA Secure Node promises.  Now each partition
may listen with TLS (same ``[tls]`` certificate, trusted CAs and profile as the main TLS port), beside
its plain port or instead of it.  Checked with dcmtk ``storescu +tls`` and a pynetdicom SCU: stored
into the partition (not the main archive), refused without a trusted client certificate, and the
partition's plain-only sibling keeps working.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest
import requests
from pynetdicom import AE
from pynetdicom.sop_class import SecondaryCaptureImageStorage

from tests.support.objects import secondary_capture
from tests.support.pki import Issued, TestCA, standard_pki
from tests.support.server import XdsiProcess, free_port
from xdsi.config import TlsSettings
from xdsi.security.tls import client_context

pytestmark = pytest.mark.dcmtk

TLS_ONLY = "CARDIOTLS"  # a partition with a TLS port only
BOTH = "NEUROBOTH"  # a partition with a plain and a TLS port


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    return standard_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, pki: dict[str, object]) -> Iterator[XdsiProcess]:
    d = tmp_path_factory.mktemp("partition-tls")
    srv: Issued = pki["server"]  # type: ignore[assignment]
    ca: TestCA = pki["ca"]  # type: ignore[assignment]
    proc = XdsiProcess(d / "data", config=d / "xdsi.toml")
    ports = {k: free_port() for k in ("main_tls", "only_tls", "both_plain", "both_tls")}
    proc.ports = ports  # type: ignore[attr-defined]
    (d / "xdsi.toml").write_text(
        f"[server]\ndicom_tls_port = {ports['main_tls']}\n"
        f'[tls]\ncertificate = "{srv.cert}"\nprivate_key = "{srv.key}"\nca_certificates = "{ca.pem}"\n'
        f'[partitions.cardio]\nae_title = "{TLS_ONLY}"\ndicom_tls_port = {ports["only_tls"]}\n'
        f'[partitions.neuro]\nae_title = "{BOTH}"\ndicom_port = {ports["both_plain"]}\ndicom_tls_port = {ports["both_tls"]}\n'
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def _store(port: int, called: str, data: bytes, tls_args: object = None) -> int | None:
    from io import BytesIO

    from pydicom import dcmread

    ae = AE(ae_title="PARTSCU")
    ae.add_requested_context(SecondaryCaptureImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title=called, tls_args=tls_args)  # type: ignore[arg-type]
    if not assoc.is_established:
        return None
    try:
        return int(assoc.send_c_store(dcmread(BytesIO(data))).Status)
    finally:
        assoc.release()


def _tls_args(pki: dict[str, object], who: str = "client") -> tuple[object, str]:
    ca: TestCA = pki["ca"]  # type: ignore[assignment]
    issued: Issued = pki[who]  # type: ignore[assignment]
    return client_context(TlsSettings(certificate=issued.cert, private_key=issued.key, ca_certificates=ca.pem), check_hostname=False), "127.0.0.1"


def _found(server: XdsiProcess, partition: str | None, sop: str) -> int:
    path = "/dicomweb" + (f"/{partition}" if partition else "") + "/instances"
    r = requests.get(f"http://127.0.0.1:{server.http_port}{path}", params={"SOPInstanceUID": sop}, timeout=10)
    assert r.status_code in (200, 204), r.text
    return len(r.json()) if r.status_code == 200 and r.content else 0


def test_pynetdicom_stores_into_the_tls_only_partition(server: XdsiProcess, pki: dict[str, object]) -> None:
    data, sop = secondary_capture("PART^TLS", "PTLS01")
    assert _store(server.ports["only_tls"], TLS_ONLY, data, _tls_args(pki)) == 0  # type: ignore[attr-defined]
    assert _found(server, TLS_ONLY, sop) == 1
    assert _found(server, None, sop) == 0  # the partition's archive, not the main one


def test_dcmtk_storescu_tls_to_the_partition_with_both_ports(server: XdsiProcess, pki: dict[str, object], tmp_path: Path) -> None:
    data, sop = secondary_capture("PART^DCMTK", "PTLS02")
    f = tmp_path / "one.dcm"
    f.write_bytes(data)
    ca: TestCA = pki["ca"]  # type: ignore[assignment]
    cli: Issued = pki["client"]  # type: ignore[assignment]
    out = subprocess.run(
        ["/usr/bin/storescu", "+tls", str(cli.key), str(cli.cert), "+cf", str(ca.pem), "-aet", "DCMTKSCU", "-aec", BOTH,
         "127.0.0.1", str(server.ports["both_tls"]), str(f)],  # type: ignore[attr-defined]
        capture_output=True, text=True, timeout=60, env={"TCP_NODELAY": "1"},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert _found(server, BOTH, sop) == 1
    # the same partition's plain port still serves (the operator kept it)
    data2, sop2 = secondary_capture("PART^PLAIN", "PTLS03")
    assert _store(server.ports["both_plain"], BOTH, data2) == 0  # type: ignore[attr-defined]
    assert _found(server, BOTH, sop2) == 1


@pytest.mark.parametrize("who", ["stranger", "expired"])
def test_partition_tls_port_refuses_untrusted_clients(server: XdsiProcess, pki: dict[str, object], who: str) -> None:
    data, sop = secondary_capture("PART^REFUSED", "PTLS04")
    before = len(server.log)
    assert _store(server.ports["only_tls"], TLS_ONLY, data, _tls_args(pki, who)) is None  # type: ignore[attr-defined]
    assert _found(server, TLS_ONLY, sop) == 0
    deadline = time.monotonic() + 5
    while not any("TLS handshake" in line and "refused" in line for line in server.log[before:]):
        assert time.monotonic() < deadline, "".join(server.log[before:])
        time.sleep(0.05)


def test_plain_dicom_to_the_partition_tls_port_is_refused(server: XdsiProcess) -> None:
    data, _sop = secondary_capture("PART^PLAIN", "PTLS05")
    assert _store(server.ports["only_tls"], TLS_ONLY, data) is None  # type: ignore[attr-defined]


def test_startup_line_names_the_partition_tls_listeners(server: XdsiProcess) -> None:
    logged = "".join(server.log)
    for ae, port in ((TLS_ONLY, server.ports["only_tls"]), (BOTH, server.ports["both_tls"])):  # type: ignore[attr-defined]
        assert f"DICOM {ae} listening with TLS on 127.0.0.1:{port}" in logged, logged
    serving = next(line for line in server.log if line.startswith("xdsi serving"))
    assert f"dicom+tls://127.0.0.1:{server.ports['only_tls']} (AE {TLS_ONLY})" in serving, serving  # type: ignore[attr-defined]
    assert f"dicom+tls://127.0.0.1:{server.ports['both_tls']} (AE {BOTH})" in serving, serving  # type: ignore[attr-defined]
