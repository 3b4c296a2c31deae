"""Idempotent message posts: a client that lost the 202 sends the message again with the same
`Idempotency-Key` and gets the first answer back (same message, same reply task), rather than
a 409 while the reply is pending or, once it has finished, a second message and a second
(paid) reply."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from django.core.management import call_command

from orchestration.api.redis_store import store
from orchestration.models import AgentPlaygroundMessage, TaskExecution
from tests.api.conftest import make_caller
from tests.engine import wait_for

KEY = {"HTTP_IDEMPOTENCY_KEY": "msg-42"}
HELLO = {"agent": "echo", "content": "hello"}


def _counts(instance_id: str) -> tuple[int, int]:
    """(user messages, reply tasks) of a thread."""
    return (
        AgentPlaygroundMessage.objects.filter(instance_id=instance_id, role="user").count(),
        TaskExecution.objects.filter(task_type="conversation", metadata__instance_id=instance_id).count(),
    )


@pytest.mark.django_db(transaction=True)
def test_a_retry_after_the_reply_completed_stores_no_second_message_nor_task(engine):
    engine()
    caller = make_caller("talker", "developer")
    url = "/api/v1/conversations/calc-idem/messages/"
    body = {"agent": "assistant", "content": "2 + 3"}
    first = caller.client.post(url, body, format="json", **KEY)
    assert first.status_code == 202, first.json()
    task = first.json()["execution_id"]
    wait_for(
        lambda: TaskExecution.objects.filter(pk=task, status="completed").exists(),
        timeout=60,
        what="the agent's reply",
    )
    replies = AgentPlaygroundMessage.objects.filter(instance_id="calc-idem", role="assistant").count()

    again = caller.client.post(url, body, format="json", **KEY)
    assert again.status_code == 202, again.json()
    assert _counts("calc-idem") == (1, 1)
    assert again.json() == first.json()
    assert again["Location"] == first["Location"]
    assert AgentPlaygroundMessage.objects.filter(instance_id="calc-idem", role="assistant").count() == replies


def test_a_retry_while_the_reply_is_pending_returns_the_first_answer(callers):
    dev = callers["developer"].client
    url = "/api/v1/conversations/t-pending/messages/"
    first = dev.post(url, HELLO, format="json", **KEY)
    again = dev.post(url, HELLO, format="json", **KEY)
    assert first.status_code == 202 and again.status_code == 202, again.json()
    assert again.json() == first.json() and again["Location"] == first["Location"]
    assert _counts("t-pending") == (1, 1)
    # Without the key, the thread is still busy answering.
    assert dev.post(url, HELLO, format="json").status_code == 409


def test_the_same_key_with_another_body_is_a_422_naming_the_key(callers):
    dev = callers["developer"].client
    url = "/api/v1/conversations/t-422/messages/"
    message_id = dev.post(url, HELLO, format="json", **KEY).json()["message_id"]
    for other_url, other_body in (
        (url, {**HELLO, "content": "goodbye"}),
        (url, {**HELLO, "agent": "assistant"}),
        ("/api/v1/conversations/t-elsewhere/messages/", HELLO),
    ):
        response = dev.post(other_url, other_body, format="json", **KEY)
        assert response.status_code == 422, (other_url, other_body, response.json())
        assert response["Content-Type"] == "application/problem+json"
        assert "msg-42" in response.json()["detail"] and message_id in response.json()["detail"]
    assert _counts("t-422") == (1, 1)
    assert _counts("t-elsewhere") == (0, 0)


def test_keys_are_per_user(callers):
    mine = callers["developer"].client.post("/api/v1/conversations/t-mine/messages/", HELLO, format="json", **KEY)
    theirs = callers["other"].client.post("/api/v1/conversations/t-theirs/messages/", HELLO, format="json", **KEY)
    assert mine.status_code == 202 and theirs.status_code == 202, theirs.json()
    assert theirs.json()["message_id"] != mine.json()["message_id"]
    assert theirs.json()["execution_id"] != mine.json()["execution_id"]
    assert _counts("t-mine") == (1, 1) and _counts("t-theirs") == (1, 1)


def test_a_message_key_and_a_workflow_key_are_independent(callers, submit):
    assert submit(callers["developer"], **KEY).status_code == 201
    posted = callers["developer"].client.post("/api/v1/conversations/t-wf/messages/", HELLO, format="json", **KEY)
    assert posted.status_code == 202, posted.json()


def test_a_post_in_flight_with_the_key_is_a_409_to_retry_shortly(callers):
    owner = callers["developer"].user
    lock = f"idempotency:messages:{owner.pk}:msg-42"
    assert store().acquire(lock, "another-request", 60)
    url = "/api/v1/conversations/t-busy/messages/"
    busy = callers["developer"].client.post(url, HELLO, format="json", **KEY)
    assert busy.status_code == 409, busy.json()
    assert "still being processed" in busy.json()["detail"] and busy["Retry-After"] == "1"
    assert _counts("t-busy") == (0, 0)
    store().release(lock, "another-request")
    assert callers["developer"].client.post(url, HELLO, format="json", **KEY).status_code == 202


def test_concurrent_duplicates_store_one_message(transactional_db, live_server):
    call_command("load_agents", stdout=io.StringIO())
    caller = make_caller("racer", "developer")
    headers = {"Authorization": f"Bearer {caller.key}", "Idempotency-Key": "burst-1"}
    url = f"{live_server.url}/api/v1/conversations/t-burst/messages/"

    def post(_: int) -> httpx.Response:
        return httpx.post(url, json=HELLO, headers=headers, timeout=30)

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(post, range(8)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {202, 409} and 202 in statuses, statuses
    # A 409 here is the key's "still being processed", never the thread's "still answering".
    assert all("still being processed" in r.json()["detail"] for r in responses if r.status_code == 409)
    assert len({r.json()["message_id"] for r in responses if r.status_code == 202}) == 1
    assert _counts("t-burst") == (1, 1)


def test_a_bad_key_is_refused_naming_the_header(callers):
    url = "/api/v1/conversations/t-bad/messages/"
    for key in ("k" * 256, "clé".encode().decode("latin-1")):
        refused = callers["developer"].client.post(url, HELLO, format="json", HTTP_IDEMPOTENCY_KEY=key)
        assert refused.status_code == 400, refused.json()
        assert refused.json()["errors"][0]["field"] == "Idempotency-Key"
    assert _counts("t-bad") == (0, 0)


def test_the_schema_declares_the_header_and_the_422(client):
    post = client.get("/api/v1/schema/?format=json").json()["paths"]["/api/v1/conversations/{instance_id}/messages/"][
        "post"
    ]
    assert {"name": "Idempotency-Key", "in": "header"}.items() <= next(
        p for p in post["parameters"] if p["name"] == "Idempotency-Key"
    ).items()
    assert "422" in post["responses"] and "Idempotency-Key" in post["description"]
