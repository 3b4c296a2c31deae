"""Appending to the audit log. Callers do it inside the transaction of the state change it
records, so the events table doubles as the outbox the relay publishes from."""

from __future__ import annotations

from typing import Any

from orchestration.event_types import EntityType, EventType, Severity
from orchestration.models import Event, TaskAttempt, TaskExecution, Workflow


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
