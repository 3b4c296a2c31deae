"""workflows.wasted_cost_usd: the cost of a workflow's tries that failed, timed out or were
lost (DESIGN §4: "wasted spend" per workflow), kept as attempts finish
(progress.workflow_add_usage) and filled here for the workflows recorded before it. The column
is added with a constant database default, kept for INSERTs that do not name it (no table
rewrite on PostgreSQL); only workflows with such spend are updated."""

from typing import Any

from django.db import migrations, models

BACKFILL_SQL = """
UPDATE workflows SET wasted_cost_usd = (
    SELECT ROUND(SUM(a.cost_usd), 6) FROM task_attempts a
    JOIN task_executions t ON t.execution_id = a.execution_id
    WHERE t.workflow_id = workflows.workflow_id AND a.status IN ('failed', 'timed_out', 'lost')
)
WHERE workflow_id IN (
    SELECT t.workflow_id FROM task_attempts a
    JOIN task_executions t ON t.execution_id = a.execution_id
    WHERE t.workflow_id IS NOT NULL AND a.status IN ('failed', 'timed_out', 'lost') AND a.cost_usd > 0
)
"""


def backfill(apps: Any, schema_editor: Any) -> None:
    schema_editor.execute(BACKFILL_SQL)


class Migration(migrations.Migration):
    dependencies = [("orchestration", "0025_events_api_key_types")]

    operations = [
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
        migrations.RunPython(backfill, migrations.RunPython.noop, elidable=True),
    ]
