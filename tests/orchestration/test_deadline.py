"""A workflow's deadline is enforced by whichever sees it passed first: a claim, a completion,
the workflow finishing, or the reaper's pass. A completion that lands after the deadline
records what its task did, and the workflow fails for its deadline then and there, whether
the reaper's pass came first or not (before, such a workflow completed, or waited for the
reaper, depending on which came first)."""

from __future__ import annotations

import datetime as dt

import pytest
from django.utils import timezone

from orchestration.errors import PermanentError, RetryableError
from orchestration.models import TaskAttempt, TaskExecution, Workflow
from orchestration.runtime.context import AgentResult
from orchestration.services.execution import Claim, attempt_claim, attempt_fail, attempt_succeed
from tests.engine import wait_for
from tests.orchestration.test_engine import attempts, event_types, running_attempt, submit, task

A = TaskAttempt.Status
T = TaskExecution.Status

pytestmark = pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "general-path"])


def claimed(workflow: Workflow, name: str) -> Claim:
    t = task(workflow, name)
    claim = attempt_claim(execution_id=t.execution_id, celery_task_id=t.celery_task_id, worker="w@h")
    assert isinstance(claim, Claim)
    return claim


def succeed(claim: Claim) -> bool:
    """Record the claim's attempt succeeded as a worker does (standalone when the claim says so)."""
    return attempt_succeed(
        attempt=claim.attempt,
        result=AgentResult(output={"done": claim.attempt.execution_id}),
        duration_ms=5.0,
        now=timezone.now(),
        standalone=claim.standalone,
    )


def deadline_passes(workflow: Workflow) -> None:
    Workflow.objects.filter(pk=workflow.pk).update(deadline=timezone.now() - dt.timedelta(seconds=1))


def in_an_hour() -> str:
    return (timezone.now() + dt.timedelta(hours=1)).isoformat()


def test_a_last_completion_after_the_deadline_fails_the_workflow(committed, settings, fast_path):
    settings.ENGINE_FAST_PATH = fast_path
    wf = submit({"name": "a", "agent": "echo"}, deadline=in_an_hour())
    claim = claimed(wf, "a")
    deadline_passes(wf)
    assert succeed(claim)
    wf.refresh_from_db()
    assert wf.status == Workflow.Status.FAILED and "deadline" in wf.error and "passed" in wf.error
    # what the task did is recorded as it happened
    a = task(wf, "a")
    assert (a.status, a.output_data) == (T.COMPLETED, {"done": a.execution_id})
    assert [x.status for x in attempts(wf, "a")] == [A.SUCCEEDED]
    assert wf.completed_steps == 1 and wf.step_results == {"a": {"done": a.execution_id}}
    assert event_types(wf.workflow_id)[-1] == "workflow_failed"
    assert "workflow_completed" not in event_types(wf.workflow_id)


def test_a_completion_after_the_deadline_cuts_the_tasks_still_running(committed, settings, fast_path):
    """The other task's attempt is cut for the deadline at once, as the reaper's pass would
    have cut it; the completion does not wait for that pass (nor take the one-statement path
    that would leave the workflow running past its deadline)."""
    settings.ENGINE_FAST_PATH = fast_path
    wf = submit({"name": "a", "agent": "echo"}, {"name": "b", "agent": "echo"}, deadline=in_an_hour())
    first, second = claimed(wf, "a"), claimed(wf, "b")
    deadline_passes(wf)
    assert succeed(first)
    wf.refresh_from_db()
    assert wf.status == Workflow.Status.FAILED and "deadline" in wf.error
    assert (task(wf, "a").status, task(wf, "b").status) == (T.COMPLETED, T.CANCELLED)
    [cut] = attempts(wf, "b")
    assert (cut.status, cut.cause) == (A.CANCELLED, "deadline")
    assert (wf.completed_steps, wf.cancelled_steps) == (1, 1)
    # the cut attempt's late completion records nothing more
    assert succeed(second) is False
    assert task(wf, "b").status == T.CANCELLED


def test_a_completion_after_the_deadline_queues_no_dependent(committed, settings, fast_path):
    settings.ENGINE_FAST_PATH = fast_path
    wf = submit(
        {"name": "a", "agent": "echo"}, {"name": "b", "agent": "echo", "depends_on": ["a"]}, deadline=in_an_hour()
    )
    claim = claimed(wf, "a")
    deadline_passes(wf)
    assert succeed(claim)
    wf.refresh_from_db()
    assert wf.status == Workflow.Status.FAILED and "deadline" in wf.error
    b = task(wf, "b")
    assert (b.status, b.queued_at) == (T.CANCELLED, None)
    assert attempts(wf, "b") == []


def test_a_completion_before_the_deadline_is_unchanged(committed, settings, fast_path):
    settings.ENGINE_FAST_PATH = fast_path
    wf = submit({"name": "a", "agent": "echo"}, {"name": "b", "agent": "echo"}, deadline=in_an_hour())
    first, second = claimed(wf, "a"), claimed(wf, "b")
    assert succeed(first) and succeed(second)
    wf.refresh_from_db()
    assert (wf.status, wf.completed_steps) == (Workflow.Status.COMPLETED, 2)


def test_a_worker_completing_a_task_after_the_deadline_fails_the_workflow_without_the_reaper(engine, fast_path):
    engine(concurrency=2, env={"ENGINE_FAST_PATH": str(fast_path).lower()})
    wf = submit(
        {"name": "slow", "agent": "sleep", "input": {"seconds": 1}},
        {"name": "long", "agent": "sleep", "input": {"seconds": 30}},
        deadline=in_an_hour(),
    )
    running_attempt(wf, "slow")
    long = running_attempt(wf, "long")
    deadline_passes(wf)
    wf = wait_for(
        lambda: (w := Workflow.objects.get(pk=wf.pk)).is_terminal and w, timeout=20, what="the workflow to end"
    )
    assert wf.status == Workflow.Status.FAILED and "deadline" in wf.error
    assert task(wf, "slow").status == T.COMPLETED
    assert [x.status for x in attempts(wf, "slow")] == [A.SUCCEEDED]
    long.refresh_from_db()
    assert (task(wf, "long").status, long.status, long.cause) == (T.CANCELLED, A.CANCELLED, "deadline")


def fail(claim: Claim, exc: Exception) -> bool:
    """Record the claim's attempt failed as a worker does."""
    return attempt_fail(attempt=claim.attempt, exc=exc, duration_ms=5.0, now=timezone.now())


def test_a_retryable_failure_after_the_deadline_queues_no_retry_and_cuts_the_tasks_still_running(
    committed, settings, fast_path
):
    """A failed try past the deadline is not tried again (its retry could only be cancelled for
    the deadline when it arrives): the workflow fails for its deadline then and there, as after
    a completion, and what still runs is cut."""
    settings.ENGINE_FAST_PATH = fast_path
    wf = submit({"name": "a", "agent": "echo", "max_retries": 3}, {"name": "b", "agent": "echo"}, deadline=in_an_hour())
    first, _ = claimed(wf, "a"), claimed(wf, "b")
    deadline_passes(wf)
    assert fail(first, RetryableError("provider busy"))
    wf.refresh_from_db()
    assert wf.status == Workflow.Status.FAILED and "deadline" in wf.error
    a = task(wf, "a")
    assert (a.status, a.retry_count) == (T.FAILED, 0)
    assert [x.status for x in attempts(wf, "a")] == [A.FAILED]
    [cut] = attempts(wf, "b")
    assert (task(wf, "b").status, cut.status, cut.cause) == (T.CANCELLED, A.CANCELLED, "deadline")
    assert "task_retrying" not in event_types(a.execution_id)


def test_a_last_failure_after_the_deadline_in_a_workflow_that_continues_cuts_what_still_runs(
    committed, settings, fast_path
):
    """continue_on_failure: a task failing for good past the deadline fails the workflow for it
    at once, as a completion does, instead of leaving it running (its siblings too) until the
    reaper's pass."""
    settings.ENGINE_FAST_PATH = fast_path
    wf = submit(
        {"name": "a", "agent": "echo"},
        {"name": "b", "agent": "echo"},
        deadline=in_an_hour(),
        continue_on_failure=True,
    )
    first, _ = claimed(wf, "a"), claimed(wf, "b")
    deadline_passes(wf)
    assert fail(first, PermanentError("bad input"))
    wf.refresh_from_db()
    assert wf.status == Workflow.Status.FAILED and "deadline" in wf.error
    assert (wf.failed_steps, wf.cancelled_steps) == (1, 1)
    assert (task(wf, "a").status, task(wf, "b").status) == (T.FAILED, T.CANCELLED)
    [cut] = attempts(wf, "b")
    assert (cut.status, cut.cause) == (A.CANCELLED, "deadline")
    assert event_types(wf.workflow_id)[-1] == "workflow_failed"
