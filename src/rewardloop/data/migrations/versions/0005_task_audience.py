"""task audience: a task can be aimed at one annotator group

Revision ID: 0005
Revises: 0004
"""

from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL (every existing task): anyone may judge it, as before. A plain ADD COLUMN on both
    # dialects: SQLite needs no table rebuild, so the triggers and indexes stay as they are.
    op.add_column('tasks', sa.Column('audience', sa.String(255), nullable=True))


def downgrade() -> None:
    # SQLite (3.35+) drops an unindexed column in place, no rebuild either.
    op.drop_column('tasks', 'audience')
