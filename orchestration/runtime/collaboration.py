"""Agents working with other agents inside one attempt: hand-offs, reviews, collaboration
and feedback.

A hand-off, a review or a collaboration runs the other agent right away, in the same
attempt, with its own tools; its tokens and cost are added to the attempt's. Each one is
recorded as an `agent_interactions` row and an `agent_interaction` event, with its input,
its outcome and how long it took, whether it succeeded or not. Feedback is a message only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any

from django.conf import settings

from orchestration.db import agent_stopping, stopping_write
from orchestration.errors import PermanentError
from orchestration.models import Agent, AgentInteraction
from orchestration.runtime.context import TaskContext, Usage
from orchestration.runtime.tools import ToolBox, ToolCall, jsonb_problem, storable_text

logger = logging.getLogger(__name__)

# The error of a hand-off, review or collaboration cut short by a stop of its process.
INTERRUPTED = "interrupted: the process running it was told to stop before the other agent finished"


def equip(context: TaskContext, agent: Agent, *, depth: int = 0) -> TaskContext:
    """The context with the agent's tool box and peers (recording into the database).

    Every level of delegation shares the task's `spend`, so what delegated agents used is
    counted once, on the attempt."""
    from orchestration.services.interactions import tool_call_record

    def record(call: ToolCall) -> None:
        tool_call_record(
            call=call,
            execution_id=context.execution_id,
            agent_id=agent.id,
            workflow_id=context.workflow_id,
            attempt_number=context.attempt_number,
        )

    conversation = context.conversation if depth == 0 else None
    tools = ToolBox(
        agent_id=agent.id,
        allowed=(agent.config or {}).get("tools", []),
        recorder=record,
        transcript=conversation.transcript if conversation is not None else None,
    )
    equipped = dataclasses.replace(
        context,
        agent_id=agent.id,
        agent_config=agent.config or {},
        tools=tools,
        conversation=conversation,
        depth=depth,
    )
    return dataclasses.replace(equipped, peers=Peers(equipped))


def _record_problem(value: Any, message: str, what: str = "input") -> str | None:
    """Why an interaction's record could not store its input (a feedback's payload) or
    message, or None."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:  # nested too deep: a transient failure else
        return f"{what} is not JSON: {exc}"
    return jsonb_problem(value, what) or jsonb_problem(message, "message")


class Peers:
    """What an agent may ask of other agents while it works on a task."""

    def __init__(self, context: TaskContext) -> None:
        self._context = context

    def handoff(self, to_agent: str, task_input: dict[str, Any], *, message: str = "") -> dict[str, Any]:
        """Hand the work to another agent and return its output (which the caller usually
        returns as its own)."""
        return self._run(AgentInteraction.InteractionType.HANDOFF, to_agent, task_input, message)

    def review(
        self, reviewer: str, output: dict[str, Any], *, criteria: dict[str, Any] | None = None, message: str = ""
    ) -> dict[str, Any]:
        """Ask another agent to review an output; returns its verdict."""
        return self._run(
            AgentInteraction.InteractionType.REVIEW,
            reviewer,
            {"output": output, "criteria": criteria or {}},
            message,
        )

    def collaborate(self, with_agent: str, task_input: dict[str, Any], *, message: str = "") -> dict[str, Any]:
        """Ask another agent for a part of the work; returns its output."""
        return self._run(AgentInteraction.InteractionType.COLLABORATION, with_agent, task_input, message)

    def feedback(self, to_agent: str, message: str, *, payload: dict[str, Any] | None = None) -> None:
        """Send feedback (a message, nothing runs)."""
        from orchestration.services.interactions import interaction_record

        kind = AgentInteraction.InteractionType.FEEDBACK
        self._target(to_agent, kind)
        context = self._context
        # Refused for good, as a hand-off's input is: the failed write was retried as transient.
        if problem := _record_problem(payload or {}, message, "payload"):
            raise PermanentError(
                f"{kind} from {context.agent_id!r} to {to_agent!r}: its payload cannot be stored: {problem}"
            )
        interaction_record(
            interaction_type=kind,
            from_agent_id=context.agent_id,
            to_agent_id=to_agent,
            workflow_id=context.workflow_id,
            execution_id=context.execution_id,
            message=message,
            payload=payload or {},
            attempt_number=context.attempt_number,
        )

    def _target(self, agent_id: str, kind: str) -> Agent:
        context = self._context
        if agent_id == context.agent_id:
            raise PermanentError(f"agent {agent_id!r} cannot send a {kind} to itself")
        agent = Agent.objects.filter(pk=agent_id).first()
        if agent is None:
            raise PermanentError(f"{kind} from {context.agent_id!r}: no agent {agent_id!r}")
        if agent.status != Agent.Status.ACTIVE:
            raise PermanentError(f"{kind} from {context.agent_id!r}: agent {agent_id!r} is {agent.status}")
        return agent

    def _run(self, kind: str, to_agent: str, task_input: dict[str, Any], message: str) -> dict[str, Any]:
        from orchestration.runtime.executors import agent_execute, usage_checked
        from orchestration.services.interactions import agent_started_record, interaction_record

        context = self._context
        if context.depth >= settings.AGENT_MAX_DELEGATION_DEPTH:
            raise PermanentError(
                f"{kind} from {context.agent_id!r} to {to_agent!r}: more than "
                f"{settings.AGENT_MAX_DELEGATION_DEPTH} nested hand-offs (AGENT_MAX_DELEGATION_DEPTH)"
            )
        agent = self._target(to_agent, kind)
        # Checked before the other agent runs: its record could not be written afterwards, and
        # the failed write took the place of the other agent's outcome (which had been paid for).
        if problem := _record_problem(task_input, message):
            raise PermanentError(
                f"{kind} from {context.agent_id!r} to {to_agent!r}: its input cannot be stored: {problem}"
            )
        sub = equip(context, agent, depth=context.depth + 1)
        agent_started_record(
            agent_id=to_agent,
            from_agent_id=context.agent_id,
            interaction_type=kind,
            workflow_id=context.workflow_id,
            execution_id=context.execution_id,
            depth=sub.depth,
            attempt_number=context.attempt_number,
        )
        started = time.monotonic()
        # The attempt that made it: a retried task's attempts each hand off anew.
        payload: dict[str, Any] = {"input": task_input, "attempt_number": context.attempt_number}
        stopped = False
        try:
            result = agent_execute(agent=agent, task_input=task_input, context=sub)
        except BaseException as exc:
            # A stop (a cancel's SIGTERM, a worker's shutdown, ^C) is not the other agent's
            # failure, nor its success: the hand-off was interrupted.
            stopped = agent_stopping(exc)
            # Stored as text takes it: a message with a NUL (a binary error page) failed the
            # record in place of the other agent's failure, and the attempt was retried.
            payload["error"] = INTERRUPTED if stopped else storable_text(f"{type(exc).__name__}: {exc}")
            usage = getattr(exc, "usage", None)
            if usage is not None:
                # Checked as the attempt's own failure's usage is (whole tokens, a finite cost in
                # USD, rounded as recorded): added as it came, a float cost raised a TypeError in
                # place of the other agent's error (recorded not retryable, its cost lost) and a
                # NaN one made the attempt's record fail, leaving it running for the reaper.
                try:
                    context.spend.add(usage_checked(usage))
                except PermanentError as malformed:
                    logger.warning(
                        "%s from %r to %r: the usage its failure reported is malformed; not recorded: %s",
                        kind,
                        context.agent_id,
                        to_agent,
                        malformed,
                    )
                # Counted here, once: the exception goes on up and must not carry it again.
                exc.usage = Usage()  # type: ignore[attr-defined]
            raise
        else:
            context.spend.add(result.usage)
            payload["output"] = result.output
            payload["usage"] = {
                "input_tokens": result.usage.input_tokens,
                "output_tokens": result.usage.output_tokens,
                "cost_usd": str(result.usage.cost_usd),
            }
            return result.output
        finally:
            payload["duration_ms"] = round((time.monotonic() - started) * 1000, 3)

            def record() -> None:
                interaction_record(
                    interaction_type=kind,
                    from_agent_id=context.agent_id,
                    to_agent_id=to_agent,
                    workflow_id=context.workflow_id,
                    execution_id=context.execution_id,
                    message=message,
                    payload=payload,
                    attempt_number=context.attempt_number,
                )

            if stopped:
                # Briefly, and never raising in place of the stop (see stopping_write).
                stopping_write(f"the interrupted {kind} from {context.agent_id!r} to {to_agent!r}", record)
            else:
                record()
