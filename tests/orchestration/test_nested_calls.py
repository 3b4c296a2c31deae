"""Calls inside an attempt, with real workers: the hand-offs of a retried attempt, a model that
calls a tool by a name longer than the record's column, a hand-off whose input cannot be stored."""

from __future__ import annotations

import json

import pytest

from orchestration.event_types import EventType
from orchestration.models import Agent, AgentInteraction, Event, TaskAttempt, TaskExecution, Workflow
from orchestration.services.workflows import workflow_submit
from tests.engine import wait_for
from tests.fakes.servers import OpenAIServer, Reply
from tests.orchestration.edge_agents import edge_agent
from tests.orchestration.test_agent_runtime import KEY
from tests.orchestration.test_llm_answers import LOCAL_NET, calls_answer


def finished(workflow: Workflow, timeout: float = 60) -> Workflow:
    return wait_for(lambda: (w := Workflow.objects.get(pk=workflow.pk)).is_terminal and w, timeout=timeout)


@pytest.mark.django_db(transaction=True)
def test_the_handoffs_of_a_retried_attempt_each_name_the_attempt_that_made_them(engine):
    engine()
    edge_agent("relay", "hands_off")
    workflow, _ = workflow_submit(
        spec={
            "name": "relay",
            "tasks": [{"name": "relay", "agent": "relay", "input": {"to": "flaky", "fail_times": 1}, "max_retries": 2}],
        }
    )
    assert finished(workflow).status == Workflow.Status.COMPLETED
    task = TaskExecution.objects.get(workflow=workflow)
    attempts = list(TaskAttempt.objects.filter(execution=task).order_by("attempt_number"))
    assert [(a.attempt_number, a.status) for a in attempts] == [(1, "failed"), (2, "succeeded")]
    handoffs = list(AgentInteraction.objects.filter(execution=task).order_by("created_at"))
    assert [h.payload.get("attempt_number") for h in handoffs] == [1, 2]
    assert "planned failure 1 of 1" in handoffs[0].payload["error"] and handoffs[1].payload["output"] == {
        "succeeded_on_attempt": 2
    }
    events = Event.objects.filter(event_type=EventType.AGENT_INTERACTION, workflow_id=workflow.pk)
    assert sorted(e.payload.get("attempt_number") for e in events) == [1, 2]
    started = Event.objects.filter(event_type=EventType.AGENT_STARTED, workflow_id=workflow.pk).order_by("sequence")
    assert [e.payload.get("attempt_number") for e in started] == [1, 2]


@pytest.mark.django_db(transaction=True)
def test_a_model_calling_a_tool_by_a_name_longer_than_any_is_told_so_and_goes_on(engine):
    name = "lookup_" + "x" * 300
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
        llm.script(Reply(body=calls_answer(1, name)))
        workflow, _ = workflow_submit(
            spec={"name": "calc", "tasks": [{"name": "calc", "agent": "calc-llm", "input": {"prompt": "go"}}]}
        )
        workflow = finished(workflow)
    attempts = list(TaskAttempt.objects.filter(execution__workflow=workflow).order_by("attempt_number"))
    assert [(a.status, a.error) for a in attempts] == [("succeeded", None)]
    assert workflow.status == Workflow.Status.COMPLETED
    told = json.loads(llm.requests[1].body["messages"][-1]["content"])
    assert told == {"error": f"agent 'calc-llm' may not call tool {name!r} (its definition allows: calculator)"}
    event = Event.objects.get(event_type=EventType.TOOL_EXECUTED)
    assert event.payload["tool_name"] == name and event.payload["error"] == told["error"]
    assert event.payload["attempt_number"] == 1 and event.entity_id is None, "no tool has that name"


@pytest.mark.django_db(transaction=True)
def test_a_handoff_with_an_input_the_record_cannot_store_is_refused_before_the_other_agent_runs(engine):
    engine()
    edge_agent("sloppy", "hands_off_unstorable")
    workflow, _ = workflow_submit(
        spec={"name": "sloppy", "tasks": [{"name": "sloppy", "agent": "sloppy", "input": {}, "max_retries": 2}]}
    )
    assert finished(workflow).status == Workflow.Status.FAILED
    attempts = list(TaskAttempt.objects.filter(execution__workflow=workflow))
    assert [(a.status, a.retryable) for a in attempts] == [("failed", False)]
    assert attempts[0].error == (
        "PermanentError: handoff from 'sloppy' to 'flaky': its input cannot be stored: "
        "input.note: contains a NUL character (\\u0000)"
    )
    assert not Event.objects.filter(event_type=EventType.AGENT_STARTED).exists(), "flaky never ran"
    assert not AgentInteraction.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_a_handoff_whose_other_agent_fails_with_a_nul_in_its_message_is_recorded_and_fails_the_attempt(engine):
    engine()
    edge_agent("relay", "hands_off")
    edge_agent("nul-failure", "fails_with_nul")
    workflow, _ = workflow_submit(
        spec={
            "name": "relay",
            "tasks": [{"name": "relay", "agent": "relay", "input": {"to": "nul-failure"}, "max_retries": 2}],
        }
    )
    assert finished(workflow).status == Workflow.Status.FAILED
    attempts = list(TaskAttempt.objects.filter(execution__workflow=workflow))
    assert [(a.status, a.retryable, a.error) for a in attempts] == [
        ("failed", False, "PermanentError: provider said: bin\ufffdary")
    ]
    [handoff] = AgentInteraction.objects.all()
    assert handoff.payload["error"] == "PermanentError: provider said: bin\ufffdary"
    event = Event.objects.get(event_type=EventType.AGENT_INTERACTION)
    assert event.payload["error"] == handoff.payload["error"] and event.payload["attempt_number"] == 1


@pytest.mark.django_db(transaction=True)
def test_feedback_with_a_payload_the_record_cannot_store_is_refused_for_good(engine):
    engine()
    edge_agent("critic", "feedback_unstorable")
    workflow, _ = workflow_submit(
        spec={"name": "critic", "tasks": [{"name": "critic", "agent": "critic", "input": {}, "max_retries": 2}]}
    )
    assert finished(workflow).status == Workflow.Status.FAILED
    attempts = list(TaskAttempt.objects.filter(execution__workflow=workflow))
    assert [(a.status, a.retryable, a.error) for a in attempts] == [
        (
            "failed",
            False,
            "PermanentError: feedback from 'critic' to 'flaky': its payload cannot be stored: "
            "payload.note: contains a NUL character (\\u0000)",
        )
    ]
    assert not AgentInteraction.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_a_tool_failing_with_a_nul_in_its_message_is_recorded_and_told_to_the_agent(engine):
    engine()
    agent = edge_agent("tooled", "calls_a_tool_failing_with_nul")
    agent.config = {"tools": ["nul_crash"]}
    agent.save(update_fields=["config"])
    workflow, _ = workflow_submit(
        spec={"name": "tooled", "tasks": [{"name": "tooled", "agent": "tooled", "input": {}, "max_retries": 2}]}
    )
    workflow = finished(workflow)
    task = TaskExecution.objects.get(workflow=workflow)
    attempts = TaskAttempt.objects.filter(execution=task)
    assert [(a.status, a.error) for a in attempts] == [("succeeded", None)]
    assert workflow.status == Workflow.Status.COMPLETED
    assert task.output_data == {"told": "tool 'nul_crash' failed: ValueError: bin<NUL>ary"}
    event = Event.objects.get(event_type=EventType.TOOL_EXECUTED)
    assert event.payload["error"] == "tool 'nul_crash' failed: ValueError: bin\ufffdary"


@pytest.mark.django_db(transaction=True)
def test_a_handoff_with_an_input_nested_too_deep_to_write_is_refused_for_good(engine):
    engine()
    edge_agent("deep", "hands_off_too_deep")
    workflow, _ = workflow_submit(
        spec={"name": "deep", "tasks": [{"name": "deep", "agent": "deep", "input": {}, "max_retries": 2}]}
    )
    assert finished(workflow).status == Workflow.Status.FAILED
    attempts = list(TaskAttempt.objects.filter(execution__workflow=workflow))
    assert [(a.status, a.retryable) for a in attempts] == [("failed", False)]
    assert attempts[0].error.startswith(
        "PermanentError: handoff from 'deep' to 'flaky': its input cannot be stored: input is not JSON: "
        "maximum recursion depth exceeded"
    )
    assert not Event.objects.filter(event_type=EventType.AGENT_STARTED).exists(), "flaky never ran"
