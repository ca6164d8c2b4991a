"""jobs: the caller's end user, and how many messages the context window dropped

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05 13:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('jobs', sa.Column('user', sa.String(length=200), nullable=True))
    op.add_column('jobs', sa.Column('dropped_messages', sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column('jobs', 'dropped_messages')
    op.drop_column('jobs', 'user')
