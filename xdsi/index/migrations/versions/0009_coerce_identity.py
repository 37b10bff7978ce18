"""coerce: study.identity_updated_at, when HL7 (A08/A40) last changed the patient identity of a study (issue 15)

Revision ID: 0009_coerce_identity
Revises: 0008_j2ktier_copy_original_size
Create Date: 2026-11-30

Stored files keep the patient attributes they were received with; a study whose
identity an ADT^A08 or ADT^A40 changed afterwards has this stamp, and every
retrieve path then sends its objects with the patient attributes taken from the
index (what dcm4chee-arc does), never the stored bytes as they are.  NULL: never
changed, the stored bytes are sent as they are.  One nullable column: existing
rows need no value, the downgrade drops it.
"""
from alembic import op
import sqlalchemy as sa


revision = '0009_coerce_identity'
down_revision = '0008_j2ktier_copy_original_size'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.add_column(sa.Column('identity_updated_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.drop_column('identity_updated_at')
