"""Operations racing the engine on real workers (an operator in the console, a client of the
API): each answers what it did, and the record stays exact."""

from __future__ import annotations

import datetime as dt
import time

import pytest

from orchestration.db import database_now
from orchestration.errors import TransitionError
from orchestration.models import Event, TaskAttempt, TaskExecution, Workflow
from orchestration.services.reaper import workflows_enforce_deadlines
from orchestration.services.workflows import task_retry, workflow_cancel
from tests.engine import wait_for
from tests.orchestration.test_engine import finished, running_attempt, submit, task
from tests.orchestration.test_fastpath_races import in_thread
from tests.orchestration.test_lock_races import waiting_on_lock
from tests.pg import other_connection

A, T, W = TaskAttempt.Status, TaskExecution.Status, Workflow.Status


@pytest.mark.django_db(transaction=True)
def test_a_failed_task_is_not_retried_once_its_running_workflows_deadline_has_passed(engine):
    """A workflow that continues on failure runs on past its deadline until something sees it
    (a claim, a completion, the reaper's pass). A retry of its failed task meanwhile was
    accepted (202, "retried"): it wiped the task's failure from the workflow (failed_steps,
    error), and the retry's first claim failed the workflow for its deadline and recorded the
    task cancelled, never run. It is refused, as for a workflow that has ended."""
    engine()
    deadline = database_now() + dt.timedelta(seconds=4)
    workflow = submit(
        {"name": "bad", "agent": "fail", "input": {"message": "no"}, "max_retries": 0},
        {"name": "long", "agent": "sleep", "input": {"seconds": 60}},
        continue_on_failure=True,
        deadline=deadline.isoformat(),
    )
    running_attempt(workflow, "long")
    bad = wait_for(lambda: (t := task(workflow, "bad")).status == T.FAILED and t, what="bad to fail")
    while database_now() <= deadline:
        time.sleep(0.1)
    before = Workflow.objects.get(pk=workflow.pk)
    assert before.status == W.RUNNING  # no reaper here: nothing saw it yet
    assert (before.failed_steps, before.error) == (1, "task bad failed: PermanentError: no")

    with pytest.raises(TransitionError, match="is past its deadline"):
        task_retry(execution_id=bad.pk)

    bad.refresh_from_db()
    running = Workflow.objects.get(pk=workflow.pk)
    assert (bad.status, running.failed_steps, running.error) == (T.FAILED, 1, before.error)
    assert not Event.objects.filter(entity_id=bad.pk, event_type="task_retrying").exists()
    workflow_cancel(workflow_id=workflow.pk)
    ended = finished(workflow)
    assert (ended.status, ended.error, ended.failed_steps) == (W.FAILED, before.error, 1)
    assert task(workflow, "bad").status == T.FAILED
    assert [a.status for a in TaskAttempt.objects.filter(execution=bad)] == [A.FAILED]


@pytest.mark.django_db(transaction=True)
def test_the_reaper_leaves_running_a_workflow_whose_deadline_an_operator_extended_during_its_pass(engine):
    """The reaper's deadline pass lists the running workflows past their deadline, then fails
    each under its lock. An operator who extended one's deadline in the console meanwhile (the
    change view saves it under the workflow's lock) saw it saved; the pass then failed the
    workflow anyway, its running task cut, with the error "deadline <the new one> passed", a
    time still to come. Under the lock, the deadline is read again."""
    engine()
    deadline = database_now() + dt.timedelta(seconds=3)
    workflows = [
        submit({"name": "long", "agent": "sleep", "input": {"seconds": 60}}, deadline=deadline.isoformat())
        for _ in range(2)
    ]
    for workflow in workflows:
        running_attempt(workflow, "long")
    while database_now() <= deadline:
        time.sleep(0.1)
    ids = [workflow.pk for workflow in workflows]
    tasks = [task(workflow, "long").pk for workflow in workflows]
    holder, probe = other_connection(), other_connection()
    try:
        # The pass is held up cutting the first workflow's task (its row is locked here), after
        # it listed both workflows.
        holder.execute("BEGIN")
        holder.execute("SELECT 1 FROM task_executions WHERE execution_id = ANY(%s) FOR UPDATE", [tasks])
        reaper, box = in_thread(lambda: workflows_enforce_deadlines(now=database_now()))

        def the_other() -> str | None:
            with probe.transaction():
                free = probe.execute(
                    "SELECT workflow_id FROM workflows WHERE workflow_id = ANY(%s) FOR UPDATE SKIP LOCKED", [ids]
                ).fetchall()
            return free[0][0] if len(free) == 1 else None

        assert waiting_on_lock()  # the pass waits for the first workflow's task
        extended = wait_for(the_other, what="the reaper to lock the first workflow")
        # The operator's save (ChangedFieldsOnlyMixin): the row locked, then the changed field written.
        new_deadline = database_now() + dt.timedelta(hours=1)
        with probe.transaction():
            probe.execute("SELECT 1 FROM workflows WHERE workflow_id = %s FOR UPDATE", [extended])
            probe.execute("UPDATE workflows SET deadline = %s WHERE workflow_id = %s", [new_deadline, extended])
        holder.execute("COMMIT")
        reaper.join(30)
    finally:
        holder.close()
        probe.close()
    assert "error" not in box, box
    assert box["result"] == [pk for pk in ids if pk != extended]
    kept = Workflow.objects.get(pk=extended)
    assert (kept.status, kept.error) == (W.RUNNING, None)
    assert TaskExecution.objects.get(workflow=kept).status == T.RUNNING
    workflow_cancel(workflow_id=extended)
    assert finished(kept).status == W.CANCELLED


@pytest.mark.django_db(transaction=True)
def test_a_claim_runs_the_task_of_a_workflow_whose_deadline_an_operator_extended_while_it_waited(engine):
    """A worker's claim that finds the workflow past its deadline fails it, under its lock. An
    operator extending the deadline in the console held that lock (the change view saves under
    it): the claim, once it had the row, failed the workflow anyway, for "deadline <the new
    one> passed", a time still to come. Under the lock the deadline is read again: the task runs."""
    deadline = database_now() + dt.timedelta(seconds=2)
    workflow = submit({"name": "a", "agent": "echo"}, deadline=deadline.isoformat())  # no worker yet
    while database_now() <= deadline:
        time.sleep(0.1)
    operator = other_connection()
    try:
        operator.execute("BEGIN")
        operator.execute("SELECT 1 FROM workflows WHERE workflow_id = %s FOR UPDATE", [workflow.pk])
        engine()
        assert waiting_on_lock(timeout=30)  # the worker's claim waits for the workflow's row
        new_deadline = database_now() + dt.timedelta(hours=1)
        operator.execute("UPDATE workflows SET deadline = %s WHERE workflow_id = %s", [new_deadline, workflow.pk])
        operator.execute("COMMIT")
    finally:
        operator.close()
    ended = finished(workflow)
    assert (ended.status, ended.error) == (W.COMPLETED, None)
    assert [a.status for a in TaskAttempt.objects.filter(execution__workflow=workflow)] == [A.SUCCEEDED]
