"""The line of tasks waiting for their agent's max_concurrency, by priority: migration 0036's
partial index, by (agent_id, priority's rank, queued_at, execution_id) instead of (agent_id,
queued_at, execution_id). A freed slot wakes the most urgent task waiting, then the longest
waiting of its priority (agent_slot_hand_on): in 0036's order a critical task waited behind
every low task of its agent queued before it (ten of 0.5 s: it started 5 s late, last).

The rank is models.workflows.priority_rank() as Django writes it, so that the planner matches
the ORDER BY of the wake and the deferral's count to the index. Built CONCURRENTLY on
PostgreSQL before the old index is dropped (`_concurrent_index`), as 0036 was.
"""

from django.db import migrations, models

from orchestration.migrations._concurrent_index import index_create, index_drop

NAME = "idx_tasks_agent_priority_line"
DEFINITION = (
    "task_executions (agent_id, (CASE WHEN priority = 'critical' THEN 0 WHEN priority = 'high' THEN 1 "
    "WHEN priority = 'normal' THEN 2 WHEN priority = 'low' THEN 3 ELSE NULL END), queued_at, execution_id) "
    "WHERE (deferred_at IS NOT NULL AND status IN ('queued', 'retrying'))"
)
OLD_NAME = "idx_tasks_agent_line"
OLD_DEFINITION = (
    "task_executions (agent_id, queued_at, execution_id) "
    "WHERE (deferred_at IS NOT NULL AND status IN ('queued', 'retrying'))"
)
WAITING = models.Q(("deferred_at__isnull", False), ("status__in", ["queued", "retrying"]))


class Migration(migrations.Migration):
    atomic = False  # CREATE INDEX CONCURRENTLY cannot run in a transaction

    dependencies = [("orchestration", "0038_events_change_types")]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[
                migrations.RunPython(index_create(NAME, DEFINITION), index_drop(NAME), elidable=False),
                migrations.RunPython(index_drop(OLD_NAME), index_create(OLD_NAME, OLD_DEFINITION), elidable=False),
            ],
            state_operations=[
                migrations.RemoveIndex(model_name="taskexecution", name=OLD_NAME),
                migrations.AddIndex(
                    model_name="taskexecution",
                    index=models.Index(
                        models.F("agent"),
                        models.Case(
                            models.When(priority="critical", then=models.Value(0)),
                            models.When(priority="high", then=models.Value(1)),
                            models.When(priority="normal", then=models.Value(2)),
                            models.When(priority="low", then=models.Value(3)),
                            output_field=models.SmallIntegerField(),
                        ),
                        models.F("queued_at"),
                        models.F("execution_id"),
                        condition=WAITING,
                        name=NAME,
                    ),
                ),
            ],
        )
    ]
