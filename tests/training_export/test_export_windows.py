"""Consecutive daily windows export each row once, for every data type: a task or workflow that
ends, is resumed and ends again on a later day is in each day's file with that day's ending."""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from decimal import Decimal
from pathlib import Path

from orchestration.event_types import EventType
from orchestration.models import TaskExecution, Workflow
from tests.factories import AgentFactory, EventFactory, TaskExecutionFactory, WorkflowFactory
from training_export.services.export import export_run

DAYS = [dt.date(2024, 3, 5) + dt.timedelta(days=n) for n in range(4)]


def noon(day: dt.date, seconds: int = 0) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(12), tzinfo=dt.UTC) + dt.timedelta(seconds=seconds)


def export_day(data_type: str, day: dt.date) -> list[dict]:
    run = export_run(data_type=data_type, start_date=day, end_date=day)
    return [json.loads(line) for line in Path(run.path).read_text("utf-8").splitlines()] if run.rows else []


def test_consecutive_windows_export_each_ending_of_every_type_once(db, out):
    agent = AgentFactory()
    workflow = WorkflowFactory(status=Workflow.Status.RUNNING, started_at=noon(DAYS[0]))
    done = TaskExecutionFactory(workflow=workflow, agent=agent, task_name="done")
    flaky = TaskExecutionFactory(workflow=workflow, agent=agent, task_name="flaky")
    # The first day: one task completes, the other fails, and the workflow with it.
    TaskExecution.objects.filter(pk=done.pk).update(
        status="completed", output_data={"ok": 1}, completed_at=noon(DAYS[0]), tokens_used=5
    )
    TaskExecution.objects.filter(pk=flaky.pk).update(
        status="failed", error="boom", completed_at=noon(DAYS[0], 1), tokens_used=7, cost_usd=Decimal("0.01")
    )
    Workflow.objects.filter(pk=workflow.pk).update(status="failed", completed_at=noon(DAYS[0], 2))
    for n, day in enumerate(DAYS):
        EventFactory(event_type=EventType.TOOL_EXECUTED, entity_type="tool", created_at=noon(day), payload={"n": n})
        EventFactory(event_type=EventType.AGENT_STARTED, created_at=noon(day, 1), payload={"n": n})
    # A midnight boundary: the last instant of a day and the first of the next.
    EventFactory(event_type=EventType.AGENT_STARTED, created_at=noon(DAYS[2]) + dt.timedelta(hours=12))
    EventFactory(event_type=EventType.AGENT_STARTED, created_at=noon(DAYS[2]) + dt.timedelta(hours=12, microseconds=-1))

    files: dict[str, list[dict]] = {data_type: [] for data_type in ("events", "tool_executions", "tasks", "workflows")}
    for data_type in files:
        files[data_type] += export_day(data_type, DAYS[0])
    # Resumed on the second day (as workflow_resume: the failed task pending again, its
    # completed_at cleared), and completed: its second ending, a day later.
    TaskExecution.objects.filter(pk=flaky.pk).update(status="pending", error=None, completed_at=None, retry_count=0)
    Workflow.objects.filter(pk=workflow.pk).update(status="running", completed_at=None, failed_steps=0)
    TaskExecution.objects.filter(pk=flaky.pk).update(
        status="completed", output_data={"ok": 2}, completed_at=noon(DAYS[1]), tokens_used=12
    )
    Workflow.objects.filter(pk=workflow.pk).update(status="completed", completed_at=noon(DAYS[1], 1))
    for day in DAYS[1:]:
        for data_type in files:
            files[data_type] += export_day(data_type, day)

    for data_type in ("events", "tool_executions"):
        counts = Counter(record["event_id"] for record in files[data_type])
        assert set(counts.values()) == {1}, data_type
    assert len(files["events"]) == 2 * len(DAYS) + 2 and len(files["tool_executions"]) == len(DAYS)
    # Tasks and workflows: a row per ending, each in the file of its day, none twice.
    endings = Counter((r["execution_id"], r["status"], r["completed_at"]) for r in files["tasks"])
    assert endings == {
        (done.pk, "completed", noon(DAYS[0]).isoformat()): 1,
        (flaky.pk, "failed", noon(DAYS[0], 1).isoformat()): 1,
        (flaky.pk, "completed", noon(DAYS[1]).isoformat()): 1,
    }
    trained = [r["output_data"] for r in files["tasks"] if r["status"] == "completed"]
    assert sorted(trained, key=json.dumps) == [{"ok": 1}, {"ok": 2}], "each completed output once"
    assert [(r["status"], r["completed_at"]) for r in files["workflows"]] == [
        ("failed", noon(DAYS[0], 2).isoformat()),
        ("completed", noon(DAYS[1], 1).isoformat()),
    ]
