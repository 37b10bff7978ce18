"""QIDO-RS (PS3.18 10.6): query parameters to a C-FIND identifier for :class:`QueryService`, results to DICOM JSON."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from werkzeug.datastructures import MultiDict

from xdsi.archive.query import ATTRS, LEVELS
from xdsi.wire.errors import HttpError

# PS3.18 Tables 10.6.3-3..5: attributes returned by default at each level
STUDY_DEFAULTS = (
    "StudyDate", "StudyTime", "AccessionNumber", "InstanceAvailability", "ModalitiesInStudy",
    "ReferringPhysicianName", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "StudyID", "StudyDescription", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
)  # fmt: skip
SERIES_DEFAULTS = (
    "Modality", "SeriesDescription", "SeriesInstanceUID", "SeriesNumber", "SeriesDate", "SeriesTime",
    "BodyPartExamined", "NumberOfSeriesRelatedInstances", "InstanceAvailability",
)  # fmt: skip
INSTANCE_DEFAULTS = (
    "SOPClassUID", "SOPInstanceUID", "InstanceAvailability", "InstanceNumber", "Rows", "Columns", "NumberOfFrames",
)  # fmt: skip
_DEFAULTS = {"STUDY": STUDY_DEFAULTS, "SERIES": SERIES_DEFAULTS, "IMAGE": INSTANCE_DEFAULTS}
_CONTROL = {"includefield", "fuzzymatching", "limit", "offset", "charset"}
_TAG_RE = re.compile(r"^[0-9A-Fa-f]{8}$")
MAX_LIMIT = 100_000


@dataclass
class QidoQuery:
    identifier: Dataset
    limit: int | None
    offset: int
    fuzzy: bool
    ignored: list[str]  # keys we cannot match on (answered with a Warning header)


def _keyword(key: str) -> str:
    """An attribute keyword from a keyword or an 8-hex-digit tag; 400 for anything else."""
    if _TAG_RE.match(key):
        kw = keyword_for_tag(int(key, 16))
        if not kw:
            raise HttpError(400, f"unknown attribute tag {key}")
        return kw
    if tag_for_keyword(key) is None:
        raise HttpError(400, f"unknown attribute {key!r}")
    return key


def _int_param(args: MultiDict, name: str, low: int, high: int) -> int | None:
    v = args.get(name)
    if v is None or v == "":
        return None
    try:
        n = int(v)
    except ValueError:
        raise HttpError(400, f"{name}={v!r} is not an integer") from None
    if not low <= n <= high:
        raise HttpError(400, f"{name}={n} is outside {low}..{high}")
    return n


def build_query(level: str, args: MultiDict, fixed: dict[str, str], *, max_value: int = 4096, max_wildcards: int = 64) -> QidoQuery:
    """``fixed``: UIDs from the path (e.g. the study of ``/studies/{study}/series``).

    A matching value longer than ``max_value`` characters, or with more than
    ``max_wildcards`` ``*``/``?``, is refused with 400 before any query runs: a
    60 KB wildcard made SQLite fail with "LIKE or GLOB pattern too complex" (a
    500), and long patterns cost CPU on every row ([http] max_query_value,
    max_query_wildcards).
    """
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    depth = LEVELS.index(level)
    scope = set(LEVELS[1 : depth + 1]) | {"PATIENT"}
    ignored: list[str] = []
    requested = list(_DEFAULTS[level])
    if level != "STUDY":
        requested += ["StudyInstanceUID"]
    if level == "IMAGE":
        requested += ["SeriesInstanceUID"]
    includes: list[str] = []
    for raw in args.getlist("includefield"):
        for item in raw.split(","):
            item = item.strip()
            if not item:
                continue
            if item.lower() == "all":
                includes += [k for k, a in ATTRS.items() if a.level in scope and k != "AvailableTransferSyntaxUID"]
            else:
                includes.append(_keyword(item))
    fuzzy_raw = (args.get("fuzzymatching") or "false").lower()
    if fuzzy_raw not in ("true", "false"):
        raise HttpError(400, "fuzzymatching must be true or false")
    matches: dict[str, str] = {}
    for key in args.keys():
        if key in _CONTROL:
            continue
        if "." in key:
            ignored.append(key)  # sequence item matching (e.g. ProcedureCodeSequence.CodeValue) is not supported
            continue
        kw = _keyword(key)
        values = args.getlist(key)
        if len(values) > 1:
            raise HttpError(400, f"{key} is given more than once")
        value = values[0]
        if len(value) > max_value:
            raise HttpError(400, f"the value of {key} is {len(value)} characters long; at most {max_value} are accepted")
        if value.count("*") + value.count("?") > max_wildcards:
            raise HttpError(400, f"the value of {key} has more than {max_wildcards} wildcards")
        matches[kw] = value
    for kw, v in fixed.items():
        if kw in matches and matches[kw] != v:
            raise HttpError(400, f"{kw} in the query differs from the one in the path")
        matches[kw] = v
    for kw in requested + includes + list(matches):
        if kw in ds:
            continue
        vr = dictionary_VR(kw)
        value = matches.get(kw)
        if kw in matches and (kw not in ATTRS or ATTRS[kw].level not in scope):
            ignored.append(kw)
        if value is None or vr == "SQ":
            ds.add_new(kw, vr, None if vr != "SQ" else [])
            continue
        try:
            if vr == "UI":
                # a QIDO UID list is comma-separated (PS3.18 8.3.4.1)
                ds.add_new(kw, vr, [u.strip() for u in value.split(",")] if "," in value else value)
            elif vr in ("DA", "TM", "DT"):
                ds.add_new(kw, vr, value)
            else:
                ds.add_new(kw, vr, value.replace(",", "\\"))
        except (ValueError, TypeError, OverflowError) as exc:  # e.g. SeriesNumber=":" (IS has no range matching)
            raise HttpError(400, f"{kw}: {value[:80]!r} is not a valid {vr} value ({exc})") from None
    return QidoQuery(
        identifier=ds,
        limit=_int_param(args, "limit", 0, MAX_LIMIT),
        offset=_int_param(args, "offset", 0, 2**31 - 1) or 0,
        fuzzy=fuzzy_raw == "true",
        ignored=ignored,
    )


def result_json(ds: Dataset, retrieve_url: str) -> dict:
    for kw in ("QueryRetrieveLevel", "RetrieveAETitle"):
        if kw in ds:
            del ds[kw]
    d = ds.to_json_dict()
    d["00081190"] = {"vr": "UR", "Value": [retrieve_url]}
    return d


# -- DICOM JSON straight from index rows -------------------------------------------------------------------
#
# Why: a QIDO-RS answer built a pydicom Dataset per match (QueryService.find) and then asked pydicom for its
# DICOM JSON (``to_json_dict``): per match, about the same per-element Python twice over.  A response has the
# same attributes, in the same order, for every match of one query; only the values differ.  So, as
# xdsi.archive.find_encoder does for C-FIND, each attribute's JSON is worked out once per query and a match
# is a dict filled from the row.  The result equals ``result_json`` of the Dataset ``find`` yields for the
# same row (tests/unit/test_qido_rows.py compares them for every level and key); a value of a kind not
# handled here (sequences, numbers in text, several values with an empty one, a backslash or '=' in a
# name...) is given to pydicom's own DataElement.to_json_dict, so nothing is guessed.

_TEXT_VRS = {"AE", "AS", "CS", "DA", "DT", "LO", "SH", "TM", "UI", "UC"}  # strings that may hold several values
_SINGLE_TEXT_VRS = {"LT", "ST", "UT", "UR"}  # one value, a backslash is text (PS3.5 6.1.3)
_RETRIEVE_URL = "00081190"
_LEFT_OUT = {0x00080052, 0x00080054}  # QueryRetrieveLevel, RetrieveAETitle (result_json deletes them)
_CHARSET_KEY = "00080005"


def _pydicom_json(tag: int, vr: str, value: object) -> dict:  # type: ignore[type-arg]
    """What ``result_json`` gives for the element ``query._put`` makes of ``value``."""
    from pydicom import config
    from pydicom.dataelem import DataElement
    from pydicom.sequence import Sequence

    if value is None or value == "":
        value = Sequence() if vr == "SQ" else None
    elif vr == "SQ" and not isinstance(value, Sequence):
        value = Sequence()
    return DataElement(tag, vr, value, validation_mode=config.IGNORE).to_json_dict(None, 1024)


def _field_json(tag: int, vr: str, get: Any) -> Any:
    """row -> the element's DICOM JSON (a dict) for one response field."""
    empty = {"vr": vr}

    if vr in _TEXT_VRS or vr in _SINGLE_TEXT_VRS:
        multi = vr in _TEXT_VRS

        def text(row: tuple) -> dict:  # type: ignore[type-arg]
            v = get(row)
            if v is None or v == "":
                return {"vr": vr}
            if type(v) is str:
                if multi and "\\" in v:
                    return _pydicom_json(tag, vr, v)
                return {"vr": vr, "Value": [v]}
            if multi and isinstance(v, (list, tuple)) and len(v) > 1 and all(type(x) is str and x for x in v):
                return {"vr": vr, "Value": list(v)}
            return _pydicom_json(tag, vr, v)

        return text
    if vr == "PN":

        def person(row: tuple) -> dict:  # type: ignore[type-arg]
            v = get(row)
            if v is None or v == "":
                return {"vr": "PN"}
            if type(v) is str and "\\" not in v and "=" not in v:
                return {"vr": "PN", "Value": [{"Alphabetic": v}]}
            return _pydicom_json(tag, vr, v)

        return person
    if vr in ("IS", "US"):
        high = 0xFFFF if vr == "US" else 2**31 - 1
        low = 0 if vr == "US" else -(2**31)

        def number(row: tuple) -> dict:  # type: ignore[type-arg]
            v = get(row)
            if v is None or v == "":
                return {"vr": vr}
            if type(v) is int and low <= v <= high:
                return {"vr": vr, "Value": [v]}
            return _pydicom_json(tag, vr, v)

        return number
    return lambda row: _pydicom_json(tag, vr, get(row)) if get(row) not in (None, "") or vr == "SQ" else dict(empty)


class JsonRowEncoder:
    """One query's QIDO-RS results as DICOM JSON from its index rows (see above); built once per query.

    Keys come in the order pydicom's ``to_json_dict`` gives them: the order the Dataset path adds the
    elements (a later field for the same tag replaces the value where the first one was), Specific
    Character Set after them when it is added, the Retrieve URL last.
    """

    def __init__(self, fields: Any) -> None:
        order: dict[int, Any] = {}
        for f in fields:  # a later field for the same tag replaces an earlier one, in its place
            order[int(f.tag)] = f
        self._fields = [(f"{tag:08X}", _field_json(tag, f.vr, f.get)) for tag, f in order.items() if tag not in _LEFT_OUT]
        self._charset_getters = [f.get for f in order.values() if f.charset]

    def encode(self, row: tuple, retrieve_url: Callable[[dict], str]) -> dict:  # type: ignore[type-arg]
        """``result_json(ds, url)`` for the Dataset ``QueryService.find`` makes of ``row``; ``retrieve_url`` gets the dict."""
        d: dict = {key: element(row) for key, element in self._fields}  # type: ignore[type-arg]
        for get in self._charset_getters:
            v = get(row)
            if isinstance(v, str) and not v.isascii():
                d[_CHARSET_KEY] = {"vr": "CS", "Value": ["ISO_IR 192"]}
                break
        d[_RETRIEVE_URL] = {"vr": "UR", "Value": [retrieve_url(d)]}
        return d


def uid_of(d: dict, key: str) -> str:  # type: ignore[type-arg]
    """The first value of a UID element of an encoded result (e.g. "0020000D", the Study Instance UID)."""
    return str(d[key]["Value"][0])
