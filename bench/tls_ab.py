"""Two code trees side by side: RAD-69 over HTTP and HTTPS to each, interleaved, in one run.

For judging a change to the HTTP(S) path on a shared machine, where the TLS/plain ratio of
``bench.tls`` moves by 10-20 % from one run to the next: both trees' servers run at once, every
round retrieves from all four (tree, scheme) combinations in a shuffled order, so load hits all
four alike, and each tree's HTTPS/HTTP ratio comes from the same rounds::

    git worktree add /tmp/before <commit>     # or git archive <commit> | tar -x -C /tmp/before
    python -m bench.tls_ab --before /tmp/before --after . --rounds 24

Each server runs with its tree as working directory and ``PYTHONPATH``; the client side
(``xdsi.soap.client.retrieve``, unchanged by server-side work) is this checkout's.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from bench.tls import REPOSITORY, ingest, make_study, process_cpu  # noqa: E402
from tests.support.pki import TestCA  # noqa: E402
from tests.support.server import XdsiProcess, free_port  # noqa: E402
from xdsi.soap.client import retrieve  # noqa: E402

def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before", required=True, help="the code tree without the change")
    p.add_argument("--after", required=True, help="the code tree with the change")
    p.add_argument("--count", type=int, default=400)
    p.add_argument("--side", type=int, default=256)
    p.add_argument("--rounds", type=int, default=16)
    a = p.parse_args()
    trees = {"before": str(Path(a.before).resolve()), "after": str(Path(a.after).resolve())}
    with tempfile.TemporaryDirectory(prefix="hp-pair-") as tmp:
        d = Path(tmp)
        ca = TestCA(d / "pki")
        srv, cli = ca.issue("127.0.0.1"), ca.issue("bench.example.org", server=False)
        procs, https = {}, {}
        study, series, dss = make_study(a.count, a.side)
        sops = [str(x.SOPInstanceUID) for x in dss]
        try:
            for name, tree in trees.items():
                https[name] = free_port()
                (d / f"{name}.toml").write_text(
                    f"[server]\nhttps_port = {https[name]}\n"
                    f'[tls]\ncertificate = "{srv.cert}"\nprivate_key = "{srv.key}"\nca_certificates = "{ca.pem}"\n')
                procs[name] = XdsiProcess(d / f"data-{name}", config=d / f"{name}.toml",
                                          env={"XDSI_REPOSITORY_UNIQUE_ID": REPOSITORY, "PYTHONPATH": tree, "XDSI_WORKERS": "1"},  # CPU by pid
                                          prefix=["env", f"--chdir={tree}"]).start()  # `python -m xdsi` imports from its cwd first
                ingest(procs[name].dicom_port, procs[name].ae_title, dss, None)
            plain, secure = requests.Session(), requests.Session()
            secure.trust_env = False
            secure.cert, secure.verify = (str(cli.cert), str(cli.key)), str(ca.pem)
            combos = [(t, k) for t in trees for k in ("http", "https")]
            times = {c: [] for c in combos}
            scpu = {c: [] for c in combos}
            rng = random.Random(12)
            for r in range(a.rounds):
                order = combos[:]
                rng.shuffle(order)
                for t, k in order:
                    pr = procs[t]
                    url = (f"http://127.0.0.1:{pr.http_port}" if k == "http" else f"https://127.0.0.1:{https[t]}") + "/xdsi/ImagingDocumentSource"
                    out = d / f"out-{time.monotonic_ns()}"
                    s0 = process_cpu(pr.proc.pid)
                    t0 = time.perf_counter()
                    retrieve(url, study, {series: sops}, out, repository_unique_id=REPOSITORY, session=plain if k == "http" else secure)
                    times[(t, k)].append(time.perf_counter() - t0)
                    scpu[(t, k)].append(process_cpu(pr.proc.pid) - s0)
                    assert len(list(out.iterdir())) == len(sops)
                    shutil.rmtree(out)
        finally:
            for pr in procs.values():
                pr.stop()
    print(f"{a.count} x {a.side}^2 16-bit, {a.rounds} rounds, each round the 4 combinations in shuffled order; load {open('/proc/loadavg').read().split()[0]}")
    for c in combos:
        v = times[c]
        print(f"  {c[0]:6s} {c[1]:5s} median {statistics.median(v):.3f} s  min {min(v):.3f} s  server CPU median {statistics.median(scpu[c]):.3f} s")
    for t in trees:
        m = statistics.median(times[(t, 'https')]) / statistics.median(times[(t, 'http')])
        b = min(times[(t, 'https')]) / min(times[(t, 'http')])
        c = statistics.median(scpu[(t, 'https')]) / statistics.median(scpu[(t, 'http')])
        print(f"  {t}: HTTPS/HTTP median {m:.2f}  fastest {b:.2f}  server CPU {c:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
