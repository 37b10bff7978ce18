"""A TCP port on the host's 127.0.0.1 that reaches a port inside a private network namespace.

dcmtk's storescp listens on every interface, so the tests run it inside a
namespace holding only loopback (:mod:`tests.support.netns`).  A server under
test that must stay reachable from the host (HTTP, DIMSE) cannot live in that
namespace too; instead its C-MOVE destination is this relay:

    host 127.0.0.1:port --(unix socket, which crosses namespaces)--> inside the namespace 127.0.0.1:target

The host half runs as a thread of the test process; the namespace half is
this file run with ``ip netns exec NS python nsrelay.py SOCKET PORT``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # this file also runs as a script inside the namespace, without the tests package
    from tests.support.netns import NetNS


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(1 << 16):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (dst, src):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _serve(listener: socket.socket, connect: Callable[[], socket.socket], stop: threading.Event) -> None:
    """Accept until ``stop``; each connection is joined to a fresh ``connect()`` by two pump threads."""
    listener.settimeout(0.2)
    while not stop.is_set():
        try:
            client, _ = listener.accept()
        except socket.timeout:
            continue
        except OSError:
            return
        try:
            upstream = connect()
        except OSError:
            client.close()
            continue
        for s in (client, upstream):
            if s.family == socket.AF_INET:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_pump, args=(client, upstream), daemon=True).start()
        threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()


class NsRelay:
    """``port`` on the host's 127.0.0.1 forwards to ``target_port`` on 127.0.0.1 inside ``ns``."""

    def __init__(self, ns: NetNS, target_port: int) -> None:
        self.ns = ns
        self.target_port = target_port
        self._dir = Path(tempfile.mkdtemp(prefix="xdsi-relay-"))
        self.socket_path = self._dir / "relay.sock"
        self._proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._listener = socket.socket()
        self.port = 0

    def __enter__(self) -> "NsRelay":
        self._proc = subprocess.Popen(
            self.ns.cmd(sys.executable, str(Path(__file__).resolve()), str(self.socket_path), str(self.target_port)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 10
        while not self.socket_path.exists():
            if self._proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("the namespace half of the relay did not start")
            time.sleep(0.02)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port = self._listener.getsockname()[1]

        def connect() -> socket.socket:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(self.socket_path))
            return s

        threading.Thread(target=_serve, args=(self._listener, connect, self._stop), daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._listener.close()
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self.socket_path.unlink(missing_ok=True)
        os.rmdir(self._dir)


def _namespace_half(socket_path: str, port: int) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    listener.listen(16)

    def connect() -> socket.socket:
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.settimeout(None)
        return s

    _serve(listener, connect, threading.Event())


if __name__ == "__main__":
    _namespace_half(sys.argv[1], int(sys.argv[2]))
