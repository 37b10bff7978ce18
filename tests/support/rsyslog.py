"""A real Audit Record Repository for tests: Debian's rsyslogd with rsyslog-gnutls on loopback.

It listens on TLS (RFC 5425, mutual authentication with certificates made here by
``cryptography``) and UDP (RFC 5426) and writes each message it receives as one line
(%msg%, control characters escaped by rsyslog) to a file.  It can be stopped and
started again on the same ports, which is how the tests take the repository away.

Its main queue is "Direct" (each message written by the receiving thread), as an ARR
that must not lose what it accepted would be configured: with rsyslog's default
in-memory queue, a stop can drop messages rsyslog had already read from the
connection, which no sender can see or repair (measured while testing the sender).
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from typing import TYPE_CHECKING

from tests.support.pki import TestCA

if TYPE_CHECKING:
    from lxml import etree
from tests.support.server import free_port

RSYSLOGD = "/usr/sbin/rsyslogd"


def available() -> bool:
    """rsyslogd and its GnuTLS network stream driver (package rsyslog-gnutls) are installed."""
    return os.access(RSYSLOGD, os.X_OK) and any(Path("/usr/lib").glob("*/rsyslog/lmnsd_gtls.so"))


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def client_context(self) -> ssl.SSLContext:
        """What xdsi would use: TLS 1.2+, the repository verified against our CA, our certificate offered."""
        ctx = ssl.create_default_context(cafile=str(self.ca))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(self.client_cert), str(self.client_key))
        return ctx


def make_pki(folder: Path) -> Pki:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate (tests.support.pki)."""
    ca = TestCA(folder)
    server = ca.issue("127.0.0.1", also=("localhost",), client=False)
    client = ca.issue("xdsi-node", server=False)
    return Pki(ca.pem, server.cert, server.key, client.cert, client.key)


class Rsyslog:
    """rsyslogd in the foreground (-n) with its own configuration, pid file and work directory."""

    def __init__(self, folder: Path, pki: Pki) -> None:
        self.folder = folder
        self.pki = pki
        self.tls_port = free_port()
        self.udp_port = free_port(socket.SOCK_DGRAM)
        self.out = folder / "received.log"
        self.conf = folder / "rsyslog.conf"
        (folder / "work").mkdir(parents=True, exist_ok=True)
        self.conf.write_text(f"""
global(workDirectory="{folder / 'work'}" maxMessageSize="256k"
       DefaultNetstreamDriver="gtls"
       DefaultNetstreamDriverCAFile="{pki.ca}"
       DefaultNetstreamDriverCertFile="{pki.server_cert}"
       DefaultNetstreamDriverKeyFile="{pki.server_key}")
main_queue(queue.type="Direct")
module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" StreamDriver.AuthMode="x509/certvalid")
input(type="imtcp" address="127.0.0.1" port="{self.tls_port}")
module(load="imudp")
input(type="imudp" address="127.0.0.1" port="{self.udp_port}")
template(name="audit" type="string" string="%inputname% %app-name% %msgid% %msg%\\n")
action(type="omfile" file="{self.out}" template="audit")
""")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def tls_url(self) -> str:
        return f"tls://127.0.0.1:{self.tls_port}"

    @property
    def udp_url(self) -> str:
        return f"udp://127.0.0.1:{self.udp_port}"

    def start(self) -> None:
        assert self.proc is None
        check = subprocess.run([RSYSLOGD, "-N1", "-f", str(self.conf)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr + check.stdout
        self.proc = subprocess.Popen(
            [RSYSLOGD, "-n", "-f", str(self.conf), "-i", str(self.folder / "rsyslogd.pid")],
            stdout=open(self.folder / "rsyslogd.out", "ab"), stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # listening once a TLS handshake with our client certificate succeeds
            assert self.proc.poll() is None, (self.folder / "rsyslogd.out").read_text()
            try:
                with socket.create_connection(("127.0.0.1", self.tls_port), timeout=1) as raw:
                    with self.pki.client_context().wrap_socket(raw, server_hostname="127.0.0.1"):
                        return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError("rsyslogd did not start listening")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def audit_messages(self, source_id: str) -> list["etree._Element"]:
        """Every message whose AuditSourceID is ``source_id`` that rsyslog wrote, each checked against the PS3.15 schema."""
        from tests.support.audit_schema import check_audit_message

        out = []
        for line in self.lines():
            _inp, _app, _msgid, msg = line.split(" ", 3)
            xml = msg.lstrip("\ufeff").encode("utf-8")
            if f'AuditSourceID="{source_id}"'.encode() in xml:
                out.append(check_audit_message(xml))
        return out

    def lines(self) -> list[str]:
        """The complete lines written so far (a last line rsyslog is still writing is left for the next read)."""
        if not self.out.exists():
            return []
        text = self.out.read_text(encoding="utf-8", errors="replace")
        return text[: text.rfind("\n") + 1].splitlines()


@contextmanager
def running(folder: Path) -> Iterator[Rsyslog]:
    """An Audit Record Repository with its own PKI under ``folder``, started, and stopped afterwards."""
    r = Rsyslog(folder, make_pki(folder / "pki"))
    r.start()
    try:
        yield r
    finally:
        r.stop()


@contextmanager
def running_if_available(folder: Path) -> Iterator[Rsyslog | None]:
    """:func:`running`, or None where rsyslogd and rsyslog-gnutls are not installed (the audit assertions then skip)."""
    if not available():
        yield None
        return
    with running(folder) as r:
        yield r
