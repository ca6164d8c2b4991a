"""jobs: an index for a queued job's position (its model's queued jobs by priority and id)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05 14:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        'ix_jobs_queued_position',
        'jobs',
        ['model', 'priority', 'id'],
        unique=False,
        postgresql_where=sa.text("status = 'queued'"),
    )


def downgrade() -> None:
    op.drop_index(
        'ix_jobs_queued_position',
        table_name='jobs',
        postgresql_where=sa.text("status = 'queued'"),
    )
