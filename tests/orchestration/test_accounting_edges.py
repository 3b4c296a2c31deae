"""Accounting at the edges: spend counted once across a resume, agent definitions applied
whole, retention against a concurrent resume, agents' summaries once their tasks are pruned.
(Each found by an audit and failing before its fix; the llm executor's usage on a failed later
round is tested in test_agent_runtime.py.)"""

from __future__ import annotations

import datetime as dt
import io
import json
import uuid
from decimal import Decimal
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.db.models import Sum

from orchestration.errors import PermanentError, TransitionError
from orchestration.models import Agent, AgentMetric, TaskAttempt, TaskExecution, Workflow
from orchestration.runtime.context import AgentResult, Usage
from orchestration.services.execution import _meter, attempt_claim, attempt_fail, attempt_succeed
from orchestration.services.reaper import attempts_reap
from orchestration.services.rollup import metrics_rollup
from orchestration.services.workflows import task_cancel, workflow_resume
from tests.factories import AgentFactory, WorkflowFactory
from tests.orchestration.edge_agents import edge_agent

H = dt.datetime(2024, 3, 5, 10, 0, tzinfo=dt.UTC)
DAY_BEFORE = H - dt.timedelta(days=1)  # claimed then: reaped as abandoned


# --- 1. rollup: a resumed task's spend is counted again in the period it finishes again -------


def _run_in_process(agent_id: str, task_input: dict) -> tuple[Workflow, TaskExecution, str]:
    """A one-task workflow of `agent_id`, its one try run here (attempt_run, no worker): the
    workflow, the task and the try's outcome."""
    from orchestration.services.execution import attempt_run
    from orchestration.services.workflows import workflow_submit

    workflow, _ = workflow_submit(
        spec={"name": agent_id, "tasks": [{"name": "t", "agent": agent_id, "input": task_input}]}
    )
    task = TaskExecution.objects.get(workflow=workflow)
    return workflow, task, attempt_run(execution_id=task.pk, celery_task_id=task.celery_task_id, worker="w@h")


def _run_attempt(task: TaskExecution, *, start: dt.datetime, usage: Usage, fail: bool) -> None:
    task.refresh_from_db()
    claim = attempt_claim(execution_id=task.pk, celery_task_id=task.celery_task_id, worker="w", now=start)
    end = start + dt.timedelta(minutes=5)
    if fail:
        attempt_fail(attempt=claim.attempt, exc=PermanentError("bad"), duration_ms=1000, now=end, usage=usage)
    else:
        attempt_succeed(
            attempt=claim.attempt, result=AgentResult(output={"ok": 1}, usage=usage), duration_ms=1000, now=end
        )


def _queued_task() -> TaskExecution:
    """One queued task (no retries) of a running one-task workflow, queued at H."""
    workflow = WorkflowFactory(status=Workflow.Status.RUNNING, started_at=H, total_steps=1)
    return TaskExecution.objects.create(
        workflow=workflow,
        agent=AgentFactory(),
        task_name="t",
        status=TaskExecution.Status.QUEUED,
        celery_task_id=str(uuid.uuid4()),
        queued_at=H,
        max_retries=0,
    )


@pytest.mark.django_db
def test_rollup_cost_and_tokens_add_up_across_periods_for_a_resumed_task():
    task = _queued_task()
    workflow, agent = task.workflow, task.agent
    # hour H: the only attempt fails (paid 150 tokens, $0.01); the workflow fails
    _run_attempt(task, start=H + dt.timedelta(minutes=10), usage=Usage(100, 50, Decimal("0.01")), fail=True)
    assert Workflow.objects.get(pk=workflow.pk).status == Workflow.Status.FAILED
    # the hourly beat rolls up hour H at H+1h05 (rollup_previous), before anyone resumes
    metrics_rollup(period="hour", period_start=H, now=H + dt.timedelta(hours=1, minutes=5))
    # two hours later an operator resumes it; the new attempt succeeds (paid 300 tokens, $0.02)
    workflow_resume(workflow_id=workflow.pk)
    _run_attempt(task, start=H + dt.timedelta(hours=2, minutes=10), usage=Usage(200, 100, Decimal("0.02")), fail=False)

    paid = TaskAttempt.objects.filter(execution=task).aggregate(c=Sum("cost_usd"), t=Sum("tokens_used"))
    assert (paid["c"], paid["t"]) == (Decimal("0.03"), 450)
    for hour in (1, 2):  # and the later hours as they close
        metrics_rollup(period="hour", period_start=H + dt.timedelta(hours=hour))
    hourly = AgentMetric.objects.filter(agent=agent, period="hour")
    cost = sum(m.metric_value for m in hourly.filter(metric_type="cost"))
    tokens = sum(m.metric_value for m in hourly.filter(metric_type="tokens"))
    # What was paid, once: summing the hourly (or daily) figures must give the spend.
    assert (pytest.approx(cost), tokens) == (0.03, 450)


# --- 3. load_agents: a field removed from a definition keeps its old value -----------------------


@pytest.mark.django_db
def test_load_agents_clears_a_field_removed_from_the_definition(tmp_path: Path):
    definition = {
        "id": "limited",
        "name": "Limited",
        "executor": "python",
        "entrypoint": "builtins.print",
        "max_concurrency": 2,
        "temperature": 1.5,
        "description": "old text",
    }
    path = tmp_path / "limited.json"
    path.write_text(json.dumps(definition))
    call_command("load_agents", str(tmp_path), stdout=io.StringIO())
    assert Agent.objects.get(pk="limited").max_concurrency == 2
    for key in ("max_concurrency", "temperature", "description"):
        del definition[key]
    path.write_text(json.dumps(definition))
    out = io.StringIO()
    call_command("load_agents", str(tmp_path), stdout=out)
    agent = Agent.objects.get(pk="limited")
    assert (agent.max_concurrency, agent.temperature, agent.description) == (None, None, "")


# --- 4. retention: a workflow resumed between retention's SELECT and DELETE is deleted -----------


@pytest.mark.django_db(transaction=True)
def test_retention_never_deletes_a_workflow_resumed_meanwhile(settings, monkeypatch):
    import threading

    from django.db import connection
    from django.db.models.query import QuerySet
    from django.utils import timezone

    from orchestration.services import retention

    settings.RETENTION_DAYS_WORKFLOWS = 30
    settings.RETENTION_DAYS_EVENTS = 0
    settings.RETENTION_DAYS_MESSAGES = 0
    settings.RETENTION_DAYS_AGENT_METRICS = 0
    settings.RETENTION_DAYS_EXPORT_RUNS = 0
    old = timezone.now() - dt.timedelta(days=60)
    agent = AgentFactory()
    workflow = WorkflowFactory(status=Workflow.Status.FAILED, started_at=old, completed_at=old, total_steps=1)
    TaskExecution.objects.create(
        workflow=workflow, agent=agent, task_name="t", status=TaskExecution.Status.FAILED, completed_at=old
    )
    monkeypatch.setattr("orchestration.services.dispatch.dispatch_send", lambda dispatches: None)

    resumed = []

    def resume_elsewhere() -> None:
        try:
            workflow_resume(workflow_id=workflow.pk)  # an operator, on another connection
            resumed.append(True)
        except (Workflow.DoesNotExist, TransitionError):  # retention got there first: the workflow is gone
            pass
        finally:
            connection.close()

    original_delete = QuerySet.delete
    fired = []
    threads = []

    def delete(self):
        if self.model is Workflow and not fired:
            fired.append(True)
            thread = threading.Thread(target=resume_elsewhere)
            thread.start()
            thread.join(timeout=3)
            threads.append(thread)
        return original_delete(self)

    monkeypatch.setattr(QuerySet, "delete", delete)
    retention.retention_apply()
    for thread in threads:
        thread.join(timeout=10)
    status = Workflow.objects.filter(pk=workflow.pk).values_list("status", flat=True).first()
    # Either retention deleted the failed workflow and the resume found nothing, or the resume
    # won and the (now running) workflow is kept: never a resumed workflow deleted.
    assert not (resumed and status is None), "a running (resumed) workflow was deleted by retention"


# --- 5. agents' summary columns: an agent whose tasks were all pruned keeps stale figures -------


@pytest.mark.django_db
def test_agent_summary_is_refreshed_when_its_last_tasks_are_gone():
    agent = AgentFactory()
    workflow = WorkflowFactory(status=Workflow.Status.COMPLETED, started_at=H, completed_at=H)
    TaskExecution.objects.create(
        workflow=workflow,
        agent=agent,
        task_name="t",
        status="completed",
        completed_at=H,
        execution_time_ms=100,
        tokens_used=10,
        input_tokens=5,
        output_tokens=5,
    )
    metrics_rollup(period="hour", period_start=H)
    agent.refresh_from_db()
    assert (agent.total_tasks_completed, agent.total_tokens_used) == (1, 10)
    Workflow.objects.filter(pk=workflow.pk).delete()  # retention: tasks go with their workflow
    metrics_rollup(period="hour", period_start=H + dt.timedelta(hours=1))
    agent.refresh_from_db()
    assert (agent.total_tasks_completed, agent.total_tokens_used) == (0, 0)


@pytest.mark.django_db
def test_load_agents_bad_file_leaves_nothing_half_written(tmp_path: Path):
    good = {"id": "aaa", "name": "A", "executor": "python", "entrypoint": "builtins.print"}
    bad = {"id": "zzz", "name": "N" * 150, "executor": "python", "entrypoint": "builtins.print"}
    (tmp_path / "a.json").write_text(json.dumps(good))
    (tmp_path / "z.json").write_text(json.dumps(bad))
    with pytest.raises(CommandError, match=r"z.json: name: 150 characters; at most 100"):
        call_command("load_agents", str(tmp_path), stdout=io.StringIO())
    assert not Agent.objects.filter(pk__in=["aaa", "zzz"]).exists()


# --- a model's answer paid after its attempt was closed without a result -------------------


def _claimed_task() -> tuple[TaskExecution, TaskAttempt]:
    task = _queued_task()
    claim = attempt_claim(execution_id=task.pk, celery_task_id=task.celery_task_id, worker="w", now=H)
    return task, claim.attempt


@pytest.mark.django_db
@pytest.mark.parametrize("closed_by", ["cancel", "reaper"])
def test_spend_paid_after_the_attempt_was_closed_stays_on_record(closed_by):
    """Round 1 is metered while the attempt runs; the attempt is then cancelled (or reaped as
    lost); round 2's answer, already on its way, arrives and is charged. Both rounds must be
    on the attempt, the task and the workflow: the late one was dropped because the meter
    added only to a running attempt."""
    task, attempt = _claimed_task()
    meter = _meter(attempt.pk)
    meter(Usage(100, 50, Decimal("0.010")))
    if closed_by == "cancel":
        task_cancel(execution_id=task.pk)
    else:
        TaskAttempt.objects.filter(pk=attempt.pk).update(started_at=DAY_BEFORE, created_at=DAY_BEFORE)
        attempts_reap()
        assert TaskAttempt.objects.get(pk=attempt.pk).status != TaskAttempt.Status.RUNNING
    meter(Usage(200, 80, Decimal("0.020")))
    attempt.refresh_from_db()
    task.refresh_from_db()
    workflow = Workflow.objects.get(pk=task.workflow_id)
    assert (attempt.input_tokens, attempt.output_tokens, attempt.tokens_used, attempt.cost_usd) == (
        300,
        130,
        430,
        Decimal("0.030"),
    )
    assert (task.input_tokens, task.output_tokens, task.tokens_used, task.cost_usd) == (300, 130, 430, Decimal("0.030"))
    assert (workflow.total_tokens_used, workflow.total_cost_usd) == (430, Decimal("0.030"))


@pytest.mark.django_db
def test_spend_metered_after_a_final_record_is_not_added_again():
    """A succeeded attempt's record carries its whole usage: a stray meter call after it adds
    nothing (the final record replaces the meter, it is not added to it)."""
    task, attempt = _claimed_task()
    attempt_succeed(
        attempt=attempt, result=AgentResult(output={}, usage=Usage(10, 5, Decimal("0.001"))), duration_ms=1, now=H
    )
    _meter(attempt.pk)(Usage(100, 50, Decimal("0.010")))
    attempt.refresh_from_db()
    task.refresh_from_db()
    assert (attempt.tokens_used, task.tokens_used) == (15, 15)
    assert Workflow.objects.get(pk=task.workflow_id).total_tokens_used == 15


# --- wasted spend per workflow (DESIGN §4) --------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("ending", "wasted"),
    [("failed", "0.030"), ("lost", "0.030"), ("cancelled", "0"), ("succeeded", "0")],
)
def test_a_workflows_wasted_spend_is_the_cost_of_its_tries_that_failed(ending, wasted):
    """Round 1 is metered while the attempt runs, round 2 arrives with its end (or, for an
    attempt closed from outside, after it): a failed or lost try's whole cost is wasted; a
    cancelled one's was the user's choice, a succeeded one's bought the result."""
    task, attempt = _claimed_task()
    _meter(attempt.pk)(Usage(100, 50, Decimal("0.010")))
    round_two = Usage(200, 80, Decimal("0.020"))
    if ending == "failed":
        attempt_fail(
            attempt=attempt, exc=PermanentError("bad"), duration_ms=1, now=H, usage=Usage(300, 130, Decimal("0.030"))
        )
    elif ending == "succeeded":
        attempt_succeed(
            attempt=attempt,
            result=AgentResult(output={}, usage=Usage(300, 130, Decimal("0.030"))),
            duration_ms=1,
            now=H,
        )
    else:
        if ending == "cancelled":
            task_cancel(execution_id=task.pk)
        else:
            TaskAttempt.objects.filter(pk=attempt.pk).update(started_at=DAY_BEFORE, created_at=DAY_BEFORE)
            attempts_reap()
        _meter(attempt.pk)(round_two)
    workflow = Workflow.objects.get(pk=task.workflow_id)
    assert workflow.total_cost_usd == Decimal("0.030")
    assert workflow.wasted_cost_usd == Decimal(wasted)


@pytest.mark.django_db
def test_migration_0026_fills_the_wasted_spend_of_workflows_recorded_before_it(monkeypatch):
    import importlib

    from django.db import connection

    task, _ = _claimed_task()
    TaskAttempt.objects.filter(execution=task).update(status="lost", cost_usd=Decimal("0.25"), finished_at=H)
    TaskAttempt.objects.create(
        execution=task, attempt_number=2, status="succeeded", cost_usd=Decimal("1"), started_at=H, finished_at=H
    )
    TaskAttempt.objects.create(
        execution=task, attempt_number=3, status="timed_out", cost_usd=Decimal("0.5"), started_at=H, finished_at=H
    )
    other = _queued_task()  # no spend: untouched
    migration = importlib.import_module("orchestration.migrations.0026_workflows_wasted_cost")
    monkeypatch.setattr(migration, "BATCH_WORKFLOWS", 1)  # a batch per workflow: each one written once
    migration.backfill(None, connection.schema_editor())
    assert Workflow.objects.get(pk=task.workflow_id).wasted_cost_usd == Decimal("0.75")
    assert Workflow.objects.get(pk=other.workflow_id).wasted_cost_usd == 0


# --- a try that ends after its attempt was closed without it --------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("end", ["succeed", "fail"])
def test_a_try_that_ends_after_its_attempt_was_cancelled_is_recorded_as_it_ended(end):
    """The task is cancelled while its agent runs; the agent still ends, with a result or an
    error, and with what it paid after the cancel. Its outcome is not applied (the task stays
    cancelled, no task_completed), but how and when it ended is on record (task_ended_late,
    in the transaction that adds its late spend): before, only a log line said so."""
    from orchestration.event_types import EventType
    from orchestration.models import Event
    from orchestration.services.execution import Outcome

    edge_agent("midway", "cancelled_midway")
    _, task, outcome = _run_in_process("midway", {"end": end})
    assert outcome == (Outcome.SUCCEEDED if end == "succeed" else Outcome.FAILED)
    task.refresh_from_db()
    attempt = TaskAttempt.objects.get(execution=task)
    assert (task.status, attempt.status, attempt.cause) == ("cancelled", "cancelled", "cancelled")
    assert task.output_data is None
    assert (attempt.input_tokens, attempt.output_tokens, attempt.cost_usd) == (100, 20, Decimal("0.0123"))
    kinds = list(Event.objects.filter(entity_id=task.pk).order_by("sequence").values_list("event_type", flat=True))
    assert "task_completed" not in kinds and "task_failed" not in kinds
    assert kinds[-2:] == ["task_cancelled", EventType.TASK_ENDED_LATE]
    late = Event.objects.get(entity_id=task.pk, event_type=EventType.TASK_ENDED_LATE)
    assert late.severity == "warning"
    error = None if end == "succeed" else "PermanentError: the provider refused the second call"
    assert {k: v for k, v in late.payload.items() if k != "duration_ms"} == {
        "task_name": "t",
        "status": "cancelled",
        "attempt": 1,
        "closed_as": "cancelled",
        "cause": "cancelled",
        "outcome": "succeeded" if end == "succeed" else "failed",
        **({} if error is None else {"error": error}),
        "late_usage": {"input_tokens": 90, "output_tokens": 20, "cost_usd": "0.011300"},
    }
    assert late.payload["duration_ms"] >= 0


# --- what a failed try paid, and the meter's checks ------------------------------------------


@pytest.mark.django_db
def test_a_try_that_paid_and_then_failed_keeps_its_paid_spend():
    """A python agent reports a payment as it is made (context.paid), then fails without
    attaching the usage to its error. The failure's record replaced the metered usage with
    the error's (none): the paid call vanished from the attempt and never reached the task
    or the workflow, wasted spend included."""
    from orchestration.services.execution import Outcome

    edge_agent("payer", "paid_then_failed")
    workflow, task, outcome = _run_in_process("payer", {})
    assert outcome == Outcome.FAILED
    attempt = TaskAttempt.objects.get(execution=task)
    task.refresh_from_db()
    workflow.refresh_from_db()
    assert (attempt.status, attempt.input_tokens, attempt.output_tokens, attempt.tokens_used, attempt.cost_usd) == (
        "failed",
        100,
        20,
        120,
        Decimal("0.0123"),
    )
    assert (task.tokens_used, task.cost_usd) == (120, Decimal("0.0123"))
    assert (workflow.total_tokens_used, workflow.total_cost_usd, workflow.wasted_cost_usd) == (
        120,
        Decimal("0.0123"),
        Decimal("0.0123"),
    )


@pytest.mark.django_db
@pytest.mark.parametrize(
    "usage",
    [Usage(1, 1, Decimal("NaN")), Usage(1, 1, float("nan")), Usage(-5, 1, Decimal("0.01")), Usage(1, 1, "lots")],
    ids=["nan-decimal", "nan-float", "negative-tokens", "not-a-number"],
)
def test_a_malformed_payment_is_not_metered_and_never_reaches_the_totals(usage):
    """Usage reported with context.paid is checked as the final usage is. A NaN cost passed the
    column's check (NaN >= 0 in PostgreSQL): the attempt's cost became NaN, and once the
    attempt was cancelled, its task's and workflow's totals too."""
    task, attempt = _claimed_task()
    meter = _meter(attempt.pk)
    meter(Usage(10, 5, Decimal("0.001")))
    meter(usage)
    task_cancel(execution_id=task.pk)
    meter(usage)  # after the close: the late-usage path
    attempt.refresh_from_db()
    task.refresh_from_db()
    workflow = Workflow.objects.get(pk=task.workflow_id)
    assert (attempt.tokens_used, attempt.cost_usd) == (15, Decimal("0.001"))
    assert (task.tokens_used, task.cost_usd) == (15, Decimal("0.001"))
    assert (workflow.total_tokens_used, workflow.total_cost_usd) == (15, Decimal("0.001"))


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("cost", "recorded"),
    [(0.0123, (120, Decimal("0.0123"))), ("NaN", (0, Decimal(0)))],
    ids=["float-cost", "nan-cost"],
)
def test_a_handed_off_agents_failure_records_its_usage_as_the_attempts_own_failure_would(cost, recorded):
    """The other agent of a hand-off fails with a retryable error carrying its usage, its cost a
    float (as a python agent may report it) or NaN. The hand-off added that usage to the attempt's
    spend unchecked: the float's addition raised a TypeError in place of the other agent's error,
    recorded not retryable with its cost lost (120 tokens at $0), and the NaN made the record of
    the failure raise, leaving the attempt running for the reaper. Checked as the attempt's own
    failure's usage is, a float is counted and a malformed one is not."""
    from orchestration.services.execution import Outcome

    edge_agent("paid-failer", "fails_having_paid")
    edge_agent("delegator", "hands_off")
    workflow, task, outcome = _run_in_process("delegator", {"to": "paid-failer", "cost": cost})
    assert outcome == Outcome.FAILED
    attempt = TaskAttempt.objects.get(execution=task)
    task.refresh_from_db()
    workflow.refresh_from_db()
    assert (attempt.status, attempt.error, attempt.retryable) == (
        "failed",
        "RetryableError: the provider timed out after answering",
        True,
    )
    assert (attempt.tokens_used, attempt.cost_usd) == recorded
    assert (task.tokens_used, task.cost_usd) == recorded
    assert (workflow.total_tokens_used, workflow.total_cost_usd, workflow.wasted_cost_usd) == (*recorded, recorded[1])


@pytest.mark.django_db
def test_spend_charged_after_its_period_was_rolled_up_is_rolled_up_again():
    """A cancelled attempt's answer arrives after the hourly rollup of the hour it was
    cancelled in: the attempt, its task and workflow gain it, but the hour's metrics kept the
    spend of the first rollup (only periods without metrics were rolled up again), so summing
    the periods no longer gave what was spent."""
    from orchestration.services.rollup import rollup_previous

    task, attempt = _claimed_task()
    meter = _meter(attempt.pk)
    meter(Usage(100, 50, Decimal("0.010")))
    task_cancel(execution_id=task.pk)
    attempt.refresh_from_db()
    hour = attempt.finished_at.replace(minute=0, second=0, microsecond=0)
    rollup_previous(period="hour", now=hour + dt.timedelta(hours=1, minutes=5))
    meter(Usage(200, 80, Decimal("0.020")))  # the answer that was on its way, after the rollup
    rollup_previous(period="hour", now=hour + dt.timedelta(hours=2, minutes=5))
    hourly = AgentMetric.objects.filter(agent=task.agent, period="hour")
    assert sum(m.metric_value for m in hourly.filter(metric_type="tokens")) == 430
    assert sum(m.metric_value for m in hourly.filter(metric_type="cost")) == pytest.approx(0.03)
    rollup_previous(period="hour", now=hour + dt.timedelta(hours=2, minutes=6))  # nothing grew since
    assert sum(m.metric_value for m in hourly.filter(metric_type="cost")) == pytest.approx(0.03)


@pytest.mark.django_db
def test_a_failure_whose_exception_class_name_outgrows_its_column_is_still_recorded_failed():
    """The failed try's record stores the exception's class name; one longer than the column
    made the record itself fail (DataError, out of attempt_run): the attempt stayed running,
    for the reaper to misreport as a hard time-out and run the agent again."""
    from orchestration.services.execution import Outcome

    edge_agent("longerr", "long_error_class")
    _, task, outcome = _run_in_process("longerr", {})
    assert outcome == Outcome.FAILED
    attempt = TaskAttempt.objects.get(execution=task)
    task.refresh_from_db()
    assert (attempt.status, task.status) == ("failed", "failed")
    assert attempt.error_class.startswith("tests.orchestration.edge_agents.RefusedXXX")
    assert len(attempt.error_class) == TaskAttempt._meta.get_field("error_class").max_length
    assert attempt.retryable is False


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("task_input", "error_class"),
    [
        ({"in": "qualname", "bad": "nul"}, "tests.orchestration.edge_agents.Bad\ufffdName"),
        ({"in": "qualname", "bad": "surrogate"}, "tests.orchestration.edge_agents.Bad\ufffd\ufffd\ufffdName"),
        ({"in": "module", "bad": "surrogate"}, "generated\ufffd\ufffd\ufffd.Refused"),
    ],
)
def test_a_failure_whose_exception_class_name_is_not_storable_text_is_still_recorded_failed(task_input, error_class):
    """A class's __qualname__ and __module__ may hold a NUL or an unpaired surrogate: recorded as
    its error class, the NUL made the record itself fail (DataError), the surrogate raised
    UnicodeEncodeError out of attempt_run, and the attempt stayed running, for the reaper to
    misreport as a hard time-out and run the agent again."""
    from orchestration.services.execution import Outcome

    edge_agent("oddclass", "unstorable_error_class")
    _, task, outcome = _run_in_process("oddclass", task_input)
    assert outcome == Outcome.FAILED
    attempt = TaskAttempt.objects.get(execution=task)
    task.refresh_from_db()
    assert (attempt.status, task.status) == ("failed", "failed")
    assert (attempt.error_class, attempt.error) == (error_class, "Refused: the provider refused the request")
    assert attempt.retryable is False
