"""Selectors for seed 003's query patterns, on PostgreSQL."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from django.db import connection
from django.utils import timezone

from orchestration.models import TaskExecution, Workflow
from orchestration.selectors import agent_recent_tasks, agent_stats, workflow_with_tasks
from tests.factories import AgentFactory, TaskAttemptFactory, TaskExecutionFactory, WorkflowFactory

pytestmark = pytest.mark.django_db

Status = TaskExecution.Status


def make_task(*, created_at: dt.datetime, **kwargs: object) -> TaskExecution:
    """A task whose created_at is set afterwards (the column is filled in on insert)."""
    task = TaskExecutionFactory(**kwargs)
    TaskExecution.objects.filter(pk=task.pk).update(created_at=created_at)
    task.refresh_from_db()
    return task


@pytest.fixture
def now() -> dt.datetime:
    return timezone.now()


@pytest.fixture
def stats_data(now: dt.datetime) -> None:
    """Agent akira: three completed, one failed, one timed out, one cancelled, one running in
    the last 24 hours; one completed and one failed 30 hours ago. Agent yuki: one completed."""
    akira = AgentFactory(id="akira-001")
    yuki = AgentFactory(id="yuki-002")
    recent = now - dt.timedelta(hours=2)
    old = now - dt.timedelta(hours=30)
    for ms, tokens, cost in [(100.0, 10, "0.001000"), (300.0, 30, "0.002500"), (200.5, 21, "0.000125")]:
        make_task(
            agent=akira,
            status=Status.COMPLETED,
            execution_time_ms=ms,
            tokens_used=tokens,
            cost_usd=Decimal(cost),
            created_at=recent,
        )
    make_task(agent=akira, status=Status.FAILED, tokens_used=500, cost_usd=Decimal("0.5"), created_at=recent)
    make_task(agent=akira, status=Status.TIMED_OUT, execution_time_ms=9999.0, created_at=recent)
    make_task(agent=akira, status=Status.CANCELLED, created_at=recent)
    make_task(agent=akira, status=Status.RUNNING, created_at=recent)
    make_task(
        agent=akira,
        status=Status.COMPLETED,
        execution_time_ms=7000.0,
        tokens_used=1000,
        cost_usd=Decimal("1.25"),
        created_at=old,
    )
    make_task(agent=akira, status=Status.FAILED, created_at=old)
    make_task(
        agent=yuki,
        status=Status.COMPLETED,
        execution_time_ms=50.0,
        tokens_used=7,
        cost_usd=Decimal("3"),
        created_at=recent,
    )


def test_agent_stats_cover_the_last_24_hours_by_default(stats_data: None) -> None:
    stats = agent_stats(agent_id="akira-001")

    assert stats["until"] is None
    del stats["since"], stats["until"]
    assert stats == {
        "agent_id": "akira-001",
        "total_tasks": 3,
        "avg_latency_ms": 600.5 / 3,
        "total_tokens": 61,
        "total_cost_usd": Decimal("0.003625"),
        "failed": 1,
        "timed_out": 1,
        "wasted_cost_usd": Decimal(0),
        "success_rate": 60.0,
    }
    assert isinstance(stats["total_cost_usd"], Decimal)


def test_agent_stats_default_window_starts_24_hours_ago(stats_data: None) -> None:
    before = timezone.now()
    since = agent_stats(agent_id="akira-001")["since"]
    after = timezone.now()

    assert before - dt.timedelta(hours=24) <= since <= after - dt.timedelta(hours=24)


def test_agent_stats_over_an_explicit_window(stats_data: None, now: dt.datetime) -> None:
    stats = agent_stats(agent_id="akira-001", since=now - dt.timedelta(hours=48), until=now - dt.timedelta(hours=24))

    assert (stats["total_tasks"], stats["avg_latency_ms"], stats["total_tokens"]) == (1, 7000.0, 1000)
    assert stats["total_cost_usd"] == Decimal("1.25")
    assert (stats["failed"], stats["timed_out"], stats["success_rate"]) == (1, 0, 50.0)


def test_agent_stats_window_is_half_open(stats_data: None, now: dt.datetime) -> None:
    old = now - dt.timedelta(hours=30)

    assert agent_stats(agent_id="akira-001", since=old, until=old + dt.timedelta(microseconds=1))["failed"] == 1
    assert agent_stats(agent_id="akira-001", since=old - dt.timedelta(hours=1), until=old)["failed"] == 0


def test_agent_stats_of_another_agent_ignore_akiras_tasks(stats_data: None) -> None:
    stats = agent_stats(agent_id="yuki-002")

    assert (stats["total_tasks"], stats["avg_latency_ms"], stats["total_tokens"]) == (1, 50.0, 7)
    assert stats["total_cost_usd"] == Decimal("3")
    assert stats["success_rate"] == 100.0


def test_agent_stats_without_finished_tasks(now: dt.datetime) -> None:
    agent = AgentFactory()
    make_task(agent=agent, status=Status.RUNNING, created_at=now)
    make_task(agent=agent, status=Status.CANCELLED, created_at=now)

    stats = agent_stats(agent_id=agent.id)

    assert (stats["total_tasks"], stats["avg_latency_ms"], stats["total_tokens"]) == (0, None, 0)
    assert stats["total_cost_usd"] == Decimal(0)
    assert isinstance(stats["total_cost_usd"], Decimal)
    assert (stats["failed"], stats["timed_out"], stats["success_rate"]) == (0, 0, None)


def test_agent_stats_wasted_spend_is_what_the_failed_tries_of_its_finished_and_cancelled_tasks_cost(
    now: dt.datetime,
) -> None:
    """A task cancelled after a failed try: that try's cost is wasted spend of the agent, as it
    is of the workflow, of the user and in the rollup (a cancelled try's cost is not)."""
    agent = AgentFactory()
    retried = make_task(agent=agent, status=Status.COMPLETED, created_at=now)
    failed = make_task(agent=agent, status=Status.FAILED, created_at=now)
    cancelled = make_task(agent=agent, status=Status.CANCELLED, created_at=now)
    for task, number, status, cost in [
        (retried, 1, "lost", "0.10"),
        (retried, 2, "timed_out", "0.20"),
        (retried, 3, "succeeded", "1.00"),
        (failed, 1, "failed", "0.40"),
        (cancelled, 1, "failed", "8"),
        (cancelled, 2, "cancelled", "9"),
    ]:
        TaskAttemptFactory(
            execution=task, attempt_number=number, status=status, cost_usd=Decimal(cost), finished_at=now
        )

    stats = agent_stats(agent_id=agent.id)
    assert stats["wasted_cost_usd"] == Decimal("8.70")
    assert (stats["total_tasks"], stats["failed"], stats["success_rate"]) == (1, 1, 50)


def test_agent_stats_is_one_query(stats_data: None, django_assert_num_queries) -> None:
    with django_assert_num_queries(1):
        agent_stats(agent_id="akira-001")


def test_agent_stats_rejects_an_empty_window(now: dt.datetime) -> None:
    with pytest.raises(ValueError, match="must be after since"):
        agent_stats(agent_id="akira-001", since=now, until=now)


@pytest.fixture
def history(now: dt.datetime) -> list[TaskExecution]:
    """25 tasks of agent akira one minute apart (inserted oldest-last), interleaved with
    tasks of another agent; returns akira's tasks newest first."""
    akira = AgentFactory(id="akira-001")
    other = AgentFactory(id="yuki-002")
    workflow = WorkflowFactory()
    tasks = []
    for minutes in range(25):
        tasks.append(make_task(agent=akira, workflow=workflow, created_at=now - dt.timedelta(minutes=minutes)))
        make_task(agent=other, created_at=now - dt.timedelta(minutes=minutes, seconds=30))
    return tasks


def test_recent_tasks_are_the_newest_twenty_of_the_agent(history: list[TaskExecution]) -> None:
    tasks = list(agent_recent_tasks(agent_id="akira-001"))

    assert [task.pk for task in tasks] == [task.pk for task in history[:20]]
    assert {task.agent_id for task in tasks} == {"akira-001"}


def test_recent_tasks_honour_the_limit(history: list[TaskExecution]) -> None:
    assert [task.pk for task in agent_recent_tasks(agent_id="akira-001", limit=3)] == [t.pk for t in history[:3]]


def test_recent_tasks_break_created_at_ties_by_newest_id(now: dt.datetime) -> None:
    agent = AgentFactory()
    first, second = (make_task(agent=agent, created_at=now) for _ in range(2))

    assert [task.pk for task in agent_recent_tasks(agent_id=agent.id)] == sorted([first.pk, second.pk], reverse=True)


def test_recent_tasks_come_with_workflow_and_agent(history: list[TaskExecution], django_assert_num_queries) -> None:
    with django_assert_num_queries(1):
        tasks = list(agent_recent_tasks(agent_id="akira-001", limit=5))
        names = {(task.workflow.name, task.agent.name) for task in tasks}

    assert names == {(history[0].workflow.name, history[0].agent.name)}


def test_recent_tasks_query_uses_the_agent_created_index() -> None:
    """2000 tasks in time order, 5% of them akira's. On a small, freshly loaded table the
    planner weighs a scan of idx_tasks_created_at (heap in the same order) against the agent
    index by page costs, so they are set as for data in cache / on SSD."""
    akira = AgentFactory(id="akira-001")
    others = [AgentFactory() for _ in range(9)]
    start = timezone.now() - dt.timedelta(hours=1)
    TaskExecution.objects.bulk_create(
        TaskExecution(
            agent=akira if i % 20 == 0 else others[i % 9],
            task_name=f"bulk-{i}",
            input_data={},
            created_at=start + dt.timedelta(seconds=i),
        )
        for i in range(2000)
    )
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE task_executions")
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute("SET LOCAL random_page_cost = 1.1")

    plan = agent_recent_tasks(agent_id="akira-001").explain()

    task_scans = [line for line in plan.splitlines() if "Scan" in line and " on task_executions " in line]
    assert len(task_scans) == 1, plan
    assert "idx_tasks_agent_created" in task_scans[0] or "idx_tasks_agent_status" in task_scans[0], plan


@pytest.fixture
def workflow_data(now: dt.datetime) -> tuple[str, list[TaskExecution]]:
    """A workflow with three tasks (inserted out of order, two created in the same instant),
    and another workflow with a task of its own. Returns the id and the tasks in order."""
    workflow = WorkflowFactory(name="review", state_data={"step": 2}, tags=["nightly"], total_cost_usd="0.75")
    agent = AgentFactory()
    third = make_task(workflow=workflow, agent=agent, task_name="c", created_at=now)
    tied = [
        make_task(
            workflow=workflow,
            agent=agent,
            task_name=name,
            status=Status.COMPLETED,
            input_data={"n": n, "nested": {"x": [1.5, None]}},
            output_data={"ok": True},
            execution_time_ms=12.25,
            tokens_used=40,
            cost_usd=Decimal("0.001234"),
            created_at=now - dt.timedelta(seconds=5),
        )
        for n, name in enumerate(["a", "b"])
    ]
    make_task(workflow=WorkflowFactory(), agent=agent, task_name="elsewhere", created_at=now)
    return workflow.pk, [*sorted(tied, key=lambda task: task.pk), third]


def test_workflow_with_tasks_returns_the_workflow_columns(workflow_data: tuple[str, list[TaskExecution]]) -> None:
    workflow_id, _ = workflow_data

    result = workflow_with_tasks(workflow_id=workflow_id)

    assert result is not None
    assert result["workflow_id"] == workflow_id
    assert (result["name"], result["state_data"], result["tags"]) == ("review", {"step": 2}, ["nightly"])
    assert result["total_cost_usd"] == Decimal("0.75")
    assert {key: value for key, value in result.items() if key != "tasks"} == (
        Workflow.objects.values().get(pk=workflow_id)
    )


def test_workflow_with_tasks_lists_its_tasks_in_order(workflow_data: tuple[str, list[TaskExecution]]) -> None:
    workflow_id, tasks = workflow_data

    result = workflow_with_tasks(workflow_id=workflow_id)

    assert result is not None
    assert [task["execution_id"] for task in result["tasks"]] == [task.pk for task in tasks]
    first = result["tasks"][0]
    assert set(first) == {field.attname for field in TaskExecution._meta.concrete_fields}
    assert first["workflow_id"] == workflow_id
    assert first["agent_id"] == tasks[0].agent_id
    assert first["created_at"] == tasks[0].created_at
    assert first["input_data"] == {"n": tasks[0].input_data["n"], "nested": {"x": [1.5, None]}}
    assert first["output_data"] == {"ok": True}
    assert (first["execution_time_ms"], first["tokens_used"]) == (12.25, 40)
    assert (type(first["cost_usd"]), str(first["cost_usd"])) == (Decimal, "0.001234")
    assert (first["status"], first["parent_task_id"], first["error"]) == ("completed", None, None)


def test_workflow_with_tasks_matches_the_orm_values(workflow_data: tuple[str, list[TaskExecution]]) -> None:
    workflow_id, _ = workflow_data

    result = workflow_with_tasks(workflow_id=workflow_id)

    assert result is not None
    expected = TaskExecution.objects.filter(workflow_id=workflow_id).order_by("created_at", "execution_id").values()
    assert result["tasks"] == list(expected)
    assert [str(task["cost_usd"]) for task in result["tasks"]] == ["0.001234", "0.001234", "0.000000"]


def test_workflow_with_tasks_is_one_query(
    workflow_data: tuple[str, list[TaskExecution]], django_assert_num_queries
) -> None:
    with django_assert_num_queries(1):
        workflow_with_tasks(workflow_id=workflow_data[0])


def test_workflow_without_tasks_has_an_empty_list() -> None:
    workflow = WorkflowFactory()

    result = workflow_with_tasks(workflow_id=workflow.pk)

    assert result is not None
    assert (result["workflow_id"], result["tasks"]) == (workflow.pk, [])


def test_unknown_workflow_is_none() -> None:
    WorkflowFactory()

    assert workflow_with_tasks(workflow_id="no-such-workflow") is None
