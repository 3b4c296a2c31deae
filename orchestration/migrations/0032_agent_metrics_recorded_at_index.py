"""An index of agent_metrics by recorded_at, for the console's list of metrics (newest first):
the rollup writes eleven rows per agent and period, which a 400-day retention keeps (1.4 M rows
for the thirteen built-in agents' hours), and each page of the list sorted them all (1.3 s of
its 2.7 s). The rollup writes in batches once an hour: the index costs it nothing that shows.
Built CONCURRENTLY on PostgreSQL; an invalid leftover of an interrupted build is built again
(`_concurrent_index`).
"""

from django.db import migrations

from orchestration.migrations._concurrent_index import index_create, index_drop

NAME = "idx_metrics_recorded_at"
DEFINITION = "agent_metrics (recorded_at)"


class Migration(migrations.Migration):
    atomic = False  # CREATE INDEX CONCURRENTLY cannot run in a transaction

    dependencies = [("orchestration", "0031_pipeline_schedules_expire")]

    operations = [migrations.RunPython(index_create(NAME, DEFINITION), index_drop(NAME), elidable=False)]
