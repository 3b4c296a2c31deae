"""An index of task_executions by (workflow_id, created_at, execution_id): one workflow's tasks
in the API's order (`GET /api/v1/tasks/?workflow=`, newest or oldest first, a page at a time,
and the console's first hundred tasks of a workflow page). Without it PostgreSQL walked every
task newer than the workflow's on idx_tasks_created_at to find a page of a big workflow (its
statistics say where its rows are, not when they were made): 0.5 s at 1 M tasks with the pages
cached, seconds from disk, against 0.06 ms. Each task row written (its insert, claim and
completion) also writes this index. Built CONCURRENTLY on PostgreSQL (`_concurrent_index`).
"""

from django.db import migrations

from orchestration.migrations._concurrent_index import index_create, index_drop

NAME = "idx_tasks_workflow_created"
DEFINITION = "task_executions (workflow_id, created_at, execution_id)"


class Migration(migrations.Migration):
    atomic = False  # CREATE INDEX CONCURRENTLY cannot run in a transaction

    dependencies = [("orchestration", "0032_agent_metrics_recorded_at_index")]

    operations = [migrations.RunPython(index_create(NAME, DEFINITION), index_drop(NAME), elidable=False)]
