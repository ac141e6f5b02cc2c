"""task item model: the model that wrote a task's answer, per task

Revision ID: 0007
Revises: 0006
"""

from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL for existing items: they are attributed to their response's model, as before.
    op.add_column('task_items', sa.Column('model', sa.String(255), nullable=True))


def downgrade() -> None:
    op.drop_column('task_items', 'model')
