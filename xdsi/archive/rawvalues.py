"""Decoding the common, simple element values of a parsed header without pydicom's per-element machinery.

Why: checking a received header by converting every element through pydicom
(``Dataset.__getitem__`` -> ``convert_raw_data_element`` -> hooks -> value
classes) and then building its DICOM JSON element by element cost ~0.6 ms of
the ~1 ms a 512x512 CT instance spent in :func:`xdsi.archive.header.read_header_dataset`
and :func:`xdsi.archive.metadata.dataset_json` (issue 14).  Most elements of a
real header are short ASCII strings, numbers and small binary values whose
pydicom value is fully determined by a few lines of Python.

:func:`decode` gives, for a :class:`~pydicom.dataelem.RawDataElement`, the very
value pydicom's conversion gives (as plain ``str``/``int``/``float``/``bytes``,
or a ``list`` where pydicom gives a ``MultiValue``) -- or :data:`SLOW` whenever
it is not certain of that: an unusual VR (SQ, UN, AT, an ambiguous VR), an
escape sequence or a byte the character set cannot decode, a number pydicom
would read differently (IS "1.0", DS "1e400", a wrong byte count), a PN with
components, a non-default pydicom configuration.  The caller then converts that
element through pydicom exactly as before, so every refusal, warning and value
of the old path is kept: this module only decides *when pydicom's answer is
known without asking it*.  :func:`json_element` is ``DataElement.to_json_dict``
for those values.  ``tests/unit/test_header_fast.py`` checks both against pydicom
on every element of every pydicom test file and on generated edge values.
"""

from __future__ import annotations

import base64
import re
from typing import Any, Callable

from pydicom import config
from pydicom.hooks import hooks
from pydicom.tag import _LUT_DESCRIPTOR_TAGS  # the tags pydicom's raw_element_value hook fixes
from pydicom.charset import default_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement, empty_value_for_VR

SLOW = object()  # "ask pydicom": the sentinel :func:`decode` returns when it is not certain

_ESC = 0x1B
# IS: pydicom's IS() of a plain integer of at most 12 digits is that int (longer ones may become ISfloat)
_IS_RE = re.compile(r"[+-]?[0-9]{1,12}")
# DS: a plain decimal number that Python's float() and pydicom's DSfloat read alike (no "_", "nan", "inf")
_DS_RE = re.compile(r" *[+-]?(?:[0-9]{1,16}(?:\.[0-9]{0,16})?|\.[0-9]{1,16})(?:[eE][+-]?[0-9]{1,3})? *")
_NUMBER_FORMATS = {"US": ("H", 2), "SS": ("h", 2), "UL": ("L", 4), "SL": ("l", 4), "FL": ("f", 4), "FD": ("d", 8),
                   "SV": ("q", 8), "UV": ("Q", 8)}
_INT_VRS = frozenset({"US", "SS", "UL", "SL", "SV", "UV"})
_FLOAT_VRS = frozenset({"FL", "FD"})
_SPLIT_DEFAULT = frozenset({"AS", "CS", "DA", "DT", "TM"})  # convert_string: default encoding, split on "\"
_TEXT_SPLIT = frozenset({"SH", "LO", "UC"})  # convert_text: the data set's encoding, split, each rstripped
_TEXT_SINGLE = frozenset({"ST", "LT", "UT"})  # convert_single_string: the data set's encoding, never split
_BYTES = frozenset({"OB", "OD", "OF", "OL", "OV", "OW"})
FAST_VRS = frozenset(
    _SPLIT_DEFAULT | _TEXT_SPLIT | _TEXT_SINGLE | _BYTES | set(_NUMBER_FORMATS) | {"AE", "UI", "UR", "PN", "IS", "DS"}
)
# pydicom fixes the first value of these (negative -> +65536) after conversion: left to pydicom
_LUT_DESCRIPTORS = frozenset(_LUT_DESCRIPTOR_TAGS)

_BULK_INLINE_MAX = (1024 // 4) * 3  # to_json_dict's test with xdsi's bulk_data_threshold of 1024


def _default_hooks() -> tuple[Callable[..., Any], Callable[..., Any]]:
    from pydicom.hooks import raw_element_value, raw_element_vr

    return raw_element_vr, raw_element_value


_HOOKS = _default_hooks()


def enabled() -> bool:
    """Whether pydicom runs with the settings this module reproduces (its defaults, which xdsi never changes)."""
    return (
        config.settings.reading_validation_mode != config.RAISE
        and not config.datetime_conversion
        and not config.use_DS_numpy
        and not config.use_DS_decimal
        and not config.use_IS_numpy
        and not config.use_none_as_empty_text_VR_value
        and config.data_element_callback is None
        and hooks.raw_element_vr is _HOOKS[0]
        and hooks.raw_element_value is _HOOKS[1]
        and not hooks.raw_element_kwargs
    )


def element_vr(raw: RawDataElement) -> str | None:
    """The VR pydicom will give ``raw`` when it is one :func:`decode` handles, else None.

    Explicit VR: as read.  Implicit VR: the standard dictionary's, for a public
    tag only (a private tag's VR depends on its creator, left to pydicom).
    """
    vr = raw.VR
    if vr is None:
        if raw.tag & 0x10000:  # odd group: private
            return None
        try:
            vr = dictionary_VR(raw.tag)
        except KeyError:
            return None
    vr = str(vr)
    return vr if vr in FAST_VRS else None


def _decode_text(value: bytes, encodings: Any) -> str | None:
    if _ESC in value:
        return None  # code extensions: pydicom decodes fragment by fragment
    enc = encodings[0] if isinstance(encodings, (list, tuple)) and encodings else encodings or default_encoding
    try:
        return value.decode(enc)
    except (UnicodeError, LookupError):
        return None  # pydicom would decode with replacement characters (or the default encoding) and warn


def decode(raw: RawDataElement, vr: str, encodings: Any) -> Any:
    """pydicom's value of ``raw`` (VR ``vr`` from :func:`element_vr`), or :data:`SLOW`.

    IS and DS values are given as their text (what ``str()`` of pydicom's IS and
    DSfloat gives; ``int()``/``float()`` of it is their number).
    """
    value = raw.value
    if value is None or len(value) != raw.length or raw.tag in _LUT_DESCRIPTORS:
        return SLOW  # deferred, or cut short by the end of the file
    if not value:
        return empty_value_for_VR(vr)
    if vr in _NUMBER_FORMATS:
        fmt, size = _NUMBER_FORMATS[vr]
        n = len(value) // size
        if n * size != len(value) or not raw.is_little_endian:
            return SLOW  # pydicom raises BytesLengthException: the old path's refusal
        import struct

        out = struct.unpack(f"<{n}{fmt}", value)
        return out[0] if n == 1 else list(out)
    if vr in _BYTES:
        return value
    if vr in _SPLIT_DEFAULT:
        items = value.decode(default_encoding).rstrip(" \x00").split("\\")
        return items[0] if len(items) == 1 else items
    if vr == "UI":
        # convert_UI: rstrip, split; each item a pydicom UID, which strips its text
        items = [v.strip() for v in value.decode(default_encoding).rstrip("\0 ").split("\\")]
        return items[0] if len(items) == 1 else items
    if vr == "AE":
        items = [s.strip() for s in value.decode(default_encoding).split("\\")]
        return items[0] if len(items) == 1 else items
    if vr == "UR":
        return value.decode(default_encoding).rstrip()
    if vr == "IS":
        s = value.decode(default_encoding).rstrip(" \x00")
        if not _IS_RE.fullmatch(s):
            return SLOW
        return s  # the text, as str(IS) gives it; int(s) is the IS's value
    if vr == "DS":
        items = value.decode(default_encoding).strip().rstrip(" \x00").split("\\")
        out_s: list[str] = []
        for item in items:
            if not _DS_RE.fullmatch(item):
                return SLOW
            f = float(item)  # what DSfloat(item) holds: float.__new__ of the same text
            if f != f or f in (float("inf"), float("-inf")):
                return SLOW
            out_s.append(item.strip())  # str(DSfloat(item)): its stripped text
        return out_s[0] if len(out_s) == 1 else out_s
    text = _decode_text(value, encodings)
    if text is None:
        return SLOW
    if vr in _TEXT_SPLIT:
        items = [v.rstrip("\0 ") for v in text.split("\\")]
        return items[0] if len(items) == 1 else items
    if vr in _TEXT_SINGLE:
        return text.rstrip("\0 ")
    if vr == "PN":
        # one plain name (no "=" component groups, not multi-valued, ASCII): pydicom's PersonName of it
        # reads back as the same text, its one component being that text
        if not value.isascii():
            return SLOW
        name = _decode_text(value.rstrip(b"\x00 "), encodings)
        if not name or "\\" in name or "=" in name:
            return SLOW
        return name
    return SLOW


def json_element(tag: int, vr: str, value: Any, bulk_token: str) -> dict[str, Any]:
    """``DataElement.to_json_dict`` of a value :func:`decode` gave (bulk threshold 1024, xdsi's token handler)."""
    out: dict[str, Any] = {"vr": vr}
    if value is None or (not isinstance(value, (int, float)) and not value):
        return out  # VM 0: no Value
    if vr in _BYTES:
        if len(value) > _BULK_INLINE_MAX:
            out["BulkDataURI"] = f"{bulk_token}{tag:08X}"
        else:
            out["InlineBinary"] = base64.b64encode(value).decode("utf-8")
        return out
    if vr == "PN":
        out["Value"] = [{"Alphabetic": value}]
        return out
    values = value if isinstance(value, list) else [value]
    if vr in _INT_VRS or vr == "IS":
        out["Value"] = [int(v) for v in values]
    elif vr in _FLOAT_VRS or vr == "DS":
        out["Value"] = [float(v) for v in values]
    else:
        out["Value"] = list(values)
    return out
