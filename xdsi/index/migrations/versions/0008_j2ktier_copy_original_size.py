"""j2ktier: file_copy.original_size, the size of the copy a lossless compression replaced (issue 16)

Revision ID: 0008_j2ktier_copy_original_size
Revises: 0007_hl7_orders
Create Date: 2026-11-30

A tier with ``compress`` (or ``[storage] compress_on_receive``) stores an
instance losslessly compressed; the copy's ``size`` is then the compressed
size and ``original_size`` the size of the file it was made from, so
``xdsi status`` can say how many bytes each tier saves.  NULL: the copy holds
the bytes as received.  One nullable column: existing rows need no value, the
downgrade drops it.
"""
from alembic import op
import sqlalchemy as sa


revision = '0008_j2ktier_copy_original_size'
down_revision = '0007_hl7_orders'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('file_copy', schema=None) as batch_op:
        batch_op.add_column(sa.Column('original_size', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('file_copy', schema=None) as batch_op:
        batch_op.drop_column('original_size')
