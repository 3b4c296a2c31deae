"""A user message posted through the API is stored as it was written, within the configured
limit, and read only by who may read its conversation. (Found by audits and failing before
their fixes.)"""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Group
from rest_framework.test import APIClient

from orchestration.models import AgentPlaygroundMessage
from orchestration.services.access import api_key_create
from tests.api.conftest import make_caller
from tests.engine import wait_for


def _client(key: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return client


def test_a_posted_message_is_stored_as_written_whitespace_included(callers):
    """DRF's CharField trims by default: the first line of an indented code block lost its
    indentation, and trailing newlines went, so the thread (and the history the agent got,
    and the chat export) held a message the user did not write."""
    dev = callers["developer"].client
    text = "    def f():\n        return 1\n\n"
    posted = dev.post("/api/v1/conversations/code/messages/", {"agent": "echo", "content": text}, format="json")
    assert posted.status_code == 202, posted.json()
    stored = AgentPlaygroundMessage.objects.get(pk=posted.json()["message_id"])
    assert stored.content == text
    listed = dev.get("/api/v1/conversations/code/messages/").json()["results"]
    assert listed[0]["content"] == text


def test_the_message_size_limit_is_the_configured_one(callers, settings):
    """The serializer capped a message at 100 000 characters whatever
    CONVERSATION_MAX_MESSAGE_CHARS (up to 1 000 000) allowed, with another message."""
    settings.CONVERSATION_MAX_MESSAGE_CHARS = 150_000
    dev = callers["developer"].client
    url = "/api/v1/conversations/big/messages/"
    posted = dev.post(url, {"agent": "echo", "content": "a" * 120_000}, format="json")
    assert posted.status_code == 202, posted.json()
    too_big = dev.post(
        "/api/v1/conversations/bigger/messages/", {"agent": "echo", "content": "a" * 150_001}, format="json"
    )
    assert too_big.status_code == 400
    assert too_big.json()["errors"][0]["field"] == "content"
    assert "the limit is 150000" in too_big.json()["errors"][0]["detail"]
    assert not AgentPlaygroundMessage.objects.filter(instance_id="bigger").exists()


def test_a_refused_message_names_its_field_once_as_the_other_validation_errors_do(callers):
    """The service's message begins with the field it names: the answer said it twice
    ("content: content: 40000 characters; …"), unlike every other validation error."""
    dev = callers["developer"].client
    refused = dev.post("/api/v1/conversations/c%20x/messages/", {"agent": "echo", "content": "hi"}, format="json")
    assert refused.status_code == 400
    (error,) = refused.json()["errors"]
    assert error["field"] == "instance_id"
    assert error["detail"].startswith("use 1-255 letters")
    assert refused.json()["detail"] == f"instance_id: {error['detail']}"
    assert not AgentPlaygroundMessage.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_a_reply_tasks_message_and_reply_are_read_only_by_who_may_read_the_conversation(engine):
    """A conversation's reply task holds the user's message as its input and the agent's reply
    as its output. The thread needs agent:execute (a viewer, a key narrowed to workflow:read,
    is refused it), but its reply task answered them both with workflow:read alone: its asker's
    narrowed key, its asker once a viewer, an admin's key narrowed to workflow:read (in the
    task list too)."""
    engine()
    alice = make_caller("alice", "developer")
    posted = alice.client.post(
        "/api/v1/conversations/alice-1/messages/", {"agent": "echo", "content": "my PIN is 4321"}, format="json"
    )
    assert posted.status_code == 202, posted.json()
    url = f"/api/v1/tasks/{posted.json()['execution_id']}/"
    wait_for(lambda: alice.client.get(url).json()["status"] == "completed", what="the reply")
    read_only = _client(api_key_create(owner=alice.user, name="ro", permissions=["workflow:read"]).key)
    root = make_caller("root", "admin")
    root_read_only = _client(api_key_create(owner=root.user, name="ro", permissions=["workflow:read"]).key)

    for client in (alice.client, root.client):
        assert "4321" in str(client.get(url).json()["input_data"])
        assert "4321" in str(client.get(url).json()["output_data"])
    assert "4321" in str(root.client.get("/api/v1/tasks/").json()["results"])
    assert read_only.get("/api/v1/conversations/alice-1/messages/").status_code == 403  # as designed
    for client in (read_only, root_read_only):
        task = client.get(url)
        assert task.status_code == 200
        assert task.json()["status"] == "completed"
        assert task.json()["input_data"] is None
        assert task.json()["output_data"] is None
    assert "4321" not in str(root_read_only.get("/api/v1/tasks/").json())

    alice.user.groups.set([Group.objects.get(name="viewer")])
    assert "4321" not in str(alice.client.get(url).json())


@pytest.mark.django_db(transaction=True)
def test_a_conversations_tool_calls_are_in_the_events_list_without_their_payload_to_a_key_that_may_not_converse(
    engine,
):
    """The tool_executed event of a tool a conversation's reply called holds the user's text
    (its input_params) and the tool's result. An admin's key narrowed to workflow:read, refused
    the threads, read every user's conversations there."""
    engine()
    alice = make_caller("alice", "developer")
    posted = alice.client.post(
        "/api/v1/conversations/alice-1/messages/",
        {"agent": "assistant", "content": "stats: diagnosis hemoglobin"},
        format="json",
    )
    assert posted.status_code == 202, posted.json()
    url = f"/api/v1/tasks/{posted.json()['execution_id']}/"
    wait_for(lambda: alice.client.get(url).json()["status"] == "completed", what="the reply")
    root = make_caller("root", "admin")
    read_only = _client(api_key_create(owner=root.user, name="ro", permissions=["workflow:read"]).key)
    events = "/api/v1/events/?event_type=tool_executed"

    (called,) = root.client.get(events).json()["results"]
    assert called["payload"]["input_params"] == {"text": "diagnosis hemoglobin"}
    assert read_only.get("/api/v1/conversations/alice-1/messages/").status_code == 403  # as designed
    (hidden,) = read_only.get(events).json()["results"]
    assert hidden["payload"] is None
    assert {k: v for k, v in hidden.items() if k != "payload"} == {k: v for k, v in called.items() if k != "payload"}
    assert "hemoglobin" not in str(read_only.get("/api/v1/events/").json())
