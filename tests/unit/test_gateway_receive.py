"""xdsi.gateway.receive: the C-STOREs a remote relays to us begin as pynetdicom would begin them, byte for byte."""

from __future__ import annotations

import struct
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom import _config
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta
from pynetdicom.pdu_primitives import P_DATA

from xdsi.dimse import spool_ahead
from xdsi.gateway import receive


def _pynetdicom_meta(sop_class: str, sop_uid: str, ts: str) -> bytes:
    out = BytesIO()
    write_file_meta_info(out, create_file_meta(sop_class_uid=sop_class, sop_instance_uid=sop_uid, transfer_syntax=ts))
    return out.getvalue()


@pytest.mark.parametrize("sop_uid", ["1.2.3.4", "1.2.3.45", "1.2.826.0.1.3680043.8.498." + "1234567890" * 3 + "1234567"])
@pytest.mark.parametrize("ts", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, JPEG2000Lossless])
def test_file_meta_is_what_pynetdicom_writes(sop_uid: str, ts: str) -> None:
    """Odd and even UID lengths (NUL padding), the three syntaxes' lengths; pydicom's writer is the reference."""
    assert receive.file_meta(CTImageStorage, sop_uid, ts) == _pynetdicom_meta(CTImageStorage, sop_uid, ts)


def _store_rq_primitive(sop_uid: str, context_id: int = 1, msg_id: int = 7, dataset: bool = True) -> P_DATA:
    """A C-STORE-RQ command set as one P-DATA (one PDV, control header 0x03), encoded by pynetdicom."""
    req = C_STORE()
    req.MessageID = msg_id
    req.AffectedSOPClassUID = CTImageStorage
    req.AffectedSOPInstanceUID = sop_uid
    req.Priority = 2
    req.MoveOriginatorApplicationEntityTitle = "XDSI"
    req.MoveOriginatorMessageID = 3
    if dataset:
        req.DataSet = BytesIO(b"\x08\x00\x18\x00")
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    if not dataset:
        msg.command_set.CommandDataSetType = 0x0101
    pdata = P_DATA()
    for piece in msg.encode_msg(context_id, 0):
        for cid, value in piece.presentation_data_value_list:
            if value[0] & 1:  # the command fragment only
                pdata.presentation_data_value_list.append((cid, value))
    return pdata


def _assoc(ts: str) -> SimpleNamespace:
    cx = SimpleNamespace(transfer_syntax=[ts])
    return SimpleNamespace(_accepted_cx={1: cx})


def test_start_store_matches_pynetdicom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same message class, command set, context and spool file contents as pynetdicom's decode_msg."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", True)
    sop_uid = "1.2.826.0.1.3680043.8.498.777"
    primitive = _store_rq_primitive(sop_uid)
    assoc = _assoc(ExplicitVRLittleEndian)
    ours = receive.start_store(assoc, primitive)
    theirs = DIMSEMessage()
    assert theirs.decode_msg(primitive, assoc) is False  # a data set follows
    # ours: C_STORE_RQ as far as pynetdicom and the governor look (isinstance, the class name), its command set
    # decoded only when read (xdsi.dimse.direct.lazy_message)
    assert ours is not None and theirs.__class__ is C_STORE_RQ
    assert isinstance(ours, C_STORE_RQ) and type(ours).__name__ == "C_STORE_RQ"
    assert "_xdsi_command_set" not in ours.__dict__
    assert ours.context_id == theirs.context_id == 1
    assert ours.command_set == theirs.command_set
    assert ours.encoded_command_set.getvalue() == theirs.encoded_command_set.getvalue()
    generic = DIMSEMessage.message_to_primitive(ours)  # pynetdicom's own conversion reads the lazy command set
    assert generic.AffectedSOPInstanceUID == sop_uid and generic.MessageID == 7
    for m in (ours, theirs):
        m._data_set_file.close()
    assert Path(ours._data_set_path).read_bytes() == Path(theirs._data_set_path).read_bytes()
    assert Path(ours._data_set_path).parent == tmp_path  # where the spool keeper looks
    assert ours.message_to_primitive().AffectedSOPInstanceUID == sop_uid


def test_anything_else_is_left_to_pynetdicom(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", True)
    assoc = _assoc(ExplicitVRLittleEndian)
    no_data = _store_rq_primitive("1.2.3.4", dataset=False)
    assert receive.start_store(assoc, no_data) is None
    unknown_context = _store_rq_primitive("1.2.3.4", context_id=3)
    assert receive.start_store(assoc, unknown_context) is None
    bad_uid = _store_rq_primitive("1.2.3.4")
    cid, value = bad_uid.presentation_data_value_list[0]
    bad_uid.presentation_data_value_list[0] = (cid, value.replace(b"1.2.3.4\x00", b"1.2.3.x\x00"))
    assert receive.start_store(assoc, bad_uid) is None
    split = _store_rq_primitive("1.2.3.4")
    cid, value = split.presentation_data_value_list[0]
    split.presentation_data_value_list[0] = (cid, bytes([0x01]) + value[1:])  # not the last command fragment
    assert receive.start_store(assoc, split) is None


def test_installed_receive_primitive_hands_over_to_pynetdicom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With install(): the command starts the message here, the data set fragments and the end are pynetdicom's."""
    import tempfile

    from pynetdicom.dimse import DIMSEServiceProvider

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", True)
    queued: list = []
    assoc = _assoc(ExplicitVRLittleEndian)
    dimse = SimpleNamespace(message=None, msg_queue=SimpleNamespace(put=queued.append), cancel_req={}, assoc=assoc)
    dimse.receive_primitive = lambda p: DIMSEServiceProvider.receive_primitive(dimse, p)
    assoc.dimse = dimse
    assoc.is_acceptor = True
    monkeypatch.setattr("pynetdicom.evt.trigger", lambda *a, **k: None)
    receive.install(assoc)

    def not_pydicom(*args: object, **kwargs: object) -> None:
        raise AssertionError("the File Meta was written by pydicom, not by receive.start_store")

    monkeypatch.setattr("pynetdicom.dimse_messages.write_file_meta_info", not_pydicom)
    sop_uid = "1.2.826.0.1.3680043.8.498.778"
    dimse.receive_primitive(_store_rq_primitive(sop_uid))
    assert dimse.message is not None and isinstance(dimse.message, C_STORE_RQ) and type(dimse.message).__name__ == "C_STORE_RQ"
    body = b"\x08\x00\x18\x00" + struct.pack("<L", len(sop_uid) + 1) + sop_uid.encode() + b"\0"
    data = P_DATA()
    data.presentation_data_value_list.append((1, b"\x02" + body))
    dimse.receive_primitive(data)
    assert dimse.message is None and len(queued) == 1
    _, primitive = queued[0]
    assert primitive.AffectedSOPInstanceUID == sop_uid
    path = Path(primitive._dataset_path)
    expected = receive.PREAMBLE + receive.file_meta(CTImageStorage, sop_uid, ExplicitVRLittleEndian) + body
    # a remote's storage association to a relay (install()): the bytes are kept in memory, no file is made yet
    spool = receive.memory_spool(primitive)
    assert spool is primitive._dataset_file and spool is not None
    assert bytes(spool.buffer) == expected and not path.exists()
    assert spool.materialize() == path and path.read_bytes() == expected  # made when something needs the file
    assert receive.memory_spool(primitive) is None and path.stat().st_mode & 0o777 == 0o600


def test_memory_spool_spills_into_its_file_past_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relayed instance larger than MEMORY_LIMIT goes on in its spool file: at most that much is held per instance."""
    monkeypatch.setattr(receive, "MEMORY_LIMIT", 1000)
    spool = receive.MemorySpool(str(tmp_path / "tmpx.dcm"))
    spool.write(b"a" * 600)
    assert spool.in_memory and not (tmp_path / "tmpx.dcm").exists()
    spool.write(memoryview(b"b" * 600))
    assert not spool.in_memory and spool.buffer is None
    spool.write(b"c" * 10)
    spool.file.flush()
    spool.close()
    assert (tmp_path / "tmpx.dcm").read_bytes() == b"a" * 600 + b"b" * 600 + b"c" * 10
    assert spool.materialize() == tmp_path / "tmpx.dcm"  # already a file: nothing more to do


def test_instance_bytes_keep_the_fragments_and_answer_as_the_joined_file() -> None:
    """InstanceBytes (issue 15): the fragments are kept, not copied; slices, len, bytes() and the file written are
    those of the joined bytes; the data set that came as one fragment is a view of that very buffer."""
    meta = b"P" * 132 + b"META"
    pdu = bytearray(b"\x04hdr" + bytes(range(200)) * 5)  # a PDU body as the direct reader has it
    fragment = memoryview(pdu)[4:]
    content = receive.InstanceBytes()
    content.append(meta)
    content.append(b"")  # nothing: no part
    content.append(fragment)
    joined = meta + bytes(fragment)
    assert len(content) == len(joined) and bytes(content) == joined and len(content.parts) == 2
    for a, b in [(0, 10), (0, 136), (130, 140), (136, 500), (0, len(joined)), (900, 5000), (5000, 6000)]:
        assert content[a:b] == joined[a:b]
    assert content[:128] == joined[:128] and content[1000:] == joined[1000:]
    (view,) = content.views_from(len(meta))
    assert bytes(view) == bytes(fragment) and view.obj is pdu  # the PDU's own buffer: nothing copied
    view.release()  # the sender releases its view; the content is still whole
    assert b"".join(content.views_from(len(meta) + 10)) == joined[len(meta) + 10 :]
    across = content.views_from(100)
    assert len(across) == 2 and b"".join(across) == joined[100:] and across[1].obj is pdu  # across parts: views, not a copy
    assert content.views_from(len(joined)) == []
    with pytest.raises(TypeError):
        content[::2]
    out = BytesIO()
    content.write_to(out)
    assert out.getvalue() == joined


def test_a_relayed_instance_received_directly_is_sent_from_the_pdu_buffer(tmp_path: Path) -> None:
    """MemorySpool keeps what the direct reader writes (views of its PDU buffers) as InstanceBytes; materialized, the
    file holds exactly the bytes written."""
    spool = receive.MemorySpool(str(tmp_path / "tmpz.dcm"))
    head = receive.PREAMBLE + receive.file_meta(CTImageStorage, "1.2.3.4", ExplicitVRLittleEndian)
    spool.write(head)
    body = bytearray(b"\0" * 6 + b"x" * 70000)
    spool.write(memoryview(body)[6:])
    assert isinstance(spool.buffer, receive.InstanceBytes)
    assert [v.obj for v in spool.buffer.views_from(len(head))] == [body]
    assert spool.materialize().read_bytes() == head + b"x" * 70000


def test_memory_spool_never_overwrites_a_file(tmp_path: Path) -> None:
    """Made exclusively, like open_spool's files: an existing file of that name is an error, not overwritten."""
    (tmp_path / "tmpy.dcm").write_bytes(b"someone else's")
    spool = receive.MemorySpool(str(tmp_path / "tmpy.dcm"))
    spool.write(b"ours")
    with pytest.raises(FileExistsError):
        spool.materialize()
    assert (tmp_path / "tmpy.dcm").read_bytes() == b"someone else's"


def test_spool_file_is_where_and_as_the_spool_keeper_expects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """open_spool(): tmp*.dcm in tempfile's directory (SPOOL_PATTERNS), new (never an existing file), owner-only like mkstemp."""
    import stat
    import tempfile

    from xdsi.dimse.spool import SPOOL_PATTERNS

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    files = [receive.open_spool() for _ in range(3)]
    try:
        paths = [Path(f.name) for f in files]
        assert len(set(paths)) == 3 and all(p.parent == tmp_path for p in paths)
        spooled = set(tmp_path.glob(SPOOL_PATTERNS[0]))
        assert set(paths) <= spooled
        # the rest: empty files made ahead for the next C-STOREs (xdsi.dimse.spool_ahead), under the same pattern
        assert all(spool_ahead.waiting(p.name, p.stat().st_size) for p in spooled - set(paths))
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in spooled)
        files[0].write(b"abc")
        files[0].file.flush()  # pynetdicom's decode_msg flushes through .file
        files[0].close()
        assert paths[0].read_bytes() == b"abc"
        with pytest.raises(FileExistsError):  # "x": an existing name is never opened over
            receive.SpoolFile(str(paths[1]), "xb")
    finally:
        for f in files:
            f.close()
        spool_ahead.drain()


def _command_pdata(items: list[tuple[int, str, object]], context_id: int = 1) -> P_DATA:
    """A C-STORE-RQ command set from raw (element, VR, value) items (xdsi.dimse.direct.encode_command), one PDV."""
    from xdsi.dimse.direct import encode_command

    pdata = P_DATA()
    pdata.presentation_data_value_list.append((context_id, b"\x03" + encode_command(items)))
    return pdata


def _store_items(sop_uid: str = "1.2.826.0.1.3680043.8.498.5", priority: int = 2, ae: str | None = "XDSI",
                 mid: int | None = 3, msg_id: int = 7) -> list[tuple[int, str, object]]:
    return [(0x0002, "UI", CTImageStorage), (0x0100, "US", 0x0001), (0x0110, "US", msg_id), (0x0700, "US", priority),
            (0x0800, "US", 0x0000), (0x1000, "UI", sop_uid), (0x1030, "AE", ae), (0x1031, "US", mid)]


_PARAMETERS = ("AffectedSOPClassUID", "AffectedSOPInstanceUID", "MessageID", "Priority", "MoveOriginatorApplicationEntityTitle",
               "MoveOriginatorMessageID", "DataSet", "_context_id", "_dataset_path", "_dataset_file")


@contextmanager
def _started(items: list, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[DIMSEMessage]:
    """The message ``start_store`` begins for a C-STORE-RQ command set of ``items`` (spooled in ``tmp_path``)."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", True)
    message = receive.start_store(_assoc(ExplicitVRLittleEndian), _command_pdata(items))
    assert message is not None
    try:
        yield message
    finally:
        message._data_set_file.close()


@pytest.mark.parametrize(
    "items",
    [
        _store_items(),
        _store_items(sop_uid="1.2.826.0.1.3680043.8.498.56"),  # even length: no NUL pad
        _store_items(ae=None, mid=None),  # not a C-MOVE sub-operation
        _store_items(ae=" PACS  1 ", priority=1, msg_id=65535),  # AE spaces (pydicom strips both ends), bounds
        _store_items(ae="", mid=0, priority=0),
        _store_items(mid=None),  # an originator AE without its Message ID: passed on as pynetdicom does
    ],
)
def test_fast_primitive_is_pynetdicoms(items: list, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """message_to_primitive of a C-STORE-RQ start_store began: the same parameters as pynetdicom's own."""
    with _started(items, tmp_path, monkeypatch) as message:
        assert "message_to_primitive" in message.__dict__  # the fast path was taken
        ours, theirs = message.message_to_primitive(), DIMSEMessage.message_to_primitive(message)
        assert ours.__class__ is theirs.__class__ is C_STORE
        for name in _PARAMETERS:
            assert getattr(ours, name) == getattr(theirs, name), name


@pytest.mark.parametrize(
    "items",
    [
        _store_items(priority=5),  # invalid Priority: pynetdicom's setter refuses it, the same way on both paths
        _store_items(ae="X" * 17),  # an AE title longer than 16: pynetdicom's setter decides
    ],
)
def test_fast_primitive_refuses_what_pynetdicom_refuses(items: list, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with _started(items, tmp_path, monkeypatch) as message:
        outcomes = []
        for convert in (message.message_to_primitive, lambda: DIMSEMessage.message_to_primitive(message)):
            try:
                p = convert()
                outcomes.append(("ok", tuple(str(getattr(p, n)) for n in _PARAMETERS[:6])))
            except Exception as exc:  # noqa: BLE001 - compared, not swallowed
                outcomes.append((exc.__class__.__name__, str(exc)))
        assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize(
    "extra",
    [
        [(0x0002, "UI", CTImageStorage), (0x0100, "US", 0x0001), (0x0110, "US", 7), (0x0700, "US", 2), (0x0800, "US", 0),
         (0x0902, "LO", "comment"), (0x1000, "UI", "1.2.3.4")],  # an element a C-STORE-RQ does not carry
        _store_items(ae="A\\B"),  # an AE title with two values
    ],
)
def test_unusual_command_sets_keep_pynetdicoms_conversion(extra: list, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with _started(extra, tmp_path, monkeypatch) as message:
        assert "message_to_primitive" not in message.__dict__
