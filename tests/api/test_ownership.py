"""Ownership (BOLA): a non-admin sees and acts only on their own workflows, tasks, events
and conversations. Another user's object, or a guessed id, is a 404 that reveals nothing."""

from __future__ import annotations

import pytest

from orchestration.ids import new_id
from orchestration.models import Agent, Event, TaskExecution, Workflow
from orchestration.services.conversations import conversation_message_post


@pytest.fixture
def mine_and_theirs(callers, submit):
    mine = submit(callers["developer"]).json()["workflow_id"]
    theirs = submit(callers["other"]).json()["workflow_id"]
    return mine, theirs


def test_lists_show_only_the_callers_rows(callers, mine_and_theirs):
    mine, theirs = mine_and_theirs
    dev = callers["developer"].client
    assert [w["workflow_id"] for w in dev.get("/api/v1/workflows/").json()["results"]] == [mine]
    assert {t["workflow_id"] for t in dev.get("/api/v1/tasks/").json()["results"]} == {mine}
    events = dev.get("/api/v1/events/").json()["results"]
    assert events and {e["workflow_id"] for e in events} == {mine}
    assert dev.get(f"/api/v1/events/?workflow={theirs}").json()["results"] == []
    admin = callers["admin"].client
    assert {w["workflow_id"] for w in admin.get("/api/v1/workflows/").json()["results"]} == {mine, theirs}


@pytest.mark.parametrize(
    "method, path",
    [
        ("get", "/api/v1/workflows/{w}/"),
        ("get", "/api/v1/workflows/{w}/events/"),
        ("get", "/api/v1/workflows/{w}/attempts/"),
        ("post", "/api/v1/workflows/{w}/cancel/"),
        ("post", "/api/v1/workflows/{w}/retry/"),
        ("get", "/api/v1/tasks/{t}/"),
        ("post", "/api/v1/tasks/{t}/cancel/"),
        ("post", "/api/v1/tasks/{t}/retry/"),
    ],
)
def test_another_users_object_and_a_guessed_id_are_the_same_404(callers, mine_and_theirs, method, path):
    _, theirs = mine_and_theirs
    their_task = TaskExecution.objects.get(workflow_id=theirs).pk
    client = callers["developer"].client
    real = getattr(client, method)(path.format(w=theirs, t=their_task), format="json")
    guessed = getattr(client, method)(path.format(w=new_id(), t=new_id()), format="json")
    assert real.status_code == guessed.status_code == 404
    assert real.json()["detail"] == guessed.json()["detail"]
    assert Workflow.objects.get(pk=theirs).status == "running"
    assert TaskExecution.objects.get(pk=their_task).status == "queued"


def test_another_users_conversation_is_a_404_to_read_and_taken_to_post(callers, agents):
    echo = Agent.objects.get(pk="echo")
    conversation_message_post(agent=echo, instance_id="eve-thread", content="secret", owner=callers["other"].user)
    dev = callers["developer"].client
    read = dev.get("/api/v1/conversations/eve-thread/messages/")
    assert read.status_code == 404
    assert "secret" not in read.content.decode()
    # Thread ids are one namespace: posting under one in use is a conflict that says so (a new id
    # would be a 202, so a 404 here would hide nothing and only mislead).
    post = dev.post("/api/v1/conversations/eve-thread/messages/", {"agent": "echo", "content": "me too"}, format="json")
    assert post.status_code == 409
    assert "is taken by a conversation that is not yours" in post.json()["detail"]
    assert "secret" not in post.content.decode()
    assert Event.objects.filter(event_type="message_created").count() == 1
    admin = callers["admin"].client
    assert [m["content"] for m in admin.get("/api/v1/conversations/eve-thread/messages/").json()["results"]] == [
        "secret"
    ]
