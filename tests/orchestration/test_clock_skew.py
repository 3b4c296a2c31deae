"""Hosts whose clocks disagree: the web host that submits, the worker that claims an attempt,
the one that runs the reaper. Each host's clock is that process's `timezone.now`; the
database's clock is the one they share. Real workers, real PostgreSQL."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator

import pytest
from django.utils import timezone

from orchestration.models import Event, TaskAttempt, TaskExecution, Workflow
from orchestration.runtime.context import AgentResult
from orchestration.services.execution import attempt_claim, attempt_succeed
from orchestration.services.reaper import attempts_reap
from orchestration.services.workflows import workflow_cancel, workflow_submit
from tests.engine import wait_for

pytestmark = pytest.mark.django_db(transaction=True)

A = TaskAttempt.Status


@pytest.fixture
def host_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[float], None]]:
    """Set this process's clock `seconds` off the real (and the database's) time."""
    real_now = timezone.now

    def set_off(seconds: float) -> None:
        monkeypatch.setattr(timezone, "now", lambda: real_now() + dt.timedelta(seconds=seconds))

    yield set_off
    monkeypatch.setattr(timezone, "now", real_now)


def finished(workflow: Workflow) -> Workflow:
    return wait_for(
        lambda: (w := Workflow.objects.get(pk=workflow.pk)).is_terminal and w,
        timeout=40,
        what=f"workflow {workflow.pk} to finish",
    )


def test_a_reaper_whose_clock_runs_ahead_of_the_workers_does_not_close_a_live_attempt(engine, host_clock):
    """The reaper's host 15 s ahead of the worker that claimed the attempt (the tests' grace is
    1 s; in production anything past REAPER_GRACE_SECONDS, 30 s): the attempt, well inside its
    10 s limit, looked past its hard limit plus grace. It was closed as a hard time-out while it
    ran and retried, so the agent ran twice and the first run's result was dropped as late."""
    engine(concurrency=1)
    workflow, _ = workflow_submit(
        spec={
            "name": "skew",
            "tasks": [
                {"name": "a", "agent": "sleep", "input": {"seconds": 3}, "timeout_seconds": 10, "max_retries": 1}
            ],
        }
    )
    running = wait_for(
        lambda: TaskAttempt.objects.filter(execution__workflow=workflow, status=A.RUNNING).first(),
        what="the attempt to be running",
    )
    host_clock(15)
    result = attempts_reap()
    assert (result.timed_out, result.lost) == ([], [])
    workflow = finished(workflow)
    tries = TaskAttempt.objects.filter(execution__workflow=workflow).order_by("attempt_number")
    assert [(a.pk, a.status) for a in tries] == [(running.pk, A.SUCCEEDED)]
    assert workflow.status == Workflow.Status.COMPLETED


def test_an_attempt_whose_worker_clock_ran_ahead_is_reaped_once_past_its_limit(committed):
    """Its worker, a minute ahead, claimed it (started_at a minute in the future) and was then
    lost: the attempt, past its 2 s hard limit plus the grace, waited a minute more for the
    reaper, its task and workflow with it."""
    workflow, _ = workflow_submit(
        spec={"name": "skew", "tasks": [{"name": "a", "agent": "echo", "timeout_seconds": 1, "max_retries": 0}]}
    )
    task = TaskExecution.objects.get(workflow=workflow)
    ahead = timezone.now() + dt.timedelta(minutes=1)
    claim = attempt_claim(execution_id=task.pk, celery_task_id=task.celery_task_id, worker="gone@nowhere", now=ahead)
    lost = wait_for(lambda: attempts_reap().lost, timeout=20, interval=0.5, what="the reaper to close the attempt")
    assert lost == [claim.attempt.pk]
    assert finished(workflow).status == Workflow.Status.FAILED


def test_a_workflow_submitted_on_a_host_whose_clock_runs_ahead_does_not_end_before_it_started(engine, host_clock):
    """The web host 30 s ahead of the worker: the workflow's start is the web's time, its end the
    worker's. It was recorded ending 30 s before it started, duration_ms about -30000, in the
    API, the exports and its workflow_completed event."""
    engine(concurrency=1)
    host_clock(30)
    workflow, _ = workflow_submit(spec={"name": "skew", "tasks": [{"name": "a", "agent": "echo", "input": {}}]})
    host_clock(0)
    workflow = finished(workflow)
    assert workflow.status == Workflow.Status.COMPLETED
    assert workflow.completed_at >= workflow.started_at
    assert workflow.duration_ms >= 0
    completed = Event.objects.get(entity_id=workflow.pk, event_type="workflow_completed")
    assert completed.payload["duration_ms"] >= 0


def test_a_cancel_whose_clock_is_behind_the_worker_ends_nothing_before_it_started(committed):
    """The web host that cancels 5 s behind the worker that claimed the attempt (or, the same on
    one clock, a cancel whose time was read before it waited for the row a claim held): the
    attempt was recorded finishing 5 s before it started, its task likewise, and the workflow
    ending before its own task had."""
    workflow, _ = workflow_submit(
        spec={"name": "skew", "tasks": [{"name": "a", "agent": "sleep", "input": {"seconds": 30}}]}
    )
    task = TaskExecution.objects.get(workflow=workflow)
    ahead = timezone.now() + dt.timedelta(seconds=5)
    claim = attempt_claim(execution_id=task.pk, celery_task_id=task.celery_task_id, worker="w@ahead", now=ahead)
    workflow_cancel(workflow_id=workflow.pk, reason="stop")
    attempt = TaskAttempt.objects.get(pk=claim.attempt.pk)
    task.refresh_from_db()
    workflow.refresh_from_db()
    assert attempt.status == A.CANCELLED
    assert attempt.finished_at >= attempt.started_at == ahead
    assert attempt.duration_ms >= 0
    assert task.completed_at >= attempt.finished_at
    assert workflow.completed_at >= task.completed_at


def test_a_workflow_ends_no_earlier_than_a_task_a_worker_ahead_completed(committed):
    """Two tasks completed by two workers, the first 20 s ahead of the second: the workflow,
    ended by the second, was recorded ending 20 s before one of its tasks had."""
    workflow, _ = workflow_submit(
        spec={"name": "skew", "tasks": [{"name": n, "agent": "echo", "input": {}} for n in ("a", "b")]}
    )
    tasks = {t.task_name: t for t in TaskExecution.objects.filter(workflow=workflow)}
    ahead = timezone.now() + dt.timedelta(seconds=20)
    claims = {
        name: attempt_claim(execution_id=t.pk, celery_task_id=t.celery_task_id, worker=f"w@{name}", now=now)
        for (name, t), now in zip(sorted(tasks.items()), (ahead, timezone.now()), strict=True)
    }
    attempt_succeed(attempt=claims["a"].attempt, result=AgentResult(output={}), duration_ms=1.0, now=ahead)
    attempt_succeed(attempt=claims["b"].attempt, result=AgentResult(output={}), duration_ms=1.0, now=timezone.now())
    workflow.refresh_from_db()
    assert workflow.status == Workflow.Status.COMPLETED
    latest = max(TaskExecution.objects.filter(workflow=workflow).values_list("completed_at", flat=True))
    assert workflow.completed_at >= latest == ahead
