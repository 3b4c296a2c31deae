"""Running one attempt of an agent. The `python` executor calls a dotted-path callable
`fn(input: dict, context: TaskContext) -> dict | AgentResult`; the other executor kinds
(http, llm) come with the agent runtime."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache
from typing import Any

from django.utils.module_loading import import_string

from orchestration.errors import PermanentError
from orchestration.models import Agent
from orchestration.runtime.context import AgentResult, TaskContext


@cache
def _load_callable(path: str) -> Callable[..., Any]:
    try:
        fn = import_string(path)
    except ImportError as exc:
        raise PermanentError(f"agent entrypoint {path!r} cannot be imported: {exc}") from None
    if not callable(fn):
        raise PermanentError(f"agent entrypoint {path!r} is not callable")
    return fn


def _as_result(value: Any) -> AgentResult:
    if isinstance(value, AgentResult):
        result = value
    elif isinstance(value, dict):
        result = AgentResult(output=value)
    else:
        raise PermanentError(f"agent returned {type(value).__name__}; expected a mapping or AgentResult")
    try:
        json.dumps(result.output)
    except (TypeError, ValueError) as exc:
        raise PermanentError(f"agent output is not JSON-serialisable: {exc}") from None
    return result


def agent_execute(*, agent: Agent, task_input: dict[str, Any], context: TaskContext) -> AgentResult:
    """Run the agent once. Exceptions propagate to the caller, which classifies them."""
    if agent.executor == Agent.Executor.PYTHON:
        return _as_result(_load_callable(agent.entrypoint)(task_input, context))
    raise PermanentError(f"executor {agent.executor!r} of agent {agent.id!r} is not available in this build")
