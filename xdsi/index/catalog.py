"""Writing to the index: patients, studies, series, instances and their copies.

Rows shared by many instances (patient, study, series) are created with
``INSERT ... ON CONFLICT DO NOTHING`` followed by a read, so several
associations, or several xdsi processes on one PostgreSQL index, can store
instances of the same new study at once without a unique-key race.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from xdsi.index.models import FileCopy, Instance, Patient, Series, Study

if TYPE_CHECKING:
    from xdsi.archive.header import InstanceHeader

log = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(dt: datetime) -> datetime:
    """SQLite hands back naive datetimes for timezone-aware columns; they were written as UTC."""
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class CopyRecord:
    tier: str
    rel_path: str
    size: int
    sha256: str
    transfer_syntax_uid: str
    original_size: int | None = None  # the file it was losslessly compressed from (FileCopy.original_size)


def _insert_ignore(session: Session, model: type, values: dict[str, Any], conflict: list[str]) -> bool:
    """INSERT unless the unique key exists; True when this statement inserted the row."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        stmt = postgresql.insert(model).values(**values).on_conflict_do_nothing(index_elements=conflict)
    elif dialect == "sqlite":
        stmt = sqlite.insert(model).values(**values).on_conflict_do_nothing(index_elements=conflict)
    else:  # pragma: no cover - only the two supported backends
        raise NotImplementedError(dialect)
    # RETURNING, not rowcount: the ORM session reports -1 for this statement on PostgreSQL
    return session.execute(stmt.returning(model.pk)).first() is not None  # type: ignore[attr-defined]


def _fill_empty(row: Any, values: dict[str, Any]) -> None:
    """Later instances may carry attributes the first one lacked; never overwrite what is known."""
    for k, v in values.items():
        if v not in (None, "") and getattr(row, k) in (None, ""):
            setattr(row, k, v)


def patient_key(h: "InstanceHeader") -> dict[str, str]:
    """The patient's identity: (Patient ID, Issuer of Patient ID), or the study itself when there is no Patient ID.

    An empty Patient ID identifies nobody, so it must never gather the studies of different
    people under one patient: such a study is its own patient (``scope_study_uid``).
    """
    if h.patient_id:
        return {"patient_id": h.patient_id, "issuer_of_patient_id": h.issuer_of_patient_id, "scope_study_uid": ""}
    return {"patient_id": "", "issuer_of_patient_id": h.issuer_of_patient_id, "scope_study_uid": h.study_uid}


def _patient(session: Session, h: "InstanceHeader", now: datetime) -> Patient:
    key = patient_key(h)
    values = {
        "patient_name": h.patient_name,
        "patient_name_norm": h.patient_name.upper(),
        "birth_date": h.birth_date,
        "sex": h.sex,
    }
    row = session.scalars(select(Patient).filter_by(**key)).one_or_none()
    if row is None:
        _insert_ignore(session, Patient, {**key, **values, "created_at": now}, list(key))
        row = session.scalars(select(Patient).filter_by(**key)).one()
    else:
        if h.patient_name and row.patient_name and h.patient_name != row.patient_name:
            # Same identity, another name (a correction, a typo, a different person under a
            # reused ID): existing studies are not renamed; this study keeps its own name.
            log.warning(
                "Patient ID %r (issuer %r): study %s arrives with name %r, the patient was first received as %r; "
                "each study keeps the name it was received with",
                h.patient_id, h.issuer_of_patient_id, h.study_uid, h.patient_name, row.patient_name,
            )
        _fill_empty(row, values)
    return row


class PatientMismatch(Exception):
    """An instance names another patient than the study it belongs to already has.

    Filing it under the study's patient would put one person's image under another's
    name; moving the study would silently re-assign what was already acknowledged.
    The instance is refused with this message instead.
    """


def _check_same_patient(session: Session, h: "InstanceHeader", study: Study) -> None:
    have = session.get(Patient, study.patient_fk)
    want = patient_key(h)
    if have is None:  # pragma: no cover - the foreign key forbids it
        return
    if (have.patient_id, have.issuer_of_patient_id, have.scope_study_uid) == tuple(want.values()):
        return
    # An instance that leaves the issuer out (a presentation state or report made on a workstation
    # often does) names the same patient when its Patient ID is the study's: an absent issuer is
    # "not stated", not another assigning authority.  Two different stated issuers, or another
    # Patient ID, are another patient.
    if h.patient_id and h.patient_id == have.patient_id and not h.issuer_of_patient_id:
        return
    raise PatientMismatch(
        f"Study {h.study_uid} is archived for Patient ID {have.patient_id!r} (issuer {have.issuer_of_patient_id!r}); "
        f"this instance has Patient ID {h.patient_id!r} (issuer {h.issuer_of_patient_id!r})"
    )


def _study(session: Session, h: "InstanceHeader", now: datetime) -> Study:
    code = h.procedure_code or ("", "", "")
    values = {
        "patient_name": h.patient_name,
        "patient_name_norm": h.patient_name.upper(),
        "patient_birth_date": h.birth_date,
        "patient_sex": h.sex,
        "study_date": h.study_date,
        "study_time": h.study_time,
        "accession_number": h.accession_number,
        "accession_issuer": h.accession_issuer,
        "study_id": h.study_id,
        "study_description": h.study_description,
        "referring_physician": h.referring_physician,
        "procedure_code_value": code[0],
        "procedure_code_scheme": code[1],
        "procedure_code_meaning": code[2],
    }
    row = session.scalars(select(Study).filter_by(study_uid=h.study_uid)).one_or_none()
    if row is None:
        patient = _patient(session, h, now)
        _insert_ignore(
            session,
            Study,
            {"study_uid": h.study_uid, "patient_fk": patient.pk, "created_at": now, "updated_at": now, **values},
            ["study_uid"],
        )
        row = session.scalars(select(Study).filter_by(study_uid=h.study_uid)).one()
        if row.patient_fk != patient.pk:
            # a concurrent store created the study first: hold this instance to the same check
            _check_same_patient(session, h, row)
    else:
        _check_same_patient(session, h, row)
        _patient(session, h, now)  # fills attributes the patient row lacked
        _fill_empty(row, values)
    return row


def _series(session: Session, h: "InstanceHeader", study: Study, now: datetime) -> tuple[Series, bool]:
    """The series row, and whether this call created it (not a concurrent store)."""
    values = {
        "modality": h.modality,
        "series_number": h.series_number,
        "series_description": h.series_description,
        "body_part": h.body_part,
        "series_date": h.series_date,
        "series_time": h.series_time,
        "institution_name": h.institution_name,
        "station_name": h.station_name,
    }
    row = session.scalars(select(Series).filter_by(series_uid=h.series_uid)).one_or_none()
    created = False
    if row is None:
        created = _insert_ignore(
            session, Series, {"series_uid": h.series_uid, "study_fk": study.pk, "created_at": now, **values}, ["series_uid"]
        )
        row = session.scalars(select(Series).filter_by(series_uid=h.series_uid)).one()
    else:
        _fill_empty(row, values)
    return row, created


def add_copy(
    session: Session, instance_pk: int, copy: CopyRecord, *, now: datetime | None = None, last_read_at: datetime | None = None
) -> FileCopy:
    """Record one more stored copy of an instance (store, recall, migration)."""
    now = now or utcnow()
    row = FileCopy(
        instance_fk=instance_pk,
        tier=copy.tier,
        rel_path=copy.rel_path,
        size=copy.size,
        sha256=copy.sha256,
        transfer_syntax_uid=copy.transfer_syntax_uid,
        stored_at=now,
        last_read_at=last_read_at or now,
        original_size=copy.original_size,
    )
    session.add(row)
    return row


def refresh_study_modalities(session: Session, study_pk: int) -> None:
    mods = session.scalars(
        select(Series.modality).where(Series.study_fk == study_pk, Series.modality != "").distinct()
    ).all()
    session.execute(update(Study).where(Study.pk == study_pk).values(modalities="\\".join(sorted(mods))))


def refresh_counts(session: Session, series_pk: int | None = None, study_pk: int | None = None) -> None:
    """Recount the query aggregates of a series and/or a study from the rows (delete, move, replace).

    Ingest counts up instead (:func:`record_instance`); a recount is for the rare paths where an
    instance leaves a series, so that no path has to get an increment exactly right.
    """
    if series_pk is not None:
        n = select(func.count()).select_from(Instance).where(Instance.series_fk == series_pk).scalar_subquery()
        session.execute(update(Series).where(Series.pk == series_pk).values(num_instances=n))
    if study_pk is not None:
        se = select(Series).where(Series.study_fk == study_pk).subquery()
        session.execute(
            update(Study)
            .where(Study.pk == study_pk)
            .values(
                num_series=select(func.count()).select_from(se).scalar_subquery(),
                num_instances=select(func.coalesce(func.sum(se.c.num_instances), 0)).scalar_subquery(),
            )
        )


def find_instance(session: Session, sop_instance_uid: str) -> Instance | None:
    return session.scalars(select(Instance).filter_by(sop_instance_uid=sop_instance_uid)).one_or_none()


def record_instance(
    session: Session, h: "InstanceHeader", copy: CopyRecord, *, source_ae: str = "", replace: bool = False
) -> tuple[int, list[CopyRecord]]:
    """Index one stored instance and its first copy.

    Returns the instance's primary key and, when ``replace`` superseded an
    earlier instance with the same SOP Instance UID, the copies the caller
    must delete once the transaction has committed.

    The common case (a new instance of a series already indexed for this
    study and patient, nothing to fill in) takes :func:`_record_fast`: a few
    Core statements instead of ORM rows; everything else takes the general
    path below, which the fast path never second-guesses.
    """
    now = utcnow()
    pk = _record_fast(session, h, copy, source_ae, now)
    if pk is not None:
        return pk, []
    study = _study(session, h, now)
    series, series_created = _series(session, h, study, now)
    values = {"series_fk": series.pk, **_instance_values(h, source_ae)}
    old_copies: list[CopyRecord] = []
    inst = find_instance(session, h.sop_instance_uid)
    moved_from: int | None = None
    other_study: int | None = None
    if inst is not None:
        if not replace:
            raise DuplicateInstance(h.sop_instance_uid)
        old_series_fk = inst.series_fk
        old_copies = [
            CopyRecord(c.tier, c.rel_path, c.size, c.sha256, c.transfer_syntax_uid) for c in inst.copies
        ]
        session.execute(delete(FileCopy).where(FileCopy.instance_fk == inst.pk))
        for k, v in values.items():
            setattr(inst, k, v)
        inst.created_at = now
        if old_series_fk != series.pk:
            moved_from = old_series_fk
    else:
        inst = Instance(sop_instance_uid=h.sop_instance_uid, created_at=now, **values)
        session.add(inst)
        # query aggregates count up in SQL (atomic beside concurrent stores), flushed with this instance;
        # a series row of another study (a reused Series Instance UID) has that study recounted instead
        series.num_instances = Series.num_instances + 1  # type: ignore[assignment]
        if series.study_fk == study.pk:
            study.num_instances = Study.num_instances + 1  # type: ignore[assignment]
            if series_created:
                study.num_series = Study.num_series + 1  # type: ignore[assignment]
        else:
            other_study = series.study_fk
    session.flush()
    if moved_from is not None:
        refresh_counts(session, series_pk=series.pk, study_pk=series.study_fk)
        prune_empty(session, moved_from)  # recounts the old series and its study
    elif other_study is not None:
        refresh_counts(session, study_pk=other_study)
    add_copy(session, inst.pk, copy, now=now)
    study.updated_at = now
    if h.modality and h.modality not in study.modalities.split("\\"):
        refresh_study_modalities(session, study.pk)
    return inst.pk, old_copies


_PT, _ST, _SE, _IN, _FC = (m.__table__ for m in (Patient, Study, Series, Instance, FileCopy))  # type: ignore[attr-defined]

# attributes of each row that a later instance may fill in (_fill_empty); header field -> column
_SERIES_FILL = {
    "modality": "modality", "series_number": "series_number", "series_description": "series_description",
    "body_part": "body_part", "series_date": "series_date", "series_time": "series_time",
    "institution_name": "institution_name", "station_name": "station_name",
}
_STUDY_FILL = {
    "patient_name": "patient_name", "birth_date": "patient_birth_date", "sex": "patient_sex",
    "study_date": "study_date", "study_time": "study_time", "accession_number": "accession_number",
    "accession_issuer": "accession_issuer", "study_id": "study_id", "study_description": "study_description",
    "referring_physician": "referring_physician",
}
_PATIENT_FILL = {"patient_name": "patient_name", "birth_date": "birth_date", "sex": "sex"}

# One indexed read gives the series, its study and the study's patient, always from the database (no
# cache that a delete, merge or replace could leave pointing at another patient's rows).
_SERIES_CONTEXT = (
    select(
        _SE.c.pk.label("series_pk"), _SE.c.study_fk, *(_SE.c[c].label("se_" + c) for c in _SERIES_FILL.values()),
        _ST.c.study_uid, _ST.c.modalities, _ST.c.procedure_code_value, _ST.c.procedure_code_scheme,
        _ST.c.procedure_code_meaning, *(_ST.c[c].label("st_" + c) for c in _STUDY_FILL.values()),
        _ST.c.patient_name_norm.label("st_norm"), _PT.c.patient_name_norm.label("pt_norm"),
        _PT.c.patient_id, _PT.c.issuer_of_patient_id, _PT.c.scope_study_uid,
        *(_PT.c[c].label("pt_" + c) for c in _PATIENT_FILL.values()),
    )
    .select_from(_SE.join(_ST, _SE.c.study_fk == _ST.c.pk).join(_PT, _ST.c.patient_fk == _PT.c.pk))
    .where(_SE.c.series_uid == bindparam("series_uid"))
)
_BUMP_SERIES = _SE.update().where(_SE.c.pk == bindparam("b_pk")).values(num_instances=_SE.c.num_instances + 1)
_BUMP_STUDY = (
    _ST.update()
    .where(_ST.c.pk == bindparam("b_pk"))
    .values(num_instances=_ST.c.num_instances + 1, updated_at=bindparam("b_now"))
)
_INSTANCE_KEYS = ["sop_instance_uid", "series_fk", "sop_class_uid", "transfer_syntax_uid", "instance_number",
                  "number_of_frames", "content_date", "content_time", "rows", "columns", "source_ae_title", "created_at"]
_COPY_KEYS = ["instance_fk", "tier", "rel_path", "size", "sha256", "transfer_syntax_uid", "stored_at", "last_read_at",
              "original_size"]
_NEW_INSTANCE: dict[str, Any] = {
    "postgresql": postgresql.insert(_IN).on_conflict_do_nothing(index_elements=["sop_instance_uid"]).returning(_IN.c.pk),
    "sqlite": sqlite.insert(_IN).on_conflict_do_nothing(index_elements=["sop_instance_uid"]).returning(_IN.c.pk),
}


class _DriverStatement:
    """A Core statement compiled once per dialect and run on the DBAPI cursor of the caller's connection.

    Why (issue 14): SQLAlchemy's execution of an already compiled statement (execution context,
    events, parameter and result set-up) cost several times what the database took to run it: the
    fast path's statements were about a fifth of the GIL time of a stored instance (py-spy on a C-STORE
    ingest).  Only the driver call is skipped: the SQL is SQLAlchemy's own compilation for the
    dialect, values go through the dialect's own bind processors (SQLite's DateTime format), every
    column is given explicitly (no Python-side defaults are needed), and the statement runs on the
    connection, hence in the transaction or savepoint, of the session.
    """

    def __init__(self, stmt: Any, column_keys: list[str] | None = None) -> None:
        self.stmt = stmt
        self.column_keys = column_keys
        self._compiled: dict[str, tuple[str, dict[str, Any], dict[str, Any], list[str] | None]] = {}

    def _for(self, dialect: Any) -> tuple[str, dict[str, Any], dict[str, Any], list[str] | None]:
        got = self._compiled.get(dialect.name)
        if got is None:
            kw = {"column_keys": self.column_keys} if self.column_keys is not None else {}
            comp = self.stmt.compile(dialect=dialect, **kw)
            order = list(comp.positiontup) if dialect.positional else None  # type: ignore[arg-type]
            got = (str(comp), dict(comp.params), dict(comp._bind_processors), order)
            self._compiled[dialect.name] = got
        return got

    def run(self, conn: Any, values: dict[str, Any]) -> Any:
        """Execute with ``values`` on ``conn`` (a Core connection); the DBAPI cursor, for its rows."""
        sql, defaults, processors, order = self._for(conn.dialect)
        params = {**defaults, **values}
        for name, process in processors.items():
            params[name] = process(params[name])
        cursor = conn.connection.cursor()
        cursor.execute(sql, params if order is None else tuple(params[n] for n in order))
        return cursor


_CONTEXT_RAW = _DriverStatement(_SERIES_CONTEXT)
_NEW_INSTANCE_RAW = {name: _DriverStatement(stmt, _INSTANCE_KEYS) for name, stmt in _NEW_INSTANCE.items()}
_BUMP_STUDY_RAW = _DriverStatement(_BUMP_STUDY)
_BUMP_SERIES_RAW = _DriverStatement(_BUMP_SERIES)
_ADD_COPY_RAW = _DriverStatement(_FC.insert(), _COPY_KEYS)


def _first_row(cursor: Any) -> dict[str, Any] | None:
    """The cursor's first row by column name (the label), or None; the cursor is closed."""
    try:
        row = cursor.fetchone()
        return None if row is None else dict(zip((d[0] for d in cursor.description), row))
    finally:
        cursor.close()


def _would_fill(row: Any, h: "InstanceHeader", fields: dict[str, str], prefix: str) -> bool:
    """Whether :func:`_fill_empty` would change this row: the header knows something the row lacks."""
    for attr, col in fields.items():
        v = getattr(h, attr)
        if v not in (None, "") and row[prefix + col] in (None, ""):
            return True
    return False


def _instance_values(h: "InstanceHeader", source_ae: str) -> dict[str, Any]:
    """The instance row's columns taken from the header: one list for the fast path and the general one."""
    return {
        "sop_class_uid": h.sop_class_uid,
        "transfer_syntax_uid": h.transfer_syntax_uid,
        "instance_number": h.instance_number,
        "number_of_frames": h.number_of_frames,
        "content_date": h.content_date,
        "content_time": h.content_time,
        "rows": h.rows,
        "columns": h.columns,
        "source_ae_title": source_ae[:16],
    }


def _record_fast(session: Session, h: "InstanceHeader", copy: CopyRecord, source_ae: str, now: datetime) -> int | None:
    """Index a new instance of an already indexed series with Core statements; None: take the general path.

    Per-instance ORM work (loading patient, study and series objects, the
    unit-of-work flush) was about half the server's CPU per stored instance
    (py-spy, issue 14).  This path runs only when the general path would do
    exactly the same writes: the series exists and belongs to the header's
    study; the study's patient has the header's patient key exactly (any other
    case, including the "issuer not stated" one and every mismatch, goes to
    the general path, which refuses or files it as before); the patient's name
    is the one on record (else the general path logs it); no attribute is
    left to fill in; the modality is listed.  The instance row is inserted
    first with ON CONFLICT DO NOTHING, so an instance already indexed (a
    duplicate, a replacement) also goes to the general path, with nothing
    written yet.  All of it in the caller's transaction or savepoint.
    """
    if not h.series_uid or not h.study_uid or session.get_bind().dialect.name not in _NEW_INSTANCE_RAW:
        return None
    session.flush()  # pending ORM writes of earlier instances in this transaction go first
    return _record_fast_on(session.connection(), h, copy, source_ae, now)


def record_new_instance(conn: Any, h: "InstanceHeader", copy: CopyRecord, *, source_ae: str = "") -> int | None:
    """:func:`record_instance`'s fast path alone, on a driver connection (``GroupCommitter.run(driver=...)``).

    The instance's primary key, or None when the instance needs the general path (nothing written then).
    """
    if not h.series_uid or not h.study_uid or conn.dialect.name not in _NEW_INSTANCE_RAW:
        return None
    return _record_fast_on(conn, h, copy, source_ae, utcnow())


def _record_fast_on(conn: Any, h: "InstanceHeader", copy: CopyRecord, source_ae: str, now: datetime) -> int | None:
    """:func:`_record_fast`'s statements on ``conn`` (a Core connection or a driver one: ``.dialect``, ``.connection``)."""
    new_instance = _NEW_INSTANCE_RAW[conn.dialect.name]
    row = _first_row(_CONTEXT_RAW.run(conn, {"series_uid": h.series_uid}))
    if row is None or row["study_uid"] != h.study_uid:
        return None  # new series, or a series of another study: the general path
    if (row["patient_id"], row["issuer_of_patient_id"], row["scope_study_uid"]) != tuple(patient_key(h).values()):
        return None
    if h.patient_name and row["pt_patient_name"] and h.patient_name != row["pt_patient_name"]:
        return None
    if (
        _would_fill(row, h, _SERIES_FILL, "se_")
        or _would_fill(row, h, _STUDY_FILL, "st_")
        or _would_fill(row, h, _PATIENT_FILL, "pt_")
    ):
        return None
    if h.patient_name and not (row["st_norm"] and row["pt_norm"]):
        return None  # the normalised name is filled in too
    code = h.procedure_code or ("", "", "")
    if any(v and not have for v, have in zip(code, (row["procedure_code_value"], row["procedure_code_scheme"],
                                                     row["procedure_code_meaning"]))):
        return None
    if h.modality and h.modality not in row["modalities"].split("\\"):
        return None
    inserted = _first_row(new_instance.run(
        conn, {"sop_instance_uid": h.sop_instance_uid, "series_fk": row["series_pk"], **_instance_values(h, source_ae),
               "created_at": now},
    ))
    if inserted is None:
        return None  # already indexed: duplicate policy and replacement are the general path's
    pk = int(next(iter(inserted.values())))
    # study before series: the order in which the general path's flush locks the two rows, so that a fast
    # and a general writer (two workers on PostgreSQL) do not wait on each other in a cycle
    _BUMP_STUDY_RAW.run(conn, {"b_pk": row["study_fk"], "b_now": now}).close()
    _BUMP_SERIES_RAW.run(conn, {"b_pk": row["series_pk"]}).close()
    _ADD_COPY_RAW.run(
        conn,
        {
            "instance_fk": pk, "tier": copy.tier, "rel_path": copy.rel_path, "size": copy.size, "sha256": copy.sha256,
            "transfer_syntax_uid": copy.transfer_syntax_uid, "stored_at": now, "last_read_at": now,
            "original_size": copy.original_size,
        },
    ).close()
    return pk


def prune_empty(session: Session, series_pk: int) -> None:
    """Remove a series (and its study) that no longer has instances; recount what is left.

    Called after every instance that leaves a series (delete, replace into another series).
    """
    n = session.scalar(select(func.count()).select_from(Instance).where(Instance.series_fk == series_pk))
    series = session.get(Series, series_pk)
    if series is None:
        return
    study_pk = series.study_fk
    if n:
        refresh_counts(session, series_pk=series_pk, study_pk=study_pk)
        return
    session.delete(series)
    session.flush()
    left = session.scalar(select(func.count()).select_from(Series).where(Series.study_fk == study_pk))
    if left:
        refresh_study_modalities(session, study_pk)
        refresh_counts(session, study_pk=study_pk)
    else:
        study = session.get(Study, study_pk)
        if study is not None:
            session.delete(study)


class DuplicateInstance(Exception):
    """An instance with this SOP Instance UID is already archived and the policy keeps the first."""
