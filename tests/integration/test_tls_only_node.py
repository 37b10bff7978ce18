"""A TLS-only Secure Node (issue 12): ``dicom_port = 0`` and ``http_port = 0``, DICOM TLS and HTTPS only.

One real ``xdsi serve`` for the module, its plain ports switched off, publishing to the strict
registry double over mutual TLS while that registry's clock runs 7 s ahead; the process runs in
another time zone (Asia/Kolkata, UTC+05:30, no daylight saving) so that a local time leaking into
XDS metadata would show.  Peers: Debian's dcmtk ``storescu +tls`` (by /usr/bin path), a
pynetdicom SCU with an ``ssl.SSLContext``, ``requests`` with our test client certificate, and
``xdsi status`` as a user runs it.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import psutil
import pydicom
import pytest
import requests
from lxml import etree
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from tests.integration.dimse_support import run, tool
from tests.support.pki import Issued, TestCA, standard_pki
from tests.support.registry import TestRegistry
from tests.support.server import XdsiProcess, free_port
from tests.support.xds import PATIENT_CX, PATIENT_ROWS_TOML
from xdsi.config import TlsSettings
from xdsi.security.clock import peer_of
from xdsi.security.tls import client_context, server_context
from xdsi.standards import constants as C
from xdsi.tools.synth import StudySpec, write_study
from xdsi.xds.codes import CodeTable

pytestmark = pytest.mark.dcmtk

SKEW = 7.0  # the registry's clock, ahead of ours
ZONE = "Asia/Kolkata"  # UTC+05:30 all year


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    cast = standard_pki(tmp_path_factory.mktemp("pki"))
    return {**cast, "registry": cast["ca"].issue("localhost")}  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def registry(pki: dict[str, object]) -> Iterator[TestRegistry]:
    reg: Issued = pki["registry"]  # type: ignore[assignment]
    ctx = server_context(TlsSettings(certificate=reg.cert, private_key=reg.key, ca_certificates=pki["ca"].pem))  # type: ignore[attr-defined]
    with TestRegistry(CodeTable.load(), {PATIENT_CX}, ssl_context=ctx) as r:
        r.date_skew = SKEW
        yield r


def _config(d: Path, pki: dict[str, object], registry: TestRegistry, tls_port: int, https_port: int) -> Path:
    srv: Issued = pki["server"]  # type: ignore[assignment]
    cfg = d / "xdsi.toml"
    cfg.write_text(
        f"[server]\ndicom_port = 0\nhttp_port = 0\ndicom_tls_port = {tls_port}\nhttps_port = {https_port}\n"
        f'[tls]\ncertificate = "{srv.cert}"\nprivate_key = "{srv.key}"\nca_certificates = "{pki["ca"].pem}"\n'  # type: ignore[attr-defined]
        # the registry's certificate names localhost: it is reached by that name, verified against our CA
        f'[xds]\nmode = "integrated"\nregistry_url = "{registry.registry_url.replace("127.0.0.1", "localhost")}"\n'
        "stability_delay = 1\npoll_interval = 0.3\nretry_initial = 0.5\nretry_max = 1\ntimeout = 10\n" + PATIENT_ROWS_TOML
    )
    return cfg


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, pki: dict[str, object], registry: TestRegistry) -> Iterator[XdsiProcess]:
    d = tmp_path_factory.mktemp("tls-only")
    tls_port, https_port = free_port(), free_port()
    proc = XdsiProcess(d / "data", config=_config(d, pki, registry, tls_port, https_port), env={"TZ": ZONE})
    proc.dicom_port = proc.http_port = 0  # the flags say it too: --dicom-port 0 --http-port 0
    proc.dicom_tls_port, proc.https_port = tls_port, https_port  # type: ignore[attr-defined]
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def _https(server: XdsiProcess, pki: dict[str, object], path: str, **headers: str) -> requests.Response:
    client: Issued = pki["client"]  # type: ignore[assignment]
    ca: TestCA = pki["ca"]  # type: ignore[assignment]
    return requests.get(f"https://127.0.0.1:{server.https_port}{path}", cert=(str(client.cert), str(client.key)),  # type: ignore[attr-defined]
                        verify=str(ca.pem), headers=headers, timeout=30)


def _status(server: XdsiProcess) -> str:
    config = ["--config", str(server.config)] if server.config else []
    out = subprocess.run([sys.executable, "-m", "xdsi", "status", *config, "--data-dir", str(server.data_dir)],
                         capture_output=True, text=True, timeout=120, env={**server.env})
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def _slot(obj: etree._Element, name: str) -> str:
    [value] = obj.xpath(f"./*[local-name()='Slot'][@name='{name}']/*[local-name()='ValueList']/*[local-name()='Value']/text()")
    return str(value)


@pytest.fixture(scope="module")
def study(server: XdsiProcess, pki: dict[str, object], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two CT instances of PAT001: one stored by dcmtk storescu +tls, one by pynetdicom over TLS."""
    paths = write_study(tmp_path_factory.mktemp("study"), StudySpec(), series=1, per_series=2)
    client: Issued = pki["client"]  # type: ignore[assignment]
    run([tool("storescu"), "-aec", server.ae_title, "+tls", str(client.key), str(client.cert), "+cf", str(pki["ca"].pem),  # type: ignore[attr-defined]
         "127.0.0.1", str(server.dicom_tls_port), str(paths[0])])  # type: ignore[attr-defined]
    ae = AE(ae_title="TLSSCU")
    ae.add_requested_context(CTImageStorage)
    ctx = client_context(TlsSettings(certificate=client.cert, private_key=client.key, ca_certificates=pki["ca"].pem))  # type: ignore[attr-defined]
    assoc = ae.associate("127.0.0.1", server.dicom_tls_port, ae_title=server.ae_title, tls_args=(ctx, "127.0.0.1"))  # type: ignore[attr-defined]
    assert assoc.is_established
    try:
        assert assoc.send_c_store(pydicom.dcmread(paths[1])).Status == 0x0000
    finally:
        assoc.release()
    return paths


def test_only_the_tls_ports_listen(server: XdsiProcess) -> None:
    assert server.proc is not None
    listening = {c.laddr.port for c in psutil.Process(server.proc.pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    assert listening == {server.dicom_tls_port, server.https_port}  # type: ignore[attr-defined]
    line = next(x for x in server.log if x.startswith("xdsi serving"))
    assert line.startswith(f"xdsi serving AE XDSI on https://127.0.0.1:{server.https_port}/, "  # type: ignore[attr-defined]
                           f"dicom+tls://127.0.0.1:{server.dicom_tls_port}; off: dicom_port, http_port (data in "), line  # type: ignore[attr-defined]
    assert any(f"listeners: https://127.0.0.1:{server.https_port}/" in x for x in server.log), server.output()  # type: ignore[attr-defined]


def test_dimse_over_tls_then_dicomweb_over_https(server: XdsiProcess, pki: dict[str, object], study: list[Path]) -> None:
    """Stored over DICOM TLS by two peers, found by QIDO-RS and read back by WADO-RS over HTTPS, pixels intact."""
    ds0 = pydicom.dcmread(study[0])
    q = _https(server, pki, f"/dicomweb/studies?StudyInstanceUID={ds0.StudyInstanceUID}&includefield=00201208", Accept="application/dicom+json")
    assert q.status_code == 200, q.text
    [found] = q.json()
    assert found["00201208"]["Value"] == [2] and found["00100020"]["Value"] == ["PAT001"]
    for p in study:
        want = pydicom.dcmread(p)
        r = _https(server, pki, f"/dicomweb/studies/{want.StudyInstanceUID}/series/{want.SeriesInstanceUID}/instances/{want.SOPInstanceUID}",
                   Accept='multipart/related; type="application/dicom"; transfer-syntax=*')
        assert r.status_code == 200, r.text[:300]
        body = r.content
        start = body.index(b"DICM") - 128
        got = pydicom.dcmread(__import__("io").BytesIO(body[start:]))
        assert got.SOPInstanceUID == want.SOPInstanceUID
        assert (got.pixel_array == want.pixel_array).all()


def _published(registry: TestRegistry, timeout: float = 60.0) -> etree._Element:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entries = registry.find_by_patient(PATIENT_CX)
        if entries:
            return entries[0].element
        time.sleep(0.2)
    raise AssertionError("the study was not published over HTTPS")


def test_metadata_times_are_utc_whatever_the_host_zone(server: XdsiProcess, registry: TestRegistry, study: list[Path]) -> None:
    """ITI TF-3 4.2.3.1.7: DTM is UTC.  The server runs in UTC+05:30; the study's 10:15 local is 04:45 UTC."""
    entry = _published(registry)
    assert _slot(entry, "serviceStartTime") == "20240115044500"  # 20240115 101500 in Asia/Kolkata, no (0008,0201)
    now = datetime.now(timezone.utc)
    created = datetime.strptime(_slot(entry, "creationTime"), "%Y%m%d%H%M%S").replace(tzinfo=timezone.utc)
    assert abs(now - created) < timedelta(minutes=2), (created, now)  # local time would be 5.5 h off
    [iti42] = [r for r in registry.requests if r.action == C.ACTION_ITI42]
    env = etree.fromstring(iti42.envelope)
    [ss] = env.xpath("//*[local-name()='RegistryPackage']")
    submitted = datetime.strptime(_slot(ss, "submissionTime"), "%Y%m%d%H%M%S").replace(tzinfo=timezone.utc)
    assert abs(now - submitted) < timedelta(minutes=2), (submitted, now)


def test_status_names_the_listeners_and_the_skewed_registry_clock(server: XdsiProcess, registry: TestRegistry, study: list[Path]) -> None:
    _published(registry)
    out = _status(server)
    assert server.proc is not None
    https, tls = f"https://127.0.0.1:{server.https_port}/", f"dicom+tls://127.0.0.1:{server.dicom_tls_port}"  # type: ignore[attr-defined]
    assert re.search(rf"^serving:    pid {server.proc.pid} since \S+Z on {re.escape(https)}, {re.escape(tls)}$", out, re.M), out
    assert f"listeners:  {https}, {tls}; off: dicom_port, http_port (as configured)" in out, out
    peer = peer_of(registry.registry_url.replace("127.0.0.1", "localhost"))
    m = re.search(rf"^  {re.escape(peer)}: ([+-]\d+\.\d\d) s \(\+-(\d+\.\d\d)\) at (\S+)Z, median ([+-]\d+\.\d\d) s of (\d+)  \*\* more than 1 s off \*\*$", out, re.M)
    assert m, out
    offset, unc = float(m.group(1)), float(m.group(2))
    assert abs(offset - SKEW) <= unc + 0.01, out
    seen = datetime.strptime(m.group(3), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
    assert abs(datetime.now(timezone.utc) - seen) < timedelta(minutes=2)  # printed in UTC although TZ is Asia/Kolkata


def test_status_of_a_stopped_and_a_killed_server(tmp_path: Path) -> None:
    """HTTP only (dicom_port 0): status says it runs; killed, that it ended uncleanly; stopped, that nothing runs."""
    proc = XdsiProcess(tmp_path / "data")
    proc.dicom_port = 0
    proc.start()
    try:
        out = _status(proc)
        assert proc.proc is not None
        assert f"serving:    pid {proc.proc.pid} since " in out and out.split("serving:")[1].splitlines()[0].endswith(f"on http://127.0.0.1:{proc.http_port}/"), out
        pid = proc.proc.pid
        proc.kill9()
        out = _status(proc)
        assert f"serving:    not running (pid {pid}, started " in out and f"it listened on http://127.0.0.1:{proc.http_port}/)" in out, out
        proc.start()
    finally:
        rc = proc.stop()
    assert rc == 0, proc.output()  # SIGTERM stops an HTTP-only node cleanly (no DICOM listener to stop)
    assert "serving:    not running\n" in _status(proc)
    assert not (tmp_path / "data" / "serving.json").exists()
