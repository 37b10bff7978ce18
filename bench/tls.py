"""TLS against plain on one running ``xdsi serve``: C-STORE ingest and RAD-69 retrieve, same data, one run.

Run separately (not in CI), from the repository with its virtualenv::

    python -m bench.tls                 # 400 instances of 256x256 16-bit, 3 rounds
    python -m bench.tls --count 1000 --side 512

Certificates are made for the run (tests/support/pki.py).  Ingest: one pynetdicom association per
round, plain DICOM port vs DICOM TLS port (each round a fresh study, so nothing is a duplicate).
Retrieve: RAD-69 (xdsi.soap.client.retrieve, streamed to disk) of one ingested study over HTTP vs
HTTPS with a client certificate.  Prints the median seconds of each and the TLS/plain ratio, and the
median CPU seconds of the server process and of this client per operation.

Why ABBA: plain and TLS alternate as plain, TLS, TLS, plain, ... so neither always runs second (after
the other's files were written, while the kernel writes them back) or always first; on a shared
machine the wall-clock ratio still moves by 10-20 % from run to run, so compare ratios within one run
and look at the CPU columns too (server + client CPU is what TLS adds; it does not depend on load).
Retrieved files are removed after each timed retrieve, outside the timing.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import requests  # noqa: E402
from pydicom import dcmread  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import SecondaryCaptureImageStorage  # noqa: E402

from tests.support.pki import TestCA  # noqa: E402
from tests.support.server import XdsiProcess, free_port  # noqa: E402
from xdsi.config import TlsSettings  # noqa: E402
from xdsi.security.tls import client_context  # noqa: E402
from xdsi.soap.client import retrieve  # noqa: E402

REPOSITORY = "1.3.6.1.4.1.21367.13.80.110"
T = TypeVar("T")


def make_study(count: int, side: int):  # type: ignore[no-untyped-def]
    from tests.support.objects import secondary_capture

    study, series = generate_uid(), generate_uid()
    rng = np.random.default_rng(7)
    out = []
    for _ in range(count):
        data, _uid = secondary_capture(side=side)
        ds = dcmread(io.BytesIO(data))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelData = rng.integers(0, 4096, size=(side, side), dtype=np.uint16).tobytes()
        out.append(ds)
    return study, series, out


def ingest(port: int, ae_title: str, datasets: list, tls_args) -> float:  # type: ignore[no-untyped-def]
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(SecondaryCaptureImageStorage)
    t0 = time.perf_counter()
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title, tls_args=tls_args)
    assert assoc.is_established
    for ds in datasets:
        assert assoc.send_c_store(ds).Status == 0
    assoc.release()
    return time.perf_counter() - t0


def abba(a: T, b: T, rounds: int) -> list[T]:
    """a b b a a b b a ...: each kind as often first as second."""
    return [x for i in range(rounds) for x in ((a, b) if i % 2 == 0 else (b, a))]


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--count", type=int, default=400)
    p.add_argument("--side", type=int, default=256)
    p.add_argument("--rounds", type=int, default=4, help="ingest rounds per kind (ABBA order)")
    p.add_argument("--retrieve-rounds", type=int, default=12, help="RAD-69 retrieves per kind (ABBA order)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="xdsi-bench-tls-") as tmp:
        d = Path(tmp)
        ca = TestCA(d / "pki")
        srv, cli = ca.issue("127.0.0.1"), ca.issue("bench.example.org", server=False)
        tls_port, https_port = free_port(), free_port()
        (d / "xdsi.toml").write_text(
            f"[server]\ndicom_tls_port = {tls_port}\nhttps_port = {https_port}\n"
            f'[tls]\ncertificate = "{srv.cert}"\nprivate_key = "{srv.key}"\nca_certificates = "{ca.pem}"\n'
        )
        proc = XdsiProcess(d / "data", config=d / "xdsi.toml", env={"XDSI_REPOSITORY_UNIQUE_ID": REPOSITORY, "XDSI_WORKERS": "1"}).start()  # one worker: CPU sampled by pid
        try:
            ctx = client_context(TlsSettings(certificate=cli.cert, private_key=cli.key, ca_certificates=ca.pem))
            times: dict[str, list[float]] = {"ingest plain": [], "ingest tls": [], "rad69 http": [], "rad69 https": []}
            server_cpu: dict[str, list[float]] = {k: [] for k in times}
            client_cpu: dict[str, list[float]] = {k: [] for k in times}
            assert proc.proc is not None
            pid = proc.proc.pid
            last = None
            for name, port, tls_args in abba(("ingest plain", proc.dicom_port, None), ("ingest tls", tls_port, (ctx, "127.0.0.1")), args.rounds):
                study, series, dss = make_study(args.count, args.side)
                s0, c0 = process_cpu(pid), time.process_time()
                times[name].append(ingest(port, proc.ae_title, dss, tls_args))
                server_cpu[name].append(process_cpu(pid) - s0)
                client_cpu[name].append(time.process_time() - c0)
                last = (study, series, [str(ds.SOPInstanceUID) for ds in dss])
            assert last is not None
            study, series, sops = last
            plain, secure = requests.Session(), requests.Session()
            secure.trust_env = False
            secure.cert, secure.verify = (str(cli.cert), str(cli.key)), str(ca.pem)
            for name, url, session in abba(
                ("rad69 http", f"http://127.0.0.1:{proc.http_port}/xdsi/ImagingDocumentSource", plain),
                ("rad69 https", f"https://127.0.0.1:{https_port}/xdsi/ImagingDocumentSource", secure),
                args.retrieve_rounds,
            ):
                out = d / f"out-{name.replace(' ', '-')}-{time.monotonic_ns()}"
                s0, c0 = process_cpu(pid), time.process_time()
                t0 = time.perf_counter()
                report = retrieve(url, study, {series: sops}, out, repository_unique_id=REPOSITORY, session=session)
                times[name].append(time.perf_counter() - t0)
                server_cpu[name].append(process_cpu(pid) - s0)
                client_cpu[name].append(time.process_time() - c0)
                assert len(list(out.iterdir())) == len(sops), report
                shutil.rmtree(out)
        finally:
            proc.stop()
    mb = args.count * args.side * args.side * 2 / 1e6
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu = {k: statistics.median(server_cpu[k]) + statistics.median(client_cpu[k]) for k in times}
    print(f"{args.count} instances of {args.side}x{args.side} 16-bit ({mb:.0f} MB of pixels); median of {args.rounds} ingest and "
          f"{args.retrieve_rounds} retrieve rounds per kind, ABBA order")
    print(f"  {'':12s} {'wall':>7s}  {'MB/s':>7s}  {'server CPU':>10s}  {'client CPU':>10s}")
    for k, v in med.items():
        print(f"  {k:12s} {v:7.2f} s {mb / v:7.1f}  {statistics.median(server_cpu[k]):9.2f} s  {statistics.median(client_cpu[k]):9.2f} s")
    print(f"  ingest TLS/plain {med['ingest tls'] / med['ingest plain']:.2f}   RAD-69 HTTPS/HTTP {med['rad69 https'] / med['rad69 http']:.2f}"
          f"   (CPU server+client: ingest {cpu['ingest tls'] / cpu['ingest plain']:.2f}, RAD-69 {cpu['rad69 https'] / cpu['rad69 http']:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
