"""Appending to the audit log. Callers do it inside the transaction of the state change it
records, so the events table doubles as the outbox the relay publishes from."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

from django.db import models

from orchestration.event_types import EntityType, EventType, Severity
from orchestration.models import Event, TaskAttempt, TaskExecution, Workflow

# What a task or workflow row says of how it ended, which a later retry or resume rewrites
# (the same row starts again). The events that end one in a way it can start again from
# (task_failed, task_cancelled, workflow_failed, workflow_cancelled) carry these columns as
# that transaction left them, under the payload's `state`: the record of that ending, which
# the row itself no longer holds once it runs again. A completion is final.
TASK_STATE_FIELDS = (
    "status",
    "output_data",
    "error",
    "retry_count",
    "execution_time_ms",
    "input_tokens",
    "output_tokens",
    "tokens_used",
    "cost_usd",
    "started_at",
    "completed_at",
)
WORKFLOW_STATE_FIELDS = (
    "status",
    "completed_steps",
    "failed_steps",
    "cancelled_steps",
    "error",
    "duration_ms",
    "total_tokens_used",
    "total_cost_usd",
    "wasted_cost_usd",
    "started_at",
    "completed_at",
)


def json_value(value: Any) -> Any:
    """A column value as JSON: a datetime as ISO 8601 (UTC from the database), a decimal as its
    exact text; read back with `state_value`."""
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    return value


def state_value(field: models.Field, value: Any) -> Any:
    """A `state` value back as the column's Python value (what the database would give)."""
    if value is None:
        return None
    if isinstance(field, models.DateTimeField):
        moment = dt.datetime.fromisoformat(value)
        if moment.utcoffset() is None:
            raise ValueError(f"{field.name}: {value!r} has no UTC offset")
        try:
            moment.astimezone(dt.UTC)
        except OverflowError:
            raise ValueError(f"{field.name}: {value!r} is out of range in UTC") from None
        return moment
    if isinstance(field, models.DecimalField):
        return Decimal(value)
    return value


def entity_states(model: type[models.Model], pks: Iterable[str], fields: tuple[str, ...]) -> dict[str, dict]:
    """The `state` of each row, read from the database inside the caller's transaction, after
    its writes (some columns are kept by triggers or F() updates, not on the instance)."""
    pk = model._meta.pk.name
    return {
        row[pk]: {name: json_value(row[name]) for name in fields}
        for row in model.objects.filter(pk__in=list(pks)).values(pk, *fields)
    }


# Who asked for an operation (cancel, retry, resume, an API key's creation or revocation), as
# its events name it: {"by": the user's name, "via": "console" | "api" | "api_key:<prefix>" |
# "manage.py"}. None for what the platform does on its own.
Actor = dict[str, str]


def actor_of(user: Any, via: str) -> Actor:
    return {"by": user.get_username() if user is not None else "", "via": via}


def event_record(
    *,
    event_type: EventType | str,
    entity_type: EntityType | str | None = None,
    entity_id: str | None = None,
    workflow_id: str | None = None,
    agent_id: str | None = None,
    session_id: str | None = None,
    payload: dict[str, Any] | None = None,
    severity: Severity | str = Severity.INFO,
    source: str = "platform",
) -> Event:
    """Append one event."""
    return Event.objects.create(
        event_type=event_type,
        entity_type=entity_type,
        entity_id=entity_id,
        workflow_id=workflow_id,
        agent_id=agent_id,
        session_id=session_id,
        payload=payload or {},
        severity=severity,
        source=source,
    )


def workflow_event_build(
    workflow: Workflow,
    event_type: EventType,
    *,
    payload: dict[str, Any] | None = None,
    severity: Severity = Severity.INFO,
) -> Event:
    """An unsaved workflow event (for bulk_create); see workflow_event to save one."""
    return Event(
        event_type=event_type,
        entity_type=EntityType.WORKFLOW,
        entity_id=workflow.workflow_id,
        workflow_id=workflow.workflow_id,
        payload=payload or {},
        severity=severity,
        source="platform",
    )


def workflow_event(
    workflow: Workflow,
    event_type: EventType,
    *,
    payload: dict[str, Any] | None = None,
    severity: Severity = Severity.INFO,
) -> Event:
    event = workflow_event_build(workflow, event_type, payload=payload, severity=severity)
    event.save(force_insert=True)
    return event


def task_event_build(
    task: TaskExecution,
    event_type: EventType,
    *,
    attempt: TaskAttempt | None = None,
    payload: dict[str, Any] | None = None,
    severity: Severity = Severity.INFO,
) -> Event:
    """An unsaved task event (for bulk_create); see task_event to save one."""
    body = {"task_name": task.task_name, "status": task.status, **(payload or {})}
    if attempt is not None:
        body["attempt"] = attempt.attempt_number
    return Event(
        event_type=event_type,
        entity_type=EntityType.TASK,
        entity_id=task.execution_id,
        workflow_id=task.workflow_id,
        agent_id=task.agent_id,
        payload=body,
        severity=severity,
        source="platform",
    )


def task_event(
    task: TaskExecution,
    event_type: EventType,
    *,
    attempt: TaskAttempt | None = None,
    payload: dict[str, Any] | None = None,
    severity: Severity = Severity.INFO,
) -> Event:
    event = task_event_build(task, event_type, attempt=attempt, payload=payload, severity=severity)
    event.save(force_insert=True)
    return event
