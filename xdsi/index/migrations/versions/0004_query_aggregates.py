"""query aggregates: series/instance counts kept on study and series; name indexes for prefix wildcards

Revision ID: 0004_query_aggregates
Revises: 0003
Create Date: 2026-11-30

* ``study.num_series``, ``study.num_instances`` and ``series.num_instances``: Number of Study
  Related Series / Instances and Number of Series Related Instances, kept in step by the
  catalog at ingest, replace and delete, so C-FIND and QIDO-RS read a column instead of
  counting instance rows per match (a correlated count per study was most of an all-studies
  query on a large index).  Filled here from the rows that exist.
* On PostgreSQL the upper-cased name indexes (``ix_patient_patient_name_norm``,
  ``ix_study_patient_name_norm``) are rebuilt with ``text_pattern_ops``: with a non-C
  database collation a plain B-tree cannot answer ``LIKE 'SMI%'``, so a Patient Name
  wildcard read every study.  SQLite keeps its indexes as they are.
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0004_query_aggregates'
down_revision = '0003'
branch_labels = None
depends_on = None

_NAME_INDEXES = [('ix_patient_patient_name_norm', 'patient'), ('ix_study_patient_name_norm', 'study')]


def _count_column() -> sa.Column:  # type: ignore[type-arg]
    return sa.Column('num_instances', sa.Integer(), nullable=False, server_default='0')


def upgrade() -> None:
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.add_column(_count_column())
    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.add_column(sa.Column('num_series', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(_count_column())
    op.execute(
        "UPDATE series SET num_instances = (SELECT count(*) FROM instance WHERE instance.series_fk = series.pk)"
    )
    op.execute(
        "UPDATE study SET num_series = (SELECT count(*) FROM series WHERE series.study_fk = study.pk), "
        "num_instances = (SELECT coalesce(sum(series.num_instances), 0) FROM series WHERE series.study_fk = study.pk)"
    )
    if op.get_bind().dialect.name == 'postgresql':
        for name, table in _NAME_INDEXES:
            op.drop_index(name, table_name=table)
            op.create_index(name, table, ['patient_name_norm'], unique=False,
                            postgresql_ops={'patient_name_norm': 'text_pattern_ops'})


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        for name, table in _NAME_INDEXES:
            op.drop_index(name, table_name=table)
            op.create_index(name, table, ['patient_name_norm'], unique=False)
    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.drop_column('num_instances')
        batch_op.drop_column('num_series')
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_column('num_instances')
