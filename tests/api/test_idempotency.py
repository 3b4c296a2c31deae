"""Idempotent submission: same key and body -> the original workflow; same key, other body
-> 422; a request still in flight with the key -> 409; concurrent duplicates store one."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import httpx
from django.core.management import call_command

from orchestration.api.redis_store import store
from orchestration.models import Workflow
from tests.api.conftest import SPEC, make_caller

KEY = {"HTTP_IDEMPOTENCY_KEY": "order-42"}


def test_same_key_and_body_return_the_original_workflow(callers, submit):
    first = submit(callers["developer"], **KEY)
    second = submit(callers["developer"], **KEY)
    assert first.status_code == 201 and second.status_code == 200
    assert first.json()["workflow_id"] == second.json()["workflow_id"]
    assert second.json()["idempotency_key"] == "order-42"
    assert Workflow.objects.count() == 1


def test_same_key_with_another_body_is_a_422(callers, submit):
    original = submit(callers["developer"], **KEY).json()["workflow_id"]
    response = submit(callers["developer"], {**SPEC, "name": "something else"}, **KEY)
    assert response.status_code == 422
    assert response["Content-Type"] == "application/problem+json"
    assert original in response.json()["detail"]
    assert Workflow.objects.count() == 1


def test_a_request_in_flight_with_the_key_is_a_409_to_retry_shortly(callers, submit):
    owner = callers["developer"].user
    lock = f"idempotency:{owner.pk}:order-42"
    assert store().acquire(lock, "another-request", 60)
    busy = submit(callers["developer"], **KEY)
    assert busy.status_code == 409
    assert "still being processed" in busy.json()["detail"]
    assert busy["Retry-After"] == "1"  # when the first has most likely stored its workflow
    assert Workflow.objects.count() == 0
    store().release(lock, "another-request")
    assert submit(callers["developer"], **KEY).status_code == 201


def test_keys_are_per_user(callers, submit):
    mine = submit(callers["developer"], **KEY).json()["workflow_id"]
    theirs = submit(callers["other"], **KEY)
    assert theirs.status_code == 201
    assert theirs.json()["workflow_id"] != mine


def test_the_key_may_come_in_the_body_and_must_agree_with_the_header(callers, submit):
    in_body = {**SPEC, "idempotency_key": "order-42"}
    first = submit(callers["developer"], in_body)
    assert first.status_code == 201
    assert submit(callers["developer"], in_body).json()["workflow_id"] == first.json()["workflow_id"]
    assert submit(callers["developer"], **KEY).status_code == 200
    clash = submit(callers["developer"], {**SPEC, "idempotency_key": "other"}, **KEY)
    assert clash.status_code == 400
    assert clash.json()["errors"][0]["field"] == "idempotency_key"
    too_long = submit(callers["developer"], HTTP_IDEMPOTENCY_KEY="k" * 300)
    assert too_long.status_code == 400


def test_concurrent_duplicates_store_one_workflow(transactional_db, live_server):
    call_command("load_agents", stdout=io.StringIO())
    caller = make_caller("racer", "developer")
    headers = {"Authorization": f"Bearer {caller.key}", "Idempotency-Key": "burst-1"}

    def post(_: int) -> httpx.Response:
        return httpx.post(f"{live_server.url}/api/v1/workflows/", json=SPEC, headers=headers, timeout=30)

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(post, range(8)))
    statuses = [r.status_code for r in responses]
    assert statuses.count(201) == 1, statuses
    assert set(statuses) <= {200, 201, 409}, statuses
    ids = {r.json()["workflow_id"] for r in responses if r.status_code in (200, 201)}
    assert len(ids) == 1
    assert Workflow.objects.filter(owner=caller.user).count() == 1


def test_a_header_key_beyond_ascii_is_refused_naming_the_header(callers, submit):
    """WSGI hands a header over decoded as Latin-1: `é` sent as UTF-8 was stored as `Ã©`."""
    as_received = "clé".encode().decode("latin-1")
    refused = submit(callers["developer"], HTTP_IDEMPOTENCY_KEY=as_received)
    assert refused.status_code == 400, refused.content
    (error,) = refused.json()["errors"]
    assert error["field"] == "Idempotency-Key" and "ASCII" in error["detail"]
    assert not Workflow.objects.exists()
    in_body = submit(callers["developer"], {**SPEC, "idempotency_key": "clé"})
    assert in_body.status_code == 201 and Workflow.objects.get().idempotency_key == "clé"


def test_redis_gone_once_the_workflow_is_stored_answers_201_and_the_key_finds_it_again(
    transactional_db, monkeypatch, tmp_path
):
    """Redis (the API's store and the broker, one server as deployed) goes away while a keyed
    submission is stored: its messages are left to the dispatch sweeper, and the lock's release
    fails. The workflow is committed, so the client is told so (it was told 500, the workflow
    stored); the lock expires by itself, and the key finds the workflow once Redis is back."""
    from orchestration.api import idempotency
    from orchestration.models import TaskExecution
    from tests.engine import PrivateRedis, use_broker

    redis_server = PrivateRedis(tmp_path)
    use_broker(monkeypatch, redis_server.url, also_redis=True)
    call_command("load_agents", stdout=io.StringIO())
    caller = make_caller("dev", "developer")
    caller.client.raise_request_exception = False
    submit = idempotency.workflow_submit

    def submit_as_redis_goes(**kwargs: object) -> object:
        redis_server.stop()  # after the rate limit and the lock, before the workflow is stored
        return submit(**kwargs)

    monkeypatch.setattr(idempotency, "workflow_submit", submit_as_redis_goes)
    try:
        response = caller.client.post("/api/v1/workflows/", SPEC, format="json", HTTP_IDEMPOTENCY_KEY="order-7")

        assert response.status_code == 201, response.content
        workflow = Workflow.objects.get()
        assert response.json()["workflow_id"] == workflow.pk
        assert TaskExecution.objects.get(workflow=workflow).status == "queued"  # for the sweeper
        redis_server.start()  # back, empty
        again = caller.client.post("/api/v1/workflows/", SPEC, format="json", HTTP_IDEMPOTENCY_KEY="order-7")
        assert again.status_code == 200 and again.json()["workflow_id"] == workflow.pk
    finally:
        monkeypatch.undo()  # the suite's Redis again, for the flush after the test
        redis_server.stop()
