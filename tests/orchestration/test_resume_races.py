"""workflow_resume racing the completion of a task a sibling's failure left running: the
completion's statement starts before the resume commits and waits for the workflow row."""

from __future__ import annotations

import threading
import time

import pytest
from django.db import connection, transaction
from django.utils import timezone

from orchestration.errors import PermanentError
from orchestration.models import TaskExecution, Workflow
from orchestration.services.execution import attempt_claim, attempt_fail
from orchestration.services.workflows import workflow_resume, workflow_submit
from tests.orchestration.test_fastpath import _succeed, committed_agents  # noqa: F401 (a fixture)
from tests.orchestration.test_fastpath_races import in_thread
from tests.pg import other_connection

pytestmark = pytest.mark.usefixtures("committed_agents")


def _claim(workflow: Workflow, name: str):
    task = TaskExecution.objects.get(workflow=workflow, task_name=name)
    return attempt_claim(execution_id=task.pk, celery_task_id=task.celery_task_id, worker="w1")


def _wait_for_a_lock_wait(timeout: float = 10) -> None:
    watcher = other_connection()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        waiting = watcher.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'",
            [connection.settings_dict["NAME"]],
        ).fetchone()[0]
        if waiting:
            return
        time.sleep(0.05)
    raise AssertionError("the completion never waited for the workflow row")


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "general-path"])
def test_a_completion_waiting_on_a_resume_queues_the_dependents_the_resume_made_pending(settings, fast_path):
    settings.ENGINE_FAST_PATH = fast_path
    workflow, _ = workflow_submit(
        spec={
            "name": "race",
            "tasks": [
                {"name": "b", "agent": "echo"},
                {"name": "after_b", "agent": "echo", "depends_on": ["b"]},
                {"name": "bad", "agent": "echo", "max_retries": 0},
            ],
        }
    )
    b, bad = _claim(workflow, "b"), _claim(workflow, "bad")
    attempt_fail(attempt=bad.attempt, exc=PermanentError("no"), duration_ms=1.0, now=timezone.now())
    assert Workflow.objects.get(pk=workflow.pk).status == Workflow.Status.FAILED
    assert TaskExecution.objects.get(workflow=workflow, task_name="b").status == "running"

    resumed, go = threading.Event(), threading.Event()

    def resume() -> None:
        with transaction.atomic():
            workflow_resume(workflow_id=workflow.workflow_id)
            resumed.set()
            assert go.wait(20)

    resumer, resume_box = in_thread(resume)
    assert resumed.wait(20)
    completer, complete_box = in_thread(lambda: _succeed(b))
    _wait_for_a_lock_wait()
    go.set()
    resumer.join(20)
    completer.join(20)
    assert "error" not in resume_box and complete_box == {"result": True}
    after_b = TaskExecution.objects.get(workflow=workflow, task_name="after_b")
    assert after_b.status == TaskExecution.Status.QUEUED  # not left pending: the workflow would never end
