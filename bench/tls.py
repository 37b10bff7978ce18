"""TLS against plain on one running ``xdsi serve``: C-STORE ingest and RAD-69 retrieve, same data, one run.

Run separately (not in CI), from the repository with its virtualenv::

    python -m bench.tls                 # 400 instances of 256x256 16-bit, 3 rounds
    python -m bench.tls --count 1000 --side 512

Certificates are made for the run (tests/support/pki.py).  Ingest: one pynetdicom association per
round, plain DICOM port vs DICOM TLS port (each round a fresh study, so nothing is a duplicate).
Retrieve: RAD-69 (xdsi.soap.client.retrieve, streamed to disk) of one ingested study over HTTP vs
HTTPS with a client certificate.  Prints the median seconds of each and the TLS/plain ratio.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--count", type=int, default=400)
    p.add_argument("--side", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
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
        proc = XdsiProcess(d / "data", config=d / "xdsi.toml", env={"XDSI_REPOSITORY_UNIQUE_ID": REPOSITORY}).start()
        try:
            ctx = client_context(TlsSettings(certificate=cli.cert, private_key=cli.key, ca_certificates=ca.pem))
            times: dict[str, list[float]] = {"ingest plain": [], "ingest tls": [], "rad69 http": [], "rad69 https": []}
            last = None
            for _ in range(args.rounds):
                for name, port, tls_args in (("ingest plain", proc.dicom_port, None), ("ingest tls", tls_port, (ctx, "127.0.0.1"))):
                    study, series, dss = make_study(args.count, args.side)
                    times[name].append(ingest(port, proc.ae_title, dss, tls_args))
                    last = (study, series, [str(ds.SOPInstanceUID) for ds in dss])
            assert last is not None
            study, series, sops = last
            plain, secure = requests.Session(), requests.Session()
            secure.trust_env = False
            secure.cert, secure.verify = (str(cli.cert), str(cli.key)), str(ca.pem)
            for _ in range(args.rounds):
                for name, url, session in (
                    ("rad69 http", f"http://127.0.0.1:{proc.http_port}/xdsi/ImagingDocumentSource", plain),
                    ("rad69 https", f"https://127.0.0.1:{https_port}/xdsi/ImagingDocumentSource", secure),
                ):
                    out = d / f"out-{name.replace(' ', '-')}-{time.monotonic_ns()}"
                    t0 = time.perf_counter()
                    report = retrieve(url, study, {series: sops}, out, repository_unique_id=REPOSITORY, session=session)
                    times[name].append(time.perf_counter() - t0)
                    assert len(list(out.iterdir())) == len(sops), report
        finally:
            proc.stop()
    mb = args.count * args.side * args.side * 2 / 1e6
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.count} instances of {args.side}x{args.side} 16-bit ({mb:.0f} MB of pixels), median of {args.rounds} rounds")
    for k, v in med.items():
        print(f"  {k:12s} {v:7.2f} s  {mb / v:7.1f} MB/s")
    print(f"  ingest TLS/plain {med['ingest tls'] / med['ingest plain']:.2f}   RAD-69 HTTPS/HTTP {med['rad69 https'] / med['rad69 http']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
