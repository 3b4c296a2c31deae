"""workflows.wasted_cost_usd: the cost of a workflow's tries that failed, timed out or were
lost (DESIGN §4: "wasted spend" per workflow), kept as attempts finish
(progress.workflow_add_usage) and filled here for the workflows recorded before it. The column
is added with a constant database default, kept for INSERTs that do not name it (no table
rewrite on PostgreSQL); only workflows with such spend are updated.

The column and its check are added in a transaction of their own (a moment's exclusive lock on
workflows); the backfill then writes the workflows in batches, each batch's rows locked while it
is written. Run in the column's transaction, as it first was, the backfill held that exclusive
lock, and with it every read and write of workflows (the API's, every task transition's), as
long as it ran: 8 to 12 s for 135 000 workflows with such spend on a 2-core machine. A run
stopped during the backfill (killed, its connection lost) is run again: the column is there,
the backfill starts over."""

from typing import Any

from django.db import migrations, models, transaction

BATCH_WORKFLOWS = 1000

WASTED_SQL = """(
    SELECT ROUND(SUM(a.cost_usd), 6) FROM task_attempts a
    JOIN task_executions t ON t.execution_id = a.execution_id
    WHERE t.workflow_id = workflows.workflow_id AND a.status IN ('failed', 'timed_out', 'lost')
)"""
# One batch: the workflows after %(after)s up to %(last)s (by workflow_id). The sum is a
# subquery per workflow (the index on task_executions.workflow_id, then the attempts'), which
# the planner cannot turn into a join that reads every failed attempt for each batch.
BACKFILL_SQL = f"""
UPDATE workflows SET wasted_cost_usd = {WASTED_SQL}
WHERE workflow_id > %(after)s AND workflow_id <= %(last)s AND {WASTED_SQL} > 0
"""  # noqa: S608 (no value goes in)


class AddOnce(migrations.SeparateDatabaseAndState):
    """The operations on the state; on the database in one transaction, unless a run stopped
    during the backfill (the migration is not atomic) added the column already."""

    def __init__(self, operations: list[Any]) -> None:
        super().__init__(database_operations=operations, state_operations=operations)

    def deconstruct(self) -> tuple[str, list[Any], dict[str, Any]]:
        return (self.__class__.__qualname__, [self.state_operations], {})

    def database_forwards(self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any) -> None:
        connection = schema_editor.connection
        if not schema_editor.collect_sql:  # sqlmigrate shows the statements whatever the database holds
            with connection.cursor() as cursor:
                columns = {c.name for c in connection.introspection.get_table_description(cursor, "workflows")}
            if "wasted_cost_usd" in columns:
                return
        with transaction.atomic(using=connection.alias):
            super().database_forwards(app_label, schema_editor, from_state, to_state)

    def database_backwards(self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any) -> None:
        with transaction.atomic(using=schema_editor.connection.alias):
            super().database_backwards(app_label, schema_editor, from_state, to_state)


def backfill(apps: Any, schema_editor: Any) -> None:
    connection = schema_editor.connection
    after = ""
    while True:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT workflow_id FROM workflows WHERE workflow_id > %s ORDER BY workflow_id LIMIT %s",
                [after, BATCH_WORKFLOWS],
            )
            batch = [row[0] for row in cursor.fetchall()]
        if not batch:
            return
        with transaction.atomic(using=connection.alias), connection.cursor() as cursor:
            cursor.execute(BACKFILL_SQL, {"after": after, "last": batch[-1]})
        after = batch[-1]


class Migration(migrations.Migration):
    atomic = False  # the backfill's batches commit one by one, after the column's transaction

    dependencies = [("orchestration", "0025_events_api_key_types")]

    operations = [
        AddOnce(
            [
                migrations.AddField(
                    model_name="workflow",
                    name="wasted_cost_usd",
                    field=models.DecimalField(
                        decimal_places=6,
                        default=0,
                        db_default=0,
                        help_text="cost of its tries that failed, timed out or were lost (part of total_cost_usd)",
                        max_digits=14,
                    ),
                ),
                migrations.AddConstraint(
                    model_name="workflow",
                    constraint=models.CheckConstraint(
                        condition=models.Q(("wasted_cost_usd__gte", 0)), name="workflows_wasted_non_negative"
                    ),
                ),
            ]
        ),
        migrations.RunPython(backfill, migrations.RunPython.noop, elidable=True),
    ]
