"""Recording what agents do besides answering: tool calls and interactions with other agents.

Both are written while the attempt runs, each in its own short transaction, so they stay
on record even when the attempt later fails: the tool did run, the hand-off did happen.
The soft time limit is held off while each is written (orchestration.soft_limit.held_off).
"""

from __future__ import annotations

from typing import Any

from django.db import transaction

from orchestration.event_types import EntityType, EventType, Severity
from orchestration.models import AgentInteraction, Event
from orchestration.runtime.tools import ToolCall, storable_text
from orchestration.services.events import event_record
from orchestration.soft_limit import held_off


@held_off()
def tool_call_record(
    *, call: ToolCall, execution_id: str, agent_id: str, workflow_id: str | None, attempt_number: int | None = None
) -> None:
    """Append the `tool_executed` event of one call, with seed 002's fields, the call's id and
    the number of the attempt that made it: with the task's execution_id, the keys that join
    the call to the assistant message that asked for it (a conversation's tool_calls). A name
    longer than the event's entity_id column (a model's, refused: no tool is named so) is in
    the payload only: written there, it failed the attempt in place of the refusal."""
    fits = len(call.tool_name) <= Event._meta.get_field("entity_id").max_length
    event_record(
        event_type=EventType.TOOL_EXECUTED,
        entity_type=EntityType.TOOL,
        entity_id=call.tool_name if fits else None,
        workflow_id=workflow_id,
        agent_id=agent_id,
        payload={
            "execution_id": execution_id,
            "agent_id": agent_id,
            "tool_name": call.tool_name,
            "tool_call_id": call.call_id,
            "attempt_number": attempt_number,
            "input_params": call.input_params,
            "output_result": call.output_result,
            "execution_time_ms": call.execution_time_ms,
            # A tool's own failure may name a NUL (a binary page): written so, it failed the attempt.
            "error": None if call.error is None else storable_text(call.error),
        },
        severity=Severity.INFO if call.error is None else Severity.WARNING,
    )


@held_off()
def agent_started_record(
    *,
    agent_id: str,
    from_agent_id: str,
    interaction_type: str,
    workflow_id: str | None,
    execution_id: str | None,
    depth: int,
    attempt_number: int | None = None,
) -> None:
    """Append the `agent_started` event of an agent that another one brought into its attempt
    (hand-off, review, collaboration), committed before it starts: a delegated agent that works
    for minutes shows on the stream as it begins, not only when its interaction is recorded.
    With the task's execution_id, `attempt_number` names the attempt it runs in (a retried
    task's attempts each start their own). (The attempt's own agent starting is its task_started.)"""
    event_record(
        event_type=EventType.AGENT_STARTED,
        entity_type=EntityType.AGENT,
        entity_id=agent_id,
        workflow_id=workflow_id,
        agent_id=agent_id,
        payload={
            "agent_id": agent_id,
            "from_agent_id": from_agent_id,
            "interaction_type": interaction_type,
            "execution_id": execution_id,
            "attempt_number": attempt_number,
            "depth": depth,
        },
    )


@held_off()
@transaction.atomic
def interaction_record(
    *,
    interaction_type: str,
    from_agent_id: str,
    to_agent_id: str,
    workflow_id: str | None,
    execution_id: str | None,
    message: str = "",
    payload: dict[str, Any] | None = None,
    attempt_number: int | None = None,
) -> AgentInteraction:
    """Store an agent_interactions row (handoff, collaboration, review, feedback) and its event.
    The event's `attempt_number` (with its execution_id) names the attempt that made it: a
    retried task's attempts each make their own."""
    interaction = AgentInteraction.objects.create(
        interaction_type=interaction_type,
        from_agent_id=from_agent_id,
        to_agent_id=to_agent_id,
        workflow_id=workflow_id,
        execution_id=execution_id,
        message=message or None,
        payload=payload or {},
    )
    failed = bool((payload or {}).get("error"))
    event_record(
        event_type=EventType.AGENT_INTERACTION,
        entity_type=EntityType.AGENT,
        entity_id=to_agent_id,
        workflow_id=workflow_id,
        agent_id=from_agent_id,
        payload={
            "interaction_id": str(interaction.id),
            "interaction_type": interaction_type,
            "from_agent_id": from_agent_id,
            "to_agent_id": to_agent_id,
            "execution_id": execution_id,
            "attempt_number": attempt_number,
            "message": message,
            "error": (payload or {}).get("error"),
        },
        severity=Severity.WARNING if failed else Severity.INFO,
    )
    return interaction
