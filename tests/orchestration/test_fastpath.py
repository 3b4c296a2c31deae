"""The fast path's statements: prepared on the server, inside Django's transaction, and
failing with Django's exceptions."""

from __future__ import annotations

import pytest
from django.db import DataError, connection, transaction

from orchestration.services.fastpath import execute_prepared


def _prepared(fragment: str) -> list[tuple[int, int]]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement LIKE %s",
            [f"%{fragment}%"],
        )
        return cursor.fetchall()


def test_statements_are_prepared_once_and_reused(db):
    sql = "SELECT %s::int + 1 AS fastpath_probe"
    assert [execute_prepared(sql, [i]) for i in range(3)] == [[(1,)], [(2,)], [(3,)]]
    (plans,) = _prepared("fastpath_probe")
    assert sum(plans) == 3  # one prepared statement executed three times, not three statements


def test_statements_run_in_the_callers_transaction(db):
    with connection.cursor() as cursor:
        cursor.execute("CREATE TEMPORARY TABLE fastpath_probe_rows (n int)")
    with pytest.raises(RuntimeError), transaction.atomic():
        execute_prepared("INSERT INTO fastpath_probe_rows VALUES (%s) RETURNING n", [7])
        raise RuntimeError("roll back")
    assert execute_prepared("SELECT count(*) FROM fastpath_probe_rows", []) == [(0,)]
    with transaction.atomic():
        execute_prepared("INSERT INTO fastpath_probe_rows VALUES (%s) RETURNING n", [8])
    assert execute_prepared("SELECT n FROM fastpath_probe_rows", []) == [(8,)]


def test_errors_are_djangos_and_leave_the_connection_usable(db):
    with pytest.raises(DataError) as raised, transaction.atomic():
        execute_prepared("SELECT 1 / %s::int", [0])
    assert raised.value.__cause__.sqlstate == "22012"  # division_by_zero, from psycopg
    assert execute_prepared("SELECT 1 / %s::int", [1]) == [(1,)]


@pytest.mark.parametrize("fast_path", [True, False])
def test_engine_fast_path_false_leaves_workflow_advance_on_the_orm(builtin_agents, settings, fast_path):
    from django.utils import timezone

    from orchestration.models import TaskExecution, Workflow
    from orchestration.services.progress import workflow_advance
    from orchestration.services.workflows import workflow_submit

    settings.ENGINE_FAST_PATH = fast_path
    workflow, _ = workflow_submit(
        spec={
            "name": "two",
            "tasks": [{"name": "a", "agent": "echo"}, {"name": "b", "agent": "echo", "depends_on": ["a"]}],
        }
    )
    Workflow.objects.filter(pk=workflow.pk).update(status=Workflow.Status.RUNNING)
    TaskExecution.objects.filter(workflow=workflow, task_name="a").update(status=TaskExecution.Status.COMPLETED)
    with connection.cursor() as cursor:
        cursor.execute("DEALLOCATE ALL")
    workflow_advance(
        workflow_id=workflow.pk, completed_task="a", status=Workflow.Status.RUNNING, now=timezone.now(), deadline=None
    )
    assert TaskExecution.objects.get(workflow=workflow, task_name="b").status == TaskExecution.Status.QUEUED
    assert bool(_prepared("depends_on")) is fast_path


def _stored(model, order: str, **filters) -> list[dict]:
    skip = {"created_at", "updated_at", "sequence", "event_id", "execution_id", "workflow_id", "entity_id"}
    return [
        {k: v for k, v in row.items() if k not in skip}
        for row in model.objects.filter(**filters).order_by(order).values()
    ]


def test_insert_rows_stores_what_bulk_create_stores_in_list_order(builtin_agents):
    from decimal import Decimal

    from django.utils import timezone

    from orchestration.models import Event, TaskExecution, Workflow
    from orchestration.services.fastpath import insert_rows

    now = timezone.now()
    tricky = {"q": 'it\'s "quoted" \\ back\\slash ü \u2028', "n": [1, 2.5, None, True, {"deep": []}], "big": 2**62}

    def rows(workflow: Workflow) -> tuple[list[TaskExecution], list[Event]]:
        tasks = [
            TaskExecution(
                workflow=workflow,
                agent_id="echo",
                task_name=f"t{i}",
                description="d'x" if i else "",
                status="queued" if i % 2 else "pending",
                depends_on=[] if i % 2 else ["t1"],
                input_data=tricky if i == 1 else {"i": i},
                error=None if i else "E",
                cost_usd=Decimal("0.123456") * i,
                execution_time_ms=None if i else 1.5,
                celery_task_id=f"c{i}" if i % 2 else None,
                queued_at=now if i % 2 else None,
            )
            for i in range(5)
        ]
        events = [
            Event(event_type="task_queued", entity_type="task", entity_id=t.execution_id, payload={"i": i, **tricky})
            for i, t in enumerate(tasks)
        ]
        for event in events:
            event.workflow_id = workflow.workflow_id
        return tasks, events

    fast, orm = Workflow.objects.create(name="fast"), Workflow.objects.create(name="orm")
    tasks, events = rows(fast)
    insert_rows(tasks)
    insert_rows(events)
    orm_tasks, orm_events = rows(orm)
    TaskExecution.objects.bulk_create(orm_tasks)
    Event.objects.bulk_create(orm_events)

    assert _stored(TaskExecution, "task_name", workflow=fast) == _stored(TaskExecution, "task_name", workflow=orm)
    assert _stored(Event, "sequence", workflow_id=fast.pk) == _stored(Event, "sequence", workflow_id=orm.pk)
    # events are numbered in list order (the relay publishes in sequence order)
    stored = Event.objects.filter(workflow_id=fast.pk).order_by("sequence").values_list("entity_id", flat=True)
    assert list(stored) == [t.execution_id for t in tasks]
    # the database's clock fills created_at and updated_at (their INSERT's time)
    first = TaskExecution.objects.get(pk=tasks[0].pk)
    assert first.created_at and first.updated_at == first.created_at and first.queued_at is None
    assert TaskExecution.objects.get(pk=tasks[1].pk).queued_at == now


def test_insert_rows_leaves_explicit_database_defaults_mixed_with_unset_ones_to_bulk_create(builtin_agents):
    import datetime as dt

    from orchestration.models import Event
    from orchestration.services.fastpath import insert_rows

    old = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    events = [
        Event(event_type="task_queued", entity_id="mixed-1"),
        Event(event_type="task_queued", entity_id="mixed-2", created_at=old),
    ]
    insert_rows(events)
    stored = dict(Event.objects.filter(entity_id__startswith="mixed-").values_list("entity_id", "created_at"))
    assert stored["mixed-2"] == old and stored["mixed-1"] > old


def test_fast_claim_returns_the_complete_attempt_and_agent_rows(builtin_agents):
    from orchestration.models import Agent, TaskAttempt, TaskExecution
    from orchestration.services.execution import Claim, attempt_claim
    from orchestration.services.workflows import workflow_submit

    workflow, _ = workflow_submit(spec={"name": "one", "tasks": [{"name": "a", "agent": "echo", "input": {"k": 1}}]})
    task = TaskExecution.objects.get(workflow=workflow)
    claim = attempt_claim(execution_id=task.pk, celery_task_id=task.celery_task_id, worker="w1")
    assert isinstance(claim, Claim)

    def fields(obj) -> dict:
        return {f.attname: getattr(obj, f.attname) for f in type(obj)._meta.concrete_fields}

    stored_agent = Agent.objects.get(pk="echo")
    assert stored_agent.name and fields(claim.agent) == fields(stored_agent)
    assert fields(claim.attempt) == fields(TaskAttempt.objects.get(execution=task))
    assert not claim.agent._state.adding and not claim.attempt._state.adding
    assert (claim.task_input, claim.context.attempt_number, claim.context.workflow_id) == ({"k": 1}, 1, workflow.pk)


def test_dispatch_pipelines_messages_in_batches_in_order(builtin_agents, monkeypatch):
    import json

    import redis
    from django.conf import settings
    from kombu.transport.redis import PublishBatch

    from orchestration.services import dispatch
    from tests.engine import flush_redis

    flushes = []
    original = PublishBatch.flush

    def counted(self):
        flushes.append(self._buffered)
        return original(self)

    monkeypatch.setattr(PublishBatch, "flush", counted)
    monkeypatch.setattr(dispatch, "PUBLISH_BATCH", 3)
    flush_redis()
    dispatch.dispatch_send(
        [
            dispatch.Dispatch(execution_id=f"e{i}", celery_task_id=f"m{i}", queue="low", timeout_seconds=5)
            for i in range(5)
        ]
    )
    queued = redis.Redis.from_url(settings.CELERY_BROKER_URL).lrange("low", 0, -1)
    assert [json.loads(m)["headers"]["id"] for m in reversed(queued)] == ["m0", "m1", "m2", "m3", "m4"]
    assert [n for n in flushes if n] == [3, 2]  # one round trip per batch of three, not one per message
    flush_redis()


def test_dispatch_declares_each_queue_once_per_batch_and_every_message_arrives(monkeypatch):
    import json

    import kombu.common
    import redis
    from django.conf import settings

    from orchestration.services import dispatch
    from tests.engine import flush_redis

    declared = []
    original = kombu.common._maybe_declare

    def counted(entity, channel):
        declared.append(entity.name)
        return original(entity, channel)

    monkeypatch.setattr(kombu.common, "_maybe_declare", counted)  # declares, or finds it declared
    flush_redis()
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    dispatch.dispatch_send(
        [
            dispatch.Dispatch(execution_id=f"e{i}", celery_task_id=f"m{i}", queue=queue, timeout_seconds=5)
            for i, queue in enumerate(["low", "high", "low", "low", "high"])
        ]
    )
    assert sorted(declared) == ["high", "low"]  # once per queue, not once per message
    assert [json.loads(m)["headers"]["id"] for m in reversed(client.lrange("low", 0, -1))] == ["m0", "m2", "m3"]
    assert [json.loads(m)["headers"]["id"] for m in reversed(client.lrange("high", 0, -1))] == ["m1", "m4"]
    flush_redis()


@pytest.fixture
def committed_agents(transactional_db: None) -> None:
    import io

    from django.core.management import call_command

    call_command("load_agents", stdout=io.StringIO())


def _claimed(names: list[str], **fields: object) -> dict:
    """A workflow of independent echo tasks, each claimed in-process (no worker): name -> Claim."""
    from unittest import mock

    from orchestration.models import TaskExecution
    from orchestration.services import dispatch
    from orchestration.services.execution import attempt_claim
    from orchestration.services.workflows import workflow_submit

    with mock.patch.object(dispatch, "dispatch_send"):
        workflow_submit(spec={"name": "alone", **fields, "tasks": [{"name": n, "agent": "echo"} for n in names]})
    return {
        task.task_name: attempt_claim(execution_id=task.pk, celery_task_id=task.celery_task_id, worker="w1")
        for task in TaskExecution.objects.filter(task_name__in=names).exclude(status="pending")
    }


def _succeed(claim, **kwargs):
    from django.utils import timezone

    from orchestration.runtime.context import AgentResult
    from orchestration.services.execution import attempt_succeed

    return attempt_succeed(
        attempt=claim.attempt, result=AgentResult(output={"ok": 1}), duration_ms=2.5, now=timezone.now(), **kwargs
    )


def test_a_completion_that_needs_no_advance_is_one_statement_with_the_same_record(committed_agents):
    from unittest import mock

    from orchestration.models import Event, TaskAttempt, TaskExecution, Workflow
    from orchestration.services import execution

    claims = _claimed(["a", "b", "c"])
    assert all(c.standalone for c in claims.values())  # nothing pending at the claims
    with mock.patch.object(execution, "atomic_with_retry", side_effect=AssertionError("a transaction block")):
        assert _succeed(claims["a"], standalone=True) is True
    a = TaskExecution.objects.get(task_name="a")
    attempt = TaskAttempt.objects.get(execution=a)
    wf = Workflow.objects.get(pk=a.workflow_id)
    assert (a.status, a.output_data, a.execution_time_ms, a.error) == ("completed", {"ok": 1}, 2.5, None)
    assert (attempt.status, attempt.duration_ms, attempt.finished_at is not None) == ("succeeded", 2.5, True)
    assert (wf.status, wf.completed_steps, wf.current_step) == ("running", 1, "a")
    completed = Event.objects.get(entity_id=a.pk, event_type="task_completed")
    assert completed.payload == {"task_name": "a", "status": "completed", "attempt": 1, "duration_ms": 2.5}
    # the last one to finish takes the transaction, which completes the workflow
    assert _succeed(claims["b"], standalone=True) is True
    assert _succeed(claims["c"], standalone=True) is True
    wf.refresh_from_db()
    assert (wf.status, wf.completed_steps) == ("completed", 3)
    assert Event.objects.filter(entity_id=wf.pk, event_type="workflow_completed").count() == 1
    assert Event.objects.filter(workflow_id=wf.pk, event_type="task_completed").count() == 3


def test_succeed_alone_writes_nothing_when_the_workflow_must_advance_or_the_attempt_ended(committed_agents):
    from decimal import Decimal

    from django.utils import timezone

    from orchestration.models import Event, TaskAttempt, TaskExecution, Workflow
    from orchestration.services import fastpath

    claims = _claimed(["a", "b"])
    values = {"output": {}, "duration_ms": 1.0, "input_tokens": 0, "output_tokens": 0, "now": timezone.now()}

    def completion(name: str) -> fastpath.Completion:
        return fastpath.Completion(attempt_id=claims[name].attempt.pk, cost=Decimal(0), **values)

    TaskAttempt.objects.filter(pk=claims["b"].attempt.pk).update(status="cancelled", finished_at=timezone.now())
    events = Event.objects.count()
    assert fastpath.succeed_alone(completion("b")) is False
    # a is the last unfinished task once b is cancelled and counted: the workflow must be finished
    Workflow.objects.filter(pk=claims["a"].context.workflow_id).update(cancelled_steps=1)
    assert fastpath.succeed_alone(completion("a")) is None
    assert TaskAttempt.objects.get(pk=claims["a"].attempt.pk).status == "running"
    assert TaskExecution.objects.get(task_name="a").status == "running"
    assert Workflow.objects.get(pk=claims["a"].context.workflow_id).completed_steps == 0
    assert Event.objects.count() == events
    # inside a transaction the caller's transaction is used instead
    with transaction.atomic():
        assert fastpath.succeed_alone(completion("a")) is None


def test_a_claim_of_the_only_task_or_with_pending_tasks_is_not_standalone(committed_agents):
    from unittest import mock

    from orchestration.models import TaskExecution
    from orchestration.services import dispatch
    from orchestration.services.execution import attempt_claim
    from orchestration.services.workflows import workflow_submit

    with mock.patch.object(dispatch, "dispatch_send"):
        workflow_submit(
            spec={
                "name": "dag",
                "tasks": [{"name": "a", "agent": "echo"}, {"name": "b", "agent": "echo", "depends_on": ["a"]}],
            }
        )
    a = TaskExecution.objects.get(task_name="a")
    claim = attempt_claim(execution_id=a.pk, celery_task_id=a.celery_task_id, worker="w1")
    assert claim.standalone is False
    (only,) = _claimed(["only"]).values()
    assert only.standalone is False  # its completion finishes the workflow: the transaction does
