"""The tool registry: Python functions with JSON-schema parameters that agents may call.

A tool is registered with `@tool(...)` in a module listed in the AGENT_TOOL_MODULES
setting (the built-in ones live in runtime/toolkit.py). An agent may call only the tools
its definition lists under `config.tools`. Every call goes through a ToolBox, which checks
the arguments against the schema, times the call and appends a `tool_executed` event with
seed 002's fields (execution_id, agent_id, tool_name, input_params, output_result,
execution_time_ms, error), whether the tool succeeded or not.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.utils.module_loading import import_module

from orchestration.db import stop_if_interrupted
from orchestration.errors import RetryableError, ToolError

if TYPE_CHECKING:
    from jsonschema import Draft202012Validator

NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789_-")
_NO_ARGUMENTS: Any = object()


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any]
    validator: Draft202012Validator = field(repr=False, compare=False)

    def schema(self) -> dict[str, Any]:
        """The tool as an OpenAI function tool (Anthropic's shape is derived from it)."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


_REGISTRY: dict[str, Tool] = {}


Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def tool(*, name: str, description: str, parameters: dict[str, Any]) -> Decorator:
    """Register `fn(**arguments) -> JSON value` as a tool. A bad schema or name fails at import."""
    if not name or set(name) - NAME_CHARS or len(name) > 64:
        raise ValueError(f"tool name {name!r}: use 1-64 lowercase letters, digits, '_' or '-'")
    if parameters.get("type") != "object":
        raise ValueError(f"tool {name!r}: parameters must be a JSON schema of type object")
    # Imported here, when tools are registered: processes that run no agent (the web, the
    # exporter, the consumer) load the registry's module without it (about 10 MB resident).
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        Draft202012Validator.check_schema(parameters)
    except SchemaError as exc:
        raise ValueError(f"tool {name!r}: parameters is not a valid JSON schema: {exc.message}") from None

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        existing = _REGISTRY.get(name)
        if existing is not None and existing.fn is not fn:
            raise ValueError(f"tool {name!r} is registered twice ({existing.fn.__module__} and {fn.__module__})")
        _REGISTRY[name] = Tool(name, description, parameters, fn, Draft202012Validator(parameters))
        return fn

    return register


@cache
def _load_modules(modules: tuple[str, ...]) -> None:
    for module in modules:
        try:
            import_module(module)
        except ImportError as exc:
            # Still an ImportError: an attempt that meets it fails without retrying.
            raise ImportError(f"AGENT_TOOL_MODULES: cannot import {module!r} ({exc})") from exc


def registry() -> dict[str, Tool]:
    """Every registered tool, by name (importing AGENT_TOOL_MODULES first)."""
    _load_modules(tuple(settings.AGENT_TOOL_MODULES))
    return _REGISTRY


def tool_get(name: str) -> Tool:
    try:
        return registry()[name]
    except KeyError:
        raise ToolError(f"no tool named {name!r} (known: {', '.join(sorted(registry())) or 'none'})") from None


def tool_schemas(names: Iterable[str]) -> list[dict[str, Any]]:
    """OpenAI function-tool definitions of the named tools, in the order given."""
    return [tool_get(name).schema() for name in names]


def arguments_problems(tool_: Tool, arguments: Any) -> list[str]:
    """What is wrong with the arguments, each naming the parameter; empty when they are valid."""
    if not isinstance(arguments, dict):
        return [f"arguments must be an object, got {type(arguments).__name__}"]
    problems = []
    for error in sorted(tool_.validator.iter_errors(arguments), key=lambda e: list(map(str, e.absolute_path))):
        where = "/".join(map(str, error.absolute_path)) or "(arguments)"
        problems.append(f"{where}: {error.message}")
    return problems


def tool_reply_text(record: ToolCall) -> str:
    """What the agent (or model) is told a call returned: the JSON result, or the error."""
    if record.error is not None:
        return json.dumps({"error": record.error})
    return json.dumps(record.output_result, sort_keys=True, ensure_ascii=False)


@dataclass(frozen=True)
class ToolCall:
    """One call as the recorder sees it (seed 002's tool execution record)."""

    call_id: str
    tool_name: str
    input_params: dict[str, Any]
    output_result: Any
    execution_time_ms: float
    error: str | None


class ToolBox:
    """The tools one agent may call while it works on one task (or conversation turn).

    `recorder` receives every ToolCall (the engine appends the `tool_executed` event). In a
    conversation, `transcript` receives each call as an assistant message with `tool_calls`
    and the tool's reply, in OpenAI's chat shape, unless the caller (the llm executor, which
    keeps the model's own messages) says otherwise.
    """

    def __init__(
        self,
        *,
        agent_id: str,
        allowed: Iterable[str],
        recorder: Callable[[ToolCall], None] | None = None,
        transcript: list[dict[str, Any]] | None = None,
    ) -> None:
        self.agent_id = agent_id
        self.allowed = tuple(dict.fromkeys(allowed))
        self._recorder = recorder
        self.transcript = transcript
        self.calls: list[ToolCall] = []

    def schemas(self) -> list[dict[str, Any]]:
        return tool_schemas(self.allowed)

    def call(
        self,
        name: str,
        arguments: Any = _NO_ARGUMENTS,
        *,
        call_id: str | None = None,
        in_transcript: bool = True,
    ) -> Any:
        """Run a tool and record the call. Refusals and failures raise ToolError (the tool's
        own RetryableError passes through, so a transient failure can be retried, and so does
        the soft time limit, so the attempt ends as timed out)."""
        arguments = {} if arguments is _NO_ARGUMENTS else arguments
        call_id = call_id or f"call_{uuid.uuid4().hex[:24]}"
        # A call kept in a conversation's transcript under an id its thread cannot store would
        # fail the turn's record, and the failure's with it (the attempt stays running).
        in_transcript = self.transcript is not None and in_transcript
        id_problem = call_id_problem(call_id) if in_transcript else None
        started = time.perf_counter()
        output: Any = None
        error: BaseException | None = None
        try:
            if id_problem:
                raise ToolError(f"tool {name!r}: {id_problem}")
            if name not in self.allowed:
                raise ToolError(
                    f"agent {self.agent_id!r} may not call tool {name!r} "
                    f"(its definition allows: {', '.join(self.allowed) or 'no tools'})"
                )
            found = tool_get(name)
            if problem := jsonb_problem(arguments, "arguments"):  # a model's "\u0000": not storable, not passed on
                raise ToolError(f"tool {name!r}: invalid arguments: {problem}")
            if problems := arguments_problems(found, arguments):
                raise ToolError(f"tool {name!r}: invalid arguments: " + "; ".join(problems))
            output = found.fn(**arguments)
            try:
                json.dumps(output, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise ToolError(f"tool {name!r} returned a value that is not JSON: {exc}") from None
            if problem := jsonb_problem(output, "result"):
                raise ToolError(f"tool {name!r} returned a value that cannot be stored: {problem}")
        except (ToolError, RetryableError, SoftTimeLimitExceeded) as exc:
            error = exc
        except Exception as exc:  # the tool's own failure: recorded, then refused to the agent
            # Not the tool's failure when the process was told to stop while the tool's database
            # write committed (a cancel's SIGTERM), and Django replaced the exit.
            stop_if_interrupted(exc)
            error = ToolError(f"tool {name!r} failed: {type(exc).__name__}: {exc}")
            error.__cause__ = exc
        elapsed_ms = (time.perf_counter() - started) * 1000
        record = ToolCall(
            call_id=call_id,
            tool_name=name,
            input_params=(
                arguments
                if isinstance(arguments, dict) and not jsonb_problem(arguments)
                else {"arguments": repr(arguments)}
            ),
            output_result=output if error is None else None,
            execution_time_ms=round(elapsed_ms, 3),
            error=None if error is None else str(error),
        )
        self.calls.append(record)
        if self._recorder is not None:
            self._recorder(record)
        if self.transcript is not None and in_transcript and not id_problem:
            self.transcript.append(
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {
                            "id": call_id,
                            "type": "function",
                            "function": {"name": name, "arguments": json.dumps(record.input_params, sort_keys=True)},
                        }
                    ],
                }
            )
            self.transcript.append({"role": "tool", "tool_call_id": call_id, "content": tool_reply_text(record)})
        if error is not None:
            raise error
        return output


def call_id_problem(call_id: str) -> str | None:
    """Why a conversation could not store a tool reply to the call `call_id` (an id longer than
    the thread's tool_call_id column), or None."""
    from orchestration.models import AgentPlaygroundMessage

    limit = AgentPlaygroundMessage._meta.get_field("tool_call_id").max_length
    if len(call_id) > limit:
        return f"a tool call id of {len(call_id)} characters (at most {limit})"
    return None


def json_loads_strict(text: str) -> Any:
    """JSON as PostgreSQL's jsonb accepts it: NaN and Infinity are refused (ValueError), as is
    nesting deeper than the parser's recursion limit (a RecursionError would be taken for a
    transient failure and retried)."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not valid JSON")

    try:
        return json.loads(text, parse_constant=refuse)
    except RecursionError:
        raise ValueError("the JSON is nested too deeply to parse") from None


def jsonb_problem(value: Any, where: str = "") -> str | None:
    """Why PostgreSQL's jsonb (and text columns) would refuse a JSON value, or None: a NUL
    character or an unpaired UTF-16 surrogate in a string or a key; or would not keep it: two
    keys of one mapping that JSON writes as one (json.dumps writes 1, True and None as "1",
    "true" and "null", and jsonb keeps the last of a key given twice, the other value lost
    without a word). `where` names the path. For a value json.dumps takes."""

    def text_problem(text: str, at: str) -> str | None:
        if "\x00" in text:
            return f"{at or '(value)'}: contains a NUL character (\\u0000)"
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return f"{at or '(value)'}: contains an unpaired UTF-16 surrogate"
        return None

    stack: list[tuple[Any, str]] = [(value, where)]
    while stack:
        item, at = stack.pop()
        if isinstance(item, str):
            if problem := text_problem(item, at):
                return problem
        elif isinstance(item, dict):
            if not all(isinstance(key, str) for key in item) and (problem := _keys_collide(item, at)):
                return problem
            for key, child in item.items():
                path = f"{at}.{key}" if at else str(key)
                if isinstance(key, str) and (problem := text_problem(key, f"{at or '(value)'} key {key!r}")):
                    return problem
                stack.append((child, path))
        elif isinstance(item, list | tuple):
            stack.extend((child, f"{at}[{i}]") for i, child in enumerate(item))
    return None


def _keys_collide(mapping: dict[Any, Any], at: str) -> str | None:
    """Two keys of `mapping` that are one text in JSON (1 and "1", True and "true"), or None.
    Only a key that is not a string can be written as a string key's text: keys that are not
    strings cannot be written alike (equal numbers, True and 1, are one key of the mapping),
    so a mapping without string keys is not looked at (200 000 integer keys: 300 ms each)."""
    texts = {key for key in mapping if isinstance(key, str)}
    if not texts:
        return None
    for key in mapping:
        if not isinstance(key, str) and (text := json.dumps(key)) in texts:
            where = at or "(value)"
            return f"{where}: keys {key!r} and {text!r} are both {text!r} in JSON (one value would be lost)"
    return None


def storable_text(text: str) -> str:
    """`text` as a PostgreSQL text column takes it: NUL characters and unpaired surrogates
    (which an error page or an exception message may carry) become U+FFFD."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return text
