"""The http and llm executors and the price table, against local servers that speak the
agent-service, OpenAI and Anthropic protocols (tests/fakes/servers.py); one workflow runs
end to end on a real Celery worker."""

from __future__ import annotations

import json
import logging
import re
import socket
import time
import uuid
import zlib
from collections.abc import Iterator
from decimal import Decimal

import pytest
from django.core.exceptions import ImproperlyConfigured

from observability.logs import RedactFilter
from orchestration.errors import PermanentError, RetryableError
from orchestration.models import Agent, TaskAttempt, TaskExecution, Workflow
from orchestration.runtime import pricing
from orchestration.runtime.context import TaskContext
from orchestration.runtime.executors import agent_execute
from orchestration.runtime.urlpolicy import url_check
from orchestration.services.workflows import workflow_submit
from tests.engine import wait_for
from tests.fakes.servers import AgentService, AnthropicServer, OpenAIServer, RawServer, Reply

KEY = "sk-test-" + "s3cr3t" * 4


def ctx(**overrides: object) -> TaskContext:
    fields: dict = {
        "execution_id": "exec-1",
        "workflow_id": "wf-1",
        "task_name": "step",
        "agent_id": "agent-x",
        "attempt_number": 1,
        "timeout_seconds": 30,
        "upstream": {},
    }
    fields.update(overrides)
    return TaskContext(**fields)


@pytest.fixture
def local_net(settings):
    """The fake servers listen on loopback: allow it, and only it. (A fake provider's fixture
    lists its origin, http://127.0.0.1:PORT, as one its key may go to.)"""
    settings.AGENT_HTTP_ALLOW_PRIVATE = True
    settings.AGENT_HTTP_ALLOWED_HOSTS = ["127.0.0.1"]
    return settings


@pytest.fixture
def service() -> Iterator[AgentService]:
    with AgentService() as server:
        yield server


@pytest.fixture
def openai(settings) -> Iterator[OpenAIServer]:
    with OpenAIServer(api_key=KEY) as server:
        settings.AGENT_API_KEY_HOSTS = [server.url]
        yield server


@pytest.fixture
def anthropic(settings) -> Iterator[AnthropicServer]:
    with AnthropicServer(api_key=KEY) as server:
        settings.AGENT_API_KEY_HOSTS = [server.url]
        yield server


def http_agent(url: str, **fields: object) -> Agent:
    return Agent(id="svc", name="Service", executor=Agent.Executor.HTTP, url=url, **fields)


def llm_agent(url: str, **fields: object) -> Agent:
    defaults: dict = {
        "provider": "openai",
        "model": "gpt-4o-mini",
        "api_key_env": "TEST_LLM_API_KEY",
        "system_prompt": "You are terse.",
        "temperature": 0.2,
        "max_tokens": 400,
    }
    defaults.update(fields)
    return Agent(id="writer", name="Writer", executor=Agent.Executor.LLM, url=url, **defaults)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- http executor ----------------------------------------------------------------------


def test_http_agent_gets_the_task_and_its_result_is_the_output_with_usage_and_cost(local_net, service):
    task_input = {"description": "Generate leads for fintech", "industry": "fintech"}
    context = ctx(upstream={"research": {"n": 1}}, attempt_number=2)
    result = agent_execute(agent=http_agent(service.url + "/tasks"), task_input=task_input, context=context)

    [request] = service.requests
    assert (request.method, request.path) == ("POST", "/tasks")
    assert request.headers["content-type"] == "application/json"
    assert request.body == {
        "agent_id": "agent-x",
        "task_details": {"task_description": "Generate leads for fintech", "context": task_input},
        "execution_id": "exec-1",
        "workflow_id": "wf-1",
        "task_name": "step",
        "attempt": 2,
        "upstream": {"research": {"n": 1}},
    }
    assert result.output == {
        "result": "Done: Generate leads for fintech",
        "metadata": {"agent_id": "agent-x", "model": "claude-3-5-sonnet-20241022", "tokens_used": 1523},
        "processing_time_ms": 12.5,
    }
    assert (result.usage.input_tokens, result.usage.output_tokens) == (0, 1523)
    assert result.usage.cost_usd == Decimal("0.022845")  # 1523 output tokens at $15 per million


def test_http_agent_usage_prefers_input_and_output_tokens(local_net, service):
    body = {"result": "ok", "metadata": {"model": "gpt-4o", "input_tokens": 1000, "output_tokens": 200}}
    service.script(Reply(body=body))
    result = agent_execute(agent=http_agent(service.url), task_input={}, context=ctx())
    assert (result.usage.input_tokens, result.usage.output_tokens) == (1000, 200)
    assert result.usage.cost_usd == Decimal("0.004500")
    assert service.requests[0].body["task_details"]["task_description"] == ""


def test_http_agent_unlisted_model_name_is_priced_as_the_agents_model(local_net, service):
    """A service names a model snapshot the price table does not list: its tokens are priced as
    the agent's model, as the llm executor prices an unlisted snapshot (they were recorded at
    cost 0)."""
    body = {"result": "ok", "metadata": {"model": "gpt-4o-2099-01-01", "input_tokens": 1000, "output_tokens": 200}}
    service.script(Reply(body=body))
    result = agent_execute(agent=http_agent(service.url, model="gpt-4o"), task_input={}, context=ctx())
    assert result.usage.cost_usd == Decimal("0.004500")  # 1000 x $2.50 + 200 x $10 per million


def test_http_agent_unknown_model_costs_nothing_and_is_logged_once(local_net, service, caplog):
    model = f"house-model-{uuid.uuid4().hex[:6]}"
    service.model = model
    caplog.set_level(logging.WARNING, logger="orchestration.runtime.pricing")
    for _ in range(2):
        result = agent_execute(agent=http_agent(service.url), task_input={}, context=ctx())
        assert result.usage.output_tokens == 1523 and result.usage.cost_usd == 0
    assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1
    assert model in caplog.text


def test_http_agent_models_named_anew_in_each_result_do_not_grow_the_warned_set(local_net, service, caplog):
    """A service whose every result names another unpriced model (a build or run id in the
    name): the worker's pool process remembers the first few it warned about, not each one for
    the life of the process."""
    caplog.set_level(logging.WARNING, logger="orchestration.runtime.pricing")
    run = uuid.uuid4().hex[:6]
    for i in range(200):
        service.model = f"house-model-{run}-build-{i}"
        assert agent_execute(agent=http_agent(service.url), task_input={}, context=ctx()).usage.cost_usd == 0
    assert len(pricing._warned) <= 64
    assert not any(model.endswith("-build-199") for model in pricing._warned)


@pytest.mark.parametrize(
    ("status", "headers", "retry_after"),
    [(500, {}, None), (503, {"Retry-After": "7"}, 7.0), (429, {"Retry-After": "2"}, 2.0), (502, {}, None)],
)
def test_http_agent_server_errors_and_rate_limits_are_retryable(local_net, service, status, headers, retry_after):
    service.script(Reply(status=status, body={"error": "busy"}, headers=headers))
    with pytest.raises(RetryableError, match=f"HTTP {status}") as info:
        agent_execute(agent=http_agent(service.url), task_input={}, context=ctx())
    assert info.value.retry_after == retry_after


@pytest.mark.parametrize(
    ("status", "encoding"), [(503, "br"), (429, "gzip"), (502, "zstd")], ids=["br", "not-gzip", "zstd"]
)
def test_http_agent_error_answer_whose_body_cannot_be_decoded_is_classified_by_its_status(
    local_net, service, status, encoding
):
    # A proxy's error page compressed as we did not ask, or labelled gzip and sent plain: the
    # status says the failure is transient, the body is only quoted.
    body = b"<html>upstream busy</html>"
    service.script(Reply(status=status, body=body, headers={"Content-Encoding": encoding, "Retry-After": "7"}))
    with pytest.raises(RetryableError, match=f"HTTP {status}: <html>upstream busy") as info:
        agent_execute(agent=http_agent(service.url), task_input={}, context=ctx())
    assert info.value.retry_after == 7.0


@pytest.mark.parametrize("wbits", [zlib.MAX_WBITS, -zlib.MAX_WBITS], ids=["zlib", "bare"])
def test_http_agent_deflate_answer_is_read_in_either_form_servers_send(local_net, service, wbits):
    local_net.AGENT_HTTP_MAX_RESPONSE_BYTES = 1024
    for text, cap in (("done", False), ("x" * 5000, True)):
        compressor = zlib.compressobj(wbits=wbits)
        body = compressor.compress(json.dumps({"result": text}).encode()) + compressor.flush()
        service.script(Reply(body=body, headers={"Content-Encoding": "deflate"}))
        if cap:  # the bare stream is inflated within the cap as well
            with pytest.raises(PermanentError, match="exceeds AGENT_HTTP_MAX_RESPONSE_BYTES"):
                agent_execute(agent=http_agent(service.url), task_input={}, context=ctx())
        else:
            assert agent_execute(agent=http_agent(service.url), task_input={}, context=ctx()).output == {"result": text}


@pytest.mark.parametrize("wbits", [zlib.MAX_WBITS, -zlib.MAX_WBITS, zlib.MAX_WBITS | 16], ids=["zlib", "bare", "gzip"])
def test_http_agent_deflate_answer_whose_first_read_is_one_byte_is_read(local_net, wbits):
    # One byte passes zlib's header check unread (it needs two): the bare stream was told
    # apart only when the first read failed, and failed for good when the second did.
    compressor = zlib.compressobj(wbits=wbits)
    body = compressor.compress(json.dumps({"result": "done"}).encode()) + compressor.flush()

    def respond(conn: socket.socket) -> None:
        head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: deflate\r\n"
        conn.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body[:1])
        time.sleep(0.2)  # the first byte read on its own
        conn.sendall(body[1:])

    with RawServer(respond) as server:
        assert agent_execute(agent=http_agent(server.url), task_input={}, context=ctx()).output == {"result": "done"}


def test_http_agent_client_error_is_permanent_and_quotes_the_body(local_net, service):
    service.script(Reply(status=422, body={"detail": "industry is required"}))
    with pytest.raises(PermanentError, match=r"HTTP 422: .*industry is required"):
        agent_execute(agent=http_agent(service.url), task_input={}, context=ctx())


@pytest.mark.parametrize(
    ("body", "message"),
    [(b"<html>Bad gateway</html>", "not JSON"), (b"[1, 2]", "JSON list"), (b'{"result": NaN}', "not JSON")],
)
def test_http_agent_body_that_is_not_a_json_object_is_permanent(local_net, service, body, message):
    service.script(Reply(body=body))
    with pytest.raises(PermanentError, match=message):
        agent_execute(agent=http_agent(service.url), task_input={}, context=ctx())


def test_http_agent_bad_token_count_is_permanent(local_net, service):
    service.script(Reply(body={"result": "x", "metadata": {"tokens_used": "many"}}))
    with pytest.raises(PermanentError, match="tokens_used must be a non-negative integer"):
        agent_execute(agent=http_agent(service.url), task_input={}, context=ctx())


def test_http_agent_read_timeout_is_retryable(local_net, service):
    local_net.AGENT_HTTP_READ_TIMEOUT_SECONDS = 0.3
    # The service would answer after 30 s: giving up long before that is the read timeout's
    # doing, with a margin no pause of a loaded machine comes near.
    service.script(Reply(delay=30))
    started = time.monotonic()
    with pytest.raises(RetryableError, match="timed out"):
        agent_execute(agent=http_agent(service.url), task_input={}, context=ctx())
    assert time.monotonic() - started < 15


def test_http_agent_read_timeout_never_exceeds_the_task_timeout(local_net, service):
    local_net.AGENT_HTTP_READ_TIMEOUT_SECONDS = 60
    service.script(Reply(delay=30))  # under the 60 s read timeout: only the task's 1 s can end it early
    started = time.monotonic()
    with pytest.raises(RetryableError, match="timed out"):
        agent_execute(agent=http_agent(service.url), task_input={}, context=ctx(timeout_seconds=1))
    assert time.monotonic() - started < 15


def test_http_agent_connection_refused_is_retryable(local_net):
    with pytest.raises(RetryableError, match="cannot connect"):
        agent_execute(agent=http_agent(f"http://127.0.0.1:{closed_port()}/"), task_input={}, context=ctx())


def test_http_agent_redirects_are_not_followed(local_net, service):
    service.script(Reply(status=302, body={}, headers={"Location": "http://169.254.169.254/latest/meta-data/"}))
    with pytest.raises(PermanentError, match=r"redirect to http://169\.254\.169\.254.*not followed"):
        agent_execute(agent=http_agent(service.url), task_input={}, context=ctx())
    assert len(service.requests) == 1


def test_http_agent_answer_over_the_size_cap_is_permanent(local_net, service):
    local_net.AGENT_HTTP_MAX_RESPONSE_BYTES = 1024
    service.script(Reply(body={"result": "x" * 5000}))
    with pytest.raises(PermanentError, match="exceeds AGENT_HTTP_MAX_RESPONSE_BYTES"):
        agent_execute(agent=http_agent(service.url), task_input={}, context=ctx())


# --- SSRF policy ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:8000/run", "loopback"),
        ("http://localhost/run", "loopback"),
        ("http://10.1.2.3/run", "private"),
        ("http://192.168.0.10/run", "private"),
        ("http://172.16.5.4/run", "private"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[fe80::1]/run", "link-local"),
        ("http://[::1]/run", "loopback"),
        ("http://[::ffff:127.0.0.1]/run", "IPv4-mapped loopback"),
        ("http://[::ffff:169.254.169.254]/run", "IPv4-mapped link-local"),
        ("http://[fd00::1]/run", "private"),
        ("http://[fec0::1]/run", "site-local"),
        ("http://0.0.0.0/run", "unspecified"),
        ("http://224.0.0.1/run", "multicast"),
        ("http://240.0.0.1/run", "reserved"),
        ("http://100.64.0.1/run", "not globally routable"),
    ],
)
def test_non_public_addresses_are_refused_by_default(settings, url, reason):
    assert settings.AGENT_HTTP_ALLOW_PRIVATE is False
    with pytest.raises(PermanentError, match=reason) as info:
        agent_execute(agent=http_agent(url), task_input={}, context=ctx())
    assert url in str(info.value)


def test_refused_url_sends_nothing_and_the_setting_allows_it(settings, service):
    with pytest.raises(PermanentError, match="loopback"):
        agent_execute(agent=http_agent(service.url), task_input={}, context=ctx())
    assert service.requests == []
    settings.AGENT_HTTP_ALLOW_PRIVATE = True
    agent_execute(agent=http_agent(service.url), task_input={}, context=ctx())
    assert len(service.requests) == 1


def test_host_outside_the_allow_list_is_refused(local_net, service):
    local_net.AGENT_HTTP_ALLOWED_HOSTS = ["agents.example.com"]
    with pytest.raises(PermanentError, match=r"'127\.0\.0\.1' is not in AGENT_HTTP_ALLOWED_HOSTS"):
        agent_execute(agent=http_agent(service.url), task_input={}, context=ctx())
    assert service.requests == []


@pytest.mark.parametrize("url", ["ftp://example.com/task", "file:///etc/passwd", "gopher://example.com/"])
def test_only_http_and_https_are_allowed(settings, url):
    with pytest.raises(PermanentError, match="only http and https"):
        url_check(url)


def test_credentials_in_a_url_are_refused_without_echoing_them(settings):
    with pytest.raises(PermanentError) as info:
        url_check("https://user:hunter2@example.com/")
    assert "hunter2" not in str(info.value)


def test_an_offline_check_refuses_what_the_url_itself_gets_wrong_without_a_lookup(settings, monkeypatch):
    def no_dns(*args, **kwargs):
        raise AssertionError("the offline check looked a host up")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    settings.AGENT_HTTP_ALLOWED_HOSTS = ["elsewhere.example.com"]  # applied per request, not offline
    target = url_check("https://Agents.Example.com./run", resolve=False)
    assert (target.hostname, target.addresses) == ("agents.example.com", ())
    settings.AGENT_HTTP_ALLOW_PRIVATE = True
    assert url_check("http://169.254.169.254/latest", resolve=False).addresses == ()
    for url, reason in [
        ("file:///etc/passwd", "only http and https"),
        ("https://user:hunter2@example.com/", "credentials in a URL are not allowed"),
        ("https:///run", "it has no host"),
        ("http://[::1/run", "is not a valid URL"),
        ("http://agents.example.com:0/run", "port 0 is not a port number"),
        ("https://agents.example.com:65536/run", "port 65536 is not a port number"),
    ]:
        with pytest.raises(PermanentError, match=reason) as info:
            url_check(url, resolve=False)
        assert "hunter2" not in str(info.value)


def test_an_offline_check_refuses_an_address_or_localhost_as_the_request_would(settings, monkeypatch):
    """A literal address, or localhost, is refused offline in the words of the request's
    refusal; a name is not looked up: what it resolves to is checked per request."""

    def no_dns(*args, **kwargs):
        raise AssertionError("the offline check looked a host up")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    settings.AGENT_HTTP_ALLOW_PRIVATE = False
    for url, host in [
        ("http://127.0.0.1:9000/", "'127.0.0.1' is a loopback address"),
        ("http://LocalHost./run", "'localhost' is a loopback address"),
        ("http://[::1]/", "'::1' is a loopback address"),
        ("http://10.0.0.5/", "'10.0.0.5' is a private address"),
        ("http://169.254.169.254/latest", "'169.254.169.254' is a link-local address"),
    ]:
        with pytest.raises(PermanentError, match=rf"refused: {re.escape(host)}.*\(set AGENT_HTTP_ALLOW_PRIVATE=true"):
            url_check(url, resolve=False)
    assert url_check("http://svc.internal:9000/", resolve=False).addresses == ()
    assert url_check("https://8.8.8.8/", resolve=False).hostname == "8.8.8.8"
    settings.AGENT_HTTP_ALLOW_PRIVATE = True
    assert url_check("http://127.0.0.1:9000/", resolve=False).hostname == "127.0.0.1"


def test_public_addresses_pass_the_policy(settings):
    assert url_check("https://8.8.8.8/run").addresses == ("8.8.8.8",)
    assert url_check("http://[2606:4700:4700::1111]:8080/").addresses == ("2606:4700:4700::1111",)


def test_the_name_is_sent_as_host_while_connecting_to_the_checked_address(local_net, service):
    local_net.AGENT_HTTP_ALLOWED_HOSTS = ["localhost"]
    agent_execute(agent=http_agent(f"http://localhost:{service.port}/run"), task_input={}, context=ctx())
    assert service.requests[0].headers["host"] == f"localhost:{service.port}"


# --- llm executor: OpenAI-compatible ------------------------------------------------------


def test_openai_request_output_usage_and_cost(local_net, openai, monkeypatch):
    monkeypatch.setenv("TEST_LLM_API_KEY", KEY)
    result = agent_execute(
        agent=llm_agent(openai.base_url), task_input={"prompt": "Summarise the leads."}, context=ctx()
    )
    [request] = openai.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.body == {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Summarise the leads."},
        ],
        "temperature": 0.2,
        "max_tokens": 400,
    }
    assert result.output == {"content": "echo: Summarise the leads.", "model": "gpt-4o-mini", "finish_reason": "stop"}
    assert (result.usage.input_tokens, result.usage.output_tokens) == (1200, 350)
    assert result.usage.cost_usd == Decimal("0.000390")  # 1200 x $0.15 + 350 x $0.60 per million


def test_openai_user_message_renders_the_input_and_upstream_outputs(local_net, openai, monkeypatch):
    monkeypatch.setenv("TEST_LLM_API_KEY", KEY)
    agent = llm_agent(openai.base_url, system_prompt="", temperature=None, max_tokens=None)
    agent_execute(agent=agent, task_input={"industry": "fintech"}, context=ctx(upstream={"research": {"leads": 3}}))
    body = openai.requests[0].body
    assert set(body) == {"model", "messages"}
    [message] = body["messages"]
    assert message["role"] == "user"
    assert json.loads(message["content"].split("\n\n")[0]) == {"industry": "fintech"}
    assert "Outputs of the tasks this one depends on" in message["content"]
    assert '"leads": 3' in message["content"]


@pytest.mark.parametrize(
    ("suffix", "cost"),
    [("-2024-07-18", "0.000390"), ("-2099-01-01", "0.000390")],
    ids=["listed-snapshot", "unlisted-snapshot-priced-as-requested"],
)
def test_openai_dated_model_name_is_priced(local_net, openai, monkeypatch, suffix, cost):
    monkeypatch.setenv("TEST_LLM_API_KEY", KEY)
    openai.model_suffix = suffix
    result = agent_execute(agent=llm_agent(openai.base_url), task_input={"prompt": "x"}, context=ctx())
    assert result.output["model"] == "gpt-4o-mini" + suffix
    assert result.usage.cost_usd == Decimal(cost)


def test_openai_prompt_tokens_its_cache_served_are_priced_at_the_cached_input_price(local_net, openai, monkeypatch):
    """OpenAI caches long prompts by itself: prompt_tokens includes the tokens its cache served
    (prompt_tokens_details.cached_tokens), billed at half gpt-4o's input price. Reasoning
    tokens are part of completion_tokens, not added to them."""
    monkeypatch.setenv("TEST_LLM_API_KEY", KEY)
    openai.prompt_tokens, openai.cached_tokens = 10_000, 8_192
    openai.completion_tokens, openai.reasoning_tokens = 100, 60
    openai.model_suffix = "-2024-08-06"
    agent = llm_agent(openai.base_url, model="gpt-4o")
    result = agent_execute(agent=agent, task_input={"prompt": "x"}, context=ctx())
    assert (result.usage.input_tokens, result.usage.output_tokens) == (10_000, 100)
    # 1808 x $2.50 + 8192 x $1.25 + 100 x $10 per million (all 10,000 at $2.50: $0.026000)
    assert result.usage.cost_usd == Decimal("0.015760")


def test_openai_reasoning_model_is_sent_max_tokens_as_max_completion_tokens(local_net, openai, monkeypatch):
    """o3-mini (in the price table) refuses max_tokens with a 400: the agent's max_tokens is
    sent as max_completion_tokens, which also bounds the reasoning tokens."""
    monkeypatch.setenv("TEST_LLM_API_KEY", KEY)
    openai.completion_tokens, openai.reasoning_tokens = 350, 300
    agent = llm_agent(openai.base_url, model="o3-mini", temperature=None)
    result = agent_execute(agent=agent, task_input={"prompt": "x"}, context=ctx())
    body = openai.requests[0].body
    assert body["max_completion_tokens"] == 400 and "max_tokens" not in body
    assert result.usage.cost_usd == Decimal("0.002860")  # 1200 x $1.10 + 350 x $4.40 per million


def test_a_fine_tuned_openai_reasoning_model_is_sent_max_completion_tokens(local_net, openai, monkeypatch):
    """A fine-tuned model is named `ft:<base model>:<org>:<suffix>:<id>` and takes what its base
    model takes: a fine-tuned o4-mini refuses max_tokens as o4-mini does (every request of the
    agent was a 400)."""
    monkeypatch.setenv("TEST_LLM_API_KEY", KEY)
    agent = llm_agent(openai.base_url, model="ft:o4-mini-2025-04-16:acme::BZx8Kq2L", temperature=None)
    result = agent_execute(agent=agent, task_input={"prompt": "x"}, context=ctx())
    body = openai.requests[0].body
    assert body["max_completion_tokens"] == 400 and "max_tokens" not in body
    assert result.output["content"]


def test_openai_tools_are_passed_through_and_tool_calls_returned(local_net, openai, monkeypatch):
    monkeypatch.setenv("TEST_LLM_API_KEY", KEY)
    openai.tool_call = {"city": "Oslo"}
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    result = agent_execute(
        agent=llm_agent(openai.base_url), task_input={"prompt": "Weather?", "tools": tools}, context=ctx()
    )
    assert openai.requests[0].body["tools"] == tools
    assert result.output["finish_reason"] == "tool_calls"
    assert result.output["content"] == ""
    [call] = result.output["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}


@pytest.mark.parametrize(
    ("reply", "error", "retry_after"),
    [
        (
            Reply(status=429, body={"error": {"message": "Rate limit"}}, headers={"Retry-After": "1"}),
            RetryableError,
            1.0,
        ),
        (Reply(status=429, body={"error": {}}, headers={"retry-after-ms": "1500"}), RetryableError, 1.5),
        (Reply(status=500, body={"error": {"message": "server"}}), RetryableError, None),
        (Reply(status=400, body={"error": {"message": "bad temperature"}}), PermanentError, None),
    ],
    ids=["429-retry-after", "429-retry-after-ms", "500", "400"],
)
def test_openai_errors_are_classified(local_net, openai, monkeypatch, reply, error, retry_after):
    monkeypatch.setenv("TEST_LLM_API_KEY", KEY)
    openai.script(reply)
    with pytest.raises(error, match=f"HTTP {reply.status}") as info:
        agent_execute(agent=llm_agent(openai.base_url), task_input={"prompt": "x"}, context=ctx())
    assert getattr(info.value, "retry_after", None) == retry_after
    assert not hasattr(info.value, "usage")


def test_openai_failure_after_usage_was_reported_carries_the_usage(local_net, openai, monkeypatch):
    monkeypatch.setenv("TEST_LLM_API_KEY", KEY)
    body = {"model": "gpt-4o", "choices": [], "usage": {"prompt_tokens": 1000, "completion_tokens": 100}}
    openai.script(Reply(body=body))
    with pytest.raises(PermanentError, match="no choices") as info:
        agent_execute(agent=llm_agent(openai.base_url, model="gpt-4o"), task_input={"prompt": "x"}, context=ctx())
    usage = info.value.usage
    assert (usage.input_tokens, usage.output_tokens, usage.cost_usd) == (1000, 100, Decimal("0.003500"))


def test_missing_api_key_names_the_variable_and_sends_nothing(local_net, openai, monkeypatch):
    monkeypatch.delenv("TEST_LLM_API_KEY", raising=False)
    with pytest.raises(PermanentError, match="API key variable TEST_LLM_API_KEY is not set"):
        agent_execute(agent=llm_agent(openai.base_url), task_input={"prompt": "x"}, context=ctx())
    assert openai.requests == []


def test_an_unset_key_variable_is_named_only_when_it_reads_like_one(local_net, openai, monkeypatch):
    """With patterns wider than the default, a key pasted into api_key_env (hf_..., gsk_...)
    passes them; unset as a variable, it must not reach the error record."""
    local_net.AGENT_API_KEY_ENV_ALLOWED = ["*"]
    pasted = "hf_" + "AbCdEfGh" * 4
    monkeypatch.delenv(pasted, raising=False)
    with pytest.raises(PermanentError, match="the API key variable that api_key_env names is not set") as info:
        agent_execute(agent=llm_agent(openai.base_url, api_key_env=pasted), task_input={"prompt": "x"}, context=ctx())
    assert pasted not in str(info.value) and openai.requests == []


def test_default_endpoint_without_api_key_env_is_refused(settings):
    agent = llm_agent("", api_key_env="")
    with pytest.raises(PermanentError, match="needs an API key"):
        agent_execute(agent=agent, task_input={"prompt": "x"}, context=ctx())


def test_a_key_pasted_into_api_key_env_is_not_echoed(local_net, openai):
    agent = llm_agent(openai.base_url, api_key_env=KEY)
    with pytest.raises(PermanentError, match="not a valid environment variable name") as info:
        agent_execute(agent=agent, task_input={"prompt": "x"}, context=ctx())
    assert KEY not in str(info.value)


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("DATABASE_URL", "one of the platform's own settings"),  # the test settings read it
        ("SECRET_KEY", "one of the platform's own settings"),
        ("HOME", "AGENT_API_KEY_ENV_ALLOWED admits \\*_API_KEY"),
        ("OPENAI_KEY", "AGENT_API_KEY_ENV_ALLOWED admits"),
    ],
)
def test_an_agent_reads_no_variable_but_those_agents_may_name(local_net, openai, monkeypatch, name, problem):
    """The key goes to the agent's URL, which an admin chooses through the API: naming
    DATABASE_URL would send the database's password there."""
    monkeypatch.setenv(name, KEY)
    with pytest.raises(PermanentError, match=problem) as info:
        agent_execute(agent=llm_agent(openai.base_url, api_key_env=name), task_input={"prompt": "x"}, context=ctx())
    assert openai.requests == []
    assert name not in str(info.value)  # not echoed: it may be a key pasted by mistake


def test_a_key_goes_only_to_the_providers_host_or_one_the_operator_listed(openai, monkeypatch, settings):
    """Checked again as the request is made (an agent stored before the rule, or the list
    narrowed since): the server is never reached."""
    settings.AGENT_HTTP_ALLOW_PRIVATE = True  # the address rules would refuse loopback otherwise
    settings.AGENT_HTTP_ALLOWED_HOSTS = ["127.0.0.1"]  # where agents may connect: not where keys may go
    settings.AGENT_API_KEY_HOSTS = []
    monkeypatch.setenv("TEST_LLM_API_KEY", KEY)
    with pytest.raises(PermanentError, match=r"sent only to the provider's own host \(api.openai.com\)"):
        agent_execute(agent=llm_agent(openai.base_url), task_input={"prompt": "x"}, context=ctx())
    anthropic_agent = llm_agent(openai.base_url, provider="anthropic")
    with pytest.raises(PermanentError, match=r"sent only to the provider's own host \(api.anthropic.com\)"):
        agent_execute(agent=anthropic_agent, task_input={"prompt": "x"}, context=ctx())
    assert openai.requests == []
    settings.AGENT_API_KEY_HOSTS = [openai.url]
    agent_execute(agent=llm_agent(openai.base_url), task_input={"prompt": "x"}, context=ctx())
    assert len(openai.requests) == 1


def test_a_listed_host_name_admits_https_on_443_only_and_an_origin_its_own_scheme_and_port(
    local_net, openai, monkeypatch
):
    """Listing the fake server's host does not send the key to it over http on its port:
    that takes its origin, listed as the operator writes it (case, trailing dot, a lone "/").
    The error says what to list, and the server is never reached before."""
    monkeypatch.setenv("TEST_LLM_API_KEY", KEY)
    hint = f"list {openai.url} in AGENT_API_KEY_HOSTS to send the key over http to port {openai.port}"
    for listed in (
        ["127.0.0.1"],
        [f"https://127.0.0.1:{openai.port}"],
        ["http://127.0.0.1"],
        [f"http://127.0.0.1:{openai.port + 1}"],
    ):
        local_net.AGENT_API_KEY_HOSTS = listed
        with pytest.raises(PermanentError, match=re.escape(hint)) as info:
            agent_execute(agent=llm_agent(openai.base_url), task_input={"prompt": "x"}, context=ctx())
        assert "/v1" not in str(info.value) and KEY not in str(info.value)
    assert openai.requests == []
    local_net.AGENT_API_KEY_HOSTS = ["127.0.0.1", f"HTTP://127.0.0.1.:{openai.port}/"]
    agent_execute(agent=llm_agent(openai.base_url), task_input={"prompt": "x"}, context=ctx())
    assert [r.headers["authorization"] for r in openai.requests] == [f"Bearer {KEY}"]


def test_a_key_goes_to_a_listed_ipv6_origin(local_net, monkeypatch):
    """http://[::1]:PORT listed (however the address is spelt) sends the key to a server on
    ::1; the bare address admits https on 443 only."""
    monkeypatch.setenv("TEST_LLM_API_KEY", KEY)
    local_net.AGENT_HTTP_ALLOWED_HOSTS = ["::1"]
    with OpenAIServer(api_key=KEY, host="::1") as server:
        agent = llm_agent(server.base_url)
        local_net.AGENT_API_KEY_HOSTS = ["::1", "[::1]"]
        with pytest.raises(PermanentError, match=re.escape(f"list http://[::1]:{server.port} in AGENT_API_KEY_HOSTS")):
            agent_execute(agent=agent, task_input={"prompt": "x"}, context=ctx())
        assert server.requests == []
        local_net.AGENT_API_KEY_HOSTS = [f"http://[0:0::1]:{server.port}"]
        agent_execute(agent=agent, task_input={"prompt": "x"}, context=ctx())
    assert [r.headers["authorization"] for r in server.requests] == [f"Bearer {KEY}"]


def test_a_python_agent_outside_the_entrypoint_modules_is_refused_at_call_time(settings):
    """An agent stored before the setting narrowed: its attempt fails before the import."""
    settings.AGENT_ENTRYPOINT_MODULES = ["orchestration.runtime.builtin"]
    agent = Agent(
        id="old", name="Old", executor=Agent.Executor.PYTHON, entrypoint="tests.orchestration.edge_agents.moody"
    )
    with pytest.raises(
        PermanentError, match=r"'tests.orchestration.edge_agents.moody' is outside AGENT_ENTRYPOINT_MODULES"
    ):
        agent_execute(agent=agent, task_input={}, context=ctx())
    echo = Agent(
        id="echo", name="Echo", executor=Agent.Executor.PYTHON, entrypoint="orchestration.runtime.builtin.echo"
    )
    assert agent_execute(agent=echo, task_input={"a": 1}, context=ctx()).output == {"echo": {"a": 1}}


def test_a_python_agent_runs_only_a_function_defined_in_the_entrypoint_modules(settings):
    """An agent stored before the check: a class or function the allowed module imported is
    refused at call time, before it is called."""
    settings.AGENT_ENTRYPOINT_MODULES = ["orchestration.runtime.builtin"]
    for entrypoint in ("orchestration.runtime.builtin.PermanentError", "orchestration.runtime.builtin.TaskContext"):
        agent = Agent(id="old", name="Old", executor=Agent.Executor.PYTHON, entrypoint=entrypoint)
        with pytest.raises(PermanentError, match="is not a function defined in AGENT_ENTRYPOINT_MODULES"):
            agent_execute(agent=agent, task_input={}, context=ctx())


def test_a_key_goes_to_the_providers_host_however_its_url_is_spelt(monkeypatch, settings):
    """An upper-case provider host is the provider's host (the allow-list does not apply to
    it); a backslash before '@' does not make a listed host of another one."""
    settings.AGENT_API_KEY_HOSTS = ["llm.example"]
    monkeypatch.setenv("TEST_LLM_API_KEY", KEY)
    sent: list[object] = []
    monkeypatch.setattr("orchestration.runtime.llm.post_json", lambda target, *a, **k: sent.append(target) or 1 / 0)
    monkeypatch.setattr("orchestration.runtime.urlpolicy._resolve", lambda host, port: ["93.184.216.34"])
    with pytest.raises(ZeroDivisionError):
        agent_execute(agent=llm_agent("https://API.OPENAI.COM/v1"), task_input={"prompt": "x"}, context=ctx())
    assert [t.hostname for t in sent] == ["api.openai.com"]
    with pytest.raises(PermanentError, match="is neither"):
        agent_execute(
            agent=llm_agent("https://evil.example\\@llm.example/v1"), task_input={"prompt": "x"}, context=ctx()
        )
    assert len(sent) == 1


def test_an_internationalized_host_is_looked_up_as_it_is_sent(local_net, monkeypatch):
    """faß.de (xn--fa-hia.de) and fass.de are two domains, which IDNA 2003, the socket
    module's encoding of a name given as text, takes for one: the host is looked up in its
    xn-- form, as the Host header and TLS name carry it, and the key goes to its address."""
    monkeypatch.setenv("TEST_LLM_API_KEY", KEY)
    with OpenAIServer(api_key=KEY) as gateway, OpenAIServer(api_key=None, host="127.0.0.2", port=gateway.port) as other:
        addresses = {"xn--fa-hia.de": "127.0.0.1", "fass.de": "127.0.0.2"}
        system_lookup = socket.getaddrinfo

        def resolver(host, port, *args, **kwargs):
            name = host.encode("idna").decode("ascii")  # what the socket module sends the resolver
            return system_lookup(addresses.get(name, name), port, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", resolver)
        local_net.AGENT_HTTP_ALLOWED_HOSTS = ["Faß.de"]  # listed as written, or in its xn-- form
        local_net.AGENT_API_KEY_HOSTS = [f"http://xn--fa-hia.de:{gateway.port}"]
        url = f"http://xn--fa-hia.de:{gateway.port}/v1"
        agent_execute(agent=llm_agent(url), task_input={"prompt": "x"}, context=ctx())
    assert other.requests == []
    [request] = gateway.requests
    assert (request.headers["host"], request.headers["authorization"]) == (
        f"xn--fa-hia.de:{gateway.port}",
        f"Bearer {KEY}",
    )


def test_a_malformed_xn_label_is_a_name_that_does_not_resolve(settings):
    assert url_check("http://xn--zz.example/run", resolve=False).hostname == "xn--zz.example"


def test_widened_names_still_refuse_the_platform_settings(local_net, openai, monkeypatch):
    local_net.AGENT_API_KEY_ENV_ALLOWED = ["*"]
    monkeypatch.setenv("ANY_NAME", KEY)
    result = agent_execute(
        agent=llm_agent(openai.base_url, api_key_env="ANY_NAME"), task_input={"prompt": "x"}, context=ctx()
    )
    assert result.output is not None and len(openai.requests) == 1
    with pytest.raises(PermanentError, match="one of the platform's own settings"):
        agent_execute(
            agent=llm_agent(openai.base_url, api_key_env="REDIS_URL"), task_input={"prompt": "x"}, context=ctx()
        )
    assert len(openai.requests) == 1


def test_a_key_read_at_run_time_is_masked_in_the_logs_of_its_process(local_net, monkeypatch):
    """An agent made through the API has no definition file naming its variable, and its key
    need not look like one (no `sk-`, no `key=`): the log filter masks it once it is read."""
    value = "Zq8" + "f3LmNp" * 4
    monkeypatch.setenv("API_MADE_API_KEY", value)
    redact_filter = RedactFilter()

    def logged() -> str:
        record = logging.makeLogRecord({"msg": "the provider answered %s", "args": (value,)})
        redact_filter.filter(record)
        return record.getMessage()

    assert value in logged()  # nothing knew it yet
    with OpenAIServer(api_key=value) as server:
        local_net.AGENT_API_KEY_HOSTS = [server.url]
        agent_execute(
            agent=llm_agent(server.base_url, api_key_env="API_MADE_API_KEY"), task_input={"prompt": "x"}, context=ctx()
        )
    assert logged() == "the provider answered ***"


def test_api_key_never_appears_in_errors_or_logs(local_net, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("TEST_LLM_API_KEY", KEY)
    with OpenAIServer(api_key="sk-other") as server:  # refuses our key, quoting it back
        local_net.AGENT_API_KEY_HOSTS = [server.url]
        with pytest.raises(PermanentError, match="HTTP 401") as info:
            agent_execute(agent=llm_agent(server.base_url), task_input={"prompt": "x"}, context=ctx())
        assert KEY in server.requests[0].headers["authorization"]
    assert "[redacted]" in str(info.value)
    assert KEY not in str(info.value) and KEY not in repr(info.value)
    assert KEY not in caplog.text


def test_a_key_quoted_where_the_errors_snippet_ends_is_not_cut_into_a_prefix(local_net, monkeypatch):
    """The answer's snippet is cut to SNIPPET_CHARS: a key quoted across that point was cut
    first, then no longer matched the redaction, and its first characters were stored."""
    monkeypatch.setenv("TEST_LLM_API_KEY", KEY)
    with OpenAIServer(api_key=KEY) as server:
        local_net.AGENT_API_KEY_HOSTS = [server.url]
        # A gateway's refusal whose message quotes the key near the snippet's end.
        padding = "x" * 250
        server.script(Reply(status=401, body={"error": {"message": f"{padding} bad key {KEY} for this project"}}))
        with pytest.raises(PermanentError, match="HTTP 401") as info:
            agent_execute(agent=llm_agent(server.base_url), task_input={"prompt": "x"}, context=ctx())
    text = str(info.value)
    assert "[redacted]" in text
    assert KEY[:12] not in text


def test_unknown_provider_is_permanent(local_net):
    with pytest.raises(PermanentError, match="provider 'cohere' is not supported"):
        agent_execute(agent=llm_agent("http://127.0.0.1:1", provider="cohere"), task_input={}, context=ctx())


# --- llm executor: Anthropic ------------------------------------------------------------


def test_anthropic_request_headers_body_output_and_cost(local_net, anthropic, monkeypatch):
    monkeypatch.setenv("TEST_LLM_API_KEY", KEY)
    agent = llm_agent(anthropic.url, provider="anthropic", model="claude-3-5-haiku-20241022", max_tokens=None)
    result = agent_execute(agent=agent, task_input={"prompt": "Greet."}, context=ctx())
    [request] = anthropic.requests
    assert request.path == "/v1/messages"
    assert request.headers["x-api-key"] == KEY
    assert request.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in request.headers
    assert request.body == {
        "model": "claude-3-5-haiku-20241022",
        "max_tokens": 1024,
        "system": "You are terse.",
        "messages": [{"role": "user", "content": "Greet."}],
        "temperature": 0.2,
    }
    assert result.output == {
        "content": "Hello from Claude.",
        "model": "claude-3-5-haiku-20241022",
        "finish_reason": "end_turn",
    }
    assert (result.usage.input_tokens, result.usage.output_tokens) == (2000, 500)
    assert result.usage.cost_usd == Decimal("0.003600")  # 2000 x $0.80 + 500 x $4 per million


def test_anthropic_overloaded_is_retryable(local_net, anthropic, monkeypatch):
    monkeypatch.setenv("TEST_LLM_API_KEY", KEY)
    anthropic.script(Reply(status=529, body={"type": "error", "error": {"type": "overloaded_error"}}))
    agent = llm_agent(anthropic.url, provider="anthropic", model="claude-3-5-haiku-20241022")
    with pytest.raises(RetryableError, match="HTTP 529"):
        agent_execute(agent=agent, task_input={"prompt": "x"}, context=ctx())


def test_anthropic_cache_tokens_are_input_tokens_priced_at_the_cache_prices(local_net, anthropic, monkeypatch):
    """Anthropic's input_tokens leaves out the prompt tokens written to its cache and read from
    it: they are reported beside it, billed at 1.25 and 0.1 times the input price."""
    monkeypatch.setenv("TEST_LLM_API_KEY", KEY)
    anthropic.input_tokens, anthropic.output_tokens = 50, 100
    anthropic.cache_write_tokens, anthropic.cache_read_tokens = 2_000, 8_000
    agent = llm_agent(anthropic.url, provider="anthropic", model="claude-sonnet-4-20250514")
    result = agent_execute(agent=agent, task_input={"prompt": "x"}, context=ctx())
    assert (result.usage.input_tokens, result.usage.output_tokens) == (10_050, 100)
    # 50 x $3 + 2000 x $3.75 + 8000 x $0.30 + 100 x $15 per million
    assert result.usage.cost_usd == Decimal("0.011550")


def test_anthropic_one_hour_cache_writes_are_priced_at_twice_the_input_price(local_net, anthropic, monkeypatch):
    """cache_creation_input_tokens sums the writes to the 5-minute cache (1.25 times the input
    price) and to the 1-hour cache (2 times); cache_creation tells them apart. The 1-hour
    writes were priced as 5-minute ones: $3.75 instead of $6 per million for Sonnet 4."""
    monkeypatch.setenv("TEST_LLM_API_KEY", KEY)
    anthropic.input_tokens, anthropic.output_tokens = 0, 0
    anthropic.cache_write_tokens, anthropic.cache_write_1h_tokens = 1_000_000, 1_000_000
    agent = llm_agent(anthropic.url, provider="anthropic", model="claude-sonnet-4-20250514")
    result = agent_execute(agent=agent, task_input={"prompt": "x"}, context=ctx())
    assert result.usage.input_tokens == 2_000_000
    # 1 000 000 x $3.75 + 1 000 000 x $6 per million
    assert result.usage.cost_usd == Decimal("9.750000")


# --- price table ----------------------------------------------------------------------


def test_price_table_prices_the_listed_models():
    assert pricing.cost_usd("gpt-4o", 1_000_000, 1_000_000) == Decimal("12.500000")
    assert pricing.cost_usd("claude-3-5-sonnet-20241022", 1, 1) == Decimal("0.000018")
    assert pricing.cost_usd("llama3:8b", 50_000, 50_000) == Decimal("0.000000")
    assert pricing.cost_usd("gpt-4o-mini", 3, 0) == Decimal("0.000000")  # 0.00000045 rounds to 0
    assert pricing.cost_usd("gpt-4o-mini", 4, 0) == Decimal("0.000001")  # 0.0000006 rounds up
    # Cache tokens are part of the input; a model without cache prices bills them as input.
    assert pricing.cost_usd("gpt-4o", 1_000_000, 0, cached_input_tokens=400_000) == Decimal("2.000000")
    assert pricing.cost_usd(
        "claude-opus-4-20250514", 3_000_000, 0, cached_input_tokens=1_000_000, cache_write_tokens=1_000_000
    ) == Decimal("35.250000")
    assert pricing.cost_usd("llama3:8b", 10, 0, cached_input_tokens=10) == Decimal("0.000000")
    # 1-hour writes are part of the writes: 1M at $18.75, 1M at $30, 1M at $15 for Opus 4.
    assert pricing.cost_usd(
        "claude-opus-4-20250514", 3_000_000, 0, cache_write_tokens=2_000_000, cache_write_1h_tokens=1_000_000
    ) == Decimal("63.750000")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"models": {"m": {"input": "1"}}}, r"models\.m: 'output' is required"),
        ({"models": {"m": {"input": "-1", "output": "1"}}}, r"models\.m\.input: must be a non-negative"),
        ({"models": {"m": {"input": "cheap", "output": "1"}}}, r"models\.m\.input: 'cheap' is not a number"),
        ({"models": {"m": {"input": True, "output": "1"}}}, r"models\.m\.input"),
        ({"models": {"m": {"input": 1, "output": 1, "cache_write": "-1"}}}, r"models\.m\.cache_write: must be a"),
        ({"models": {"m": [1, 2]}}, r"models\.m: must be an object"),
        ({"models": {"a": {"input": 1, "output": 1}, "b": {"input": 1, "output": 1, "aliases": ["a"]}}}, "twice"),
        ([], "must be an object with a 'models' object"),
    ],
)
def test_malformed_price_table_names_the_file_and_entry(data, message):
    with pytest.raises(ImproperlyConfigured, match=rf"^prices-under-test\.json: .*{message}"):
        pricing.parse_price_table(data, source="prices-under-test.json")


def test_unreadable_price_file_names_the_file(tmp_path, monkeypatch):
    bad = tmp_path / "prices.json"
    bad.write_text("{not json")
    monkeypatch.setattr(pricing, "PRICES_PATH", bad)
    pricing.price_table.cache_clear()
    try:
        with pytest.raises(ImproperlyConfigured, match=f"{bad}: cannot be read as JSON"):
            pricing.price_table()
    finally:
        pricing.price_table.cache_clear()


# --- end to end on a real worker ------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("fast_path", ["true", "false"], ids=["fast-path", "general-path"])
def test_workflow_with_http_and_llm_agents_records_retries_tokens_and_cost(engine, fast_path):
    with AgentService() as service, OpenAIServer(api_key=KEY) as llm:
        engine(
            env={
                "ENGINE_FAST_PATH": fast_path,
                "AGENT_HTTP_ALLOW_PRIVATE": "true",
                "AGENT_HTTP_ALLOWED_HOSTS": "127.0.0.1",
                "AGENT_API_KEY_HOSTS": llm.url,
                "FAKE_LLM_API_KEY": KEY,
            }
        )
        Agent.objects.create(id="leads-svc", name="Lead service", executor=Agent.Executor.HTTP, url=service.url)
        Agent.objects.create(
            id="writer-llm",
            name="Writer",
            executor=Agent.Executor.LLM,
            provider="openai",
            url=llm.base_url,
            model="gpt-4o-mini",
            api_key_env="FAKE_LLM_API_KEY",
            system_prompt="Write a summary.",
        )
        llm.script(Reply(status=429, body={"error": {"message": "Rate limit reached"}}, headers={"Retry-After": "1"}))
        workflow, _ = workflow_submit(
            spec={
                "name": "leads",
                "tasks": [
                    {"name": "research", "agent": "leads-svc", "input": {"description": "Find fintech leads"}},
                    {
                        "name": "write",
                        "agent": "writer-llm",
                        "input": {"prompt": "Summarise."},
                        "depends_on": ["research"],
                        "max_retries": 2,
                    },
                ],
            }
        )
        workflow = wait_for(
            lambda: (w := Workflow.objects.get(pk=workflow.pk)).is_terminal and w, timeout=40, what="workflow"
        )

    assert workflow.status == Workflow.Status.COMPLETED
    research = TaskExecution.objects.get(workflow=workflow, task_name="research")
    assert research.output_data["result"] == "Done: Find fintech leads"
    assert (research.output_tokens, research.cost_usd) == (1523, Decimal("0.022845"))
    assert service.requests[0].body["task_details"]["context"] == {"description": "Find fintech leads"}

    write = TaskExecution.objects.get(workflow=workflow, task_name="write")
    tries = list(TaskAttempt.objects.filter(execution=write).order_by("attempt_number"))
    assert [(a.attempt_number, a.status, a.cause, a.retryable) for a in tries] == [
        (1, TaskAttempt.Status.FAILED, TaskAttempt.Cause.ERROR, True),
        (2, TaskAttempt.Status.SUCCEEDED, None, None),
    ]
    assert "HTTP 429" in tries[0].error and KEY not in tries[0].error
    assert (tries[1].started_at - tries[0].finished_at).total_seconds() >= 1.0  # Retry-After honoured
    assert (tries[0].tokens_used, tries[0].cost_usd) == (0, 0)
    assert (tries[1].input_tokens, tries[1].output_tokens, tries[1].cost_usd) == (1200, 350, Decimal("0.000390"))
    assert (write.input_tokens, write.output_tokens, write.tokens_used, write.cost_usd) == (
        1200,
        350,
        1550,
        Decimal("0.000390"),
    )
    assert write.output_data["content"].startswith("echo: Summarise.")
    assert (write.output_data["model"], write.output_data["finish_reason"]) == ("gpt-4o-mini", "stop")
    user_message = llm.requests[-1].body["messages"][1]["content"]
    assert "Done: Find fintech leads" in user_message  # the upstream output reached the model
    assert (workflow.total_tokens_used, workflow.total_cost_usd) == (1523 + 1550, Decimal("0.023235"))
