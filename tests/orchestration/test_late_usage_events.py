"""Spend paid after an attempt was closed without a result, on a real worker: every cent the
meter adds to the attempt, its task and its workflow is explained by an event (the events table
is the record the training files are made from), written in the transaction that adds it."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from orchestration.models import Agent, Event, TaskAttempt, TaskExecution, Workflow
from orchestration.services.workflows import workflow_cancel, workflow_submit
from tests.engine import longer_hard_grace, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

A = TaskAttempt.Status


def _explained(task: TaskExecution) -> tuple[Decimal, Decimal, Decimal]:
    """What the events say the task, its workflow and the workflow's wasted spend cost: the
    `state` their ending recorded, plus the late usage recorded after it."""
    events = list(Event.objects.filter(workflow_id=task.workflow_id).order_by("sequence"))
    [task_end] = [e for e in events if e.entity_id == task.pk and "state" in e.payload]
    [workflow_end] = [e for e in events if e.entity_type == "workflow" and "state" in e.payload]
    late = [e for e in events if e.entity_id == task.pk and "late_usage" in e.payload]
    late_cost = sum((Decimal(e.payload["late_usage"]["cost_usd"]) for e in late), Decimal(0))
    wasted = sum(
        (Decimal(e.payload["late_usage"]["cost_usd"]) for e in late if e.payload["closed_as"] != A.CANCELLED),
        Decimal(0),
    )
    return (
        Decimal(task_end.payload["state"]["cost_usd"]) + late_cost,
        Decimal(workflow_end.payload["state"]["total_cost_usd"]) + late_cost,
        Decimal(workflow_end.payload["state"]["wasted_cost_usd"]) + wasted,
    )


@pytest.mark.parametrize("closed", ["cancelled", "timed_out"])
def test_spend_metered_after_the_attempt_was_closed_is_recorded_in_an_event(engine, tmp_path: Path, settings, closed):
    """The agent's second round is paid (metered) after its attempt was closed: cancelled by a
    user while its pool (threads) runs it on, or timed out at its soft limit while a thread of
    its own waits for the answer. The meter added it to the attempt, the task and the workflow,
    but no event said so (the try's task_ended_late adds only what exceeds the row, here
    nothing): the events, and the workflows file made from them, were $0.0113 short."""
    Agent.objects.create(
        id="late-payer",
        name="Late payer",
        executor=Agent.Executor.PYTHON,
        entrypoint="tests.orchestration.edge_agents.paid_after_its_close",
    )
    release = tmp_path / "release"
    spec = {"name": "t", "agent": "late-payer", "input": {"release": str(release)}, "max_retries": 0}
    if closed == "cancelled":
        engine(pool="threads")  # a revoke's terminate does not stop a thread: the try runs on
    else:
        engine(env=longer_hard_grace(settings))
        spec = {**spec, "input": {**spec["input"], "in_thread": True}, "timeout_seconds": 1}
    workflow, _ = workflow_submit(spec={"name": "late", "tasks": [spec]})
    task = TaskExecution.objects.get(workflow=workflow)
    wait_for(
        lambda: TaskAttempt.objects.filter(execution=task, status=A.RUNNING, tokens_used=10).exists(),
        what="the first round to be metered",
    )
    if closed == "cancelled":
        workflow_cancel(workflow_id=workflow.pk)
    wait_for(lambda: Workflow.objects.get(pk=workflow.pk).is_terminal, timeout=30, what="the workflow to end")
    release.touch()
    wait_for(
        lambda: TaskAttempt.objects.filter(execution=task, tokens_used=120).exists(),
        timeout=30,
        what="the second round to be metered",
    )
    if closed == "cancelled":
        wait_for(
            lambda: Event.objects.filter(entity_id=task.pk, event_type="task_ended_late").exists(),
            timeout=30,
            what="the try to end",
        )
    attempt = TaskAttempt.objects.get(execution=task)
    task.refresh_from_db()
    workflow.refresh_from_db()
    assert (attempt.status, attempt.tokens_used, attempt.cost_usd) == (closed, 120, Decimal("0.0123"))
    wasted = Decimal("0.0123") if closed == "timed_out" else Decimal(0)
    assert (task.cost_usd, workflow.total_cost_usd, workflow.wasted_cost_usd) == (
        Decimal("0.0123"),
        Decimal("0.0123"),
        wasted,
    )
    [paid] = Event.objects.filter(entity_id=task.pk, event_type="task_paid_late")
    assert (paid.payload["attempt"], paid.payload["closed_as"], paid.severity) == (1, closed, "warning")
    assert paid.payload["late_usage"] == {"input_tokens": 90, "output_tokens": 20, "cost_usd": "0.011300"}
    assert _explained(task) == (task.cost_usd, workflow.total_cost_usd, workflow.wasted_cost_usd)
