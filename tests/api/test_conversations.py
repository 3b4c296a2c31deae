"""Conversations through the API: posting answers 202 with the message id, the agent's
reply (from a real worker) arrives as a new message of the thread."""

from __future__ import annotations

import pytest

from orchestration.models import AgentPlaygroundMessage
from tests.api.conftest import make_caller
from tests.engine import wait_for


def test_post_is_accepted_with_the_message_id_and_bad_input_names_the_field(callers):
    dev = callers["developer"].client
    response = dev.post("/api/v1/conversations/t-1/messages/", {"agent": "echo", "content": "hello"}, format="json")
    assert response.status_code == 202
    body = response.json()
    message = AgentPlaygroundMessage.objects.get(pk=body["message_id"])
    assert (message.instance_id, message.role, message.owner) == ("t-1", "user", callers["developer"].user)
    assert body == {
        "message_id": message.pk,
        "instance_id": "t-1",
        "execution_id": message.execution_id,
        "status": "accepted",
    }
    # The reply's task, to follow or cancel, without reading the thread for its id.
    assert response["Location"] == f"http://testserver/api/v1/tasks/{message.execution_id}/"
    assert dev.get(response["Location"]).json()["task_type"] == "conversation"

    listed = dev.get("/api/v1/conversations/t-1/messages/").json()["results"]
    assert [(m["role"], m["content"]) for m in listed] == [("user", "hello")]

    empty = dev.post("/api/v1/conversations/t-2/messages/", {"agent": "echo", "content": "  "}, format="json")
    assert empty.status_code == 400 and empty.json()["errors"][0]["field"] == "content"
    unknown = dev.post("/api/v1/conversations/t-2/messages/", {"agent": "nobody", "content": "x"}, format="json")
    assert unknown.status_code == 400 and unknown.json()["errors"][0]["field"] == "agent"
    extra = dev.post(
        "/api/v1/conversations/t-2/messages/", {"agent": "echo", "content": "x", "role": "system"}, format="json"
    )
    assert extra.status_code == 400 and extra.json()["errors"][0]["field"] == "role"
    assert dev.get("/api/v1/conversations/t-2/messages/").status_code == 404
    assert AgentPlaygroundMessage.objects.count() == 1


def test_a_message_while_the_reply_is_pending_is_a_conflict(callers):
    dev = callers["developer"].client
    first = dev.post("/api/v1/conversations/t-9/messages/", {"agent": "echo", "content": "one"}, format="json")
    assert first.status_code == 202
    second = dev.post("/api/v1/conversations/t-9/messages/", {"agent": "echo", "content": "two"}, format="json")
    assert second.status_code == 409, second.json()
    problem = second.json()
    assert second["Content-Type"] == "application/problem+json"
    assert problem["status"] == 409 and "still answering message" in problem["detail"]
    assert AgentPlaygroundMessage.objects.filter(instance_id="t-9").count() == 1


@pytest.mark.django_db(transaction=True)
def test_the_reply_arrives_as_a_new_message(engine):
    engine()
    caller = make_caller("talker", "developer")
    posted = caller.client.post(
        "/api/v1/conversations/calc-1/messages/", {"agent": "assistant", "content": "2 + 3"}, format="json"
    )
    assert posted.status_code == 202

    def replied() -> list[dict] | None:
        results = caller.client.get("/api/v1/conversations/calc-1/messages/").json()["results"]
        final = [m for m in results if m["role"] == "assistant" and not m["tool_calls"]]
        return results if final else None

    messages = wait_for(replied, timeout=60, what="the agent's reply")
    assert messages[0]["message_id"] == posted.json()["message_id"]
    assert messages[-1]["content"] == "= 5"


def test_a_thread_started_without_a_user_is_hidden_from_non_admins(callers):
    from orchestration.models import Agent
    from orchestration.services.conversations import conversation_message_post

    conversation_message_post(agent=Agent.objects.get(pk="echo"), instance_id="cli-thread", content="hi")
    url = "/api/v1/conversations/cli-thread/messages/"
    for role in ("developer", "viewer"):
        assert callers[role].client.get(url).status_code in (403, 404), role
    assert callers["developer"].client.get(url).status_code == 404
    posted = callers["developer"].client.post(url, {"agent": "echo", "content": "mine now?"}, format="json")
    assert posted.status_code == 409 and "hi" not in posted.json()["detail"]
    listed = callers["admin"].client.get(url)
    assert listed.status_code == 200 and [m["content"] for m in listed.json()["results"]] == ["hi"]


def test_the_owner_of_a_pending_reply_can_look_at_its_task_and_cancel_it(callers):
    dev, other = callers["developer"].client, callers["other"].client
    assert (
        dev.post("/api/v1/conversations/t-5/messages/", {"agent": "echo", "content": "one"}, format="json").status_code
        == 202
    )
    busy = dev.post("/api/v1/conversations/t-5/messages/", {"agent": "echo", "content": "two"}, format="json")
    task_id = AgentPlaygroundMessage.objects.get(instance_id="t-5").execution_id
    assert busy.status_code == 409 and task_id in busy.json()["detail"]  # the conflict names the task
    # The reply task has no workflow; it is the developer's because the message it answers is.
    assert dev.get(f"/api/v1/tasks/{task_id}/").json()["status"] == "queued"
    assert other.get(f"/api/v1/tasks/{task_id}/").status_code == 404
    assert other.post(f"/api/v1/tasks/{task_id}/cancel/", {}, format="json").status_code == 404
    cancelled = dev.post(f"/api/v1/tasks/{task_id}/cancel/", {}, format="json")
    assert cancelled.status_code == 200, cancelled.json()
    assert cancelled.json()["status"] == "cancelled"
    # With the reply cancelled, the thread takes the next message.
    assert (
        dev.post("/api/v1/conversations/t-5/messages/", {"agent": "echo", "content": "two"}, format="json").status_code
        == 202
    )


def test_the_asker_cannot_retry_an_old_reply_beside_the_pending_one(callers):
    """the asker's broader task scope (look and cancel) also lets them retry an older
    reply task while the thread's latest reply is pending: two replies in flight at once, the
    retried one answering an old message after the newer one (the thread answers one message at
    a time, in order)."""
    dev = callers["developer"].client
    url = "/api/v1/conversations/t-r/messages/"
    assert dev.post(url, {"agent": "echo", "content": "one"}, format="json").status_code == 202
    first_task = AgentPlaygroundMessage.objects.get(instance_id="t-r").execution_id
    assert dev.post(f"/api/v1/tasks/{first_task}/cancel/", {}, format="json").status_code == 200
    assert dev.post(url, {"agent": "echo", "content": "two"}, format="json").status_code == 202
    retried = dev.post(f"/api/v1/tasks/{first_task}/retry/", {}, format="json")
    from orchestration.models import TaskExecution

    in_flight = TaskExecution.objects.filter(task_type="conversation", metadata__instance_id="t-r").exclude(
        status__in=TaskExecution.TERMINAL_STATUSES
    )
    assert in_flight.count() == 1, (retried.status_code, list(in_flight.values_list("task_name", "status")))


def test_the_threads_messages_name_the_reply_task_to_look_at_and_cancel(callers):
    """The README's way to the reply task; the messages did not carry it, so a reply that
    failed without an error message (a lost worker, the reaper) left the asker nothing to
    follow, and a pending one could be found only by posting again for the 409."""
    dev = callers["developer"].client
    url = "/api/v1/conversations/t-id/messages/"
    assert dev.post(url, {"agent": "echo", "content": "one"}, format="json").status_code == 202
    [message] = dev.get(url).json()["results"]
    task_id = AgentPlaygroundMessage.objects.get(instance_id="t-id").execution_id
    assert message["execution_id"] == task_id
    assert dev.get(f"/api/v1/tasks/{task_id}/").json()["status"] == "queued"
    assert dev.post(f"/api/v1/tasks/{task_id}/cancel/", {}, format="json").status_code == 200
