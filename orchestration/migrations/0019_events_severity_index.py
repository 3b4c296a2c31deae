"""A partial index of the events that are not `info`, for the filters on severity (the
console's and the API's `?severity=`): ordered by sequence, the newest first, a page of
warnings or errors read the whole table when they are rare (0.7 s at 5 M events, and as much
again to count them). It holds only the rare rows, so it costs nothing on the inserts of
`info` events, the engine's own. Built CONCURRENTLY on PostgreSQL (writes to the outbox go
on), in SQL like migration 0014.
"""

from django.db import migrations

CREATE = (
    "CREATE INDEX {concurrently} IF NOT EXISTS idx_events_severity_flagged ON events (severity, sequence) "
    "WHERE severity IN ('debug', 'warning', 'error', 'critical')"
)
DROP = "DROP INDEX {concurrently} IF EXISTS idx_events_severity_flagged"


def _run(template: str):
    def run(apps, schema_editor):
        concurrently = "CONCURRENTLY" if schema_editor.connection.vendor == "postgresql" else ""
        schema_editor.execute(template.format(concurrently=concurrently))

    return run


class Migration(migrations.Migration):
    atomic = False  # CREATE INDEX CONCURRENTLY cannot run in a transaction

    dependencies = [("orchestration", "0018_task_deferred_at")]

    operations = [migrations.RunPython(_run(CREATE), _run(DROP), elidable=False)]
