"""Event type task_paid_late (orchestration.event_types): what a try paid after its attempt
had been closed without it, which its meter adds to the attempt, its task and its workflow, is
recorded in the audit log in the same transaction.

On PostgreSQL the check is the domain of events.event_type (orchestration.models.base.
DomainCheck): the old check is dropped and the new one added in one transaction, reading every
event's type under a SHARE lock on the events table (0.45 s for 3 million events, migration
0030). Reversed while such events exist, it is refused (IrreversibleError naming them) and
nothing changes (the events table is append-only)."""

from django.db import migrations, models

import orchestration.models.base
from orchestration.migrations._reverse_guard import refuse_reverse_while


class Migration(migrations.Migration):
    dependencies = [
        ("orchestration", "0042_messages_idempotency_key"),
    ]

    operations = [
        migrations.RemoveConstraint(
            model_name="event",
            name="events_event_type_valid",
        ),
        migrations.AlterField(
            model_name="event",
            name="event_type",
            field=models.CharField(
                choices=[
                    ("workflow_created", "workflow created (spec validated and stored)"),
                    ("workflow_started", "workflow started (first task queued)"),
                    ("workflow_completed", "workflow completed (every task completed)"),
                    ("workflow_failed", "workflow failed (a task failed for good, or the deadline passed)"),
                    ("workflow_cancelled", "workflow cancelled by a user"),
                    ("workflow_resumed", "failed workflow resumed from its failed tasks"),
                    (
                        "workflow_changed",
                        "a workflow's name, description, type, priority, continue_on_failure or deadline was edited",
                    ),
                    ("task_queued", "task sent to a Celery queue"),
                    ("task_started", "an attempt of the task started on a worker"),
                    ("task_retrying", "an attempt failed and the task will be tried again"),
                    ("task_completed", "task completed"),
                    ("task_failed", "task failed with no retries left (or a non-retryable error)"),
                    ("task_timed_out", "an attempt exceeded its time limit"),
                    ("task_cancelled", "task cancelled"),
                    (
                        "task_lost",
                        "an attempt was closed as lost (its worker or pool process gone, its message redelivered)",
                    ),
                    ("task_ended_late", "a try ended after its attempt had been closed without it (not applied)"),
                    (
                        "task_paid_late",
                        "a try paid after its attempt had been closed without it (added to the attempt, task and workflow)",
                    ),
                    ("task_changed", "a task's description, priority, retries or timeout was edited"),
                    ("agent_started", "an agent began working on a task or message"),
                    ("agent_registered", "an agent definition was loaded or changed"),
                    ("tool_executed", "an agent called a tool"),
                    ("message_created", "a conversation message was stored"),
                    ("agent_interaction", "hand-off, collaboration, review or feedback between agents"),
                    ("api_key_created", "an API key was created (or made by rotating another)"),
                    ("api_key_revoked", "an API key was revoked (or rotated out)"),
                    ("api_key_changed", "an API key's name or expiry was edited"),
                    ("export_completed", "a training-data export finished"),
                    ("export_failed", "a training-data export failed"),
                ],
                max_length=100,
            ),
        ),
        migrations.AddConstraint(
            model_name="event",
            constraint=orchestration.models.base.DomainCheck(
                condition=models.Q(
                    (
                        "event_type__in",
                        [
                            "workflow_created",
                            "workflow_started",
                            "workflow_completed",
                            "workflow_failed",
                            "workflow_cancelled",
                            "workflow_resumed",
                            "workflow_changed",
                            "task_queued",
                            "task_started",
                            "task_retrying",
                            "task_completed",
                            "task_failed",
                            "task_timed_out",
                            "task_cancelled",
                            "task_lost",
                            "task_ended_late",
                            "task_paid_late",
                            "task_changed",
                            "agent_started",
                            "agent_registered",
                            "tool_executed",
                            "message_created",
                            "agent_interaction",
                            "api_key_created",
                            "api_key_revoked",
                            "api_key_changed",
                            "export_completed",
                            "export_failed",
                        ],
                    )
                ),
                field="event_type",
                name="events_event_type_valid",
            ),
        ),
        refuse_reverse_while(
            "orchestration 0043",
            table="events",
            column="event_type",
            values=["task_paid_late"],
            why="events are append-only",
        ),
    ]
