"""C-FIND response identifiers encoded straight from index rows, without a pydicom Dataset per match.

Why: answering 1,000 matches, building a Dataset per match and pydicom's ``write_dataset`` of it
were more than half of the server's time (py-spy, all-studies query).  A response has the same
elements, in the same order, for every match of one query; only the values differ.  So the
element headers are encoded once per query and a match is a join of byte strings.

The bytes are the ones pydicom writes for the Dataset :meth:`QueryService.find` yields for the
same row, in little endian implicit or explicit VR (tests/unit/test_query_encoded.py compares
them for every level and key): text padded to even length (UI with NUL, the rest with a space),
IS from an integer, US as two bytes, multi-valued CS joined with ``\\``, and Specific Character
Set ``ISO_IR 192`` (UTF-8) added to a response any of whose returned strings is not ASCII.
Elements this module does not encode itself (sequences, any other VR) are written by pydicom's
own ``write_data_element``, so nothing is guessed.
"""

from __future__ import annotations

import functools
import struct
from typing import Any, Callable, Iterable

from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.sequence import Sequence
from pydicom.tag import Tag

# VRs pydicom encodes with the Specific Character Set (the rest with its default, ISO 8859-1)
_CHARSET_VRS = {"LO", "LT", "PN", "SH", "ST", "UC", "UT"}
_STRING_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI", "UR"} | _CHARSET_VRS
# explicit VR: these have a 2-byte reserved field and a 4-byte length
_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
_UTF8 = "utf_8"
_DEFAULT = "iso8859"  # pydicom's default_encoding
_CHARSET_UTF8 = Tag("SpecificCharacterSet")


_U32 = struct.Struct("<I").pack
_U16 = struct.Struct("<H").pack


@functools.lru_cache(maxsize=4096)
def _header(tag: int, vr: str, implicit_vr: bool) -> tuple[bytes, Callable[[int], bytes]]:
    """An element's tag (and VR) bytes, and how its value length is written."""
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if implicit_vr:
        return head, _U32
    if vr in _LONG_VRS:
        return head + vr.encode() + b"\0\0", _U32
    return head + vr.encode(), _U16


@functools.cache
def _charset_element(implicit_vr: bool) -> bytes:
    """(0008,0005) Specific Character Set "ISO_IR 192", written by pydicom once per encoding."""
    elem = DataElement(_CHARSET_UTF8, "CS", "ISO_IR 192")
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit_vr
    write_data_element(fp, elem)
    return fp.getvalue()


class RowEncoder:
    """Encodes one query's response identifiers; built once per query from its fields."""

    def __init__(self, fields: Iterable[Any], *, implicit_vr: bool) -> None:
        self.implicit_vr = implicit_vr
        by_tag: dict[int, Any] = {}
        for f in fields:  # a later field for the same tag replaces an earlier one, as in the Dataset
            by_tag[int(f.tag)] = f
        self._encoders: list[Callable[[tuple, bool], bytes]] = []  # type: ignore[type-arg]
        self._charset_getters: list[Callable[[tuple], object]] = []  # type: ignore[type-arg]
        for tag in sorted(by_tag):
            f = by_tag[tag]
            self._encoders.append(self._element(f))
            if f.charset:
                self._charset_getters.append(f.get)
        self._charset_element = _charset_element(implicit_vr)

    def encode(self, row: tuple) -> bytes:  # type: ignore[type-arg]
        """The encoded identifier for one result row."""
        utf8 = False
        for get in self._charset_getters:
            v = get(row)
            if isinstance(v, str) and not v.isascii():
                utf8 = True
                break
        parts = [enc(row, utf8) for enc in self._encoders]
        if utf8:
            # (0008,0005) sorts before every other element a response can carry
            parts.insert(0, self._charset_element)
        return b"".join(parts)

    # -- per element ---------------------------------------------------------------------------

    def _header(self, tag: int, vr: str) -> tuple[bytes, Callable[[int], bytes]]:
        return _header(tag, vr, self.implicit_vr)

    def _element(self, f: Any) -> Callable[[tuple, bool], bytes]:  # type: ignore[type-arg]
        tag, vr, get = int(f.tag), f.vr, f.get
        head, length = self._header(tag, vr)
        empty = head + length(0)
        if vr in _STRING_VRS:
            pad = b"\0" if vr == "UI" else b" "
            charset = vr in _CHARSET_VRS

            def text(row: tuple, utf8: bool) -> bytes:  # type: ignore[type-arg]
                v = get(row)
                if v is None or v == "":
                    return empty
                if isinstance(v, (list, tuple)):
                    v = "\\".join(str(x) for x in v)
                    if not v:
                        return empty
                elif not isinstance(v, str):
                    if isinstance(v, int) and vr == "IS":
                        v = str(int(v))
                    else:
                        return self._fallback(tag, vr, v, utf8)
                b = v.encode(_UTF8 if (utf8 and charset) else _DEFAULT)
                if len(b) & 1:
                    b += pad
                return head + length(len(b)) + b

            return text
        if vr == "US":
            us = _U16

            def unsigned_short(row: tuple, utf8: bool) -> bytes:  # type: ignore[type-arg]
                v = get(row)
                if v is None or v == "":
                    return empty
                if isinstance(v, int) and 0 <= v <= 0xFFFF:
                    return head + length(2) + us(v)
                return self._fallback(tag, vr, v, utf8)

            return unsigned_short
        return lambda row, utf8: self._fallback(tag, vr, get(row), utf8)

    def _fallback(self, tag: int, vr: str, value: object, utf8: bool) -> bytes:
        """One element written by pydicom, as ``query._put`` would have put it in the Dataset."""
        if value is None or value == "":
            value = Sequence() if vr == "SQ" else None
        elif vr == "SQ" and not isinstance(value, Sequence):
            value = Sequence()
        elem = DataElement(tag, vr, value, validation_mode=config.IGNORE)
        fp = DicomBytesIO()
        fp.is_little_endian = True
        fp.is_implicit_VR = self.implicit_vr
        write_data_element(fp, elem, [_UTF8] if utf8 else [_DEFAULT])
        return fp.getvalue()


__all__ = ["RowEncoder"]
