"""The chat export pairs each thread with the system prompt and tools its replies ran with
(recorded by the runtime as prompt versions), not with the agent's definition of the day."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.core.management import call_command
from django.db import connection, transaction
from django.db.models import F

from orchestration.models import Agent, AgentPlaygroundMessage, AgentPromptVersion, TaskExecution
from orchestration.runtime import tools as tools_module
from orchestration.services.conversations import conversation_message_post, prompt_version_record
from orchestration.services.execution import attempt_run
from tests.factories import AgentFactory, MessageFactory
from tests.fakes.servers import OpenAIServer
from training_export.services.chat import chat_example_validate
from training_export.services.export import export_run

KEY = "sk-test-" + "pr0mpt" * 4
DAY = dt.date(2024, 3, 5)
T0 = dt.datetime(2024, 3, 5, 10, 0, tzinfo=dt.UTC)


@pytest.fixture
def llm(settings, monkeypatch) -> Iterator[OpenAIServer]:
    settings.AGENT_HTTP_ALLOW_PRIVATE = True
    settings.AGENT_HTTP_ALLOWED_HOSTS = ["127.0.0.1"]
    monkeypatch.setenv("TEST_LLM_API_KEY", KEY)
    with OpenAIServer(api_key=KEY, tool_call={"expression": "6 * 7"}) as server:
        settings.AGENT_API_KEY_HOSTS = [server.url]  # its origin: http, its port
        yield server


def llm_agent(url: str) -> Agent:
    return Agent.objects.create(
        id="calc-llm",
        name="Calc",
        executor=Agent.Executor.LLM,
        provider="openai",
        url=url,
        model="gpt-4o-mini",
        api_key_env="TEST_LLM_API_KEY",
        system_prompt="Be brief.",
        config={"tools": ["calculator"]},
    )


def reply(agent: Agent, instance_id: str, content: str) -> None:
    """Post a message and run its reply in this process: the real runtime, the fake provider."""
    asked = conversation_message_post(agent=agent, instance_id=instance_id, content=content)
    task = TaskExecution.objects.get(pk=asked.execution_id)
    attempt_run(execution_id=task.pk, celery_task_id=task.celery_task_id, worker="w@h")
    assert TaskExecution.objects.get(pk=task.pk).status == TaskExecution.Status.COMPLETED


def move_to_window(instance_id: str) -> None:
    """Shift a thread recorded now into the (closed) export window, keeping its order."""
    first = AgentPlaygroundMessage.objects.filter(instance_id=instance_id).order_by("created_at").first()
    AgentPlaygroundMessage.objects.filter(instance_id=instance_id).update(
        created_at=F("created_at") - (first.created_at - T0)
    )


def files(run) -> dict[str, bytes]:
    directory = Path(run.path).parent
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def examples(run) -> list[dict]:
    return [json.loads(line) for line in Path(run.path).read_text("utf-8").splitlines()]


@pytest.mark.django_db
def test_an_llm_reply_records_what_it_sent_and_a_re_export_after_edits_is_byte_identical(llm, out, monkeypatch):
    agent = llm_agent(llm.base_url)
    reply(agent, "t-1", "What is 6 * 7?")
    sent = llm.requests[0].body
    asked, answered = AgentPlaygroundMessage.objects.filter(instance_id="t-1", role="assistant").order_by("created_at")
    assert asked.tool_calls and not answered.tool_calls
    version = AgentPromptVersion.objects.get()
    assert asked.metadata["prompt_version"] == answered.metadata["prompt_version"] == version.sha256
    assert (version.system_prompt, version.tools) == ("Be brief.", sent["tools"])
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}

    move_to_window("t-1")
    first = export_run(data_type="conversations", start_date=DAY, end_date=DAY)
    before = files(first)
    [example] = examples(first)
    chat_example_validate(example)
    assert example["messages"][0] == {"role": "system", "content": "Be brief."}
    assert example["tools"] == sent["tools"]

    # The agent is redefined and a tool's schema changes in code: the window's files do not.
    Agent.objects.filter(pk=agent.pk).update(system_prompt="Be verbose.", config={"tools": ["text_stats"]})
    calculator = tools_module.registry()["calculator"]
    monkeypatch.setitem(
        tools_module._REGISTRY, "calculator", dataclasses.replace(calculator, description="A new description.")
    )
    again = export_run(data_type="conversations", start_date=DAY, end_date=DAY, force=True)
    assert again.pk != first.pk
    assert files(again) == before
    assert json.loads(before["manifest.json"])["legacy_prompt"] == 0


@pytest.mark.django_db
def test_a_turn_under_a_new_prompt_carries_the_example_and_earlier_turns_get_weight_0(llm, out):
    agent = llm_agent(llm.base_url)
    llm.tool_call = None  # plain answers
    reply(agent, "t-2", "hello")
    Agent.objects.filter(pk=agent.pk).update(system_prompt="Be kind.")
    agent.refresh_from_db()
    reply(agent, "t-2", "hello again")
    Agent.objects.filter(pk=agent.pk).update(system_prompt="Something else entirely.")
    move_to_window("t-2")

    run = export_run(data_type="conversations", start_date=DAY, end_date=DAY)
    [example] = examples(run)
    chat_example_validate(example)
    assert [(m["role"], m.get("weight")) for m in example["messages"]] == [
        ("system", None),
        ("user", None),
        ("assistant", 0),  # generated under "Be brief."
        ("user", None),
        ("assistant", 1),
    ]
    assert example["messages"][0]["content"] == "Be kind."
    assert llm.requests[-1].body["messages"][0] == {"role": "system", "content": "Be kind."}


@pytest.mark.django_db
def test_a_legacy_thread_exports_with_the_agents_current_prompt_and_is_counted(out):
    agent = AgentFactory(system_prompt="Current prompt.")
    for i, (role, content) in enumerate([("user", "hi"), ("assistant", "Hello!")]):
        MessageFactory(
            instance_id="old", agent=agent, role=role, content=content, created_at=T0 + dt.timedelta(seconds=i)
        )
    version = prompt_version_record({"system_prompt": "Recorded prompt.", "tools": []})
    for i, (role, content) in enumerate([("user", "hi"), ("assistant", "Hi!")]):
        MessageFactory(
            instance_id="new",
            agent=agent,
            role=role,
            content=content,
            metadata={"prompt_version": version} if role == "assistant" else {},
            created_at=T0 + dt.timedelta(seconds=i),
        )

    run = export_run(data_type="conversations", start_date=DAY, end_date=DAY)
    by_thread = {e["messages"][-1]["content"]: e["messages"][0]["content"] for e in examples(run)}
    assert by_thread == {"Hello!": "Current prompt.", "Hi!": "Recorded prompt."}
    manifest = json.loads((Path(run.path).parent / "manifest.json").read_text())
    assert (manifest["legacy_prompt"], manifest["skipped"]) == (1, {})


@pytest.mark.django_db
def test_a_deleted_agents_thread_keeps_its_recorded_prompt(out):
    agent = AgentFactory(system_prompt="Gone soon.")
    version = prompt_version_record({"system_prompt": "Gone soon.", "tools": []})
    MessageFactory(instance_id="t-4", agent=agent, role="user", content="hi", created_at=T0)
    MessageFactory(
        instance_id="t-4",
        agent=agent,
        role="assistant",
        content="Hello!",
        metadata={"prompt_version": version},
        created_at=T0 + dt.timedelta(seconds=1),
    )
    agent.delete()  # the messages stay, their agent set to NULL
    run = export_run(data_type="conversations", start_date=DAY, end_date=DAY)
    [example] = examples(run)
    assert example["messages"][0] == {"role": "system", "content": "Gone soon."}


@pytest.mark.django_db
def test_a_python_agent_reply_records_its_definitions_prompt():
    call_command("load_agents", stdout=io.StringIO())
    assistant = Agent.objects.get(pk="assistant")
    reply(assistant, "t-3", "2 + 3")
    version = AgentPromptVersion.objects.get()
    assert version.system_prompt == assistant.system_prompt
    assert [t["function"]["name"] for t in version.tools] == assistant.config["tools"]
    replies = AgentPlaygroundMessage.objects.filter(instance_id="t-3", role="assistant")
    assert {m.metadata["prompt_version"] for m in replies} == {version.sha256}


@pytest.mark.django_db(transaction=True)
def test_concurrent_records_of_one_version_do_not_fail():
    """The second insert waits for the first's commit, then finds the row there."""
    prompt = {"system_prompt": "Shared.", "tools": [{"type": "function", "function": {"name": "f"}}]}
    inserted = threading.Event()
    keys: list[str] = []
    errors: list[BaseException] = []

    def record(first: bool) -> None:
        try:
            if not first:
                inserted.wait(10)
            with transaction.atomic():
                keys.append(prompt_version_record(prompt))
                if first:
                    inserted.set()
                    threading.Event().wait(0.3)  # the other insert meets this uncommitted row
        except BaseException as exc:
            errors.append(exc)
        finally:
            inserted.set()
            connection.close()

    threads = [threading.Thread(target=record, args=(first,)) for first in (True, False)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(set(keys)) == 1 and len(keys) == 2
    assert AgentPromptVersion.objects.get().system_prompt == "Shared."


@pytest.mark.django_db
def test_a_long_threads_example_starts_where_the_history_its_turn_was_sent_began(llm, out, settings):
    """The example of a turn holds the context the model was sent (the last
    CONVERSATION_HISTORY_MESSAGES, as the turn recorded it), not the whole thread, whatever
    the setting says when the export runs."""
    settings.CONVERSATION_HISTORY_MESSAGES = 6
    agent = llm_agent(llm.base_url)
    reply(agent, "t-long", "one")
    reply(agent, "t-long", "two")
    move_to_window("t-long")
    day_before = F("created_at") - dt.timedelta(days=1)
    AgentPlaygroundMessage.objects.filter(instance_id="t-long").update(created_at=day_before)
    reply(agent, "t-long", "three")
    AgentPlaygroundMessage.objects.filter(instance_id="t-long", created_at__gt=T0).update(
        created_at=F("created_at") - (AgentPlaygroundMessage.objects.get(content="three").created_at - T0)
    )
    sent = llm.requests[-2].body["messages"]  # the first request of the third turn
    assert [m["content"] for m in sent if m["role"] == "user"] == ["two", "three"]

    settings.CONVERSATION_HISTORY_MESSAGES = 200  # changed since: the turn's record decides
    [example] = examples(export_run(data_type="conversations", start_date=DAY, end_date=DAY))
    chat_example_validate(example)
    assert [(m["role"], m.get("content")) for m in example["messages"][: len(sent)]] == [
        (m["role"], m["content"]) for m in sent
    ]
    assert [m["content"] for m in example["messages"] if m["role"] == "user"] == ["two", "three"]
    assert [m["weight"] for m in example["messages"] if m["role"] == "assistant"] == [0, 0, 1, 1]


@pytest.mark.django_db
def test_a_long_threads_example_starts_at_the_history_of_its_first_turn_trained_under_its_prompt(llm, out, settings):
    """The turns under an earlier prompt are context (weight 0), not trained: the example starts
    where the history sent for the first turn it does train began, the one under the prompt it
    carries. Before, it started at the history of the first turn of the window, of the earlier
    prompt, and held messages the trained turn was never sent."""
    settings.CONVERSATION_HISTORY_MESSAGES = 2
    agent = llm_agent(llm.base_url)
    llm.tool_call = None  # plain answers
    reply(agent, "t-long", "one")
    reply(agent, "t-long", "two")
    Agent.objects.filter(pk=agent.pk).update(system_prompt="Be kind.")
    agent.refresh_from_db()
    reply(agent, "t-long", "three")
    move_to_window("t-long")
    sent = llm.requests[-1].body["messages"]
    assert sent == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "three"}]

    answer = AgentPlaygroundMessage.objects.filter(instance_id="t-long", role="assistant").latest("created_at")

    [example] = examples(export_run(data_type="conversations", start_date=DAY, end_date=DAY))
    chat_example_validate(example)
    assert [(m["role"], m.get("content"), m.get("weight")) for m in example["messages"]] == [
        ("system", "Be kind.", None),
        ("user", "three", None),
        ("assistant", answer.content, 1),
    ]
