"""Agents created, changed and deactivated through the API (admins only).

Definition files stay the main source (`load_agents`); an agent created here has no
definition file, so a sync never deactivates it. Every change is an agent_registered event.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction

from orchestration.errors import SpecError, TransitionError
from orchestration.event_types import EntityType, EventType
from orchestration.models import Agent
from orchestration.services.agents import DEFINITION_FIELDS, definition_snapshot, executor_problems
from orchestration.services.events import event_record

SERVER_OWNED = {
    "status",
    "definition_path",
    "definition_hash",
    "total_tasks_completed",
    "total_tokens_used",
    "average_latency_ms",
    "success_rate",
    "created_at",
    "updated_at",
}


def agent_check(agent: Agent) -> None:
    """The checks load_agents makes of a definition file (executor_problems), then the model's."""
    definition = {
        name: getattr(agent, name)
        for name in DEFINITION_FIELDS
        if getattr(agent, name, None) not in (None, "") or name in ("id", "name", "executor")
    }
    problems = executor_problems(definition)
    try:
        agent.full_clean(exclude=["id"] if agent._state.adding is False else None, validate_unique=False)
    except ValidationError as exc:
        for field, messages in exc.message_dict.items():
            problems.extend(message if field == "__all__" else f"{field}: {message}" for message in messages)
    if problems:
        raise SpecError(problems)


def agent_change_record(agent: Agent, change: str, actor: Any) -> None:
    """After a change of the agent is saved: its row's `definition_hash` set to the hash of the
    definition it now holds (what each attempt's task_started event records), and an
    agent_registered event with that definition. Read again under the row's lock: the console
    writes only the fields its form changed."""
    saved = Agent.objects.select_for_update().get(pk=agent.pk)
    snapshot = definition_snapshot(saved)
    if saved.definition_hash != snapshot["definition_sha256"]:
        Agent.objects.filter(pk=agent.pk).update(definition_hash=snapshot["definition_sha256"])
    agent.definition_hash = snapshot["definition_sha256"]
    event_record(
        event_type=EventType.AGENT_REGISTERED,
        entity_type=EntityType.AGENT,
        entity_id=agent.id,
        agent_id=agent.id,
        payload={"change": change, "by": getattr(actor, "username", None), **snapshot},
    )


@transaction.atomic
def agent_create(*, fields: dict[str, Any], actor: Any = None) -> Agent:
    """Create an active agent from `fields` (the API's writable fields). SpecError names
    every problem; an existing id is a problem too."""
    owned = sorted(set(fields) & SERVER_OWNED)
    if owned:
        raise SpecError([f"{name}: set by the server, not accepted" for name in owned])
    agent_id = fields.get("id", "")
    if Agent.objects.filter(pk=agent_id).exists():
        raise SpecError([f"id: an agent {agent_id!r} already exists"])
    agent = Agent(**fields, status=Agent.Status.ACTIVE)
    agent_check(agent)
    agent.save(force_insert=True)
    agent_change_record(agent, "created", actor)
    return agent


def agent_check_editable(agent: Agent) -> None:
    """An agent loaded from a definition file is changed in its file: `load_agents` would undo
    a change made here (or, while the file's hash is unchanged, keep diverging from it)."""
    if agent.definition_path:
        raise TransitionError(
            f"agent {agent.pk!r} is defined in {agent.definition_path} (under the agent definitions "
            "directory) and must be edited there, then loaded with `manage.py load_agents`; a change made "
            "here would be undone by the next load_agents"
        )


@transaction.atomic
def agent_update(*, agent_id: str, fields: dict[str, Any], actor: Any = None, replace: Sequence[str] = ()) -> Agent:
    """Change an agent's writable fields; the id, status and stats are not changed here, nor
    an agent loaded from a definition file (TransitionError).

    `replace` names the fields a full replacement (PUT) covers: those of them missing from
    `fields` go back to their defaults instead of keeping their values."""
    owned = sorted(set(fields) & (SERVER_OWNED | {"id"}))
    if owned:
        raise SpecError([f"{name}: cannot be changed here" for name in owned])
    agent = Agent.objects.select_for_update().get(pk=agent_id)
    agent_check_editable(agent)
    for name in replace:
        if name not in fields:
            setattr(agent, name, Agent._meta.get_field(name).get_default())
    for name, value in fields.items():
        setattr(agent, name, value)
    agent_check(agent)
    agent.save()
    agent_change_record(agent, "updated", actor)
    return agent


@transaction.atomic
def agent_deactivate(*, agent_id: str, actor: Any = None) -> Agent:
    """Mark an agent inactive: new workflows and messages may no longer use it; tasks
    already queued still run. Not an agent loaded from a definition file (TransitionError)."""
    agent = Agent.objects.select_for_update().get(pk=agent_id)
    agent_check_editable(agent)
    if agent.status == Agent.Status.INACTIVE:
        raise TransitionError(f"agent {agent_id} is already inactive")
    agent.status = Agent.Status.INACTIVE
    agent.save(update_fields=["status", "updated_at"])
    agent_change_record(agent, "deactivated", actor)
    return agent
