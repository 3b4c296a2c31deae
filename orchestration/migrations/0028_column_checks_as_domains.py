"""The CHECK constraints of single columns of the tables written for every attempt (workflows,
task_executions, task_attempts, events) move into domains, the columns' types on PostgreSQL
(orchestration.models.base.DomainCheck): PostgreSQL re-reads and re-plans every table CHECK for
each INSERT or UPDATE statement, a domain's checks once per session. Same names, same
conditions; SQLite's tables are left as they are (the same table CHECKs; rebuilding four tables
there would change nothing but drop and reinstall their rules). attempt_number and
delivery_count become plain integer fields, their checks (>= 1, >= 0) named constraints:
PositiveIntegerField added a table CHECK of its own.

On PostgreSQL no table is rewritten (a domain over the column's own type), but the migration
holds an exclusive lock on each of the four tables from its first change of it until it
commits: readers wait too. In that time each domain's check reads its table once, the partial
index on events.severity is rebuilt, and each column that had planner statistics is analyzed
again (ALTER COLUMN TYPE drops them). A review measured about 2 s of waiting for a read with
3 million events; plan the migration for a quiet moment on a large events table. Workers
running across it fail one claim or completion per connection whose prepared statement
returns these tables' rows, and retry it (orchestration.db.prepared_cursor). The tables'
PL/pgSQL trigger functions are made again as they are (DomainCheck): a session that had run one
(calc_workflow_duration, on every workflow written) kept it planned for the old column type and
had every later write refused until it reconnected.

Reversed, the table CHECKs come back and the columns keep their (then unconstrained) domains as
types.
"""

from django.conf import settings
from django.db import migrations, models

import orchestration.models.base


class OnPostgreSQL(migrations.SeparateDatabaseAndState):
    """The operations on the state everywhere, on the database on PostgreSQL only."""

    def __init__(self, operations):
        super().__init__(database_operations=operations, state_operations=operations)

    def deconstruct(self):
        return (self.__class__.__qualname__, [self.state_operations], {})

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            super().database_forwards(app_label, schema_editor, from_state, to_state)

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            super().database_backwards(app_label, schema_editor, from_state, to_state)


class Migration(migrations.Migration):
    dependencies = [
        ("orchestration", "0027_system_queue_schedules"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        OnPostgreSQL(
            [
                migrations.RemoveConstraint(
                    model_name="event",
                    name="events_severity_valid",
                ),
                migrations.RemoveConstraint(
                    model_name="event",
                    name="events_event_type_valid",
                ),
                migrations.RemoveConstraint(
                    model_name="event",
                    name="events_entity_type_valid",
                ),
                migrations.RemoveConstraint(
                    model_name="taskattempt",
                    name="task_attempts_status_valid",
                ),
                migrations.RemoveConstraint(
                    model_name="taskattempt",
                    name="task_attempts_number_positive",
                ),
                migrations.RemoveConstraint(
                    model_name="taskattempt",
                    name="task_attempts_cause_valid",
                ),
                migrations.RemoveConstraint(
                    model_name="taskexecution",
                    name="task_executions_status_valid",
                ),
                migrations.RemoveConstraint(
                    model_name="taskexecution",
                    name="task_executions_priority_valid",
                ),
                migrations.RemoveConstraint(
                    model_name="taskexecution",
                    name="task_executions_timeout_range",
                ),
                migrations.RemoveConstraint(
                    model_name="workflow",
                    name="workflows_status_valid",
                ),
                migrations.RemoveConstraint(
                    model_name="workflow",
                    name="workflows_priority_valid",
                ),
                migrations.RemoveConstraint(
                    model_name="workflow",
                    name="workflows_wasted_non_negative",
                ),
                migrations.AlterField(
                    model_name="taskattempt",
                    name="attempt_number",
                    field=models.IntegerField(),
                ),
                migrations.AlterField(
                    model_name="taskattempt",
                    name="delivery_count",
                    field=models.IntegerField(default=1),
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
                                ],
                            )
                        ),
                        field="event_type",
                        name="events_event_type_valid",
                    ),
                ),
                migrations.AddConstraint(
                    model_name="event",
                    constraint=orchestration.models.base.DomainCheck(
                        condition=models.Q(
                            ("entity_type__isnull", True),
                            (
                                "entity_type__in",
                                [
                                    "workflow",
                                    "task",
                                    "attempt",
                                    "agent",
                                    "tool",
                                    "conversation",
                                    "export",
                                    "api_key",
                                    "system",
                                ],
                            ),
                            _connector="OR",
                        ),
                        field="entity_type",
                        name="events_entity_type_valid",
                    ),
                ),
                migrations.AddConstraint(
                    model_name="event",
                    constraint=orchestration.models.base.DomainCheck(
                        condition=models.Q(("severity__in", ["debug", "info", "warning", "error", "critical"])),
                        field="severity",
                        name="events_severity_valid",
                    ),
                ),
                migrations.AddConstraint(
                    model_name="taskattempt",
                    constraint=orchestration.models.base.DomainCheck(
                        condition=models.Q(
                            ("status__in", ["running", "succeeded", "failed", "timed_out", "lost", "cancelled"])
                        ),
                        field="status",
                        name="task_attempts_status_valid",
                    ),
                ),
                migrations.AddConstraint(
                    model_name="taskattempt",
                    constraint=orchestration.models.base.DomainCheck(
                        condition=models.Q(
                            ("cause__isnull", True),
                            (
                                "cause__in",
                                [
                                    "error",
                                    "soft_timeout",
                                    "hard_timeout",
                                    "queue_timeout",
                                    "deadline",
                                    "worker_lost",
                                    "connection_lost",
                                    "redelivery",
                                    "cancelled",
                                ],
                            ),
                            _connector="OR",
                        ),
                        field="cause",
                        name="task_attempts_cause_valid",
                    ),
                ),
                migrations.AddConstraint(
                    model_name="taskattempt",
                    constraint=orchestration.models.base.DomainCheck(
                        condition=models.Q(("attempt_number__gte", 1)),
                        field="attempt_number",
                        name="task_attempts_number_positive",
                    ),
                ),
                migrations.AddConstraint(
                    model_name="taskattempt",
                    constraint=orchestration.models.base.DomainCheck(
                        condition=models.Q(("delivery_count__gte", 0)),
                        field="delivery_count",
                        name="task_attempts_delivery_count_non_negative",
                    ),
                ),
                migrations.AddConstraint(
                    model_name="taskexecution",
                    constraint=orchestration.models.base.DomainCheck(
                        condition=models.Q(
                            (
                                "status__in",
                                [
                                    "pending",
                                    "queued",
                                    "running",
                                    "retrying",
                                    "completed",
                                    "failed",
                                    "timed_out",
                                    "cancelled",
                                ],
                            )
                        ),
                        field="status",
                        name="task_executions_status_valid",
                    ),
                ),
                migrations.AddConstraint(
                    model_name="taskexecution",
                    constraint=orchestration.models.base.DomainCheck(
                        condition=models.Q(("priority__in", ["critical", "high", "normal", "low"])),
                        field="priority",
                        name="task_executions_priority_valid",
                    ),
                ),
                migrations.AddConstraint(
                    model_name="taskexecution",
                    constraint=orchestration.models.base.DomainCheck(
                        condition=models.Q(("timeout_seconds__gt", 0), ("timeout_seconds__lte", 86400)),
                        field="timeout_seconds",
                        name="task_executions_timeout_range",
                    ),
                ),
                migrations.AddConstraint(
                    model_name="workflow",
                    constraint=orchestration.models.base.DomainCheck(
                        condition=models.Q(("status__in", ["pending", "running", "completed", "failed", "cancelled"])),
                        field="status",
                        name="workflows_status_valid",
                    ),
                ),
                migrations.AddConstraint(
                    model_name="workflow",
                    constraint=orchestration.models.base.DomainCheck(
                        condition=models.Q(("priority__in", ["critical", "high", "normal", "low"])),
                        field="priority",
                        name="workflows_priority_valid",
                    ),
                ),
                migrations.AddConstraint(
                    model_name="workflow",
                    constraint=orchestration.models.base.DomainCheck(
                        condition=models.Q(("wasted_cost_usd__gte", 0)),
                        field="wasted_cost_usd",
                        name="workflows_wasted_non_negative",
                    ),
                ),
            ]
        )
    ]
