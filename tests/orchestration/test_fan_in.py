"""A fan-in's parents: each one's completion checks the dependent's other parents in the
database, in the statement that finds its dependents, instead of reading the dependent's
whole depends_on into Python and sending every other parent's name back (16 ms a completion at
500 parents, 21 ms at 2 000: the square of the parents in all)."""

from __future__ import annotations

from unittest import mock

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from orchestration.models import Event, TaskExecution, Workflow
from orchestration.runtime.context import AgentResult
from orchestration.services import dispatch
from orchestration.services.execution import attempt_claim, attempt_succeed
from orchestration.services.workflows import workflow_submit
from tests.orchestration.test_fastpath import committed_agents  # noqa: F401 (a fixture)

T = TaskExecution.Status


def submit(*tasks: dict, **fields: object) -> Workflow:
    with mock.patch.object(dispatch, "dispatch_send"):
        workflow, _ = workflow_submit(spec={"name": "fan-in", **fields, "tasks": list(tasks)})
    return workflow


def run(workflow: Workflow, name: str) -> list[dict]:
    """Claim the queued task `name` in-process and complete it; returns the statements its
    record sent."""
    task = TaskExecution.objects.get(workflow=workflow, task_name=name)
    with mock.patch.object(dispatch, "dispatch_send"), mock.patch.object(dispatch, "revoke_after_commit"):
        claim = attempt_claim(execution_id=task.pk, celery_task_id=task.celery_task_id, worker="w")
        with CaptureQueriesContext(connection) as queries:
            assert attempt_succeed(
                attempt=claim.attempt, result=AgentResult(output={}), duration_ms=1.0, now=timezone.now()
            )
    return queries.captured_queries


def statuses(workflow: Workflow) -> dict[str, str]:
    return dict(TaskExecution.objects.filter(workflow=workflow).values_list("task_name", "status"))


@pytest.fixture(params=[True, False], ids=["fast-path", "general-path"])
def path(request, committed_agents, settings):  # noqa: F811
    settings.ENGINE_FAST_PATH = request.param
    return request.param


def test_a_fan_in_is_queued_by_its_last_parent_once(path):
    wf = submit(
        *({"name": f"p{i}", "agent": "echo"} for i in range(4)),
        {"name": "other", "agent": "echo"},
        {"name": "j", "agent": "echo", "depends_on": ["p0", "p1", "p2", "p3"]},
        {"name": "k", "agent": "echo", "depends_on": ["p3", "other"]},
    )
    for i in range(3):
        run(wf, f"p{i}")
        assert statuses(wf)["j"] == T.PENDING
    run(wf, "p3")
    assert (statuses(wf)["j"], statuses(wf)["k"]) == (T.QUEUED, T.PENDING)
    run(wf, "other")
    assert statuses(wf)["k"] == T.QUEUED
    j = TaskExecution.objects.get(workflow=wf, task_name="j")
    assert Event.objects.filter(entity_id=j.pk, event_type="task_queued").count() == 1


def test_a_parents_completion_sends_no_other_parents_names(committed_agents, settings):  # noqa: F811
    """What a parent's completion sends does not grow with the fan-in's other parents: it read
    the dependent's whole depends_on and sent every other parent's name back (task_name IN
    (...)), for each parent."""
    settings.ENGINE_FAST_PATH = True
    names = [f"p{i:03d}" for i in range(60)]
    wf = submit(*({"name": n, "agent": "echo"} for n in names), {"name": "j", "agent": "echo", "depends_on": names})
    sent = run(wf, "p000")
    assert not [q["sql"] for q in sent if "p001" in q["sql"]]
    assert statuses(wf)["j"] == T.PENDING
