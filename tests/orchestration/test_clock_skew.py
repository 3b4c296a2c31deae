"""Hosts whose clocks disagree: the web host that submits, the worker that claims an attempt,
the one that runs the reaper. Each host's clock is that process's `timezone.now`; the
database's clock is the one they share. Real workers, or a worker's services run in this
process (attempt_claim, attempt_run) on its moved clock; real PostgreSQL."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.utils import timezone

from orchestration.db import database_now
from orchestration.models import Agent, ApiKey, Event, TaskAttempt, TaskExecution, Workflow
from orchestration.runtime.context import AgentResult
from orchestration.services.access import api_key_create
from orchestration.services.execution import Claim, Outcome, attempt_claim, attempt_run, attempt_succeed
from orchestration.services.reaper import attempts_reap, queued_sweep
from orchestration.services.workflows import workflow_cancel, workflow_resume, workflow_submit
from tests.engine import flush_redis, wait_for
from tests.factories import UserFactory

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


def submit_one(task: dict[str, Any] | None = None, **spec: Any) -> tuple[Workflow, TaskExecution]:
    workflow, _ = workflow_submit(
        spec={"name": "skew", "tasks": [{"name": "a", "agent": "echo", "input": {}, **(task or {})}], **spec}
    )
    return workflow, TaskExecution.objects.get(workflow=workflow)


def claim_of(task: TaskExecution) -> Claim | Outcome:
    """A worker in this process claims the task, on whatever clock this process has."""
    task.refresh_from_db()
    return attempt_claim(execution_id=task.pk, celery_task_id=task.celery_task_id, worker="w@h")


def database_in(seconds: float) -> str:
    return (database_now() + dt.timedelta(seconds=seconds)).isoformat()


fast_or_general = pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "general-path"])


@fast_or_general
def test_a_task_submitted_on_a_host_whose_clock_runs_behind_is_not_timed_out_at_its_claim(
    committed, host_clock, settings, fast_path
):
    """The web host two minutes behind the worker, the queue timeout one minute: the task was
    queued at the web's time, and the worker's claim, a moment later, found it two minutes in
    the queue and failed it (queue_timeout) without running it. Every task that host submitted
    failed so."""
    settings.ENGINE_FAST_PATH = fast_path
    settings.TASK_QUEUE_TIMEOUT_SECONDS = 60
    host_clock(-120)
    workflow, task = submit_one()
    host_clock(0)
    claim = claim_of(task)
    assert isinstance(claim, Claim), TaskAttempt.objects.filter(execution=task).values_list("cause", "error").first()
    assert Workflow.objects.get(pk=workflow.pk).status == Workflow.Status.RUNNING


@fast_or_general
def test_a_worker_whose_clock_runs_ahead_claims_a_task_just_queued(committed, host_clock, settings, fast_path):
    """The worker two minutes ahead of the web host that queued the task a moment ago: its claim
    found the task past the one-minute queue timeout and failed it unrun. The attempt starts on
    the database's clock, which the reaper measures it by."""
    settings.ENGINE_FAST_PATH = fast_path
    settings.TASK_QUEUE_TIMEOUT_SECONDS = 60
    _, task = submit_one()
    host_clock(120)
    claim = claim_of(task)
    assert isinstance(claim, Claim), TaskAttempt.objects.filter(execution=task).values_list("cause", "error").first()
    host_clock(0)
    assert abs((claim.attempt.started_at - database_now()).total_seconds()) < 5


def test_the_reaper_leaves_alone_a_task_queued_by_a_host_whose_clock_runs_behind(committed, host_clock, settings):
    """The reaper measures on the database's clock; the task's queued_at was the submitting
    host's, two minutes behind it: a task queued a moment ago was timed out as two minutes in
    the queue (no worker had even had the time to take it)."""
    settings.TASK_QUEUE_TIMEOUT_SECONDS = 60
    host_clock(-120)
    _, task = submit_one()
    host_clock(0)
    assert attempts_reap().queue_timed_out == []
    task.refresh_from_db()
    assert task.status == TaskExecution.Status.QUEUED


@fast_or_general
def test_a_worker_whose_clock_runs_ahead_does_not_fail_a_workflow_before_its_deadline(
    committed, host_clock, settings, fast_path
):
    """The deadline is 30 s away on the database's clock (the reaper's); the worker, a minute
    ahead, took it as passed at its claim and failed the workflow at once."""
    settings.ENGINE_FAST_PATH = fast_path
    workflow, task = submit_one(deadline=database_in(30))
    host_clock(60)
    assert isinstance(claim_of(task), Claim)
    workflow.refresh_from_db()
    assert workflow.status == Workflow.Status.RUNNING and workflow.error is None


@fast_or_general
def test_a_worker_whose_clock_runs_behind_fails_a_workflow_that_ends_past_its_deadline(
    committed, host_clock, settings, fast_path
):
    """The task ends a second past the workflow's deadline; its worker's clock, a minute behind,
    said the deadline was still ahead, and the workflow completed, which the reaper, or a
    worker on time, would have failed for its deadline (and did, when it looked first)."""
    settings.ENGINE_FAST_PATH = fast_path
    workflow, task = submit_one({"agent": "sleep", "input": {"seconds": 2.5}}, deadline=database_in(1.5))
    host_clock(-60)
    assert attempt_run(execution_id=task.pk, celery_task_id=task.celery_task_id, worker="w@h") == Outcome.SUCCEEDED
    host_clock(0)
    workflow.refresh_from_db()
    assert workflow.status == Workflow.Status.FAILED and "deadline" in workflow.error
    task.refresh_from_db()
    assert task.status == TaskExecution.Status.COMPLETED and task.completed_at >= workflow.deadline


def test_a_cancel_from_a_host_whose_clock_runs_behind_does_not_end_an_attempt_before_it_started(committed, host_clock):
    """The web host a minute behind the worker: the cancelled attempt was recorded finished a
    minute before it started (duration 0), its task completed before it started."""
    workflow, task = submit_one({"agent": "sleep", "input": {"seconds": 30}})
    claim = claim_of(task)
    assert isinstance(claim, Claim)
    host_clock(-60)
    workflow_cancel(workflow_id=workflow.pk)
    attempt = TaskAttempt.objects.get(pk=claim.attempt.pk)
    task.refresh_from_db()
    assert attempt.status == TaskAttempt.Status.CANCELLED
    assert attempt.finished_at >= attempt.started_at
    assert task.completed_at >= task.started_at


def test_a_web_host_whose_clock_runs_ahead_resumes_a_workflow_before_its_deadline(committed, host_clock):
    """The deadline 30 s away on the database's clock, which every claim checks: the web host,
    a minute ahead, refused the resume as past the deadline."""
    workflow, _ = submit_one(deadline=database_in(30))
    workflow_cancel(workflow_id=workflow.pk)
    host_clock(60)
    assert workflow_resume(workflow_id=workflow.pk).status == Workflow.Status.RUNNING


def test_a_web_host_whose_clock_runs_ahead_accepts_a_deadline_not_yet_passed(committed, host_clock):
    """A deadline 30 s away on the database's clock; the web host, a minute ahead, refused the
    submission: "deadline ... is in the past"."""
    host_clock(60)
    workflow, _ = submit_one(deadline=database_in(30))
    assert workflow.deadline is not None


def test_the_dispatch_sweep_on_a_host_whose_clock_runs_behind_resends_a_lost_message(committed, host_clock, settings):
    """A task's message lost between commit and send (here: the broker emptied); the sweep
    re-sends it once it has been queued DISPATCH_SWEEP_AFTER_SECONDS. On a beat host two minutes
    behind the web host that queued it, the task looked queued in the future: it was re-sent
    two minutes late (with the production's 60 s, three minutes instead of one)."""
    settings.DISPATCH_SWEEP_AFTER_SECONDS = 1
    _, task = submit_one()
    flush_redis()
    time.sleep(1.5)
    host_clock(-120)
    assert queued_sweep() == [task.pk]


def test_rows_made_on_a_host_whose_clock_runs_behind_were_not_updated_before_they_were_created(committed, host_clock):
    """created_at is the INSERT's time on the database's clock; updated_at was this host's
    (auto_now): on a web host a minute behind, a new workflow, its tasks and an API key read as
    updated a minute before they were created. A new row's updated_at is its INSERT's time now,
    and a save() on such a host leaves the row's to the database's trigger."""
    host_clock(-60)
    workflow, task = submit_one()
    created = api_key_create(owner=UserFactory(), name="skew")
    rows = [Workflow.objects.get(pk=workflow.pk), task, ApiKey.objects.get(pk=created.api_key.pk)]
    assert [(type(row).__name__, row.updated_at - row.created_at) for row in rows] == [
        (type(row).__name__, dt.timedelta(0)) for row in rows
    ]
    # The objects the caller holds have the rows' own times, not this host's.
    assert (workflow.updated_at, created.api_key.updated_at) == (rows[0].updated_at, rows[2].updated_at)
    assert isinstance(claim_of(task), Claim)
    attempt = TaskAttempt.objects.get(execution=task)
    assert attempt.updated_at >= attempt.created_at
    workflow.description = "changed"
    workflow.save(update_fields=["description", "updated_at"])
    assert Workflow.objects.get(pk=workflow.pk).updated_at >= rows[0].created_at


def test_a_new_row_saved_under_a_key_it_was_given_was_not_updated_before_it_was_created(host_clock):
    """save() of a new agent (the console's add form saves one so) tries an UPDATE first, its
    id being given: updated_at took this host's time there, and the INSERT that followed kept
    it, a minute before the row's created_at on a host behind."""
    host_clock(-60)
    agent = Agent(id="skew-added", name="Skew", executor=Agent.Executor.PYTHON, entrypoint="builtins.print")
    agent.save()
    created_at, updated_at = Agent.objects.values_list("created_at", "updated_at").get(pk=agent.pk)
    assert updated_at - created_at == dt.timedelta(0)
    assert agent.updated_at == updated_at
