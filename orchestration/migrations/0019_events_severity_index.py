"""A partial index of the events that are not `info`, for the filters on severity (the
console's and the API's `?severity=`): ordered by sequence, the newest first, a page of
warnings or errors read the whole table when they are rare (0.7 s at 5 M events, and as much
again to count them). It holds only the rare rows, so it costs nothing on the inserts of
`info` events, the engine's own. Built CONCURRENTLY on PostgreSQL (writes to the outbox go
on); an invalid leftover of an interrupted build is built again (`_concurrent_index`).
"""

from django.db import migrations

from orchestration.migrations._concurrent_index import index_create, index_drop

NAME = "idx_events_severity_flagged"
DEFINITION = "events (severity, sequence) WHERE severity IN ('debug', 'warning', 'error', 'critical')"


class Migration(migrations.Migration):
    atomic = False  # CREATE INDEX CONCURRENTLY cannot run in a transaction

    dependencies = [("orchestration", "0018_task_deferred_at")]

    operations = [migrations.RunPython(index_create(NAME, DEFINITION), index_drop(NAME), elidable=False)]
