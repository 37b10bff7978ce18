"""hl7 orders: the order store of the HIS/RIS interface (issue 15)

Revision ID: 0007_hl7_orders
Revises: 0003
Create Date: 2026-11-30

One row per radiology order (ORM^O01 / OMI^O23), keyed by (Patient ID, Accession
Number) as the RIS sent them: routing rules read patient location and ordering
physician from it, prefetch is triggered by it.  ``hl7_prefetch_job``: each prefetch
rule a message triggered, recorded before the ACK.  New tables only: nothing existing
changes, so the downgrade drops them.
"""
from alembic import op
import sqlalchemy as sa


revision = '0007_hl7_orders'
down_revision = '0006_routing_queue'
branch_labels = None
depends_on = None

_TEXT = ('patient_id', 'issuer_of_patient_id', 'accession_number', 'placer_order_number', 'filler_order_number',
         'order_control', 'order_status', 'message_type', 'procedure_code', 'procedure_text', 'modality',
         'patient_location', 'ordering_physician', 'referring_physician', 'scheduled_at', 'message_control_id')

_JOB_TEXT = ('rule', 'patient_id', 'issuer_of_patient_id', 'modality', 'accession_number', 'message_type', 'message_control_id')


def upgrade() -> None:
    op.create_table(
        'hl7_order',
        sa.Column('pk', sa.Integer(), nullable=False),
        *(sa.Column(name, sa.Text(), nullable=False) for name in _TEXT),
        sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('pk', name=op.f('pk_hl7_order')),
        sa.UniqueConstraint('patient_id', 'accession_number', name='uq_hl7_order_patient_id_accession_number'),
    )
    with op.batch_alter_table('hl7_order', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_hl7_order_accession_number'), ['accession_number'], unique=False)
    op.create_table(
        'hl7_prefetch_job',
        sa.Column('pk', sa.Integer(), nullable=False),
        *(sa.Column(name, sa.Text(), nullable=False) for name in _JOB_TEXT),
        sa.Column('state', sa.String(length=16), nullable=False),
        *(sa.Column(name, sa.Integer(), nullable=False) for name in ('studies', 'recalled', 'pushed')),
        sa.Column('error', sa.Text(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('pk', name=op.f('pk_hl7_prefetch_job')),
    )
    with op.batch_alter_table('hl7_prefetch_job', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_hl7_prefetch_job_state'), ['state'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('hl7_prefetch_job', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_hl7_prefetch_job_state'))
    op.drop_table('hl7_prefetch_job')
    with op.batch_alter_table('hl7_order', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_hl7_order_accession_number'))
    op.drop_table('hl7_order')
