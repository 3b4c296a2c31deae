"""The soft time limit landing while an attempt's outcome is recorded.

Celery's soft limit is a signal whose handler raises SoftTimeLimitExceeded; here SIGALRM,
sent to this thread once the completion waits on a workflow row another session holds, raises it.
psycopg 3 cancels an interrupted query only for KeyboardInterrupt / SystemExit: for this exception
the statement stays in flight on the connection, and in autocommit (fastpath.succeed_alone) it
still commits on the server once it gets the lock."""

from __future__ import annotations

import signal
import threading
import time

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from django.db import connection

from orchestration.models import TaskAttempt, TaskExecution, Workflow
from orchestration.services.execution import Claim, Outcome, attempt_claim, attempt_run
from tests.orchestration.test_engine import submit, task
from tests.orchestration.test_lock_races import waiting_on_lock
from tests.pg import other_connection


def _raise_soft_limit(signum, frame):
    raise SoftTimeLimitExceeded()


@pytest.mark.parametrize(
    ("standalone", "sibling"),
    [(True, False), (True, True), (False, False)],
    ids=["autocommit-fast-path", "autocommit-fast-path-sibling-completes", "transaction"],
)
def test_the_soft_limit_during_the_record_still_records_the_success_once(committed, standalone, sibling):
    """Before the fix, the fast path's second try raised OperationalError ("another command is
    already in progress"): run_task sent the message again, and when the busy row was a
    sibling's completion (the interrupted statement then wrote nothing) the retried delivery
    recorded the attempt lost (connection_lost) and ran the agent again."""
    tasks = [{"name": "a", "agent": "echo", "input": {"x": 1}}]
    if standalone:  # another unfinished task and none pending: succeed_alone is tried first
        tasks.append({"name": "b", "agent": "echo", "input": {"x": 2}})
    wf = submit(*tasks)
    a = task(wf, "a")
    claim = attempt_claim(execution_id=a.pk, celery_task_id=a.celery_task_id, worker="w@h")
    assert isinstance(claim, Claim) and claim.standalone is standalone
    # attempt_run claims again from the message: undo the claim, keep the row as queued
    TaskAttempt.objects.filter(pk=claim.attempt.pk).delete()
    TaskExecution.objects.filter(pk=a.pk).update(status=TaskExecution.Status.QUEUED, started_at=None)

    other = other_connection()
    other.execute("BEGIN")
    if sibling:  # b's completion holds the row: after it, a's completion must finish the workflow
        b = task(wf, "b")
        other.execute(
            "UPDATE task_executions SET status = 'completed', completed_at = now() WHERE execution_id = %s", [b.pk]
        )
        other.execute("UPDATE workflows SET completed_steps = completed_steps + 1 WHERE workflow_id = %s", [wf.pk])
    else:
        other.execute("SELECT 1 FROM workflows WHERE workflow_id = %s FOR UPDATE", [wf.pk])

    recording = threading.get_ident()

    def release():
        assert waiting_on_lock(), "the completion waits on the workflow row"
        signal.pthread_kill(recording, signal.SIGALRM)  # the soft limit, while it waits
        time.sleep(0.5)
        other.execute("COMMIT")

    previous = signal.signal(signal.SIGALRM, _raise_soft_limit)
    releaser = threading.Thread(target=release)
    releaser.start()
    try:
        outcome = attempt_run(execution_id=a.pk, celery_task_id=a.celery_task_id, worker="w@h")
    finally:
        signal.signal(signal.SIGALRM, previous)
        releaser.join()
        other.close()
        connection.close()
    assert outcome == Outcome.SUCCEEDED
    tries = list(TaskAttempt.objects.filter(execution_id=a.pk).values_list("attempt_number", "status"))
    assert tries == [(1, TaskAttempt.Status.SUCCEEDED)]
    a.refresh_from_db()
    assert a.status == TaskExecution.Status.COMPLETED
    workflow = Workflow.objects.get(pk=wf.pk)
    assert workflow.completed_steps == (2 if sibling else 1)
    if sibling:
        assert workflow.status == Workflow.Status.COMPLETED
