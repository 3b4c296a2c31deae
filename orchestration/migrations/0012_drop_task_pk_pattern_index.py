"""Drop the varchar_pattern_ops index Django creates beside task_executions' primary key.

Nothing queries execution ids with LIKE; the index only cost a write on every status
change of every task (such updates cannot be HOT, so every index is written).
"""

from django.db import migrations

FIND = """
SELECT indexname FROM pg_indexes
 WHERE schemaname = current_schema() AND tablename = 'task_executions'
   AND indexname LIKE 'task_executions_execution_id_%%_like'
"""


def forwards(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    with schema_editor.connection.cursor() as cursor:
        cursor.execute(FIND)
        for (name,) in cursor.fetchall():
            schema_editor.execute(f'DROP INDEX IF EXISTS "{name}"', params=None)


def backwards(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute(
        "CREATE INDEX IF NOT EXISTS task_executions_execution_id_like "
        "ON task_executions (execution_id varchar_pattern_ops)",
        params=None,
    )


class Migration(migrations.Migration):
    dependencies = [("orchestration", "0011_event_id_unique_constraint")]

    operations = [migrations.RunPython(forwards, backwards)]
