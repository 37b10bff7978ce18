"""record_instance's Core fast path (issue 14) gives exactly the general path's rows, and never files an
instance of a known series under another patient: every case it does not own falls through to the general path."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy import func, select

from xdsi.archive.header import InstanceHeader, read_header
from xdsi.index import catalog
from xdsi.index.db import Index, open_index
from xdsi.index.models import FileCopy, Instance, Patient, Series, Study
from xdsi.tools.synth import StudySpec, write_study
from xdsi.uids import new_uid


@pytest.fixture(scope="module")
def headers(tmp_path_factory: pytest.TempPathFactory) -> list[InstanceHeader]:
    files = write_study(tmp_path_factory.mktemp("fast"), StudySpec(patient_id="FP-1"), series=1, per_series=4)
    return [read_header(f) for f in files]


@pytest.fixture
def index(index_url: str) -> Iterator[Index]:
    """A fresh index on each backend (SQLite, PostgreSQL): the fast path's INSERT ... ON CONFLICT is per dialect."""
    idx = open_index(index_url)
    yield idx
    idx.dispose()


def _record(index: Index, h: InstanceHeader, **kw: object) -> int:
    copy = catalog.CopyRecord("cache", f"x/{h.sop_instance_uid}.dcm", 1, "0" * 64, h.transfer_syntax_uid)
    with index.session() as s:
        pk, _ = catalog.record_instance(s, h, copy, **kw)  # type: ignore[arg-type]
    return pk


def _fast_calls(monkeypatch: pytest.MonkeyPatch) -> list[int | None]:
    seen: list[int | None] = []
    real = catalog._record_fast

    def spy(*a, **kw):  # type: ignore[no-untyped-def]
        seen.append(r := real(*a, **kw))
        return r

    monkeypatch.setattr(catalog, "_record_fast", spy)
    return seen


def test_fast_path_rows_and_counts_equal_a_recount(index: Index, headers: list[InstanceHeader], monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _fast_calls(monkeypatch)
    pks = [_record(index, h, source_ae="CT1") for h in headers]
    assert seen[0] is None and seen[1:] == pks[1:]  # the first makes the series (general path), the rest are fast
    with index.session() as s:
        study = s.scalars(select(Study)).one()
        series = s.scalars(select(Series)).one()
        assert (study.num_series, study.num_instances, series.num_instances) == (1, 4, 4)
        catalog.refresh_counts(s, series_pk=series.pk, study_pk=study.pk)
        s.flush()
        s.refresh(study)
        s.refresh(series)
        assert (study.num_series, study.num_instances, series.num_instances) == (1, 4, 4)
        rows = s.scalars(select(Instance).order_by(Instance.pk)).all()
        for h, row in zip(headers, rows):
            assert (row.sop_instance_uid, row.series_fk, row.sop_class_uid, row.instance_number, row.rows,
                    row.source_ae_title) == (h.sop_instance_uid, series.pk, h.sop_class_uid, h.instance_number, h.rows, "CT1")
            assert [c.rel_path for c in row.copies] == [f"x/{h.sop_instance_uid}.dcm"]
        assert s.scalar(select(func.count()).select_from(FileCopy)) == 4
        assert study.modalities == headers[0].modality


def test_same_series_another_patient_is_refused(index: Index, headers: list[InstanceHeader], monkeypatch: pytest.MonkeyPatch) -> None:
    _record(index, headers[0])
    seen = _fast_calls(monkeypatch)
    for other in (
        dataclasses.replace(headers[1], patient_id="FP-2"),
        dataclasses.replace(headers[1], issuer_of_patient_id="OTHER"),
        dataclasses.replace(headers[1], patient_id=""),
    ):
        with pytest.raises(catalog.PatientMismatch):
            _record(index, other)
    assert seen == [None, None, None]
    with index.session() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 1
        assert s.scalar(select(Study.num_instances)) == 1


def test_series_of_another_study_duplicates_and_fills_take_the_general_path(
    index: Index, headers: list[InstanceHeader], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    first = dataclasses.replace(headers[0], study_description="", body_part="")
    _record(index, first)
    seen = _fast_calls(monkeypatch)
    with pytest.raises(catalog.DuplicateInstance):
        _record(index, first)
    _record(index, dataclasses.replace(headers[1], study_description="FILLED", body_part=""))  # the study lacked it
    _record(index, dataclasses.replace(headers[1], sop_instance_uid=new_uid(), body_part="CHEST"))  # the series
    with caplog.at_level(logging.WARNING, logger="xdsi.index.catalog"):
        _record(index, dataclasses.replace(headers[2], patient_name="Other^Name"))
    assert "each study keeps the name" in caplog.text
    _record(index, dataclasses.replace(headers[3], study_uid=new_uid()))  # reused Series UID under another study
    assert seen == [None, None, None, None, None]
    with index.session() as s:
        studies = {st.study_uid: st for st in s.scalars(select(Study))}
        assert studies[headers[0].study_uid].study_description == "FILLED"
        assert s.scalar(select(Series.body_part)) == "CHEST"
        assert s.scalar(select(func.count()).select_from(Patient)) == 1
    _record(index, dataclasses.replace(headers[0], sop_instance_uid=new_uid()))
    assert isinstance(seen[-1], int)  # nothing left to fill: fast again


def test_fast_path_writes_every_column_as_the_general_path_does(index: Index, headers: list[InstanceHeader]) -> None:
    """The fast path runs SQLAlchemy's compiled SQL on the driver's cursor: the values it binds (timestamps
    through the dialect's own processors, NULLs, the copy's sizes) must read back exactly as the ORM's do,
    down to the stored text of a SQLite timestamp."""
    _record(index, headers[0])  # general path
    copy = catalog.CopyRecord("cache", "x/fast.dcm", 123, "f" * 64, headers[1].transfer_syntax_uid, original_size=456)
    with index.session() as s:
        pk, _ = catalog.record_instance(s, dataclasses.replace(headers[1], number_of_frames=None), copy, source_ae="A" * 20)
    with index.session() as s:
        general, fast = s.scalars(select(Instance).order_by(Instance.pk)).all()
        assert fast.pk == pk
        for col in Instance.__table__.columns.keys():  # type: ignore[attr-defined]
            if col in ("pk", "sop_instance_uid", "instance_number", "created_at", "source_ae_title", "number_of_frames"):
                continue
            assert getattr(fast, col) == getattr(general, col), col
        assert (fast.instance_number, fast.number_of_frames, fast.source_ae_title) == (headers[1].instance_number, None, "A" * 16)
        assert type(fast.created_at) is type(general.created_at) and fast.created_at >= general.created_at
        (c,) = fast.copies
        assert (c.tier, c.rel_path, c.size, c.sha256, c.original_size) == ("cache", "x/fast.dcm", 123, "f" * 64, 456)
        assert c.stored_at == c.last_read_at == fast.created_at
        if index.dialect == "sqlite":  # the same text form as SQLAlchemy writes (its DATETIME processor), not sqlite3's
            raw = s.connection().exec_driver_sql("SELECT created_at FROM instance ORDER BY pk").scalars().all()
            assert len(raw[0]) == len(raw[1]) and raw[1][10] == " " and "+" not in raw[1]
