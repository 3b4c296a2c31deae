"""Running one attempt of an agent, by executor kind:
- `python`: a dotted-path callable `fn(input: dict, context: TaskContext) -> dict | AgentResult`;
- `http`: POST the task to the agent's service (runtime/http_agent.py);
- `llm`: one chat completion with an OpenAI-compatible server or Anthropic (runtime/llm.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache
from typing import Any

from django.utils.module_loading import import_string

from orchestration.errors import PermanentError
from orchestration.models import Agent
from orchestration.runtime.context import AgentResult, TaskContext
from orchestration.runtime.http_agent import http_execute
from orchestration.runtime.llm import llm_execute


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
        json.dumps(result.output, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise PermanentError(f"agent output is not JSON-serialisable: {exc}") from None
    return result


def agent_execute(*, agent: Agent, task_input: dict[str, Any], context: TaskContext) -> AgentResult:
    """Run the agent once. Exceptions propagate to the caller, which classifies them."""
    if agent.executor == Agent.Executor.PYTHON:
        return _as_result(_load_callable(agent.entrypoint)(task_input, context))
    if agent.executor == Agent.Executor.HTTP:
        return _as_result(http_execute(agent=agent, task_input=task_input, context=context))
    if agent.executor == Agent.Executor.LLM:
        return _as_result(llm_execute(agent=agent, task_input=task_input, context=context))
    raise PermanentError(f"executor {agent.executor!r} of agent {agent.id!r} is not available in this build")
