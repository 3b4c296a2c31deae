"""Races on PostgreSQL row locks and snapshots, forced with threads, events and a second
connection (no sleep decides an outcome): the first three tests, and the last (section 4),
failed before their fixes (an audit's reproductions); the others pin interleavings found correct."""

from __future__ import annotations

import threading
import time
from unittest import mock

import pytest
from django.db import connection, connections, transaction
from django.db.models import Sum
from django.utils import timezone

from orchestration.errors import PermanentError, TransitionError
from orchestration.models import TaskExecution, Workflow
from orchestration.runtime.context import AgentResult, Usage
from orchestration.services import dispatch
from orchestration.services.execution import attempt_claim, attempt_fail, attempt_succeed
from tests.orchestration.test_fastpath import _claimed, committed_agents  # noqa: F401 (a fixture)
from tests.orchestration.test_fastpath_races import in_thread
from tests.pg import other_connection

pytestmark = pytest.mark.usefixtures("committed_agents")


def waiting_on_lock(timeout: float = 10.0) -> list[str]:
    """Queries of other sessions of this database blocked on a heavyweight lock (waits until one is)."""
    other = other_connection()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            rows = other.execute(
                "SELECT query FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
            ).fetchall()
            if rows:
                return [r[0] for r in rows]
            time.sleep(0.05)
        return []
    finally:
        other.close()


# ---------------------------------------------------------------------------------------------
# 1. rollup's WORKFLOWS_RECONCILE_SQL: the "finished in the period" test is in the subquery
#    (statement snapshot), not on the updated row, so EvalPlanQual does not re-check it; a
#    workflow resumed and advanced meanwhile gets its totals overwritten with the stale sum.
# ---------------------------------------------------------------------------------------------
def test_reconcile_keeps_the_totals_of_a_workflow_resumed_meanwhile():
    from orchestration.services.rollup import metrics_rollup, period_floor

    with mock.patch.object(dispatch, "dispatch_send"):
        claims = _claimed(["a", "b"])
        now = timezone.now()
        assert attempt_succeed(
            attempt=claims["a"].attempt,
            result=AgentResult(output={"ok": 1}, usage=Usage(input_tokens=1, output_tokens=2)),
            duration_ms=1.0,
            now=now,
        )
        attempt_fail(attempt=claims["b"].attempt, exc=PermanentError("no"), duration_ms=1.0, now=now)
    workflow_id = claims["a"].context.workflow_id
    wf = Workflow.objects.get(pk=workflow_id)
    assert wf.status == "failed" and wf.total_tokens_used == 3
    period_start = period_floor(wf.completed_at, "hour")
    # A drift the reconcile exists to correct (without one the statement's scan never selects
    # the row, and nothing happens): the workflow's total lags its tasks' by 1.
    Workflow.objects.filter(pk=workflow_id).update(total_tokens_used=2)

    resumed_and_advanced, release = threading.Event(), threading.Event()

    def resume_and_complete_b() -> None:
        # Resume, claim b and record its success (5 tokens), all committed together once released:
        # what a resume and the next completion write, held open so the rollup's statement starts
        # before they commit.
        from orchestration.services.workflows import workflow_resume

        with mock.patch.object(dispatch, "dispatch_send"), transaction.atomic():
            workflow_resume(workflow_id=workflow_id)
            b = TaskExecution.objects.get(workflow_id=workflow_id, task_name="b")
            claim = attempt_claim(execution_id=b.pk, celery_task_id=b.celery_task_id, worker="w2")
            assert attempt_succeed(
                attempt=claim.attempt,
                result=AgentResult(output={"ok": 2}, usage=Usage(input_tokens=2, output_tokens=3)),
                duration_ms=1.0,
                now=timezone.now(),
            )
            resumed_and_advanced.set()
            release.wait(20)

    writer, writer_box = in_thread(resume_and_complete_b)
    assert resumed_and_advanced.wait(20)
    rollup, rollup_box = in_thread(lambda: metrics_rollup(period="hour", period_start=period_start))
    blocked = waiting_on_lock()
    assert any("UPDATE workflows SET total_tokens_used" in q for q in blocked), blocked
    release.set()
    writer.join(20)
    rollup.join(20)
    assert "error" not in writer_box and "error" not in rollup_box, (writer_box, rollup_box)

    wf = Workflow.objects.get(pk=workflow_id)
    task_sum = TaskExecution.objects.filter(workflow_id=workflow_id).aggregate(t=Sum("tokens_used"))["t"]
    assert (wf.status, task_sum) == ("completed", 8)
    # Correct: the resumed run's 5 tokens are kept (8 if the drift was also corrected, 7 if the
    # changed row was left for the next reconcile). Observed: 3, the stale sum read before them.
    assert wf.total_tokens_used in (7, 8), "the resumed run's 5 tokens were overwritten by the stale sum"


# ---------------------------------------------------------------------------------------------
# 2. Lock order: every worker transaction locks attempt -> task -> workflow; workflow_cancel
#    and the reaper's deadline pass lock workflow -> tasks -> attempts. A cancel that reaches a
#    task row while a worker holds it (between its task lock and its workflow UPDATE) waits
#    first, so PostgreSQL's deadlock check picks the cancel as the victim: the user's cancel
#    (or the reaper's whole run) fails with 40P01; neither is retried.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("operation", ["workflow_cancel", "workflows_enforce_deadlines"])
def test_cancel_racing_a_failed_attempt_is_not_a_deadlock_victim(operation):
    import datetime as dt

    from orchestration.errors import RetryableError
    from orchestration.services import execution, reaper, workflows

    claims = _claimed(["a", "b"])
    workflow_id = claims["a"].context.workflow_id
    if operation == "workflows_enforce_deadlines":
        Workflow.objects.filter(pk=workflow_id).update(deadline=timezone.now() - dt.timedelta(seconds=1))
    worker_holds_task, go = threading.Event(), threading.Event()
    original_add_usage = execution.workflow_add_usage

    def add_usage_after_pause(*args, **kwargs):
        worker_holds_task.set()  # attempt a and task a are locked by now
        go.wait(20)
        return original_add_usage(*args, **kwargs)

    with (
        mock.patch.object(execution, "workflow_add_usage", add_usage_after_pause),
        mock.patch.object(dispatch, "dispatch_send"),
        mock.patch("orchestration.services.dispatch.revoke_after_commit"),
    ):
        worker, worker_box = in_thread(
            lambda: attempt_fail(
                attempt=claims["a"].attempt, exc=RetryableError("429"), duration_ms=1.0, now=timezone.now()
            )
        )
        assert worker_holds_task.wait(20)
        if operation == "workflow_cancel":
            cancel = lambda: workflows.workflow_cancel(workflow_id=workflow_id)  # noqa: E731
        else:
            cancel = lambda: reaper.workflows_enforce_deadlines(now=timezone.now())  # noqa: E731
        canceller, cancel_box = in_thread(cancel)
        assert waiting_on_lock()  # the cancel waits for task a's row
        go.set()  # the worker goes on to UPDATE workflows: a cycle
        canceller.join(30)
        worker.join(30)
    assert worker_box == {"result": True}
    # What should happen: the cancel (or the deadline) wins or waits, it does not fail.
    assert "error" not in cancel_box, cancel_box
    if operation == "workflows_enforce_deadlines":
        # A deadline pass skips a workflow whose row is locked (skip_locked): when PostgreSQL
        # made it the deadlock victim, its retry found the worker still holding the row, and
        # the next pass of the reaper (every few seconds) fails the workflow.
        reaper.workflows_enforce_deadlines(now=timezone.now())
    assert Workflow.objects.get(pk=workflow_id).status in ("cancelled", "failed")


# ---------------------------------------------------------------------------------------------
# 3. workflow_submit's idempotency: check, then INSERT, with the unique (owner, idempotency_key)
#    index as "the last word". With no owner (manage.py submit_workflow) the index never fires:
#    NULLs are distinct, so two concurrent submissions of the same key both store a workflow.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_owner", [True, False])
def test_concurrent_submissions_with_one_idempotency_key_store_one_workflow(with_owner):
    from django.contrib.auth import get_user_model

    from orchestration.services import workflows

    owner = get_user_model().objects.create_user(username="pg-owner") if with_owner else None
    spec = {"name": "once", "idempotency_key": "k-1", "tasks": [{"name": "a", "agent": "echo"}]}
    first_stored, release = threading.Event(), threading.Event()
    original = workflows.dispatch_after_commit

    def pause_first(dispatches):
        if threading.current_thread().name == "first":
            first_stored.set()  # its workflow row is inserted, not committed
            release.wait(20)
        return original(dispatches)

    boxes = {}
    with (
        mock.patch.object(workflows, "dispatch_after_commit", pause_first),
        mock.patch.object(dispatch, "dispatch_send"),
    ):
        threads = {}
        for name in ("first", "second"):
            box: dict = {}

            def run(box=box):
                try:
                    box["result"] = workflows.workflow_submit(spec=spec, owner=owner)
                except BaseException as exc:
                    box["error"] = exc
                finally:
                    connections.close_all()

            threads[name] = threading.Thread(target=run, name=name)
            boxes[name] = box
            threads[name].start()
            if name == "first":
                assert first_stored.wait(20)
        # the second either finishes at once (no conflict) or waits on the first's index entry
        deadline = time.monotonic() + 5
        while threads["second"].is_alive() and not waiting_on_lock(0.1) and time.monotonic() < deadline:
            pass
        release.set()
        for thread in threads.values():
            thread.join(20)
    created = [boxes[n]["result"][1] for n in ("first", "second")]
    stored = Workflow.objects.filter(idempotency_key="k-1").count()
    assert sorted(created) == [False, True]
    assert stored == 1, "one idempotency key, two workflows"


# ---------------------------------------------------------------------------------------------
# Checked and found correct (forced interleavings)
# ---------------------------------------------------------------------------------------------
def _submit(spec):
    from orchestration.services.workflows import workflow_submit

    with mock.patch.object(dispatch, "dispatch_send"):
        workflow, _ = workflow_submit(spec=spec)
    return workflow


def _claim(task):
    task.refresh_from_db()
    return attempt_claim(execution_id=task.pk, celery_task_id=task.celery_task_id, worker="w")


def test_fan_in_parents_finishing_at_once_queue_the_child_once():
    from orchestration.models import Event
    from orchestration.services import fastpath
    from tests.orchestration.test_fastpath_races import succeed_params

    wf = _submit(
        {
            "name": "fan-in",
            "tasks": [
                {"name": "a", "agent": "echo"},
                {"name": "b", "agent": "echo"},
                {"name": "c", "agent": "echo", "depends_on": ["a", "b"]},
            ],
        }
    )
    a, b = (TaskExecution.objects.get(workflow=wf, task_name=n) for n in "ab")
    ca, cb = _claim(a), _claim(b)
    other = other_connection()
    other.execute("BEGIN")
    rows = other.execute(fastpath.SUCCEED_SQL, succeed_params(cb.attempt.pk)).fetchall()  # holds the workflow row
    assert rows[0][4] is True  # c pending: b's completion must advance (as workflow_advance would)
    with mock.patch.object(dispatch, "dispatch_send"):
        thread, box = in_thread(
            lambda: attempt_succeed(
                attempt=ca.attempt, result=AgentResult(output={}), duration_ms=1.0, now=timezone.now()
            )
        )
        assert waiting_on_lock()
        other.execute("COMMIT")  # b completed without running workflow_advance (raw SQL): a's must queue c
        thread.join(20)
    assert box == {"result": True}
    c = TaskExecution.objects.get(workflow=wf, task_name="c")
    assert c.status == "queued"
    assert Event.objects.filter(entity_id=c.pk, event_type="task_queued").count() == 1


def test_concurrency_limit_second_claim_waits_for_the_first_and_defers():
    from orchestration.models import Agent
    from orchestration.services.execution import Outcome

    Agent.objects.filter(pk="echo").update(max_concurrency=1)
    wf = _submit({"name": "limited", "tasks": [{"name": "a", "agent": "echo"}, {"name": "b", "agent": "echo"}]})
    a, b = (TaskExecution.objects.get(workflow=wf, task_name=n) for n in "ab")
    first_claimed, release = threading.Event(), threading.Event()

    def first():
        with transaction.atomic():
            claim = _claim(a)
            first_claimed.set()
            release.wait(20)
        return claim

    with mock.patch.object(dispatch, "dispatch_send"):
        t1, box1 = in_thread(first)
        assert first_claimed.wait(20)
        t2, box2 = in_thread(lambda: _claim(b))
        assert waiting_on_lock()  # on the agent row
        release.set()
        t1.join(20)
        t2.join(20)
    assert not isinstance(box1["result"], Outcome) and box2["result"] == Outcome.DEFERRED
    assert list(TaskExecution.objects.filter(workflow=wf).order_by("task_name").values_list("status", flat=True)) == [
        "running",
        "queued",
    ]


def test_succeed_alone_with_a_stale_pending_check_while_a_retry_revives_a_dependent():
    """task_retry (continue on failure) revives d (depends on x and y) while y's one-statement
    completion, whose snapshot predates the retry, waits on the workflow row: y completes alone
    without advancing; x's later completion must still queue d, and the workflow completes."""
    from orchestration.services.workflows import task_retry

    wf = _submit(
        {
            "name": "revive",
            "continue_on_failure": True,
            "tasks": [
                {"name": "x", "agent": "echo", "max_retries": 0},
                {"name": "y", "agent": "echo"},
                {"name": "z", "agent": "echo"},
                {"name": "d", "agent": "echo", "depends_on": ["x", "y"]},
            ],
        }
    )
    x, y, z = (TaskExecution.objects.get(workflow=wf, task_name=n) for n in "xyz")
    cx, cy, cz = _claim(x), _claim(y), _claim(z)
    with (
        mock.patch.object(dispatch, "dispatch_send"),
        mock.patch("orchestration.services.dispatch.revoke_after_commit"),
    ):
        attempt_fail(attempt=cx.attempt, exc=PermanentError("no"), duration_ms=1.0, now=timezone.now())
        assert TaskExecution.objects.get(workflow=wf, task_name="d").status == "cancelled"
        retried, release = threading.Event(), threading.Event()

        def retry_held_open():
            with transaction.atomic():
                task_retry(execution_id=x.pk)
                retried.set()
                release.wait(20)

        t_retry, box_retry = in_thread(retry_held_open)
        assert retried.wait(20)
        # y's one-statement completion: its snapshot has no pending task; it waits on the workflow row
        t_y, box_y = in_thread(
            lambda: attempt_succeed(
                attempt=cy.attempt, result=AgentResult(output={}), duration_ms=1.0, now=timezone.now(), standalone=True
            )
        )
        assert waiting_on_lock()
        release.set()
        t_retry.join(20)
        t_y.join(20)
        assert box_y == {"result": True} and "error" not in box_retry
        assert TaskExecution.objects.get(workflow=wf, task_name="d").status == "pending"
        assert attempt_succeed(
            attempt=cz.attempt, result=AgentResult(output={}), duration_ms=1.0, now=timezone.now(), standalone=True
        )
        cx2 = _claim(TaskExecution.objects.get(pk=x.pk))
        assert attempt_succeed(
            attempt=cx2.attempt,
            result=AgentResult(output={}),
            duration_ms=1.0,
            now=timezone.now(),
            standalone=cx2.standalone,
        )
        d = TaskExecution.objects.get(workflow=wf, task_name="d")
        assert d.status == "queued"
        cd = _claim(d)
        assert attempt_succeed(
            attempt=cd.attempt,
            result=AgentResult(output={}),
            duration_ms=1.0,
            now=timezone.now(),
            standalone=cd.standalone,
        )
    wf.refresh_from_db()
    assert (wf.status, wf.completed_steps, wf.failed_steps, wf.cancelled_steps) == ("completed", 4, 0, 0)


def test_migration_0017_keeps_each_ownerless_key_on_the_first_workflow_before_indexing(capsys):
    """A database where the race already stored two ownerless workflows under one key: the
    migration keeps the key on the first and removes it from the other, then the index builds."""
    import datetime as dt

    from django.apps import apps as global_apps
    from django.db.migrations.executor import MigrationExecutor

    from tests.factories import WorkflowFactory

    index = "workflows_ownerless_idempotency_key_unique"
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(f"DROP INDEX {index}")  # as before migration 0017
        t0 = timezone.now()
        first = WorkflowFactory(owner=None, idempotency_key="nightly", created_at=t0)
        second = WorkflowFactory(owner=None, idempotency_key="nightly", created_at=t0 + dt.timedelta(seconds=1))
        other = WorkflowFactory(owner=None, idempotency_key="hourly")
        migration = MigrationExecutor(connection).loader.get_migration(
            "orchestration", "0017_workflows_ownerless_idempotency_key"
        )
        migration.operations[0].code(global_apps, connection.schema_editor())
        with connection.cursor() as cursor:  # no submission can add a duplicate until the index exists
            cursor.execute(
                "SELECT mode FROM pg_locks WHERE relation = 'workflows'::regclass AND pid = pg_backend_pid() "
                "AND mode = 'ShareRowExclusiveLock'"
            )
            assert cursor.fetchall() == [("ShareRowExclusiveLock",)]
        keys = dict(
            Workflow.objects.filter(pk__in=[first.pk, second.pk, other.pk]).values_list("pk", "idempotency_key")
        )
        assert keys == {first.pk: "nightly", second.pk: None, other.pk: "hourly"}
        assert f"kept on {first.pk}, removed from {second.pk}" in capsys.readouterr().out
        with connection.cursor() as cursor:  # the index the migration adds next now builds
            cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")  # the inserts' deferred checks first
            cursor.execute(
                f"CREATE UNIQUE INDEX {index} ON workflows (idempotency_key) "
                "WHERE idempotency_key IS NOT NULL AND owner_id IS NULL"
            )
        transaction.set_rollback(True)


def test_a_timeout_change_holds_the_workflow_lock_of_a_task_made_pending_meanwhile():
    """task_dispatch_change_check reads the status without a lock, then locks the task row. A
    task made pending between the two (a retry reviving it, a resume) is locked without its
    workflow's lock: the dispatch of the dependents that became ready (workflow_advance, under the
    workflow's lock only) reads the old timeout and sends it while the new one is saved."""
    from orchestration.services.workflows import task_dispatch_change_check
    from tests.factories import TaskExecutionFactory

    task = TaskExecutionFactory(status=TaskExecution.Status.CANCELLED)
    reviver = other_connection()
    reviver.execute("BEGIN")
    reviver.execute("UPDATE task_executions SET status = 'pending' WHERE execution_id = %s", [task.pk])
    checked, release = threading.Event(), threading.Event()
    accepted: list[str] = []

    def change() -> str:
        with transaction.atomic():
            try:
                accepted.append(task_dispatch_change_check(execution_id=task.pk).status)
            except TransitionError as exc:
                return f"refused: {exc}"
            finally:
                checked.set()
            release.wait(20)
            return accepted[0]

    thread, box = in_thread(change)
    probe = other_connection()
    try:
        assert waiting_on_lock(), "the check waits on the task row"
        reviver.execute("COMMIT")
        assert checked.wait(20), box
        # A change accepted for a pending task holds its workflow's row until it is saved.
        free = probe.execute(
            "SELECT 1 FROM workflows WHERE workflow_id = %s FOR UPDATE SKIP LOCKED", [task.workflow_id]
        ).fetchall()
    finally:
        release.set()
        thread.join(20)
        probe.close()
        reviver.close()
    assert not (accepted and free), f"the workflow row is free while a pending task's timeout changes: {box}"
    assert box["result"].startswith(f"refused: task {task.pk} became pending"), box


# ---------------------------------------------------------------------------------------------
# A retry reads the database's clock after the locks it waits for: a workflow whose deadline
# passed while the retry waited for its row was retried past it, its task queued to be failed
# by its first claim.
# ---------------------------------------------------------------------------------------------
def test_a_retry_that_waited_for_the_workflow_row_checks_the_deadline_after_the_wait():
    import datetime as dt

    from orchestration.db import database_now
    from orchestration.services import workflows
    from orchestration.services.execution import attempt_run

    deadline = database_now() + dt.timedelta(seconds=3)
    with mock.patch.object(dispatch, "dispatch_send"):
        workflow, _ = workflows.workflow_submit(
            spec={
                "name": "late",
                "continue_on_failure": True,
                "deadline": deadline.isoformat(),
                "tasks": [{"name": "a", "agent": "fail", "input": {"message": "no"}, "max_retries": 0}],
            }
        )
        task = TaskExecution.objects.get(workflow=workflow)
        attempt_run(execution_id=task.pk, celery_task_id=task.celery_task_id, worker="w@h")
        assert Workflow.objects.get(pk=workflow.pk).status == Workflow.Status.FAILED
        other = other_connection()
        try:
            with other.transaction():
                other.execute("SELECT 1 FROM workflows WHERE workflow_id = %s FOR UPDATE", [workflow.pk])
                retry, box = in_thread(lambda: workflows.task_retry(execution_id=task.pk))
                assert waiting_on_lock()  # the retry waits for the workflow's row
                while database_now() <= deadline:
                    time.sleep(0.1)
            retry.join(20)
        finally:
            other.close()
    assert isinstance(box.get("error"), TransitionError), box
    assert "past its deadline" in str(box["error"])
    assert TaskExecution.objects.get(pk=task.pk).status == TaskExecution.Status.FAILED


# ---------------------------------------------------------------------------------------------
# 4. Rollups of one period at once (two beats, a manual backfill, a run overlapping the next):
#    each replaces the period's rows, a DELETE walking them in the table's order, then an
#    INSERT ... ON CONFLICT DO UPDATE taking them in the query's. One whose DELETE found the
#    rows an earlier run had just committed upserts them while a third deletes them, each
#    holding rows the other waits for: PostgreSQL aborted one of them, "deadlock detected".
# ---------------------------------------------------------------------------------------------
def test_rollups_of_one_period_at_once_are_not_deadlock_victims(monkeypatch):
    import datetime as dt

    from django.db.models.query import QuerySet

    from orchestration.models import AgentMetric
    from orchestration.services.rollup import METRICS, metrics_rollup
    from tests.factories import AgentFactory, TaskAttemptFactory, TaskExecutionFactory

    hour = dt.datetime(2024, 3, 5, 10, 0, tzinfo=dt.UTC)
    task = TaskExecutionFactory(
        agent=AgentFactory(), status="completed", completed_at=hour + dt.timedelta(minutes=1), execution_time_ms=5
    )
    TaskAttemptFactory(execution=task, succeeded=True, started_at=hour)
    metrics_rollup(period="hour", period_start=hour)
    upsert_order = [name for name, _, _ in METRICS]

    # A run replacing the period's rows, its transaction still open. The rows it writes lie in
    # the reverse of the query's order, as updates leave a table's rows in any order.
    earlier = other_connection()
    earlier.execute("CREATE TEMP TABLE previous AS SELECT * FROM agent_metrics WHERE period_start = %s", [hour])
    earlier.execute("BEGIN")
    earlier.execute("DELETE FROM agent_metrics WHERE period = 'hour' AND period_start = %s", [hour])
    for name in reversed(upsert_order):
        earlier.execute(
            "INSERT INTO agent_metrics (id, agent_id, metric_type, metric_value, metric_unit, period, period_start, "
            "recorded_at, context, created_at) SELECT gen_random_uuid(), agent_id, metric_type, metric_value, "
            "metric_unit, period, period_start, recorded_at, context, created_at FROM previous WHERE metric_type = %s",
            [name],
        )

    # The second run pauses after its DELETE (which waited for the earlier run and then found
    # nothing left to delete), so that its upsert starts once the rows it takes are held.
    second_run, deleted, go_on = threading.local(), threading.Event(), threading.Event()
    original_delete = QuerySet.delete

    def delete(self):
        done = original_delete(self)
        if getattr(second_run, "is_it", False):
            deleted.set()
            go_on.wait(20)
        return done

    monkeypatch.setattr(QuerySet, "delete", delete)

    def second() -> object:
        second_run.is_it = True
        return metrics_rollup(period="hour", period_start=hour)

    def blocked(count: int) -> list[str]:
        deadline = time.monotonic() + 10
        while len(queries := waiting_on_lock()) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return queries

    thread_two, box_two = in_thread(second)
    assert any("DELETE" in query for query in waiting_on_lock()), "the second run did not wait for the earlier one"
    earlier.execute("COMMIT")
    assert deleted.wait(20)
    holder = other_connection()  # holds one row half-way through the upsert's order
    holder.execute("BEGIN")
    holder.execute("SELECT 1 FROM agent_metrics WHERE period_start = %s AND metric_type = 'latency' FOR UPDATE", [hour])
    go_on.set()
    assert blocked(1)
    thread_three, box_three = in_thread(lambda: metrics_rollup(period="hour", period_start=hour))
    assert len(blocked(2)) == 2
    holder.execute("COMMIT")
    thread_two.join(30)
    thread_three.join(30)
    earlier.close()
    holder.close()
    assert "error" not in box_two and "error" not in box_three, (box_two.get("error"), box_three.get("error"))
    assert AgentMetric.objects.filter(period="hour", period_start=hour).count() == len(upsert_order)
