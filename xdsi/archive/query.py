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
from operator import itemgetter
from typing import Any, Callable, Iterator

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


@dataclass
class _Field:
    """One element of every response to a query: where its value comes from and how it is written.

    ``get`` takes the result row (a tuple of the selected columns) and returns the value as
    :meth:`QueryService.find` puts it in the Dataset (None or "" for an empty element).
    """

    tag: BaseTag
    vr: str
    get: Callable[[tuple], object]  # type: ignore[type-arg]
    charset: bool = False  # a string value that may need Specific Character Set ISO_IR 192


@dataclass
class _Plan:
    level: str
    stmt: Select  # type: ignore[type-arg]
    fields: list[_Field]  # in the order the Dataset path sets them; later ones replace earlier (same tag)


def _const(value: object) -> Callable[[tuple], object]:  # type: ignore[type-arg]
    return lambda _row: value


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
        plan = self._plan(identifier, model, limit, offset, fuzzy)
        with self.index.read_session() as s:
            for row in s.execute(plan.stmt).yield_per(500):
                ds = Dataset()
                charset_needed = False
                for f in plan.fields:
                    value = f.get(row)
                    _put(ds, f.tag, f.vr, value)
                    if f.charset and isinstance(value, str) and not value.isascii():
                        charset_needed = True
                if charset_needed:
                    ds.SpecificCharacterSet = "ISO_IR 192"
                yield ds

    def find_encoded(self, identifier: Dataset, model: str = "STUDY", *, implicit_vr: bool = True) -> Iterator[bytes]:
        """:meth:`find`, each response already encoded (little endian, implicit or explicit VR).

        Why: a C-FIND answer is mostly per-match Python; pydicom building and writing a Dataset
        per match was more than half of it.  Here the element headers are worked out once per
        query and each match is a join of a few byte strings, the same bytes pydicom writes for
        the Dataset :meth:`find` yields (tests/unit/test_query_encoded.py compares them).
        """
        from xdsi.archive.find_encoder import RowEncoder

        plan = self._plan(identifier, model, None, 0, False)
        encoder = RowEncoder(plan.fields, implicit_vr=implicit_vr)
        encode = encoder.encode
        with self.index.read_connection() as conn:
            for row in conn.execution_options(yield_per=500).execute(plan.stmt):
                yield encode(row)

    def find_rows(
        self, identifier: Dataset, model: str = "STUDY", limit: int | None = None, offset: int = 0, fuzzy: bool = False
    ) -> tuple[list[_Field], Iterator[Any]]:
        """:meth:`find` as the response fields and an iterator of result rows (QIDO-RS encodes JSON from them).

        The query is planned (and refused with :class:`QueryError`) before this returns; it runs when
        the rows are first asked for.
        """
        plan = self._plan(identifier, model, limit, offset, fuzzy)

        def rows() -> Iterator[Any]:
            with self.index.read_connection() as conn:
                yield from conn.execution_options(yield_per=500).execute(plan.stmt)

        return plan.fields, rows()

    def _plan(self, identifier: Dataset, model: str, limit: int | None, offset: int, fuzzy: bool) -> _Plan:
        """The statement and the response fields of one query: everything that does not depend on the row."""
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
        availability = False
        for elem in _elements(identifier):
            kw = elem.keyword or keyword_for_tag(elem.tag)
            if kw == "InstanceAvailability":
                availability = True
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

        # Only columns are selected (no ORM entities to build per row); each response element reads
        # its value from the row by position.
        columns: list = []  # type: ignore[type-arg]
        positions: dict[int, int] = {}

        def column(expr) -> Callable[[tuple], object]:  # type: ignore[no-untyped-def,type-arg]
            key = id(expr)
            if key not in positions:
                positions[key] = len(columns)
                columns.append(expr)
            return itemgetter(positions[key])

        fields: list[_Field] = [_Field(_QRL_TAG, "CS", _const(level))]
        for lv in LEVELS[: depth + 1]:
            if lv == "PATIENT" and model == "STUDY" and "PatientID" not in requested:
                continue
            tag, vr = _TAG_VR[UNIQUE_KEY[lv]]
            fields.append(_Field(tag, vr, column(ATTRS[UNIQUE_KEY[lv]].column)))
        for kw in requested:
            tv = _TAG_VR.get(kw) or _tag_vr(kw)
            if tv is None:
                continue
            fields.append(_Field(tv[0], tv[1], self._getter(kw, level, in_scope, column), charset=True))
        fields.append(_Field(_RAE_TAG, "AE", _const(self.retrieve_ae_title)))
        if availability:
            fields.append(_Field(_AVAILABILITY_TAG, "CS", _const("ONLINE")))

        stmt: Select = select(*columns).select_from(Patient)  # type: ignore[type-arg]
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
        return _Plan(level, stmt, fields)

    @staticmethod
    def _getter(kw: str, level: str, in_scope: set[str], column: Callable) -> Callable[[tuple], object]:  # type: ignore[type-arg]
        """How the value of ``kw`` is read from a result row (None: returned empty)."""
        attr = attr_for(kw, level)
        if attr is None or attr.level not in in_scope:
            return _const(None)
        if kw in _COUNTS:
            get = column(_COUNTS[kw]())
            return lambda row: int(get(row) or 0)
        if kw == "ModalitiesInStudy":
            get = column(Study.modalities)
            return lambda row: [m for m in get(row).split("\\") if m]
        if kw == "ProcedureCodeSequence":
            value, scheme, meaning = (column(c) for c in (Study.procedure_code_value, Study.procedure_code_scheme,
                                                           Study.procedure_code_meaning))

            def code(row: tuple) -> Sequence:  # type: ignore[type-arg]
                if not value(row):
                    return Sequence()
                item = Dataset()
                item.CodeValue = value(row)
                item.CodingSchemeDesignator = scheme(row)
                item.CodeMeaning = meaning(row)
                return Sequence([item])

            return code
        return column(attr.column)


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
_AVAILABILITY_TAG = Tag("InstanceAvailability")


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


def _patient_studies():  # type: ignore[no-untyped-def]
    st = aliased(Study)
    return select(func.count(st.pk)).where(st.patient_fk == Patient.pk).scalar_subquery()


def _patient_sum(column):  # type: ignore[no-untyped-def]
    """A sum of a study aggregate over the patient's studies (the study rows, not the instance rows)."""
    st = aliased(Study)
    return select(func.coalesce(func.sum(getattr(st, column.key)), 0)).where(st.patient_fk == Patient.pk).scalar_subquery()


# Study and series counts are columns kept in step at ingest and delete (catalog.record_instance,
# catalog.prune_empty; migration 0004 filled them): a query reads them, never counts instance rows.
# The patient counts add up the patient's study rows (a patient has few), so that moving a study
# to another patient (a merge) needs no patient counter.  The patient subqueries alias Study so
# that each correlates only with the outer Patient, whatever else the outer query joins; each is
# built once (functools.cache) and reused by every statement: SQL constructs are immutable.
_COUNTS: dict[str, Callable] = {  # type: ignore[type-arg]
    "NumberOfPatientRelatedStudies": functools.cache(_patient_studies),
    "NumberOfPatientRelatedSeries": functools.cache(lambda: _patient_sum(Study.num_series)),
    "NumberOfPatientRelatedInstances": functools.cache(lambda: _patient_sum(Study.num_instances)),
    "NumberOfStudyRelatedSeries": lambda: Study.num_series,
    "NumberOfStudyRelatedInstances": lambda: Study.num_instances,
    "NumberOfSeriesRelatedInstances": lambda: Series.num_instances,
}

__all__ = ["QueryService", "QueryError", "ATTRS", "LEVELS", "attr_for"]
