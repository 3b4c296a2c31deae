"""The `llm` executor: one chat-completion request per try, spoken directly over HTTP.

Providers (agent.provider):
- "openai" (the default) and any OpenAI-compatible server (Ollama, vLLM, LM Studio):
  POST {agent.url or https://api.openai.com/v1}/chat/completions.
- "anthropic": POST {agent.url or https://api.anthropic.com}/v1/messages.

The API key is read from the environment variable named by agent.api_key_env at call time;
it is never stored, logged or put in an error message (answers quoted in errors have it
redacted). Tool calling: the tools of the agent's definition (config.tools, see tools.py)
are offered to the model, run when it calls them (each call recorded) and their results
sent back, up to LLM_MAX_TOOL_ROUNDS rounds of at most LLM_MAX_TOOL_CALLS_PER_ANSWER calls
each (an answer with more fails the attempt, none of its calls run, as does one cut off at the
output token limit while it calls tools); tools given in
`input["tools"]` are offered too, but a call of one of those ends the attempt with the calls
in the output, for the caller to run. In a conversation the thread's history is sent instead of the input.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from config.env import DEFAULT_PORTS, Origin, env, host_normalize, origin_parse
from observability.logs import secret_register
from orchestration.errors import AgentError, PermanentError, RetryableError, ToolError
from orchestration.models import Agent
from orchestration.runtime import pricing
from orchestration.runtime.context import AgentResult, TaskContext, Usage
from orchestration.runtime.http_agent import (
    SNIPPET_CHARS,
    Reply,
    post_json,
    read_timeout_for,
    retry_after_seconds,
    status_error,
    with_usage,
)
from orchestration.runtime.tools import call_id_problem, json_loads_strict, jsonb_problem
from orchestration.runtime.urlpolicy import url_check

OPENAI_DEFAULT_BASE = "https://api.openai.com/v1"
ANTHROPIC_DEFAULT_BASE = "https://api.anthropic.com"
ANTHROPIC_VERSION = "2023-06-01"
ANTHROPIC_DEFAULT_MAX_TOKENS = 1024
OPENAI_COMPATIBLE = {"", "openai", "openai-compatible", "ollama", "vllm", "lmstudio", "lm-studio"}
# OpenAI's reasoning models (o1, o3-mini, o4-mini, gpt-5, ...) refuse max_tokens with a 400
# ("Use 'max_completion_tokens' instead"): their limit also bounds the reasoning tokens. So do
# the models fine-tuned from them, named `ft:<base model>:<org>:<suffix>:<id>`.
OPENAI_REASONING_MODEL = re.compile(r"^(ft:)?(o[1-9]|gpt-5)")
# Why an answer stopped when the model's output ran into its token limit (OpenAI's "length",
# Anthropic's "max_tokens", or its context window): a tool call in it may be cut off.
TRUNCATED_FINISH_REASONS = {"length", "max_tokens", "model_context_window_exceeded"}
# \Z, not $: "$" also matches before a trailing newline ("OPENAI_API_KEY\n" would pass).
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
CONVENTIONAL_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*\Z")
# What a key may hold to be sent as a header value: visible ASCII. Anything else fails in the
# HTTP client with an error quoting the header, key and all, escaped past the redaction.
HEADER_SAFE_KEY = re.compile(r"[\x21-\x7e]+\Z")


def api_key_env_problem(name: str) -> str | None:
    """Why an agent may not read its API key from the environment variable `name`, or None.

    The key is sent to the agent's URL, which an admin may choose: only variables that
    AGENT_API_KEY_ENV_ALLOWED admits are read, never one of the platform's own settings
    (DATABASE_URL, SECRET_KEY, ...). The name is not echoed: a key pasted in its place by
    mistake must not reach an error record."""
    if not ENV_NAME.match(name):
        return "api_key_env is not a valid environment variable name (such as OPENAI_API_KEY)"
    if name in env.configuration_names():
        return "api_key_env names one of the platform's own settings, which agents may not read"
    allowed = settings.AGENT_API_KEY_ENV_ALLOWED
    if not any(fnmatch.fnmatchcase(name, pattern) for pattern in allowed):
        return "api_key_env names a variable agents may not read: AGENT_API_KEY_ENV_ALLOWED admits " + (
            ", ".join(allowed) if allowed else "none"
        )
    return None


def provider_host(provider: str | None) -> str:
    """The provider's own API host: its key may always be sent there."""
    return "api.anthropic.com" if (provider or "").lower() == "anthropic" else "api.openai.com"


def _parsed_host(url: str) -> tuple[str, str, int | None, bool] | None:
    """(scheme, host, port, has_userinfo) of `url` as httpx, which sends the request, reads
    it (urlsplit disagrees with it on backslashes, for one); None if httpx refuses it. The
    host is the one looked up and sent (an internationalized name in its xn-- form), compared
    as origins compare hosts (host_normalize); the port is None when it is the default."""
    import httpx  # here, not at module level: see http_agent's note on its import

    try:
        parsed = httpx.URL(url)
        host = parsed.raw_host.decode("ascii")
    except (httpx.InvalidURL, TypeError, UnicodeDecodeError):
        return None
    return parsed.scheme, host_normalize(host), parsed.port, bool(parsed.userinfo)


def is_provider_url(url: str, provider: str | None) -> bool:
    """Whether `url` is on the provider's own API host: https, its default port, no userinfo
    (whatever the case of the host, with or without a path)."""
    parts = _parsed_host(url)
    return parts is not None and parts == ("https", provider_host(provider), None, False)


def key_origins() -> set[Origin]:
    """The origins AGENT_API_KEY_HOSTS lists (checked when the settings load)."""
    try:
        return {origin_parse(entry) for entry in settings.AGENT_API_KEY_HOSTS}
    except ValueError as exc:
        raise ImproperlyConfigured(f"AGENT_API_KEY_HOSTS: an entry {exc}") from None


def key_host_problem(url: str, provider: str | None) -> str | None:
    """Why an agent's API key may not be sent to `url`, or None.

    A key goes to its provider's own API host, or to an origin the operator listed in
    AGENT_API_KEY_HOSTS (a bare host name there admits https on port 443 only, as the
    providers' hosts): an admin who may create agents through the API chooses the URL, and
    an agent naming the deployment's OPENAI_API_KEY with a URL of their own would otherwise
    hand them the key. (Where any agent may connect at all is AGENT_HTTP_ALLOWED_HOSTS' and
    the address rules' business, applied as well.) The URL is read as httpx reads it when
    the request is made; the message names its origin, never its userinfo or path."""
    if is_provider_url(url, provider):
        return None
    refusal = (
        f"its API key is sent only to the provider's own host ({provider_host(provider)}) "
        "or to an origin listed in AGENT_API_KEY_HOSTS"
    )
    parts = _parsed_host(url)
    if parts is None or parts[0] not in DEFAULT_PORTS or not parts[1]:
        return f"{refusal}, and this URL is neither"
    scheme, host, port, has_userinfo = parts
    if has_userinfo:
        return f"{refusal}, and a URL with userinfo (user@) is neither"
    origin = Origin(scheme, host, port if port is not None else DEFAULT_PORTS[scheme])
    if origin in key_origins():
        return None
    if scheme == "https" and port is None:
        shown, reasons = str(origin).removeprefix("https://").removesuffix(":443"), ["to it"]
    else:
        shown = str(origin)
        reasons = (["over http"] if scheme == "http" else []) + ([f"to port {port}"] if port is not None else [])
    return f"{refusal}, and {shown} is neither: list {shown} in AGENT_API_KEY_HOSTS to send the key {' '.join(reasons)}"


def _api_key(agent: Agent, *, required: bool) -> str | None:
    name = agent.api_key_env
    if not name:
        if required:
            raise PermanentError(f"agent {agent.id!r} needs an API key: set api_key_env in its definition")
        return None
    problem = api_key_env_problem(name)
    if problem is not None:
        raise PermanentError(f"agent {agent.id!r}: {problem}")
    key = env.agent_secret(name)
    if key is None:
        # Named when it reads like a variable (upper case, as the default patterns are): with
        # patterns wider than those, a key pasted into api_key_env could pass them.
        named = name if CONVENTIONAL_ENV_NAME.match(name) else "that api_key_env names"
        raise PermanentError(f"agent {agent.id!r}: the API key variable {named} is not set")
    secret_register(key)  # this process's log lines mask it from now on, whatever logs it
    if not HEADER_SAFE_KEY.match(key):
        raise PermanentError(
            f"agent {agent.id!r}: the API key holds a character a header cannot carry (a space, a line "
            "break, a control or non-ASCII character); check the variable's value"
        )
    return key


def user_message(task_input: dict[str, Any], upstream: dict[str, Any]) -> str:
    """input["prompt"] when given, else the input as JSON; then the upstream outputs."""
    prompt = task_input.get("prompt")
    if isinstance(prompt, str) and prompt:
        text = prompt
    else:
        rest = {k: v for k, v in task_input.items() if k != "tools"}
        text = json.dumps(rest, indent=2, sort_keys=True, ensure_ascii=False)
    if upstream:
        rendered = json.dumps(upstream, indent=2, sort_keys=True, ensure_ascii=False)
        text += f"\n\nOutputs of the tasks this one depends on:\n{rendered}"
    return text


def _tools(task_input: dict[str, Any]) -> list[dict[str, Any]] | None:
    tools = task_input.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise PermanentError("input.tools must be a list of tool objects (OpenAI function-tool schema)")
    for i, tool in enumerate(tools):
        function = tool.get("function", tool)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise PermanentError(f"input.tools[{i}]: needs a function object with a name")
    return tools or None


def _tool_name(tool: dict[str, Any]) -> str:
    return tool.get("function", tool)["name"]


def _tokens(mapping: dict[str, Any], key: str, what: str, *, strict: bool) -> int:
    value = mapping.get(key) or 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        if not strict:
            return 0
        raise PermanentError(f"{what}: usage.{key} must be a non-negative integer, got {value!r}")
    return value


def _usage(reply: Reply, body: Any, *, anthropic: bool, model: str, fallback_model: str, what: str) -> Usage:
    """The usage the provider reported (an error answer's malformed usage counts as none),
    every prompt token counted as input and those its prompt cache served or stored priced
    as it bills them."""
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return Usage()
    strict = 200 <= reply.status < 300
    if anthropic:
        # Anthropic's input_tokens leaves out the prompt tokens read from its cache and those
        # written to it: each is reported (and billed, at its own rate) beside it.
        written = _tokens(usage, "cache_creation_input_tokens", what, strict=strict)
        cached = _tokens(usage, "cache_read_input_tokens", what, strict=strict)
        input_tokens = _tokens(usage, "input_tokens", what, strict=strict) + written + cached
        output_tokens = _tokens(usage, "output_tokens", what, strict=strict)
        # Of the tokens written, those written to the 1-hour cache are billed at twice the input
        # price (the 5-minute cache's at 1.25 times). A detail: unreadable, they are 5-minute ones.
        creation = usage.get("cache_creation")
        written_1h = (
            _tokens(creation, "ephemeral_1h_input_tokens", what, strict=False) if isinstance(creation, dict) else 0
        )
    else:
        # OpenAI caches long prompts by itself: prompt_tokens includes the tokens its cache
        # served, billed at the cached-input price. (Reasoning tokens are part of
        # completion_tokens, billed as output.)
        input_tokens = _tokens(usage, "prompt_tokens", what, strict=strict)
        output_tokens = _tokens(usage, "completion_tokens", what, strict=strict)
        details = usage.get("prompt_tokens_details")
        # A detail, not a count of its own: unreadable, those tokens are priced as input.
        cached = _tokens(details, "cached_tokens", what, strict=False) if isinstance(details, dict) else 0
        written = written_1h = 0
    # Providers answer with a dated snapshot name ("gpt-4o-mini-2024-07-18"); the table
    # lists the common ones as aliases, else the requested model's price applies.
    priced = model if pricing.is_priced(model) else fallback_model
    cost = pricing.cost_usd(
        priced,
        input_tokens,
        output_tokens,
        cached_input_tokens=cached,
        cache_write_tokens=written,
        cache_write_1h_tokens=written_1h,
    )
    return Usage(input_tokens, output_tokens, cost)


def _body(reply: Reply) -> Any:
    try:
        return reply.json()
    except ValueError:
        return None


def _not_json(reply: Reply, what: str, key: str | None) -> PermanentError:
    """The error for a 2xx answer that is not JSON (a proxy's HTML page, an event stream),
    naming its Content-Type rather than a missing field."""
    content_type = reply.headers.get("content-type") or "no Content-Type"
    try:
        reply.json()
        reason = ""
    except ValueError as exc:
        reason = f", {exc}"
    return PermanentError(f"{what}: the answer is not JSON ({content_type}{reason}): {reply.snippet([key or ''])}")


def _send(
    agent: Agent, url: str, payload: dict[str, Any], headers: dict[str, str], context: TaskContext, *, keyed: bool
) -> Reply:
    if keyed and (problem := key_host_problem(url, agent.provider)) is not None:
        raise PermanentError(f"agent {agent.id!r}: {problem}")
    builtin = provider_host(agent.provider)
    target = url_check(url, always_allowed_hosts=(builtin,) if is_provider_url(url, agent.provider) else ())
    return post_json(
        target,
        payload,
        headers=headers,
        connect_timeout=settings.LLM_CONNECT_TIMEOUT_SECONDS,
        read_timeout=read_timeout_for(settings.LLM_READ_TIMEOUT_SECONDS, context),
        what=f"LLM {agent.provider or 'openai'} {url}",
    )


@dataclass
class Turn:
    """One answer of the model, in OpenAI's terms whatever the provider."""

    content: str
    tool_calls: list[dict[str, Any]]
    finish_reason: Any
    model: str
    usage: Usage


def _openai_turn(
    agent: Agent, messages: list[dict[str, Any]], tools: list[dict[str, Any]], context: TaskContext
) -> Turn:
    base = (agent.url or OPENAI_DEFAULT_BASE).rstrip("/")
    url = f"{base}/chat/completions"
    what = f"LLM openai {url}"
    key = _api_key(agent, required=not agent.url)
    system = [{"role": "system", "content": agent.system_prompt}] if agent.system_prompt else []
    payload: dict[str, Any] = {"model": agent.model, "messages": system + messages}
    if agent.temperature is not None:
        payload["temperature"] = agent.temperature
    if agent.max_tokens:
        limit_key = "max_completion_tokens" if OPENAI_REASONING_MODEL.match(agent.model) else "max_tokens"
        payload[limit_key] = agent.max_tokens
    if tools:
        payload["tools"] = tools
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    reply = _send(agent, url, payload, headers, context, keyed=bool(key))
    body = _body(reply)
    model = body.get("model") if isinstance(body, dict) and isinstance(body.get("model"), str) else agent.model
    usage = _usage(reply, body, anthropic=False, model=model, fallback_model=agent.model, what=what)
    if (error := status_error(reply, what=what, redact=[key or ""])) is not None:
        if reply.status == 429 and _openai_error_code(body) == "insufficient_quota":
            # OpenAI's "exceeded your current quota": a 429 that billing ends, not waiting.
            error = PermanentError(str(error))
        raise with_usage(error, usage)
    if body is None:
        raise _not_json(reply, what, key)
    if isinstance(body, dict) and not body.get("choices") and isinstance(body.get("error"), dict):
        raise with_usage(_embedded_error(reply, body["error"], what=what, key=key), usage)
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise with_usage(PermanentError(f"{what}: the answer has no choices: {reply.snippet([key or ''])}"), usage)
    message = choices[0].get("message")
    if not isinstance(message, dict):
        raise with_usage(PermanentError(f"{what}: the first choice has no message"), usage)
    content = message.get("content")
    tool_calls = message.get("tool_calls") or []
    if not isinstance(tool_calls, list) or not all(_is_tool_call(c) for c in tool_calls):
        raise with_usage(PermanentError(f"{what}: the answer's tool_calls are malformed"), usage)
    return Turn(
        content=content if isinstance(content, str) else "",
        tool_calls=tool_calls,
        finish_reason=choices[0].get("finish_reason"),
        model=model,
        usage=usage,
    )


def _embedded_error(reply: Reply, error: dict[str, Any], *, what: str, key: str | None) -> AgentError:
    """The error for a 2xx answer that holds an error object instead of choices, as a gateway
    (OpenRouter) sends when the provider behind it failed after the gateway had answered 200:
    retryable when its code is a status that is (408, 429, 5xx), else permanent. The
    provider's message is quoted, the key redacted."""
    code = error.get("code")
    status = int(code) if isinstance(code, str) and code.isdigit() else code
    message = error.get("message")
    text = " ".join(message.split()) if isinstance(message, str) and message.strip() else reply.snippet([key or ""])
    if key:
        text = text.replace(key, "[redacted]")
    quoted = f"{what} answered HTTP {reply.status} with an error (code {code!r}): {text[:SNIPPET_CHARS]}"
    if isinstance(status, int) and not isinstance(status, bool) and (status in (408, 429) or 500 <= status < 600):
        return RetryableError(quoted, retry_after=retry_after_seconds(reply.headers))
    return PermanentError(quoted)


def _openai_error_code(body: Any) -> Any:
    error = body.get("error") if isinstance(body, dict) else None
    return (error.get("code") or error.get("type")) if isinstance(error, dict) else None


def _is_tool_call(call: Any) -> bool:
    if not isinstance(call, dict):
        return False
    function = call.get("function")
    return (
        isinstance(call.get("id"), str)
        and isinstance(function, dict)
        and isinstance(function.get("name"), str)
        and isinstance(function.get("arguments", ""), str)
    )


def _anthropic_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI function tools in Anthropic's shape (name, description, input_schema)."""
    converted = []
    for tool in tools:
        function = tool.get("function", tool)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise PermanentError("input.tools: every tool needs a function name")
        converted.append(
            {
                "name": function["name"],
                "description": function.get("description", ""),
                "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
            }
        )
    return converted


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def anthropic_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI-shaped chat messages in Anthropic's shape: tool calls become tool_use blocks,
    tool replies tool_result blocks in a user turn (consecutive replies share one turn)."""
    converted: list[dict[str, Any]] = []
    for message in messages:
        role = message["role"]
        if role == "system":
            continue  # sent as the `system` parameter
        if role == "tool":
            block = {"type": "tool_result", "tool_use_id": message["tool_call_id"], "content": message["content"]}
            last = converted[-1] if converted else None
            if last and last["role"] == "user" and isinstance(last["content"], list):
                last["content"].append(block)
            else:
                converted.append({"role": "user", "content": [block]})
        elif role == "assistant":
            blocks: list[dict[str, Any]] = []
            if message.get("content"):
                blocks.append({"type": "text", "text": message["content"]})
            for call in message.get("tool_calls") or []:
                blocks.append(
                    {
                        "type": "tool_use",
                        "id": call["id"],
                        "name": call["function"]["name"],
                        "input": _json_object(call["function"].get("arguments", "")),
                    }
                )
            if blocks:  # an empty turn is refused by the API; consecutive user turns are merged by it
                converted.append({"role": "assistant", "content": blocks})
        else:
            converted.append({"role": "user", "content": message["content"]})
    return converted


def _anthropic_turn(
    agent: Agent, messages: list[dict[str, Any]], tools: list[dict[str, Any]], context: TaskContext
) -> Turn:
    base = (agent.url or ANTHROPIC_DEFAULT_BASE).rstrip("/")
    url = f"{base}/v1/messages"
    what = f"LLM anthropic {url}"
    key = _api_key(agent, required=True)
    payload: dict[str, Any] = {
        "model": agent.model,
        "max_tokens": agent.max_tokens or ANTHROPIC_DEFAULT_MAX_TOKENS,
        "messages": anthropic_messages(messages),
    }
    if agent.system_prompt:
        payload["system"] = agent.system_prompt
    if agent.temperature is not None:
        payload["temperature"] = agent.temperature
    if tools:
        payload["tools"] = _anthropic_tools(tools)
    headers = {"x-api-key": key or "", "anthropic-version": ANTHROPIC_VERSION}
    reply = _send(agent, url, payload, headers, context, keyed=True)
    body = _body(reply)
    model = body.get("model") if isinstance(body, dict) and isinstance(body.get("model"), str) else agent.model
    usage = _usage(reply, body, anthropic=True, model=model, fallback_model=agent.model, what=what)
    if (error := status_error(reply, what=what, redact=[key or ""])) is not None:
        raise with_usage(error, usage)
    if body is None:
        raise _not_json(reply, what, key)
    blocks = body.get("content") if isinstance(body, dict) else None
    if not isinstance(blocks, list):
        raise with_usage(PermanentError(f"{what}: the answer has no content: {reply.snippet([key or ''])}"), usage)
    blocks = [b for b in blocks if isinstance(b, dict)]
    tool_calls = [
        {
            "id": b.get("id"),
            "type": "function",
            "function": {"name": b.get("name"), "arguments": json.dumps(b.get("input", {}))},
        }
        for b in blocks
        if b.get("type") == "tool_use"
    ]
    if not all(_is_tool_call(c) for c in tool_calls):
        raise with_usage(PermanentError(f"{what}: the answer's tool_use blocks are malformed"), usage)
    return Turn(
        content="".join(b.get("text", "") for b in blocks if b.get("type") == "text"),
        tool_calls=tool_calls,
        finish_reason=body.get("stop_reason"),
        model=model,
        usage=usage,
    )


TurnFn = Callable[[Agent, list[dict[str, Any]], list[dict[str, Any]], TaskContext], Turn]


def _converse(agent: Agent, task_input: dict[str, Any], context: TaskContext, turn: TurnFn) -> AgentResult:
    """Ask the model; while it calls tools of ours, run them and ask again with the results.

    A call of a tool that is not ours (input.tools) ends the loop: the calls are returned in
    the output, for the caller to run. Usage is summed over every request of the attempt."""
    conversation = context.conversation
    if conversation is not None:
        messages = [dict(m) for m in conversation.history if m["role"] != "system"]
    else:
        messages = [{"role": "user", "content": user_message(task_input, context.upstream)}]
    own = context.tools.schemas() if context.tools is not None else []
    own_names = {_tool_name(t) for t in own}
    extra = [t for t in _tools(task_input) or [] if _tool_name(t) not in own_names]
    extra_names = {_tool_name(t) for t in extra}
    tools = own + extra
    if conversation is not None:
        # Anthropic is sent the same tools in its own shape (_anthropic_tools).
        conversation.prompt = {"system_prompt": agent.system_prompt, "tools": tools}
    total = Usage()
    for round_number in range(settings.LLM_MAX_TOOL_ROUNDS + 1):
        try:
            answer = turn(agent, messages, tools, context)
        except AgentError as exc:
            context.paid(getattr(exc, "usage", Usage()))  # an error answer may report usage too
            raise with_usage(exc, total + getattr(exc, "usage", Usage())) from None
        except (Exception, SoftTimeLimitExceeded) as exc:
            # The time limit (raised wherever the worker is, often while it waits for the
            # model) or anything unexpected: the rounds paid so far go with it.
            if total.tokens:
                exc.usage = total  # type: ignore[attr-defined]
            raise
        total.add(answer.usage)
        context.paid(answer.usage)
        calls = answer.tool_calls
        if len(calls) > settings.LLM_MAX_TOOL_CALLS_PER_ANSWER:
            # Refused whole, before any call runs (each would be a recorded tool execution) or
            # is handed to the caller: a cap on rounds does not bound the calls within one.
            raise with_usage(
                PermanentError(
                    f"agent {agent.id!r}: the model's answer calls {len(calls)} tools at once, more than "
                    f"LLM_MAX_TOOL_CALLS_PER_ANSWER ({settings.LLM_MAX_TOOL_CALLS_PER_ANSWER}); none of them was run"
                ),
                total,
            )
        if calls and isinstance(answer.finish_reason, str) and answer.finish_reason in TRUNCATED_FINISH_REASONS:
            # The model was stopped while it wrote its calls: the last one's arguments are cut
            # (OpenAI: JSON that ends mid-way; Anthropic: an input missing what it had not
            # written yet). Run, or told to the model as an error, it would be asked again
            # round after round under the same limit, each round paid for.
            cut, remedy = _cut_off(agent, answer.finish_reason)
            raise with_usage(
                PermanentError(f"agent {agent.id!r}: {cut} while it called tools; none of them was run: {remedy}"),
                total,
            )
        if (
            not calls
            and not answer.content.strip()
            and isinstance(answer.finish_reason, str)
            and answer.finish_reason in TRUNCATED_FINISH_REASONS
        ):
            # Nothing written before the limit: a reasoning model (OpenAI's o-series, gpt-5) can
            # spend all of max_completion_tokens on its reasoning. Not an answer to record as one.
            cut, remedy = _cut_off(agent, answer.finish_reason)
            thinking = " (a reasoning model may have spent it all on reasoning)" if remedy == RAISE_MAX_TOKENS else ""
            raise with_usage(
                PermanentError(f"agent {agent.id!r}: {cut} before it wrote any content{thinking}: {remedy}"),
                total,
            )
        # Calls of the caller's tools (input.tools) end the attempt: the caller runs them.
        # Any other call is ours to answer, a name we do not know with an error the model sees.
        if not calls or any(c["function"]["name"] in extra_names for c in calls):
            output: dict[str, Any] = {
                "content": answer.content,
                "model": answer.model,
                "finish_reason": answer.finish_reason,
            }
            if calls:
                output["tool_calls"] = calls
            if round_number:
                output["tool_rounds"] = round_number
            return AgentResult(output=output, usage=total)
        if round_number == settings.LLM_MAX_TOOL_ROUNDS:
            raise with_usage(
                PermanentError(
                    f"agent {agent.id!r}: the model still called tools after {round_number} rounds "
                    "(LLM_MAX_TOOL_ROUNDS)"
                ),
                total,
            )
        # The final answer is checked as the attempt's output; one that calls tools is kept in
        # the conversation's transcript, which must be storable too, or even the failure's
        # record of the thread could not be written (and the attempt would stay running).
        problem = jsonb_problem({"content": answer.content, "tool_calls": calls}, "answer")
        if problem is None and conversation is not None:
            problem = _call_id_problem(calls)
        if problem:
            raise with_usage(
                PermanentError(f"agent {agent.id!r}: the model's answer cannot be stored: {problem}"), total
            )
        asked = {"role": "assistant", "content": answer.content or None, "tool_calls": calls}
        messages.append(asked)
        try:
            replies = [_tool_reply(context, call) for call in calls]
        except (Exception, SoftTimeLimitExceeded) as exc:
            # A tool's transient failure or the time limit: the rounds paid so far go with it.
            exc.usage = total  # type: ignore[attr-defined]
            raise
        messages.extend(replies)
        if conversation is not None:
            conversation.transcript.extend([asked, *replies])
    raise AssertionError("unreachable")


RAISE_MAX_TOKENS = "raise the agent's max_tokens"


def _cut_off(agent: Agent, finish_reason: str) -> tuple[str, str]:
    """How an answer in TRUNCATED_FINISH_REASONS was cut off, and what would let it finish: a
    context window filled by the prompt is not helped by a higher output limit."""
    if finish_reason == "model_context_window_exceeded":
        return (
            f"the model's answer was cut off at its context window (finish_reason {finish_reason!r})",
            "shorten the task's input (in a conversation, CONVERSATION_HISTORY_MESSAGES)",
        )
    return (
        f"the model's answer was cut off at its output token limit{_output_limit(agent)} "
        f"(finish_reason {finish_reason!r})",
        RAISE_MAX_TOKENS,
    )


def _output_limit(agent: Agent) -> str:
    """The output token limit sent for `agent`, as " (max_tokens N)", or "" when none was."""
    if (agent.provider or "").lower() == "anthropic":
        return f" (max_tokens {agent.max_tokens or ANTHROPIC_DEFAULT_MAX_TOKENS})"
    if not agent.max_tokens:
        return ""
    name = "max_completion_tokens" if OPENAI_REASONING_MODEL.match(agent.model) else "max_tokens"
    return f" ({name} {agent.max_tokens})"


def _call_id_problem(calls: list[dict[str, Any]]) -> str | None:
    """Why a thread could not store the tool replies to `calls` (an id longer than its
    tool_call_id column), or None."""
    for i, call in enumerate(calls):
        if problem := call_id_problem(call["id"]):
            return f"answer.tool_calls[{i}].id: {problem}"
    return None


def _tool_reply(context: TaskContext, call: dict[str, Any]) -> dict[str, Any]:
    """Run one of the model's tool calls; a refused or failed call is told to the model as
    an error (it can correct itself), a transient failure fails the attempt."""
    assert context.tools is not None
    raw = call["function"].get("arguments")
    try:
        arguments: Any = json_loads_strict(raw) if raw else {}
    except ValueError:
        arguments = raw  # recorded, and refused as "arguments must be an object"
    try:
        result = context.tools.call(call["function"]["name"], arguments, call_id=call["id"], in_transcript=False)
        content = json.dumps(result, sort_keys=True, ensure_ascii=False)
    except ToolError as exc:
        content = json.dumps({"error": str(exc)})
    return {"role": "tool", "tool_call_id": call["id"], "content": content}


def llm_execute(*, agent: Agent, task_input: dict[str, Any], context: TaskContext) -> AgentResult:
    """One chat completion with the agent's model, system prompt, temperature and max_tokens."""
    if not agent.model:
        raise PermanentError(f"agent {agent.id!r} uses the llm executor but has no model")
    provider = (agent.provider or "").lower()
    if provider in OPENAI_COMPATIBLE:
        return _converse(agent, task_input, context, _openai_turn)
    if provider == "anthropic":
        return _converse(agent, task_input, context, _anthropic_turn)
    raise PermanentError(
        f"agent {agent.id!r}: provider {agent.provider!r} is not supported (openai or an OpenAI-compatible "
        "server such as ollama, vllm, lmstudio; or anthropic)"
    )
