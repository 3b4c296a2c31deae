"""Indexes for retention's batches, each of which takes the oldest rows up to the cutoff:
ended workflows by completed_at (RETENTION_DAYS_WORKFLOWS), messages by created_at
(RETENTION_DAYS_MESSAGES), metrics by their period's start, or when they were recorded for
those of no period (RETENTION_DAYS_AGENT_METRICS). Without them every batch read the whole
table and held the rows it took meanwhile: 0.7 s a batch of 500 of 2 M workflows (newest
first, by the model's order, past every workflow kept), 0.22 s a batch of 5,000 of 2 M
messages (all read, then sorted by thread), for the one day older than a 400-day cutoff; the
metrics kept (1.4 M rows for the thirteen built-in agents) were all read by each batch. The
workflows' index is partial (ended ones only): a running workflow is never retention's. Built CONCURRENTLY on PostgreSQL
(`_concurrent_index`): the engine and conversations go on meanwhile.
"""

from django.db import migrations, models
from django.db.models.functions import Coalesce

from orchestration.migrations._concurrent_index import index_create, index_drop

WORKFLOWS = "idx_workflows_ended"
WORKFLOWS_DEFINITION = "workflows (completed_at) WHERE status IN ('completed', 'failed', 'cancelled')"
MESSAGES = "idx_messages_created_at"
MESSAGES_DEFINITION = "agent_playground_messages (created_at)"
METRICS = "idx_metrics_age"
METRICS_DEFINITION = "agent_metrics ((COALESCE(period_start, recorded_at)))"


class Migration(migrations.Migration):
    atomic = False  # CREATE INDEX CONCURRENTLY cannot run in a transaction

    dependencies = [("orchestration", "0039_task_executions_agent_priority_line_index")]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[
                migrations.RunPython(
                    index_create(WORKFLOWS, WORKFLOWS_DEFINITION), index_drop(WORKFLOWS), elidable=False
                ),
                migrations.RunPython(index_create(MESSAGES, MESSAGES_DEFINITION), index_drop(MESSAGES), elidable=False),
                migrations.RunPython(index_create(METRICS, METRICS_DEFINITION), index_drop(METRICS), elidable=False),
            ],
            state_operations=[
                migrations.AddIndex(
                    model_name="workflow",
                    index=models.Index(
                        fields=["completed_at"],
                        name=WORKFLOWS,
                        condition=models.Q(status__in=["completed", "failed", "cancelled"]),
                    ),
                ),
                migrations.AddIndex(
                    model_name="agentplaygroundmessage", index=models.Index(fields=["created_at"], name=MESSAGES)
                ),
                migrations.AddIndex(
                    model_name="agentmetric", index=models.Index(Coalesce("period_start", "recorded_at"), name=METRICS)
                ),
            ],
        )
    ]
