"""Alembic revision 0002 (outbox, registered manifests) matches the models on SQLite and PostgreSQL; config parsing."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from xdsi.config import ConfigError, load_settings
from alembic.script import ScriptDirectory

from xdsi.index.db import alembic_config, current_revision, open_index
from xdsi.index.models import Base

REPO = Path(__file__).resolve().parents[2]


def test_revision_0002_matches_the_models(index_url: str) -> None:
    index = open_index(index_url)
    try:
        # 0002 is applied (later revisions build on it) and the schema is the head's
        script = ScriptDirectory.from_config(alembic_config(index.engine))
        assert current_revision(index.engine) == script.get_current_head()
        assert "0002" in {r.revision for r in script.iterate_revisions(script.get_current_head(), "base")}
        with index.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        assert diff == []
        assert {"xds_submission", "xds_manifest"} <= set(Base.metadata.tables)
    finally:
        index.dispose()


def test_example_config_loads_with_connectathon_defaults() -> None:
    s = load_settings(REPO / "xdsi.example.toml", env={})
    x = s.xds
    assert x.mode == "integrated" and x.patient_id_authority == "1.3.6.1.4.1.21367.13.20.1000"
    assert (x.class_code, x.confidentiality_code, x.type_code) == ("IMAGES", "N", "18748-4")
    assert x.patient_ids and x.patient_ids[0].affinity_authority == x.patient_id_authority


def test_bad_xds_config_is_refused(tmp_path: Path) -> None:
    for body, msg in [
        ('mode = "sometimes"', "mode must be"),
        ('mode = "integrated"', "needs registry_url"),
        ('repository_unique_id = "abc"', "is not an OID"),
        ("colour = 1", "unknown key"),
        ('[[xds.patient_ids]]\nlocal_id = "X"', "needs local_id and affinity_id"),
    ]:
        p = tmp_path / "c.toml"
        p.write_text("[xds]\n" + body + "\n")
        with pytest.raises(ConfigError, match=msg):
            load_settings(p, env={})
