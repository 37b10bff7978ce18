"""The start of each C-STORE a remote sends us for a relay, without pydicom writing the File Meta.

Why: with ``_config.STORE_RECV_CHUNKED_DATASET`` pynetdicom (3.0) begins every incoming C-STORE-RQ by
building a pydicom ``FileMetaDataset`` (``dsutils.create_file_meta``, every UID validated on
assignment) and writing it with ``pydicom.filewriter.write_file_meta_info`` into the spool file:
measured (cProfile of the remote's storage association in bench/gateway.py) about a fifth of the CPU
its DUL thread spends per relayed instance, and that thread was the largest single cost of a C-GET
served by C-MOVE.  The File Meta is seven fixed elements of which three change per instance
(PS3.10 7.1), so here it is packed as bytes, byte for byte what pynetdicom writes
(tests/unit/test_gateway_receive.py compares them).

:func:`install` wraps one association's ``dimse.receive_primitive`` (an instance attribute; nothing
process-wide changes).  Only a P-DATA that is exactly one PDV carrying a whole C-STORE-RQ command set
(control header 0x03) that announces a data set, on an accepted context, when nothing is half
received, is taken here: the command set is decoded by pynetdicom's own ``dsutils.decode`` (the
reactor's ``message_to_primitive`` reads it), the spool file is opened where and as pynetdicom's
``NamedTemporaryFile(delete=False, suffix=".dcm")`` is (``tmp*.dcm`` in ``tempfile.tempdir``, which the
spool keeper knows; :func:`open_spool`, a plain unbuffered file), and the message is left as pynetdicom's ``DIMSEProvider.message``, so every data set
fragment, the end of the message, ``EVT_DIMSE_RECV``, the spool keeper's clean-up of a partial
transfer, all stay pynetdicom's.  Anything else goes to pynetdicom unchanged.
"""

from __future__ import annotations

import io
import itertools
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, _config
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

from xdsi.dimse import spool_ahead
from xdsi.dimse.direct import lazy_message, parse_command
from xdsi.process_tag import process_tag
from xdsi.uids import is_valid_uid

_MARK = "_xdsi_relay_receive"
_SHORT = struct.Struct("<HH2sH")  # group, element, VR, 2-byte length (Explicit VR Little Endian, PS3.5 7.1.2)
_GROUP_LENGTH = struct.Struct("<HH2sHL")
_VERSION = struct.pack("<HH2s2sL", 0x0002, 0x0001, b"OB", b"\0\0", 2) + b"\x00\x01"
PREAMBLE = b"\0" * 128 + b"DICM"
STORE_RQ, NO_DATA_SET = 0x0001, 0x0101


def _element(element: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
    if len(value) % 2:
        value += pad
    return _SHORT.pack(0x0002, element, vr, len(value)) + value


_TAIL = _element(0x0012, b"UI", str(PYNETDICOM_IMPLEMENTATION_UID).encode("ascii"), b"\0") + _element(
    0x0013, b"SH", PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii"), b" "
)


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Group 0002 as ``write_file_meta_info(create_file_meta(...))`` writes it (after the preamble and ``DICM``)."""
    body = b"".join((
        _VERSION,
        _element(0x0002, b"UI", sop_class_uid.encode("ascii"), b"\0"),
        _element(0x0003, b"UI", sop_instance_uid.encode("ascii"), b"\0"),
        _element(0x0010, b"UI", transfer_syntax.encode("ascii"), b"\0"),
        _TAIL,
    ))
    return _GROUP_LENGTH.pack(0x0002, 0x0000, b"UL", 4, len(body)) + body


class SpoolFile(io.FileIO):
    """A spool file opened for writing, unbuffered: what pynetdicom's ``NamedTemporaryFile`` is used for, no more.

    Why: every data set fragment is written through ``NamedTemporaryFile``'s wrapper, whose ``__getattr__``
    builds a new bound wrapper function per ``write``, and its name is drawn with ``random.choice`` per
    character (py-spy of the relay's storage association, issue 15: ~0.05 ms per instance).  The fragments
    are PDU-sized (16 KiB and up), so a buffer would only copy them once more.  Used as pynetdicom and the
    spool keeper use the spool file: ``write``, ``flush``, ``close``, ``name`` and ``file.flush()``.
    """

    @property
    def file(self) -> "SpoolFile":
        return self


_NAMES = itertools.count()


def open_spool() -> SpoolFile:
    """A new spool file in ``tempfile.gettempdir()`` named ``tmp*.dcm`` (the spool keeper's pattern), created
    exclusively (``x``: never an existing file), readable by us only (``O_EXCL`` + mode 0600, as mkstemp):
    one made ahead (:mod:`xdsi.dimse.spool_ahead`) when one is ready, else created here."""
    directory = tempfile.gettempdir()
    made = spool_ahead.take()
    if made is not None:
        f = SpoolFile(made[1], "wb", closefd=True)
        f.name = made[0]
        return f
    while True:
        name = os.path.join(directory, f"tmp{process_tag()}{next(_NAMES)}.dcm")
        try:
            return SpoolFile(name, "xb", opener=_private)
        except FileExistsError:
            continue


def _private(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


def write_new(path: Path, data: Any) -> None:
    """``data`` (bytes, or :class:`InstanceBytes`) into a file created at ``path`` (exclusively, readable by us only,
    as :func:`open_spool`'s)."""
    with SpoolFile(str(path), "xb", opener=_private) as f:
        if isinstance(data, InstanceBytes):
            data.write_to(f)
        else:
            f.write(data)


MEMORY_LIMIT = 8 << 20  # bytes of one relayed instance kept in memory; a larger one goes on in its spool file


class InstanceBytes:
    """A Part 10 file's bytes as they were received, none copied: the File Meta written first, then each fragment.

    Why (issue 15): joined into one growing buffer, each relayed 512 x 512 CT was copied once more after the
    socket read, into ~130 pages the kernel had to fault in afresh.  The requester is sent only the data set
    (:meth:`views_from`): views of the very buffers the remote's PDUs were read into, gathered into the
    requester's PDUs by ``xdsi.dimse.direct``.  Whoever appends a buffer gives it up: it must not change
    afterwards (the direct reader's PDU buffers and pynetdicom's ``bytes`` are never reused).

    ``len()``, slices (``content[:HEAD_BYTES]``, as bytes) and ``bytes()`` answer as the joined file would.
    """

    __slots__ = ("parts", "size")

    def __init__(self) -> None:
        self.parts: list[bytes | memoryview] = []
        self.size = 0

    def append(self, data: Any) -> None:
        view = data if isinstance(data, bytes) else memoryview(data).cast("B")
        if len(view):
            self.parts.append(view)
            self.size += len(view)

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)

    def __getitem__(self, key: slice) -> bytes:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("InstanceBytes takes contiguous slices only")
        start, stop, _ = key.indices(self.size)
        out = []
        at = 0
        for part in self.parts:
            end = at + len(part)
            if end > start and at < stop:
                out.append(part[max(start - at, 0) : min(stop, end) - at])
            if end >= stop:
                break
            at = end
        return b"".join(out)

    def views_from(self, offset: int) -> list[memoryview]:
        """The bytes from ``offset`` on, as views of the parts they lie in (nothing joined, nothing copied).  New views
        each time: releasing them leaves the parts as they are."""
        out = []
        at = 0
        for part in self.parts:
            end = at + len(part)
            if offset < end:
                out.append(memoryview(part)[max(offset - at, 0) :])
            at = end
        return out

    def write_to(self, f: Any) -> None:
        for part in self.parts:
            f.write(part)


class MemorySpool:
    """The spool "file" of a C-STORE on a remote's storage association to a relay: its bytes, kept in memory.

    Why (issue 15): what such an association delivers is relayed to the requester and, unless the gateway
    caches, never kept; written to a spool file, renamed, read back to be sent and unlinked, it cost ~0.27 ms of
    CPU and a dozen system calls per 512 x 512 CT (each a GIL hand-off between the relay's busy threads).  Held
    here, the bytes go from the socket to the requester's socket; a file is made (:meth:`materialize`, under the
    name pynetdicom's spool file would have had) only for what needs one: an instance archived rather than
    relayed, handed to another worker's relay, converted to another transfer syntax, cached, or sent by
    pynetdicom.  Past :data:`MEMORY_LIMIT` bytes it spills into that file and is a spool file like any other,
    so a relay holds at most ``relay.HIGH_WATER`` such instances in memory, each bounded.

    Used as pynetdicom and the spool keeper use ``SpoolFile``: ``write``, ``flush``, ``close``, ``name`` and
    ``file.flush()``; closing it does not drop the bytes (pynetdicom closes the spool after the handler, which
    may have handed them to a relay).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.buffer: InstanceBytes | None = InstanceBytes()
        self._file: SpoolFile | None = None

    @property
    def file(self) -> "MemorySpool":
        return self

    @property
    def in_memory(self) -> bool:
        return self.buffer is not None

    def write(self, data: Any) -> int:
        if self.buffer is None:
            return self._opened().write(data)
        self.buffer.append(data)
        if len(self.buffer) > MEMORY_LIMIT:
            self.materialize(keep_open=True)
        return len(data)

    def flush(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def materialize(self, keep_open: bool = False) -> Path:
        """The bytes written to the file ``name`` (created exclusively, mode 0600), and from now on written there."""
        if self.buffer is not None:
            f = SpoolFile(self.name, "xb", opener=_private)
            try:
                self.buffer.write_to(f)
            except BaseException:
                f.close()
                raise
            self.buffer = None
            self._file = f
        if not keep_open and self._file is not None:
            self._file.close()
        return Path(self.name)

    def _opened(self) -> SpoolFile:
        assert self._file is not None
        return self._file


def memory_spool(req: Any) -> MemorySpool | None:
    """The C-STORE request's spool if its bytes are still only in memory, else None (they are in its file)."""
    spool = getattr(req, "_dataset_file", None)
    return spool if isinstance(spool, MemorySpool) and spool.in_memory else None


def new_memory_spool() -> MemorySpool:
    """A memory spool named as :func:`open_spool` names files (``tmp*.dcm`` in ``tempfile.gettempdir()``)."""
    return MemorySpool(os.path.join(tempfile.gettempdir(), f"tmp{process_tag()}{next(_NAMES)}.dcm"))


def _us(fields: dict[int, bytes], element: int) -> int | None:
    value = fields.get(element)
    return struct.unpack("<H", value)[0] if value is not None and len(value) == 2 else None


def _ascii(value: bytes | None) -> str | None:
    """A UI value as pynetdicom puts it in the File Meta (padding off as pydicom's ``convert_UI`` and ``UID`` do),
    or None unless it is one valid UID."""
    if value is None:
        return None
    try:
        text = value.decode("ascii").rstrip("\0 ").strip()
    except UnicodeDecodeError:
        return None
    return text if is_valid_uid(text) else None


def start_store(assoc: Any, primitive: Any) -> DIMSEMessage | None:
    """The message pynetdicom would hold after this primitive (a C-STORE-RQ whose data set follows), or None."""
    if primitive.__class__ is not P_DATA or len(primitive.presentation_data_value_list) != 1:
        return None
    context_id, data = primitive.presentation_data_value_list[0]
    if not data or data[0] & 0x03 != 0x03:  # not a whole command set in this one PDV
        return None
    command = bytes(data[1:])
    fields = parse_command(command)
    if fields is None or _us(fields, 0x0100) != STORE_RQ or _us(fields, 0x0800) in (None, NO_DATA_SET):
        return None
    cx = assoc._accepted_cx.get(context_id)
    sop_class, sop_instance = _ascii(fields.get(0x0002)), _ascii(fields.get(0x1000))
    if cx is None or not cx.transfer_syntax or sop_class is None or sop_instance is None:
        return None  # pynetdicom decides (and refuses) what is not plain
    # pynetdicom's C_STORE_RQ as its reader leaves it after the command, but the command set decoded only if something
    # reads it (pynetdicom's own message_to_primitive, for a command set _primitive_maker leaves to it): the decode
    # and DIMSEMessage's construction were ~20 % of the Python per C-STORE on a relay's receiving thread (issue 15)
    message = lazy_message(C_STORE_RQ, command, context_id)
    message.encoded_command_set = io.BytesIO(command)
    message.data_set = io.BytesIO()
    # a remote's storage association to a relay (install): kept in memory until something needs a file
    spool: Any = new_memory_spool() if getattr(getattr(assoc, "dimse", None), _MARK, False) else open_spool()
    message._data_set_file = spool  # type: ignore[assignment]
    message._data_set_path = Path(spool.name)
    head = PREAMBLE + file_meta(sop_class, sop_instance, str(cx.transfer_syntax[0]))
    spool.write(head)
    message._xdsi_spool_head = head  # type: ignore[attr-defined]  # xdsi.dimse.receive_direct hashes from here on
    fast = _primitive_maker(message, fields, sop_class, sop_instance)
    if fast is not None:
        message.message_to_primitive = fast  # type: ignore[method-assign]  # this message only
    return message


# the C-STORE-RQ command set elements (PS3.7 9.3.1.1) that C_STORE primitive parameters take: what _primitive_maker
# handles; a command set with any other element (an Error Comment in a request, a private one) keeps pynetdicom's
_STORE_RQ_FIELDS = frozenset((0x0000, 0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000, 0x1030, 0x1031))


def _primitive_maker(message: DIMSEMessage, fields: dict[int, bytes], sop_class: str, sop_instance: str) -> Any:
    """``message_to_primitive`` for this C-STORE-RQ without pydicom, or None: pynetdicom's.

    Why (issue 15): pynetdicom's walks the decoded command set (every element converted, its keyword looked up,
    its VM computed) before the primitive's setters run: ~0.11 ms of the ~0.13 ms per relayed instance spent
    there; here the same setters (the same validation, in the same order) get the values straight from the
    parsed bytes: US as integers, the UIDs as :func:`_ascii` gives them (pydicom's ``UI`` conversion: padding and
    surrounding whitespace off), the AE title as pydicom's ``convert_AE_string`` (leading and trailing spaces off).
    Only a command set holding nothing but the C-STORE-RQ elements, each US two bytes and the AE title one plain
    value, takes this path; tests/unit/test_gateway_receive.py compares its primitives with pynetdicom's.
    """
    if not fields.keys() <= _STORE_RQ_FIELDS:
        return None
    shorts = {}
    for element in (0x0110, 0x0700, 0x1031):
        if element in fields:
            value = _us(fields, element)
            if value is None:
                return None
            shorts[element] = value
    if 0x0110 not in shorts or 0x0700 not in shorts:
        return None  # Message ID and Priority are mandatory: pynetdicom says what is wrong
    ae: str | None = None
    if 0x1030 in fields:
        raw = fields[0x1030]
        if b"\\" in raw:
            return None
        try:
            ae = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            return None

    def message_to_primitive() -> C_STORE:
        primitive = C_STORE()
        primitive.AffectedSOPClassUID = sop_class
        primitive.MessageID = shorts[0x0110]
        primitive.Priority = shorts[0x0700]
        primitive.AffectedSOPInstanceUID = sop_instance
        if ae is not None:
            primitive.MoveOriginatorApplicationEntityTitle = ae
        if 0x1031 in shorts:
            primitive.MoveOriginatorMessageID = shorts[0x1031]
        primitive.DataSet = message.data_set
        primitive._context_id = message.context_id
        primitive._dataset_path = message._data_set_path
        primitive._dataset_file = message._data_set_file
        return primitive

    return message_to_primitive


def install(assoc: Any) -> None:
    """Start this association's C-STORE-RQs here (see the module docstring); idempotent."""
    dimse = getattr(assoc, "dimse", None)
    if dimse is None or getattr(dimse, _MARK, False) or not _config.STORE_RECV_CHUNKED_DATASET:
        return
    original = dimse.receive_primitive

    def receive_primitive(primitive: Any) -> None:
        if dimse.message is None:
            message = start_store(assoc, primitive)
            if message is not None:
                dimse.message = message
                return
        original(primitive)

    dimse.receive_primitive = receive_primitive
    setattr(dimse, _MARK, True)


__all__ = ["MEMORY_LIMIT", "MemorySpool", "file_meta", "install", "memory_spool", "start_store"]
