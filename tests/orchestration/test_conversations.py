"""Conversations: user messages answered by agents on real workers, stored in order, with
the thread's history carried across turns."""

from __future__ import annotations

import datetime as dt
import io
import json
import signal
import sys
import threading
import time
from types import SimpleNamespace

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db import IntegrityError, connection
from django.utils import timezone

from orchestration.errors import ConversationError
from orchestration.event_types import EventType
from orchestration.models import Agent, AgentPlaygroundMessage, Event, TaskAttempt, TaskExecution
from orchestration.runtime.collaboration import equip
from orchestration.runtime.context import AgentResult, Usage
from orchestration.selectors import conversation_messages
from orchestration.services.conversations import (
    conversation_history,
    conversation_message_post,
    conversation_turn_record,
)
from orchestration.services.execution import attempt_abandon, attempt_claim, attempt_succeed
from orchestration.services.workflows import task_cancel
from tests.engine import wait_for
from tests.fakes.servers import OpenAIServer, Reply

KEY = "sk-test-" + "c0nv" * 5


def reply_to(message: AgentPlaygroundMessage, timeout: float = 30) -> TaskExecution:
    return wait_for(
        lambda: (t := TaskExecution.objects.get(pk=message.execution_id)).is_terminal and t,
        timeout=timeout,
        what="the reply",
    )


def thread(instance_id: str) -> list[tuple]:
    return [(m.role, m.content, bool(m.tool_calls), m.is_error) for m in conversation_messages(instance_id=instance_id)]


@pytest.mark.django_db(transaction=True)
def test_conversation_continues_across_turns_with_tool_calls_in_order(engine):
    engine()
    assistant = Agent.objects.get(pk="assistant")
    first = conversation_message_post(agent=assistant, instance_id="t-1", content="2 + 3")
    assert reply_to(first).status == TaskExecution.Status.COMPLETED
    second = conversation_message_post(agent=assistant, instance_id="t-1", content="ans * 10")
    assert reply_to(second).status == TaskExecution.Status.COMPLETED
    third = conversation_message_post(agent=assistant, instance_id="t-1", content="history")
    reply_to(third)

    messages = list(conversation_messages(instance_id="t-1"))
    assert [(m.role, m.content) for m in messages if m.role != "tool" and not m.tool_calls] == [
        ("user", "2 + 3"),
        ("assistant", "= 5"),
        ("user", "ans * 10"),
        ("assistant", "= 50"),  # used the previous turn's result: the history reached the agent
        ("user", "history"),
        ("assistant", "This is turn 3. Before this you said: 2 + 3 | ans * 10"),
    ]
    roles = [m.role for m in messages[:4]]
    assert roles == ["user", "assistant", "tool", "assistant"], "tool call, its result, then the reply"
    call = messages[1].tool_calls[0]
    assert messages[2].tool_call_id == call["id"]
    assert json.loads(call["function"]["arguments"]) == {"expression": "2 + 3", "variables": {}}
    reply = messages[3]
    assert reply.attempt.status == TaskAttempt.Status.SUCCEEDED
    assert reply.execution_id == first.execution_id and reply.owner_id is None
    created = Event.objects.filter(event_type=EventType.MESSAGE_CREATED, session_id="t-1")
    assert [e.payload["role"] for e in created.order_by("sequence")] == ["user", "assistant"] * 3
    tools = Event.objects.filter(event_type=EventType.TOOL_EXECUTED, payload__execution_id=second.execution_id)
    assert tools.get().payload["input_params"] == {"expression": "ans * 10", "variables": {"ans": 5}}


@pytest.mark.django_db(transaction=True)
def test_a_failed_attempt_is_in_the_thread_as_an_error_but_not_in_the_history(engine):
    engine()
    flaky = Agent.objects.get(pk="flaky")
    asked = conversation_message_post(agent=flaky, instance_id="t-2", content="hello")
    task = reply_to(asked)
    assert task.status == TaskExecution.Status.COMPLETED and task.retry_count == 1
    error, answer = AgentPlaygroundMessage.objects.filter(instance_id="t-2", role="assistant").order_by("created_at")
    assert error.is_error and "planned failure 1 of 1" in error.content
    assert error.attempt.status == TaskAttempt.Status.FAILED
    assert not answer.is_error and answer.attempt.attempt_number == 2
    assert json.loads(answer.content) == {"succeeded_on_attempt": 2}
    history = conversation_history(instance_id="t-2", up_to=answer)
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert history[1]["content"] == answer.content


@pytest.mark.django_db(transaction=True)
def test_llm_conversation_sends_the_whole_thread_and_records_tokens(engine):
    with OpenAIServer(api_key=KEY, prompt_tokens=100, completion_tokens=20) as llm:
        engine(
            env={
                "AGENT_HTTP_ALLOW_PRIVATE": "true",
                "AGENT_HTTP_ALLOWED_HOSTS": "127.0.0.1",
                "AGENT_API_KEY_HOSTS": llm.url,
                "CHAT_API_KEY": KEY,
            }
        )
        agent = Agent.objects.create(
            id="chatty",
            name="Chatty",
            executor=Agent.Executor.LLM,
            provider="openai",
            url=llm.base_url,
            model="gpt-4o-mini",
            api_key_env="CHAT_API_KEY",
            system_prompt="Be brief.",
        )
        llm.script(Reply(status=500, body={"error": {"message": "overloaded"}}))
        first = conversation_message_post(agent=agent, instance_id="t-3", content="My name is Ada.")
        assert reply_to(first).status == TaskExecution.Status.COMPLETED
        second = conversation_message_post(agent=agent, instance_id="t-3", content="What is my name?")
        assert reply_to(second).status == TaskExecution.Status.COMPLETED
    sent = llm.requests[-1].body["messages"]
    assert sent == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "echo: My name is Ada."},
        {"role": "user", "content": "What is my name?"},
    ], "the failed try's error message is not part of what the model sees"
    replies = AgentPlaygroundMessage.objects.filter(instance_id="t-3", role="assistant", is_error=False)
    assert [(m.input_tokens, m.output_tokens, m.tokens_used) for m in replies] == [(100, 20, 120)] * 2
    assert replies.first().metadata["model"] == "gpt-4o-mini"
    [error] = AgentPlaygroundMessage.objects.filter(instance_id="t-3", is_error=True)
    assert "HTTP 500" in error.content and KEY not in error.content


@pytest.mark.django_db(transaction=True)
def test_echo_replies_stay_the_size_of_their_turn_not_of_the_whole_thread(engine):
    """echo returns its input; the history the runtime adds to a turn's input is the thread,
    which holds echo's earlier replies: echoed too, each reply held all of them (escaped), and
    grew about threefold a turn (6 MB by the twelfth)."""
    engine()
    echo = Agent.objects.get(pk="echo")
    turns = []
    for n in range(6):
        asked = conversation_message_post(agent=echo, instance_id="t-echo", content=f"hello {n}")
        assert reply_to(asked).status == TaskExecution.Status.COMPLETED
        turns.append((asked, AgentPlaygroundMessage.objects.get(execution_id=asked.execution_id, role="assistant")))
    sizes = [len(answer.content) for _, answer in turns]
    assert max(sizes) - min(sizes) <= 1, sizes
    for n, (asked, answer) in enumerate(turns):
        assert json.loads(answer.content) == {
            "echo": {"instance_id": "t-echo", "message_id": asked.message_id, "message": f"hello {n}"}
        }


@pytest.mark.django_db
def test_posting_refuses_bad_input_other_owners_other_agents_and_a_pending_reply(builtin_agents):
    assistant = Agent.objects.get(pk="assistant")
    alice = get_user_model().objects.create_user("alice")
    bob = get_user_model().objects.create_user("bob")
    with pytest.raises(ConversationError, match="content: a message needs some text"):
        conversation_message_post(agent=assistant, instance_id="x", content="   ")
    with pytest.raises(ConversationError, match="instance_id: use 1-255"):
        conversation_message_post(agent=assistant, instance_id="../etc", content="hi")
    conversation_message_post(agent=assistant, instance_id="mine", content="hi", owner=alice)
    with pytest.raises(ConversationError, match="taken by another user"):
        conversation_message_post(agent=assistant, instance_id="mine", content="hi", owner=bob)
    with pytest.raises(ConversationError, match="is with agent 'assistant', not 'echo'"):
        conversation_message_post(agent=Agent.objects.get(pk="echo"), instance_id="mine", content="hi", owner=alice)
    with pytest.raises(ConversationError, match="still answering message"):
        conversation_message_post(agent=assistant, instance_id="mine", content="again", owner=alice)
    with pytest.raises(ConversationError, match="must not contain NUL"):
        conversation_message_post(agent=assistant, instance_id="other", content="a\x00b")
    assert AgentPlaygroundMessage.objects.filter(instance_id="mine").count() == 1
    task = TaskExecution.objects.get(task_type="conversation")
    assert (task.status, task.priority, task.workflow_id) == ("queued", "high", None)


@pytest.mark.django_db
def test_a_post_that_fails_half_way_leaves_nothing_behind(builtin_agents, settings):
    settings.CONVERSATION_MAX_RETRIES = 101  # past the task_executions CHECK: the second INSERT fails
    with pytest.raises(IntegrityError, match="task_executions_retries_range"):
        conversation_message_post(agent=Agent.objects.get(pk="assistant"), instance_id="half", content="hi")
    assert not AgentPlaygroundMessage.objects.filter(instance_id="half").exists()
    assert not Event.objects.filter(session_id="half").exists()


@pytest.mark.django_db(transaction=True)
def test_two_simultaneous_posts_to_one_thread_make_one_turn(builtin_agents):
    assistant = Agent.objects.get(pk="assistant")
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def post(text: str) -> None:
        barrier.wait()
        try:
            conversation_message_post(agent=assistant, instance_id="race", content=text)
            outcomes.append("posted")
        except ConversationError as exc:
            outcomes.append(str(exc))
        finally:
            connection.close()

    threads = [threading.Thread(target=post, args=(text,)) for text in ("one", "two")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes)[1] == "posted" and "still answering message" in sorted(outcomes)[0]
    assert AgentPlaygroundMessage.objects.filter(instance_id="race").count() == 1
    assert TaskExecution.objects.filter(task_type="conversation").count() == 1


@pytest.mark.django_db
def test_no_reply_is_stored_for_an_attempt_that_was_closed_meanwhile(builtin_agents):
    asked = conversation_message_post(agent=Agent.objects.get(pk="assistant"), instance_id="late", content="1+1")
    task = TaskExecution.objects.get(pk=asked.execution_id)
    claim = attempt_claim(execution_id=task.pk, celery_task_id=task.celery_task_id, worker="w1")
    assert claim.context.conversation.history == [{"role": "user", "content": "1+1"}]
    # the reaper closes the attempt (its worker was lost) before the agent's answer is recorded
    attempt_abandon(
        TaskExecution.objects.get(pk=task.pk),
        claim.attempt,
        status=TaskAttempt.Status.LOST,
        cause=TaskAttempt.Cause.WORKER_LOST,
        error="worker lost",
        now=timezone.now(),
    )
    context = equip(claim.context, claim.agent)
    writer = lambda: conversation_turn_record(  # noqa: E731
        context=context, attempt_id=claim.attempt.pk, output={"content": "= 2"}, error=None, usage=Usage()
    )
    recorded = attempt_succeed(
        attempt=claim.attempt,
        result=AgentResult(output={"content": "= 2"}),
        duration_ms=1.0,
        now=timezone.now(),
        also=writer,
    )
    assert recorded is False
    # The thread says what became of the attempt (the reaper's error), and nothing more.
    assert thread("late") == [("user", "1+1", False, False), ("assistant", "worker lost", False, True)]
    assert AgentPlaygroundMessage.objects.get(instance_id="late", role="assistant").attempt_id == claim.attempt.pk


@pytest.mark.django_db
@pytest.mark.parametrize("running", [False, True], ids=["queued", "running"])
def test_a_cancelled_reply_says_so_in_the_thread(builtin_agents, running):
    """A client waiting for the reply as a new message must not wait forever: a cancelled
    reply (before or while it ran) ends with an error message, linked to the attempt it cut."""
    asked = conversation_message_post(agent=Agent.objects.get(pk="assistant"), instance_id="cut", content="1+1")
    task = TaskExecution.objects.get(pk=asked.execution_id)
    attempt = None
    if running:
        attempt = attempt_claim(execution_id=task.pk, celery_task_id=task.celery_task_id, worker="w1").attempt
    task_cancel(execution_id=task.pk, reason="cancelled by alice")

    assert thread("cut") == [("user", "1+1", False, False), ("assistant", "cancelled by alice", False, True)]
    error = AgentPlaygroundMessage.objects.get(instance_id="cut", role="assistant")
    assert (error.attempt_id, error.execution_id, error.owner_id) == (
        attempt.pk if attempt else None,
        task.pk,
        asked.owner_id,
    )
    assert conversation_history(instance_id="cut", up_to=asked) == [{"role": "user", "content": "1+1"}]


@pytest.mark.django_db
def test_a_reply_timed_out_in_the_queue_says_so_in_the_thread(builtin_agents, settings):
    asked = conversation_message_post(agent=Agent.objects.get(pk="assistant"), instance_id="slow", content="1+1")
    task = TaskExecution.objects.get(pk=asked.execution_id)
    later = timezone.now() + dt.timedelta(seconds=settings.TASK_QUEUE_TIMEOUT_SECONDS + 5)

    attempt_claim(execution_id=task.pk, celery_task_id=task.celery_task_id, worker="w1", now=later)

    messages = thread("slow")
    assert [m[0] for m in messages] == ["user", "assistant"] and messages[1][3] is True
    assert "in the queue" in messages[1][1]


@pytest.mark.django_db
def test_an_ordinary_task_cancelled_writes_no_message(builtin_agents):
    from orchestration.services.workflows import workflow_submit

    workflow, _ = workflow_submit(spec={"name": "w", "tasks": [{"name": "a", "agent": "echo", "input": {}}]})
    task = TaskExecution.objects.get(workflow=workflow)
    task_cancel(execution_id=task.pk)
    assert not AgentPlaygroundMessage.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_a_reply_whose_message_was_deleted_fails_instead_of_running_as_a_plain_task(engine):
    assistant = Agent.objects.get(pk="assistant")
    asked = conversation_message_post(agent=assistant, instance_id="gone", content="2+2")
    AgentPlaygroundMessage.objects.filter(pk=asked.pk).delete()
    engine()
    task = reply_to(asked)
    assert task.status == TaskExecution.Status.FAILED
    assert "no longer exists" in task.error
    assert not AgentPlaygroundMessage.objects.filter(instance_id="gone").exists()


@pytest.mark.django_db(transaction=True)
def test_chat_command_is_a_terminal_conversation(engine, monkeypatch):
    engine()
    monkeypatch.setattr(sys, "stdin", io.StringIO("6 * 7\nans / 2\n\n"))
    out = io.StringIO()
    call_command("chat", "assistant", "--instance", "cli-1", stdout=out)
    text = out.getvalue()
    assert "assistant> = 42" in text and "assistant> = 21" in text
    assert "[calls calculator(" in text
    assert "continue with: manage.py chat assistant --instance cli-1" in text
    assert AgentPlaygroundMessage.objects.filter(instance_id="cli-1", role="user").count() == 2


@pytest.mark.django_db(transaction=True)
def test_chat_whose_reply_failed_does_not_exit_0(engine, monkeypatch):
    """A reply that failed was shown and the command ended with status 0, as after answers: a
    script feeding it questions (`manage.py chat AGENT < questions`) could not tell, while one
    that waited too long for its reply did exit 1."""
    from django.core.management.base import CommandError

    engine()
    monkeypatch.setattr(sys, "stdin", io.StringIO("first\nsecond\n\n"))
    out = io.StringIO()
    with pytest.raises(CommandError, match=r"2 of 2 replies did not complete \(failed 2\)"):
        call_command("chat", "fail", "--instance", "cli-failed", stdout=out)
    assert "(the reply failed: PermanentError: first)" in out.getvalue()
    assert out.getvalue().endswith("(continue with: manage.py chat fail --instance cli-failed)\n")
    assert AgentPlaygroundMessage.objects.filter(instance_id="cli-failed", role="user").count() == 2


@pytest.mark.django_db(transaction=True)
def test_chat_tells_how_to_continue_a_thread_started_as_a_user(engine, monkeypatch):
    """The hint left out --user: following it was refused as another user's conversation."""
    engine()
    get_user_model().objects.create_user("alice")
    monkeypatch.setattr(sys, "stdin", io.StringIO("6 * 7\n\n"))
    out = io.StringIO()
    call_command("chat", "assistant", "--instance", "cli-2", "--user", "alice", stdout=out)
    hint = out.getvalue().rsplit("(continue with: manage.py chat ", 1)[1].strip().removesuffix(")")
    assert hint == "assistant --instance cli-2 --user alice"
    monkeypatch.setattr(sys, "stdin", io.StringIO("ans + 1\n\n"))
    out = io.StringIO()
    call_command("chat", *hint.split(), stdout=out)
    assert "assistant> = 43" in out.getvalue()


def test_chat_refuses_a_thread_it_cannot_continue_before_reading_any_message(builtin_agents, monkeypatch):
    """Another owner's or another agent's thread was refused only once the first message was
    typed, which was then lost; and the refusal did not say which --user would continue it."""
    from django.core.management.base import CommandError

    alice = get_user_model().objects.create_user("alice")
    assistant = Agent.objects.get(pk="assistant")
    conversation_message_post(agent=assistant, instance_id="hers", content="1 + 1", owner=alice)
    conversation_message_post(agent=assistant, instance_id="nobodys", content="1 + 1")
    cases = [
        (["assistant", "--instance", "hers"], "conversation 'hers' is alice's: continue it with --user alice"),
        (
            ["assistant", "--instance", "nobodys", "--user", "alice"],
            "conversation 'nobodys' was started without --user: continue it without --user",
        ),
        (
            ["echo", "--instance", "hers", "--user", "alice"],
            "conversation 'hers' is with agent 'assistant', not 'echo'",
        ),
    ]
    for arguments, message in cases:
        lines = io.StringIO("hello\n\n")
        monkeypatch.setattr(sys, "stdin", lines)
        with pytest.raises(CommandError) as refused:
            call_command("chat", *arguments, stdout=io.StringIO())
        assert str(refused.value) == message
        assert lines.tell() == 0, "nothing was read"
    assert AgentPlaygroundMessage.objects.count() == 2


def _completion(message: dict, prompt_tokens: int = 10, completion_tokens: int = 5) -> dict:
    """A chat.completion body answering `message` (scripted into OpenAIServer)."""
    return {
        "id": "chatcmpl-scripted",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": [
            {"index": 0, "message": message, "finish_reason": "tool_calls" if "tool_calls" in message else "stop"}
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def _call(call_id: str, name: str, arguments: dict) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def _calls_tool(call_id: str, name: str, arguments: dict) -> Reply:
    """The model's answer that calls one tool."""
    return Reply(
        body=_completion({"role": "assistant", "content": None, "tool_calls": [_call(call_id, name, arguments)]})
    )


def _tool_agent(llm: OpenAIServer, tools: list[str]) -> Agent:
    return Agent.objects.create(
        id="tooly",
        name="Tooly",
        executor=Agent.Executor.LLM,
        provider="openai",
        url=llm.base_url,
        model="gpt-4o-mini",
        api_key_env="CHAT_API_KEY",
        config={"tools": tools},
    )


def llm_env(llm: OpenAIServer) -> dict[str, str]:
    """A worker that reaches the fake server and sends it the key (its origin is listed)."""
    return {
        "AGENT_HTTP_ALLOW_PRIVATE": "true",
        "AGENT_HTTP_ALLOWED_HOSTS": "127.0.0.1",
        "AGENT_API_KEY_HOSTS": llm.url,
        "CHAT_API_KEY": KEY,
    }


@pytest.mark.django_db(transaction=True)
def test_two_tool_calls_of_one_turn_one_refused_are_sent_back_paired_on_the_next_turn(engine):
    with OpenAIServer(api_key=KEY) as llm:
        engine(env=llm_env(llm))
        agent = _tool_agent(llm, ["calculator", "text_stats"])
        llm.script(
            Reply(
                body=_completion(
                    {
                        "role": "assistant",
                        "content": "Let me see.",
                        "tool_calls": [
                            _call("c1", "calculator", {"expression": "2+2"}),
                            _call("c2", "text_stats", {"bogus": 1}),
                        ],
                    }
                )
            ),
            Reply(body=_completion({"role": "assistant", "content": "four"})),
        )
        first = conversation_message_post(agent=agent, instance_id="pair", content="2+2?")
        assert reply_to(first).status == TaskExecution.Status.COMPLETED
        second = conversation_message_post(agent=agent, instance_id="pair", content="thanks")
        assert reply_to(second).status == TaskExecution.Status.COMPLETED
    sent = llm.requests[-1].body["messages"]
    assert [(m["role"], m.get("tool_call_id")) for m in sent] == [
        ("user", None),
        ("assistant", None),
        ("tool", "c1"),
        ("tool", "c2"),
        ("assistant", None),
        ("user", None),
    ]
    assert [c["id"] for c in sent[1]["tool_calls"]] == ["c1", "c2"] and sent[1]["content"] == "Let me see."
    assert (
        json.loads(sent[2]["content"])["result"] == 4 and "invalid arguments" in json.loads(sent[3]["content"])["error"]
    )
    final = AgentPlaygroundMessage.objects.get(instance_id="pair", role="assistant", content="four")
    assert (final.tokens_used, final.metadata["cost_usd"]) == (30, "0.000010")  # both rounds of the reply


@pytest.mark.django_db(transaction=True)
def test_a_tool_calling_answer_the_database_cannot_store_fails_the_reply_instead_of_leaving_it_running(engine):
    """A NUL in the text a model sends with its tool calls: the transcript could not be
    stored, nor then the failure that stores it too; the attempt stayed running (the thread
    "still answering") until the reaper timed it out and ran the model again."""
    with OpenAIServer(api_key=KEY) as llm:
        engine(env=llm_env(llm))
        agent = _tool_agent(llm, ["calculator"])
        llm.script(
            Reply(
                body=_completion(
                    {
                        "role": "assistant",
                        "content": "thin\u0000king",
                        "tool_calls": [_call("c1", "calculator", {"expression": "2+2"})],
                    }
                )
            ),
        )
        asked = conversation_message_post(agent=agent, instance_id="nul", content="2+2?")
        task = reply_to(asked, timeout=20)
    assert task.status == TaskExecution.Status.FAILED and task.retry_count == 0
    assert "cannot be stored" in task.error and "NUL" in task.error
    [error] = AgentPlaygroundMessage.objects.filter(instance_id="nul", role="assistant")
    assert error.is_error and error.tokens_used == 15  # the paid round is on the reply
    assert TaskAttempt.objects.get(execution_id=task.pk).status == TaskAttempt.Status.FAILED


@pytest.mark.django_db(transaction=True)
def test_a_tool_call_with_a_nul_in_its_arguments_is_refused_to_the_model_not_a_failed_attempt(engine):
    """The tool_executed event could not store the arguments: the attempt failed with a
    DataError quoting SQL into the thread, and was run again."""
    with OpenAIServer(api_key=KEY) as llm:
        engine(env=llm_env(llm))
        agent = _tool_agent(llm, ["text_stats"])
        llm.script(
            _calls_tool("c1", "text_stats", {"text": "a\x00b"}),
        )
        asked = conversation_message_post(agent=agent, instance_id="nul-args", content="stats?")
        task = reply_to(asked)
    assert task.status == TaskExecution.Status.COMPLETED and task.retry_count == 0
    assert not AgentPlaygroundMessage.objects.filter(instance_id="nul-args", is_error=True).exists()
    told = llm.requests[-1].body["messages"][-1]
    assert told["role"] == "tool" and "NUL" in json.loads(told["content"])["error"]
    event = Event.objects.get(event_type=EventType.TOOL_EXECUTED, payload__execution_id=task.pk)
    assert "NUL" in event.payload["error"] and event.payload["input_params"] == {"arguments": repr({"text": "a\x00b"})}


class _Interrupted(io.StringIO):
    """stdin whose next read after its lines is a ^C."""

    def readline(self, *args):
        return super().readline(*args) or self._interrupt()

    @staticmethod
    def _interrupt():
        raise KeyboardInterrupt


@pytest.mark.django_db
def test_chat_left_by_ctrl_c_says_how_to_continue_not_a_traceback(builtin_agents, monkeypatch):
    """^C, at the prompt or while a reply was awaited, was a KeyboardInterrupt's traceback, and
    the thread's id, which only the parting line gives, was lost with it. Its status stays ^C's
    (manage.py then ends the process by SIGINT): with 0 a script running chat in a loop went on."""
    from orchestration.management.commands import chat

    monkeypatch.setattr(sys, "stdin", _Interrupted(""))
    out = io.StringIO()
    with pytest.raises(SystemExit) as ended:
        call_command("chat", "echo", "--instance", "at-prompt", stdout=out)
    assert ended.value.code == 128 + signal.SIGINT
    assert out.getvalue().endswith("\n(continue with: manage.py chat echo --instance at-prompt)\n")

    def interrupted(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(sys, "stdin", _Interrupted("hello\n"))
    # ^C while the reply is awaited (the module's own clock, not the time module everyone shares)
    monkeypatch.setattr(chat, "time", SimpleNamespace(monotonic=time.monotonic, sleep=interrupted))
    out = io.StringIO()
    with pytest.raises(SystemExit) as ended:
        call_command("chat", "echo", "--instance", "awaiting", stdout=out)
    assert ended.value.code == 128 + signal.SIGINT
    assert out.getvalue().endswith("\n(continue with: manage.py chat echo --instance awaiting)\n")
    [asked] = AgentPlaygroundMessage.objects.filter(instance_id="awaiting", role="user")
    assert asked.content == "hello" and TaskExecution.objects.get(pk=asked.execution_id).status == "queued"


@pytest.mark.django_db
def test_chat_refuses_a_line_that_is_not_utf8_with_a_message_not_a_traceback(builtin_agents, monkeypatch):
    """stdin reads bytes that are not UTF-8 (a Latin-1 "é") as lone surrogates, which the
    database driver cannot encode: the INSERT raised UnicodeEncodeError out of the command."""
    from django.core.management.base import CommandError

    monkeypatch.setattr(sys, "stdin", io.StringIO("caf\udce9\n\n"))
    with pytest.raises(CommandError, match="content: is not valid text"):
        call_command("chat", "echo", "--instance", "latin-1", stdout=io.StringIO())
    assert not AgentPlaygroundMessage.objects.filter(instance_id="latin-1").exists()


def test_chat_refuses_a_bad_instance_id_before_reading_any_message(builtin_agents, monkeypatch):
    """It was refused only once the first message was typed, which was then lost."""
    from django.core.management.base import CommandError

    lines = io.StringIO("hello\n\n")
    monkeypatch.setattr(sys, "stdin", lines)
    with pytest.raises(CommandError, match="--instance 'not ok': use 1-255 letters"):
        call_command("chat", "echo", "--instance", "not ok", stdout=io.StringIO())
    assert lines.tell() == 0, "nothing was read"
    assert not AgentPlaygroundMessage.objects.exists()


@pytest.mark.parametrize("timeout", ["inf", "nan", "0", "-1"])
def test_chat_refuses_a_timeout_it_would_never_reach(builtin_agents, timeout):
    """Its deadline is now + timeout: infinity (accepted before) never passes."""
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="is not a positive number of seconds"):
        call_command("chat", "echo", "--timeout", timeout, stdout=io.StringIO())
