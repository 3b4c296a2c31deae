"""The http and llm executors as network clients, against servers that misbehave at the
protocol level: a trickled answer, JSON nested past the parser's limit, a key a header cannot
carry, OpenAI's quota 429."""

from __future__ import annotations

import socket
import time

import pytest

from orchestration.errors import PermanentError, RetryableError
from orchestration.models import Agent
from orchestration.runtime.executors import agent_execute
from tests.fakes.servers import OpenAIServer, RawServer, Reply
from tests.orchestration.test_executors import KEY, ctx, http_agent, llm_agent

DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.fixture
def local_net(settings):
    settings.AGENT_HTTP_ALLOW_PRIVATE = True
    settings.AGENT_HTTP_ALLOWED_HOSTS = ["127.0.0.1"]
    return settings


def _trickle(conn: socket.socket) -> None:
    body = b'{"result": "' + b"x" * 40 + b'"}'
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
    for byte in body:  # each read comes well within the read timeout; the whole takes 13 s
        conn.sendall(bytes([byte]))
        time.sleep(0.25)


def test_an_answer_trickled_byte_by_byte_is_cut_off_near_the_read_timeout(local_net):
    local_net.AGENT_HTTP_READ_TIMEOUT_SECONDS = 1
    local_net.AGENT_HTTP_CONNECT_TIMEOUT_SECONDS = 1
    with RawServer(_trickle) as server:
        started = time.monotonic()
        with pytest.raises(RetryableError, match="timed out"):
            agent_execute(agent=http_agent(server.url), task_input={}, context=ctx())
    assert time.monotonic() - started < 10  # cut at about 2 s (connect + read timeout); the whole body takes 13 s


def test_an_agent_service_answering_json_nested_too_deeply_fails_for_good(local_net):
    with (
        RawServer(lambda conn: conn.sendall(_ok(DEEP))) as server,
        pytest.raises(PermanentError, match=r"not JSON.*nested too deeply"),
    ):
        agent_execute(agent=http_agent(server.url), task_input={}, context=ctx())


def test_a_model_answering_json_nested_too_deeply_fails_for_good(local_net, monkeypatch):
    monkeypatch.setenv("TEST_LLM_API_KEY", KEY)
    with OpenAIServer(api_key=KEY) as server:
        local_net.AGENT_API_KEY_HOSTS = [server.url]
        server.script(Reply(body=DEEP))
        with pytest.raises(PermanentError, match=r"not JSON.*nested too deeply"):
            agent_execute(agent=llm_agent(server.base_url), task_input={"prompt": "x"}, context=ctx())


def _ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body


@pytest.mark.parametrize("key", [KEY + "\nsecond-line", KEY + "\u00e9"], ids=["line-break", "non-ascii"])
def test_a_key_a_header_cannot_carry_is_refused_without_quoting_it(local_net, monkeypatch, key):
    monkeypatch.setenv("TEST_LLM_API_KEY", key)
    with OpenAIServer(api_key=KEY) as server:
        local_net.AGENT_API_KEY_HOSTS = [server.url]
        with pytest.raises(PermanentError, match="a header cannot carry") as info:
            agent_execute(agent=llm_agent(server.base_url), task_input={"prompt": "x"}, context=ctx())
        assert server.requests == []
    assert "s3cr3t" not in str(info.value)


def test_openai_insufficient_quota_429_is_permanent_and_a_rate_limit_429_is_not(local_net, monkeypatch):
    monkeypatch.setenv("TEST_LLM_API_KEY", KEY)
    quota = {
        "error": {
            "message": "You exceeded your current quota, please check your plan and billing details.",
            "type": "insufficient_quota",
            "param": None,
            "code": "insufficient_quota",
        }
    }
    rate = {
        "error": {"message": "Rate limit reached", "type": "requests", "param": None, "code": "rate_limit_exceeded"}
    }
    with OpenAIServer(api_key=KEY) as server:
        local_net.AGENT_API_KEY_HOSTS = [server.url]
        agent = llm_agent(server.base_url)
        server.script(Reply(status=429, body=quota, headers={"Retry-After": "20"}))
        with pytest.raises(PermanentError, match=r"HTTP 429.*current quota"):
            agent_execute(agent=agent, task_input={"prompt": "x"}, context=ctx())
        server.script(Reply(status=429, body=rate, headers={"Retry-After": "2"}))
        with pytest.raises(RetryableError, match="HTTP 429") as info:
            agent_execute(agent=agent, task_input={"prompt": "x"}, context=ctx())
    assert info.value.retry_after == 2.0


def test_a_keyless_openai_compatible_server_is_unaffected_by_the_key_check(local_net):
    """An OpenAI-compatible server without a key (a local Ollama) is unaffected."""
    with OpenAIServer(api_key=None) as server:
        agent = Agent(id="w", name="W", executor=Agent.Executor.LLM, url=server.base_url, model="llama3")
        assert agent_execute(agent=agent, task_input={"prompt": "hi"}, context=ctx()).output["content"] == "echo: hi"
