"""The identifying elements of a delivered file, read from its first bytes without pydicom (when that is safe).

Why: every instance a remote delivers for a relay is checked against the retrieve identifier
(:mod:`xdsi.gateway.identity`) before it is taken; with pydicom's ``dcmread(specific_tags=...)``
that check was more than half of the CPU of the remote's storage association per relayed instance
(cProfile, bench/gateway.py): File Meta parsed into a Dataset, every element up to the Study and
Series Instance UIDs generated, the six values converted and validated.  The six elements sit near
the start of the data set in ascending tag order ((0008,0016) ... (0020,000E), PS3.5 7.1), so here
the File Meta and the data set's top-level elements up to (0020,000E) are walked over one read of
the file's head, and the six values taken as bytes.

Fail safe: this reader answers only for plainly encoded files; anything it is not sure to read
exactly as pydicom does returns None and the caller reads the file with pydicom as before.  That is:
a File Meta it cannot walk; a transfer syntax other than Implicit or Explicit VR Little Endian
(encapsulated ones are Explicit VR Little Endian data sets; big endian and deflated ones are not
read here); elements out of ascending order or repeated; an undefined length other than a sequence's
(sequences are skipped item by item, nested ones too, up to a depth); a wanted element with another
VR than its dictionary one (explicit VR), a value with a backslash (more than one value), bytes outside
printable ASCII (so the Specific Character Set cannot change what they mean), a UID that is not
valid; anything past the bytes read.  Values are returned as pydicom gives them (UI: trailing NUL
and space padding off, then surrounding whitespace as ``pydicom.uid.UID`` strips; LO: trailing NUL
and space padding off), and tests/unit/test_gateway_headscan.py compares both readers over pydicom's
test files and crafted ones.  What follows (0020,000E) is not looked at: the relay passes the
instance on as the remote sent it (pydicom's read stopped before the pixel data, so damage there was
never looked at either).
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

from xdsi.uids import is_valid_uid

HEAD_BYTES = 65536
IMPLICIT_LE = "1.2.840.10008.1.2"
# little endian, not deflated: Explicit VR Little Endian data sets (PS3.5 A.2, A.4: encapsulated pixel data too)
_NOT_EXPLICIT_LE = frozenset(("1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95"))
WANTED = {
    (0x0008, 0x0016): ("SOPClassUID", b"UI"),
    (0x0008, 0x0018): ("SOPInstanceUID", b"UI"),
    (0x0010, 0x0020): ("PatientID", b"LO"),
    (0x0010, 0x0021): ("IssuerOfPatientID", b"LO"),
    (0x0020, 0x000D): ("StudyInstanceUID", b"UI"),
    (0x0020, 0x000E): ("SeriesInstanceUID", b"UI"),
}
LAST = (0x0020, 0x000E)
_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"))
_VRS = _LONG_VRS | frozenset((b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"PN",
                               b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"))
UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = (0xFFFE, 0xE000), (0xFFFE, 0xE00D), (0xFFFE, 0xE0DD)
MAX_DEPTH = 8
_TAG_LENGTH = struct.Struct("<HHL")
_TAG = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<L")
_NOT_PLAIN = re.compile(rb"[^\x20-\x5b\x5d-\x7e]")  # a byte below 0x20, above 0x7E, or a backslash (0x5C)


class _Unsure(Exception):
    """Something this reader does not read exactly as pydicom would: the caller uses pydicom."""


def _header(buf: bytes, pos: int, implicit: bool) -> tuple[tuple[int, int], bytes | None, int, int]:
    """(tag, VR or None, value length, header size) of the element at ``pos``."""
    if pos + 8 > len(buf):
        raise _Unsure("past the head")
    group, element = _TAG.unpack_from(buf, pos)
    if implicit or group == 0xFFFE:  # item and delimitation tags carry no VR in either encoding (PS3.5 7.5)
        return (group, element), None, _U32.unpack_from(buf, pos + 4)[0], 8
    vr = bytes(buf[pos + 4 : pos + 6])
    if vr not in _VRS:
        raise _Unsure("unknown VR")
    if vr in _LONG_VRS:
        if pos + 12 > len(buf):
            raise _Unsure("past the head")
        return (group, element), vr, _U32.unpack_from(buf, pos + 8)[0], 12
    return (group, element), vr, _U16.unpack_from(buf, pos + 6)[0], 8


def _skip_sequence(buf: bytes, pos: int, implicit: bool, depth: int) -> int:
    """Past a sequence of undefined length whose first item starts at ``pos``."""
    if depth > MAX_DEPTH:
        raise _Unsure("sequences nested too deep")
    while True:
        if pos + 8 > len(buf):
            raise _Unsure("past the head")
        group, element, length = _TAG_LENGTH.unpack_from(buf, pos)
        if (group, element) == SEQUENCE_END:
            return pos + 8
        if (group, element) != ITEM:
            raise _Unsure("not an item in a sequence")
        pos = _skip_item(buf, pos + 8, implicit, depth) if length == UNDEFINED else pos + 8 + length


def _skip_item(buf: bytes, pos: int, implicit: bool, depth: int) -> int:
    """Past the elements of an item of undefined length and its delimitation item."""
    while True:
        tag, vr, length, size = _header(buf, pos, implicit)
        if tag == ITEM_END:
            return pos + 8
        pos = _skip_element(buf, pos, tag, vr, length, size, implicit, depth)


def _skip_element(buf: bytes, pos: int, tag: tuple[int, int], vr: bytes | None, length: int, size: int, implicit: bool,
                  depth: int) -> int:
    if length != UNDEFINED:
        return pos + size + length
    if tag[0] == 0xFFFE or not (vr == b"SQ" or (implicit and vr is None)):
        raise _Unsure("undefined length that is not a sequence's")  # e.g. UN of undefined length, encapsulated data
    return _skip_sequence(buf, pos + size, implicit, depth + 1)


def _meta(buf: bytes) -> tuple[int, str]:
    """(offset of the data set, File Meta Transfer Syntax UID)."""
    if len(buf) < 132 or buf[128:132] != b"DICM":
        raise _Unsure("no preamble")
    pos, syntax = 132, None
    while True:
        if pos + 8 > len(buf):
            raise _Unsure("File Meta past the head")
        group, element = _TAG.unpack_from(buf, pos)
        if group != 0x0002:
            break
        tag, vr, length, size = _header(buf, pos, False)
        if length == UNDEFINED or pos + size + length > len(buf):
            raise _Unsure("File Meta element")
        if element == 0x0010:
            syntax = _text(buf[pos + size : pos + size + length])
        pos += size + length
    if syntax is None:
        raise _Unsure("no Transfer Syntax UID")
    return pos, syntax.rstrip("\0 ").strip()


def _text(raw: bytes) -> str:
    """Printable ASCII without a backslash, trailing NUL/space padding off (pydicom's ``rstrip("\\0 ")``)."""
    if _NOT_PLAIN.search(raw.rstrip(b"\0 ")):
        raise _Unsure("not plain ASCII, or more than one value")
    return raw.decode("ascii").rstrip("\0 ")


def scan(buf: bytes) -> dict[str, str] | None:
    """The six identifying values of a Part 10 file starting with ``buf`` (absent ones left out), or None: ask pydicom."""
    try:
        pos, syntax = _meta(buf)
        if syntax == IMPLICIT_LE:
            implicit = True
        elif syntax.startswith("1.2.840.10008.1.2.") and syntax not in _NOT_EXPLICIT_LE:
            implicit = False
        else:
            return None
        found: dict[str, str] = {}
        last = (-1, -1)
        while pos < len(buf):
            tag, vr, length, size = _header(buf, pos, implicit)
            if tag <= last or tag[0] == 0x0002 or tag[0] == 0xFFFE:
                raise _Unsure("elements out of order")
            if tag > LAST:
                return found
            last = tag
            wanted = WANTED.get(tag)
            if wanted is not None:
                keyword, dictionary_vr = wanted
                if length == UNDEFINED or (vr is not None and vr != dictionary_vr) or pos + size + length > len(buf):
                    raise _Unsure(f"{keyword} not plainly encoded")
                value = _text(buf[pos + size : pos + size + length])
                if dictionary_vr == b"UI":
                    value = value.strip()
                    if value and not is_valid_uid(value):
                        raise _Unsure(f"{keyword} is not a valid UID")
                found[keyword] = value
                pos += size + length
            else:
                pos = _skip_element(buf, pos, tag, vr, length, size, implicit, 0)
        if pos == len(buf) and len(buf) < HEAD_BYTES:  # the whole (short) file walked: every element seen
            return found
        return None
    except (_Unsure, struct.error, UnicodeDecodeError):
        return None


def scan_file(path: Path) -> dict[str, str] | None:
    """:func:`scan` of the file's first :data:`HEAD_BYTES`; None when it cannot be read or scanned."""
    try:
        with open(path, "rb") as f:
            return scan(f.read(HEAD_BYTES))
    except OSError:
        return None


__all__ = ["scan", "scan_file"]
