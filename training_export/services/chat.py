"""Conversations as chat fine-tuning JSONL in OpenAI's format, and a validator of its rules.

One line per conversation thread (`instance_id`):
`{"messages": [...], "tools": [...]}` (no `tools` for an agent without any: OpenAI's API
refuses an empty array) with system/user/assistant/tool messages, assistant
`tool_calls`, tool replies carrying `tool_call_id`, and `weight` on every assistant message:
0 for a turn from a failed or retried attempt (its attempt did not succeed) or marked
`is_error`, else 1.

The system message (unless the thread stores its own) and `tools` are the prompt version
(`AgentPromptVersion`) the thread's last weight-1 assistant turn was generated under, as the
runtime recorded it; an earlier turn recorded under another version (or none) gets weight 0:
it answered another prompt. A thread whose last trained turn has no version (written before
versions were recorded) gets the agent's current `system_prompt` and its tools' schemas from
the tool registry (`orchestration.runtime.tools`), and is counted in the manifest
(`legacy_prompt`). Either way a function called in the thread that the tools do not describe
gets a minimal schema. So a re-export of a window gives the same bytes after an agent or a
tool schema is edited, legacy threads aside.

Everything written is redacted (`training_export.services.redaction`): contents, tool call ids,
names, types and arguments, the system prompt, and the tools, recorded or from the registry,
which are data too (a caller's input.tools may hold a key as a parameter's default, example or
enum value, or in a description). A tool's parameters keep their schema's shape: a parameter
named like a secret (`api_key`) keeps its schema, and only the values it may take are masked.

The format allows no key of ours in an example: each example's join keys (its thread, the
stored message, task and attempt behind each message, and for each tool call id as written the
id the model gave it, with its task and attempt: the keys of its tool_executions row) are a line
of the keys file (`KEYS_FILE`, `example_keys`), in the same order as the examples.

A thread is exported with its history up to the window end, trimmed to its last final
assistant answer (an assistant message without tool calls): anything after it has no
training target. It starts where the history sent to the agent for the first turn it trains
started (CONVERSATION_HISTORY_MESSAGES, as the turn recorded it): the model never saw what
came before. Assistant turns answered before the window's start (followed by an answer
written before it) are in the example as context with weight 0: the file of the window of that
answer, which ends there, trains them, so the files of consecutive windows train each turn
once (a tool call of 23:59:58 answered after midnight is the next day's to train); a
thread with no assistant turn of its own in the window has nothing to train and is skipped
(counted as having no weight-1 assistant message). A thread that still breaks a format rule
is skipped and counted by reason in the manifest rather than written as a line the
fine-tuning API would reject.
"""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter, deque
from collections.abc import Callable, Iterator
from itertools import groupby
from typing import Any

from django.conf import settings

from orchestration.models import AgentPlaygroundMessage, AgentPromptVersion, TaskAttempt
from orchestration.runtime.tools import registry as tool_registry
from training_export.services.jsonl import CHUNK_SIZE, json_line, json_load_exact
from training_export.services.redaction import MASK, Redactor, current_redactor, unique_name
from training_export.services.store import json_dumps_exact

ROLES = ("system", "user", "assistant", "tool")
_ALLOWED_KEYS = {
    "system": {"role", "content", "name"},
    "user": {"role", "content", "name"},
    "assistant": {"role", "content", "name", "tool_calls", "weight"},
    "tool": {"role", "content", "tool_call_id"},
}
_COLUMNS = (
    "instance_id",
    "created_at",
    "message_id",
    "role",
    "content",
    "tool_calls",
    "tool_call_id",
    "is_error",
    "attempt__status",
    "agent__system_prompt",
    "agent__config",
    "metadata__prompt_version",
    "execution_id",
    "attempt__attempt_number",
    "metadata__history_from",
)


# OpenAI's rule for a function's name ("a-z, A-Z, 0-9, or underscores and dashes, with a
# maximum length of 64"): a file naming another one (a model's "functions.calculator", a name
# masked as "[REDACTED]") is refused as a whole.
_FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")


class ChatFormatError(ValueError):
    """A chat example that breaks one of OpenAI's fine-tuning format rules."""


def _fail(reason: str) -> None:
    raise ChatFormatError(reason)


def _check_tool_calls(calls: Any, seen_ids: set[str], tool_names: set[str] | None) -> list[str]:
    if not isinstance(calls, list) or not calls:
        _fail("assistant tool_calls must be a non-empty list")
    ids = []
    for call in calls:
        if not isinstance(call, dict) or set(call) != {"id", "type", "function"}:
            _fail("a tool call must have exactly the keys id, type, function")
        if not isinstance(call["id"], str) or not call["id"]:
            _fail("a tool call id must be a non-empty string")
        if call["id"] in seen_ids:
            _fail(f"tool call id {call['id']!r} is used twice")
        if call["type"] != "function":
            _fail(f"tool call type must be 'function', not {call['type']!r}")
        function = call["function"]
        if not isinstance(function, dict) or set(function) != {"name", "arguments"}:
            _fail("a tool call's function must have exactly the keys name, arguments")
        if not isinstance(function["name"], str) or not function["name"]:
            _fail("a tool call's function name must be a non-empty string")
        if not _FUNCTION_NAME.fullmatch(function["name"]):
            _fail(f"tool call to {function['name'][:80]!r}: a function name is 1-64 letters, digits, _ or -")
        if tool_names is not None and function["name"] not in tool_names:
            _fail(f"tool call to {function['name']!r}, which is not among the example's tools")
        if not isinstance(function["arguments"], str):
            _fail("a tool call's arguments must be a JSON string")
        try:
            json_load_exact(function["arguments"])  # strict: NaN and Infinity are not JSON
        except (ValueError, RecursionError):
            _fail(f"the arguments of tool call {call['id']!r} are not valid JSON")
        seen_ids.add(call["id"])
        ids.append(call["id"])
    return ids


def _check_tools(tools: Any) -> set[str]:
    if not isinstance(tools, list):
        _fail("tools must be a list")
    if not tools:
        # (OpenAI's API refuses an empty `tools` array: an example without tools has no key)
        _fail("tools must not be empty")
    names: set[str] = set()
    for tool in tools:
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            _fail("each tool must be {'type': 'function', 'function': {...}}")
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not name:
            _fail("each tool function needs a name")
        if not _FUNCTION_NAME.fullmatch(name):
            _fail(f"tool {name[:80]!r}: a function name is 1-64 letters, digits, _ or -")
        if name in names:
            _fail(f"tool {name!r} is defined twice")
        parameters = function.get("parameters", {"type": "object"})
        if not isinstance(parameters, dict) or parameters.get("type") != "object":
            _fail(f"the parameters of tool {name!r} must be a JSON schema of type object")
        names.add(name)
    return names


def chat_example_validate(example: Any) -> None:
    """Raise ChatFormatError unless `example` follows OpenAI's chat fine-tuning format:
    known top-level keys, known roles and per-role keys, string contents, a system message
    only first, weights 0/1 on assistant messages only, a non-empty tools list, function names
    of 1-64 letters, digits, `_` or `-`, well-formed tool calls with unique ids and JSON
    arguments, each answered by exactly one tool reply right after it, tool calls only
    to declared tools, and at least one assistant message with weight 1."""
    if not isinstance(example, dict):
        _fail("an example must be a JSON object")
    unknown = set(example) - {"messages", "tools", "parallel_tool_calls"}
    if unknown:
        _fail(f"unknown top-level keys {sorted(unknown)}")
    tool_names = _check_tools(example["tools"]) if "tools" in example else None
    messages = example.get("messages")
    if not isinstance(messages, list) or not messages:
        _fail("messages must be a non-empty list")
    seen_ids: set[str] = set()
    awaiting: list[str] = []
    trained = 0
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            _fail(f"message {index} is not an object")
        role = message.get("role")
        if role not in ROLES:
            _fail(f"message {index} has role {role!r}; expected one of {list(ROLES)}")
        extra = set(message) - _ALLOWED_KEYS[role]
        if extra:
            _fail(f"message {index} ({role}) has unexpected keys {sorted(extra)}")
        if role != "tool" and awaiting:
            _fail(f"message {index}: tool calls {awaiting} have no tool reply")
        content = message.get("content")
        if role == "system" and index != 0:
            _fail(f"message {index}: a system message may only come first")
        if role == "assistant":
            if "tool_calls" in message:
                awaiting = _check_tool_calls(message["tool_calls"], seen_ids, tool_names)
                if content is not None and not isinstance(content, str):
                    _fail(f"message {index}: assistant content must be a string or absent")
            elif not isinstance(content, str) or not content:
                _fail(f"message {index}: an assistant message needs content or tool_calls")
            weight = message.get("weight", 1)
            if weight not in (0, 1) or isinstance(weight, bool):
                _fail(f"message {index}: weight must be 0 or 1")
            trained += weight
        else:
            if not isinstance(content, str):
                _fail(f"message {index} ({role}): content must be a string")
            if role == "tool":
                call_id = message.get("tool_call_id")
                if call_id not in awaiting:
                    _fail(f"message {index}: tool reply to {call_id!r}, which no preceding tool call awaits")
                awaiting.remove(call_id)
    if awaiting:
        _fail(f"tool calls {awaiting} have no tool reply")
    if not trained:
        _fail("no assistant message with weight 1")


def _minimal_tool(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}


# JSON-schema keywords whose value is a schema (or a list of them), and those whose value maps
# names to schemas: a tool's parameter names, which are data, and which make what their schema
# holds secret when they name one ("api_key", "password").
_SUBSCHEMAS = frozenset(
    {
        "additionalItems",
        "additionalProperties",
        "allOf",
        "anyOf",
        "contains",
        "contentSchema",
        "else",
        "if",
        "items",
        "not",
        "oneOf",
        "prefixItems",
        "propertyNames",
        "then",
        "unevaluatedItems",
        "unevaluatedProperties",
    }
)
_SUBSCHEMA_MAPS = frozenset({"$defs", "definitions", "dependentSchemas", "patternProperties", "properties"})
# Keywords whose value is a value of the parameter itself.
_INSTANCES = frozenset({"const", "default", "enum", "example", "examples"})
# Keywords whose value describes the parameter (a type, a bound, a text for the reader, names
# of parameters). Any other keyword of a secret parameter (`x-default`, `x-example`: vendor
# extensions) may hold a value it takes, and is masked as the instances are.
_DESCRIPTIVE = frozenset(
    {
        "$anchor",
        "$comment",
        "$dynamicAnchor",
        "$dynamicRef",
        "$id",
        "$ref",
        "$schema",
        "$vocabulary",
        "contentEncoding",
        "contentMediaType",
        "dependentRequired",
        "dependencies",
        "deprecated",
        "description",
        "exclusiveMaximum",
        "exclusiveMinimum",
        "format",
        "maxContains",
        "maxItems",
        "maxLength",
        "maxProperties",
        "maximum",
        "minContains",
        "minItems",
        "minLength",
        "minProperties",
        "minimum",
        "multipleOf",
        "nullable",
        "pattern",
        "readOnly",
        "required",
        "title",
        "type",
        "uniqueItems",
        "writeOnly",
    }
)


def _masked(value: Any) -> Any:
    """A value of a secret parameter: masked whatever it looks like, a list keeping its length
    (an enum stays a list)."""
    if isinstance(value, list):
        return [_masked(item) for item in value]
    return None if value is None else MASK


def _schema(
    schema: Any, redactor: Redactor, *, secret: bool = False, defs: frozenset[tuple[str, str]] = frozenset()
) -> Any:
    """A tool's parameters schema with its data redacted and its shape kept. Redacting it as
    any JSON value would mask the whole schema of a parameter named `password` or `api_key`
    (REDACT_KEYS) and leave a schema the fine-tuning API rejects; here parameter names are
    redacted as text (`required` names them as written), and the values a secret parameter may
    take (default, const, enum, examples, in the definitions its `$ref` leads to too: `defs`, of
    the root, and any keyword the schema does not describe it with, such as `x-default`) are
    masked whatever they look like. `dependentRequired` names parameters as `required` does.
    Everything else (descriptions, titles, the values of other parameters, their unknown
    keywords) is redacted as any JSON value."""
    if isinstance(schema, list):
        return [_schema(item, redactor, secret=secret) for item in schema]
    if not isinstance(schema, dict):
        # (a string where a secret parameter's schema should be is its value)
        return MASK if secret and isinstance(schema, str) else redactor.value(schema)
    out: dict[str, Any] = {}
    written: dict[str, str] = {}  # a parameter's name (`properties`) as written
    for keyword, value in schema.items():
        if keyword in _SUBSCHEMA_MAPS and isinstance(value, dict):
            schemas: dict[str, Any] = {}
            for name, item in value.items():
                masked = redactor.text(str(name))
                if masked in schemas:
                    masked = unique_name(masked, schemas)
                if keyword == "properties":
                    written[str(name)] = masked
                hidden = secret or redactor.key_is_secret(str(name)) or (keyword, str(name)) in defs
                schemas[masked] = _schema(item, redactor, secret=hidden)
            out[keyword] = schemas
        elif keyword in _SUBSCHEMAS:
            out[keyword] = _schema(value, redactor, secret=secret)
        elif keyword in _INSTANCES or (secret and keyword not in _DESCRIPTIVE):
            out[keyword] = _masked(value) if secret else redactor.value(value)
        else:
            out.update(redactor.value({keyword: value}))

    def as_written(name: Any) -> Any:
        # Two names masked alike were told apart: a name is written as the properties write it.
        return written.get(name, redactor.text(name)) if isinstance(name, str) else name

    required = schema.get("required")
    if written and isinstance(required, list):
        out["required"] = [as_written(item) for item in required]
    # Names, not values: redacted as a value, the list under a secret name ("api_key") would be
    # masked into a string, a schema the fine-tuning API rejects. `dependencies` (before
    # draft 2019-09, still in 2020-12's meta-schema) maps a name to names or to a schema.
    for keyword, shapes in (("dependentRequired", list), ("dependencies", list | dict | bool)):
        dependent = schema.get(keyword)
        if not isinstance(dependent, dict) or not all(isinstance(item, shapes) for item in dependent.values()):
            continue
        out[keyword] = {}
        for key, item in dependent.items():
            masked = as_written(str(key))
            if masked in out[keyword]:
                masked = unique_name(masked, out[keyword])
            out[keyword][masked] = (
                [as_written(name) for name in item]
                if isinstance(item, list)
                else _schema(item, redactor, secret=secret)
            )
    return out


_DEFS = frozenset({"$defs", "definitions"})


def _refs(schema: Any, redactor: Redactor, secret: bool, found: set[tuple[str, str]]) -> None:
    """Add to `found` the root definitions (keyword, name) that a `$ref` in a secret part of
    `schema` leads to (parts as `_schema` tells them secret)."""
    if isinstance(schema, list):
        for item in schema:
            _refs(item, redactor, secret, found)
    if not isinstance(schema, dict):
        return
    for keyword, value in schema.items():
        if keyword == "$ref" and secret and isinstance(value, str):
            parts = value.split("/")
            if len(parts) == 3 and parts[0] == "#" and parts[1] in _DEFS:
                found.add((parts[1], parts[2].replace("~1", "/").replace("~0", "~")))
        elif keyword in _SUBSCHEMA_MAPS and isinstance(value, dict):
            for name, item in value.items():
                _refs(item, redactor, secret or redactor.key_is_secret(str(name)), found)
        elif keyword in _SUBSCHEMAS:
            _refs(value, redactor, secret, found)


def _secret_defs(schema: Any, redactor: Redactor) -> frozenset[tuple[str, str]]:
    """The root definitions a secret parameter refers to, directly or through other ones."""
    found: set[tuple[str, str]] = set()
    _refs(schema, redactor, False, found)
    pending = list(found)
    while pending and isinstance(schema, dict):
        keyword, name = pending.pop()
        definitions = schema.get(keyword)
        if isinstance(definitions, dict) and name in definitions:
            more: set[tuple[str, str]] = set()
            _refs(definitions[name], redactor, True, more)
            pending += more - found
            found |= more
    return frozenset(found)


def _tool(tool: Any, redactor: Redactor) -> Any:
    """A tool as written to a file: its parameters through `_schema`, everything else (name,
    description, other keys) redacted as any JSON value. What is not a function tool (input.tools
    also takes a bare `{"name": ...}`) is redacted as any JSON value, for the validator to name."""
    if not isinstance(tool, dict) or not isinstance(tool.get("function"), dict):
        return redactor.value(tool)
    function = tool["function"]
    out = redactor.value({key: value for key, value in tool.items() if key != "function"})
    out["function"] = redactor.value({key: value for key, value in function.items() if key != "parameters"})
    if "parameters" in function:
        parameters = function["parameters"]
        out["function"]["parameters"] = _schema(parameters, redactor, defs=_secret_defs(parameters, redactor))
    return out


def _tools(
    agent_config: Any, called: list[str], redactor: Redactor, cache: dict[Any, Any] | None = None
) -> list[dict[str, Any]]:
    """The agent's tools as the registry describes them (redacted: a schema in code may hold a
    default or an example), plus any function called in the thread that the registry does not
    know (a tool since removed): a minimal schema. `called` is already redacted; a configured
    name the registry does not know is data and redacted too. `cache` keeps a registry tool
    redacted for the next thread of the export."""
    known = tool_registry()
    configured = agent_config.get("tools", []) if isinstance(agent_config, dict) else []
    names = {name if name in known else redactor.text(name) for name in map(str, configured)} | set(called)
    cache = {} if cache is None else cache
    tools = []
    for name in sorted(names):
        if name not in known:
            tools.append(_minimal_tool(name))
            continue
        if ("registry", name) not in cache:
            cache["registry", name] = _tool(known[name].schema(), redactor)
        tools.append(cache["registry", name])
    return tools


def _redacted_tools(tools: Any, redactor: Redactor) -> Any:
    """A recorded version's tools, redacted (they are data: a caller's input.tools may hold a key
    as a default, an example or an enum value, or in a description)."""
    if not isinstance(tools, list):
        return redactor.value(tools)
    return [_tool(tool, redactor) for tool in tools]


def _with_called(tools: Any, called: list[str]) -> Any:
    """A recorded version's tools as they were sent (`_redacted_tools`), plus a minimal schema
    for each function called in the thread that they do not describe. Tools that are not a list
    are left to the validator."""
    if not isinstance(tools, list):
        return tools
    functions = [tool.get("function") for tool in tools if isinstance(tool, dict)]
    names = {function.get("name") for function in functions if isinstance(function, dict)}
    return [*tools, *(_minimal_tool(name) for name in called if name not in names)]


def _redacted(value: Any, redactor: Redactor) -> Any:
    return redactor.text(value) if isinstance(value, str) else value


# A lone surrogate: JSON text may escape one (`"\\ud800"`, a model's emoji cut in half), Python's
# parser reads it as such, and no UTF-8 file can hold it.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _json_text(value: Any, *, separators: tuple[str, str] = (",", ":")) -> str:
    """`json_dumps_exact` of a value parsed from JSON text, with each lone surrogate written back
    as the escape it was read from: written as a character, it would fail the whole export (the
    line cannot be encoded as UTF-8), in this window and in every later one the thread's history
    reaches. Pairs were read as one character; what is left is lone."""
    text = json_dumps_exact(value, separators=separators)
    return _LONE_SURROGATE.sub(lambda match: f"\\u{ord(match[0]):04x}", text)


def _content(text: str, redactor: Redactor) -> str:
    """A message's content, redacted. A content that is a JSON object or array (every tool
    reply is the tool's JSON result) gets what JSON values get, the values under secret keys
    masked too; it keeps its text unless that changes something."""
    if text[:1] in ("{", "[") or text.lstrip()[:1] in ("{", "["):
        try:
            parsed = json_load_exact(text)
        except (ValueError, RecursionError):
            parsed = None
        if isinstance(parsed, dict | list):
            redacted = redactor.value(parsed)
            if redacted != parsed:
                return _json_text(redacted, separators=(", ", ": "))
    return redactor.text(text)


def _arguments(text: Any, redactor: Redactor) -> str:
    """A tool call's arguments, redacted, as compact JSON text with every number as written
    (`1e400` is not made Infinity, nor a long integer rounded). Text that is not JSON (NaN or
    Infinity included) is kept, redacted, and the validator skips its example."""
    if not isinstance(text, str):
        text = json_dumps_exact(text)
    try:
        parsed = json_load_exact(text)
    except (ValueError, RecursionError):
        return redactor.text(text)
    return _json_text(redactor.value(parsed))


def _tool_calls(calls: Any, redactor: Redactor) -> list[dict[str, Any]]:
    out = []
    for call in calls if isinstance(calls, list) else []:
        function = call.get("function") or {} if isinstance(call, dict) else {}
        out.append(
            {
                "id": _redacted(call.get("id"), redactor) if isinstance(call, dict) else None,
                # (redacted too: the validator quotes a wrong one in the manifest's skip reasons)
                "type": _redacted(call.get("type", "function"), redactor) if isinstance(call, dict) else None,
                "function": {
                    "name": _redacted(function.get("name"), redactor),
                    "arguments": _arguments(function.get("arguments"), redactor),
                },
            }
        )
    return out


_GOOD_ATTEMPT = {None, TaskAttempt.Status.SUCCEEDED}
# What `conversation_example` leaves out of a thread, as the manifest names it.
EMPTY_REPLY = "empty assistant message"


PromptLookup = Callable[[str], tuple[str, list[dict[str, Any]]] | None]


def conversation_example(
    rows: list[tuple[Any, ...]],
    redactor: Redactor,
    prompt_version: PromptLookup,
    *,
    since: dt.datetime | None = None,
    tools_cache: dict[Any, Any] | None = None,
    left_out: Counter[str] | None = None,
    keys: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], bool]:
    """The chat example of one thread's messages (rows in `_COLUMNS` order, oldest first), and
    whether its prompt is the recorded one (False: the agent's current one, a legacy thread).
    `prompt_version` gives a version's system prompt and tools, None for an unknown key.
    Assistant turns answered before `since` (the window's start) are context, weight 0: the
    export of the window of their answer trains them, so consecutive windows' files train each
    turn once (`_context_before`). `tools_cache` (one per export) keeps the tools redacted for
    the next thread under the same version or with the same registry tools: a window's threads
    share a few, and redacting a version's schemas costs more than a thread's messages. An assistant message
    with neither content nor tool calls (a model that answered "") is left out, and counted in
    `left_out`: it has nothing to train or to show as context, and the format refuses it (the
    whole thread would be skipped, in its own window and every later one, its history).
    `keys` is filled with the example's join keys (`example_keys`)."""
    messages: list[dict[str, Any]] = []
    sources: list[dict[str, Any]] = []  # of each message: the row it came from (`example_keys`)
    versions: list[str | None] = []  # of each message, for its assistant turns
    times: list[dt.datetime] = []  # of each message
    # Of each message: its id and, for a turn, where the history its agent was sent began; how
    # many messages up to it a history holds (the window of turns recorded before that was).
    ids: list[str] = []
    sent_from: list[str | None] = []
    sent_counts: list[int] = []
    sent = 0
    system_prompt = ""
    agent_config: Any = None
    has_system = False
    for row in rows:
        record = dict(zip(_COLUMNS, row, strict=True))
        if agent_config is None and record["agent__config"] is not None:
            # The thread's agent: the first message that names one.
            agent_config = record["agent__config"]
            system_prompt = record["agent__system_prompt"] or ""
        role = record["role"]
        # What conversation_history sends the agent: no error message, no message of an attempt
        # that did not succeed (an empty reply counts, left out below or not).
        sent += not record["is_error"] and record["attempt__status"] in _GOOD_ATTEMPT
        content = _content(record["content"] or "", redactor)
        if role == "assistant" and not content and not record["tool_calls"]:
            if left_out is not None:
                left_out[EMPTY_REPLY] += 1
            continue
        if role == "assistant":
            message: dict[str, Any] = {"role": "assistant"}
            if content or not record["tool_calls"]:
                message["content"] = content
            if record["tool_calls"]:
                message["tool_calls"] = _tool_calls(record["tool_calls"], redactor)
            good = not record["is_error"] and record["attempt__status"] in _GOOD_ATTEMPT
            message["weight"] = 1 if good else 0
        elif role == "tool":
            message = {
                "role": "tool",
                "tool_call_id": _redacted(record["tool_call_id"], redactor),
                "content": content,
            }
        elif role == "system":
            if messages:
                continue  # only one system message, first; a later one would break the format
            has_system = True
            message = {"role": "system", "content": content}
        else:
            message = {"role": "user", "content": content}
        messages.append(message)
        sources.append(
            {
                "message_id": _redacted(record["message_id"], redactor),
                "execution_id": _redacted(record["execution_id"], redactor),
                "attempt_number": record["attempt__attempt_number"],
            }
        )
        versions.append(record["metadata__prompt_version"])
        times.append(record["created_at"])
        ids.append(record["message_id"])
        sent_from.append(record["metadata__history_from"])
        sent_counts.append(sent)
    last_answer = max(
        (i for i, m in enumerate(messages) if m["role"] == "assistant" and "tool_calls" not in m), default=None
    )
    messages = messages[: last_answer + 1] if last_answer is not None else []
    sources = sources[: len(messages)]
    if since is not None:
        _context_before(messages, times, since)
    trained = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m["weight"]]
    version = versions[trained[-1]] if trained else None
    recorded = prompt_version(version) if isinstance(version, str) else None
    if recorded is not None:
        for i in trained:
            if versions[i] != version:
                messages[i]["weight"] = 0
    # Found once the turns under another prompt are context: cut at the history of the first of
    # those, the example held what the turns it trains were never sent.
    first = _sent_window(messages, ids, sent_from, sent_counts)
    messages, sources = messages[first:], sources[first:]
    called = [
        call["function"]["name"] for m in messages for call in m.get("tool_calls", []) if call["function"]["name"]
    ]
    if recorded is not None:
        cache = {} if tools_cache is None else tools_cache
        if ("version", version) not in cache:
            cache["version", version] = _redacted_tools(recorded[1], redactor)
        system_prompt, tools = recorded[0], _with_called(cache["version", version], sorted(set(called)))
    else:
        tools = _tools(agent_config, sorted(set(called)), redactor, tools_cache)
    if not has_system and system_prompt and messages:
        messages.insert(0, {"role": "system", "content": _content(system_prompt, redactor)})
        sources.insert(0, {"message_id": None, "execution_id": None, "attempt_number": None})
    recorded_ids = [[call["id"] for call in m.get("tool_calls", [])] for m in messages]
    _unique_call_ids(messages)
    if keys is not None:
        keys.update(example_keys(rows[0][0] if rows else None, messages, sources, recorded_ids, redactor))
    # An agent without tools: no `tools` key (OpenAI's API refuses an empty array).
    example = {"messages": messages, "tools": tools} if tools != [] else {"messages": messages}
    return example, recorded is not None


def example_keys(
    instance_id: str | None,
    messages: list[dict[str, Any]],
    sources: list[dict[str, Any]],
    recorded_ids: list[list[Any]],
    redactor: Redactor,
) -> dict[str, Any]:
    """The join keys of one example, a line of the keys file beside the data file (the chat
    format allows no key of ours in the example itself): the thread (`instance_id`); for each
    message, in the example's order, the stored message it is (`message_id`, None for the system
    prompt the export adds), the reply task (`execution_id`; a user's message names the task
    that answers it) and the attempt that wrote it (`attempt_number`, None for a user's message);
    and for each tool call id as the example
    writes it (renamed `<id>-1`, ... when the thread repeats one), the id the model gave it
    (`tool_call_id`) with the task and attempt that made the call: the keys of its row in the
    tool_executions export. All as redacted as the export's other values."""
    calls = {}
    for message, source, recorded in zip(messages, sources, recorded_ids, strict=True):
        for call, original in zip(message.get("tool_calls", []), recorded, strict=True):
            if isinstance(call["id"], str):
                calls[call["id"]] = {
                    "tool_call_id": original,
                    "execution_id": source["execution_id"],
                    "attempt_number": source["attempt_number"],
                }
    return {"instance_id": _redacted(instance_id, redactor), "messages": sources, "tool_calls": calls}


def _sent_window(
    messages: list[dict[str, Any]], ids: list[str], sent_from: list[str | None], sent_counts: list[int]
) -> int:
    """Where the example starts: at the history the agent was sent for the first turn it trains
    (conversation_history: the last CONVERSATION_HISTORY_MESSAGES of the thread up to the
    question, from a user message on). What came before, the model never saw when it answered,
    and a thread's every later file would repeat it all. Later turns of the example were sent
    windows that start later; what lies between is context of weight 0, as the failed attempts'
    messages are. The turn names the history's first message (`history_from`); for a turn
    recorded before it did, the window is worked out under the current setting. Of each
    message: `ids`, `sent_from` (its turn's `history_from`), `sent_counts` (how many messages
    up to it a history holds: error messages and failed attempts' messages are never sent)."""
    trained = next((i for i, m in enumerate(messages) if m["role"] == "assistant" and m["weight"]), None)
    if trained is None:
        return 0
    question = next((i for i in range(trained, -1, -1) if messages[i]["role"] == "user"), None)
    if question is None:
        return 0
    if sent_from[trained] in ids[: question + 1]:
        return ids.index(sent_from[trained])
    # The history's oldest message is the first whose count passes the question's, less the limit.
    oldest = sent_counts[question] - settings.CONVERSATION_HISTORY_MESSAGES
    start = next(i for i in range(question + 1) if sent_counts[i] > oldest)
    return next(i for i in range(start, question + 1) if messages[i]["role"] == "user")


def _context_before(messages: list[dict[str, Any]], times: list[dt.datetime], since: dt.datetime) -> None:
    """Weight 0 for the assistant turns the file of an earlier window trained: those closed by an
    answer (an assistant message without tool calls) written before `since`, the earlier file
    ending at its thread's last answer. A turn answered only from `since` on (a tool call at
    23:59:58 whose answer came at 00:00:01) was left out of that file, and is this one's to train.
    `messages` end with an answer; `times` are their created_at."""
    answered_at = None
    for message, at in zip(reversed(messages), reversed(times[: len(messages)]), strict=True):
        if message["role"] != "assistant":
            continue
        if "tool_calls" not in message:
            answered_at = at
        if answered_at < since:
            message["weight"] = 0


def _unique_call_ids(messages: list[dict[str, Any]]) -> None:
    """Give a tool call whose id an earlier call of the example already has another one (the
    id, "-1", "-2", ...) and its tool reply the same: some OpenAI-compatible servers number
    each answer's calls from zero, and an example with one id twice breaks the format. The
    replies after an assistant message answer its calls, in order for an id it repeats. The
    same thread gives the same ids, so a re-export is byte-identical."""
    seen: set[str] = set()
    turn: dict[str, deque[str]] = {}
    for message in messages:
        if message["role"] == "assistant":
            turn = {}
            for call in message.get("tool_calls", []):
                original = call["id"]
                if not isinstance(original, str):
                    continue  # the validator names it
                unique, n = original, 0
                while unique in seen:
                    n += 1
                    unique = f"{original}-{n}"
                seen.add(unique)
                call["id"] = unique
                turn.setdefault(original, deque()).append(unique)
        elif message["role"] == "tool" and turn.get(message["tool_call_id"]):
            message["tool_call_id"] = turn[message["tool_call_id"]].popleft()


def _thread_rows(start: dt.datetime, end: dt.datetime) -> Iterator[tuple[Any, ...]]:
    active = (
        AgentPlaygroundMessage.objects.filter(created_at__gte=start, created_at__lt=end)
        .values("instance_id")
        .distinct()
    )
    return (
        AgentPlaygroundMessage.objects.filter(instance_id__in=active, created_at__lt=end)
        .order_by("instance_id", "created_at", "message_id")
        .values_list(*_COLUMNS)
        .iterator(chunk_size=CHUNK_SIZE)
    )


def _prompt_versions() -> PromptLookup:
    """Prompt versions by key, each read once (a window's threads share a few)."""
    cache: dict[str, tuple[str, list[dict[str, Any]]] | None] = {}

    def lookup(sha256: str) -> tuple[str, list[dict[str, Any]]] | None:
        if sha256 not in cache:
            cache[sha256] = AgentPromptVersion.objects.filter(pk=sha256).values_list("system_prompt", "tools").first()
        return cache[sha256]

    return lookup


KEYS_FILE = "conversations-keys.jsonl"


class ChatExporter:
    """The conversations exporter (same interface as jsonl.Exporter, plus skip counts and the
    keys file: `keys_lines` holds the keys line of each example `lines` yielded, in order, for
    the caller to take as it writes them)."""

    data_type = "conversations"
    keys_file = KEYS_FILE

    def __init__(self) -> None:
        self.keys_lines: list[bytes] = []
        self.skipped: Counter[str] = Counter()
        self.legacy_prompt = 0
        """Examples written with the agent's current prompt and tools (no recorded version)."""
        self.left_out: Counter[str] = Counter()
        """Messages left out of the examples written, by reason (see `conversation_example`)."""

    def count(self, start: dt.datetime, end: dt.datetime) -> int:
        return (
            AgentPlaygroundMessage.objects.filter(created_at__gte=start, created_at__lt=end)
            .values("instance_id")
            .distinct()
            .count()
        )

    def watermark(self, start: dt.datetime, end: dt.datetime) -> str:
        from django.db.models import Max

        highest = AgentPlaygroundMessage.objects.filter(created_at__gte=start, created_at__lt=end).aggregate(
            highest=Max("created_at")
        )["highest"]
        return f"created_at:{'' if highest is None else highest.astimezone(dt.UTC).isoformat()}"

    def lines(self, start: dt.datetime, end: dt.datetime) -> Iterator[bytes]:
        redactor = current_redactor()
        prompt_version = _prompt_versions()
        tools_cache: dict[Any, Any] = {}
        for _thread, rows in groupby(_thread_rows(start, end), key=lambda row: row[0]):
            left_out: Counter[str] = Counter()
            keys: dict[str, Any] = {}
            example, recorded = conversation_example(
                list(rows),
                redactor,
                prompt_version,
                since=start,
                tools_cache=tools_cache,
                left_out=left_out,
                keys=keys,
            )
            try:
                chat_example_validate(example)
            except ChatFormatError as exc:
                self.skipped[str(exc)] += 1
                continue
            self.legacy_prompt += not recorded
            self.left_out.update(left_out)
            self.keys_lines.append(json_line(keys))
            yield json_line(example)
