"""Workflows through the API: submit, read, cancel, resume, events; validation errors name
the field; server-owned fields are refused; bodies over the limit are a 413."""

from __future__ import annotations

import datetime as dt
import io
import json

import pytest
from django.conf import settings
from django.utils import timezone
from rest_framework import serializers as drf_serializers
from rest_framework.renderers import JSONRenderer

from orchestration.api.serializers import FastReadMixin, TaskSerializer, WorkflowDetailSerializer
from orchestration.models import Event, TaskExecution, Workflow
from orchestration.services.specs import TASK_FIELDS, WORKFLOW_FIELDS
from tests.api.conftest import SPEC
from tests.engine import use_broker
from tests.factories import TaskAttemptFactory

PROBLEM = "application/problem+json"


def test_submit_stores_the_workflow_for_the_caller_and_returns_it_with_tasks(callers, submit):
    response = submit(callers["developer"])
    assert response.status_code == 201, response.content
    body = response.json()
    workflow = Workflow.objects.get(pk=body["workflow_id"])
    assert workflow.owner == callers["developer"].user
    assert body["owner"] == "dev"
    assert body["status"] == "running"
    assert [t["task_name"] for t in body["tasks"]] == ["a"]
    assert body["spec"] == SPEC


def test_a_submitted_workflow_is_named_by_its_location_and_a_replay_is_not(callers, submit):
    """A 201 said what it made only in its body: a client following Location (as it does an
    export's 202) had nothing to follow."""
    dev = callers["developer"]
    created = submit(dev, SPEC, HTTP_IDEMPOTENCY_KEY="order-1")
    workflow_id = created.json()["workflow_id"]
    assert created["Location"] == f"http://testserver/api/v1/workflows/{workflow_id}/"
    assert dev.client.get(created["Location"]).json()["workflow_id"] == workflow_id
    replayed = submit(dev, SPEC, HTTP_IDEMPOTENCY_KEY="order-1")
    assert replayed.status_code == 200 and "Location" not in replayed


def test_every_spec_problem_is_reported_naming_its_field_and_nothing_is_stored(callers, submit):
    spec = {
        "name": "",
        "tasks": [{"name": "a", "agent": "nobody"}, {"name": "b", "agent": "echo", "depends_on": ["zzz"]}],
    }
    response = submit(callers["developer"], spec)
    assert response.status_code == 400
    assert response["Content-Type"] == PROBLEM
    body = response.json()
    assert body["type"] == "urn:agentledger:problem:validation-error"
    assert body["status"] == 400 and body["title"] == "Invalid request"
    assert body["instance"] == "/api/v1/workflows/"
    fields = {e["field"] for e in body["errors"]}
    assert {"name", "tasks[0].agent", "tasks[1].depends_on"} <= fields
    assert {"field": "tasks[0].agent", "detail": "unknown agent 'nobody'"} in body["errors"]
    assert "tasks[0] (a).agent: unknown agent 'nobody'" in body["detail"]
    assert Workflow.objects.count() == 0


def test_a_spec_problem_and_a_serializer_error_are_one_shape(callers, submit):
    """A spec's problems (SpecError) were `invalid-request`, each error's detail repeating its
    field, a serializer's `validation-error` naming it once: two shapes for a client to read."""
    dev = callers["developer"]
    spec_problem = submit(dev, {"name": "x", "tasks": [{"name": "a", "agent": "nobody"}]})
    workflow_id = submit(dev).json()["workflow_id"]
    serializer_error = dev.client.post(f"/api/v1/workflows/{workflow_id}/cancel/", {"reason": 5}, format="json")
    expected = [
        (spec_problem, {"field": "tasks[0].agent", "detail": "unknown agent 'nobody'"}),
        (serializer_error, {"field": "reason", "detail": "must be a string"}),
    ]
    for response, error in expected:
        assert response.status_code == 400
        body = response.json()
        assert set(body) == {"type", "title", "status", "detail", "instance", "errors"}
        assert body["type"] == "urn:agentledger:problem:validation-error"
        assert body["errors"] == [error]
        assert body["detail"].endswith(f": {error['detail']}")


def test_each_spec_problem_is_named_by_its_path_and_says_it_once(callers, submit):
    """Only a problem written "field: detail" lost its field: "tasks[1] (a).name is a duplicate
    task name" came back with that whole text as its detail, a body of more than a million
    values was listed under the field "the", and every problem of a task named "x) y" under
    "tasks[0]", its detail beginning "y).agent"."""
    spec = {
        "name": "",
        "tasks": [
            {"name": "a", "agent": "echo", "max_retries": 50},
            {"name": "a", "agent": "echo", "input": [1]},
        ],
    }
    assert submit(callers["developer"], spec).json()["errors"] == [
        {"field": "name", "detail": "must not be empty"},
        {"field": "tasks[0].max_retries", "detail": f"must be between 0 and {settings.TASK_MAX_RETRIES_LIMIT}, got 50"},
        {"field": "tasks[1].name", "detail": "is a duplicate task name"},
        {"field": "tasks[1].input", "detail": "must be a mapping"},
    ]
    # A name that is not one is quoted, not read as part of the path of its task's problems.
    odd = submit(callers["developer"], {"name": "n", "tasks": [{"name": "x) y", "agent": "nobody"}]}).json()
    assert odd["errors"] == [
        {"field": "tasks[0].name", "detail": "'x) y' may contain only letters, digits, '_', '.' and '-'"},
        {"field": "tasks[0].agent", "detail": "unknown agent 'nobody'"},
    ]
    many = submit(callers["developer"], {**SPEC, "metadata": {"values": [0] * 1_000_001}}).json()
    assert [e["field"] for e in many["errors"]] == ["spec"]
    assert many["errors"][0]["detail"].startswith("expands to more than 1,000,000 values (at metadata.values[")


def test_a_problem_under_a_key_holding_a_space_keeps_the_key_whole(callers, submit):
    """Read as "<path> <detail>", the path ended at the key's space: a NUL under "my note" was
    the field "metadata.my" with the detail "note contains a NUL character", and an unknown
    field "bad field" the detail "field: unknown field"."""
    spec = {
        **SPEC,
        "metadata": {"my note": "a\x00"},
        "work flow_type": "x",
        "tasks": [{"name": "a", "agent": "echo", "input": {"first run": {"x": "\x00"}}, "bad field": 1}],
    }
    assert [(e["field"], e["detail"]) for e in submit(callers["developer"], spec).json()["errors"]] == [
        ("metadata", "metadata['my note'] contains a NUL character (\\u0000)"),
        ("tasks[0].input", "tasks[0].input['first run'].x contains a NUL character (\\u0000)"),
        ("", f"['work flow_type']: unknown field (allowed: {', '.join(sorted(WORKFLOW_FIELDS))})"),
        ("tasks[0]", f"tasks[0]['bad field']: unknown field (allowed: {', '.join(sorted(TASK_FIELDS))})"),
    ]


@pytest.mark.parametrize(
    "field, value",
    [("owner", 1), ("status", "completed"), ("total_cost_usd", "0"), ("completed_steps", 3), ("workflow_id", "x")],
)
def test_server_owned_fields_are_refused_not_silently_applied(callers, submit, field, value):
    response = submit(callers["developer"], {**SPEC, field: value})
    assert response.status_code == 400
    assert any(e["field"] == field and "unknown field" in e["detail"] for e in response.json()["errors"])
    assert Workflow.objects.count() == 0


def test_a_body_that_is_not_an_object_is_a_400(callers):
    response = callers["developer"].client.post("/api/v1/workflows/", [1, 2], format="json")
    assert response.status_code == 400
    assert response.json()["errors"][0]["field"] == "spec"


def test_malformed_json_is_a_400_problem(callers):
    response = callers["developer"].client.post("/api/v1/workflows/", "{nope", content_type="application/json")
    assert response.status_code == 400
    assert response["Content-Type"] == PROBLEM
    assert "JSON parse error" in response.json()["detail"]
    # Listed as every 400's problems are, under no field.
    assert response.json()["errors"] == [{"field": "", "detail": response.json()["detail"]}]


def test_a_name_given_twice_in_one_object_is_a_400_not_the_last_kept(callers):
    """json keeps the last of a name given twice: the task below ran `echo`, its `fail`
    silently dropped."""
    body = '{"name": "w", "tasks": [{"name": "a", "agent": "fail", "agent": "echo"}]}'
    response = callers["developer"].client.post("/api/v1/workflows/", body, content_type="application/json")
    assert response.status_code == 400, response.content
    assert response["Content-Type"] == PROBLEM
    assert "found duplicate key 'agent'" in response.json()["detail"]
    assert Workflow.objects.count() == 0


def test_a_body_over_the_limit_is_a_413_and_stores_nothing(callers, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 2048
    spec = {**SPEC, "description": "x" * 4096}
    response = callers["developer"].client.post("/api/v1/workflows/", spec, format="json")
    assert response.status_code == 413
    assert response["Content-Type"] == PROBLEM
    assert "2048 bytes" in response.json()["detail"]
    assert Workflow.objects.count() == 0


def test_retrieve_shows_tasks_and_the_events_action_pages_through_events_in_order(callers, submit):
    workflow_id = submit(callers["developer"]).json()["workflow_id"]
    client = callers["developer"].client
    detail = client.get(f"/api/v1/workflows/{workflow_id}/").json()
    assert detail["tasks"][0]["status"] == "queued"
    first = client.get(f"/api/v1/workflows/{workflow_id}/events/?limit=2").json()
    assert [e["event_type"] for e in first["results"]] == ["workflow_created", "workflow_started"]
    second = client.get(first["next"]).json()
    assert [e["event_type"] for e in second["results"]] == ["task_queued"]
    assert second["next"] is None
    expected = list(
        Event.objects.filter(workflow_id=workflow_id).order_by("sequence").values_list("sequence", flat=True)
    )
    assert [e["sequence"] for e in first["results"] + second["results"]] == expected


def test_cancel_then_resume(callers, submit):
    client = callers["developer"].client
    workflow_id = submit(callers["developer"]).json()["workflow_id"]
    cancelled = client.post(f"/api/v1/workflows/{workflow_id}/cancel/", {"reason": "changed my mind"}, format="json")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    assert TaskExecution.objects.get(workflow_id=workflow_id).status == "cancelled"

    again = client.post(f"/api/v1/workflows/{workflow_id}/cancel/", format="json")
    assert again.status_code == 409
    assert "only a pending or running workflow can be cancelled" in again.json()["detail"]

    resumed = client.post(f"/api/v1/workflows/{workflow_id}/retry/")
    assert resumed.status_code == 202
    assert resumed.json()["status"] == "running"
    assert TaskExecution.objects.get(workflow_id=workflow_id).status == "queued"


def test_task_cancel_and_retry(callers, submit):
    client = callers["developer"].client
    workflow_id = submit(callers["developer"]).json()["workflow_id"]
    task = TaskExecution.objects.get(workflow_id=workflow_id)
    response = client.post(f"/api/v1/tasks/{task.pk}/cancel/", format="json")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert response.json()["attempts"] == []
    assert client.post(f"/api/v1/tasks/{task.pk}/cancel/", format="json").status_code == 409
    retried = client.post(f"/api/v1/tasks/{task.pk}/retry/")
    assert retried.status_code == 202 and retried.json()["status"] == "queued"
    assert client.post(f"/api/v1/tasks/{task.pk}/retry/").status_code == 409


def test_retrying_a_task_whose_upstream_did_not_complete_is_a_conflict_naming_the_upstream(callers, submit):
    """The request is valid (it has no body); the task's state refuses it, as every other refused
    retry: a 409. It was a 400 "Invalid request" whose error named a field `task` that no request
    has, with the detail cut after that word ("b depends on a, ...")."""
    client = callers["developer"].client
    spec = {
        "name": "branches",
        "continue_on_failure": True,
        "tasks": [{"name": "a", "agent": "echo"}, {"name": "b", "agent": "echo", "depends_on": ["a"]}],
    }
    workflow_id = submit(callers["developer"], spec).json()["workflow_id"]
    a, b = (TaskExecution.objects.get(workflow_id=workflow_id, task_name=name) for name in ("a", "b"))
    assert client.post(f"/api/v1/tasks/{a.pk}/cancel/", format="json").status_code == 200
    refused = client.post(f"/api/v1/tasks/{b.pk}/retry/")
    assert refused.status_code == 409, refused.content
    assert refused["Content-Type"] == PROBLEM
    assert refused.json()["detail"] == (
        "task b depends on a, not completed: retry it first (or resume the workflow once it has ended)"
    )
    assert "errors" not in refused.json()
    assert TaskExecution.objects.get(pk=b.pk).status == "cancelled"


BODIES_REFUSED = [
    ('{"reason": 5}', "reason", "is not accepted here"),
    ('{"reason": "because"}', "reason", "is not accepted here"),
    ("[1, 2]", "", "this operation takes no request body: send none, or an empty JSON object, not an array"),
    ("null", "", "this operation takes no request body: send none, or an empty JSON object, not null"),
    ("not json", "", "JSON parse error"),
]


@pytest.mark.parametrize("body, field, detail", BODIES_REFUSED, ids=["number", "reason", "array", "null", "not-json"])
def test_retry_refuses_a_body_naming_the_problem_and_changes_nothing(callers, submit, body, field, detail):
    """Workflow and task retry took no body and ignored whatever came: a `reason` was not
    recorded, a body that was not JSON at all answered 202."""
    client = callers["developer"].client
    workflow_id = submit(callers["developer"]).json()["workflow_id"]
    task = TaskExecution.objects.get(workflow_id=workflow_id)
    client.post(f"/api/v1/workflows/{workflow_id}/cancel/", format="json")
    for url in (f"/api/v1/workflows/{workflow_id}/retry/", f"/api/v1/tasks/{task.pk}/retry/"):
        refused = client.post(url, body, content_type="application/json")
        assert refused.status_code == 400, refused.content
        (error,) = refused.json()["errors"]
        assert error["field"] == field and error["detail"].startswith(detail)
        assert Workflow.objects.get(pk=workflow_id).status == "cancelled"
        assert TaskExecution.objects.get(pk=task.pk).status == "cancelled"
    # No body, or an empty object, is a retry.
    assert client.post(f"/api/v1/tasks/{task.pk}/retry/", "{}", content_type="application/json").status_code == 202
    client.post(f"/api/v1/workflows/{workflow_id}/cancel/", format="json")
    assert client.post(f"/api/v1/workflows/{workflow_id}/retry/").status_code == 202


def test_a_task_shows_each_attempt_with_the_worker_process_that_ran_it(callers, submit):
    """The process identity the reaper decides by (worker_pid, worker_started_at, pool_pid) is
    part of the record a client reads, not only the console's."""
    client = callers["developer"].client
    task = TaskExecution.objects.get(workflow_id=submit(callers["developer"]).json()["workflow_id"])
    started = timezone.now() - dt.timedelta(hours=1)
    TaskAttemptFactory(
        execution=task,
        attempt_number=1,
        failed=True,
        worker="w1@host",
        worker_pid=4242,
        worker_started_at=started,
        pool_pid=4250,
    )
    TaskAttemptFactory(execution=task, attempt_number=2, worker="w2@host")  # recorded by an older worker
    attempts = client.get(f"/api/v1/tasks/{task.pk}/").json()["attempts"]
    assert [(a["attempt_number"], a["worker"], a["worker_pid"], a["pool_pid"]) for a in attempts] == [
        (1, "w1@host", 4242, 4250),
        (2, "w2@host", None, None),
    ]
    assert dt.datetime.fromisoformat(attempts[0]["worker_started_at"]) == started
    assert attempts[1]["worker_started_at"] is None


def test_list_filters_by_status_and_rejects_an_unknown_status(callers, submit):
    client = callers["developer"].client
    keep = submit(callers["developer"]).json()["workflow_id"]
    cancel = submit(callers["developer"]).json()["workflow_id"]
    client.post(f"/api/v1/workflows/{cancel}/cancel/", format="json")
    running = client.get("/api/v1/workflows/?status=running").json()["results"]
    assert [w["workflow_id"] for w in running] == [keep]
    bad = client.get("/api/v1/workflows/?status=sleeping")
    assert bad.status_code == 400
    assert bad.json()["errors"][0]["field"] == "status"


def test_unknown_api_path_is_a_problem_document(callers):
    response = callers["developer"].client.get("/api/v1/nothing-here/")
    assert response.status_code == 404
    assert response["Content-Type"] == PROBLEM
    assert json.loads(response.content)["instance"] == "/api/v1/nothing-here/"


def test_method_not_allowed_is_a_405_problem(callers):
    response = callers["admin"].client.delete("/api/v1/workflows/")
    assert response.status_code == 405
    assert response["Content-Type"] == PROBLEM
    assert "Allow" in response


def _generic(serializer_class, instance) -> dict:
    """DRF's own field-by-field serialization, without FastReadMixin's shared plan."""
    return drf_serializers.Serializer.to_representation(serializer_class(), instance)


def test_detail_and_submit_answers_are_byte_for_byte_what_drf_serialization_gives(callers, submit):
    created = submit(callers["developer"], {**SPEC, "tags": ["é"], "metadata": {"big": 2**70}})
    workflow_id = created.json()["workflow_id"]
    detail = callers["developer"].client.get(f"/api/v1/workflows/{workflow_id}/")
    workflow = Workflow.objects.select_related("owner").get(pk=workflow_id)
    expected = _generic(WorkflowDetailSerializer, workflow)
    tasks = TaskExecution.objects.filter(workflow_id=workflow_id).order_by("created_at", "execution_id")
    expected["tasks"] = [_generic(TaskSerializer, task) for task in tasks]
    assert detail.content == JSONRenderer().render(expected)
    expected_then = json.loads(JSONRenderer().render(expected))
    assert created.json().keys() == expected_then.keys()
    assert created.json()["tasks"][0]["execution_id"] == expected_then["tasks"][0]["execution_id"]


def test_a_serializer_that_reads_its_context_keeps_a_plan_per_instance():
    class WithContext(FastReadMixin, drf_serializers.ModelSerializer):
        who = drf_serializers.SerializerMethodField()

        class Meta:
            model = Workflow
            fields = ("workflow_id", "who")

        def get_who(self, workflow: Workflow) -> str:
            return self.context["who"]

    workflow = Workflow(workflow_id="w-1")
    assert WithContext(workflow, context={"who": "a"}).data == {"workflow_id": "w-1", "who": "a"}
    assert WithContext(workflow, context={"who": "b"}).data == {"workflow_id": "w-1", "who": "b"}


def test_cancel_retry_and_resume_name_who_asked_in_their_events(callers, submit):
    """The events are the audit trail: each operation says which user asked, and with which
    API key; the console's say "console" (tests/orchestration/test_admin_operations.py)."""
    caller = callers["developer"]
    prefix = caller.key.split("_")[1]
    asked = {"by": caller.user.username, "via": f"api_key:{prefix}"}
    workflow_id = submit(caller).json()["workflow_id"]
    task = TaskExecution.objects.get(workflow_id=workflow_id)
    caller.client.post(f"/api/v1/tasks/{task.pk}/cancel/", {"reason": "wrong input"}, format="json")
    caller.client.post(f"/api/v1/workflows/{workflow_id}/retry/")
    caller.client.post(f"/api/v1/workflows/{workflow_id}/cancel/", format="json")
    caller.client.post(f"/api/v1/tasks/{task.pk}/retry/")

    def named(event_type: str, entity_id: str) -> list[dict]:
        events = Event.objects.filter(event_type=event_type, entity_id=entity_id).order_by("sequence")
        return [{key: e.payload.get(key) for key in ("by", "via")} for e in events]

    assert named("task_cancelled", task.pk) == [asked, asked]
    assert named("workflow_cancelled", workflow_id) == [asked, asked]
    assert named("workflow_resumed", workflow_id) == [asked, asked]
    assert named("task_retrying", task.pk) == [asked, asked]


def test_a_workflow_submitted_while_the_broker_is_down_is_accepted_and_sent_by_the_sweeper(
    transactional_db, monkeypatch, caplog
):
    """The workflow and its queued tasks are committed before their messages are sent: a
    broker that does not answer then is no reason to tell the client it failed (it would
    submit again); the dispatch sweeper sends the messages once the broker is back. The log
    says so in one line naming the broker's error, without kombu's traceback."""
    from django.core.management import call_command

    from orchestration.services.reaper import queued_sweep
    from tests.api.conftest import make_caller

    call_command("load_agents", stdout=io.StringIO())
    caller = make_caller("dev", "developer")
    use_broker(monkeypatch, "redis://127.0.0.1:1/0")  # nothing listens there

    response = caller.client.post("/api/v1/workflows/", SPEC, format="json")

    assert response.status_code == 201, response.content
    task = TaskExecution.objects.get(workflow_id=response.json()["workflow_id"])
    assert task.status == "queued"
    [record] = [r for r in caplog.records if r.getMessage().startswith("broker unreachable")]
    assert record.exc_info is None and not record.exc_text  # (the redaction filter renders a traceback into exc_text)
    assert "OperationalError: Error 111 connecting to 127.0.0.1:1" in record.getMessage()
    assert f"1 task message(s) not sent, the dispatch sweeper sends them: {task.pk}" in record.getMessage()
    monkeypatch.undo()  # the broker answers again
    later = timezone.now() + dt.timedelta(seconds=settings.DISPATCH_SWEEP_AFTER_SECONDS + 1)
    assert queued_sweep(now=later) == [task.pk]


@pytest.fixture
def private_broker(transactional_db, monkeypatch, tmp_path):
    """A Redis server of the test's own as the broker, to pause or stop, with a 2 s socket
    timeout (a paused write waits this long)."""
    from tests.engine import PrivateRedis

    broker = PrivateRedis(tmp_path)
    use_broker(monkeypatch, broker.url, socket_timeout=2)
    yield broker
    broker.stop()


def queued_ids(client, queue: str = "normal") -> list[str]:
    return [json.loads(raw)["headers"]["id"] for raw in client.lrange(queue, 0, -1)]


def test_a_workflow_submitted_while_the_broker_stops_taking_writes_is_accepted_and_sent_by_the_sweeper(
    private_broker,
):
    """A submission's messages are written to Redis in one batch when it is flushed, on the
    producer's pooled connection, after their routes are read. A broker that stops taking
    writes meanwhile (a failover pauses them; a restart closes the connection) fails the flush:
    the client is not failed for that either, and the sweeper sends the messages once the broker
    takes writes again."""
    import redis
    from django.core.management import call_command

    from orchestration.services.reaper import queued_sweep
    from tests.api.conftest import make_caller

    call_command("load_agents", stdout=io.StringIO())
    caller = make_caller("dev", "developer")
    client = redis.Redis.from_url(private_broker.url)
    # A first submission: its queue is declared on the pooled connection, which is reused.
    assert caller.client.post("/api/v1/workflows/", SPEC, format="json").status_code == 201
    assert client.llen("normal") == 1
    client.client_pause(60_000, all=False)  # writes wait, reads are answered

    response = caller.client.post("/api/v1/workflows/", SPEC, format="json")

    assert response.status_code == 201, response.content
    task = TaskExecution.objects.get(workflow_id=response.json()["workflow_id"])
    assert task.status == "queued"
    client.client_unpause()
    later = timezone.now() + dt.timedelta(seconds=settings.DISPATCH_SWEEP_AFTER_SECONDS + 1)
    assert queued_sweep(now=later) == [task.pk]
    task.refresh_from_db()
    assert task.celery_task_id in queued_ids(client)


def test_a_submission_whose_queue_declaration_is_retried_over_a_new_connection_sends_its_message(
    private_broker, monkeypatch
):
    """A connection's first submission declares its queue, retried over a new connection when
    the broker fails it: here writes stop (a failover pauses them) and resume by the retry. The
    producer must then publish over the new connection, not on the channel the retry closed
    (kombu then raised an AttributeError after the commit: a 500 for a stored workflow)."""
    import redis
    from django.core.management import call_command

    from orchestration.tasks import run_task
    from tests.api.conftest import make_caller

    call_command("load_agents", stdout=io.StringIO())
    caller = make_caller("dev", "developer")
    client = redis.Redis.from_url(private_broker.url)
    app = run_task.app
    # kombu calls the policy's errback when a try has failed: the writes resume then.
    policy = {**(app.conf.task_publish_retry_policy or {}), "errback": lambda exc, interval: client.client_unpause()}
    monkeypatch.setitem(app.conf, "task_publish_retry_policy", policy)
    client.client_pause(60_000, all=False)

    response = caller.client.post("/api/v1/workflows/", SPEC, format="json")

    assert response.status_code == 201, response.content
    task = TaskExecution.objects.get(workflow_id=response.json()["workflow_id"])
    assert queued_ids(client) == [task.celery_task_id]


def test_a_workflow_cancelled_while_the_broker_is_down_is_cancelled_and_answered_so(
    transactional_db, monkeypatch, caplog
):
    """A cancel is committed before its tasks' messages are revoked (and their processes
    terminated) through the broker. A broker that does not answer then failed the request
    with a 500, kombu's traceback in the log, although the workflow was cancelled: the client
    (or the console's button) was told the cancel failed, and its retry answered 409, "is
    cancelled". A message left unrevoked runs nothing (its task is no longer queued); a
    process left running ends as it would, recorded late."""
    from django.core.management import call_command

    from tests.api.conftest import make_caller

    call_command("load_agents", stdout=io.StringIO())
    caller = make_caller("dev", "developer")
    workflow_id = caller.client.post("/api/v1/workflows/", SPEC, format="json").json()["workflow_id"]
    use_broker(monkeypatch, "redis://127.0.0.1:1/0")  # nothing listens there
    caller.client.raise_request_exception = False

    response = caller.client.post(f"/api/v1/workflows/{workflow_id}/cancel/", format="json")

    assert response.status_code == 200, response.content
    assert response.json()["status"] == "cancelled"
    task = TaskExecution.objects.get(workflow_id=workflow_id)
    assert task.status == "cancelled"
    [record] = [r for r in caplog.records if r.getMessage().startswith("broker unreachable")]
    assert record.exc_info is None and not record.exc_text
    assert "OperationalError: Error 111 connecting to 127.0.0.1:1" in record.getMessage()
    assert f"1 message(s) not revoked: {task.celery_task_id}" in record.getMessage()
