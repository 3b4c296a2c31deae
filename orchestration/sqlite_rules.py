"""The database rules of migration 0002 for SQLite, the embedded first-run database.

SQLite has no TRUNCATE and no statement-level triggers; row-level triggers give the same
guarantees for UPDATE and DELETE. SQLite alters a table by rebuilding it, which drops its
triggers, so these are (re)installed, idempotently, after every `migrate` as well.
"""

from __future__ import annotations

from typing import Any

TERMINAL_WORKFLOW = "('completed', 'failed', 'cancelled')"
UPDATED_AT_TABLES = {
    "agents": "id",
    "workflows": "workflow_id",
    "task_executions": "execution_id",
    "task_attempts": "id",
    "api_keys": "id",
    "export_runs": "id",
}
# The task_attempts columns the finished-attempt rule keeps: every one but the key and
# updated_at (the updated_at trigger may still touch a row that has just been finished). Read
# from the table when the rule is installed: a migration that installs it sees the columns of
# its own time, and one that adds a column installs the rule again (0029).
ATTEMPT_COLUMNS_NOT_KEPT = ("id", "updated_at")

USAGE_COLUMNS = ("input_tokens", "output_tokens", "tokens_used", "cost_usd")
# Closed without a result: spend charged after the close is added to the usage columns (and
# nothing else changes, and usage only grows); migration 0023 allows the same on PostgreSQL.
ABANDONED_ATTEMPT = "('cancelled', 'lost', 'timed_out')"


def _late_spend(attempt_columns: list[str]) -> str:
    return " AND ".join(
        [
            f"OLD.status IN {ABANDONED_ATTEMPT}",
            *(f"NEW.{c} IS OLD.{c}" for c in attempt_columns if c not in USAGE_COLUMNS),
            *(f"NEW.{c} >= OLD.{c}" for c in USAGE_COLUMNS),
        ]
    )


# Indexes of events that migrations make in SQL, outside the models' state, by migration: a
# later migration that alters events (SQLite copies the table to a new one: 0025, 0030) drops
# them, so they are made again, once their migration is applied.
EVENTS_SQL_INDEXES = {
    "0014_api_events_entity_id_index": "idx_events_entity_id_sequence ON events (entity_id, sequence)",
    "0019_events_severity_index": (
        "idx_events_severity_flagged ON events (severity, sequence) "
        "WHERE severity IN ('debug', 'warning', 'error', 'critical')"
    ),
}

# Triggers of earlier versions of these rules, dropped when the rules are installed.
OBSOLETE = ("task_attempts_immutable_once_finished",)


def _rules(attempt_columns: list[str]) -> dict[str, tuple[str, str]]:
    """trigger name -> (table, CREATE TRIGGER statement)."""
    rules = {
        "events_append_only_update": (
            "events",
            "CREATE TRIGGER IF NOT EXISTS events_append_only_update BEFORE UPDATE ON events "
            "BEGIN SELECT RAISE(ABORT, 'events is append-only: UPDATE is not allowed'); END",
        ),
        "events_append_only_delete": (
            "events",
            "CREATE TRIGGER IF NOT EXISTS events_append_only_delete BEFORE DELETE ON events "
            "BEGIN SELECT RAISE(ABORT, 'events is append-only: DELETE is not allowed'); END",
        ),
        "task_attempts_finished_keep": (
            "task_attempts",
            "CREATE TRIGGER IF NOT EXISTS task_attempts_finished_keep "
            f"BEFORE UPDATE OF {', '.join(attempt_columns)} "
            f"ON task_attempts WHEN OLD.status <> 'running' AND NOT ({_late_spend(attempt_columns)}) "
            "BEGIN SELECT RAISE(ABORT, 'task attempt is finished and cannot change'); END",
        ),
    }
    for table, pk in UPDATED_AT_TABLES.items():
        rules[f"update_{table}_updated_at"] = (
            table,
            f"CREATE TRIGGER IF NOT EXISTS update_{table}_updated_at AFTER UPDATE ON {table} "
            "WHEN NEW.updated_at IS OLD.updated_at "
            f"BEGIN UPDATE {table} SET updated_at = strftime('%Y-%m-%d %H:%M:%f', 'now') WHERE {pk} = NEW.{pk}; END",
        )
    for when in ("insert", "update"):
        rules[f"calc_workflow_duration_{when}"] = (
            "workflows",
            f"CREATE TRIGGER IF NOT EXISTS calc_workflow_duration_{when} AFTER {when.upper()} ON workflows BEGIN "
            "UPDATE workflows SET duration_ms = CASE "
            f"WHEN NEW.status IN {TERMINAL_WORKFLOW} AND NEW.started_at IS NOT NULL AND NEW.completed_at IS NOT NULL "
            "THEN CAST(round((julianday(NEW.completed_at) - julianday(NEW.started_at)) * 86400000) AS INTEGER) "
            "ELSE NULL END WHERE workflow_id = NEW.workflow_id; END",
        )
    return rules


def sqlite_rules_install(connection: Any) -> list[str]:
    """Create the missing triggers (and the events.created_at index, and the events indexes of
    applied migrations) on existing tables."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        tables = {row[0] for row in cursor.fetchall()}
        cursor.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")
        existing = {row[0] for row in cursor.fetchall()}
        for name in OBSOLETE:
            if name in existing:
                cursor.execute(f"DROP TRIGGER {name}")
        created = []
        cursor.execute("SELECT name FROM pragma_table_info('task_attempts')")
        attempt_columns = [row[0] for row in cursor.fetchall() if row[0] not in ATTEMPT_COLUMNS_NOT_KEPT]
        for name, (table, statement) in _rules(attempt_columns).items():
            if table in tables and name not in existing:
                cursor.execute(statement)
                created.append(name)
        if "events" in tables:
            cursor.execute("CREATE INDEX IF NOT EXISTS idx_events_created ON events (created_at)")
        if "events" in tables and "django_migrations" in tables:
            cursor.execute("SELECT name FROM django_migrations WHERE app = 'orchestration'")
            applied = {row[0] for row in cursor.fetchall()}
            for migration, index in EVENTS_SQL_INDEXES.items():
                if migration in applied:
                    cursor.execute(f"CREATE INDEX IF NOT EXISTS {index}")
    return created


def sqlite_rules_remove(connection: Any) -> None:
    with connection.cursor() as cursor:
        for name in (*_rules([]), *OBSOLETE):
            cursor.execute(f"DROP TRIGGER IF EXISTS {name}")
        cursor.execute("DROP INDEX IF EXISTS idx_events_created")
