"""workflow_resume and the completion of a task a sibling's failure left running: the
workflow waits for that task before it is failed, so the two cannot race."""

from __future__ import annotations

import pytest
from django.utils import timezone

from orchestration.errors import PermanentError, TransitionError
from orchestration.models import TaskExecution, Workflow
from orchestration.services.execution import attempt_claim, attempt_fail
from orchestration.services.workflows import workflow_resume, workflow_submit
from tests.orchestration.test_fastpath import _succeed, committed_agents  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("committed_agents")


def _claim(workflow: Workflow, name: str):
    task = TaskExecution.objects.get(workflow=workflow, task_name=name)
    return attempt_claim(execution_id=task.pk, celery_task_id=task.celery_task_id, worker="w1")


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "general-path"])
def test_a_workflow_stopping_at_a_failure_resumes_only_once_its_running_task_has_ended(settings, fast_path):
    """A resume can never race the completion of a task a failure left running: the workflow
    stays running (stopping) until that task ends, and only then is failed and resumable."""
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
    stopping = Workflow.objects.get(pk=workflow.pk)
    assert stopping.status == Workflow.Status.RUNNING and "task bad failed" in stopping.error
    assert TaskExecution.objects.get(workflow=workflow, task_name="after_b").status == "cancelled"
    with pytest.raises(TransitionError, match="only a failed or cancelled one resumes"):
        workflow_resume(workflow_id=workflow.workflow_id)

    assert _succeed(b) is True
    assert Workflow.objects.get(pk=workflow.pk).status == Workflow.Status.FAILED
    workflow_resume(workflow_id=workflow.workflow_id)
    after_b = TaskExecution.objects.get(workflow=workflow, task_name="after_b")
    assert after_b.status == TaskExecution.Status.QUEUED  # b completed: its dependent runs now
