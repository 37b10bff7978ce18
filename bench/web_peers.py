"""What the web benchmarks (``bench/retrieve.py``, ``bench/web.py``) share: a private network namespace, Orthanc beside xdsi.

Orthanc (with its DICOMweb plugin) is started by the shared peer scripts
(``/work/shared/peers``, or ``BENCH_PEERS``) on ports of our own
(``BENCH_PORT_BASE``) in our own namespace (``BENCH_NETNS``, default
``bench-web-perf``), so benchmarks of other people on the same machine never
stop ours.  The benchmark re-executes itself inside the namespace, where xdsi
binds 127.0.0.1 as usual and every client (curl, requests) reaches both
servers over the namespace's loopback only.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

from bench.peers import STORESCU, Netns, peer, stop_peer

NS = Netns.from_env("bench-web-perf", 24600)


class Orthanc:
    """Orthanc + DICOMweb from the peer scripts, loaded with a folder of instances by storescu; stopped and wiped by :meth:`stop`."""

    def __init__(self, work: Path) -> None:
        self.env = NS.peer_env(work)
        self.dicom_port = NS.port(1)
        self.http_port = NS.port(2)
        self.started = False

    @property
    def dicomweb(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def start(self, fresh: bool = True) -> "Orthanc":
        peer("start_orthanc.sh", self.env, *(["--fresh"] if fresh else []))
        self.started = True
        return self

    @property
    def pid(self) -> int:
        return int((Path(self.env["BENCH_ROOT"]) / "orthanc" / "orthanc.pid").read_text().strip())

    def load(self, folder: Path) -> None:
        r = subprocess.run([STORESCU, "-aet", "BENCH", "-aec", "ORTHANC", "+sd", "127.0.0.1", str(self.dicom_port), str(folder)],
                           env=self.env, capture_output=True, text=True, timeout=900)  # fmt: skip
        if r.returncode != 0:
            raise RuntimeError(f"storescu to Orthanc failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")

    def stop(self, wipe: bool = True) -> None:
        if self.started:
            stop_peer("stop_orthanc.sh", self.env, *(["--wipe"] if wipe else []))
            self.started = False

    def restart(self) -> None:
        """Stopped and started again on the same storage: its caches are cold, the page cache is not."""
        self.stop(wipe=False)
        self.start(fresh=False)


class RssPeak:
    """Samples a process's RSS every 10 ms while in the ``with`` block: ``before`` and ``peak`` in bytes."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.proc = psutil.Process(pid)
        self.before = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._th = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except Exception:
                return
            time.sleep(0.01)

    def __enter__(self) -> "RssPeak":
        self.before = self.peak = self.proc.memory_info().rss
        self._th.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._th.join()

    @property
    def growth(self) -> int:
        return self.peak - self.before


LAST_TTFB: list[float] = [0.0]


def curl(args: list[str], timeout: float = 600) -> tuple[float, int]:
    """Run curl (body to /dev/null); (seconds of the transfer as curl measured it, bytes downloaded).

    Raises unless the answer is 200.  Curl's own total time leaves out its start-up; the time to the
    first byte (the server's work before it answers) is kept in ``LAST_TTFB[0]``.
    """
    cmd = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{time_total} %{time_starttransfer}", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    code, size, total, first = (r.stdout.strip().split(" ") + ["0", "0", "0"])[:4]
    if r.returncode != 0 or code != "200":
        raise RuntimeError(f"{' '.join(cmd)}: curl exit {r.returncode}, HTTP {code}: {r.stderr[-500:]}")
    LAST_TTFB[0] = float(first)
    return float(total), int(size)
