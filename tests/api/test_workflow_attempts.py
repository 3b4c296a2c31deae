"""`workflows/{id}/attempts/`: every attempt of a workflow's tasks in one paginated list, as
the tasks' own pages show them, with the task's id and name: reading them took a request per
task before."""

from __future__ import annotations

import datetime as dt

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from tests.factories import TaskAttemptFactory, TaskExecutionFactory, WorkflowFactory

T0 = timezone.now() - dt.timedelta(hours=1)


def _attempt(task, number: int, minute: int, **traits):
    return TaskAttemptFactory(
        execution=task, attempt_number=number, started_at=T0 + dt.timedelta(minutes=minute), **traits
    )


@pytest.fixture
def workflow(callers):
    """The developer's workflow: `fetch` failed once then succeeded, `report` succeeded between
    those two tries. Another user's workflow has an attempt too."""
    mine = WorkflowFactory(owner=callers["developer"].user)
    fetch = TaskExecutionFactory(workflow=mine, task_name="fetch")
    report = TaskExecutionFactory(workflow=mine, task_name="report")
    _attempt(fetch, 1, 0, failed=True)
    _attempt(report, 1, 1, succeeded=True)
    _attempt(fetch, 2, 2, succeeded=True)
    _attempt(TaskExecutionFactory(workflow=WorkflowFactory(owner=callers["other"].user)), 1, 3, succeeded=True)
    return mine


def _pages(client, url: str) -> list[dict]:
    rows = []
    while url:
        response = client.get(url)
        assert response.status_code == 200, response.content
        rows += response.json()["results"]
        url = response.json()["next"]
    return rows


def test_the_attempts_of_a_workflow_in_the_order_they_started_as_its_tasks_show_them(callers, workflow):
    client = callers["developer"].client
    rows = _pages(client, f"/api/v1/workflows/{workflow.pk}/attempts/?limit=2")
    assert [(r["task_name"], r["attempt_number"], r["status"]) for r in rows] == [
        ("fetch", 1, "failed"),
        ("report", 1, "succeeded"),
        ("fetch", 2, "succeeded"),
    ]
    for row in rows:
        task = client.get(f"/api/v1/tasks/{row['execution_id']}/").json()
        shown = next(a for a in task["attempts"] if a["attempt_number"] == row["attempt_number"])
        assert row == {"execution_id": task["execution_id"], "task_name": task["task_name"], **shown}
    latest = client.get(f"/api/v1/workflows/{workflow.pk}/attempts/?ordering=-started_at").json()["results"]
    assert latest == rows[::-1]


def test_attempts_filter_by_status_and_cause_and_refuse_what_no_filter_reads(callers, workflow):
    client = callers["developer"].client
    url = f"/api/v1/workflows/{workflow.pk}/attempts/"
    failed = client.get(f"{url}?status=failed").json()["results"]
    assert [(r["task_name"], r["cause"]) for r in failed] == [("fetch", "error")]
    assert client.get(f"{url}?cause=error").json()["results"] == failed
    assert len(client.get(f"{url}?status=succeeded").json()["results"]) == 2
    assert client.get(f"{url}?cause=worker_lost").json()["results"] == []
    for query in ("status=done", "cause=", "task=fetch", "ordering=sequence"):
        response = client.get(f"{url}?{query}")
        assert response.status_code == 400, query
        assert response.json()["errors"][0]["field"] == query.split("=")[0]


def test_an_admin_reads_anyones_and_a_viewer_only_their_own(callers, workflow):
    assert len(callers["admin"].client.get(f"/api/v1/workflows/{workflow.pk}/attempts/").json()["results"]) == 3
    assert callers["viewer"].client.get(f"/api/v1/workflows/{workflow.pk}/attempts/").status_code == 404


def test_a_page_is_the_same_statements_however_many_tasks_and_attempts(callers):
    """The task's id and name come from the page's own join: no statement per row or task."""
    client = callers["developer"].client

    def statements(tasks: int) -> list[str]:
        workflow = WorkflowFactory(owner=callers["developer"].user)
        for i in range(tasks):
            task = TaskExecutionFactory(workflow=workflow)
            _attempt(task, 1, i, failed=True)
            _attempt(task, 2, i, succeeded=True)
        with CaptureQueriesContext(connection) as queries:
            response = client.get(f"/api/v1/workflows/{workflow.pk}/attempts/?limit=100")
        assert len(response.json()["results"]) == 2 * tasks
        return [q["sql"] for q in queries.captured_queries]

    statements(1)  # the first request's one-off reads (the caller's key, settings cached per process)
    few, many = statements(1), statements(40)
    assert len(few) == len(many)
    assert len([sql for sql in many if "task_attempts" in sql]) == 1
