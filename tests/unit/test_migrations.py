"""The schema is owned by Alembic: migrations must build exactly what the models describe."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from xdsi.index.db import alembic_config, current_revision, make_engine, upgrade
from xdsi.index.models import Base


def test_upgrade_matches_models(index_url: str) -> None:
    engine = make_engine(index_url)
    try:
        upgrade(engine)
        head = ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
        assert current_revision(engine) == head
        with engine.connect() as conn:
            diffs = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        assert diffs == [], diffs
        assert {"patient", "study", "series", "instance", "file_copy"} <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_is_idempotent_and_keeps_data(index_url: str) -> None:
    from sqlalchemy import text

    engine = make_engine(index_url)
    try:
        upgrade(engine)
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO patient (patient_id, issuer_of_patient_id, patient_name, patient_name_norm, birth_date, sex, created_at) "
                    "VALUES ('P1', '', 'A^B', 'A^B', '', '', CURRENT_TIMESTAMP)"
                )
            )
        upgrade(engine)  # a second start must neither fail nor drop anything
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM patient")).scalar() == 1
    finally:
        engine.dispose()


def test_single_head() -> None:
    engine = make_engine("sqlite://")
    heads = ScriptDirectory.from_config(alembic_config(engine)).get_heads()
    assert len(heads) == 1, f"migration history has several heads: {heads}"


def test_concurrent_first_start_on_postgresql(postgres) -> None:  # type: ignore[no-untyped-def]
    """Several xdsi processes starting at once on an empty PostgreSQL index: one migrates, none fails."""
    import subprocess
    import sys
    import uuid

    url = postgres.create_database(f"c_{uuid.uuid4().hex[:12]}")
    code = "import sys; from xdsi.index.db import make_engine, upgrade; upgrade(make_engine(sys.argv[1]))"
    procs = [subprocess.Popen([sys.executable, "-c", code, url], stderr=subprocess.PIPE, text=True) for _ in range(4)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    engine = make_engine(url)
    try:
        head = ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
        assert current_revision(engine) == head
    finally:
        engine.dispose()
