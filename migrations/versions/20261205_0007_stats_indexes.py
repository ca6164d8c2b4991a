"""stats: jobs by tenant and creation time; the daily rollup; feedback/evaluation change counts

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 18:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Counts a change of a job's feedback or evaluation against the job's (tenant, UTC day):
# a rollup of that day made before the change is stale from then on.
COUNT_CHANGE = """
CREATE FUNCTION stats_count_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO stats_changes (tenant, day, changes)
    SELECT tenant, (created_at AT TIME ZONE 'UTC')::date, 1 FROM jobs
    WHERE id = CASE WHEN TG_OP = 'DELETE' THEN OLD.job_id ELSE NEW.job_id END
    ON CONFLICT (tenant, day) DO UPDATE SET changes = stats_changes.changes + 1;
    RETURN NULL;
END
$$
"""
TRIGGERED = ('feedback', 'evaluations')


def upgrade() -> None:
    op.create_index(
        'ix_jobs_stats',
        'jobs',
        ['tenant', 'created_at'],
        unique=False,
        postgresql_where=sa.text('judge_of IS NULL'),
    )
    op.create_table(
        'stats_daily',
        sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column('tenant', sa.String(length=200), nullable=False),
        sa.Column('day', sa.Date(), nullable=False),
        sa.Column('grouping', sa.SmallInteger(), nullable=False),
        sa.Column('model', sa.String(length=200), nullable=True),
        sa.Column('api_key_id', postgresql.UUID(), nullable=True),
        sa.Column('user', sa.String(length=200), nullable=True),
        sa.Column('jobs', sa.Integer(), nullable=False),
        sa.Column('succeeded', sa.Integer(), nullable=False),
        sa.Column('failed', sa.Integer(), nullable=False),
        sa.Column('cancelled', sa.Integer(), nullable=False),
        sa.Column('expired', sa.Integer(), nullable=False),
        sa.Column('input_tokens', sa.BigInteger(), nullable=False),
        sa.Column('output_tokens', sa.BigInteger(), nullable=False),
        sa.Column('cost_usd', sa.Numeric(precision=20, scale=8), nullable=False),
        sa.Column('cache_hits', sa.Integer(), nullable=False),
        sa.Column('feedback_up', sa.Integer(), nullable=False),
        sa.Column('feedback_down', sa.Integer(), nullable=False),
        sa.Column('judge_score_sum', sa.Integer(), nullable=False),
        sa.Column('judge_scores', sa.Integer(), nullable=False),
        sa.Column('queue_ms', postgresql.ARRAY(sa.Float()), nullable=True),
        sa.Column('ttft_ms', postgresql.ARRAY(sa.Float()), nullable=True),
        sa.Column('duration_ms', postgresql.ARRAY(sa.Float()), nullable=True),
        sa.Column('tokens_per_second', postgresql.ARRAY(sa.Float()), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_stats_daily')),
    )
    op.create_index(
        'uq_stats_daily_group',
        'stats_daily',
        ['tenant', 'day', 'grouping', 'model', 'api_key_id', 'user'],
        unique=True,
        postgresql_nulls_not_distinct=True,
    )
    op.create_table(
        'stats_days',
        sa.Column('tenant', sa.String(length=200), nullable=False),
        sa.Column('day', sa.Date(), nullable=False),
        sa.Column('changes_seen', sa.BigInteger(), nullable=False),
        sa.Column(
            'rolled_up_at',
            sa.DateTime(timezone=True),
            server_default=sa.text('now()'),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint('tenant', 'day', name=op.f('pk_stats_days')),
    )
    op.create_table(
        'stats_changes',
        sa.Column('tenant', sa.String(length=200), nullable=False),
        sa.Column('day', sa.Date(), nullable=False),
        sa.Column('changes', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('tenant', 'day', name=op.f('pk_stats_changes')),
    )
    op.execute(COUNT_CHANGE)
    for table in TRIGGERED:
        op.execute(
            f'CREATE TRIGGER {table}_stats_change AFTER INSERT OR UPDATE OR DELETE ON {table} '
            'FOR EACH ROW EXECUTE FUNCTION stats_count_change()'
        )


def downgrade() -> None:
    for table in TRIGGERED:
        op.execute(f'DROP TRIGGER {table}_stats_change ON {table}')
    op.execute('DROP FUNCTION stats_count_change()')
    op.drop_table('stats_changes')
    op.drop_table('stats_days')
    op.drop_index(
        'uq_stats_daily_group', table_name='stats_daily', postgresql_nulls_not_distinct=True
    )
    op.drop_table('stats_daily')
    op.drop_index('ix_jobs_stats', table_name='jobs', postgresql_where=sa.text('judge_of IS NULL'))
