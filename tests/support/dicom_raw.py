"""Raw DICOM upper-layer bytes for hostile-peer tests and benches: what no well-behaved library sends.

Only PDU framing is built here (PS3.8 9.3); anything a real peer does is done with
pynetdicom or dcmtk instead.
"""

from __future__ import annotations

import socket
import struct
import time

from pynetdicom import AE
from pynetdicom.sop_class import Verification

A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_ABORT = 0x07


def pdu_header(pdu_type: int, length: int) -> bytes:
    """The 6-byte PDU header: type, reserved, 32-bit big-endian length of what follows."""
    return struct.pack(">BBL", pdu_type, 0, length)


def read_pdu(sock: socket.socket, timeout: float = 10.0) -> tuple[int, bytes] | None:
    """One PDU (type, body) from ``sock``, or ``None`` if the peer closed the connection first."""
    sock.settimeout(timeout)
    head = _read_exact(sock, 6)
    if head is None:
        return None
    pdu_type, _, length = struct.unpack(">BBL", head)
    body = _read_exact(sock, min(length, 1 << 20)) or b""
    return pdu_type, body


def _read_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except (ConnectionResetError, ConnectionAbortedError):
            return None
        if not chunk:
            return None
        buf += chunk
    return buf


def wait_closed(sock: socket.socket, timeout: float) -> bool:
    """True if the peer closes (EOF or reset) within ``timeout``, discarding anything it sends first."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return True
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
            return True
        except (TimeoutError, socket.timeout):
            return False


def echo(host: str, port: int, *, calling: str = "ECHOSCU", called: str = "XDSI", timeout: float = 10.0) -> tuple[bool, float, str]:
    """One pynetdicom C-ECHO: (answered with Success, seconds taken, what happened)."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    t0 = time.monotonic()
    assoc = ae.associate(host, port, ae_title=called)
    if not assoc.is_established:
        what = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no association"
        return False, time.monotonic() - t0, what
    try:
        status = assoc.send_c_echo()
        ok = bool(status) and status.Status == 0x0000
    finally:
        assoc.release()
    return ok, time.monotonic() - t0, "success" if ok else f"status {getattr(status, 'Status', None)}"
