"""jobs: index of ended jobs by (finished_at, id), for beat's passes over them

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05 20:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        'ix_jobs_finished',
        'jobs',
        ['finished_at', 'id'],
        unique=False,
        postgresql_where=sa.text('finished_at IS NOT NULL'),
    )


def downgrade() -> None:
    op.drop_index(
        'ix_jobs_finished', table_name='jobs', postgresql_where=sa.text('finished_at IS NOT NULL')
    )
