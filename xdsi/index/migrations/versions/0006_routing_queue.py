"""routing queue: route_forward (one row per destination and instance) and route_cursor

Revision ID: 0006_routing_queue
Revises: 0003
Create Date: 2026-11-30

The cursor row is created here, at the newest instance, so that routes never reach back into
what an upgraded archive already held, and a new archive routes from its first instance.
"""
from alembic import op
import sqlalchemy as sa


revision = '0006_routing_queue'
down_revision = '0004_query_aggregates'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('route_forward',
    sa.Column('pk', sa.Integer(), nullable=False),
    sa.Column('destination', sa.String(length=1024), nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('study_uid', sa.String(length=64), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('route', sa.String(length=128), nullable=False),
    sa.Column('transfer_syntax', sa.String(length=64), nullable=False),
    sa.Column('priority', sa.Integer(), nullable=False),
    sa.Column('delay', sa.Integer(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('lease_owner', sa.String(length=128), nullable=False),
    sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('sent_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('pk', name=op.f('pk_route_forward')),
    sa.UniqueConstraint('destination', 'sop_instance_uid', name='uq_route_forward_destination_sop')
    )
    with op.batch_alter_table('route_forward', schema=None) as batch_op:
        batch_op.create_index('ix_route_forward_state_next', ['state', 'next_attempt_at'], unique=False)
        batch_op.create_index('ix_route_forward_study_uid', ['study_uid'], unique=False)
    op.create_table('route_cursor',
    sa.Column('name', sa.String(length=32), nullable=False),
    sa.Column('instance_pk', sa.Integer(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_route_cursor'))
    )
    # routes apply to what arrives from now on: an existing archive's instances are not sent by a
    # route added later (`xdsi route` sends them by hand); a new index starts at 0, so nothing is skipped
    op.execute(
        "INSERT INTO route_cursor (name, instance_pk, updated_at) "
        "SELECT 'instances', COALESCE(MAX(pk), 0), CURRENT_TIMESTAMP FROM instance"
    )


def downgrade() -> None:
    op.drop_table('route_cursor')
    with op.batch_alter_table('route_forward', schema=None) as batch_op:
        batch_op.drop_index('ix_route_forward_study_uid')
        batch_op.drop_index('ix_route_forward_state_next')
    op.drop_table('route_forward')
