"""What the agent executors do with the answers they get: too many tool calls in one answer,
tool calls cut off at the output token limit, an agent service's error answer that reports
what it used, bodies cut mid-way or not JSON, empty choices, tool arguments that are not
JSON, prompt-cache tokens. Tokens and cost recorded are what the fake server billed."""

from __future__ import annotations

import gzip
import json
import socket
from decimal import Decimal

import pytest

from orchestration.errors import PermanentError, RetryableError
from orchestration.event_types import EventType
from orchestration.models import Agent, Event, TaskAttempt, TaskExecution, Workflow
from orchestration.runtime.executors import agent_execute
from orchestration.services.workflows import workflow_submit
from tests.engine import wait_for
from tests.fakes.servers import AgentService, AnthropicServer, OpenAIServer, RawServer, Reply
from tests.orchestration.test_agent_runtime import KEY, run, tool_agent
from tests.orchestration.test_executors import ctx, http_agent, llm_agent

LOCAL_NET = {"AGENT_HTTP_ALLOW_PRIVATE": "true", "AGENT_HTTP_ALLOWED_HOSTS": "127.0.0.1"}
SONNET = "claude-3-5-sonnet-20241022"  # $3 in, $15 out per million tokens


@pytest.fixture
def local_net(settings, monkeypatch):
    settings.AGENT_HTTP_ALLOW_PRIVATE = True
    settings.AGENT_HTTP_ALLOWED_HOSTS = ["127.0.0.1"]
    monkeypatch.setenv("TEST_LLM_API_KEY", KEY)
    return settings


@pytest.fixture
def openai(settings):
    with OpenAIServer(api_key=KEY) as server:
        settings.AGENT_API_KEY_HOSTS = [server.url]
        yield server


def finished(workflow: Workflow, timeout: float = 60) -> Workflow:
    return wait_for(lambda: (w := Workflow.objects.get(pk=workflow.pk)).is_terminal and w, timeout=timeout)


def calls_answer(count: int, name: str = "calculator", *, completion_tokens: int = 5) -> dict:
    """A chat.completion whose one message calls `name` `count` times (parallel tool calls)."""
    calls = [
        {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": '{"expression": "1 + 1"}'}}
        for i in range(count)
    ]
    return {
        "id": "chatcmpl-many",
        "object": "chat.completion",
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": None, "tool_calls": calls},
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 100, "completion_tokens": completion_tokens},
    }


# --- tool calls per answer -----------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_an_answer_with_thousands_of_tool_calls_fails_the_attempt_runs_none_and_keeps_its_tokens(engine):
    with OpenAIServer(api_key=KEY) as llm:
        engine(env={**LOCAL_NET, "AGENT_API_KEY_HOSTS": llm.url, "ANSWERS_LLM_API_KEY": KEY})
        Agent.objects.create(
            id="calc-llm",
            name="Calc",
            executor=Agent.Executor.LLM,
            provider="openai",
            url=llm.base_url,
            model="gpt-4o-mini",
            api_key_env="ANSWERS_LLM_API_KEY",
            config={"tools": ["calculator"]},
        )
        llm.script(Reply(body=calls_answer(5000, completion_tokens=50_000)))
        workflow, _ = workflow_submit(
            spec={"name": "many", "tasks": [{"name": "calc", "agent": "calc-llm", "input": {"prompt": "go"}}]}
        )
        workflow = finished(workflow)
    assert workflow.status == Workflow.Status.FAILED
    attempt = TaskAttempt.objects.get(execution__workflow=workflow)
    assert (attempt.status, attempt.retryable) == (TaskAttempt.Status.FAILED, False)
    assert "calls 5000 tools at once, more than LLM_MAX_TOOL_CALLS_PER_ANSWER (64)" in attempt.error
    assert not Event.objects.filter(event_type=EventType.TOOL_EXECUTED).exists(), "no call of the answer ran"
    assert len(llm.requests) == 1, "the model was not asked again"
    # 100 x $0.15 + 50 000 x $0.60 per million: the provider billed the refused answer
    assert (attempt.input_tokens, attempt.output_tokens, attempt.cost_usd) == (100, 50_000, Decimal("0.030015"))
    task = TaskExecution.objects.get(workflow=workflow)
    assert (task.tokens_used, task.cost_usd) == (50_100, Decimal("0.030015"))
    assert (workflow.total_tokens_used, workflow.total_cost_usd) == (50_100, Decimal("0.030015"))


@pytest.mark.django_db
def test_an_answer_with_as_many_tool_calls_as_the_cap_runs_them_all(local_net, openai):
    local_net.LLM_MAX_TOOL_CALLS_PER_ANSWER = 3
    openai.script(Reply(body=calls_answer(3)))
    result, _ = run(tool_agent(openai.base_url), {"prompt": "go"})
    assert Event.objects.filter(event_type=EventType.TOOL_EXECUTED).count() == 3
    assert [m["role"] for m in openai.requests[1].body["messages"][-3:]] == ["tool"] * 3
    assert result.output["tool_rounds"] == 1


@pytest.mark.django_db
def test_one_tool_call_past_the_cap_refuses_the_answer_with_its_usage(local_net, openai):
    local_net.LLM_MAX_TOOL_CALLS_PER_ANSWER = 3
    openai.script(Reply(body=calls_answer(4)))
    with pytest.raises(
        PermanentError, match=r"calls 4 tools at once, more than .*\(3\); none of them was run"
    ) as caught:
        run(tool_agent(openai.base_url), {"prompt": "go"})
    assert (caught.value.usage.input_tokens, caught.value.usage.output_tokens) == (100, 5)
    assert not Event.objects.filter(event_type=EventType.TOOL_EXECUTED).exists()
    assert len(openai.requests) == 1


@pytest.mark.django_db
def test_too_many_calls_of_the_callers_own_tools_are_refused_too(local_net, openai):
    """Calls of input.tools are returned for the caller to run: past the cap they are not."""
    local_net.LLM_MAX_TOOL_CALLS_PER_ANSWER = 3
    lookup = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    openai.script(Reply(body=calls_answer(4, "lookup")))
    with pytest.raises(PermanentError, match="calls 4 tools at once") as caught:
        run(tool_agent(openai.base_url), {"prompt": "go", "tools": [lookup]})
    assert caught.value.usage.tokens == 105


# --- prompt-cache tokens -------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_tool_loop_records_every_rounds_prompt_cache_tokens_at_their_prices(engine):
    """Each request of an Anthropic tool loop writes 1000 prompt tokens to the cache and reads
    4000 from it, reported beside input_tokens (20): all are input, billed at $3.75, $0.30
    and $3 per million for Sonnet."""
    with AnthropicServer(
        api_key=KEY,
        input_tokens=20,
        cache_write_tokens=1000,
        cache_read_tokens=4000,
        output_tokens=50,
        tool_call={"expression": "6 * 7"},
    ) as llm:
        engine(env={**LOCAL_NET, "AGENT_API_KEY_HOSTS": llm.url, "ANSWERS_LLM_API_KEY": KEY})
        Agent.objects.create(
            id="calc-claude",
            name="Calc",
            executor=Agent.Executor.LLM,
            provider="anthropic",
            url=llm.url,
            model=SONNET,
            api_key_env="ANSWERS_LLM_API_KEY",
            config={"tools": ["calculator"]},
        )
        workflow, _ = workflow_submit(
            spec={"name": "cached", "tasks": [{"name": "calc", "agent": "calc-claude", "input": {"prompt": "6 * 7?"}}]}
        )
        workflow = finished(workflow)
    assert workflow.status == Workflow.Status.COMPLETED
    assert len(llm.requests) == 2
    attempt = TaskAttempt.objects.get(execution__workflow=workflow)
    # per request: 20 x $3 + 1000 x $3.75 + 4000 x $0.30 + 50 x $15 per million = $0.005760
    assert (attempt.input_tokens, attempt.output_tokens, attempt.cost_usd) == (10_040, 100, Decimal("0.011520"))
    task = TaskExecution.objects.get(workflow=workflow)
    assert (task.tokens_used, task.cost_usd) == (10_140, Decimal("0.011520"))
    assert (workflow.total_tokens_used, workflow.total_cost_usd) == (10_140, Decimal("0.011520"))


# --- tool calls cut off at the output token limit ----------------------------------------------


def cut_off_call_answer(arguments: str, *, completion_tokens: int) -> dict:
    """A chat.completion stopped at max_tokens while the model wrote a call's arguments."""
    body = calls_answer(1, completion_tokens=completion_tokens)
    body["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] = arguments
    body["choices"][0]["finish_reason"] = "length"
    return body


@pytest.mark.django_db
def test_an_openai_tool_call_cut_off_at_max_tokens_is_not_run_and_the_model_not_asked_again(local_net, openai):
    """Asked again under the same max_tokens, the model is cut off again: each round was paid,
    its call refused, and the attempt failed blaming LLM_MAX_TOOL_ROUNDS."""
    local_net.LLM_MAX_TOOL_ROUNDS = 3
    cut = cut_off_call_answer('{"expression": "123456789 * 987654321 + ', completion_tokens=40)
    openai.script(*[Reply(body=cut) for _ in range(4)])
    agent = tool_agent(openai.base_url)
    agent.max_tokens = 40
    with pytest.raises(
        PermanentError,
        match=r"cut off at its output token limit \(max_tokens 40\) \(finish_reason 'length'\) while it called tools; "
        "none of them was run: raise the agent's max_tokens",
    ) as caught:
        run(agent, {"prompt": "go"})
    assert len(openai.requests) == 1, "the model was not asked again"
    assert not Event.objects.filter(event_type=EventType.TOOL_EXECUTED).exists()
    assert (caught.value.usage.input_tokens, caught.value.usage.output_tokens) == (100, 40)


@pytest.mark.django_db
def test_an_anthropic_tool_use_cut_off_at_max_tokens_is_not_run(local_net):
    """Anthropic answers the tool_use block it was writing, its input short of what the model
    had not written yet (here all of it)."""
    cut = {
        "id": "msg_cut",
        "type": "message",
        "role": "assistant",
        "model": SONNET,
        "content": [
            {"type": "text", "text": "I will compute it."},
            {"type": "tool_use", "id": "toolu_cut", "name": "calculator", "input": {}},
        ],
        "stop_reason": "max_tokens",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 300,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": 1024,
        },
    }
    with AnthropicServer(api_key=KEY) as server:
        local_net.AGENT_API_KEY_HOSTS = [server.url]
        server.script(Reply(body=cut))
        agent = tool_agent(server.url, provider="anthropic", model=SONNET)
        with pytest.raises(PermanentError, match=r"limit \(max_tokens 1024\) \(finish_reason 'max_tokens'\)") as caught:
            run(agent, {"prompt": "go"})
    assert len(server.requests) == 1
    assert not Event.objects.filter(event_type=EventType.TOOL_EXECUTED).exists()
    # 300 x $3 + 1024 x $15 per million
    assert caught.value.usage.cost_usd == Decimal("0.016260")


# --- an answer with no content, cut off at the output token limit ------------------------------


def spent_on_reasoning_answer(*, reasoning_tokens: int) -> dict:
    """A reasoning model's chat.completion that spent all of max_completion_tokens thinking."""
    return {
        "id": "chatcmpl-thought",
        "object": "chat.completion",
        "model": "o3-mini-2025-01-31",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "", "refusal": None},
                "finish_reason": "length",
            }
        ],
        "usage": {
            "prompt_tokens": 1000,
            "completion_tokens": reasoning_tokens,
            "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
        },
    }


@pytest.mark.django_db(transaction=True)
def test_a_reasoning_model_that_spends_its_whole_limit_thinking_fails_the_attempt_with_its_cost(engine):
    """The empty answer was recorded as the task's successful output."""
    with OpenAIServer(api_key=KEY) as llm:
        engine(env={**LOCAL_NET, "AGENT_API_KEY_HOSTS": llm.url, "ANSWERS_LLM_API_KEY": KEY})
        Agent.objects.create(
            id="thinker",
            name="Thinker",
            executor=Agent.Executor.LLM,
            provider="openai",
            url=llm.base_url,
            model="o3-mini",
            max_tokens=2000,
            api_key_env="ANSWERS_LLM_API_KEY",
        )
        llm.script(Reply(body=spent_on_reasoning_answer(reasoning_tokens=2000)))
        workflow, _ = workflow_submit(
            spec={"name": "think", "tasks": [{"name": "t", "agent": "thinker", "input": {"prompt": "prove it"}}]}
        )
        workflow = finished(workflow)
    assert llm.requests[0].body["max_completion_tokens"] == 2000
    assert workflow.status == Workflow.Status.FAILED
    attempt = TaskAttempt.objects.get(execution__workflow=workflow)
    assert (attempt.status, attempt.retryable) == (TaskAttempt.Status.FAILED, False)
    assert (
        "cut off at its output token limit (max_completion_tokens 2000) (finish_reason 'length') "
        "before it wrote any content"
    ) in attempt.error
    # 1000 x $1.10 + 2000 x $4.40 per million: the reasoning was billed
    assert (attempt.input_tokens, attempt.output_tokens, attempt.cost_usd) == (1000, 2000, Decimal("0.009900"))
    assert (workflow.total_tokens_used, workflow.total_cost_usd) == (3000, Decimal("0.009900"))


def test_an_anthropic_answer_with_no_text_at_max_tokens_fails_naming_the_limit(local_net):
    """Extended thinking spends max_tokens the same way: only a thinking block comes back."""
    body = {
        "id": "msg_thought",
        "type": "message",
        "role": "assistant",
        "model": SONNET,
        "content": [{"type": "thinking", "thinking": "Let me consider...", "signature": "sig"}],
        "stop_reason": "max_tokens",
        "stop_sequence": None,
        "usage": {"input_tokens": 300, "output_tokens": 1024},
    }
    with AnthropicServer(api_key=KEY) as server:
        local_net.AGENT_API_KEY_HOSTS = [server.url]
        server.script(Reply(body=body))
        agent = llm_agent(server.url, provider="anthropic", model=SONNET, max_tokens=None)
        with pytest.raises(PermanentError, match=r"limit \(max_tokens 1024\) \(finish_reason 'max_tokens'\)") as caught:
            agent_execute(agent=agent, task_input={"prompt": "x"}, context=ctx())
    assert caught.value.usage.cost_usd == Decimal("0.016260")


def test_an_answer_cut_off_at_the_context_window_says_so_not_raise_max_tokens(local_net):
    """Anthropic's model_context_window_exceeded (the prompt filled the window) was told "raise the
    agent's max_tokens", which would not have let it finish."""
    body = {
        "id": "msg_full",
        "type": "message",
        "role": "assistant",
        "model": SONNET,
        "content": [],
        "stop_reason": "model_context_window_exceeded",
        "stop_sequence": None,
        "usage": {"input_tokens": 199_990, "output_tokens": 10},
    }
    with AnthropicServer(api_key=KEY) as server:
        local_net.AGENT_API_KEY_HOSTS = [server.url]
        server.script(Reply(body=body))
        agent = llm_agent(server.url, provider="anthropic", model=SONNET, max_tokens=4096)
        with pytest.raises(PermanentError) as caught:
            agent_execute(agent=agent, task_input={"prompt": "x"}, context=ctx())
    message = str(caught.value)
    assert "cut off at its context window (finish_reason 'model_context_window_exceeded')" in message
    assert "shorten the task's input" in message and "max_tokens" not in message


def test_an_answer_cut_off_after_some_text_is_still_the_answer(local_net, openai):
    body = spent_on_reasoning_answer(reasoning_tokens=100)
    body["choices"][0]["message"]["content"] = "The proof goes"
    openai.script(Reply(body=body))
    result = agent_execute(agent=llm_agent(openai.base_url, model="o3-mini"), task_input={"prompt": "x"}, context=ctx())
    assert (result.output["content"], result.output["finish_reason"]) == ("The proof goes", "length")


# --- a gateway's error inside a 200 answer -------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (429, RetryableError),
        (502, RetryableError),
        ("503", RetryableError),
        (400, PermanentError),
        (None, PermanentError),
    ],
)
def test_a_gateways_error_in_a_200_answer_is_classified_by_its_code(local_net, openai, code, error):
    """OpenRouter answers 200 with {"error": {...}} when the provider behind it fails: it was
    failed for good as "the answer has no choices", a rate limit or an outage included."""
    body = {
        "error": {"message": f"Provider returned error {KEY}", "code": code, "metadata": {"provider_name": "X"}},
        "user_id": "user_1",
        "usage": {"prompt_tokens": 10, "completion_tokens": 0},
    }
    openai.script(Reply(body=body, headers={"Retry-After": "3"}))
    with pytest.raises(error) as caught:
        agent_execute(agent=llm_agent(openai.base_url), task_input={"prompt": "x"}, context=ctx())
    message = str(caught.value)
    assert f"answered HTTP 200 with an error (code {code!r}): Provider returned error [redacted]" in message
    assert KEY not in message
    assert getattr(caught.value, "retry_after", None) == (3.0 if error is RetryableError else None)
    assert caught.value.usage.input_tokens == 10


# --- an agent service's error answer that reports usage ---------------------------------------


@pytest.mark.django_db(transaction=True)
def test_agent_service_error_answer_reporting_tokens_records_them_on_the_failed_attempt(engine):
    with AgentService(model=SONNET) as service:
        engine(env=LOCAL_NET)
        Agent.objects.create(id="svc", name="Service", executor=Agent.Executor.HTTP, url=service.url, model=SONNET)
        failed = {"error": "the model failed mid-answer", "metadata": {"model": SONNET, "tokens_used": 800}}
        service.script(Reply(status=502, body=failed, headers={"Retry-After": "0"}))
        workflow, _ = workflow_submit(
            spec={
                "name": "svc",
                "tasks": [{"name": "x", "agent": "svc", "input": {"description": "go"}, "max_retries": 1}],
            }
        )
        workflow = finished(workflow)
    assert workflow.status == Workflow.Status.COMPLETED
    first, second = TaskAttempt.objects.filter(execution__workflow=workflow).order_by("attempt_number")
    assert (first.status, first.retryable) == (TaskAttempt.Status.FAILED, True)
    assert "HTTP 502" in first.error
    # 800 output tokens x $15 per million: what the service says its model was paid
    assert (first.input_tokens, first.output_tokens, first.cost_usd) == (0, 800, Decimal("0.012000"))
    assert (second.output_tokens, second.cost_usd) == (1523, Decimal("0.022845"))
    assert (workflow.total_tokens_used, workflow.total_cost_usd) == (2323, Decimal("0.034845"))


@pytest.mark.parametrize(
    "body",
    [
        {"error": "busy", "metadata": {"tokens_used": "many"}},
        {"error": "busy", "metadata": "tokens: 800"},
        {"error": "busy", "tokens_used": 800},
        b"<html>502 Bad Gateway</html>",
    ],
    ids=["malformed-count", "metadata-not-an-object", "no-metadata", "not-json"],
)
def test_agent_service_error_answer_without_readable_usage_stays_its_status_error(local_net, body):
    with AgentService() as service:
        service.script(Reply(status=503, body=body))
        with pytest.raises(RetryableError, match="answered HTTP 503") as caught:
            agent_execute(agent=http_agent(service.url), task_input={}, context=ctx())
    assert getattr(caught.value, "usage", None) is None


# --- bodies cut mid-way, or not JSON ------------------------------------------------------------


def _close_delimited_gzip_cut(conn: socket.socket) -> None:
    """A 200 with no Content-Length (its end is the connection's close), gzip-encoded, cut
    half-way through its compressed stream."""
    body = gzip.compress(json.dumps({"result": "x" * 400, "metadata": {"tokens_used": 5}}).encode())
    conn.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\nConnection: close\r\n\r\n"
        + body[: len(body) // 2]
    )


def test_a_compressed_answer_cut_mid_way_is_retryable_not_a_malformed_answer(local_net):
    with RawServer(_close_delimited_gzip_cut) as server:
        with pytest.raises(RetryableError, match="ended before its compressed stream did"):
            agent_execute(agent=http_agent(server.url), task_input={}, context=ctx())
        local_net.AGENT_API_KEY_HOSTS = [server.url]
        with pytest.raises(RetryableError, match="ended before its compressed stream did"):
            agent_execute(agent=llm_agent(server.url), task_input={"prompt": "x"}, context=ctx())


@pytest.mark.parametrize(
    "head",
    [b"HTTP/1.1 204 No Content\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n"],
    ids=["204", "content-length-0"],
)
def test_a_compressed_answer_with_no_body_at_all_fails_for_good_not_retried_as_cut(local_net, head):
    # Nothing was cut: the answer says it has no body (a proxy adds Content-Encoding to any).
    # Retried as a cut answer, each try ran the agent again for the same empty answer.
    def respond(conn: socket.socket) -> None:
        conn.sendall(head + b"Content-Type: application/json\r\nContent-Encoding: gzip\r\n\r\n")

    with RawServer(respond) as server:
        with pytest.raises(PermanentError):
            agent_execute(agent=http_agent(server.url), task_input={}, context=ctx())
        local_net.AGENT_API_KEY_HOSTS = [server.url]
        with pytest.raises(PermanentError):
            agent_execute(agent=llm_agent(server.url), task_input={"prompt": "x"}, context=ctx())


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/html", b"<html><body>Sign in to the proxy</body></html>"),
        ("text/event-stream", b'data: {"choices": []}\n\ndata: [DONE]\n\n'),
    ],
)
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_model_answer_that_is_not_json_names_its_content_type(local_net, content_type, body, provider):
    def respond(conn: socket.socket) -> None:
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s"
            % (content_type.encode(), len(body), body)
        )

    with RawServer(respond) as server:
        local_net.AGENT_API_KEY_HOSTS = [server.url]
        agent = llm_agent(server.url, provider=provider, model="claude-3-5-haiku-latest")
        with pytest.raises(PermanentError, match=f"the answer is not JSON \\({content_type}, "):
            agent_execute(agent=agent, task_input={"prompt": "x"}, context=ctx())


BOM = b"\xef\xbb\xbf"


@pytest.mark.django_db
def test_a_model_answer_after_a_utf8_byte_order_mark_is_read_as_the_sdks_read_it(local_net, openai):
    # RFC 8259 §8.1 lets a parser ignore the mark (a proxy may add it); httpx's Response.json(),
    # which the OpenAI and Anthropic SDKs read answers with, does. It failed the attempt for good.
    openai.script(*(Reply(body=BOM + json.dumps(calls_answer(count)).encode()) for count in (1, 0)))
    result, _ = run(tool_agent(openai.base_url), {"prompt": "go"})
    assert result.output["tool_rounds"] == 1
    assert result.usage.input_tokens == 100 + 100, "both answers are read and paid"


def test_an_agent_service_answer_after_a_utf8_byte_order_mark_is_read(local_net):
    with AgentService() as service:
        service.script(Reply(body=BOM + json.dumps({"result": "ok", "metadata": {"tokens_used": 7}}).encode()))
        result = agent_execute(agent=http_agent(service.url), task_input={}, context=ctx())
    assert (result.output["result"], result.usage.output_tokens) == ("ok", 7)


# --- answers the executor already handles (kept so) ----------------------------------------------


def test_an_empty_choices_list_fails_for_good_with_the_tokens_it_billed(local_net, openai):
    body = {**calls_answer(0), "choices": []}
    openai.script(Reply(body=body))
    with pytest.raises(PermanentError, match="the answer has no choices") as caught:
        agent_execute(agent=llm_agent(openai.base_url), task_input={"prompt": "x"}, context=ctx())
    assert (caught.value.usage.input_tokens, caught.value.usage.output_tokens) == (100, 5)


@pytest.mark.django_db
def test_tool_arguments_that_are_not_json_are_recorded_and_told_to_the_model(local_net, openai):
    bad = calls_answer(1)
    bad["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] = '{"expression": "1 +'
    openai.script(Reply(body=bad))
    result, _ = run(tool_agent(openai.base_url), {"prompt": "go"})
    told = json.loads(openai.requests[1].body["messages"][-1]["content"])
    assert told == {"error": "tool 'calculator': invalid arguments: arguments must be an object, got str"}
    event = Event.objects.get(event_type=EventType.TOOL_EXECUTED)
    assert event.payload["input_params"] == {"arguments": repr('{"expression": "1 +')}
    assert result.output["tool_rounds"] == 1
    assert result.usage.input_tokens == 100 + 1200, "both answers are paid"
