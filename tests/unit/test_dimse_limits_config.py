"""``[dimse]`` limits: parsing, defaults, refusals, and the pynetdicom read pattern the PDU guard relies on."""

from __future__ import annotations

import socket
import struct
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from xdsi.config import ConfigError, DimseLimits, load_settings
from xdsi.dimse.limits import PduGuard, PduTooLarge, check_pynetdicom_reader


def load(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    p = tmp_path / "xdsi.toml"
    p.write_text(text)
    return load_settings(p, env={})


def test_defaults_are_bounded() -> None:
    d = DimseLimits()
    assert 4096 <= d.max_pdu_size <= 16 * 2**20
    assert d.max_associate_rq <= 2**20
    assert 0 < d.associate_timeout <= 30 and 0 < d.idle_timeout
    assert 1 <= d.max_associations_per_ae and 1 <= d.max_associations_per_address and 1 <= d.max_pending


def test_parsed_from_dimse_section(tmp_path: Path) -> None:
    s = load(tmp_path, '[dimse]\nmax_pdu_size = "256 KiB"\nmax_associate_rq = 32768\nassociate_timeout = 2.5\n'
                       "max_pending = 9\nmax_associations_per_ae = 2\nmax_associations_per_address = 3\nidle_timeout = 60\n"
                       "max_associations = 5\n")
    assert s.dimse_limits == DimseLimits(256 * 1024, 32768, 2.5, 9, 2, 3, 60.0)
    assert s.max_associations == 5


@pytest.mark.parametrize(
    "text,expected",
    [
        ("max_pdu_size = 0", "max_pdu_size"),
        ("max_pdu_size = 1024", "between 4 KiB and 256 MiB"),
        ("max_pdu_size = '1 GiB'", "between 4 KiB and 256 MiB"),
        ("max_associate_rq = 10", "max_associate_rq"),
        ("associate_timeout = 0", "associate_timeout"),
        ("idle_timeout = -1", "idle_timeout"),
        ("max_pending = 0", "max_pending"),
        ("max_associations_per_ae = 'many'", "max_associations_per_ae"),
        ("max_pdu = 5", "unknown key"),
    ],
)
def test_bad_values_are_refused(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load(tmp_path, f"[dimse]\n{text}\n")


def test_pynetdicom_reads_pdus_the_way_the_guard_expects() -> None:
    check_pynetdicom_reader()  # raises if an upgrade changed recv(6) / recv(pdu_length)


class _Holder:
    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock


def test_guard_refuses_an_oversize_pdu_after_its_header() -> None:
    a, b = socket.socketpair()
    with a, b:
        holder = _Holder(a)
        guard = PduGuard(holder, DimseLimits(max_pdu_size=8192, max_associate_rq=2048), network_timeout=5)
        assert holder.recv == guard.recv  # installed where pynetdicom's DUL calls it
        b.sendall(struct.pack(">BBL", 0x04, 0, 9000) + b"x" * 100)
        head = holder.recv(6)
        assert struct.unpack(">BBL", head)[2] == 9000
        with pytest.raises(PduTooLarge):
            holder.recv(9000)
        b.settimeout(2)
        answer = b.recv(100)
        assert answer[:1] == b"\x07" and answer[8:10] == bytes([2, 6])  # A-ABORT, provider, invalid PDU parameter


def test_guard_passes_pdus_within_the_limit_and_enforces_the_request_deadline() -> None:
    a, b = socket.socketpair()
    with a, b:
        holder = _Holder(a)
        guard = PduGuard(holder, DimseLimits(associate_timeout=0.5), network_timeout=5)
        body = b"y" * 300
        threading.Timer(0.05, lambda: b.sendall(struct.pack(">BBL", 0x01, 0, 300) + body)).start()
        assert holder.recv(6)[:1] == b"\x01"
        assert bytes(holder.recv(300)) == body
        b.sendall(struct.pack(">BBL", 0x01, 0, 300) + b"z")  # then the peer stalls
        holder.recv(6)
        with pytest.raises(TimeoutError):
            holder.recv(300)
        guard.deadline = None  # once associated, only network_timeout applies


def test_guard_reads_waiting_bytes_directly_and_still_times_out_and_sees_the_close() -> None:
    """Once associated, bytes already waiting are read without a poll (os.read of the non-blocking descriptor);
    bytes that come later, in pieces, are waited for with the network timeout; a silent peer times out; a
    peer that closes part-way gives what came."""
    a, b = socket.socketpair()
    with a, b:
        holder = _Holder(a)
        guard = PduGuard(holder, DimseLimits(max_pdu_size=65536), network_timeout=0.5)
        guard.deadline = None
        b.sendall(struct.pack(">BBL", 0x04, 0, 30000) + b"a" * 10000)
        threading.Timer(0.05, lambda: b.sendall(b"b" * 10000)).start()
        threading.Timer(0.15, lambda: b.sendall(b"c" * 10000)).start()
        assert struct.unpack(">BBL", holder.recv(6))[2] == 30000
        assert bytes(holder.recv(30000)) == b"a" * 10000 + b"b" * 10000 + b"c" * 10000
        assert a.gettimeout() == 0.5  # the timeout is set once, not per read
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            holder.recv(6)
        assert 0.4 < time.monotonic() - t0 < 3
        b.sendall(struct.pack(">BBL", 0x04, 0, 100) + b"d" * 40)
        b.close()
        assert len(holder.recv(6)) == 6
        assert bytes(holder.recv(100)) == b"d" * 40  # the peer closed: what came, no more


def test_guard_reads_into_one_buffer_that_grows_only_as_bytes_come() -> None:
    """A PDU is read into the buffer returned (no bytes object per read, no copy onto a growing buffer: issue 15),
    allocated up to READ_AHEAD_ALLOCATION ahead of the data; a longer PDU's buffer grows as its bytes arrive, so a
    declared length alone never makes the guard allocate more; recv_upto takes what has arrived, up to ``most``."""
    from xdsi.dimse.limits import READ_AHEAD_ALLOCATION

    a, b = socket.socketpair()
    with a, b:
        holder = _Holder(a)
        guard = PduGuard(holder, DimseLimits(max_pdu_size=64 << 20), network_timeout=2)
        guard.deadline = None
        big = bytes(range(256)) * ((3 * READ_AHEAD_ALLOCATION) // 256 + 7)  # past two doublings, in pieces
        sender = threading.Thread(target=lambda: [b.sendall(big[i : i + 65536]) for i in range(0, len(big), 65536)])
        sender.start()
        got = holder.recv(len(big))
        sender.join(10)
        assert isinstance(got, bytearray) and got == big
        b.sendall(b"h" * 10 + b"next!!")
        assert bytes(guard.recv_upto(10, 16)) == b"h" * 10 + b"next!!"  # the next header, already there, in the same read
        tracemalloc.start()
        try:
            b.sendall(b"e" * 100)
            b.shutdown(socket.SHUT_WR)  # the peer announced 200 MB, sent 100 bytes and closed
            assert bytes(holder.recv(200 << 20)) == b"e" * 100
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 2 * READ_AHEAD_ALLOCATION
