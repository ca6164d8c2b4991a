"""key limits: tokens per minute, max queued; queued jobs by key

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05 12:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('api_keys', sa.Column('tokens_per_minute', sa.Integer(), nullable=True))
    op.add_column('api_keys', sa.Column('max_queued', sa.Integer(), nullable=True))
    op.create_index('ix_jobs_key_queued', 'jobs', ['api_key_id'], unique=False, postgresql_where=sa.text("status = 'queued'"))


def downgrade() -> None:
    op.drop_index('ix_jobs_key_queued', table_name='jobs', postgresql_where=sa.text("status = 'queued'"))
    op.drop_column('api_keys', 'max_queued')
    op.drop_column('api_keys', 'tokens_per_minute')
