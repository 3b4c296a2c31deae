"""The engine-facing hooks, in process: what they count for each kind of outcome."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import pytest
from django.utils import timezone
from prometheus_client import REGISTRY

from observability.attempts import attempt_finished, attempts_reaped, queue_wait_seconds
from orchestration.models import TaskAttempt, TaskExecution
from tests.factories import AgentFactory, TaskAttemptFactory, TaskExecutionFactory


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def spent(agent_id: str) -> tuple[float, ...]:
    """The tokens (input, output) and cost counted for an agent."""
    return (
        sample("agentledger_tokens_total", agent=agent_id, direction="input"),
        sample("agentledger_tokens_total", agent=agent_id, direction="output"),
        sample("agentledger_cost_usd_total", agent=agent_id),
    )


@pytest.mark.django_db
def test_reaped_attempts_are_counted_with_their_cause_and_the_tasks_final_status():
    agent = AgentFactory(id="reaped-agent")
    failed = TaskExecutionFactory(agent=agent, status=TaskExecution.Status.FAILED)
    retrying = TaskExecutionFactory(agent=agent, status=TaskExecution.Status.RETRYING)
    now = timezone.now()
    lost = TaskAttemptFactory(
        execution=failed, status="lost", cause="worker_lost", finished_at=now, duration_ms=31000.0
    )
    timed_out = TaskAttemptFactory(
        execution=retrying, status="timed_out", cause="hard_timeout", finished_at=now, duration_ms=12000.0
    )
    before = {
        "lost": sample("agentledger_task_attempts_total", agent=agent.id, status="lost", cause="worker_lost"),
        "timed_out": sample(
            "agentledger_task_attempts_total", agent=agent.id, status="timed_out", cause="hard_timeout"
        ),
        "failed": sample("agentledger_tasks_finished_total", agent=agent.id, status="failed"),
    }
    attempts_reaped(attempts=[lost, timed_out])
    assert (
        sample("agentledger_task_attempts_total", agent=agent.id, status="lost", cause="worker_lost")
        == before["lost"] + 1
    )
    assert (
        sample("agentledger_task_attempts_total", agent=agent.id, status="timed_out", cause="hard_timeout")
        == before["timed_out"] + 1
    )
    # Only the task that ended is a finished task; the other one is being retried.
    assert sample("agentledger_tasks_finished_total", agent=agent.id, status="failed") == before["failed"] + 1
    assert sample("agentledger_tasks_finished_total", agent=agent.id, status="retrying") == 0


@pytest.mark.django_db
def test_an_attempt_cancelled_while_it_ran_is_counted_once_by_the_cancellation(django_capture_on_commit_callbacks):
    """Cancelling SIGTERMs the process running the attempt, which then never reports it: the
    cancellation does, with what the attempt had metered; a worker that still returns first
    counts nothing more."""
    from orchestration.services.workflows import task_cancel

    agent = AgentFactory(id="cancelled-agent")
    task = TaskExecutionFactory(agent=agent, workflow=None, status="running", celery_task_id="m-cancel")
    attempt = TaskAttemptFactory(
        execution=task,
        status=TaskAttempt.Status.RUNNING,
        started_at=timezone.now() - dt.timedelta(seconds=3),
        input_tokens=700,
        output_tokens=50,
        cost_usd="0.0125",
    )

    def counted() -> tuple[float, ...]:
        return (
            sample("agentledger_task_attempts_total", agent=agent.id, status="cancelled", cause="cancelled"),
            sample("agentledger_task_duration_seconds_count", agent=agent.id, status="cancelled"),
            sample("agentledger_tokens_total", agent=agent.id, direction="input"),
            sample("agentledger_cost_usd_total", agent=agent.id),
            sample("agentledger_tasks_finished_total", agent=agent.id, status="cancelled"),
        )

    before = counted()
    with django_capture_on_commit_callbacks(execute=True):
        task_cancel(execution_id=task.pk)
    after = counted()
    assert [b - a for a, b in zip(before, after, strict=True)] == [1, 1, 700, pytest.approx(0.0125), 1]
    assert sample("agentledger_task_duration_seconds_sum", agent=agent.id, status="cancelled") >= 3
    attempt.refresh_from_db()
    attempt_finished(
        attempt=attempt,
        agent_id=agent.id,
        workflow_id=None,
        duration_ms=5.0,
        finished_at=attempt.finished_at,
        recorded=False,
    )
    assert counted() == after


def test_a_hook_that_fails_is_counted_and_never_raises():
    before = sample("agentledger_observability_errors_total", component="attempt_finished")
    attempt_finished(  # no execution_id: breaks
        attempt=object(), agent_id="x", workflow_id=None, duration_ms=1.0, finished_at=timezone.now()
    )
    assert sample("agentledger_observability_errors_total", component="attempt_finished") == before + 1


def test_queue_wait_starts_at_publication_or_at_the_retry_countdowns_end():
    published = 1_000.0
    assert queue_wait_seconds(published_at=published, eta=None, now=1_002.5) == 2.5
    eta = dt.datetime.fromtimestamp(1_010.0, tz=dt.UTC).isoformat()
    assert queue_wait_seconds(published_at=published, eta=eta, now=1_010.25) == 0.25
    assert queue_wait_seconds(published_at=None, eta=None, now=1_010.0) is None


@pytest.mark.django_db
def test_cancelled_tasks_are_counted_as_finished_once_the_cancellation_commits(
    builtin_agents, django_capture_on_commit_callbacks
):
    from orchestration.services.workflows import workflow_cancel, workflow_submit

    before = sample("agentledger_tasks_finished_total", agent="echo", status="cancelled")
    workflow, _ = workflow_submit(
        spec={
            "name": "to cancel",
            "tasks": [
                {"name": "a", "agent": "echo"},
                {"name": "b", "agent": "echo", "depends_on": ["a"]},
                {"name": "c", "agent": "echo", "depends_on": ["b"]},
            ],
        }
    )
    with django_capture_on_commit_callbacks(execute=True):
        workflow_cancel(workflow_id=workflow.pk, reason="changed my mind")
        assert sample("agentledger_tasks_finished_total", agent="echo", status="cancelled") == before
    assert sample("agentledger_tasks_finished_total", agent="echo", status="cancelled") == before + 3


@pytest.mark.django_db
def test_attempts_closed_at_a_claim_are_counted(django_capture_on_commit_callbacks, settings):
    from orchestration.services.execution import attempt_claim

    agent = AgentFactory(id="claimed-agent")
    now = timezone.now()
    late = TaskExecutionFactory(
        agent=agent, workflow=None, status="queued", celery_task_id="m-late", queued_at=now - dt.timedelta(hours=2)
    )
    settings.TASK_QUEUE_TIMEOUT_SECONDS = 60
    running = TaskExecutionFactory(agent=agent, workflow=None, status="running", celery_task_id="m-run")
    TaskAttemptFactory(execution=running, attempt_number=1, status="running", started_at=now, worker="w1")
    before_timeout = sample(
        "agentledger_task_attempts_total", agent=agent.id, status="timed_out", cause="queue_timeout"
    )
    before_lost = sample("agentledger_task_attempts_total", agent=agent.id, status="lost", cause="worker_lost")
    with django_capture_on_commit_callbacks(execute=True):
        attempt_claim(execution_id=late.pk, celery_task_id="m-late", worker="w2")
        attempt_claim(execution_id=running.pk, celery_task_id="m-run", worker="w2", redelivered=True)
    assert (
        sample("agentledger_task_attempts_total", agent=agent.id, status="timed_out", cause="queue_timeout")
        == before_timeout + 1
    )
    assert (
        sample("agentledger_task_attempts_total", agent=agent.id, status="lost", cause="worker_lost") == before_lost + 1
    )


@pytest.mark.django_db
def test_spend_paid_after_a_cancellation_is_counted_as_it_is_recorded(django_capture_on_commit_callbacks):
    """The cancellation counts what the attempt had metered; a model's answer that still
    arrives and is charged is added to the row and must reach the counters too, or they fall
    behind the database's totals by exactly the spend the operator is looking for."""
    from orchestration.runtime.context import Usage
    from orchestration.services.execution import _meter
    from orchestration.services.workflows import task_cancel

    agent = AgentFactory(id="late-spend-agent")
    task = TaskExecutionFactory(agent=agent, workflow=None, status="running", celery_task_id="m-late")
    attempt = TaskAttemptFactory(
        execution=task,
        status=TaskAttempt.Status.RUNNING,
        started_at=timezone.now() - dt.timedelta(seconds=3),
        input_tokens=700,
        output_tokens=50,
        cost_usd="0.0125",
    )

    before = spent(agent.id)
    with django_capture_on_commit_callbacks(execute=True):
        task_cancel(execution_id=task.pk)
    _meter(attempt.pk)(Usage(200, 80, Decimal("0.020")))
    after = spent(agent.id)

    attempt.refresh_from_db()
    assert (attempt.input_tokens, attempt.output_tokens, attempt.cost_usd) == (900, 130, Decimal("0.0325"))
    assert [b - a for a, b in zip(before, after, strict=True)] == [900, 130, pytest.approx(0.0325)]


@pytest.mark.django_db
def test_a_reaped_attempt_whose_retry_has_completed_the_task_is_not_counted_as_finishing_it():
    """reap_stale_tasks reports the attempts it closed after its whole pass. By then the retry
    one of them was given may have run and completed the task: that completion is counted by
    the retry's own attempt, and must not be counted a second time for the lost one."""
    from orchestration.runtime.context import AgentResult, Usage
    from orchestration.services.execution import attempt_claim, attempt_succeed
    from orchestration.services.reaper import attempts_reap

    agent = AgentFactory(id="reaped-then-retried")
    task, first = _claimed_five_minutes_ago(agent, max_retries=1)
    result = attempts_reap()  # its worker does not answer: lost, and retried
    assert result.lost == [first.attempt.pk]
    task.refresh_from_db()
    second = attempt_claim(execution_id=task.pk, celery_task_id=task.celery_task_id, worker="w@host")
    done = AgentResult(output={}, usage=Usage())
    attempt_succeed(attempt=second.attempt, result=done, duration_ms=10, now=timezone.now())
    assert TaskExecution.objects.get(pk=task.pk).status == TaskExecution.Status.COMPLETED

    before = sample("agentledger_tasks_finished_total", agent=agent.id, status="completed")
    attempts_reaped(attempts=result.closed)  # as reap_stale_tasks does, after its pass
    assert sample("agentledger_task_attempts_total", agent=agent.id, status="lost", cause="worker_lost") == 1
    assert sample("agentledger_tasks_finished_total", agent=agent.id, status="completed") == before


@pytest.mark.django_db
def test_spend_charged_during_the_reapers_pass_is_counted_once():
    """reap_stale_tasks reports the attempts it closed after its whole pass. A worker taken for
    lost that still lives may be charged for the answer it waited for meanwhile: that charge is
    counted as it is added to the closed attempt's row, and must not be counted again by the
    report, which finds it on the row."""
    from orchestration.runtime.context import Usage
    from orchestration.services.execution import _meter
    from orchestration.services.reaper import attempts_reap

    agent = AgentFactory(id="charged-while-reaped")
    _, claim = _claimed_five_minutes_ago(agent, max_retries=0)
    meter = _meter(claim.attempt.pk)
    meter(Usage(10, 0, Decimal("0.001")))

    before = spent(agent.id)
    result = attempts_reap()  # its worker does not answer: lost
    assert result.lost == [claim.attempt.pk]
    meter(Usage(100, 20, Decimal("0.0123")))  # the answer it waited for, charged before the pass reports
    attempts_reaped(attempts=result.closed)  # as reap_stale_tasks does, after its pass
    after = spent(agent.id)

    lost = TaskAttempt.objects.get(pk=claim.attempt.pk)
    assert (lost.status, lost.input_tokens, lost.output_tokens, lost.cost_usd) == ("lost", 110, 20, Decimal("0.0133"))
    assert [b - a for a, b in zip(before, after, strict=True)] == [110, 20, pytest.approx(0.0133)]


def _claimed_five_minutes_ago(agent: Any, *, max_retries: int) -> tuple[TaskExecution, Any]:
    """A task of a running workflow whose attempt a worker claimed five minutes ago (on the
    database's clock too) with a 5 s timeout, and that worker not answering: the reaper's."""
    import uuid

    from orchestration.models import Workflow
    from orchestration.services.execution import attempt_claim
    from tests.factories import WorkflowFactory

    start = timezone.now() - dt.timedelta(minutes=5)
    task = TaskExecution.objects.create(
        workflow=WorkflowFactory(status=Workflow.Status.RUNNING, started_at=start, total_steps=1),
        agent=agent,
        task_name="t",
        status=TaskExecution.Status.QUEUED,
        celery_task_id=str(uuid.uuid4()),
        queued_at=start,
        max_retries=max_retries,
        timeout_seconds=5,
    )
    claim = attempt_claim(execution_id=task.pk, celery_task_id=task.celery_task_id, worker="gone@host", now=start)
    TaskAttempt.objects.filter(pk=claim.attempt.pk).update(created_at=start)  # claimed then, on the database's clock
    return task, claim
