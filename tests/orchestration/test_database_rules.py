"""Rules PostgreSQL enforces itself (orchestration migration 0002): events are append-only,
finished attempts are immutable, updated_at and workflows.duration_ms are kept by triggers."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from decimal import Decimal

import psycopg.errors
import pytest
from django.db import IntegrityError, connection, transaction
from django.db.models import Model
from django.utils import timezone

from orchestration.models import Agent, ApiKey, Event, TaskAttempt, TaskExecution, Workflow
from tests.factories import (
    AgentFactory,
    EventFactory,
    ExportRunFactory,
    TaskAttemptFactory,
    TaskExecutionFactory,
    WorkflowFactory,
)
from training_export.models import ExportRun

APPEND_ONLY = "events is append-only: {} is not allowed"


def run_sql(sql: str, params: list | None = None) -> None:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)


def assert_restrict_violation(error: IntegrityError, message: str) -> None:
    """The triggers raise SQLSTATE 23001 (restrict_violation): an integrity error class, so
    psycopg raises RestrictViolation and Django re-raises it as its own IntegrityError."""
    assert type(error) is IntegrityError
    assert type(error.__cause__) is psycopg.errors.RestrictViolation
    assert error.__cause__.sqlstate == "23001"
    assert message in str(error)


# --- events: append-only ------------------------------------------------------------------


@pytest.fixture
def event(db: None) -> Event:
    return EventFactory(entity_id="wf-1", payload={"k": "v"})


def assert_unchanged(event: Event) -> None:
    stored = Event.objects.get(pk=event.pk)
    assert (stored.event_id, stored.entity_id, stored.payload) == (event.event_id, "wf-1", {"k": "v"})


@pytest.mark.parametrize(
    ("sql", "operation"),
    [
        ("UPDATE events SET payload = '{}'::jsonb WHERE sequence = %s", "UPDATE"),
        ("UPDATE events SET payload = '{}'::jsonb WHERE false AND sequence = %s", "UPDATE"),
        ("DELETE FROM events WHERE sequence = %s", "DELETE"),
        ("DELETE FROM events WHERE false AND sequence = %s", "DELETE"),
        ("DELETE FROM events WHERE false", "DELETE"),
        ("TRUNCATE events", "TRUNCATE"),
    ],
)
def test_events_reject_raw_sql_changes(event: Event, sql: str, operation: str) -> None:
    params = [event.pk] if "%s" in sql else None

    with pytest.raises(IntegrityError) as raised, transaction.atomic():
        run_sql(sql, params)

    assert_restrict_violation(raised.value, APPEND_ONLY.format(operation))
    assert_unchanged(event)


def _queryset_update(event: Event) -> None:
    Event.objects.filter(pk=event.pk).update(payload={"changed": True})


def _save_after_change(event: Event) -> None:
    event.payload = {"changed": True}
    event.save()


def _instance_delete(event: Event) -> None:
    event.delete()


def _queryset_delete(event: Event) -> None:
    Event.objects.all().delete()


@pytest.mark.parametrize(
    ("change", "operation"),
    [
        (_queryset_update, "UPDATE"),
        (_save_after_change, "UPDATE"),
        (_instance_delete, "DELETE"),
        (_queryset_delete, "DELETE"),
    ],
)
def test_events_reject_orm_changes(event: Event, change: Callable[[Event], None], operation: str) -> None:
    with pytest.raises(IntegrityError) as raised, transaction.atomic():
        change(Event.objects.get(pk=event.pk))

    assert_restrict_violation(raised.value, APPEND_ONLY.format(operation))
    assert_unchanged(event)


def test_events_accept_inserts(event: Event) -> None:
    EventFactory(event_type="workflow_started", entity_id="wf-1")
    run_sql(
        "INSERT INTO events (event_id, event_type, entity_type, entity_id, source, payload, severity, created_at)"
        " VALUES ('raw-1', 'workflow_completed', 'workflow', 'wf-1', 'test', '{}'::jsonb, 'info', now())"
    )

    stored = Event.objects.filter(entity_id="wf-1").order_by("sequence")
    assert list(stored.values_list("event_type", flat=True)) == [
        "workflow_created",
        "workflow_started",
        "workflow_completed",
    ]


# --- task_attempts: immutable once finished -------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("status", ["succeeded", "failed", "timed_out", "lost", "cancelled"])
def test_finished_attempt_rejects_raw_update(status: str) -> None:
    attempt = TaskAttemptFactory(status=status, finished_at=timezone.now())

    with pytest.raises(IntegrityError) as raised, transaction.atomic():
        run_sql("UPDATE task_attempts SET error = 'rewritten' WHERE id = %s", [attempt.pk])

    assert_restrict_violation(raised.value, f"is finished ({status}) and cannot change")
    attempt.refresh_from_db()
    assert attempt.error is None


@pytest.mark.django_db
@pytest.mark.parametrize("change", ["worker_pid = 1", "worker_started_at = now()", "pool_pid = 1"])
def test_a_lost_attempt_gaining_spend_keeps_the_process_that_ran_it(change: str) -> None:
    attempt = TaskAttemptFactory(status="lost", finished_at=timezone.now())

    with pytest.raises(IntegrityError) as raised, transaction.atomic():
        run_sql(f"UPDATE task_attempts SET tokens_used = tokens_used + 1, {change} WHERE id = %s", [attempt.pk])  # noqa: S608

    assert_restrict_violation(raised.value, "is finished (lost) and cannot change")
    attempt.refresh_from_db()
    assert (attempt.worker_pid, attempt.worker_started_at, attempt.pool_pid) == (None, None, None)


@pytest.mark.django_db
def test_finished_attempt_rejects_orm_updates() -> None:
    attempt = TaskAttemptFactory(failed=True)

    with pytest.raises(IntegrityError) as raised, transaction.atomic():
        TaskAttempt.objects.filter(pk=attempt.pk).update(status=TaskAttempt.Status.SUCCEEDED)
    assert_restrict_violation(raised.value, "is finished (failed) and cannot change")

    attempt.cost_usd = Decimal("0")
    with pytest.raises(IntegrityError), transaction.atomic():
        attempt.save(update_fields=["cost_usd"])

    attempt.refresh_from_db()
    assert (attempt.status, attempt.cost_usd) == ("failed", Decimal("0.001"))


@pytest.mark.django_db
@pytest.mark.parametrize("status", ["timed_out", "lost", "cancelled"])
def test_an_attempt_closed_without_a_result_may_only_gain_spend(status: str) -> None:
    """Spend charged after the close (a model's answer on its way) is added to the usage
    columns; nothing else may change, and usage may not shrink."""
    attempt = TaskAttemptFactory(status=status, finished_at=timezone.now(), tokens_used=10, cost_usd=Decimal("0.5"))
    added = "UPDATE task_attempts SET tokens_used = tokens_used + 5, cost_usd = cost_usd + 0.25 WHERE id = %s"
    run_sql(added, [attempt.pk])
    for statement in (
        "UPDATE task_attempts SET tokens_used = tokens_used + 1, error = 'rewritten' WHERE id = %s",
        "UPDATE task_attempts SET cost_usd = 0 WHERE id = %s",
        "UPDATE task_attempts SET status = 'succeeded' WHERE id = %s",
    ):
        with pytest.raises(IntegrityError) as raised, transaction.atomic():
            run_sql(statement, [attempt.pk])
        assert_restrict_violation(raised.value, f"is finished ({status}) and cannot change")
    attempt.refresh_from_db()
    assert (attempt.status, attempt.tokens_used, attempt.cost_usd, attempt.error) == (
        status,
        15,
        Decimal("0.75"),
        None,
    )


@pytest.mark.django_db
@pytest.mark.parametrize("status", ["succeeded", "failed"])
def test_an_attempt_closed_with_a_result_keeps_its_spend(status: str) -> None:
    attempt = TaskAttemptFactory(status=status, finished_at=timezone.now(), tokens_used=10)
    with pytest.raises(IntegrityError) as raised, transaction.atomic():
        run_sql("UPDATE task_attempts SET tokens_used = tokens_used + 5 WHERE id = %s", [attempt.pk])
    assert_restrict_violation(raised.value, f"is finished ({status}) and cannot change")


@pytest.mark.django_db
def test_running_attempt_is_finished_exactly_once() -> None:
    attempt = TaskAttemptFactory()
    running = TaskAttempt.objects.filter(pk=attempt.pk, status=TaskAttempt.Status.RUNNING)

    assert running.update(status="succeeded", finished_at=timezone.now(), tokens_used=12) == 1
    # a redelivered completion finds no running row: a no-op, not an error
    assert running.update(status="failed", finished_at=timezone.now()) == 0
    with pytest.raises(IntegrityError), transaction.atomic():
        TaskAttempt.objects.filter(pk=attempt.pk).update(status="failed")

    attempt.refresh_from_db()
    assert (attempt.status, attempt.tokens_used) == ("succeeded", 12)


# --- updated_at and duration_ms -------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("make", "change"),
    [
        (WorkflowFactory, {"current_step": "step-2"}),
        (TaskExecutionFactory, {"worker": "celery@host-2"}),
        (AgentFactory, {"description": "changed"}),
        (ExportRunFactory, {"rows": 42}),
    ],
    ids=["workflow", "task", "agent", "export_run"],
)
def test_queryset_update_refreshes_updated_at(make: Callable[..., Model], change: dict) -> None:
    row = make()
    model = type(row)
    before = model.objects.values_list("updated_at", flat=True).get(pk=row.pk)

    assert model.objects.filter(pk=row.pk).update(**change) == 1

    after = model.objects.values_list("updated_at", flat=True).get(pk=row.pk)
    assert after > before
    with connection.cursor() as cursor:
        cursor.execute("SELECT clock_timestamp()")
        assert after <= cursor.fetchone()[0]


def test_updated_at_triggers_cover_the_mutable_tables(db: None) -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
            " WHERE t.tgname = 'update_' || c.relname || '_updated_at' AND t.tgenabled = 'O' ORDER BY 1"
        )
        tables = [row[0] for row in cursor.fetchall()]

    mutable = (Agent, ApiKey, ExportRun, TaskAttempt, TaskExecution, Workflow)
    assert tables == sorted(model._meta.db_table for model in mutable)


T0 = dt.datetime(2025, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
T1 = T0 + dt.timedelta(minutes=1, seconds=30, microseconds=250_400)  # 90 250.4 ms later


@pytest.mark.django_db
@pytest.mark.parametrize("status", ["completed", "failed", "cancelled"])
def test_duration_ms_is_set_when_a_workflow_ends(status: str) -> None:
    workflow = WorkflowFactory(status="running", started_at=T0)

    Workflow.objects.filter(pk=workflow.pk).update(status=status, completed_at=T1)

    workflow.refresh_from_db()
    assert workflow.duration_ms == 90250


@pytest.mark.django_db
def test_duration_ms_is_set_on_insert_of_a_finished_workflow() -> None:
    workflow = WorkflowFactory(status="completed", started_at=T0, completed_at=T0 + dt.timedelta(milliseconds=1500))

    workflow.refresh_from_db()
    assert workflow.duration_ms == 1500


@pytest.mark.django_db
def test_duration_ms_is_cleared_when_a_workflow_runs_again() -> None:
    workflow = WorkflowFactory(status="running", started_at=T0)
    Workflow.objects.filter(pk=workflow.pk).update(status="failed", completed_at=T1)

    Workflow.objects.filter(pk=workflow.pk).update(status="running")

    workflow.refresh_from_db()
    assert (workflow.status, workflow.completed_at, workflow.duration_ms) == ("running", T1, None)


@pytest.mark.django_db
def test_duration_ms_cannot_be_written_directly() -> None:
    workflow = WorkflowFactory(status="running", started_at=T0)

    Workflow.objects.filter(pk=workflow.pk).update(duration_ms=5)

    workflow.refresh_from_db()
    assert workflow.duration_ms is None


@pytest.mark.django_db
def test_duration_ms_needs_both_timestamps() -> None:
    workflow = WorkflowFactory(status="running")

    Workflow.objects.filter(pk=workflow.pk).update(status="completed", completed_at=T1)

    workflow.refresh_from_db()
    assert workflow.duration_ms is None


# --- the test harness's flush keeps the append-only trigger -----------------------------------
# pytest-django runs transactional tests after the others, in file order among themselves, so
# the second test below runs right after the flush (TRUNCATE) that ends the first.


@pytest.mark.django_db(transaction=True)
def test_a_transactional_test_commits_an_event() -> None:
    EventFactory(entity_id="committed")

    assert Event.objects.filter(entity_id="committed").count() == 1
    assert not connection.in_atomic_block


@pytest.mark.django_db(transaction=True)
def test_append_only_trigger_survives_the_flush_after_a_transactional_test() -> None:
    assert Event.objects.count() == 0  # the flush emptied the table...
    with connection.cursor() as cursor:
        cursor.execute("SELECT tgenabled FROM pg_trigger WHERE tgname = 'events_append_only'")
        assert cursor.fetchall() == [("O",)]  # ...and re-enabled the trigger

    event = EventFactory()
    with pytest.raises(IntegrityError) as raised:
        Event.objects.filter(pk=event.pk).update(severity="error")
    assert_restrict_violation(raised.value, APPEND_ONLY.format("UPDATE"))
    assert Event.objects.get(pk=event.pk).severity == "info"


@pytest.mark.django_db
def test_an_insert_that_does_not_name_wasted_cost_gets_0() -> None:
    """Seed SQL and bulk loads (bench.api's) write workflows without the column migration 0026
    added: the database itself fills it in."""
    workflow = WorkflowFactory()
    columns = [f.column for f in Workflow._meta.concrete_fields if f.column != "wasted_cost_usd"]
    quoted = [connection.ops.quote_name(column) for column in columns]
    values = ["%s" if column == "workflow_id" else name for column, name in zip(columns, quoted, strict=True)]
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO workflows ({', '.join(quoted)}) SELECT {', '.join(values)} "  # noqa: S608
            "FROM workflows WHERE workflow_id = %s",
            ["wf-copy", workflow.pk],
        )
    assert Workflow.objects.get(pk="wf-copy").wasted_cost_usd == 0
