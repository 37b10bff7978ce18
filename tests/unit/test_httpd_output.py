"""``xdsi.web.httpd.CoalescingWriter``: small response writes wait for the next one; nothing is lost or reordered."""

from __future__ import annotations

import socket
from typing import Iterator

import pytest

from xdsi.web.httpd import COALESCE_BELOW, CoalescingWriter


class _Counted:
    """Stands in for cheroot's StreamWriter: only its byte count is used."""

    bytes_written = 0


class _Recorder:
    """A socket whose ``send`` records each call and accepts at most ``limit`` bytes (a partial send)."""

    def __init__(self, limit: int | None = None) -> None:
        self.calls: list[bytes] = []
        self.limit = limit

    def send(self, data: memoryview) -> int:
        b = bytes(data[: self.limit] if self.limit else data)
        self.calls.append(b)
        return len(b)


def test_small_writes_wait_for_the_next_write() -> None:
    rec = _Recorder()
    w = CoalescingWriter(_Counted(), rec)
    big = b"x" * (COALESCE_BELOW * 3)
    w.write(b"HTTP/1.1 200 OK\r\n\r\n")
    w.write(b"--part head--\r\n")
    assert rec.calls == []  # held
    w.write(big)
    assert rec.calls == [b"HTTP/1.1 200 OK\r\n\r\n--part head--\r\n" + big]  # one send, in order
    w.write(b"\r\n--end--\r\n")
    w.write(b"0\r\n\r\n")
    assert len(rec.calls) == 1
    w.flush()
    assert rec.calls[1] == b"\r\n--end--\r\n0\r\n\r\n"
    w.flush()  # nothing held: nothing sent
    assert len(rec.calls) == 2
    assert w.raw.bytes_written == sum(map(len, rec.calls))


def test_writes_that_add_up_to_the_threshold_go_out_together() -> None:
    rec = _Recorder()
    w = CoalescingWriter(_Counted(), rec)
    piece = b"y" * (COALESCE_BELOW // 3 + 1)
    for _ in range(3):
        w.write(piece)
    assert rec.calls == [piece * 3]


def test_partial_sends_are_resumed() -> None:
    rec = _Recorder(limit=1000)
    w = CoalescingWriter(_Counted(), rec)
    data = bytes(range(256)) * 200
    w.write(data)
    assert b"".join(rec.calls) == data and len(rec.calls) == -(-len(data) // 1000)


@pytest.fixture()
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_through_a_real_socket(pair: tuple[socket.socket, socket.socket]) -> None:
    import threading

    a, b = pair
    a.settimeout(5)
    got = bytearray()

    def reader() -> None:
        while chunk := b.recv(65536):
            got.extend(chunk)

    t = threading.Thread(target=reader)
    t.start()
    w = CoalescingWriter(_Counted(), a)
    expected = b""
    for i in range(50):
        for part in (b"h%d\r\n" % i, bytes([i]) * (i * 997)):
            w.write(part)
            expected += part
    w.flush()
    a.shutdown(socket.SHUT_WR)
    t.join(timeout=10)
    assert bytes(got) == expected
