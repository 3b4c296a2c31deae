"""`succeed_alone` (one autocommitted statement) racing another connection driven by hand:
the record stays exact whichever commits first."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from django.db import connections
from django.utils import timezone

from orchestration.ids import new_id
from orchestration.models import Event, TaskExecution, Workflow
from orchestration.services import fastpath
from tests.orchestration.test_fastpath import _claimed, _succeed, committed_agents  # noqa: F401 (a fixture)
from tests.pg import other_connection

pytestmark = pytest.mark.usefixtures("committed_agents")


def succeed_params(attempt_id: int) -> dict[str, Any]:
    return {
        "attempt_id": attempt_id,
        "output": json.dumps({"ok": 2}),
        "duration_ms": 1.0,
        "duration_rounded": 1.0,
        "input_tokens": 1,
        "output_tokens": 2,
        "tokens": 3,
        "cost": Decimal("0.01"),
        "now": timezone.now(),
        "event_id": new_id(),
    }


def in_thread(function: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = function()
        except BaseException as exc:
            box["error"] = exc
        finally:
            connections.close_all()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, box


def assert_consistent(workflow_id: str) -> Workflow:
    workflow = Workflow.objects.get(pk=workflow_id)
    statuses = list(TaskExecution.objects.filter(workflow_id=workflow_id).values_list("status", flat=True))
    events = list(Event.objects.filter(workflow_id=workflow_id).values_list("event_type", flat=True))
    assert workflow.completed_steps == statuses.count("completed") == events.count("task_completed")
    return workflow


@pytest.mark.parametrize("first", ["transaction", "one statement"])
def test_the_last_two_tasks_finishing_at_once_complete_the_workflow_once(first):
    claims = _claimed(["a", "b"])
    assert claims["a"].standalone and claims["b"].standalone
    other = other_connection()
    other.execute("BEGIN")
    sql = fastpath.SUCCEED_SQL if first == "transaction" else fastpath.SUCCEED_ALONE_SQL
    other.execute(sql, succeed_params(claims["b"].attempt.pk))  # holds the workflow row
    thread, box = in_thread(lambda: _succeed(claims["a"], standalone=True))
    time.sleep(0.5)  # usually blocked on the workflow row by now; correct either way
    other.execute("COMMIT")
    thread.join(20)
    assert box == {"result": True}
    workflow = assert_consistent(claims["a"].context.workflow_id)
    assert (workflow.status, workflow.completed_steps) == ("completed", 2)
    assert Event.objects.filter(workflow_id=workflow.pk, event_type="workflow_completed").count() == 1


def test_an_attempt_the_reaper_closed_first_records_nothing():
    claims = _claimed(["a", "b", "c"])
    attempt = claims["a"].attempt
    other = other_connection()
    other.execute("BEGIN")
    other.execute("UPDATE task_attempts SET status = 'lost', finished_at = now() WHERE id = %s", [attempt.pk])
    other.execute("UPDATE task_executions SET status = 'retrying' WHERE execution_id = %s", [attempt.execution_id])
    thread, box = in_thread(lambda: _succeed(claims["a"], standalone=True))
    time.sleep(0.5)
    other.execute("COMMIT")
    thread.join(20)
    assert box == {"result": False}
    workflow = assert_consistent(claims["a"].context.workflow_id)
    assert TaskExecution.objects.get(pk=attempt.execution_id).status == "retrying"
    assert workflow.completed_steps == 0
