"""Direct writes put exactly pynetdicom's own PDUs on the wire, in the order the messages were sent, or nothing.

The reference is pynetdicom's ``DIMSEServiceProvider.send_msg`` (P-DATA primitives as its DUL would get
them) encoded by its own ``P_DATA_TF``; the direct writer's bytes are read back from a real socket pair.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_ECHO, C_GET, C_MOVE, C_STORE
from pynetdicom.pdu import P_DATA_TF

from xdsi.dimse import direct

CT = "1.2.840.10008.5.1.4.1.1.2"
GET_MODEL = "1.2.840.10008.5.1.4.1.2.2.3"
MOVE_MODEL = "1.2.840.10008.5.1.4.1.2.2.2"


class FakeAssoc:
    """What send_msg, the DUL hand-off and evt.trigger touch; ``sock`` is one end of a real socket pair."""

    def __init__(self, max_pdu: int, sock: socket.socket | None = None) -> None:
        self.sent: list[Any] = []
        self.events: list[Any] = []
        self.to_provider_queue: queue.Queue[Any] = queue.Queue()
        self.event_queue: queue.Queue[Any] = queue.Queue()
        self.state_machine = SimpleNamespace(current_state="Sta6", do_action=lambda event: None)
        self.dul = SimpleNamespace(
            send_pdu=self._queued, to_provider_queue=self.to_provider_queue, event_queue=self.event_queue,
            state_machine=self.state_machine, _kill_thread=False,
            socket=SimpleNamespace(socket=sock, send=lambda data: sock.sendall(data) if sock else None,
                                   recv=lambda n: bytearray(sock.recv(n)) if sock else bytearray()),
            _is_transport_event=lambda: False,
        )
        self.is_requestor = False
        self.requestor = SimpleNamespace(maximum_length=max_pdu)
        self.dimse = DIMSEServiceProvider(self)  # type: ignore[arg-type]
        self._abort_nonblocking = self._abort_blocking = lambda: None
        self.network_timeout = None
        self._sent_abort = self._kill = False

    def _queued(self, pdata: Any) -> None:
        self.sent.append(pdata)
        self.to_provider_queue.put(pdata)

    def get_handlers(self, event: Any) -> Any:
        if event is evt.EVT_DIMSE_SENT:
            return [(lambda e: self.events.append((e.message.__class__.__name__, e.message.command_set.CommandField,
                                                   e.message.command_set.CommandGroupLength)), None)]
        return []


def _wire(pdatas: list[Any]) -> bytes:
    return b"".join(P_DATA_TF(p).encode() for p in pdatas)


def _part10(tmp: Path, size: int) -> tuple[Path, int]:
    """A file with a 300-byte 'file meta' then ``size`` data set bytes: only the offset matters to the sender."""
    path = tmp / f"ds{size}.dcm"
    body = (bytes(range(3, 254)) * (size // 251 + 1))[:size]
    path.write_bytes(b"M" * 300 + body)
    return path, 300


def _store(msg_id: int, path: tuple[Path, int], originator: str | None = None) -> C_STORE:
    req = C_STORE()
    req.MessageID = msg_id
    req.Priority = 2
    req.AffectedSOPClassUID = CT
    req.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1234567890.11" + str(msg_id)  # odd and even lengths
    if originator is not None:
        req.MoveOriginatorApplicationEntityTitle = originator
        req.MoveOriginatorMessageID = 9
    req._dataset_path = path  # what Association.send_c_store sets for a file
    return req


def _pending(cls: type, remaining: int, completed: int, failed: int = 0, warning: int = 0, sop_class: str | None = GET_MODEL) -> Any:
    rsp = cls()
    rsp.MessageIDBeingRespondedTo = 5
    if sop_class is not None:
        rsp.AffectedSOPClassUID = sop_class
    rsp.Status = 0xFF00
    rsp.Identifier = None
    rsp.NumberOfRemainingSuboperations = remaining
    rsp.NumberOfCompletedSuboperations = completed
    rsp.NumberOfFailedSuboperations = failed
    rsp.NumberOfWarningSuboperations = warning
    return rsp


def _final(cls: type) -> Any:
    rsp = _pending(cls, 0, 3, 1)
    rsp.NumberOfRemainingSuboperations = None
    rsp.Status = 0xB000
    rsp.Identifier = BytesIO(b"\x08\x00\x58\x00\x06\x00\x00\x001.2.3\x00")
    return rsp


def _messages(tmp: Path, big: int = 2_500_000) -> list[tuple[Any, int]]:
    return [
        (_store(1, _part10(tmp, 40_000)), 1),
        (_pending(C_GET, 2, 1), 3),
        (_store(2, _part10(tmp, 1), originator="MOVER"), 1),  # one byte: one last fragment
        (_store(3, _part10(tmp, 0)), 5),  # empty data set: pynetdicom sends one empty last fragment
        (_pending(C_MOVE, 1, 1, 1, 1, MOVE_MODEL), 3),
        (_pending(C_GET, 0, 3, sop_class=None), 3),
        (_store(65535, _part10(tmp, big), originator="ODD"), 7),  # several runs of fragments
        (_final(C_GET), 3),
        (_final(C_MOVE), 3),
        (C_ECHO(), 1),  # not one of ours: pynetdicom's encoder, written directly
    ]


def _echo_rq(msg: Any) -> Any:
    msg.MessageID = 4
    msg.AffectedSOPClassUID = "1.2.840.10008.1.1"
    return msg


@pytest.mark.parametrize("max_pdu", [0, 16384, 28, 1_000_001])
def test_direct_writes_match_pynetdicom_byte_for_byte(tmp_path: Path, max_pdu: int) -> None:
    reference = FakeAssoc(max_pdu)
    a, b = socket.socketpair()
    fast = FakeAssoc(max_pdu, a)
    assert direct.guard(fast) is not None
    writer = direct.enable(fast)
    assert writer is not None and direct.enable(fast) is writer
    received = bytearray()
    reader = threading.Thread(target=lambda: _drain(b, received))
    reader.start()
    big = 30_000 if 0 < max_pdu < 1000 else 2_500_000  # either way more fragments than one run holds
    for (msg, cx), (msg2, _) in zip(_messages(tmp_path, big), _messages(tmp_path, big)):
        if isinstance(msg, C_ECHO):
            msg, msg2 = _echo_rq(msg), _echo_rq(msg2)
        reference.dimse.send_msg(msg, cx)
        fast.dimse.send_msg(msg2, cx)
    a.shutdown(socket.SHUT_WR)
    reader.join(10)
    assert fast.sent == []  # nothing queued: every message went straight to the socket
    assert writer.direct_messages == len(_messages(tmp_path)) and writer.queued_messages == 0
    expected = _wire(reference.sent)
    assert _reassembled(bytes(received)) == _reassembled(expected)
    if max_pdu:  # no limit (0): pynetdicom sends a data set as one PDV, we in pieces of UNLIMITED_FRAGMENT
        assert bytes(received) == expected
    else:
        assert max(_pdv_sizes(bytes(received))) <= direct.UNLIMITED_FRAGMENT
    assert fast.events == reference.events  # EVT_DIMSE_SENT: same message classes and command sets


def _pdvs(wire: bytes) -> list[tuple[int, int, bytes]]:
    """(context ID, control header, fragment) of every PDV in a stream of P-DATA-TF PDUs."""
    out, i = [], 0
    while i < len(wire):
        assert wire[i] == 0x04
        end = i + 6 + int.from_bytes(wire[i + 2 : i + 6], "big")
        j = i + 6
        while j < end:
            n = int.from_bytes(wire[j : j + 4], "big")
            out.append((wire[j + 4], wire[j + 5], wire[j + 6 : j + 4 + n]))
            j += 4 + n
        i = end
    return out


def _pdv_sizes(wire: bytes) -> list[int]:
    return [len(f) for _, _, f in _pdvs(wire)]


def _reassembled(wire: bytes) -> list[tuple[int, int, bytes]]:
    """The messages' command sets and data sets: fragments joined up to each last-fragment flag (bit 1)."""
    out, parts = [], []
    for cx, flag, fragment in _pdvs(wire):
        parts.append(fragment)
        if flag & 0x02:
            out.append((cx, flag, b"".join(parts)))
            parts = []
    assert not parts
    return out


def _drain(sock: socket.socket, into: bytearray) -> None:
    while chunk := sock.recv(1 << 20):
        into += chunk


def test_fast_command_sets_equal_pynetdicoms(tmp_path: Path) -> None:
    from pynetdicom.dimse_messages import C_GET_RSP, C_MOVE_RSP, C_STORE_RQ
    from pynetdicom.dsutils import encode

    for prim, cls in [
        (_store(7, _part10(tmp_path, 10)), C_STORE_RQ),
        (_store(8, _part10(tmp_path, 10), originator="A"), C_STORE_RQ),
        (_store(9, _part10(tmp_path, 10), originator="SIXTEEN_CHARS_AE"), C_STORE_RQ),
        (_pending(C_GET, 65535, 0), C_GET_RSP),
        (_pending(C_MOVE, 0, 65535, 3, 4, MOVE_MODEL), C_MOVE_RSP),
    ]:
        msg = cls()
        msg.primitive_to_message(prim)
        fast = direct.fast_command(prim)
        assert fast is not None and fast[1] is cls
        assert fast[0] == encode(msg.command_set, True, True)
    # messages not handled here: pynetdicom's encoder
    assert direct.fast_command(_final(C_GET)) is None
    with_comment = _pending(C_GET, 1, 1)
    with_comment.ErrorComment = "x"
    assert direct.fast_command(with_comment) is None


def test_messages_queued_before_keep_their_place(tmp_path: Path) -> None:
    """With something still in the DUL's queue, a message goes through the queue too (order kept); nothing is written."""
    a, b = socket.socketpair()
    fast = FakeAssoc(16384, a)
    direct.guard(fast)
    writer = direct.enable(fast)
    assert writer is not None
    fast.to_provider_queue.put("something queued earlier")
    fast.dimse.send_msg(_pending(C_GET, 1, 1), 3)
    assert writer.queued_messages == 1 and writer.direct_messages == 0 and len(fast.sent) == 1
    b.setblocking(False)
    with pytest.raises(BlockingIOError):
        b.recv(10)


def test_not_established_goes_through_the_dul() -> None:
    a, _b = socket.socketpair()
    fast = FakeAssoc(16384, a)
    direct.guard(fast)
    writer = direct.enable(fast)
    assert writer is not None
    fast.state_machine.current_state = "Sta13"  # e.g. released meanwhile: the state machine decides
    fast.dimse.send_msg(_pending(C_GET, 1, 1), 3)
    assert writer.direct_messages == 0 and len(fast.sent) == 1


def test_a_data_set_in_pieces_the_dul_must_send_goes_whole_and_in_order() -> None:
    """A relayed instance kept as received (InstanceBytes.views_from) that cannot be written directly (the DUL's state
    decides) is handed to pynetdicom's encoder joined: the same P-DATA as from one buffer."""
    body = bytes(range(256)) * 200
    pieces = [memoryview(bytearray(body[x:y])) for x, y in ((0, 7), (7, 30000), (30000, len(body)))]
    command = direct.encode_command([(0x0002, "UI", CT), (0x0100, "US", direct.STORE_RQ), (0x0110, "US", 1), (0x0700, "US", 2),
                                     (0x0800, "US", direct.DATA_SET_PRESENT), (0x1000, "UI", "1.2.3.4")])
    wires = []
    for data in (pieces, [memoryview(body)]):
        a, _b = socket.socketpair()
        fast = FakeAssoc(16384, a)
        direct.guard(fast)
        writer = direct.enable(fast)
        assert writer is not None
        fast.state_machine.current_state = "Sta13"
        writer._send(direct.C_STORE_RQ, command, 1, (Path("/nonexistent/not-read.dcm"), 0), data=data, in_memory=True)
        assert writer.direct_messages == 0 and writer.queued_messages == 1
        wires.append(_wire(fast.sent))
    assert wires[0] == wires[1]
    assert _reassembled(wires[0])[-1][2] == body


def test_unguarded_association_is_not_enabled() -> None:
    assert direct.enable(FakeAssoc(16384)) is None


def test_broken_transport_tells_the_dul_and_fails_the_message(tmp_path: Path) -> None:
    a, b = socket.socketpair()
    fast = FakeAssoc(16384, a)
    direct.guard(fast)
    direct.enable(fast)
    b.close()
    with pytest.raises(ConnectionError):
        fast.dimse.send_msg(_store(1, _part10(tmp_path, 300_000)), 1)
    assert fast.event_queue.get_nowait() == "Evt17"


def test_guard_serialises_the_duls_actions_and_writes() -> None:
    """guard() wraps do_action and the socket's send in the lock a direct write holds."""
    a, b = socket.socketpair()
    fast = FakeAssoc(16384, a)
    fast.dul.socket = SimpleNamespace(socket=a, send=a.sendall, recv=a.recv)
    found = direct.guard(fast)
    assert found is not None and direct.guard(fast) is found
    lock = found.lock
    order: list[str] = []
    fast.dul.state_machine.do_action  # wrapped
    with lock:
        t = threading.Thread(target=lambda: (fast.dul.state_machine.do_action("Evt9"), order.append("dul")))
        t.start()
        t.join(0.2)
        order.append("direct")  # the DUL's action waited for the lock
    t.join(5)
    assert order == ["direct", "dul"]


def test_dataset_offset_is_split_datasets(tmp_path: Path) -> None:
    """Where the data set starts, as pynetdicom's split_dataset (pydicom) finds it, for the archive's kinds of files."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pynetdicom.dsutils import split_dataset

    names = ["CT_small.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm", "no_meta_group_length.dcm"]
    for name in names:
        path = Path(get_testdata_file(name))
        assert direct.dataset_offset(path.read_bytes()[: direct.HEAD_BYTES]) == split_dataset(path)[1], name
    # a File Meta with a long (OB) element and no group length
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    del ds.file_meta["FileMetaInformationGroupLength"]
    ds.file_meta.FileMetaInformationVersion = b"\0\1"
    out = tmp_path / "nogl.dcm"
    ds.save_as(out, enforce_file_format=False)
    assert direct.dataset_offset(out.read_bytes()) == split_dataset(out)[1]
    # what it does not know: pydicom decides
    assert direct.dataset_offset(b"\0" * 50) is None
    assert direct.dataset_offset(path.read_bytes()[:140]) is None  # File Meta cut short


# -- the next instance read ahead (DirectWriter.expect / _prefetch_next / _claim) -------------------------------


def _real_part10(path: Path, fill: int, size: int = 40_000) -> Path:
    """A Part 10 file with a real File Meta (``dataset_offset`` must find its end) and ``size`` bytes of data."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CT
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = "1.2.3.4"
    ds.PixelData = bytes([fill]) * size
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def _writer(max_pdu: int = 16384, sock: socket.socket | None = None) -> tuple[FakeAssoc, direct.DirectWriter]:
    assoc = FakeAssoc(max_pdu, sock)
    assert direct.guard(assoc) is not None
    writer = direct.enable(assoc)
    assert writer is not None
    return assoc, writer


def test_read_ahead_is_used_only_for_that_file_unchanged(tmp_path: Path) -> None:
    a = _real_part10(tmp_path / "a.dcm", 1)
    b = _real_part10(tmp_path / "b.dcm", 2)
    _, writer = _writer()
    nxt = [a]
    writer.expect(lambda: nxt[0])

    writer._prefetch_next()
    ready = writer._claim(a)
    raw = a.read_bytes()
    assert ready is not None and ready.offset == direct.dataset_offset(raw[: direct.HEAD_BYTES])
    assert bytes(ready.buffer[: ready.length]) == raw
    assert writer._claim(a) is None  # used once

    writer._prefetch_next()
    assert writer._claim(b) is None  # another instance is sent: what was read is dropped

    writer._prefetch_next()  # rewritten in place, same size: the new bytes are sent, not the ones read ahead
    changed = bytearray(raw)
    changed[-1] ^= 0xFF
    before = a.stat()
    a.write_bytes(bytes(changed))
    os.utime(a, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))  # a file system clock coarser than two writes
    assert writer._claim(a) is None

    writer._prefetch_next()  # replaced by another file under the same name
    c = _real_part10(tmp_path / "c.dcm", 3)
    c.replace(a)
    assert writer._claim(a) is None
    assert (writer.prefetch_hits, writer.prefetch_misses) == (1, 3)
    assert writer.upcoming is not None  # it did find the right file once: it goes on reading ahead

    nxt[0] = None  # nothing comes next (the last instance) / not on the hot tier
    writer._prefetch_next()
    assert writer._claim(a) is None and writer.prefetch_misses == 3


def test_read_ahead_stops_when_it_never_guesses_right(tmp_path: Path) -> None:
    a = _real_part10(tmp_path / "a.dcm", 1)
    _, writer = _writer()
    writer.expect(lambda: a)
    for n in range(3):  # the instances are sent converted (from a spool), never as stored
        writer._prefetch_next()
        assert writer._claim(tmp_path / f"spool{n}") is None
    assert writer.upcoming is None
    writer.expect(None)
    assert writer.upcoming is None and writer._prefetched is None


def test_read_ahead_skips_what_it_cannot_use(tmp_path: Path) -> None:
    big = _real_part10(tmp_path / "big.dcm", 1, size=direct.RUN_BYTES + 1)  # more than one run: read as it is sent
    odd = tmp_path / "odd.dcm"
    odd.write_bytes(b"\0" * 20_000)  # no preamble/DICM: pydicom decides where its data set starts
    failing = tmp_path / "missing.dcm"
    _, writer = _writer()
    for path in (big, odd, failing):
        writer.expect(lambda path=path: path)
        writer._prefetch_next()
        assert writer._prefetched is None
    writer.expect(lambda: 1 / 0)  # an error naming the next file is the next sub-operation's to report
    writer._prefetch_next()
    assert writer._prefetched is None


@pytest.mark.parametrize("max_pdu", [0, 16384, 28])
def test_read_ahead_bytes_go_out_as_the_file_would(tmp_path: Path, max_pdu: int) -> None:
    path = _real_part10(tmp_path / "a.dcm", 7, size=30_000 if max_pdu == 28 else 300_000)
    raw = path.read_bytes()
    offset = direct.dataset_offset(raw[: direct.HEAD_BYTES])
    assert offset is not None
    command = direct.encode_command([(0x0002, "UI", CT), (0x0100, "US", direct.STORE_RQ), (0x0110, "US", 1), (0x0700, "US", 2),
                                     (0x0800, "US", direct.DATA_SET_PRESENT), (0x1000, "UI", "1.2.3.4")])
    wires = []
    for mode in ("file", "memory", "pieces"):
        a, b = socket.socketpair()
        _, writer = _writer(max_pdu, a)
        received = bytearray()
        reader = threading.Thread(target=lambda: _drain(b, received))
        reader.start()
        if mode == "memory":
            writer.expect(lambda: path)
            writer._prefetch_next()
            ready = writer._claim(path)
            assert ready is not None
            data = memoryview(ready.buffer)[ready.offset : ready.length]
            writer._send(direct.C_STORE_RQ, command, 1, (path, offset), data=data)
        elif mode == "pieces":  # a relayed instance as it arrived (InstanceBytes.views_from): PDV boundaries fall inside pieces
            body = raw[offset:]
            cuts = [0, 1, 7, 131060 % len(body), 2 * 131060 % len(body), len(body)]
            cuts = sorted(set(cuts))
            pieces = [memoryview(bytearray(body[x:y])) for x, y in zip(cuts, cuts[1:])]
            given = list(pieces)
            writer._send(direct.C_STORE_RQ, command, 1, (path, offset), data=pieces, in_memory=True)
            assert pieces == given  # the caller's list is not consumed
        else:
            writer._send(direct.C_STORE_RQ, command, 1, (path, offset))
        a.shutdown(socket.SHUT_WR)
        reader.join(10)
        wires.append(bytes(received))
        assert writer.direct_messages == 1
    assert wires[0] == wires[1] == wires[2]
    assert _reassembled(wires[1])[-1][2] == raw[offset:]


def test_held_pending_move_responses_keep_their_order(tmp_path: Path) -> None:
    """C-MOVE: a Pending response held back until the sub-association's next C-STORE is written (flush), or until
    anything else is sent on the association, in the order sent; nothing is lost or sent twice."""
    reference = FakeAssoc(16384)
    a, b = socket.socketpair()
    fast, writer = _writer(16384, a)
    received = bytearray()
    reader = threading.Thread(target=lambda: _drain(b, received))
    reader.start()
    writer.hold_pending = True
    sent_events = len(fast.events)
    fast.dimse.send_msg(_pending(C_MOVE, 2, 1, sop_class=MOVE_MODEL), 3)
    assert writer._held is not None and len(fast.events) == sent_events  # not sent yet, no EVT_DIMSE_SENT yet
    writer.flush()  # what the sub-association's writer calls after its next C-STORE
    writer.flush()  # nothing held: nothing more
    fast.dimse.send_msg(_pending(C_MOVE, 1, 2, sop_class=MOVE_MODEL), 3)
    fast.dimse.send_msg(_final(C_MOVE), 3)  # the final response takes the held one out first
    assert writer._held is None
    for msg in (_pending(C_MOVE, 2, 1, sop_class=MOVE_MODEL), _pending(C_MOVE, 1, 2, sop_class=MOVE_MODEL), _final(C_MOVE)):
        reference.dimse.send_msg(msg, 3)
    a.shutdown(socket.SHUT_WR)
    reader.join(10)
    assert bytes(received) == _wire(reference.sent)
    assert fast.events == reference.events


@pytest.mark.parametrize("timeout", [5.0, None])
def test_send_all_resumes_partial_writes_in_order(timeout: float | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """_send_all: with a timeout (non-blocking descriptor: writev, no poll first) and without (sendmsg MSG_DONTWAIT), a
    message far larger than the socket buffers arrives whole and in order while the peer reads slowly."""
    writev, writes = os.writev, []

    def counting(fd: int, views: Any) -> int:
        writes.append(fd)
        return writev(fd, views)

    monkeypatch.setattr(direct.os, "writev", counting)
    a, b = socket.socketpair()
    try:
        a.settimeout(timeout)
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        parts: list[Any] = [os.urandom(n) for n in (6, 70000, 1, 300000, 12)] + [memoryview(os.urandom(4096))[100:200], bytearray(b"end")]
        want = b"".join(bytes(p) for p in parts)
        got = bytearray()

        def read() -> None:
            while len(got) < len(want):
                chunk = b.recv(8192)
                if not chunk:
                    return
                got.extend(chunk)

        reader = threading.Thread(target=read)
        reader.start()
        given = list(parts)
        direct._send_all(a, parts, timeout=10.0)
        reader.join(10)
        assert bytes(got) == want
        assert len(parts) == len(given) and all(p is q for p, q in zip(parts, given))  # the caller's list as it was
        assert bool(writes) == (timeout is not None)
    finally:
        a.close()
        b.close()


def test_send_all_to_a_peer_that_does_not_read_is_cut_when_stopped() -> None:
    a, b = socket.socketpair()
    try:
        a.settimeout(5.0)
        calls = []

        def stop() -> bool:
            calls.append(1)
            return len(calls) > 2

        with pytest.raises(direct.Aborted):
            direct._send_all(a, [os.urandom(8 << 20)], stop)
    finally:
        a.close()
        b.close()


def test_a_file_not_read_ahead_is_read_whole_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """send_c_store without a read-ahead (the relay's next instance arrived late) takes the file through _read_small:
    one open, the whole file, the data set offset the head gives; what it cannot use (large, no preamble, missing)
    is None, so the file is read as it is sent, as before."""
    import builtins

    path = _real_part10(tmp_path / "a.dcm", 5, size=200_000)
    raw = path.read_bytes()
    _, writer = _writer()
    opened: list[Any] = []
    real_open = builtins.open

    def counting_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    ready = writer._read_small(path)
    assert opened == [path]
    assert ready is not None and bytes(ready.buffer[: ready.length]) == raw
    assert ready.offset == direct.dataset_offset(raw[: direct.HEAD_BYTES])
    monkeypatch.setattr(builtins, "open", real_open)
    big = _real_part10(tmp_path / "big.dcm", 1, size=direct.RUN_BYTES + 1)
    odd = tmp_path / "odd.dcm"
    odd.write_bytes(b"\0" * 20_000)
    for unusable in (big, odd, tmp_path / "missing.dcm"):
        assert writer._read_small(unusable) is None


@pytest.mark.parametrize("code", [0x0000, 0xB000, 0xA711, 0xC211])
def test_a_plain_status_reads_as_pydicoms(code: int) -> None:
    """PlainStatus answers Status from the bytes read; every other way in, and after a change, is pydicom's."""
    from pydicom.dataset import Dataset

    status = direct.PlainStatus(code.to_bytes(2, "little"))
    reference = Dataset()
    reference.Status = code
    assert status.Status == getattr(status, "Status", None) == code
    assert status.get("Status") == status[0x00000900].value == code and "Status" in status and status == reference
    assert status.Status == code  # the element converted by status[tag] above: pydicom's answer now, the same
    status.Status = 0x0107  # set through Dataset.__setattr__: the property follows it
    assert status.Status == 0x0107 == status[0x00000900].value
