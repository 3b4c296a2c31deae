"""An index for the API's `GET /events/?entity_id=...` (ordered by sequence).

idx_events_entity leads with entity_type, so a filter on entity_id alone cannot use it:
at 5 M events one entity's first page took ~100 ms (full index scan) to 1.3 s (a walk of
the primary key), see docs/benchmarks.md. With (entity_id, sequence) any page of any
entity is a short index range scan. Built CONCURRENTLY on PostgreSQL, so writes to the
events table (the outbox) are not blocked while it builds. Declared in SQL rather than in
Event.Meta: the model's own indexes stay as they are.
"""

from django.db import migrations

CREATE = "CREATE INDEX {concurrently} IF NOT EXISTS idx_events_entity_id_sequence ON events (entity_id, sequence)"
DROP = "DROP INDEX {concurrently} IF EXISTS idx_events_entity_id_sequence"


def _run(template: str):
    def run(apps, schema_editor):
        concurrently = "CONCURRENTLY" if schema_editor.connection.vendor == "postgresql" else ""
        schema_editor.execute(template.format(concurrently=concurrently))

    return run


class Migration(migrations.Migration):
    atomic = False  # CREATE INDEX CONCURRENTLY cannot run in a transaction

    dependencies = [("orchestration", "0013_retention_and_pipeline_schedules")]

    operations = [migrations.RunPython(_run(CREATE), _run(DROP), elidable=False)]
