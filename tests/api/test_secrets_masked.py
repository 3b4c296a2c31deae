"""The API answers users about their own records, but never with the deployment's credentials:
a provider's error that quotes the key it was sent (an agent's `api_key_env` value), stored in
an attempt's error and traceback, the task's and workflow's error and the events, comes out
masked, as the console and the training files show it. Everything else stays as written,
their own tokens and e-mail addresses included."""

from __future__ import annotations

import json
from unittest import mock

import pytest
from django.utils import timezone

from orchestration.models import Agent, Event, TaskAttempt, TaskExecution, Workflow
from orchestration.services import dispatch
from orchestration.services.workflows import workflow_submit
from training_export.services.redaction import MASK, configured_secret_values

KEY = "acme-live-7Qf9Zx2LmN4pR8sT"
ERROR = f'401 Unauthorized: {{"error": "Incorrect API key provided: {KEY}"}}'


@pytest.fixture
def leaked(callers, monkeypatch) -> Workflow:
    """A developer's workflow whose task failed with the provider's answer quoting the key of
    the agent it ran (an agent of the table: no definition file names its variable)."""
    monkeypatch.setenv("ACME_API_KEY", KEY)
    Agent.objects.filter(pk="echo").update(api_key_env="ACME_API_KEY")
    configured_secret_values(refresh=True)
    with mock.patch.object(dispatch, "dispatch_send"):
        workflow, _ = workflow_submit(
            spec={
                "name": "leak",
                "tasks": [{"name": "a", "agent": "echo", "input": {"mine": "me@example.com sk-mine"}}],
            },
            owner=callers["developer"].user,
        )
    task = TaskExecution.objects.get(workflow=workflow)
    now = timezone.now()
    TaskAttempt.objects.create(
        execution=task,
        attempt_number=1,
        status="failed",
        error_class="ProviderError",
        error=ERROR,
        traceback=f"Traceback (most recent call last):\n  ...\nProviderError: {ERROR}\n",
        started_at=now,
        finished_at=now,
    )
    TaskExecution.objects.filter(pk=task.pk).update(status="failed", error=ERROR)
    Workflow.objects.filter(pk=workflow.pk).update(status="failed", error=f"task a failed: {ERROR}")
    Event.objects.create(
        event_type="task_failed",
        entity_type="task",
        entity_id=task.pk,
        workflow_id=workflow.pk,
        payload={"error": ERROR},
    )
    return workflow


@pytest.mark.parametrize("caller", ["developer", "admin"])
def test_an_agent_s_key_quoted_in_an_error_is_masked_in_every_answer(leaked, callers, caller):
    client = callers[caller].client
    task_id = TaskExecution.objects.get(workflow=leaked).pk
    pages = [
        f"/api/v1/workflows/{leaked.pk}/",
        f"/api/v1/tasks/?workflow={leaked.pk}",
        f"/api/v1/tasks/{task_id}/",
        f"/api/v1/workflows/{leaked.pk}/events/",
        f"/api/v1/events/?workflow={leaked.pk}",
    ]
    for page in pages:
        response = client.get(page)
        assert response.status_code == 200, (page, response.content[:300])
        body = response.content.decode()
        assert KEY not in body, page
        assert f"Incorrect API key provided: {MASK}" in body, page
        json.loads(body)  # still a JSON document
        # The browsable API's HTML, and an indented document, mask it too.
        assert KEY not in client.get(page, HTTP_ACCEPT="application/json; indent=2").content.decode(), page
        assert KEY not in client.get(page, HTTP_ACCEPT="text/html").content.decode(), page
    attempt = client.get(f"/api/v1/tasks/{task_id}/").json()["attempts"][0]
    assert attempt["traceback"].endswith(
        f'ProviderError: 401 Unauthorized: {{"error": "Incorrect API key provided: {MASK}"}}\n'
    )
    # The user's own input is theirs, as written: no pattern is applied, only the secret values.
    task = client.get(f"/api/v1/tasks/{task_id}/").json()
    assert task["input_data"] == {"mine": "me@example.com sk-mine"}


def test_an_answer_without_a_secret_is_rendered_once(callers, leaked):
    """The check is a few byte searches of the rendered document; the data are masked and
    rendered again only when one of the values is in it."""
    from training_export.services import redaction

    with mock.patch.object(redaction, "secrets_masked", wraps=redaction.secrets_masked) as masked:
        assert callers["developer"].client.get("/api/v1/me/").status_code == 200
        assert masked.call_count == 0
        assert callers["developer"].client.get(f"/api/v1/workflows/{leaked.pk}/").status_code == 200
        assert masked.call_count == 1


def test_a_secret_the_encoder_spells_from_a_value_masking_does_not_walk_is_masked_too(db, settings):
    """The renderer's encoder spells more than dicts, lists and strings (a set or a generator as
    a list, a lazy string, bytes): the check found the value in the document, but the data,
    masked and rendered again, still held it there, or had nothing left to render (a generator
    is consumed by the first rendering)."""
    from django.utils.functional import lazy

    from orchestration.api.renderers import FastJSONRenderer

    settings.SECRET_KEY = secret = "renderer-secret-9Xq2Lm7Vb4"
    assert secret in configured_secret_values()
    renderer = FastJSONRenderer()
    for data, expected in [
        ({"set": {f"is {secret}"}}, {"set": [f"is {MASK}"]}),
        ({"lazy": lazy(lambda: f"is {secret}", str)()}, {"lazy": f"is {MASK}"}),
        ({"bytes": f"is {secret}".encode()}, {"bytes": f"is {MASK}"}),
        ({"gen": (f"is {secret}" for _ in range(2)), "n": 1}, {"gen": [f"is {MASK}"] * 2, "n": 1}),
    ]:
        for media_type in ("application/json", "application/json; indent=2"):
            content = renderer.render(data, media_type, {})
            assert secret.encode() not in content, content
            assert json.loads(content) == expected, content
            if "gen" in data:
                break  # consumed
