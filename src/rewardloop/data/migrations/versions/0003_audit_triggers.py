"""audit log kept by the database: every judgment logged by a trigger; log rows immutable

Revision ID: 0003
Revises: 0002
"""

from alembic import op


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

# Every judgment row gets its audit row from the database itself, whoever inserts it (server,
# simulator, import or a hand-written script), in the same transaction. Audit rows cannot be
# deleted or have their time, action or payload changed; only ``actor_id`` may still be set
# to NULL, which the foreign key does when a user is erased.
SQLITE = [
    """CREATE TRIGGER tr_judgments_audit AFTER INSERT ON judgments BEGIN
         INSERT INTO audit_log (at, actor_id, action, payload) VALUES (
           NEW.created_at, NEW.annotator_id, 'judgment.create',
           json_object('judgment_id', NEW.id, 'task_id', NEW.task_id,
                       'ranking', json(NEW.ranking), 'idempotency_key', NEW.idempotency_key,
                       'source', NEW.source));
       END""",
    """CREATE TRIGGER tr_audit_log_no_update BEFORE UPDATE OF id, at, action, payload
       ON audit_log BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END""",
    """CREATE TRIGGER tr_audit_log_no_delete BEFORE DELETE ON audit_log
       BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END""",
]
POSTGRESQL = [
    """CREATE FUNCTION rl_audit_judgment() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN
         INSERT INTO audit_log (at, actor_id, action, payload) VALUES (
           NEW.created_at, NEW.annotator_id, 'judgment.create',
           json_build_object('judgment_id', NEW.id, 'task_id', NEW.task_id,
                             'ranking', NEW.ranking, 'idempotency_key', NEW.idempotency_key,
                             'source', NEW.source));
         RETURN NEW;
       END $$""",
    """CREATE TRIGGER tr_judgments_audit AFTER INSERT ON judgments
       FOR EACH ROW EXECUTE FUNCTION rl_audit_judgment()""",
    """CREATE FUNCTION rl_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN RAISE EXCEPTION 'audit_log is append-only'; END $$""",
    """CREATE TRIGGER tr_audit_log_append_only BEFORE UPDATE OF id, at, action, payload OR DELETE
       ON audit_log FOR EACH ROW EXECUTE FUNCTION rl_audit_append_only()""",
]
DROP = {
    'sqlite': ["DROP TRIGGER tr_audit_log_no_delete", "DROP TRIGGER tr_audit_log_no_update",
               "DROP TRIGGER tr_judgments_audit"],
    'postgresql': ["DROP TRIGGER tr_audit_log_append_only ON audit_log",
                   "DROP FUNCTION rl_audit_append_only()",
                   "DROP TRIGGER tr_judgments_audit ON judgments",
                   "DROP FUNCTION rl_audit_judgment()"],
}


def upgrade() -> None:
    for statement in SQLITE if op.get_bind().dialect.name == 'sqlite' else POSTGRESQL:
        op.execute(statement)


def downgrade() -> None:
    for statement in DROP[op.get_bind().dialect.name]:
        op.execute(statement)
