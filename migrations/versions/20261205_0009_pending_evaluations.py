"""evaluations: an index of the pending ones; jobs: drop the unused index of a key's queued jobs

A key's queued jobs are counted in Redis (max_queued) since limits moved there; the index only
cost every submit and claim a write.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05 18:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        'ix_evaluations_pending',
        'evaluations',
        ['judge_job_id'],
        unique=False,
        postgresql_where=sa.text('judged_at IS NULL'),
    )
    op.drop_index(
        'ix_jobs_key_queued', table_name='jobs', postgresql_where=sa.text("status = 'queued'")
    )


def downgrade() -> None:
    op.create_index(
        'ix_jobs_key_queued',
        'jobs',
        ['api_key_id'],
        unique=False,
        postgresql_where=sa.text("status = 'queued'"),
    )
    op.drop_index(
        'ix_evaluations_pending',
        table_name='evaluations',
        postgresql_where=sa.text('judged_at IS NULL'),
    )
