"""A partial index of the events that are not `info`, for the filters on severity (the
console's and the API's `?severity=`): ordered by sequence, the newest first, a page of
warnings or errors read the whole table when they are rare (0.7 s at 5 M events, and as much
again to count them). It holds only the rare rows, so it costs nothing on the inserts of
`info` events, the engine's own. Built CONCURRENTLY on PostgreSQL (writes to the outbox go
on), in SQL like migration 0014.

A CREATE INDEX CONCURRENTLY that fails or is cancelled (a statement timeout, a killed migrate)
leaves an INVALID index of that name behind, which IF NOT EXISTS would then accept: such a
leftover is dropped and built again.
"""

from django.db import migrations

NAME = "idx_events_severity_flagged"
CREATE = (
    "CREATE INDEX {concurrently} IF NOT EXISTS " + NAME + " ON events (severity, sequence) "
    "WHERE severity IN ('debug', 'warning', 'error', 'critical')"
)
DROP = "DROP INDEX {concurrently} IF EXISTS " + NAME


def _invalid(schema_editor) -> bool:
    with schema_editor.connection.cursor() as cursor:
        cursor.execute("SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)", [NAME])
        row = cursor.fetchone()
    return bool(row and row[0])


def _run(template: str):
    def run(apps, schema_editor):
        postgresql = schema_editor.connection.vendor == "postgresql"
        concurrently = "CONCURRENTLY" if postgresql else ""
        if postgresql and template is CREATE and _invalid(schema_editor):
            schema_editor.execute(DROP.format(concurrently=concurrently))
        schema_editor.execute(template.format(concurrently=concurrently))

    return run


class Migration(migrations.Migration):
    atomic = False  # CREATE INDEX CONCURRENTLY cannot run in a transaction

    dependencies = [("orchestration", "0018_task_deferred_at")]

    operations = [migrations.RunPython(_run(CREATE), _run(DROP), elidable=False)]
