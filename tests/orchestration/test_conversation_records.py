"""Conversations as recorded: what a reply whose tool-call transcript the database cannot store
leaves in the thread, and the tokens of an error message against its attempt's. (Each found by
an audit and failing before its fix.)"""

from __future__ import annotations

from decimal import Decimal

import pytest

from orchestration.models import Agent, AgentPlaygroundMessage, TaskAttempt, TaskExecution
from orchestration.services.conversations import conversation_message_post
from orchestration.services.execution import Outcome, attempt_run
from tests.fakes.servers import OpenAIServer, Reply
from tests.orchestration.test_conversations import KEY, _calls_tool, _completion, _tool_agent, llm_env, reply_to


@pytest.mark.django_db(transaction=True)
def test_a_tool_call_id_too_long_to_store_fails_the_reply_instead_of_leaving_it_running(engine):
    """A server answering a tool call with an id longer than the thread's tool_call_id column
    (255): the reply's transcript could not be stored, nor the failure that stores it too; the
    attempt stayed running (the thread "still answering") until the reaper timed it out, and the
    model was asked again."""
    long_id = "call_" + "x" * 300
    with OpenAIServer(api_key=KEY) as llm:
        engine(env=llm_env(llm))
        agent = _tool_agent(llm, ["calculator"])
        llm.script(
            _calls_tool(long_id, "calculator", {"expression": "2+2"}),
            Reply(body=_completion({"role": "assistant", "content": "four"})),
        )
        asked = conversation_message_post(agent=agent, instance_id="long-id", content="2+2?")
        task = reply_to(asked, timeout=20)
    assert task.status == TaskExecution.Status.FAILED and task.retry_count == 0, task.error
    assert "tool call id" in task.error
    [error] = AgentPlaygroundMessage.objects.filter(instance_id="long-id", role="assistant")
    assert error.is_error and error.tokens_used == 15
    assert TaskAttempt.objects.get(execution_id=task.pk).status == TaskAttempt.Status.FAILED


@pytest.mark.django_db
@pytest.mark.parametrize("end", ["succeed", "fail"])
def test_a_reply_cancelled_while_it_ran_has_its_attempts_whole_spend_on_its_error_message(end):
    """The user cancels a reply while its agent runs; the agent still ends, with what it paid
    after the cancel, which is added to the attempt (a bill that arrives after the close). The
    thread's error message for the cancelled attempt kept only what had been metered when it
    was written: the thread said the reply cost 10 tokens, its attempt 120."""
    agent = Agent.objects.create(
        id="midway",
        name="Midway",
        executor=Agent.Executor.PYTHON,
        entrypoint="tests.orchestration.edge_agents.cancelled_midway",
    )
    asked = conversation_message_post(agent=agent, instance_id="late-bill", content="hi")
    task = TaskExecution.objects.get(pk=asked.execution_id)
    task.input_data = {**task.input_data, "end": end}
    task.save(update_fields=["input_data"])
    outcome = attempt_run(execution_id=task.pk, celery_task_id=task.celery_task_id, worker="w@h")
    assert outcome == (Outcome.SUCCEEDED if end == "succeed" else Outcome.FAILED)
    attempt = TaskAttempt.objects.get(execution=task)
    assert (attempt.status, attempt.input_tokens, attempt.output_tokens, attempt.tokens_used) == (
        "cancelled",
        100,
        20,
        120,
    )
    [error] = AgentPlaygroundMessage.objects.filter(instance_id="late-bill", role="assistant")
    assert error.is_error and error.attempt_id == attempt.pk
    assert (error.input_tokens, error.output_tokens, error.tokens_used) == (100, 20, 120)
    assert Decimal(error.metadata["cost_usd"]) == attempt.cost_usd == Decimal("0.0123")


@pytest.mark.django_db
def test_a_python_agents_tool_call_id_too_long_to_store_fails_the_reply_instead_of_leaving_it_running():
    """A python agent in a conversation calls a tool of its own under a call id it chose, longer
    than the thread's tool_call_id column: the tool box put the call in the transcript, whose
    record (the reply's, and the failure's alike) the database refused, so the attempt stayed
    running until the reaper. The call is refused to the agent instead, and kept out of the
    transcript."""
    agent = Agent.objects.create(
        id="long-id",
        name="Long id",
        executor=Agent.Executor.PYTHON,
        entrypoint="tests.orchestration.edge_agents.long_call_id",
        config={"tools": ["calculator"]},
    )
    asked = conversation_message_post(agent=agent, instance_id="long-py-id", content="2+2?")
    task = TaskExecution.objects.get(pk=asked.execution_id)
    assert attempt_run(execution_id=task.pk, celery_task_id=task.celery_task_id, worker="w@h") == Outcome.FAILED
    task.refresh_from_db()
    assert task.status == TaskExecution.Status.FAILED and "tool call id of 305 characters" in task.error
    assert TaskAttempt.objects.get(execution=task).status == TaskAttempt.Status.FAILED
    [error] = AgentPlaygroundMessage.objects.filter(instance_id="long-py-id", role="assistant")
    assert error.is_error and "tool call id" in error.content
    assert not AgentPlaygroundMessage.objects.filter(instance_id="long-py-id", role="tool").exists()
