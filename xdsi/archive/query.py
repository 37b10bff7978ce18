"""C-FIND matching (PS3.4 C.2.2.2) answered from the index.

A query identifier is translated into one SQL statement over the
patient/study/series/instance tables: single-value, wildcard (``*``, ``?``),
range (dates, times), list-of-UID and universal matching.  Results are built
from index columns only; no stored file is opened.

Dates and times are matched and answered in their normalised DICOM form
(``YYYYMMDD``, ``HHMMSS.FFFFFF``), also when the stored file carries the
ACR-NEMA form ``YYYY.MM.DD`` / ``HH:MM:SS`` (see header.normalize_da/tm); the
stored file itself is never changed.

The same :class:`QueryService` is meant for QIDO-RS (attribute keywords are
the same) and for checking RAD-69 study/series/instance consistency.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Callable, Iterator

from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag
from pydicom.datadict import keyword_for_tag, dictionary_VR
from pydicom.sequence import Sequence
from sqlalchemy import Select, and_, exists, func, or_, select
from sqlalchemy.orm import InstrumentedAttribute, aliased

from xdsi.index.db import Index
from xdsi.index.models import Instance, Patient, Series, Study
from xdsi.uids import is_valid_uid

log = logging.getLogger(__name__)

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
_ENTITY = {"PATIENT": Patient, "STUDY": Study, "SERIES": Series, "IMAGE": Instance}


class QueryError(ValueError):
    """The identifier cannot be processed (PS3.4 C-FIND status A900 / C000 territory)."""


@dataclass(frozen=True)
class Attr:
    """How one DICOM attribute maps to the index."""

    level: str
    column: InstrumentedAttribute | None  # None: computed (counts, modalities)
    kind: str  # uid, str, pn, date, time, int, cs_multi, computed, code


# fmt: off
ATTRS: dict[str, Attr] = {
    # patient
    "PatientID": Attr("PATIENT", Patient.patient_id, "str"),
    "IssuerOfPatientID": Attr("PATIENT", Patient.issuer_of_patient_id, "str"),
    "PatientName": Attr("PATIENT", Patient.patient_name, "pn"),
    "PatientBirthDate": Attr("PATIENT", Patient.birth_date, "date"),
    "PatientSex": Attr("PATIENT", Patient.sex, "str"),
    "NumberOfPatientRelatedStudies": Attr("PATIENT", None, "computed"),
    "NumberOfPatientRelatedSeries": Attr("PATIENT", None, "computed"),
    "NumberOfPatientRelatedInstances": Attr("PATIENT", None, "computed"),
    # study
    "StudyInstanceUID": Attr("STUDY", Study.study_uid, "uid"),
    "StudyDate": Attr("STUDY", Study.study_date, "date"),
    "StudyTime": Attr("STUDY", Study.study_time, "time"),
    "AccessionNumber": Attr("STUDY", Study.accession_number, "str"),
    "StudyID": Attr("STUDY", Study.study_id, "str"),
    "StudyDescription": Attr("STUDY", Study.study_description, "str"),
    "ReferringPhysicianName": Attr("STUDY", Study.referring_physician, "pn"),
    "ModalitiesInStudy": Attr("STUDY", None, "cs_multi"),
    "ProcedureCodeSequence": Attr("STUDY", None, "code"),
    "NumberOfStudyRelatedSeries": Attr("STUDY", None, "computed"),
    "NumberOfStudyRelatedInstances": Attr("STUDY", None, "computed"),
    # series
    "SeriesInstanceUID": Attr("SERIES", Series.series_uid, "uid"),
    "Modality": Attr("SERIES", Series.modality, "str"),
    "SeriesNumber": Attr("SERIES", Series.series_number, "int"),
    "SeriesDescription": Attr("SERIES", Series.series_description, "str"),
    "BodyPartExamined": Attr("SERIES", Series.body_part, "str"),
    "SeriesDate": Attr("SERIES", Series.series_date, "date"),
    "SeriesTime": Attr("SERIES", Series.series_time, "time"),
    "InstitutionName": Attr("SERIES", Series.institution_name, "str"),
    "StationName": Attr("SERIES", Series.station_name, "str"),
    "NumberOfSeriesRelatedInstances": Attr("SERIES", None, "computed"),
    # instance
    "SOPInstanceUID": Attr("IMAGE", Instance.sop_instance_uid, "uid"),
    "SOPClassUID": Attr("IMAGE", Instance.sop_class_uid, "uid"),
    "InstanceNumber": Attr("IMAGE", Instance.instance_number, "int"),
    "NumberOfFrames": Attr("IMAGE", Instance.number_of_frames, "int"),
    "ContentDate": Attr("IMAGE", Instance.content_date, "date"),
    "ContentTime": Attr("IMAGE", Instance.content_time, "time"),
    "Rows": Attr("IMAGE", Instance.rows, "int"),
    "Columns": Attr("IMAGE", Instance.columns, "int"),
    "AvailableTransferSyntaxUID": Attr("IMAGE", Instance.transfer_syntax_uid, "uid"),
}
# fmt: on

# Below PATIENT level, the patient's name, birth date and sex are answered (and matched)
# from what each study was received with: the study's own, even when another study of
# the same Patient ID came with a different name.  Patient ID and issuer are the
# patient's identity, the same for all its studies.
STUDY_OWN: dict[str, Attr] = {
    "PatientName": Attr("STUDY", Study.patient_name, "pn"),
    "PatientBirthDate": Attr("STUDY", Study.patient_birth_date, "date"),
    "PatientSex": Attr("STUDY", Study.patient_sex, "str"),
}
# upper-cased copies for case-insensitive Person Name matching
_PN_NORM = {Patient.patient_name: Patient.patient_name_norm, Study.patient_name: Study.patient_name_norm}


def attr_for(keyword: str, level: str) -> Attr | None:
    """How ``keyword`` maps to the index for a query at ``level``."""
    if level != "PATIENT" and keyword in STUDY_OWN:
        return STUDY_OWN[keyword]
    return ATTRS.get(keyword)


UNIQUE_KEY = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}
# keys that describe the query itself, not an attribute to match
_CONTROL = {"QueryRetrieveLevel", "SpecificCharacterSet", "TimezoneOffsetFromUTC", "RetrieveAETitle", "InstanceAvailability"}


def _like(pattern: str) -> str:
    out = []
    for ch in pattern:
        if ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        elif ch in "%_\\":
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def _glob(pattern: str) -> str:
    """SQLite GLOB pattern: same ``*``/``?`` as DICOM; only ``[`` needs quoting."""
    return pattern.replace("[", "[[]")


def _wild(col, value: str, dialect: str):  # type: ignore[no-untyped-def]
    """Case-sensitive wild card matching (PS3.4 C.2.2.2.4) on every backend.

    SQLite's LIKE ignores ASCII case, so SQLite gets GLOB, whose wild cards are DICOM's own.
    """
    if dialect == "sqlite":
        return col.op("GLOB")(_glob(value))
    return col.like(_like(value), escape="\\")


def _has_wildcard(v: str) -> bool:
    return "*" in v or "?" in v


def _norm_time(v: str) -> str:
    return v.replace(":", "")


def _range(col, lo: str, hi: str, is_time: bool):  # type: ignore[no-untyped-def]
    conds = [col != ""]
    if lo:
        conds.append(col >= lo)
    if hi:
        # "~" sorts after digits and '.', so "1300" also admits "130059.99"
        conds.append(col <= (hi + "~" if is_time else hi))
    return and_(*conds)


def _match(name: str, attr: Attr, raw: object, dialect: str, fuzzy: bool = False):  # type: ignore[no-untyped-def]
    """A SQL condition for one non-empty matching key, or None for universal matching."""
    if attr.kind in ("computed", "code"):
        return None  # return keys only
    if isinstance(raw, (list, tuple)) or raw.__class__.__name__ == "MultiValue":
        values = [str(v) for v in raw]  # type: ignore[union-attr]
    else:
        values = [str(raw)] if raw is not None else []
    values = [v.strip() for v in values if str(v).strip() != ""]
    if not values or values == ["*"]:
        return None
    col = attr.column
    if attr.kind == "uid":
        bad = [v for v in values if not is_valid_uid(v)]
        if bad:
            raise QueryError(f"{name}: {bad[0]!r} is not a valid UID")
        return col.in_(values) if len(values) > 1 else col == values[0]  # type: ignore[union-attr]
    if attr.kind == "cs_multi":
        # an alias: at SERIES/IMAGE level the outer query joins Series too, and an
        # un-aliased subquery would correlate to it and filter the series themselves
        other = aliased(Series)
        conds = [_wild(other.modality, v, dialect) if _has_wildcard(v) else other.modality == v for v in values]
        return exists().where(other.study_fk == Study.pk, or_(*conds))
    value = values[0] if len(values) == 1 else "\\".join(values)
    if attr.kind == "int":
        try:
            return col == int(value)  # type: ignore[operator]
        except ValueError:
            raise QueryError(f"{name}: {value!r} is not an integer") from None
    if attr.kind in ("date", "time"):
        is_time = attr.kind == "time"
        if is_time:
            value = _norm_time(value)
        if "-" in value:
            lo, _, hi = value.partition("-")
            if is_time:
                return _range(col, lo.strip(), hi.strip(), True)
            return _range(col, lo.strip().replace(".", ""), hi.strip().replace(".", ""), False)
        if is_time:
            return col.like(value + "%")  # type: ignore[union-attr]  # 1200 matches 120000.000
        return col == value.replace(".", "")  # type: ignore[operator]
    if attr.kind == "pn":
        norm = next((n for c, n in _PN_NORM.items() if c is col), None)
        target = norm if norm is not None else func.upper(col)  # type: ignore[arg-type]
        v = value.upper()
        if fuzzy:
            return _fuzzy_pn(target, v)
        if _has_wildcard(v):
            return target.like(_like(v), escape="\\")
        # "DOE" matches "DOE^JOHN": PN single-value matching on the family name component
        return or_(target == v, target.like(_like(v) + "^%", escape="\\"))
    # plain strings: case-sensitive per PS3.4 (except PN)
    if _has_wildcard(value):
        return _wild(col, value, dialect)
    return col == value  # type: ignore[operator]


def _fuzzy_pn(target, value: str):  # type: ignore[no-untyped-def]
    """QIDO-RS ``fuzzymatching=true`` on PN: each word of the value is a case-insensitive prefix of some
    name component or word (``"jo do"`` matches ``DOE^JOHN``); wildcards keep their meaning."""
    words = [w for w in value.replace("^", " ").replace(",", " ").split() if w]
    conds = []
    for w in words:
        pat = _like(w) + ("" if w.endswith("*") else "%")
        conds.append(or_(*(target.like(pre + pat, escape="\\") for pre in ("", "%^", "% ", "%="))))
    return and_(*conds) if conds else None


class QueryService:
    def __init__(self, index: Index, retrieve_ae_title: str) -> None:
        self.index = index
        self.retrieve_ae_title = retrieve_ae_title

    def find(
        self, identifier: Dataset, model: str = "STUDY", limit: int | None = None, offset: int = 0, fuzzy: bool = False
    ) -> Iterator[Dataset]:
        """Yield one response identifier per match.  ``model`` is "PATIENT" or "STUDY" root.

        ``fuzzy``: QIDO-RS fuzzy matching of person names (see :func:`_fuzzy_pn`).
        """
        try:
            level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
        except Exception as exc:  # raw bytes pydicom cannot decode
            raise QueryError(f"QueryRetrieveLevel cannot be decoded: {exc}") from None
        if level not in LEVELS:
            raise QueryError(f"QueryRetrieveLevel {level!r} is not one of {', '.join(LEVELS)}")
        if model == "STUDY" and level == "PATIENT":
            raise QueryError("PATIENT level is not part of the Study Root model")
        depth = LEVELS.index(level)
        in_scope = set(LEVELS[: depth + 1])
        if model == "STUDY":
            # Study Root carries the patient attributes at study level
            in_scope.add("PATIENT")

        requested: list[str] = []
        conds = []
        for elem in _elements(identifier):
            kw = elem.keyword or keyword_for_tag(elem.tag)
            if not kw or kw in _CONTROL or elem.tag.group == 0x0002:
                continue
            requested.append(kw)
            attr = attr_for(kw, level)
            if attr is None or attr.level not in in_scope:
                continue  # unsupported or lower-level key: returned empty / ignored
            if elem.VR == "SQ":
                continue
            cond = _match(kw, attr, elem.value, self.index.dialect, fuzzy)
            if cond is not None:
                conds.append(cond)

        entities = [Patient, Study, Series, Instance][: depth + 1]
        # counts are correlated subqueries in the same statement, not one query per response
        counted = [kw for kw in dict.fromkeys(requested) if kw in _COUNTS and ATTRS[kw].level in in_scope]
        stmt: Select = select(*entities, *(_COUNTS[kw]().label(kw) for kw in counted))
        if depth >= 1:
            stmt = stmt.join(Study, Study.patient_fk == Patient.pk)
        if depth >= 2:
            stmt = stmt.join(Series, Series.study_fk == Study.pk)
        if depth >= 3:
            stmt = stmt.join(Instance, Instance.series_fk == Series.pk)
        stmt = stmt.where(*conds).order_by(_ENTITY[level].pk)
        if offset:
            stmt = stmt.offset(offset)
        if limit is not None:
            stmt = stmt.limit(limit)

        # Everything that does not depend on the row is worked out once per query: each response is
        # then a handful of DataElements made from (tag, VR) pairs looked up here, not per match
        # (keyword and dictionary lookups per element were most of the Python time of a large answer).
        unique = [
            (_TAG_VR[UNIQUE_KEY[lv]], lv, ATTRS[UNIQUE_KEY[lv]].column.key)  # type: ignore[union-attr]
            for lv in LEVELS[: depth + 1]
            if not (lv == "PATIENT" and model == "STUDY" and "PatientID" not in requested)
        ]
        returned = [(kw, _TAG_VR.get(kw) or _tag_vr(kw)) for kw in requested]
        returned = [(kw, tv) for kw, tv in returned if tv is not None]
        availability = any(e.keyword == "InstanceAvailability" for e in identifier)
        with self.index.read_session() as s:
            for row in s.execute(stmt).yield_per(500):
                objs = dict(zip(("PATIENT", "STUDY", "SERIES", "IMAGE"), row[: depth + 1]))
                counters = dict(zip(counted, row[depth + 1 :]))
                ds = Dataset()
                charset_needed = False
                ds[_QRL_TAG] = DataElement(_QRL_TAG, "CS", level)
                for (tag, vr), lv, column in unique:
                    ds[tag] = DataElement(tag, vr, getattr(objs[lv], column), validation_mode=config.IGNORE)
                for kw, (tag, vr) in returned:
                    value = self._value(s, kw, objs, counters, in_scope, level)
                    _put(ds, tag, vr, value)
                    if isinstance(value, str) and not value.isascii():
                        charset_needed = True
                ds[_RAE_TAG] = DataElement(_RAE_TAG, "AE", self.retrieve_ae_title)
                if availability:
                    ds.InstanceAvailability = "ONLINE"
                if charset_needed:
                    ds.SpecificCharacterSet = "ISO_IR 192"
                yield ds

    def _value(self, s, kw: str, objs: dict, counters: dict, in_scope: set[str], level: str):  # type: ignore[no-untyped-def]
        attr = attr_for(kw, level)
        if attr is None or attr.level not in in_scope:
            return None
        obj = objs.get(attr.level)
        if obj is None:
            return None
        if kw in counters:
            return int(counters[kw])
        if kw == "ModalitiesInStudy":
            return [m for m in obj.modalities.split("\\") if m]
        if kw == "ProcedureCodeSequence":
            if not obj.procedure_code_value:
                return Sequence()
            item = Dataset()
            item.CodeValue = obj.procedure_code_value
            item.CodingSchemeDesignator = obj.procedure_code_scheme
            item.CodeMeaning = obj.procedure_code_meaning
            return Sequence([item])
        return getattr(obj, attr.column.key)  # type: ignore[union-attr]


def _elements(identifier: Dataset) -> Iterator:  # type: ignore[type-arg]
    """The identifier's elements, decoded one by one so that a bad value names its attribute."""
    for tag in list(identifier.keys()):
        try:
            yield identifier[tag]
        except Exception as exc:  # pydicom decodes raw values lazily and raises on bad ones
            name = keyword_for_tag(tag) or str(tag)
            raise QueryError(f"{name}: value cannot be decoded: {exc}") from None


_QRL_TAG = Tag("QueryRetrieveLevel")
_RAE_TAG = Tag("RetrieveAETitle")


def _tag_vr(kw: str) -> tuple[BaseTag, str] | None:
    """(tag, VR) of a dictionary keyword, or None for one pydicom does not know."""
    try:
        return Tag(kw), dictionary_VR(kw)
    except (KeyError, ValueError):
        return None


# every keyword the index can answer, looked up once at import
_TAG_VR: dict[str, tuple[BaseTag, str]] = {kw: tv for kw in ATTRS if (tv := _tag_vr(kw)) is not None}


def _put(ds: Dataset, tag: BaseTag, vr: str, value: object) -> None:
    """:func:`_set` for a known (tag, VR): an empty value is returned zero-length, a sequence as one.

    Values come from the index (checked when they were received), so pydicom's per-value VR validation,
    which only warns and never changes the bytes written, is skipped: ~15 % of building a response.
    """
    if value is None or value == "":
        ds[tag] = DataElement(tag, vr, Sequence() if vr == "SQ" else None, validation_mode=config.IGNORE)
        return
    if vr == "SQ" and not isinstance(value, Sequence):
        value = Sequence()
    ds[tag] = DataElement(tag, vr, value, validation_mode=config.IGNORE)


def _set(ds: Dataset, kw: str, value: object) -> None:
    try:
        vr = dictionary_VR(kw)
    except KeyError:
        return
    if value is None or value == "":
        ds.add_new(kw, vr, Sequence() if vr == "SQ" else None)
        return
    if vr == "SQ" and not isinstance(value, Sequence):
        value = Sequence()
    ds.add_new(kw, vr, value)


def _count(what, *joins, where):  # type: ignore[no-untyped-def]
    stmt = select(func.count(what))
    for target, on in joins:
        stmt = stmt.join(target, on)
    return stmt.where(where).scalar_subquery()


def _patient_studies():  # type: ignore[no-untyped-def]
    st = aliased(Study)
    return _count(st.pk, where=st.patient_fk == Patient.pk)


def _patient_series():  # type: ignore[no-untyped-def]
    st, se = aliased(Study), aliased(Series)
    return _count(se.pk, (st, se.study_fk == st.pk), where=st.patient_fk == Patient.pk)


def _patient_instances():  # type: ignore[no-untyped-def]
    st, se, i = aliased(Study), aliased(Series), aliased(Instance)
    return _count(i.pk, (se, i.series_fk == se.pk), (st, se.study_fk == st.pk), where=st.patient_fk == Patient.pk)


def _study_series():  # type: ignore[no-untyped-def]
    se = aliased(Series)
    return _count(se.pk, where=se.study_fk == Study.pk)


def _study_instances():  # type: ignore[no-untyped-def]
    se, i = aliased(Series), aliased(Instance)
    return _count(i.pk, (se, i.series_fk == se.pk), where=se.study_fk == Study.pk)


def _series_instances():  # type: ignore[no-untyped-def]
    i = aliased(Instance)
    return _count(i.pk, where=i.series_fk == Series.pk)


# Inner tables are aliased so that each subquery correlates only with the
# entity it counts for, whatever else the outer query joins.  Each is built once
# (functools.cache) and reused by every statement: SQL constructs are immutable,
# and building the aliases was ~40 % of a small query's Python time.
_COUNTS: dict[str, Callable] = {
    "NumberOfPatientRelatedStudies": functools.cache(_patient_studies),
    "NumberOfPatientRelatedSeries": functools.cache(_patient_series),
    "NumberOfPatientRelatedInstances": functools.cache(_patient_instances),
    "NumberOfStudyRelatedSeries": functools.cache(_study_series),
    "NumberOfStudyRelatedInstances": functools.cache(_study_instances),
    "NumberOfSeriesRelatedInstances": functools.cache(_series_instances),
}

__all__ = ["QueryService", "QueryError", "ATTRS", "LEVELS", "attr_for"]
