"""What each attempt ran with: an agent changed while its task is being retried runs the new
definition from the next attempt on, and each attempt's task_started event names the
definition it ran with by the hash its agent_registered event records it under."""

from __future__ import annotations

import time

import pytest

from orchestration.models import Agent, Event, TaskExecution, Workflow
from orchestration.services.agent_registry import agent_create, agent_update
from orchestration.services.workflows import workflow_submit
from tests.fakes.servers import OpenAIServer, Reply
from tests.orchestration.test_llm_answers import LOCAL_NET, finished

KEY = "sk-test-" + "pr0v3n" * 4


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "orm"])
def test_each_attempt_names_the_definition_it_ran_with(engine, settings, fast_path):
    with OpenAIServer(api_key=KEY, model_suffix="-2024-08-06") as server:
        settings.AGENT_HTTP_ALLOW_PRIVATE = True
        settings.AGENT_HTTP_ALLOWED_HOSTS = ["127.0.0.1"]
        settings.AGENT_API_KEY_HOSTS = [server.url]
        env = {**LOCAL_NET, "TEST_LLM_API_KEY": KEY, "AGENT_API_KEY_HOSTS": server.url}
        engine(env={**env, "ENGINE_FAST_PATH": str(fast_path).lower()})
        definition = {
            "id": "writer",
            "name": "Writer",
            "executor": "llm",
            "provider": "openai",
            "url": server.base_url,
            "model": "gpt-4o-mini",
            "api_key_env": "TEST_LLM_API_KEY",
            "system_prompt": "Be brief.",
            "temperature": 0.2,
        }
        agent_create(fields=definition)
        # The first attempt waits for the model, which fails it; the agent is changed meanwhile.
        server.script(
            Reply(status=500, body={"error": {"message": "overloaded"}}, headers={"Retry-After": "0"}, delay=3)
        )
        workflow, _ = workflow_submit(
            spec={"name": "w", "tasks": [{"name": "x", "agent": "writer", "input": {"description": "go"}}]}
        )
        time.sleep(1.5)
        agent_update(agent_id="writer", fields={"model": "gpt-4o", "system_prompt": "Be thorough.", "temperature": 1.5})
        workflow = finished(workflow)
        sent = [(r.body["model"], r.body["messages"][0]["content"], r.body["temperature"]) for r in server.requests]

    assert workflow.status == Workflow.Status.COMPLETED
    assert sent == [("gpt-4o-mini", "Be brief.", 0.2), ("gpt-4o", "Be thorough.", 1.5)]
    task = TaskExecution.objects.get(workflow=workflow)
    assert task.output_data["model"] == "gpt-4o-2024-08-06"  # the model that answered, not the one asked for
    started = Event.objects.filter(entity_id=task.pk, event_type="task_started").order_by("sequence")
    ran = {e.payload["attempt"]: e.payload["agent_definition_sha256"] for e in started}
    versions = {
        e.payload["definition_sha256"]: e.payload["fields"]
        for e in Event.objects.filter(event_type="agent_registered", agent_id="writer")
    }
    assert [(versions[ran[n]]["model"], versions[ran[n]]["system_prompt"]) for n in (1, 2)] == [
        ("gpt-4o-mini", "Be brief."),
        ("gpt-4o", "Be thorough."),
    ]
    assert Agent.objects.get(pk="writer").definition_hash == ran[2]


@pytest.mark.django_db
def test_an_agent_made_before_the_hashes_has_its_definition_recorded_by_the_migration():
    """An agent made by the API or the console before definition hashes had none, one loaded
    from a file its file's: an attempt of it would name a definition no agent_registered event
    holds. Migration 0041 gives each its definition's hash, with the event holding it."""
    from django.apps import apps as global_apps
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    from orchestration.services.agents import definition_snapshot

    made = Agent.objects.create(
        id="made", name="Made", executor="python", entrypoint="orchestration.runtime.builtin.echo", temperature=1
    )
    loaded = Agent.objects.create(
        id="loaded",
        name="Loaded",
        executor="python",
        entrypoint="orchestration.runtime.builtin.echo",
        definition_path="loaded.yaml",
        definition_hash="f" * 64,  # its file's digest, as load_agents kept it before
    )
    from orchestration.services.agents import SNAPSHOT_FIELDS

    migration = MigrationExecutor(connection).loader.get_migration("orchestration", "0041_agents_definition_hash")
    # The migration's frozen copy is the application's: a change of what a definition's hash
    # covers needs a migration recording every agent's again.
    assert __import__(migration.__module__, fromlist=["SNAPSHOT_FIELDS"]).SNAPSHOT_FIELDS == SNAPSHOT_FIELDS
    migration.operations[0].code(global_apps, connection.schema_editor())
    migration.operations[0].code(global_apps, connection.schema_editor())  # again: nothing more

    for agent in (made, loaded):
        agent.refresh_from_db()
        snapshot = definition_snapshot(agent)
        assert agent.definition_hash == snapshot["definition_sha256"]
        recorded = Event.objects.filter(event_type="agent_registered", agent_id=agent.pk)
        assert [(e.payload["change"], e.payload["definition_sha256"], e.payload["fields"]) for e in recorded] == [
            ("recorded", agent.definition_hash, snapshot["fields"])
        ]
