"""Rules the database itself enforces, so no code path (ORM, .update(), raw SQL, psql) can
break them:

- events is append-only: UPDATE, DELETE and TRUNCATE are rejected (statement-level, so even
  a statement that would touch no row is refused). Retention is a separate, explicit,
  privileged operation.
- a finished task_attempts row is immutable.
- updated_at is maintained on every UPDATE, including queryset .update() calls that bypass
  Django's auto_now (seed 003's update_updated_at_column).
- workflows.duration_ms = completed_at - started_at once a workflow ends (seed 003's
  calculate_workflow_duration, extended to every terminal status).
- a BRIN index on events.created_at (PostgreSQL).
"""

from django.db import migrations

from orchestration.sqlite_rules import sqlite_rules_install, sqlite_rules_remove

MUTABLE_TABLES = {
    "agents": "id",
    "workflows": "workflow_id",
    "task_executions": "execution_id",
    "task_attempts": "id",
    "api_keys": "id",
}
TERMINAL_WORKFLOW = "('completed', 'failed', 'cancelled')"

POSTGRESQL_FORWARD = [
    """
    CREATE OR REPLACE FUNCTION events_reject_change() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'events is append-only: % is not allowed', TG_OP
            USING ERRCODE = 'restrict_violation',
                  HINT = 'retention is a separate, explicit, privileged operation';
    END;
    $$
    """,
    """
    CREATE TRIGGER events_append_only
        BEFORE UPDATE OR DELETE OR TRUNCATE ON events
        FOR EACH STATEMENT EXECUTE FUNCTION events_reject_change()
    """,
    """
    CREATE OR REPLACE FUNCTION task_attempts_reject_finished_change() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF OLD.status <> 'running' THEN
            RAISE EXCEPTION 'task attempt % of execution % is finished (%) and cannot change',
                OLD.attempt_number, OLD.execution_id, OLD.status
                USING ERRCODE = 'restrict_violation';
        END IF;
        RETURN NEW;
    END;
    $$
    """,
    """
    CREATE TRIGGER task_attempts_immutable_once_finished
        BEFORE UPDATE ON task_attempts
        FOR EACH ROW EXECUTE FUNCTION task_attempts_reject_finished_change()
    """,
    """
    CREATE OR REPLACE FUNCTION update_updated_at_column() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        NEW.updated_at = statement_timestamp();
        RETURN NEW;
    END;
    $$
    """,
    *[
        f"""
        CREATE TRIGGER update_{table}_updated_at
            BEFORE UPDATE ON {table}
            FOR EACH ROW EXECUTE FUNCTION update_updated_at_column()
        """
        for table in MUTABLE_TABLES
    ],
    f"""
    CREATE OR REPLACE FUNCTION calculate_workflow_duration() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NEW.status IN {TERMINAL_WORKFLOW} AND NEW.started_at IS NOT NULL AND NEW.completed_at IS NOT NULL THEN
            NEW.duration_ms = round(EXTRACT(EPOCH FROM (NEW.completed_at - NEW.started_at)) * 1000);
        ELSE
            NEW.duration_ms = NULL;
        END IF;
        RETURN NEW;
    END;
    $$
    """,
    """
    CREATE TRIGGER calc_workflow_duration
        BEFORE INSERT OR UPDATE ON workflows
        FOR EACH ROW EXECUTE FUNCTION calculate_workflow_duration()
    """,
    "CREATE INDEX idx_events_created_brin ON events USING brin (created_at)",
]

POSTGRESQL_BACKWARD = [
    "DROP INDEX IF EXISTS idx_events_created_brin",
    "DROP TRIGGER IF EXISTS calc_workflow_duration ON workflows",
    "DROP FUNCTION IF EXISTS calculate_workflow_duration()",
    *[f"DROP TRIGGER IF EXISTS update_{table}_updated_at ON {table}" for table in MUTABLE_TABLES],
    "DROP FUNCTION IF EXISTS update_updated_at_column()",
    "DROP TRIGGER IF EXISTS task_attempts_immutable_once_finished ON task_attempts",
    "DROP FUNCTION IF EXISTS task_attempts_reject_finished_change()",
    "DROP TRIGGER IF EXISTS events_append_only ON events",
    "DROP FUNCTION IF EXISTS events_reject_change()",
]


# SQLite (the embedded first-run default): see orchestration/sqlite_rules.py, which also
# re-installs them after every migrate (SQLite rebuilds a table to alter it, dropping its
# triggers).
def _run(schema_editor, direction: int) -> None:
    vendor = schema_editor.connection.vendor
    if vendor == "sqlite":
        if direction == 0:
            sqlite_rules_install(schema_editor.connection)
        else:
            sqlite_rules_remove(schema_editor.connection)
        return
    if vendor != "postgresql":
        raise RuntimeError(f"no database rules for {vendor}; use PostgreSQL or SQLite")
    for statement in (POSTGRESQL_FORWARD, POSTGRESQL_BACKWARD)[direction]:
        schema_editor.execute(statement, params=None)


def forwards(apps, schema_editor):
    _run(schema_editor, 0)


def backwards(apps, schema_editor):
    _run(schema_editor, 1)


class Migration(migrations.Migration):
    dependencies = [("orchestration", "0001_initial")]

    operations = [migrations.RunPython(forwards, backwards)]
