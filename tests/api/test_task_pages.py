"""A page of one workflow's tasks, at a size where the plan matters: a big workflow among many
newer tasks. PostgreSQL's statistics say how many rows a workflow has, not where in time they
are; without an index in the list's order for one workflow it walked every newer task on
idx_tasks_created_at to fill the page (0.5 s at 1 M tasks, seconds from disk)."""

from __future__ import annotations

from unittest import mock

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from orchestration.models import TaskExecution
from orchestration.services import dispatch
from orchestration.services.workflows import workflow_submit

BIG, NEWER = 1000, 100_000


def _filtered_out(plan: dict) -> int:
    """Rows the plan's nodes read and threw away (`Rows Removed by Filter`), over the tree."""
    return plan.get("Rows Removed by Filter", 0) + sum(_filtered_out(child) for child in plan.get("Plans", []))


def _nodes(plan: dict) -> list[tuple[str, str, int]]:
    """The plan's nodes, depth first: (type, index, rows removed by its filter)."""
    own = (plan["Node Type"], plan.get("Index Name", ""), plan.get("Rows Removed by Filter", 0))
    return [own, *(node for child in plan.get("Plans", []) for node in _nodes(child))]


@pytest.fixture
def big_workflow(callers) -> str:
    with mock.patch.object(dispatch, "dispatch_send"):
        big, _ = workflow_submit(
            spec={"name": "big", "tasks": [{"name": f"t{i:04}", "agent": "echo"} for i in range(BIG)]}
        )
        small, _ = workflow_submit(spec={"name": "small", "tasks": [{"name": "only", "agent": "echo"}]})
    with connection.cursor() as cursor:
        # NEWER one-task workflows, all made after the big one: copies of the small one's rows.
        for table, key, skip in (
            ("workflows", "workflow_id", ("workflow_id", "created_at", "idempotency_key")),
            ("task_executions", "workflow_id", ("execution_id", "workflow_id", "created_at", "celery_task_id")),
        ):
            cursor.execute(
                "SELECT string_agg(quote_ident(column_name), ', ') FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = %s AND NOT column_name = ANY(%s)",
                [table, list(skip)],
            )
            columns = cursor.fetchone()[0]
            own = ", ".join(skip)
            values = {
                "workflows": "'newer-' || g, created_at + g * interval '1 ms', NULL",
                "task_executions": "'newer-task-' || g, 'newer-' || g, created_at + g * interval '1 ms', NULL",
            }[table]
            cursor.execute(
                f"INSERT INTO {table} ({own}, {columns}) SELECT {values}, {columns} "  # noqa: S608
                f"FROM {table}, generate_series(1, %s) g WHERE {key} = %s",
                [NEWER, small.pk],
            )
        cursor.execute("ANALYZE task_executions")
    return big.pk


def _page(client, url: str) -> tuple[dict, list[str]]:
    with CaptureQueriesContext(connection) as queries:
        response = client.get(url)
    assert response.status_code == 200, response.content
    statements = [q["sql"] for q in queries.captured_queries if 'FROM "task_executions"' in q["sql"]]
    return response.json(), statements


def test_a_page_of_a_big_workflows_tasks_reads_only_that_workflows_rows(callers, big_workflow):
    client = callers["admin"].client
    for ordering in ("-created_at", "created_at"):
        order = (ordering, f"{ordering[: -len('created_at')]}execution_id")
        expected = list(
            TaskExecution.objects.filter(workflow_id=big_workflow)
            .order_by(*order)
            .values_list("execution_id", flat=True)
        )
        body, statements = _page(client, f"/api/v1/tasks/?workflow={big_workflow}&ordering={ordering}&limit=50")
        assert [row["execution_id"] for row in body["results"]] == expected[:50]
        deeper, deeper_statements = _page(client, body["next"])
        assert [row["execution_id"] for row in deeper["results"]] == expected[50:100]
        assert statements and deeper_statements
        for sql in (*statements, *deeper_statements):
            with connection.cursor() as cursor:
                cursor.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}")
                (plan,) = cursor.fetchone()[0]
            # A page of 50 (51 read, to know whether there is a next one), not the newer tasks.
            assert _filtered_out(plan["Plan"]) < 100, (ordering, _nodes(plan["Plan"]))
