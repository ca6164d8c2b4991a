"""feedback, evaluations; jobs: judge_of (a judge's job), redacted_at (texts cleared)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 16:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('jobs', sa.Column('judge_of', postgresql.UUID(), nullable=True))
    op.add_column('jobs', sa.Column('redacted_at', sa.DateTime(timezone=True), nullable=True))
    op.create_foreign_key(
        op.f('fk_jobs_judge_of_jobs'), 'jobs', 'jobs', ['judge_of'], ['id'], ondelete='CASCADE'
    )
    op.create_table(
        'feedback',
        sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column('job_id', postgresql.UUID(), nullable=False),
        sa.Column('api_key_id', postgresql.UUID(), nullable=True),
        sa.Column('rating', sa.SmallInteger(), nullable=False),
        sa.Column('comment', sa.Text(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.ForeignKeyConstraint(['api_key_id'], ['api_keys.id'], name=op.f('fk_feedback_api_key_id_api_keys'), ondelete='SET NULL'),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_feedback_job_id_jobs'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_feedback')),
    )
    op.create_index(
        'uq_feedback_job_key',
        'feedback',
        ['job_id', 'api_key_id'],
        unique=True,
        postgresql_nulls_not_distinct=True,
    )
    op.create_table(
        'evaluations',
        sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column('job_id', postgresql.UUID(), nullable=False),
        sa.Column('judge_job_id', postgresql.UUID(), nullable=True),
        sa.Column('judge_model', sa.String(length=200), nullable=False),
        sa.Column('score', sa.SmallInteger(), nullable=True),
        sa.Column('rationale', sa.Text(), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.Column('judged_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_evaluations_job_id_jobs'), ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['judge_job_id'], ['jobs.id'], name=op.f('fk_evaluations_judge_job_id_jobs'), ondelete='SET NULL'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_evaluations')),
        sa.UniqueConstraint('job_id', name=op.f('uq_evaluations_job_id')),
    )


def downgrade() -> None:
    op.drop_table('evaluations')
    op.drop_index('uq_feedback_job_key', table_name='feedback', postgresql_nulls_not_distinct=True)
    op.drop_table('feedback')
    op.drop_constraint(op.f('fk_jobs_judge_of_jobs'), 'jobs', type_='foreignkey')
    op.drop_column('jobs', 'redacted_at')
    op.drop_column('jobs', 'judge_of')
