"""The fast path's statements: prepared on the server, inside Django's transaction, and
failing with Django's exceptions."""

from __future__ import annotations

import pytest
from django.db import DataError, connection, transaction

from orchestration.services.fastpath import execute_prepared


def _prepared(fragment: str) -> list[tuple[int, int]]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement LIKE %s",
            [f"%{fragment}%"],
        )
        return cursor.fetchall()


def test_statements_are_prepared_once_and_reused(db):
    sql = "SELECT %s::int + 1 AS fastpath_probe"
    assert [execute_prepared(sql, [i]) for i in range(3)] == [[(1,)], [(2,)], [(3,)]]
    (plans,) = _prepared("fastpath_probe")
    assert sum(plans) == 3  # one prepared statement executed three times, not three statements


def test_statements_run_in_the_callers_transaction(db):
    with connection.cursor() as cursor:
        cursor.execute("CREATE TEMPORARY TABLE fastpath_probe_rows (n int)")
    with pytest.raises(RuntimeError), transaction.atomic():
        execute_prepared("INSERT INTO fastpath_probe_rows VALUES (%s) RETURNING n", [7])
        raise RuntimeError("roll back")
    assert execute_prepared("SELECT count(*) FROM fastpath_probe_rows", []) == [(0,)]
    with transaction.atomic():
        execute_prepared("INSERT INTO fastpath_probe_rows VALUES (%s) RETURNING n", [8])
    assert execute_prepared("SELECT n FROM fastpath_probe_rows", []) == [(8,)]


def test_errors_are_djangos_and_leave_the_connection_usable(db):
    with pytest.raises(DataError) as raised, transaction.atomic():
        execute_prepared("SELECT 1 / %s::int", [0])
    assert raised.value.__cause__.sqlstate == "22012"  # division_by_zero, from psycopg
    assert execute_prepared("SELECT 1 / %s::int", [1]) == [(1,)]


@pytest.mark.parametrize("fast_path", [True, False])
def test_engine_fast_path_false_leaves_workflow_advance_on_the_orm(builtin_agents, settings, fast_path):
    from django.utils import timezone

    from orchestration.models import TaskExecution, Workflow
    from orchestration.services.progress import workflow_advance
    from orchestration.services.workflows import workflow_submit

    settings.ENGINE_FAST_PATH = fast_path
    workflow, _ = workflow_submit(
        spec={
            "name": "two",
            "tasks": [{"name": "a", "agent": "echo"}, {"name": "b", "agent": "echo", "depends_on": ["a"]}],
        }
    )
    Workflow.objects.filter(pk=workflow.pk).update(status=Workflow.Status.RUNNING)
    TaskExecution.objects.filter(workflow=workflow, task_name="a").update(status=TaskExecution.Status.COMPLETED)
    with connection.cursor() as cursor:
        cursor.execute("DEALLOCATE ALL")
    workflow_advance(workflow_id=workflow.pk, completed_task="a", status=Workflow.Status.RUNNING, now=timezone.now())
    assert TaskExecution.objects.get(workflow=workflow, task_name="b").status == TaskExecution.Status.QUEUED
    assert bool(_prepared("depends_on")) is fast_path
