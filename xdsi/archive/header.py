"""Reading and checking the header of an incoming DICOM file.

:func:`read_header` walks the whole file once with deferred reading, so a
truncated or malformed dataset is caught before anything is stored, while
large values (Pixel Data of a 1 GB whole-slide image) are skipped rather than
loaded.  It returns the attributes the index needs as a plain value object.

Every value is decoded as pydicom decodes it, so what pydicom cannot decode is
refused.  Issue 14 made that cheaper without changing a single decision:
:mod:`xdsi.archive.leanread` reads an ordinary Part 10 file into the very data
set ``dcmread`` builds (anything unusual is still read by ``dcmread``), and
elements whose pydicom value is known without converting them
(:mod:`xdsi.archive.rawvalues`: short strings, plain numbers, small binary
values) are left raw, their values kept for the header and the metadata
journal; every other element goes through pydicom's conversion as before.
``tests/unit/test_header_fast.py`` holds both paths to the same answers.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pydicom import dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from xdsi.archive import leanread, rawvalues
from xdsi.uids import InvalidUID, validate_uid

DEFER = 4096
FAST_VALUES = "_xdsi_fast_values"  # attribute of a parsed data set: tag -> (raw element, VR, value), see _check
_BULK_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN", "OB or OW", "US or OW"})


class InvalidDataset(ValueError):
    """The file cannot be archived; the message says why, for the DIMSE status or the import report."""


@dataclass(frozen=True)
class InstanceHeader:
    # patient
    patient_id: str
    issuer_of_patient_id: str
    patient_name: str
    birth_date: str
    sex: str
    # study
    study_uid: str
    study_date: str
    study_time: str
    accession_number: str
    accession_issuer: str
    study_id: str
    study_description: str
    referring_physician: str
    procedure_code: tuple[str, str, str] | None
    # series
    series_uid: str
    modality: str
    series_number: int | None
    series_description: str
    body_part: str
    series_date: str
    series_time: str
    institution_name: str
    station_name: str
    # instance
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    instance_number: int | None
    number_of_frames: int | None
    content_date: str
    content_time: str
    rows: int | None
    columns: int | None
    has_file_meta: bool
    # the file starts with the Part 10 preamble and "DICM"; False for a bare dataset or a bare meta group
    has_preamble: bool = True
    # byte offset of the first dataset element (after the preamble and the File Meta group)
    dataset_offset: int = 0


# Indexed columns (unique keys, B-tree indexes) accept at most this many characters:
# more than the longest legal value among them (PN: 3 x 64 + 2 separators = 194), and
# small enough that a PostgreSQL B-tree entry (2704 bytes) always fits, even for a
# two-column index of 4-byte UTF-8 characters.  A longer value
# is refused clearly rather than cut: see :func:`_checked`.
MAX_INDEXED_CHARS = 256

_DA_LEGACY = re.compile(r"^(\d{4})\.(\d{2})\.(\d{2})$")
_TM_LEGACY = re.compile(r"^(\d{2}):(\d{2})(?::(\d{2})(\.\d{1,6})?)?$")


def normalize_da(value: str) -> str:
    """A DA value in the form C-FIND matching compares: ``YYYYMMDD``.

    ACR-NEMA's ``YYYY.MM.DD`` (PS3.5 6.2 note, still sent by old modalities) becomes
    ``YYYYMMDD``.  Anything else is kept as given (trimmed): a value we cannot read is
    not guessed at, and never cut.
    """
    v = value.strip()
    m = _DA_LEGACY.match(v)
    return "".join(m.groups()) if m else v


def normalize_tm(value: str) -> str:
    """A TM value in the form C-FIND matching compares: ``HH[MM[SS[.F{1,6}]]]``.

    ACR-NEMA's ``HH:MM[:SS[.F]]`` loses its colons; the precision given is kept (a time
    sent as ``1015`` is not answered as ``101500.000000``).  Anything else is kept as given.
    """
    v = value.strip()
    m = _TM_LEGACY.match(v)
    if not m:
        return v
    hh, mm, ss, frac = m.groups()
    return hh + mm + (ss or "") + (frac or "")


class _Values:
    """The values :func:`header_from_dataset` reads: pydicom's (``ds.get``), or ones decoded already.

    ``fast`` maps a tag to ``(raw element, VR, value)`` decoded by
    :func:`xdsi.archive.rawvalues.decode` -- the value pydicom's conversion of
    that same raw element gives -- so the header is built without converting
    those elements through pydicom a second time.
    """

    __slots__ = ("ds", "fast")

    def __init__(self, ds: Dataset, fast: dict[int, tuple[Any, str, Any]] | None = None) -> None:
        self.ds = ds
        self.fast = fast or {}

    def get(self, keyword: str) -> Any:
        tag = _TAGS.get(keyword)
        if tag is not None:
            stored = self.ds._dict.get(tag)
            if stored is None:
                return None  # absent: what ds.get(keyword) gives
            hit = self.fast.get(tag)
            if hit is not None and hit[0] is stored:
                return hit[2]
        return self.ds.get(keyword)

    def vr(self, keyword: str) -> str:
        return str(self.ds[keyword].VR)


def _s(ds: _Values | Dataset, keyword: str) -> str:
    """The value as text, whole: multiple values joined with ``\\`` as on the wire, never cut."""
    v = ds.get(keyword)
    if v is None:
        return ""
    if isinstance(v, (list, tuple)) or v.__class__.__name__ == "MultiValue":
        v = "\\".join(str(x) for x in v)
    return str(v).strip()


def _checked(ds: _Values, keyword: str) -> str:
    """A value that goes into an indexed column: kept whole when it fits, otherwise refused.

    A value longer than its VR allows (an LO of 80 characters) is still kept whole;
    only one beyond :data:`MAX_INDEXED_CHARS`, which no conforming sender produces,
    refuses the instance, naming the attribute.
    """
    v = _s(ds, keyword)
    if len(v) > MAX_INDEXED_CHARS:
        raise InvalidDataset(
            f"{keyword} is {len(v)} characters long; this archive indexes at most {MAX_INDEXED_CHARS} "
            f"(the {ds.vr(keyword)} VR allows far fewer)"
        )
    return v


def _da(ds: _Values, keyword: str) -> str:
    return normalize_da(_checked(ds, keyword))


def _tm(ds: _Values, keyword: str) -> str:
    return normalize_tm(_checked(ds, keyword))


def _i(ds: _Values, keyword: str) -> int | None:
    v = ds.get(keyword)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _code(ds: _Values, keyword: str) -> tuple[str, str, str] | None:
    seq = ds.get(keyword)
    if not seq:
        return None
    item = seq[0]
    value = _s(item, "CodeValue") or _s(item, "LongCodeValue") or _s(item, "URNCodeValue")
    if not value:
        return None
    return (value, _s(item, "CodingSchemeDesignator"), _s(item, "CodeMeaning"))


def _accession_issuer(ds: _Values) -> str:
    seq = ds.get("IssuerOfAccessionNumberSequence")
    if not seq:
        return ""
    item = seq[0]
    return _s(item, "UniversalEntityID") or _s(item, "LocalNamespaceEntityID")


_NOT_IN_A_DATA_SET = frozenset({0x0000, 0x0001, 0x0002, 0x0003, 0x0005, 0x0007, 0xFFFF})

# the top-level attributes the header reads, by keyword (sequences are read through pydicom)
_TAGS = {
    k: tag_for_keyword(k)
    for k in (
        "PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
        "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription", "ReferringPhysicianName",
        "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "BodyPartExamined", "SeriesDate",
        "SeriesTime", "InstitutionName", "StationName", "SOPClassUID", "SOPInstanceUID", "InstanceNumber",
        "NumberOfFrames", "ContentDate", "ContentTime", "Rows", "Columns", "ProcedureCodeSequence",
        "IssuerOfAccessionNumberSequence",
    )
}


def header_from_dataset(ds: Dataset, transfer_syntax_uid: str, has_file_meta: bool) -> InstanceHeader:
    """Extract and validate what the index needs; raise :class:`InvalidDataset` when it cannot be archived."""
    return _header(_Values(ds), transfer_syntax_uid, has_file_meta)


def _header(values: _Values, transfer_syntax_uid: str, has_file_meta: bool, has_preamble: bool = True,
            dataset_offset: int = 0) -> InstanceHeader:
    ds = values
    stray = next((t for t in values.ds.keys() if t.group in _NOT_IN_A_DATA_SET), None)
    if stray is not None:
        # PS3.5 7.1 / 7.8.1: group 0000 is the DIMSE command, 0002 the File Meta; 0001, 0003, 0005,
        # 0007 and FFFF may not be used.  A data set carrying them was built wrong: readers disagree on it.
        raise InvalidDataset(f"element {stray} does not belong in a data set (group {stray.group:04X})")
    try:
        study_uid = validate_uid(ds.get("StudyInstanceUID"), "Study Instance UID")
        series_uid = validate_uid(ds.get("SeriesInstanceUID"), "Series Instance UID")
        sop_uid = validate_uid(ds.get("SOPInstanceUID"), "SOP Instance UID")
        sop_class = validate_uid(ds.get("SOPClassUID"), "SOP Class UID")
        ts = validate_uid(transfer_syntax_uid, "Transfer Syntax UID")
    except InvalidUID as exc:
        raise InvalidDataset(str(exc)) from None
    except Exception as exc:  # pydicom raises on values it cannot decode
        raise InvalidDataset(f"cannot decode identifying attributes: {exc}") from None
    try:
        return InstanceHeader(
            patient_id=_checked(ds, "PatientID"),
            issuer_of_patient_id=_checked(ds, "IssuerOfPatientID"),
            patient_name=_checked(ds, "PatientName"),
            birth_date=_da(ds, "PatientBirthDate"),
            sex=_s(ds, "PatientSex"),
            study_uid=study_uid,
            study_date=_da(ds, "StudyDate"),
            study_time=_tm(ds, "StudyTime"),
            accession_number=_checked(ds, "AccessionNumber"),
            accession_issuer=_accession_issuer(ds),
            study_id=_s(ds, "StudyID"),
            study_description=_s(ds, "StudyDescription"),
            referring_physician=_s(ds, "ReferringPhysicianName"),
            procedure_code=_code(ds, "ProcedureCodeSequence"),
            series_uid=series_uid,
            modality=_checked(ds, "Modality"),
            series_number=_i(ds, "SeriesNumber"),
            series_description=_s(ds, "SeriesDescription"),
            body_part=_s(ds, "BodyPartExamined"),
            series_date=_da(ds, "SeriesDate"),
            series_time=_tm(ds, "SeriesTime"),
            institution_name=_s(ds, "InstitutionName"),
            station_name=_s(ds, "StationName"),
            sop_class_uid=sop_class,
            sop_instance_uid=sop_uid,
            transfer_syntax_uid=ts,
            instance_number=_i(ds, "InstanceNumber"),
            number_of_frames=_i(ds, "NumberOfFrames"),
            content_date=_da(ds, "ContentDate"),
            content_time=_tm(ds, "ContentTime"),
            rows=_i(ds, "Rows"),
            columns=_i(ds, "Columns"),
            has_file_meta=has_file_meta,
            has_preamble=has_preamble,
            dataset_offset=dataset_offset,
        )
    except InvalidDataset:
        raise
    except Exception as exc:
        raise InvalidDataset(f"cannot decode attributes: {exc}") from None


# VRs whose explicit-VR encoding has a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2)
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_IMPLICIT_TS = "1.2.840.10008.1.2"
_DEFLATED_TS = frozenset({"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1"})


def _looks_explicit(vr: bytes) -> bool:
    """The test pydicom itself applies to the first element: two upper-case letters are a VR."""
    return len(vr) == 2 and all(0x40 < b < 0x5B for b in vr)


def dataset_start(fh: Any) -> tuple[bool, int]:
    """(has preamble, offset of the first non-File-Meta element) of an open file.

    The File Meta group is Explicit VR Little Endian by definition (PS3.10
    7.1); a group written in implicit VR by a broken sender is skipped the
    same way so the offset still points at the dataset.
    """
    fh.seek(0)
    head = fh.read(132)
    preamble = head[128:132] == b"DICM"
    pos = 132 if preamble else 0
    while True:
        fh.seek(pos)
        raw = fh.read(12)
        if len(raw) < 8 or struct.unpack_from("<H", raw, 0)[0] != 0x0002:
            return preamble, pos
        vr = raw[4:6]
        if not _looks_explicit(vr):
            pos += 8 + struct.unpack_from("<I", raw, 4)[0]
        elif vr in _LONG_VRS:
            if len(raw) < 12:
                return preamble, pos
            pos += 12 + struct.unpack_from("<I", raw, 8)[0]
        else:
            pos += 8 + struct.unpack_from("<H", raw, 6)[0]


def check_encoding(fh: Any, offset: int, transfer_syntax_uid: str) -> None:
    """Refuse a dataset whose first element is not encoded in its transfer syntax's VR mode.

    pydicom silently switches to the VR mode it finds (with a warning), so
    implicit-VR bytes labelled Explicit VR Little Endian parse in Python, but
    the file as stored is unreadable for dcmtk and every other strict reader:
    it must not be archived under that label.  Deflated data cannot be
    inspected without inflating and is left to the full parse.
    """
    if transfer_syntax_uid in _DEFLATED_TS:
        return
    fh.seek(offset)
    raw = fh.read(6)
    if len(raw) < 6:
        return  # empty or truncated: the full parse says so
    explicit = _looks_explicit(raw[4:6])
    expected_explicit = transfer_syntax_uid != _IMPLICIT_TS
    if explicit != expected_explicit:
        found = "explicit" if explicit else "implicit"
        wanted = "explicit" if expected_explicit else "implicit"
        raise InvalidDataset(
            f"dataset is encoded in {found} VR but its transfer syntax {transfer_syntax_uid} is {wanted} VR"
        )


def raw_vr(raw: Any) -> str:
    """The VR of a not yet decoded element: as read (explicit VR), else the dictionary's (implicit VR; UN if unknown)."""
    if raw.VR is not None:
        return str(raw.VR)
    try:
        return str(dictionary_VR(raw.tag))
    except KeyError:
        return "UN"


def is_deferred_bulk(raw: Any) -> bool:
    """A bulk value ``defer_size`` left unread in the file (Pixel Data and the like)."""
    return isinstance(raw, RawDataElement) and raw.value is None and bool(raw.length) and raw_vr(raw) in _BULK_VRS


def raw_elements(ds: Dataset) -> Iterator[Any]:
    """The top-level elements in tag order as stored: decoded or raw, a deferred value left unread.

    (pydicom's ``Dataset.elements()`` reads deferred values; this does not.)
    """
    for tag in sorted(ds.keys()):
        yield ds.get_item(tag, keep_deferred=True)


def _touch(ds: Dataset) -> None:
    """Decode every value now, while the file is open, so one pydicom cannot decode fails here rather than later.

    A value left unread by ``defer_size`` stays unread when it is bulk data
    (Pixel Data of a 1 GB whole-slide image is not loaded to be checked: its
    bytes were skipped, and a file shorter than the element lengths say is
    caught by the caller).  Any other deferred value (a long sequence or text)
    is read and decoded like the rest.  Sequence items are walked too.
    """
    for raw in raw_elements(ds):
        if is_deferred_bulk(raw):
            continue
        elem = ds[raw.tag]
        if elem.VR == "SQ":
            for item in elem.value:
                _touch(item)
        elif elem.VR not in _BULK_VRS:
            _ = elem.value


def _check(ds: Dataset, fast: dict[int, tuple[Any, str, Any]]) -> None:
    """:func:`_touch`, without pydicom's per-element conversion where its result is known beforehand.

    An element whose value :func:`xdsi.archive.rawvalues.decode` reads exactly
    as pydicom would (short ASCII strings, plain numbers, small binary values:
    nearly all of a real header) cannot fail to convert, so it is left raw and
    its value kept in ``fast`` (tag -> (raw element, VR, value)) for the header
    and the metadata journal (an item's own in the item's ``FAST_VALUES``
    attribute).  Every other element -- sequences (their items walked the same way), UN, AT,
    ambiguous or private implicit VRs, escape sequences, odd numbers, values
    deferred or cut short -- is converted through pydicom as :func:`_touch`
    does, so the same values fail the same way.
    """
    if not rawvalues.enabled():
        _touch(ds)
        return
    encodings = ds.original_character_set or ds._character_set  # what Dataset.__getitem__ decodes with
    decode, element_vr, slow = rawvalues.decode, rawvalues.element_vr, rawvalues.SLOW
    stored = ds._dict  # raw or converted elements as stored (what get_item(tag, keep_deferred=True) gives)
    for tag in sorted(stored):
        raw = stored[tag]
        if isinstance(raw, RawDataElement):
            if raw.value is None:
                if is_deferred_bulk(raw):
                    continue
            else:
                vr = element_vr(raw)
                if vr is not None:
                    try:
                        value = decode(raw, vr, encodings)
                    except Exception:  # never expected; pydicom then decides as before
                        value = slow
                    if value is not slow:
                        fast[tag] = (raw, vr, value)
                        continue
        elem = ds[tag]
        if elem.VR == "SQ":
            for item in elem.value:
                item_fast: dict[int, tuple[Any, str, Any]] = {}
                _check(item, item_fast)
                object.__setattr__(item, FAST_VALUES, item_fast)


def read_header(path: Path | str) -> InstanceHeader:
    """Parse a Part 10 file (or a bare dataset) end to end without loading large values."""
    return read_header_dataset(path)[0]


def read_header_dataset(path: Path | str) -> tuple[InstanceHeader, Dataset]:
    """:func:`read_header`, plus the parsed data set (bulk values deferred, everything else decoded).

    The store path hands the data set on to the metadata journal
    (:func:`xdsi.archive.metadata.dataset_json`), so a received instance is
    parsed once, not once per consumer.
    """
    path = Path(path)
    size = os.path.getsize(path)
    lean: tuple[Any, int, int] | None = None
    fast: dict[int, tuple[Any, str, Any]] = {}
    try:
        with open(path, "rb") as fh:
            if rawvalues.enabled():
                try:
                    lean = leanread.read(fh, size, DEFER)
                except Exception:  # not expected: dcmread then reads it, and decides, as before
                    lean = None
            if lean is not None:
                ds, end, _offset = lean
            else:
                fh.seek(0)
                ds = dcmread(fh, defer_size=DEFER, force=True)
                end = fh.tell()
            _check(ds, fast)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, NotImplementedError) as exc:
        raise InvalidDataset(f"malformed or truncated dataset: {exc}") from None
    except Exception as exc:  # any other pydicom decoding failure is bad input, not a server fault
        raise InvalidDataset(f"malformed dataset: {exc.__class__.__name__}: {exc}") from None
    if end > size:
        raise InvalidDataset(f"truncated dataset: elements extend to byte {end}, file has {size}")
    if len(ds) == 0:
        raise InvalidDataset("empty dataset")
    meta = getattr(ds, "file_meta", None)
    ts: Any = meta.get("TransferSyntaxUID") if meta is not None else None
    has_meta = ts is not None
    if lean is not None:
        # leanread took only a file with the preamble, a File Meta group of known explicit VRs (where
        # dataset_start stops too) and a first element in its transfer syntax's VR mode (check_encoding's test)
        preamble, offset = True, lean[2]
    else:
        try:
            with open(path, "rb") as fh:
                preamble, offset = dataset_start(fh)
                if has_meta:
                    check_encoding(fh, offset, str(ts))
        except OSError as exc:
            raise InvalidDataset(f"unreadable file: {exc}") from None
    if ts is None:
        # bare dataset from a file without a Part 10 header: pydicom guessed the encoding, byte order
        # included (a big-endian dataset labelled little endian would be stored corrupt)
        implicit, little = ds.original_encoding
        ts = "1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1" if little else "1.2.840.10008.1.2.2"
    header = _header(_Values(ds, fast), str(ts), has_meta, preamble, offset)
    # the values decoded here, for the metadata journal (xdsi.archive.metadata.dataset_json)
    object.__setattr__(ds, FAST_VALUES, fast)
    return header, ds
