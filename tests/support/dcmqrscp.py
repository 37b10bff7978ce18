"""dcmtk ``dcmqrscp`` as a remote PACS for the gateway tests and bench, inside a private network namespace.

dcmqrscp listens on every interface and knows its C-MOVE destinations only from its configuration
file (HostTable), so each instance gets its own config, storage area (files copied in and indexed
with ``dcmqridx``) and, with ``get=False``, ``--disable-get``: a PACS that offers C-MOVE only, as
most do.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence

DCMQRSCP = "/usr/bin/dcmqrscp"
DCMQRIDX = "/usr/bin/dcmqridx"
ECHOSCU = "/usr/bin/echoscu"


def available() -> bool:
    return all(Path(p).is_file() for p in (DCMQRSCP, DCMQRIDX, ECHOSCU))


class Dcmqrscp:
    """One dcmqrscp: ``start()`` / ``stop()``; ``destinations`` maps AE title -> (host, port) (its HostTable)."""

    def __init__(self, prefix: Sequence[str], root: Path, ae_title: str, port: int,
                 destinations: Mapping[str, tuple[str, int]], *, get: bool = True) -> None:
        self.prefix = list(prefix)
        self.root = root
        self.ae_title = ae_title
        self.port = port
        self.destinations = dict(destinations)
        self.get = get
        self.storage = root / "storage"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "dcmqrscp.log"

    def load(self, files: Iterable[Path]) -> None:
        """Copy ``files`` into the storage area and index them."""
        self.storage.mkdir(parents=True, exist_ok=True)
        copies = []
        for f in files:
            dst = self.storage / f.name
            shutil.copyfile(f, dst)
            copies.append(str(dst))
        for i in range(0, len(copies), 200):
            subprocess.run([DCMQRIDX, str(self.storage), *copies[i:i + 200]], check=True, capture_output=True)

    def _config(self) -> Path:
        hosts = "\n".join(f"h{i} = ({aet}, {host}, {port})" for i, (aet, (host, port)) in enumerate(self.destinations.items()))
        names = ", ".join(f"h{i}" for i in range(len(self.destinations)))
        cfg = self.root / "dcmqrscp.cfg"
        cfg.write_text(
            f"NetworkTCPPort = {self.port}\nMaxPDUSize = 16384\nMaxAssociations = 16\n\n"
            f"HostTable BEGIN\n{hosts}\nall = {names}\nHostTable END\n\n"
            'VendorTable BEGIN\n"all" = all\nVendorTable END\n\n'
            f"AETable BEGIN\n{self.ae_title} {self.storage} RW (500, 1024mb) ANY\nAETable END\n"
        )
        return cfg

    def start(self) -> "Dcmqrscp":
        self.storage.mkdir(parents=True, exist_ok=True)
        cmd = [*self.prefix, DCMQRSCP, "--fork", *(["-d"] if os.environ.get("DCMQRSCP_DEBUG") else []), "-c", str(self._config())]
        if not self.get:
            cmd.append("--disable-get")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={"TCP_NODELAY": "1"})
        deadline = time.time() + 20
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dcmqrscp exited: {self.log.read_text()}")
            ok = subprocess.run([*self.prefix, ECHOSCU, "-to", "2", "-aec", self.ae_title, "127.0.0.1", str(self.port)],
                                capture_output=True, env={"TCP_NODELAY": "1"})
            if ok.returncode == 0:
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("dcmqrscp did not answer C-ECHO")

    def stop(self) -> None:
        if os.environ.get("DCMQRSCP_DEBUG"):
            shutil.copyfile(self.log, f"/tmp/{self.ae_title}.log")
        """End dcmqrscp and the children it forked for associations (by their PIDs)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        kids = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout.split()
        self.proc.terminate()
        for k in kids:
            subprocess.run(["kill", "-TERM", k], capture_output=True)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
