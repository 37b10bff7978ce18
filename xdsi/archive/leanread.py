"""``dcmread(fh, defer_size=DEFER, force=True)`` of an ordinary Part 10 file, with one read and ``struct``.

Why: pydicom's reader pulls each element through a generator of small
``read``/``tell`` calls and builds five Datasets per file; for a 512x512 CT
header that was ~0.22 ms, half of what remained of the received-header parse
after :mod:`xdsi.archive.rawvalues` (issue 14).  :func:`read` walks the same
bytes from one buffer and builds the very objects pydicom's ``read_partial``
builds (the same RawDataElements, positions, deferred values, sequences read by
pydicom's own ``read_sequence``, the same FileMetaDataset and FileDataset).

It only takes the files it is sure to read as pydicom does: the preamble and
"DICM", a File Meta group of known explicit VRs with a Transfer Syntax UID,
a little-endian non-deflated transfer syntax whose VR mode the first element
matches, no command group, tags strictly ascending, every value inside the
file, no item or delimitation tag at the top level, undefined lengths only
where pydicom's path for them is plain (an SQ, or a value of a known VR read
up to its delimiter by pydicom).  Anything else returns None and the caller
runs ``dcmread`` itself, so its warnings, guesses and refusals are unchanged.
"""

from __future__ import annotations

import struct
from typing import Any, BinaryIO

import pydicom.uid
from pydicom import config
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import _dictionary_vr_fast
from pydicom.dataelem import DataElement, RawDataElement, empty_value_for_VR
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filereader import read_sequence
from pydicom.fileutil import read_undefined_length_value
from pydicom.tag import BaseTag, SequenceDelimiterTag
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR as VR_
from pydicom.values import convert_string

_CHUNK = 1 << 14  # a CT header is ~1.5 KB; a longer one is read on in further chunks
_VRS = {vr.encode(): str(vr) for vr in VR_}  # pydicom's ENCODED_VR, decoded
_LONG = frozenset(str(vr) for vr in EXPLICIT_VR_LENGTH_32)
_UNDEFINED = 0xFFFFFFFF
_HHH = struct.Struct("<HH2sH")
_HHL = struct.Struct("<HHL")
_L = struct.Struct("<L")
_H = struct.Struct("<H")


class _Buffer:
    """Bytes of the file read in large chunks: ``at(pos, n)`` is file[pos:pos+n] (shorter only at the end)."""

    __slots__ = ("fh", "base", "data")

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        fh.seek(0)
        self.base = 0
        self.data = fh.read(_CHUNK)

    def at(self, pos: int, n: int) -> bytes:
        off = pos - self.base
        if off < 0 or off + n > len(self.data):
            self.fh.seek(pos)
            self.data = self.fh.read(max(n, _CHUNK))
            self.base = pos
            off = 0
        return self.data[off:off + n]


def _explicit(head: bytes, pos: int) -> tuple[int, int, str, int, int] | None:
    """The explicit VR little endian element header ``head`` read at ``pos``: (group, element, VR, length,
    where the value starts), or None for a VR pydicom does not know or a long-form header cut short."""
    group, elem, vrb, length = _HHH.unpack_from(head)
    vr = _VRS.get(vrb)
    if vr is None:
        return None
    if vr in _LONG:
        if len(head) < 12:
            return None
        return group, elem, vr, _L.unpack_from(head, 8)[0], pos + 12
    return group, elem, vr, length, pos + 8


def _meta(buf: _Buffer, size: int) -> tuple[dict[BaseTag, Any], int] | None:
    """The File Meta group's raw elements as pydicom reads them (explicit VR little endian), and where it ends."""
    elements: dict[BaseTag, Any] = {}
    pos = 132
    while True:
        head = buf.at(pos, 12)
        if len(head) < 8:
            return None  # nothing after the File Meta group: left to pydicom
        if _H.unpack_from(head)[0] != 0x0002:  # the data set, perhaps implicit VR: not read as explicit here
            return elements, pos
        parsed = _explicit(head, pos)
        if parsed is None:
            return None
        group, elem, vr, length, start = parsed
        if length == _UNDEFINED or start + length > size:
            return None
        tag = BaseTag(group << 16 | elem)
        if elements and tag <= next(reversed(elements)):
            return None
        value = buf.at(start, length) if length else empty_value_for_VR(vr, raw=True)
        elements[tag] = RawDataElement(tag, vr, length, value, start, False, True)
        pos = start + length


def read(fh: BinaryIO, size: int, defer_size: int) -> tuple[FileDataset, int, int] | None:
    """(what ``dcmread(fh, defer_size=defer_size, force=True)`` returns, ``fh.tell()`` after it, offset of the
    first data set element), or None."""
    if config.settings.reading_validation_mode == config.RAISE or not config.assume_implicit_vr_switch:
        return None
    buf = _Buffer(fh)
    if len(buf.data) < 140 or buf.data[128:132] != b"DICM":
        return None
    preamble = buf.data[:128]
    meta = _meta(buf, size)
    if meta is None:
        return None
    meta_elements, pos = meta
    offset = pos
    if not meta_elements:
        return None
    # _read_file_meta_info: a FileMetaDataset, its first element converted as a check
    file_meta_ds = Dataset(meta_elements, parent_encoding=default_encoding)
    file_meta_ds.set_original_encoding(False, True, default_encoding)
    try:
        file_meta = FileMetaDataset(file_meta_ds)
        file_meta.set_original_encoding(is_implicit_vr=False, is_little_endian=True, character_encoding=default_encoding)
        file_meta[next(iter(meta_elements))]
        ts = file_meta.get("TransferSyntaxUID")
    except Exception:
        return None
    if not isinstance(ts, str) or ts in (pydicom.uid.ExplicitVRBigEndian, pydicom.uid.DeflatedExplicitVRLittleEndian) \
            or ts in pydicom.uid.PrivateTransferSyntaxes:
        return None
    implicit = ts == pydicom.uid.ImplicitVRLittleEndian
    first = buf.at(pos, 8)
    if len(first) < 8 or _H.unpack_from(first)[0] == 0x0000:
        return None  # empty data set or a command group: pydicom's own paths for them
    if implicit == (0x40 < first[4] < 0x5B and 0x40 < first[5] < 0x5B):
        return None  # the first element's VR mode is not the transfer syntax's: pydicom warns and switches
    elements = _dataset(fh, buf, pos, size, implicit, defer_size)
    if elements is None:
        return None
    raw_elements, end = elements
    # read_dataset
    dataset = Dataset(raw_elements, parent_encoding=default_encoding)
    if 0x00080005 in raw_elements:
        from pydicom.dataelem import convert_raw_data_element

        try:
            char_set = convert_raw_data_element(raw_elements[BaseTag(0x00080005)]).value
            encoding: Any = convert_encodings(char_set)
        except Exception:
            return None
    else:
        encoding = default_encoding
    dataset.set_original_encoding(implicit, True, encoding)
    # read_partial
    try:
        ds = FileDataset(fh, dataset, preamble, file_meta, implicit, True)
        ds.set_original_encoding(implicit, True, dataset._character_set)
    except Exception:
        return None
    return ds, end, offset


def _dataset(fh: BinaryIO, buf: _Buffer, pos: int, size: int, implicit: bool,
             defer_size: int) -> tuple[dict[BaseTag, Any], int] | None:
    """data_element_generator over the top-level data set: {tag: element}, and the position after the last one."""
    elements: dict[BaseTag, Any] = {}
    encoding: Any = default_encoding
    last = -1
    while pos < size:
        head = buf.at(pos, 12)
        if len(head) < 8:
            return None  # a stray tail shorter than an element header
        if implicit:
            group, elem, length = _HHL.unpack_from(head)
            vr: str | None = None
            start = pos + 8
        else:
            parsed = _explicit(head, pos)
            if parsed is None:
                return None
            group, elem, vr, length, start = parsed
        tag = group << 16 | elem
        if tag <= last or group == 0xFFFE:
            return None
        last = tag
        btag = BaseTag(tag)
        if length != _UNDEFINED:
            end = start + length
            if end > size:
                return None  # pydicom reads short or seeks past the end: the caller's checks and messages
            if length > defer_size and tag != 0x00080005:
                value: Any = None
            elif length:
                value = buf.at(start, length)
            else:
                value = empty_value_for_VR(vr, raw=True)
            if tag == 0x00080005:
                try:
                    encoding = convert_encodings(convert_string(value or b"", True))
                except Exception:
                    return None  # pydicom's reader fails on it: dcmread says how
            elements[btag] = RawDataElement(btag, vr, length, value, start, implicit, True)
            pos = end
            continue
        # undefined length
        if vr == VR_.UN:
            return None
        if vr is None:
            try:
                vr = str(_dictionary_vr_fast(tag))  # the lookup data_element_generator makes
            except KeyError:
                vr = None
            if vr is None:
                return None  # pydicom looks ahead for an item tag: left to it
        try:
            fh.seek(start)
            if vr == VR_.SQ:
                seq = read_sequence(fh, implicit, True, length, encoding)
                elements[btag] = DataElement(btag, vr, seq, start, is_undefined_length=True)
            else:
                value = read_undefined_length_value(fh, True, SequenceDelimiterTag, defer_size)
                elements[btag] = RawDataElement(btag, vr, length, value, start, implicit, True)
        except Exception:
            return None
        pos = fh.tell()
        if pos > size:
            return None
    return elements, pos
