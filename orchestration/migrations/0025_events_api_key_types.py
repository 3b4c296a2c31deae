"""Event types api_key_created and api_key_revoked, entity type api_key: the events' CHECK
constraints take the new vocabulary (orchestration.event_types).

On PostgreSQL the constraints are replaced without holding writers back while the table is
read: each new constraint is added NOT VALID under another name (a moment's exclusive lock),
validated (a scan that lets inserts go on; every existing row passes, the new vocabulary holds
the old one), then swapped for the old one in one short transaction. SQLite rebuilds the
table, as Django does for any constraint change (its rules are reinstalled after migrate)."""

from __future__ import annotations

from typing import Any

from django.db import IntegrityError, migrations, models, transaction

EVENT_TYPES = [
    "workflow_created",
    "workflow_started",
    "workflow_completed",
    "workflow_failed",
    "workflow_cancelled",
    "workflow_resumed",
    "task_queued",
    "task_started",
    "task_retrying",
    "task_completed",
    "task_failed",
    "task_timed_out",
    "task_cancelled",
    "task_lost",
    "agent_started",
    "agent_registered",
    "tool_executed",
    "message_created",
    "agent_interaction",
    "api_key_created",
    "api_key_revoked",
    "export_completed",
    "export_failed",
]
ENTITY_TYPES = ["workflow", "task", "attempt", "agent", "tool", "conversation", "export", "api_key", "system"]
OLD_EVENT_TYPES = [t for t in EVENT_TYPES if not t.startswith("api_key_")]
OLD_ENTITY_TYPES = [t for t in ENTITY_TYPES if t != "api_key"]


def _quoted(values: list[str]) -> str:
    return ", ".join(f"'{value}'" for value in values)


def _checks(event_types: list[str], entity_types: list[str]) -> dict[str, str]:
    return {
        "events_event_type_valid": f'"event_type" IN ({_quoted(event_types)})',
        "events_entity_type_valid": f'("entity_type" IS NULL OR "entity_type" IN ({_quoted(entity_types)}))',
    }


class ReplaceChecks(migrations.SeparateDatabaseAndState):
    """The state's constraint changes; on PostgreSQL, the database's by swapping validated
    constraints (above); elsewhere, the same operations as the state."""

    def __init__(self, operations: list[Any], forwards: dict[str, str], backwards: dict[str, str]) -> None:
        super().__init__(database_operations=operations, state_operations=operations)
        self.forwards, self.backwards = forwards, backwards

    def deconstruct(self) -> tuple[str, list[Any], dict[str, Any]]:
        return (self.__class__.__qualname__, [self.state_operations, self.forwards, self.backwards], {})

    def database_forwards(self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any) -> None:
        if schema_editor.connection.vendor == "postgresql":
            _swap(schema_editor, self.forwards)
        else:
            # The table rebuild in one transaction (the migration is not atomic, for PostgreSQL):
            # stopped midway, it would leave its copy (new__events) and every later try would fail.
            with transaction.atomic(using=schema_editor.connection.alias):
                super().database_forwards(app_label, schema_editor, from_state, to_state)

    def database_backwards(self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any) -> None:
        if schema_editor.connection.vendor == "postgresql":
            _swap(schema_editor, self.backwards)
        else:
            with transaction.atomic(using=schema_editor.connection.alias):
                super().database_backwards(app_label, schema_editor, from_state, to_state)


def _swap(schema_editor: Any, checks: dict[str, str]) -> None:
    connection = schema_editor.connection
    for name, condition in checks.items():
        with connection.cursor() as cursor:
            cursor.execute(f"ALTER TABLE events DROP CONSTRAINT IF EXISTS {name}_new")
            cursor.execute(f"ALTER TABLE events ADD CONSTRAINT {name}_new CHECK ({condition}) NOT VALID")
            try:
                cursor.execute(f"ALTER TABLE events VALIDATE CONSTRAINT {name}_new")
            except IntegrityError as exc:
                # Not valid, it would still refuse the new rows the current code writes.
                for added in checks:
                    cursor.execute(f"ALTER TABLE events DROP CONSTRAINT IF EXISTS {added}_new")
                raise IntegrityError(
                    f"events hold rows outside {name} ({condition}): the events table is append-only, "
                    "so its vocabulary cannot go back to one without them; nothing was changed"
                ) from exc
    with connection.cursor() as cursor:
        cursor.execute("BEGIN")
        for name in checks:
            cursor.execute(f"ALTER TABLE events DROP CONSTRAINT {name}")
            cursor.execute(f"ALTER TABLE events RENAME CONSTRAINT {name}_new TO {name}")
        cursor.execute("COMMIT")


class Migration(migrations.Migration):
    atomic = False  # the validation scan runs outside the short transaction of the swap

    dependencies = [("orchestration", "0024_events_drop_take_xid")]

    operations = [
        ReplaceChecks(
            [
                migrations.RemoveConstraint(model_name="event", name="events_event_type_valid"),
                migrations.RemoveConstraint(model_name="event", name="events_entity_type_valid"),
                migrations.AlterField(
                    model_name="event",
                    name="entity_type",
                    field=models.CharField(
                        blank=True,
                        choices=[
                            ("workflow", "Workflow"),
                            ("task", "Task"),
                            ("attempt", "Attempt"),
                            ("agent", "Agent"),
                            ("tool", "Tool"),
                            ("conversation", "Conversation"),
                            ("export", "Export"),
                            ("api_key", "Api Key"),
                            ("system", "System"),
                        ],
                        max_length=100,
                        null=True,
                    ),
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
                            ("task_queued", "task sent to a Celery queue"),
                            ("task_started", "an attempt of the task started on a worker"),
                            ("task_retrying", "an attempt failed and the task will be tried again"),
                            ("task_completed", "task completed"),
                            ("task_failed", "task failed with no retries left (or a non-retryable error)"),
                            ("task_timed_out", "an attempt exceeded its time limit"),
                            ("task_cancelled", "task cancelled"),
                            ("task_lost", "an attempt was found abandoned (worker lost) by the reaper"),
                            ("agent_started", "an agent began working on a task or message"),
                            ("agent_registered", "an agent definition was loaded or changed"),
                            ("tool_executed", "an agent called a tool"),
                            ("message_created", "a conversation message was stored"),
                            ("agent_interaction", "hand-off, collaboration, review or feedback between agents"),
                            ("api_key_created", "an API key was created (or made by rotating another)"),
                            ("api_key_revoked", "an API key was revoked (or rotated out)"),
                            ("export_completed", "a training-data export finished"),
                            ("export_failed", "a training-data export failed"),
                        ],
                        max_length=100,
                    ),
                ),
                migrations.AddConstraint(
                    model_name="event",
                    constraint=models.CheckConstraint(
                        condition=models.Q(("event_type__in", EVENT_TYPES)), name="events_event_type_valid"
                    ),
                ),
                migrations.AddConstraint(
                    model_name="event",
                    constraint=models.CheckConstraint(
                        condition=models.Q(
                            ("entity_type__isnull", True), ("entity_type__in", ENTITY_TYPES), _connector="OR"
                        ),
                        name="events_entity_type_valid",
                    ),
                ),
            ],
            forwards=_checks(EVENT_TYPES, ENTITY_TYPES),
            backwards=_checks(OLD_EVENT_TYPES, OLD_ENTITY_TYPES),
        )
    ]
