"""task queue indexes: hand out the next task without sorting every open task

Revision ID: 0002
Revises: 0001
"""

from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # feedback.tasks.next_task walks open tasks by (priority DESC, id) and stops at the first
    # with room; without this index every request sorts all open tasks.
    op.create_index('ix_tasks_next', 'tasks', ['done', sa.text('priority DESC'), 'id'])
    # An annotator's current lease is looked up on every request.
    op.create_index('ix_assignments_annotator', 'assignments', ['annotator_id', 'completed'])


def downgrade() -> None:
    op.drop_index('ix_assignments_annotator', table_name='assignments')
    op.drop_index('ix_tasks_next', table_name='tasks')
