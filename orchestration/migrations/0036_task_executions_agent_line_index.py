"""A partial index of the tasks waiting for their agent's max_concurrency (queued or between
tries, deferred_at set), by (agent_id, queued_at, execution_id): the line in the order a freed
slot wakes it. Each attempt of a limited agent that ends looks for the task that has waited
longest (agent_slot_hand_on), and each deferral counts the line before it
(agent_slot_recheck_seconds). Without it, with 50,000 tasks waiting for one agent, the first
read them all and sorted them on disk (0.1 to 0.16 s an ended attempt), the second walked the
agent's 75,000 finished tasks (60 ms a deferral); with it, 0.06 ms and 0.12 ms.
It holds only the waiting tasks of limited agents: the tasks of other agents never write it.

Declared in TaskExecution.Meta (the models' state, which SQLite rebuilds a copied table
from); built CONCURRENTLY on PostgreSQL, as task_executions takes writes all the while, and
an invalid leftover of an interrupted build is built again (`_concurrent_index`).
"""

from django.db import migrations, models

from orchestration.migrations._concurrent_index import index_create, index_drop

NAME = "idx_tasks_agent_line"
DEFINITION = (
    "task_executions (agent_id, queued_at, execution_id) "
    "WHERE (deferred_at IS NOT NULL AND status IN ('queued', 'retrying'))"
)


class Migration(migrations.Migration):
    atomic = False  # CREATE INDEX CONCURRENTLY cannot run in a transaction

    dependencies = [("orchestration", "0035_attempt_cause_database_error")]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[
                migrations.RunPython(index_create(NAME, DEFINITION), index_drop(NAME), elidable=False)
            ],
            state_operations=[
                migrations.AddIndex(
                    model_name="taskexecution",
                    index=models.Index(
                        condition=models.Q(("deferred_at__isnull", False), ("status__in", ["queued", "retrying"])),
                        fields=["agent", "queued_at", "execution_id"],
                        name=NAME,
                    ),
                )
            ],
        )
    ]
