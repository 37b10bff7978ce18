"""Running ``xdsi serve`` as a real process, the way users run it, for integration tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Sequence


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A loopback port free for ``kind`` (TCP by default, ``socket.SOCK_DGRAM`` for UDP) at the time of asking."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class XdsiProcess:
    """``xdsi serve`` in a subprocess; its output is kept in ``log`` for failing tests to show."""

    def __init__(
        self,
        data_dir: Path,
        *,
        config: Path | None = None,
        ae_title: str = "XDSI",
        env: dict[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        self.data_dir = data_dir
        self.config = config
        self.ae_title = ae_title
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.env = {**os.environ, **(env or {})}
        self.prefix = list(prefix)
        self.proc: subprocess.Popen[str] | None = None
        self.log: list[str] = []

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def start(self, timeout: float = 30) -> "XdsiProcess":
        cmd = [
            *self.prefix,
            sys.executable,
            "-m",
            "xdsi",
            "serve",
            "--data-dir",
            str(self.data_dir),
            "--dicom-port",
            str(self.dicom_port),
            "--http-port",
            str(self.http_port),
            "--ae-title",
            self.ae_title,
        ]
        if self.config:
            cmd += ["--config", str(self.config)]
        self.log = []
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env)
        ready = threading.Event()

        def pump() -> None:
            assert self.proc and self.proc.stdout
            for line in self.proc.stdout:
                self.log.append(line)
                if line.startswith("xdsi serving"):
                    ready.set()

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.time() + timeout
        while not ready.wait(0.05):
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError("xdsi serve did not start:\n" + "".join(self.log))
        return self

    def stop(self, timeout: float = 20) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.returncode
        self.proc = None
        return rc

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def output(self) -> str:
        return "".join(self.log)


def c_store(proc: "XdsiProcess", paths: Sequence[Path], ae_title: str = "MODALITY") -> None:
    """Store ``paths`` (CT Image Storage) into a running xdsi over one pynetdicom association; each must succeed."""
    from pydicom import dcmread
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    ae = AE(ae_title=ae_title)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", proc.dicom_port, ae_title=proc.ae_title)
    assert assoc.is_established
    try:
        for p in paths:
            assert assoc.send_c_store(dcmread(p)).Status == 0
    finally:
        assoc.release()


def wait_until(pred, seconds: float = 30.0):  # type: ignore[no-untyped-def]
    """``pred()``'s first true value, polled every 0.2 s; AssertionError when none comes within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError("condition not met in time")
