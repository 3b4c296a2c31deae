"""Restarting workers as a deploy does (platform/README.md, "Restarting workers"): a new worker
started, the old one stopped with a signal to its main process, real workers on the test
database.

- SIGTERM, a warm shutdown: the running try finishes on the stopping worker and is recorded
  once; what it had not started runs on the new worker. Nothing is lost, no retry is spent.
- SIGQUIT, a cold shutdown: the running try is stopped and its message given back to the
  broker at once, so the new worker records it lost (worker_lost) and starts the next try of
  the same message, redelivered, long before the reaper would (hard limit plus its grace):
  one recorded attempt per run, and the lost one spends a retry.
"""

from __future__ import annotations

import signal

import pytest

from orchestration.models import TaskAttempt, TaskExecution, Workflow
from orchestration.services.workflows import workflow_submit
from tests.engine import wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.subprocess]

A = TaskAttempt.Status


def _submit(*, seconds: float, max_retries: int, on_attempts: list[int] | None = None) -> Workflow:
    sleep_input: dict[str, object] = {"seconds": seconds}
    if on_attempts is not None:
        sleep_input["on_attempts"] = on_attempts
    workflow, _ = workflow_submit(
        spec={
            "name": "deploy",
            "tasks": [
                {
                    "name": "long",
                    "agent": "sleep",
                    "input": sleep_input,
                    "max_retries": max_retries,
                    "timeout_seconds": 60,
                },
                {"name": "after", "agent": "echo", "depends_on": ["long"], "max_retries": 0},
            ],
        }
    )
    return workflow


def _running(workflow: Workflow) -> TaskAttempt:
    return wait_for(
        lambda: TaskAttempt.objects.filter(
            execution__workflow=workflow, execution__task_name="long", status=A.RUNNING
        ).first(),
        what="the long task to run",
    )


def _attempts(workflow: Workflow, task_name: str) -> list[TaskAttempt]:
    return list(
        TaskAttempt.objects.filter(execution__workflow=workflow, execution__task_name=task_name).order_by(
            "attempt_number"
        )
    )


def _ended(workflow: Workflow) -> bool:
    workflow.refresh_from_db()
    return workflow.is_terminal


def test_a_warm_shutdown_lets_the_running_try_finish_and_the_next_worker_takes_the_rest(engine):
    old = engine(concurrency=1)
    workflow = _submit(seconds=12, max_retries=0)
    _running(workflow)
    new = engine(concurrency=1)

    assert TaskAttempt.objects.filter(execution__workflow=workflow, status=A.RUNNING).exists()  # still running
    old.process.send_signal(signal.SIGTERM)  # the main process only, as docker stop and systemd's KillMode=mixed do
    assert old.process.wait(timeout=30) == 0

    wait_for(lambda: _ended(workflow), timeout=30, what="the workflow to end")
    assert workflow.status == Workflow.Status.COMPLETED
    (long,) = _attempts(workflow, "long")
    assert (long.status, long.worker, long.retryable) == (A.SUCCEEDED, old.name, None)
    assert long.duration_ms >= 12000
    (after,) = _attempts(workflow, "after")
    assert (after.status, after.worker) == (A.SUCCEEDED, new.name)
    assert TaskExecution.objects.get(workflow=workflow, task_name="long").retry_count == 0


def test_a_cold_shutdown_gives_the_message_back_and_the_next_worker_runs_the_next_try_at_once(engine):
    old = engine(concurrency=1)
    # The first try would sleep 40 s; the next one, after the restart, ends at once.
    workflow = _submit(seconds=40, max_retries=1, on_attempts=[1])
    first = _running(workflow)

    old.process.send_signal(signal.SIGQUIT)
    old.process.wait(timeout=30)
    new = engine(concurrency=1)

    # Well before the reaper could close the first try (60 s limit + 10 s grace + 30 s).
    wait_for(lambda: _ended(workflow), timeout=30, what="the workflow to end")
    assert workflow.status == Workflow.Status.COMPLETED
    lost, second = _attempts(workflow, "long")
    assert (lost.status, lost.cause, lost.worker, lost.celery_task_id) == (
        A.LOST,
        TaskAttempt.Cause.WORKER_LOST,
        old.name,
        first.celery_task_id,
    )
    assert "message redelivered" in lost.error
    assert (second.status, second.worker, second.redelivered, second.delivery_count) == (A.SUCCEEDED, new.name, True, 2)
    assert second.celery_task_id == first.celery_task_id  # the same message, given back by the broker
    assert second.started_at >= lost.finished_at
    assert TaskExecution.objects.get(workflow=workflow, task_name="long").retry_count == 1
