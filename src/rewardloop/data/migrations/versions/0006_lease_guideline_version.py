"""lease guideline version: an assignment keeps the guideline version shown with it

Revision ID: 0006
Revises: 0005
"""

from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

# Leases open at the upgrade were shown the batch's current guidelines (the old code read them
# at lease time too), so they get that version; finished leases keep NULL.
BACKFILL = """UPDATE assignments SET guideline_version = (
    SELECT batches.guideline_version FROM tasks JOIN batches ON batches.id = tasks.batch_id
    WHERE tasks.id = assignments.task_id) WHERE completed = false"""


def upgrade() -> None:
    # A plain nullable ADD COLUMN on both dialects: no SQLite table rebuild (triggers stay).
    op.add_column('assignments', sa.Column('guideline_version', sa.String(64), nullable=True))
    op.execute(BACKFILL)


def downgrade() -> None:
    op.drop_column('assignments', 'guideline_version')
