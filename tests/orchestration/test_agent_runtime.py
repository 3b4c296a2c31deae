"""Tools, hand-offs and reviews, and the llm executor's tool loop: recorded as the seeds ask."""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from celery.exceptions import SoftTimeLimitExceeded

from orchestration.errors import PermanentError
from orchestration.event_types import EventType
from orchestration.models import Agent, AgentInteraction, Event, TaskExecution, Workflow
from orchestration.runtime.collaboration import equip
from orchestration.runtime.context import TaskContext
from orchestration.runtime.executors import agent_execute
from orchestration.services.workflows import workflow_submit
from tests.engine import wait_for
from tests.fakes.servers import AnthropicServer, FakeServer, OpenAIServer, Recorded, Reply

KEY = "sk-test-" + "k3y" * 6

TEXT = (
    "Celery workers execute agent tasks and record every attempt in PostgreSQL. "
    "Each attempt stores tokens, cost and timing for later analysis. "
    "Failed attempts are retried with exponential backoff until the retry budget runs out. "
    "The audit log keeps every event so that training data can be rebuilt exactly. "
    "Operators inspect workflows in the admin console and through the REST API."
)


def finished(workflow: Workflow, timeout: float = 40) -> Workflow:
    return wait_for(lambda: (w := Workflow.objects.get(pk=workflow.pk)).is_terminal and w, timeout=timeout)


def working_on(agent_id: str, task_name: str) -> tuple[TaskExecution, TaskContext]:
    """A task of the agent, outside any workflow, and the context the engine would give it."""
    agent = Agent.objects.get(pk=agent_id)
    task = TaskExecution.objects.create(agent=agent, task_name=task_name)
    context = TaskContext(
        execution_id=task.execution_id,
        workflow_id=None,
        task_name=task_name,
        agent_id=agent_id,
        attempt_number=1,
        timeout_seconds=30,
        upstream={},
    )
    return task, equip(context, agent)


# --- tools and hand-offs on a real worker ---------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_tool_calls_are_recorded_as_tool_executed_events_with_seed_002_fields(engine):
    engine()
    workflow, _ = workflow_submit(
        spec={"name": "analyse", "tasks": [{"name": "text", "agent": "text-analyst", "input": {"text": TEXT}}]}
    )
    assert finished(workflow).status == Workflow.Status.COMPLETED
    task = TaskExecution.objects.get(workflow=workflow)
    events = list(
        Event.objects.filter(event_type=EventType.TOOL_EXECUTED, workflow_id=workflow.pk).order_by("sequence")
    )
    assert [e.payload["tool_name"] for e in events] == ["text_stats", "keywords"]
    stats = events[0].payload
    assert set(stats) >= {
        "execution_id",
        "agent_id",
        "tool_name",
        "input_params",
        "output_result",
        "execution_time_ms",
        "error",
    }
    assert (stats["execution_id"], stats["agent_id"], stats["error"]) == (task.execution_id, "text-analyst", None)
    assert stats["input_params"] == {"text": TEXT}
    assert stats["output_result"] == task.output_data["stats"]
    assert stats["output_result"]["sentences"] == 5
    assert events[1].payload["output_result"]["keywords"] == task.output_data["keywords"]
    assert (events[0].entity_type, events[0].entity_id, events[0].agent_id) == ("tool", "text_stats", "text-analyst")


@pytest.mark.django_db(transaction=True)
def test_reviewer_sends_feedback_and_hands_back_for_revision_until_approved(engine):
    engine()
    workflow, _ = workflow_submit(
        spec={
            "name": "review loop",
            "tasks": [
                {"name": "summary", "agent": "summarizer", "input": {"text": TEXT, "max_sentences": 4}},
                {"name": "terms", "agent": "text-analyst", "input": {"text": TEXT}},
                {
                    "name": "review",
                    "agent": "reviewer",
                    "depends_on": ["summary", "terms"],
                    "input": {"text": TEXT, "max_words": 30, "min_keywords": 1, "author": "summarizer"},
                },
            ],
        }
    )
    assert finished(workflow).status == Workflow.Status.COMPLETED
    summary = TaskExecution.objects.get(workflow=workflow, task_name="summary").output_data
    review = TaskExecution.objects.get(workflow=workflow, task_name="review")
    out = review.output_data
    assert summary["words"] > 30, "the first draft is too long, so the reviewer must ask for a revision"
    assert out["approved"] is True and out["revisions"] >= 1
    assert out["rounds"][0]["approved"] is False and "words; at most 30" in out["rounds"][0]["problems"][0]
    assert len(out["summary"].split()) <= 30

    interactions = list(AgentInteraction.objects.filter(workflow=workflow).order_by("created_at"))
    kinds = [(i.interaction_type, i.from_agent_id, i.to_agent_id) for i in interactions]
    assert kinds[:2] == [("feedback", "reviewer", "summarizer"), ("handoff", "reviewer", "summarizer")]
    handoff = interactions[1]
    assert handoff.execution_id == review.execution_id
    assert handoff.payload["input"]["feedback"]["max_words"] == 30
    assert handoff.payload["output"]["summary"] == out["summary"]
    assert handoff.payload["duration_ms"] >= 0 and handoff.message.startswith("revise: ")
    events = Event.objects.filter(event_type=EventType.AGENT_INTERACTION, workflow_id=workflow.pk)
    assert sorted(e.payload["interaction_type"] for e in events) == sorted(i.interaction_type for i in interactions)
    # the summarizer's revision ran its own tool, on the reviewer's task
    revisions = Event.objects.filter(
        event_type=EventType.TOOL_EXECUTED, agent_id="summarizer", payload__execution_id=review.execution_id
    )
    assert revisions.count() >= 1
    # the summarizer's start in the reviewer's attempt is on record before anything it did there
    started = Event.objects.filter(event_type=EventType.AGENT_STARTED, workflow_id=workflow.pk).order_by("sequence")
    assert [(e.entity_id, e.payload["from_agent_id"], e.payload["interaction_type"]) for e in started] == [
        ("summarizer", "reviewer", "handoff")
    ] * sum(i.interaction_type == "handoff" for i in interactions)
    first = started[0]
    assert first.agent_id == "summarizer" and first.payload["execution_id"] == review.execution_id
    assert first.payload["depth"] == 1
    handoff_event = events.filter(payload__interaction_type="handoff").order_by("sequence").first()
    assert first.sequence < min(e.sequence for e in revisions) and first.sequence < handoff_event.sequence


@pytest.mark.django_db
def test_handoffs_refuse_self_unknown_inactive_and_too_deep(builtin_agents, settings):
    _, context = working_on("reviewer", "review")
    with pytest.raises(PermanentError, match="cannot send a handoff to itself"):
        context.peers.handoff("reviewer", {})
    with pytest.raises(PermanentError, match="no agent 'ghost'"):
        context.peers.handoff("ghost", {})
    Agent.objects.filter(pk="echo").update(status=Agent.Status.INACTIVE)
    with pytest.raises(PermanentError, match="agent 'echo' is inactive"):
        context.peers.handoff("echo", {})
    settings.AGENT_MAX_DELEGATION_DEPTH = 1
    deep = equip(context, Agent.objects.get(pk="summarizer"), depth=1)
    with pytest.raises(PermanentError, match="more than 1 nested hand-offs"):
        deep.peers.handoff("text-analyst", {"text": "x"})
    # a failed hand-off is still on record, with its error
    with pytest.raises(PermanentError, match=r"input\.text is required"):
        context.peers.handoff("summarizer", {})
    failed = AgentInteraction.objects.get(to_agent_id="summarizer")
    assert failed.payload["error"].startswith("PermanentError: input.text is required")
    # only the hand-off that began has an agent_started: the refused ones never started anyone
    started = Event.objects.filter(event_type=EventType.AGENT_STARTED)
    assert [(e.entity_id, e.payload["from_agent_id"]) for e in started] == [("summarizer", "reviewer")]


@pytest.mark.django_db
def test_review_and_collaboration_run_the_other_agent_and_are_recorded(builtin_agents):
    task, context = working_on("summarizer", "write")
    verdict = context.peers.review(
        "reviewer",
        {"summary": "Workers record every attempt and its cost in a ledger.", "words": 10},
        criteria={"max_words": 5, "keywords": ["cost", "tokens"], "min_keywords": 2},
    )
    assert verdict["approved"] is False
    assert verdict["problems"] == [
        "10 words; at most 5",
        "covers 1 of the key phrases ['cost', 'tokens']; needs 2",
    ]
    assert verdict["covered_keywords"] == ["cost"]
    sums = context.peers.collaborate("calculator", {"expressions": {"a": "2 * 21", "b": "a + 1"}})
    assert sums == {"results": {"a": 42, "b": 43}}
    review, collaboration = AgentInteraction.objects.filter(execution=task).order_by("created_at")
    assert (review.interaction_type, review.from_agent_id, review.to_agent_id) == ("review", "summarizer", "reviewer")
    assert review.payload["output"] == verdict and review.payload["input"]["criteria"]["max_words"] == 5
    assert (collaboration.interaction_type, collaboration.to_agent_id) == ("collaboration", "calculator")
    calls = Event.objects.filter(event_type=EventType.TOOL_EXECUTED, agent_id="calculator")
    assert [c.payload["execution_id"] for c in calls] == [task.execution_id] * 2, "on the asking agent's task"
    started = Event.objects.filter(event_type=EventType.AGENT_STARTED).order_by("sequence")
    assert [(e.entity_id, e.payload["interaction_type"], e.payload["execution_id"]) for e in started] == [
        ("reviewer", "review", task.execution_id),
        ("calculator", "collaboration", task.execution_id),
    ]
    assert started[1].sequence < min(c.sequence for c in calls)


# --- the llm executor's tool loop -------------------------------------------------------------


@pytest.fixture
def local_net(settings, monkeypatch):
    settings.AGENT_HTTP_ALLOW_PRIVATE = True
    settings.AGENT_HTTP_ALLOWED_HOSTS = ["127.0.0.1"]
    monkeypatch.setenv("TEST_LLM_API_KEY", KEY)
    return settings


@pytest.fixture
def openai(settings) -> Iterator[OpenAIServer]:
    with OpenAIServer(api_key=KEY, tool_call={"expression": "6 * 7"}) as server:
        settings.AGENT_API_KEY_HOSTS = [server.url]  # its origin: http, its port
        yield server


def tool_agent(url: str, provider: str = "openai", model: str = "gpt-4o-mini") -> Agent:
    return Agent.objects.create(
        id="calc-llm",
        name="Calc",
        executor=Agent.Executor.LLM,
        provider=provider,
        url=url,
        model=model,
        api_key_env="TEST_LLM_API_KEY",
        config={"tools": ["calculator"]},
    )


def run(agent: Agent, task_input: dict) -> tuple:
    context = TaskContext(
        execution_id="exec-9",
        workflow_id=None,
        task_name="t",
        agent_id=agent.id,
        attempt_number=1,
        timeout_seconds=30,
        upstream={},
    )
    equipped = equip(context, agent)
    return agent_execute(agent=agent, task_input=task_input, context=equipped), equipped


@pytest.mark.django_db
def test_openai_tool_loop_runs_the_tool_and_sends_the_result_back(local_net, openai):
    agent = tool_agent(openai.base_url)
    result, _ = run(agent, {"prompt": "What is 6 * 7?"})
    first, second = (r.body for r in openai.requests)
    assert [t["function"]["name"] for t in first["tools"]] == ["calculator"]
    assert first["tools"][0]["function"]["parameters"]["required"] == ["expression"]
    asked, answered = second["messages"][-2:]
    assert asked["role"] == "assistant" and asked["tool_calls"][0]["id"] == "call_abc123"
    assert answered == {
        "role": "tool",
        "tool_call_id": "call_abc123",
        "content": json.dumps({"expression": "6 * 7", "result": 42}, sort_keys=True),
    }
    assert result.output["content"].startswith('echo: {"expression": "6 * 7", "result": 42}')
    assert result.output["tool_rounds"] == 1 and "tool_calls" not in result.output
    # two requests, both paid for
    assert (result.usage.input_tokens, result.usage.output_tokens) == (2 * 1200, 2 * 350)
    assert result.usage.cost_usd == Decimal("0.000780")
    [event] = Event.objects.filter(event_type=EventType.TOOL_EXECUTED)
    assert event.payload["tool_call_id"] == "call_abc123"
    assert event.payload["output_result"] == {"expression": "6 * 7", "result": 42}


@pytest.mark.django_db
def test_a_refused_tool_call_is_told_to_the_model_which_can_recover(local_net, openai):
    openai.tool_call = {"expression": 6}  # not a string: refused by the schema
    result, _ = run(tool_agent(openai.base_url), {"prompt": "6 * 7?"})
    told = json.loads(openai.requests[1].body["messages"][-1]["content"])
    assert told == {"error": "tool 'calculator': invalid arguments: expression: 6 is not of type 'string'"}
    assert result.output["tool_rounds"] == 1
    assert Event.objects.get(event_type=EventType.TOOL_EXECUTED).payload["error"] == told["error"]


class MetadataService(FakeServer):
    """A cloud metadata service's credentials answer, to any request."""

    def answer(self, request: Recorded) -> tuple[int, Any]:
        return 200, {"AccessKeyId": "AKIAEXAMPLE", "SecretAccessKey": "s3cr3t"}


@pytest.mark.django_db
def test_a_schema_given_to_json_validate_fetches_nothing(local_net, openai):
    # The schema is the model's: a $ref to a URL would have the worker fetch it (jsonschema's
    # default), past the URL policy, with no timeout. Here the "metadata service" is on an
    # address the policy does not allow (only 127.0.0.1 is).
    with MetadataService(host="127.0.0.2") as metadata:
        ref = f"{metadata.url}/latest/meta-data/iam/security-credentials/role"
        openai.tool_call = {"document": {"a": 1}, "schema": {"$ref": ref}}
        agent = tool_agent(openai.base_url)
        agent.config = {"tools": ["json_validate"]}
        result, _ = run(agent, {"prompt": "validate"})
    assert metadata.requests == []
    told = json.loads(openai.requests[1].body["messages"][-1]["content"])
    assert told == {"error": f"json_validate: the schema's $ref {ref!r} is not in the schema (no URL is fetched)"}
    assert result.output["tool_rounds"] == 1


@pytest.mark.django_db
def test_tool_rounds_are_bounded(local_net, openai, settings):
    settings.LLM_MAX_TOOL_ROUNDS = 2
    call = {
        "id": "call_x",
        "type": "function",
        "function": {"name": "calculator", "arguments": json.dumps({"expression": "1"})},
    }
    body = {
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [call]}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5},
    }
    openai.script(*[Reply(body=body) for _ in range(3)])
    with pytest.raises(PermanentError, match="still called tools after 2 rounds") as caught:
        run(tool_agent(openai.base_url), {"prompt": "loop"})
    assert len(openai.requests) == 3
    assert caught.value.usage.input_tokens == 30, "every request's tokens are on the failed attempt"


@pytest.mark.django_db
def test_anthropic_tool_loop_uses_tool_use_and_tool_result_blocks(local_net):
    with AnthropicServer(api_key=KEY, tool_call={"expression": "2 ** 5"}) as server:
        local_net.AGENT_API_KEY_HOSTS = [server.url]
        agent = tool_agent(server.url, provider="anthropic", model="claude-3-5-haiku-latest")
        result, _ = run(agent, {"prompt": "2 to the 5th?"})
    first, second = (r.body for r in server.requests)
    assert first["tools"][0]["name"] == "calculator" and "input_schema" in first["tools"][0]
    assistant_turn, user_turn = second["messages"][-2:]
    assert assistant_turn["content"][-1] == {
        "type": "tool_use",
        "id": "toolu_01abc",
        "name": "calculator",
        "input": {"expression": "2 ** 5"},
    }
    assert user_turn["role"] == "user"
    assert user_turn["content"][0]["tool_use_id"] == "toolu_01abc"
    assert json.loads(user_turn["content"][0]["content"])["result"] == 32
    assert result.output["content"].startswith("The tool said")
    assert (result.usage.input_tokens, result.usage.output_tokens) == (4000, 1000)


def looping_tool_call(name: str = "calculator") -> dict:
    call = {
        "id": "call_x",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps({"expression": "1"})},
    }
    return {
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [call]}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5},
    }


@pytest.mark.django_db
def test_a_failed_handoff_is_paid_for_once(local_net, openai, settings, builtin_agents):
    settings.LLM_MAX_TOOL_ROUNDS = 1
    tool_agent(openai.base_url)
    openai.script(*[Reply(body=looping_tool_call()) for _ in range(2)])
    _, context = working_on("reviewer", "review")
    with pytest.raises(PermanentError, match="still called tools after 1 rounds") as caught:
        context.peers.handoff("calc-llm", {"prompt": "loop"})
    # attempt_run adds the exception's usage to the delegated spend: the sum is what was paid
    spent = caught.value.usage + context.spend
    assert (spent.input_tokens, spent.output_tokens) == (20, 10)


@pytest.mark.django_db
def test_a_transient_tool_failure_after_paid_rounds_carries_their_usage(local_net, openai):
    from orchestration.errors import RetryableError
    from orchestration.runtime.tools import tool

    name = f"flaky-tool-{uuid.uuid4().hex[:6]}"

    @tool(name=name, description="fails for now", parameters={"type": "object"})
    def flaky_tool(**_: object) -> None:
        raise RetryableError("backend busy")

    agent = tool_agent(openai.base_url)
    agent.config = {"tools": [name]}
    openai.script(Reply(body=looping_tool_call(name)))
    with pytest.raises(RetryableError, match="backend busy") as caught:
        run(agent, {"prompt": "go"})
    assert (caught.value.usage.input_tokens, caught.value.usage.output_tokens) == (10, 5)


@pytest.mark.django_db
def test_a_malformed_tool_call_in_a_later_round_is_refused_with_the_paid_usage(local_net, openai):
    bad = looping_tool_call()
    bad["choices"][0]["message"]["tool_calls"] = ["oops"]
    openai.script(Reply(body=looping_tool_call()), Reply(body=bad))
    with pytest.raises(PermanentError) as caught:
        run(tool_agent(openai.base_url), {"prompt": "go"})
    assert (caught.value.usage.input_tokens, caught.value.usage.output_tokens) == (20, 10)


@pytest.mark.django_db
def test_a_soft_time_limit_during_a_later_model_request_carries_the_paid_usage(local_net, openai):
    """Celery's soft limit raises SoftTimeLimitExceeded wherever the worker is (here: waiting
    for the model's second answer); the rounds already paid must go with it."""

    def soft_limit(signum: int, frame: object) -> None:
        raise SoftTimeLimitExceeded()

    def limit_on_the_second_request() -> None:
        # The limit fires once the second request has reached the model, however long the
        # first round took (a fixed timer fired before it on a loaded machine).
        deadline = time.monotonic() + 30
        while len(openai.requests) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGALRM)

    previous = signal.signal(signal.SIGALRM, soft_limit)
    firing = threading.Thread(target=limit_on_the_second_request, daemon=True)
    try:
        openai.script(Reply(body=looping_tool_call()), Reply(delay=30.0))
        firing.start()
        with pytest.raises(SoftTimeLimitExceeded) as caught:
            run(tool_agent(openai.base_url), {"prompt": "go"})
    finally:
        firing.join(timeout=35)
        signal.signal(signal.SIGALRM, previous)
    assert len(openai.requests) == 2
    usage = getattr(caught.value, "usage", None)
    assert usage is not None and (usage.input_tokens, usage.output_tokens) == (10, 5)


@pytest.mark.django_db
def test_a_call_of_an_unknown_tool_is_answered_with_an_error_and_the_loop_goes_on(local_net, openai):
    openai.script(Reply(body=looping_tool_call("teleport")))
    result, _ = run(tool_agent(openai.base_url), {"prompt": "go"})
    told = json.loads(openai.requests[1].body["messages"][-1]["content"])
    assert told == {"error": "agent 'calc-llm' may not call tool 'teleport' (its definition allows: calculator)"}
    assert "tool_calls" not in result.output and result.output["tool_rounds"] == 1


def test_anthropic_history_leaves_out_empty_assistant_turns_and_groups_tool_results():
    from orchestration.runtime.llm import anthropic_messages

    call = {"id": "t1", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "1"}'}}
    converted = anthropic_messages(
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "t1", "content": '{"result": 1}'},
        ]
    )
    assert converted == [
        {"role": "user", "content": "hi"},
        {"role": "user", "content": "again"},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "t1", "name": "calculator", "input": {"expression": "1"}}],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": '{"result": 1}'}]},
    ]
