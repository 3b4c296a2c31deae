"""Running one attempt of an agent, by executor kind:
- `python`: a dotted-path callable `fn(input: dict, context: TaskContext) -> dict | AgentResult`;
- `http`: POST the task to the agent's service (runtime/http_agent.py);
- `llm`: one chat completion with an OpenAI-compatible server or Anthropic (runtime/llm.py)."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from functools import cache
from typing import Any

from django.conf import settings
from django.utils.module_loading import import_string

from orchestration.errors import PermanentError
from orchestration.models import Agent
from orchestration.runtime.context import AgentResult, TaskContext, Usage
from orchestration.runtime.http_agent import http_execute
from orchestration.runtime.llm import llm_execute
from orchestration.runtime.pricing import COST_QUANTUM
from orchestration.runtime.tools import jsonb_problem, registry

# Per attempt, input and output together: far above any real attempt, and far enough below
# bigint (2**63 - 1) that the attempt's tokens_used and the task, workflow and agent totals
# summing many attempts cannot overflow.
MAX_TOKENS = 10**15
MAX_COST = Decimal(10) ** 8  # task_attempts.cost_usd is numeric(14, 6)


def _in_entrypoint_modules(module: str) -> bool:
    return any(module == name or module.startswith(f"{name}.") for name in settings.AGENT_ENTRYPOINT_MODULES)


def entrypoint_problem(path: str) -> str | None:
    """Why a `python` agent may not run the callable at the dotted `path`, or None: only
    public functions of AGENT_ENTRYPOINT_MODULES (an admin making an agent through the API
    must not have a worker import and call whatever is installed). Checked on the path,
    before anything is imported; `entrypoint_function_problem` checks what it names."""
    module, _, name = path.rpartition(".")
    allowed = settings.AGENT_ENTRYPOINT_MODULES
    if not _in_entrypoint_modules(module):
        return f"{path!r} is outside AGENT_ENTRYPOINT_MODULES ({', '.join(allowed) or 'none'})"
    if not name or name.startswith("_"):
        return f"{path!r} names no public function (a private or empty name) of AGENT_ENTRYPOINT_MODULES"
    return None


def entrypoint_function_problem(path: str, fn: Any) -> str | None:
    """Why the object `path` imported may not be run, or None: a function defined in one of
    AGENT_ENTRYPOINT_MODULES. The path's module being allowed is not enough: whatever that
    module imports is an attribute of it (`allowed_module.TaskContext`, or a `run` imported
    from subprocess), as are the module's own dunders (`allowed_module.__class__`)."""
    owner = getattr(fn, "__module__", None)
    if (inspect.isfunction(fn) or inspect.isbuiltin(fn)) and isinstance(owner, str) and _in_entrypoint_modules(owner):
        return None
    return f"{path!r} is not a function defined in AGENT_ENTRYPOINT_MODULES ({type(fn).__name__} of {owner})"


ENTRYPOINT_ERROR_PREFIX = "agent entrypoint "


def entrypoint_load(path: str) -> Callable[..., Any]:
    """The function a `python` agent's entrypoint names, or PermanentError saying why it may
    not run (outside AGENT_ENTRYPOINT_MODULES, not importable, not a function defined there).
    Checked on every call, before the import (the setting may have narrowed since the agent
    was made), and when an agent is made or changed (services.agents.executor_problems)."""
    if (problem := entrypoint_problem(path)) is not None:
        raise PermanentError(f"{ENTRYPOINT_ERROR_PREFIX}{problem}")
    fn = _import_callable(path)
    if (problem := entrypoint_function_problem(path, fn)) is not None:
        raise PermanentError(f"{ENTRYPOINT_ERROR_PREFIX}{problem}")
    return fn


@cache
def _import_callable(path: str) -> Callable[..., Any]:
    try:
        fn = import_string(path)
    except ImportError as exc:
        raise PermanentError(f"{ENTRYPOINT_ERROR_PREFIX}{path!r} cannot be imported: {exc}") from None
    if not callable(fn):
        raise PermanentError(f"{ENTRYPOINT_ERROR_PREFIX}{path!r} is not callable")
    return fn


def _as_result(value: Any) -> AgentResult:
    if isinstance(value, AgentResult):
        result = value
    elif isinstance(value, dict):
        result = AgentResult(output=value)
    else:
        raise PermanentError(f"agent returned {type(value).__name__}; expected a mapping or AgentResult")
    # The agent ran (and was paid) even when its output is refused: the refusal carries the usage
    # it reported, so the failed attempt records it (the final record replaces the meter).
    usage = usage_checked(result.usage)

    def refused(message: str) -> PermanentError:
        exc = PermanentError(message)
        exc.usage = usage  # type: ignore[attr-defined]
        return exc

    if not isinstance(result.output, dict):
        raise refused(f"agent output is {type(result.output).__name__}; expected a mapping")
    try:
        text = json.dumps(result.output, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError) as exc:  # nested too deep: a transient failure else
        raise refused(f"agent output is not JSON-serialisable: {exc}") from None
    # Counted before anything is stored: a python agent's output has no response cap to pass,
    # and outputs beyond PostgreSQL's jsonb limits failed the writes of the workflow's end.
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > (limit := settings.AGENT_MAX_OUTPUT_BYTES):
        raise refused(f"agent output is {size} bytes of JSON, more than AGENT_MAX_OUTPUT_BYTES ({limit})")
    if problem := jsonb_problem(result.output, "output"):
        raise refused(f"agent output cannot be stored: {problem}")
    result.usage = usage
    return result


def _definition_prompt(agent: Agent, context: TaskContext) -> dict[str, Any]:
    """The prompt version of an agent that is sent no prompt (python, http): its definition's
    system prompt and the schemas of the tools it may call, the ones the chat export has always
    paired with its turns, now fixed when the turn is recorded. A configured name the registry
    does not know has no schema (a call of it is refused; the export describes what was called)."""
    known = registry()
    allowed = context.tools.allowed if context.tools is not None else ()
    return {"system_prompt": agent.system_prompt, "tools": [known[name].schema() for name in allowed if name in known]}


def usage_checked(usage: Any) -> Usage:
    """The usage an agent reported, as the record stores it: whole non-negative token counts
    and a finite, non-negative cost in USD (a number or numeric string is taken as a Decimal,
    rounded to the cost columns' 6 places). PermanentError names what is wrong."""
    if not isinstance(usage, Usage):
        raise PermanentError(f"agent usage is {type(usage).__name__}; expected a Usage")
    for name in ("input_tokens", "output_tokens"):
        value = getattr(usage, name)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOKENS:
            raise PermanentError(f"agent usage.{name} must be a non-negative integer, got {value!r}")
    if usage.input_tokens + usage.output_tokens > MAX_TOKENS:
        raise PermanentError(
            f"agent usage: {usage.input_tokens} input + {usage.output_tokens} output tokens is more than {MAX_TOKENS}"
        )
    raw = usage.cost_usd
    try:
        cost = raw if isinstance(raw, Decimal) else Decimal(str(raw)) if isinstance(raw, int | float | str) else None
    except InvalidOperation:
        cost = None
    if isinstance(raw, bool) or cost is None or not cost.is_finite() or not 0 <= cost < MAX_COST:
        raise PermanentError(f"agent usage.cost_usd must be a non-negative amount in USD below 1e8, got {raw!r}")
    return Usage(usage.input_tokens, usage.output_tokens, cost.quantize(COST_QUANTUM, rounding=ROUND_HALF_UP))


def agent_execute(*, agent: Agent, task_input: dict[str, Any], context: TaskContext) -> AgentResult:
    """Run the agent once. Exceptions propagate to the caller, which classifies them."""
    if context.conversation is not None and agent.executor != Agent.Executor.LLM:
        context.conversation.prompt = _definition_prompt(agent, context)
    if agent.executor == Agent.Executor.PYTHON:
        return _as_result(entrypoint_load(agent.entrypoint)(task_input, context))
    if agent.executor == Agent.Executor.HTTP:
        return _as_result(http_execute(agent=agent, task_input=task_input, context=context))
    if agent.executor == Agent.Executor.LLM:
        return _as_result(llm_execute(agent=agent, task_input=task_input, context=context))
    raise PermanentError(f"executor {agent.executor!r} of agent {agent.id!r} is not available in this build")
