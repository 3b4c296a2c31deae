"""Operations on a workflow of thousands of tasks (up to WORKFLOW_MAX_TASKS) cost a fixed number
of statements, none of them with a clause per task (and so does the sweeper re-sending the
messages a broker lost): Django's bulk_update writes a CASE with one
WHEN per row for each column, which PostgreSQL walks for every row it updates (cancelling a
workflow of 5,000 tasks took 58 s; the 4,999 tasks a fan-out made ready kept their parent's
completion running 68 s, past a 30 s task's hard time limit), and a resume wrote each task and
its event with a statement of its own (10,000 statements)."""

from __future__ import annotations

import datetime as dt
import re

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from orchestration.event_types import EventType
from orchestration.models import Event, TaskExecution, Workflow
from orchestration.services.progress import workflow_advance, workflow_on_task_failed
from orchestration.services.reaper import queued_sweep
from orchestration.services.workflows import task_retry, workflow_cancel, workflow_resume, workflow_submit
from tests.engine import flush_redis

pytestmark = pytest.mark.usefixtures("builtin_agents")

T = TaskExecution.Status


def fan_out(width: int, **spec: object) -> Workflow:
    """A root task and `width` tasks that depend on it (submitted; on_commit never fires in
    these tests, so nothing reaches the broker)."""
    tasks = [{"name": "root", "agent": "echo"}]
    tasks += [{"name": f"leaf{i}", "agent": "echo", "depends_on": ["root"]} for i in range(width)]
    workflow, _ = workflow_submit(spec={"name": f"fan-out of {width}", "tasks": tasks, **spec})
    return workflow


def statements_of(operation) -> list[str]:
    with CaptureQueriesContext(connection) as queries:
        operation()
    return [query["sql"] for query in queries.captured_queries]


def most_whens(statements: list[str]) -> int:
    return max(len(re.findall(r"\bWHEN\b", sql)) for sql in statements)


def test_cancelling_a_workflow_writes_its_tasks_without_a_clause_per_task(db):
    small, big = fan_out(4), fan_out(60)
    few = statements_of(lambda: workflow_cancel(workflow_id=small.pk))
    many = statements_of(lambda: workflow_cancel(workflow_id=big.pk))
    assert len(many) == len(few)
    assert most_whens(many) < 10, "a CASE WHEN per task: quadratic in the tasks"
    assert set(TaskExecution.objects.filter(workflow=big).values_list("status", flat=True)) == {T.CANCELLED}
    assert Event.objects.filter(workflow_id=big.pk, event_type=EventType.TASK_CANCELLED).count() == 61
    big.refresh_from_db()
    assert (big.status, big.cancelled_steps) == (Workflow.Status.CANCELLED, 61)


def test_a_fan_out_queues_the_tasks_it_made_ready_without_a_clause_per_task(db):
    workflow = fan_out(60)
    root = TaskExecution.objects.get(workflow=workflow, task_name="root")
    TaskExecution.objects.filter(pk=root.pk).update(status=T.COMPLETED, completed_at=timezone.now())

    statements = statements_of(
        lambda: workflow_advance(
            workflow_id=workflow.pk, completed_task="root", status=workflow.status, now=timezone.now(), deadline=None
        )
    )

    assert most_whens(statements) < 10, "a CASE WHEN per task: quadratic in the tasks"
    leaves = TaskExecution.objects.filter(workflow=workflow).exclude(pk=root.pk)
    assert set(leaves.values_list("status", flat=True)) == {T.QUEUED}
    assert len(set(leaves.values_list("celery_task_id", flat=True))) == 60, "each its own message id"
    assert Event.objects.filter(workflow_id=workflow.pk, event_type=EventType.TASK_QUEUED).count() == 61


def test_resuming_a_workflow_costs_the_same_statements_however_many_tasks_rerun(db):
    small, big = fan_out(4), fan_out(60)
    for workflow in (small, big):
        workflow_cancel(workflow_id=workflow.pk)
    few = statements_of(lambda: workflow_resume(workflow_id=small.pk))
    many = statements_of(lambda: workflow_resume(workflow_id=big.pk))
    assert len(many) == len(few)
    statuses = dict(TaskExecution.objects.filter(workflow=big).values_list("task_name", "status"))
    assert statuses.pop("root") == T.QUEUED and set(statuses.values()) == {T.PENDING}
    retrying = Event.objects.filter(workflow_id=big.pk, event_type=EventType.TASK_RETRYING)
    assert retrying.count() == 61
    assert {event.payload["reason"] for event in retrying} == {"workflow resumed"}


def test_retrying_a_task_revives_its_cancelled_dependents_in_the_same_statements_however_many(db):
    def failed_fan_out(width: int) -> TaskExecution:
        """The root of a fan-out that continues on failure, failed for good: its dependents
        were cancelled for it and the workflow ended failed."""
        workflow = fan_out(width, continue_on_failure=True)
        root = TaskExecution.objects.get(workflow=workflow, task_name="root")
        TaskExecution.objects.filter(pk=root.pk).update(status=T.FAILED, error="boom", completed_at=timezone.now())
        root.refresh_from_db()
        workflow_on_task_failed(root, now=timezone.now())
        assert Workflow.objects.get(pk=workflow.pk).status == Workflow.Status.FAILED
        return root

    small, big = failed_fan_out(4), failed_fan_out(60)
    few = statements_of(lambda: task_retry(execution_id=small.pk))
    many = statements_of(lambda: task_retry(execution_id=big.pk))
    assert len(many) == len(few)
    statuses = dict(TaskExecution.objects.filter(workflow_id=big.workflow_id).values_list("task_name", "status"))
    assert statuses.pop("root") == T.QUEUED and set(statuses.values()) == {T.PENDING}
    reasons = Event.objects.filter(workflow_id=big.workflow_id, event_type=EventType.TASK_RETRYING).values_list(
        "payload__reason", flat=True
    )
    assert sorted(set(reasons)) == ["retried by user", "upstream task root retried"] and len(reasons) == 61


def test_the_sweeper_sends_lost_messages_again_in_the_same_statements_however_many(db, settings):
    """One transaction per task, the 4,776 messages a broker lost took over two minutes to send
    again (14 ms each), and another sweep began meanwhile."""
    flush_redis()  # no message of these tasks is in the broker: every one is lost

    def lost(width: int) -> list[TaskExecution]:
        tasks = [{"name": f"t{i}", "agent": "echo"} for i in range(width)]  # all roots: queued at once
        workflow, _ = workflow_submit(spec={"name": f"{width} roots", "tasks": tasks})
        long_ago = timezone.now() - dt.timedelta(seconds=settings.DISPATCH_SWEEP_AFTER_SECONDS + 60)
        TaskExecution.objects.filter(workflow=workflow).update(queued_at=long_ago)
        return list(TaskExecution.objects.filter(workflow=workflow))

    few = lost(3)
    few_statements = statements_of(queued_sweep)
    many = lost(40)
    many_statements = statements_of(queued_sweep)

    assert len(many_statements) == len(few_statements)
    for before in few + many:
        after = TaskExecution.objects.get(pk=before.pk)
        assert after.celery_task_id != before.celery_task_id
        assert (after.status, after.queued_at) == (T.QUEUED, before.queued_at)
