"""The role x endpoint x method matrix (seed 004's roles), plus callers with no role and
without credentials. The developer owns the workflow, task and conversation used here, so
the viewer's reads of them are 404s (not theirs), and the viewer's writes are 403s. Agents
are changed on one created through the API (A): the file-defined `echo` is a 409 to admins.
Exports (X, a pending run) are admins' only."""

from __future__ import annotations

from typing import Any

import pytest

from orchestration.models import Agent, TaskExecution
from orchestration.services.agent_registry import agent_create
from orchestration.services.conversations import conversation_message_post
from tests.api.conftest import SPEC
from tests.factories import ExportRunFactory
from training_export.models import ExportRun

AGENT = {"id": "matrix-001", "name": "Matrix", "executor": "python", "entrypoint": "orchestration.runtime.builtin.echo"}
EXPORT = {"data_type": "events", "start_date": "2024-03-05", "end_date": "2024-03-05"}

# (method, path, body, {role: status}); W, T and C are the developer's workflow, task and
# thread, A an agent created through the API, X an export run still pending.
MATRIX: list[tuple[str, str, Any, dict[str, int]]] = [
    ("get", "/api/v1/workflows/", None, {"admin": 200, "developer": 200, "viewer": 200}),
    ("post", "/api/v1/workflows/", SPEC, {"admin": 201, "developer": 201, "viewer": 403}),
    ("get", "/api/v1/workflows/W/", None, {"admin": 200, "developer": 200, "viewer": 404}),
    ("get", "/api/v1/workflows/W/events/", None, {"admin": 200, "developer": 200, "viewer": 404}),
    ("post", "/api/v1/workflows/W/cancel/", {}, {"admin": 200, "developer": 200, "viewer": 403}),
    ("post", "/api/v1/workflows/W/retry/", None, {"admin": 409, "developer": 409, "viewer": 403}),
    ("get", "/api/v1/tasks/", None, {"admin": 200, "developer": 200, "viewer": 200}),
    ("get", "/api/v1/tasks/T/", None, {"admin": 200, "developer": 200, "viewer": 404}),
    ("post", "/api/v1/tasks/T/cancel/", {}, {"admin": 200, "developer": 200, "viewer": 403}),
    ("post", "/api/v1/tasks/T/retry/", None, {"admin": 409, "developer": 409, "viewer": 403}),
    ("get", "/api/v1/events/", None, {"admin": 200, "developer": 200, "viewer": 200}),
    ("get", "/api/v1/agents/", None, {"admin": 200, "developer": 200, "viewer": 200}),
    ("get", "/api/v1/agents/echo/", None, {"admin": 200, "developer": 200, "viewer": 200}),
    ("get", "/api/v1/agents/echo/stats/", None, {"admin": 200, "developer": 200, "viewer": 200}),
    ("post", "/api/v1/agents/", AGENT, {"admin": 201, "developer": 403, "viewer": 403}),
    ("patch", "/api/v1/agents/A/", {"description": "d"}, {"admin": 200, "developer": 403, "viewer": 403}),
    (
        "put",
        "/api/v1/agents/A/",
        {k: v for k, v in AGENT.items() if k != "id"},
        {"admin": 200, "developer": 403, "viewer": 403},
    ),
    ("post", "/api/v1/agents/A/deactivate/", None, {"admin": 200, "developer": 403, "viewer": 403}),
    ("patch", "/api/v1/agents/echo/", {"description": "d"}, {"admin": 409, "developer": 403, "viewer": 403}),
    ("post", "/api/v1/agents/echo/deactivate/", None, {"admin": 409, "developer": 403, "viewer": 403}),
    ("get", "/api/v1/conversations/C/messages/", None, {"admin": 200, "developer": 200, "viewer": 403}),
    (
        "post",
        "/api/v1/conversations/new-thread/messages/",
        {"agent": "echo", "content": "hi"},
        {"admin": 202, "developer": 202, "viewer": 403},
    ),
    ("get", "/api/v1/me/", None, {"admin": 200, "developer": 200, "viewer": 200}),
    ("get", "/api/v1/me/spend/", None, {"admin": 200, "developer": 200, "viewer": 200}),
    ("get", "/api/v1/exports/", None, {"admin": 200, "developer": 403, "viewer": 403}),
    ("get", "/api/v1/exports/X/", None, {"admin": 200, "developer": 403, "viewer": 403}),
    ("get", "/api/v1/exports/X/download/", None, {"admin": 409, "developer": 403, "viewer": 403}),
    ("post", "/api/v1/exports/", EXPORT, {"admin": 202, "developer": 403, "viewer": 403}),
]
CASES = [
    pytest.param(method, path, body, role, expected.get(role), id=f"{role}-{method}-{path}")
    for method, path, body, expected in MATRIX
    for role in ("admin", "developer", "viewer", "norole", "anonymous")
]


@pytest.fixture
def owned(callers, submit) -> dict[str, str]:
    workflow_id = submit(callers["developer"]).json()["workflow_id"]
    task_id = TaskExecution.objects.get(workflow_id=workflow_id).pk
    conversation_message_post(
        agent=Agent.objects.get(pk="echo"), instance_id="dev-thread", content="hello", owner=callers["developer"].user
    )
    agent_create(fields={k: v for k, v in AGENT.items() if k != "id"} | {"id": "api-made"})
    export = ExportRunFactory(status=ExportRun.Status.PENDING)
    return {"W": workflow_id, "T": task_id, "C": "dev-thread", "A": "api-made", "X": str(export.pk)}


@pytest.mark.parametrize("method, path, body, role, expected", CASES)
def test_role_matrix(callers, anonymous, owned, method, path, body, role, expected):
    for placeholder, value in owned.items():
        path = path.replace(f"/{placeholder}/", f"/{value}/")
    client = anonymous if role == "anonymous" else callers[role].client
    response = getattr(client, method)(path, body, format="json")
    if role == "anonymous":
        expected = 401
    elif role == "norole":
        expected = 403
    assert response.status_code == expected, response.content
    if expected >= 400:
        assert response["Content-Type"] == "application/problem+json"
        assert response.json()["status"] == expected


def test_a_viewer_changes_nothing(callers, owned):
    viewer = callers["viewer"].client
    for method, path, body, _ in MATRIX:
        if method == "get":
            continue
        for placeholder, value in owned.items():
            path = path.replace(f"/{placeholder}/", f"/{value}/")
        assert getattr(viewer, method)(path, body, format="json").status_code == 403, path
    assert TaskExecution.objects.get(pk=owned["T"]).status == "queued"
    assert Agent.objects.get(pk="echo").status == "active"
    assert Agent.objects.get(pk="api-made").status == "active"
    assert ExportRun.objects.count() == 1
