"""index fidelity: whole values, one patient per Patient-ID-less study, study's own patient attributes

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23

* Every column holding a DICOM value becomes TEXT (was VARCHAR(n) sized below some VRs'
  maxima: PostgreSQL refused such instances, SQLite kept them but header.py cut them).
* ``patient.scope_study_uid`` joins the patient's unique key: a study without Patient ID
  gets a patient row of its own.  Existing Patient-ID-less patients that hold several
  studies are split, one row per study.  Only the study whose first instance created the
  merged row (same ``created_at``, lowest pk) keeps its name, birth date and sex: for the
  others the index cannot know which person they are (the merged row holds another file's
  name), so those attributes are left empty rather than wrong; the next instance received
  for such a study fills them in.
* ``study.patient_name``, ``patient_name_norm``, ``patient_birth_date``, ``patient_sex``:
  the patient attributes each study was received with, copied from its patient row.
* TM values stored in the legacy ``HH:MM:SS`` form lose their colons.  DA values already cut
  to 8 characters (``1997.04.``) cannot be recovered from the index: re-import such files.
"""
from __future__ import annotations

import re

from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

# (table, column, old VARCHAR length) that become TEXT
_TEXT = {
    'patient': [('patient_id', 64), ('issuer_of_patient_id', 64), ('patient_name', 324),
                ('patient_name_norm', 324), ('birth_date', 8), ('sex', 16)],
    'study': [('study_date', 8), ('study_time', 16), ('accession_number', 16), ('accession_issuer', 64),
              ('study_id', 16), ('study_description', 64), ('referring_physician', 324),
              ('procedure_code_value', 64), ('procedure_code_scheme', 64), ('procedure_code_meaning', 64),
              ('modalities', 256)],
    'series': [('modality', 16), ('series_description', 64), ('body_part', 16), ('series_date', 8),
               ('series_time', 16), ('institution_name', 64), ('station_name', 16)],
    'instance': [('content_date', 8), ('content_time', 16)],
}
_STUDY_PATIENT = [('patient_name', 'patient_name'), ('patient_name_norm', 'patient_name_norm'),
                  ('patient_birth_date', 'birth_date'), ('patient_sex', 'sex')]
_TM_LEGACY = re.compile(r"^(\d{2}):(\d{2})(?::(\d{2})(\.\d{1,6})?)?$")


def _types() -> None:
    for table, cols in _TEXT.items():
        with op.batch_alter_table(table, schema=None) as batch_op:
            for name, length in cols:
                batch_op.alter_column(name, existing_type=sa.String(length=length), type_=sa.Text(),
                                      existing_nullable=False)


def _split_unidentified_patients(bind) -> None:  # type: ignore[no-untyped-def]
    patient = sa.table('patient', sa.column('pk', sa.Integer), sa.column('patient_id'), sa.column('issuer_of_patient_id'),
                       sa.column('scope_study_uid'), sa.column('patient_name'), sa.column('patient_name_norm'),
                       sa.column('birth_date'), sa.column('sex'), sa.column('created_at'))
    study = sa.table('study', sa.column('pk', sa.Integer), sa.column('patient_fk', sa.Integer), sa.column('study_uid'),
                     sa.column('created_at'), *(sa.column(c) for c, _ in _STUDY_PATIENT))
    rows = bind.execute(
        sa.select(patient.c.pk, patient.c.issuer_of_patient_id, patient.c.created_at).where(patient.c.patient_id == '')
    ).all()
    for p_pk, issuer, p_created in rows:
        studies = bind.execute(
            sa.select(study.c.pk, study.c.study_uid, study.c.created_at).where(study.c.patient_fk == p_pk).order_by(study.c.pk)
        ).all()
        keeper = studies[0] if studies and studies[0].created_at == p_created else None
        if keeper is not None:
            bind.execute(sa.update(patient).where(patient.c.pk == p_pk).values(scope_study_uid=keeper.study_uid))
        for s in studies:
            if s is keeper:
                continue
            new_pk = bind.execute(
                sa.insert(patient).values(patient_id='', issuer_of_patient_id=issuer, scope_study_uid=s.study_uid,
                                          patient_name='', patient_name_norm='', birth_date='', sex='',
                                          created_at=s.created_at).returning(patient.c.pk)
            ).scalar_one()
            bind.execute(sa.update(study).where(study.c.pk == s.pk).values(
                patient_fk=new_pk, **{c: '' for c, _ in _STUDY_PATIENT}))


def _legacy_times(bind) -> None:  # type: ignore[no-untyped-def]
    for table, col in (('study', 'study_time'), ('series', 'series_time'), ('instance', 'content_time')):
        t = sa.table(table, sa.column('pk', sa.Integer), sa.column(col))
        for pk, v in bind.execute(sa.select(t.c.pk, t.c[col]).where(t.c[col].like('%:%'))).all():
            m = _TM_LEGACY.match(v.strip())
            if m:
                hh, mm, ss, frac = m.groups()
                bind.execute(sa.update(t).where(t.c.pk == pk).values({col: hh + mm + (ss or '') + (frac or '')}))


def upgrade() -> None:
    bind = op.get_bind()
    _types()
    with op.batch_alter_table('patient', schema=None) as batch_op:
        batch_op.add_column(sa.Column('scope_study_uid', sa.String(length=64), nullable=False, server_default=''))
        batch_op.drop_constraint('uq_patient_patient_id_issuer_of_patient_id', type_='unique')
        batch_op.create_unique_constraint('uq_patient_identity', ['patient_id', 'issuer_of_patient_id', 'scope_study_uid'])
    with op.batch_alter_table('study', schema=None) as batch_op:
        for c, _ in _STUDY_PATIENT:
            batch_op.add_column(sa.Column(c, sa.Text(), nullable=False, server_default=''))
    for c, pc in _STUDY_PATIENT:
        op.execute(f"UPDATE study SET {c} = (SELECT {pc} FROM patient WHERE patient.pk = study.patient_fk)")
    _split_unidentified_patients(bind)
    _legacy_times(bind)
    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_study_patient_name_norm'), ['patient_name_norm'], unique=False)


def downgrade() -> None:
    raise NotImplementedError(
        "0003 cannot be undone: going back would merge the separate patients of studies without "
        "Patient ID into one and cut values to the old column sizes; restore a backup instead"
    )
