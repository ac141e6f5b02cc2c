"""idempotency keys unique per annotator, not across all annotators

Revision ID: 0004
Revises: 0003
"""

from alembic import op


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

# A globally unique key let one user take another's (predictable) keys first and block their
# judgments with 409. Keys are now unique per annotator; a judgment without an annotator
# (an import) is deduplicated by the importer itself.
NEW = ('uq_judgment_annotator_key', ['annotator_id', 'idempotency_key'])
# 0001 left the old constraint unnamed: PostgreSQL named it itself; on SQLite batch mode
# names it with this convention while it copies the table.
PG_OLD = 'judgments_idempotency_key_key'
SQLITE_NAMES = {'uq': 'uq_%(table_name)s_%(column_0_name)s'}
SQLITE_OLD = 'uq_judgments_idempotency_key'
# SQLite batch mode rebuilds the table, which drops its triggers: 0003's audit trigger is
# made again (the same statement).
SQLITE_AUDIT_TRIGGER = """CREATE TRIGGER tr_judgments_audit AFTER INSERT ON judgments BEGIN
         INSERT INTO audit_log (at, actor_id, action, payload) VALUES (
           NEW.created_at, NEW.annotator_id, 'judgment.create',
           json_object('judgment_id', NEW.id, 'task_id', NEW.task_id,
                       'ranking', json(NEW.ranking), 'idempotency_key', NEW.idempotency_key,
                       'source', NEW.source));
       END"""


def upgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.drop_constraint(PG_OLD, 'judgments', type_='unique')
        op.create_unique_constraint(NEW[0], 'judgments', NEW[1])
        return
    with op.batch_alter_table('judgments', naming_convention=SQLITE_NAMES,
                              recreate='always') as batch_op:
        batch_op.drop_constraint(SQLITE_OLD, type_='unique')
        batch_op.create_unique_constraint(*NEW)
    op.execute(SQLITE_AUDIT_TRIGGER)


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.drop_constraint(NEW[0], 'judgments', type_='unique')
        op.create_unique_constraint(PG_OLD, 'judgments', ['idempotency_key'])
        return
    with op.batch_alter_table('judgments', naming_convention=SQLITE_NAMES,
                              recreate='always') as batch_op:
        batch_op.drop_constraint(NEW[0], type_='unique')
        batch_op.create_unique_constraint(SQLITE_OLD, ['idempotency_key'])
    op.execute(SQLITE_AUDIT_TRIGGER)
