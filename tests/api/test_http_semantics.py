"""What an HTTP client relies on beyond each endpoint's own answer: HEAD answers as GET does,
OPTIONS lists only the methods the caller may use, a list refuses a parameter it does not
read, the public schema costs one generation per format, and a download's ETag answers a
conditional GET."""

from __future__ import annotations

import hashlib

import pytest
from django.test import Client
from django.utils import timezone
from drf_spectacular.generators import SchemaGenerator

from orchestration.api.schema import CachedSchemaView
from orchestration.api.serializers import (
    AgentCreateSerializer,
    AgentUpdateSerializer,
    CancelSerializer,
    NoBodySerializer,
    WorkflowSpecSerializer,
)
from orchestration.models import Agent, AgentPlaygroundMessage, Workflow
from orchestration.services.conversations import conversation_message_post
from tests.api.conftest import SPEC, make_caller
from tests.factories import ExportRunFactory
from training_export.api.serializers import ExportRequestSerializer
from training_export.models import ExportRun


@pytest.fixture
def thread(callers) -> str:
    echo = Agent.objects.get(pk="echo")
    conversation_message_post(agent=echo, instance_id="dev-thread", content="hello", owner=callers["developer"].user)
    return "dev-thread"


@pytest.mark.parametrize(
    "path",
    ["/api/v1/me/", "/api/v1/me/spend/", "/api/v1/conversations/{thread}/messages/", "/api/v1/workflows/"],
)
def test_head_needs_what_get_needs(callers, thread, path):
    client = callers["developer"].client
    path = path.format(thread=thread)
    get = client.get(path)
    head = client.head(path)
    assert get.status_code == 200, get.content
    assert head.status_code == 200, head.content
    assert head.content == b""
    assert head["Content-Type"] == get["Content-Type"]


def test_head_is_refused_where_get_is(callers, thread):
    reader = make_caller("reader", "developer", permissions=["workflow:read"])
    assert reader.client.get(f"/api/v1/conversations/{thread}/messages/").status_code == 403
    assert reader.client.head(f"/api/v1/conversations/{thread}/messages/").status_code == 403
    assert callers["viewer"].client.head("/api/v1/exports/").status_code == 403


@pytest.mark.parametrize(
    "role, path, method, listed",
    [
        ("viewer", "/api/v1/workflows/", "POST", False),
        ("developer", "/api/v1/workflows/", "POST", True),
        ("developer", "/api/v1/agents/", "POST", False),
        ("developer", "/api/v1/agents/echo/", "PUT", False),
        ("admin", "/api/v1/agents/", "POST", True),
        ("admin", "/api/v1/agents/echo/", "PUT", True),
    ],
)
def test_options_lists_only_the_writes_the_caller_may_make(callers, role, path, method, listed):
    response = callers[role].client.options(path)
    assert response.status_code == 200, response.content
    assert (method in response.json().get("actions", {})) is listed


@pytest.mark.parametrize(
    "role, path, method, body",
    [
        ("developer", "/api/v1/workflows/", "POST", WorkflowSpecSerializer),
        ("developer", "/api/v1/workflows/{workflow}/cancel/", "POST", CancelSerializer),
        ("developer", "/api/v1/workflows/{workflow}/retry/", "POST", NoBodySerializer),
        ("developer", "/api/v1/tasks/{task}/cancel/", "POST", CancelSerializer),
        ("admin", "/api/v1/agents/", "POST", AgentCreateSerializer),
        ("admin", "/api/v1/agents/echo/", "PUT", AgentUpdateSerializer),
        ("admin", "/api/v1/agents/echo/deactivate/", "POST", NoBodySerializer),
        ("admin", "/api/v1/exports/", "POST", ExportRequestSerializer),
    ],
)
def test_options_describes_the_body_each_write_takes(callers, submit, role, path, method, body):
    """OPTIONS described a write by the serializer of its answer: `POST /workflows/` listed the
    workflow's fields, every one read-only, and no `tasks`; a cancel no `reason`; an export
    request `sha256` as a required field (which the request refuses)."""
    workflow = submit(callers["developer"]).json()["workflow_id"]
    task = callers["developer"].client.get(f"/api/v1/workflows/{workflow}/").json()["tasks"][0]["execution_id"]
    response = callers[role].client.options(path.format(workflow=workflow, task=task))
    assert response.status_code == 200, response.content
    described = response.json()["actions"][method]
    fields = body().fields
    assert set(described) == set(fields), sorted(described)
    for name, field in fields.items():
        assert described[name]["read_only"] is False, name
        assert described[name]["required"] is field.required, name


@pytest.mark.parametrize(
    "role, path",
    [
        ("developer", "/api/v1/workflows/"),
        ("developer", "/api/v1/workflows/{workflow}/"),
        ("admin", "/api/v1/agents/"),
        ("admin", "/api/v1/agents/echo/"),
        ("admin", "/api/v1/exports/"),
    ],
)
def test_the_browsable_api_renders_the_form_of_each_write_from_its_body(callers, submit, role, path):
    """The browsable API builds its forms as OPTIONS describes the writes (get_serializer)."""
    workflow = submit(callers["developer"]).json()["workflow_id"]
    response = callers[role].client.get(path.format(workflow=workflow), HTTP_ACCEPT="text/html")
    assert response.status_code == 200, response.content[:500]
    assert response["Content-Type"].startswith("text/html")


@pytest.mark.parametrize(
    "path, parameter",
    [
        ("/api/v1/workflows/{workflow}/events/?event_type=task_failed", "event_type"),
        ("/api/v1/workflows/{workflow}/events/?after=100", "after"),
        ("/api/v1/conversations/{thread}/messages/?role=assistant", "role"),
    ],
)
def test_a_list_without_filters_refuses_a_parameter_it_does_not_read(callers, submit, thread, path, parameter):
    workflow = submit(callers["developer"]).json()["workflow_id"]
    client = callers["developer"].client
    response = client.get(path.format(workflow=workflow, thread=thread))
    assert response.status_code == 400, response.content
    assert response["Content-Type"] == "application/problem+json"
    (error,) = response.json()["errors"]
    assert error["field"] == parameter
    assert error["detail"] == "unknown query parameter (allowed: cursor, format, limit, ordering)"
    page = client.get(path.format(workflow=workflow, thread=thread).split("?")[0] + "?limit=1")
    assert page.status_code == 200, page.content


FORMAT = "allowed: format"
MESSAGE = {"agent": "echo", "content": "hello"}
NEW_AGENT = {"id": "new-agent", "name": "New", "executor": "python", "entrypoint": "builtins.print"}
EXPORT = {"data_type": "events", "start_date": "2024-03-05", "end_date": "2024-03-05"}


@pytest.mark.parametrize(
    "who, method, path, parameter, allowed",
    [
        ("developer", "get", "/api/v1/workflows/{workflow}/?status=completed", "status", FORMAT),
        ("developer", "get", "/api/v1/workflows/{workflow}/?created_before=2000-01-01", "created_before", FORMAT),
        ("developer", "post", "/api/v1/workflows/{workflow}/cancel/?status=completed", "status", FORMAT),
        ("developer", "get", "/api/v1/tasks/{task}/?status=completed", "status", FORMAT),
        ("developer", "post", "/api/v1/tasks/{task}/retry/?status=failed", "status", FORMAT),
        ("developer", "get", "/api/v1/agents/echo/?status=inactive", "status", FORMAT),
        ("admin", "patch", "/api/v1/agents/echo/?executor=http", "executor", FORMAT),
        ("admin", "get", "/api/v1/exports/{run}/?status=succeeded", "status", "this operation takes none"),
    ],
)
def test_an_objects_page_or_command_refuses_the_lists_filters_rather_than_hiding_the_object(
    callers, submit, who, method, path, parameter, allowed
):
    """get_object() ran the list's filter set: `GET /workflows/{id}/?status=completed` of a
    running workflow was a 404 "Not found" for one that exists (a cancel so addressed too),
    and a parameter the list does not read was refused naming the list's filters."""
    workflow = submit(callers["developer"]).json()["workflow_id"]
    task = callers["developer"].client.get(f"/api/v1/workflows/{workflow}/").json()["tasks"][0]["execution_id"]
    run = ExportRunFactory(status=ExportRun.Status.PENDING).pk
    url = path.format(workflow=workflow, task=task, run=run)
    client = callers[who].client
    response = getattr(client, method)(url, {}, format="json") if method != "get" else client.get(url)
    assert response.status_code == 400, response.content
    assert response.json()["errors"] == [{"field": parameter, "detail": f"unknown query parameter ({allowed})"}]
    assert Workflow.objects.get(pk=workflow).status == "running"
    assert Agent.objects.get(pk="echo").executor != "http"
    if method == "get":
        plain = url.split("?")[0] + ("?format=json" if "takes none" not in allowed else "")
        assert client.get(plain).status_code == 200


@pytest.mark.parametrize(
    "who, method, path, body, parameter, allowed",
    [
        ("developer", "post", "/api/v1/workflows/?dry_run=true", SPEC, "dry_run", FORMAT),
        ("developer", "post", "/api/v1/conversations/new-thread/messages/?stream=true", MESSAGE, "stream", FORMAT),
        ("admin", "post", "/api/v1/agents/?overwrite=true", NEW_AGENT, "overwrite", FORMAT),
        ("admin", "post", "/api/v1/exports/?dry_run=true", EXPORT, "dry_run", "this operation takes none"),
        ("developer", "get", "/api/v1/me/?user=vic", None, "user", FORMAT),
        ("admin", "get", "/api/v1/exports/{run}/download/?files=keys", None, "files", "allowed: file"),
    ],
)
def test_an_operation_that_reads_no_filters_refuses_a_parameter_rather_than_ignoring_it(
    callers, who, method, path, body, parameter, allowed
):
    """A create, a message post, `me` and a download read no query parameter but ignored
    every one: `POST /workflows/?dry_run=true` stored and queued the workflow (201),
    `download/?files=keys` would send the data file for the keys file, while a command on an
    object refused the same parameter."""
    run = ExportRunFactory(status=ExportRun.Status.PENDING).pk
    client = callers[who].client
    url = path.format(run=run)
    response = getattr(client, method)(url, body, format="json") if method == "post" else client.get(url)
    assert response.status_code == 400, response.content
    assert response["Content-Type"] == "application/problem+json"
    assert response.json()["errors"] == [{"field": parameter, "detail": f"unknown query parameter ({allowed})"}]
    assert not Workflow.objects.exists()
    assert not AgentPlaygroundMessage.objects.exists()
    assert not Agent.objects.filter(pk=NEW_AGENT["id"]).exists()
    assert ExportRun.objects.count() == 1


@pytest.mark.parametrize(
    "path, formats",
    [
        ("/api/v1/workflows/?format=csv", "api, json"),
        ("/api/v1/workflows/{workflow}/?format=csv", "api, json"),
        ("/api/v1/me/?format=csv", "api, json"),
        ("/api/v1/schema/?format=csv", "json, yaml"),
    ],
)
def test_a_format_no_renderer_has_is_a_400_naming_the_formats_not_a_404(callers, submit, path, formats):
    """DRF answered `?format=csv` with a bare 404: a workflow that exists was "not found"."""
    workflow = submit(callers["developer"]).json()["workflow_id"]
    response = callers["developer"].client.get(path.format(workflow=workflow))
    assert response.status_code == 400, response.content
    assert response["Content-Type"] == "application/problem+json"
    assert response.json()["errors"] == [{"field": "format", "detail": f"must be one of: {formats}"}]
    assert callers["developer"].client.get(path.format(workflow=workflow).replace("csv", "json")).status_code == 200


def test_the_public_schema_is_generated_once_per_format(db, monkeypatch):
    generated = []
    real = SchemaGenerator.get_schema

    def counting(self, *args, **kwargs):
        generated.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SchemaGenerator, "get_schema", counting)
    # (a fresh cache: another test of this process may have rendered the schema already)
    monkeypatch.setattr(CachedSchemaView, "_rendered", {})
    anonymous = Client()
    first = anonymous.get("/api/v1/schema/?format=json")
    assert first.status_code == 200 and first.json()["openapi"].startswith("3.")
    for query in ("?format=json", "?format=json&lang=de", "?format=json&version=x9", "?format=json&lang=zz-1"):
        again = anonymous.get(f"/api/v1/schema/{query}")
        assert again.status_code == 200 and again.content == first.content
    assert anonymous.get("/api/v1/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json; indent=9").content == (
        first.content
    )
    assert len(generated) == 1
    yaml = anonymous.get("/api/v1/schema/")
    assert yaml.status_code == 200 and yaml["Content-Type"].startswith("application/vnd.oai.openapi")
    assert anonymous.get("/api/v1/schema/").content == yaml.content
    assert len(generated) == 2
    assert first.json() == SchemaGenerator().get_schema(request=None, public=True)


@pytest.fixture
def succeeded_run(settings, tmp_path):
    settings.TRAINING_EXPORT_DIR = tmp_path
    data = tmp_path / "events-train.jsonl"
    data.write_bytes(b'{"event_id": "e1"}\n' * 100)
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    run = ExportRunFactory(
        status=ExportRun.Status.SUCCEEDED,
        path=str(data),
        checksum=digest,
        rows=100,
        bytes=data.stat().st_size,
        finished_at=timezone.now(),
    )
    return run, data


def test_a_download_answers_if_none_match_with_304_while_the_file_is_intact(callers, succeeded_run):
    run, data = succeeded_run
    admin = callers["admin"].client
    url = f"/api/v1/exports/{run.pk}/download/"
    full = admin.get(url)
    assert full.status_code == 200 and b"".join(full.streaming_content) == data.read_bytes()
    etag = full["ETag"]
    assert etag == f'"{run.checksum}"'

    cached = admin.get(url, HTTP_IF_NONE_MATCH=etag)
    assert cached.status_code == 304, cached.status_code
    assert cached["ETag"] == etag and cached.content == b""
    other = admin.get(url, HTTP_IF_NONE_MATCH='"0000"')
    assert other.status_code == 200 and b"".join(other.streaming_content) == data.read_bytes()
    matched = admin.get(url, HTTP_IF_MATCH=etag)
    assert matched.status_code == 200 and b"".join(matched.streaming_content) == data.read_bytes()
    failed = admin.get(url, HTTP_IF_MATCH='"0000"')
    assert failed.status_code == 412, failed.status_code
    assert failed["Content-Type"] == "application/problem+json"
    assert failed.json()["type"] == "urn:agentledger:problem:precondition-failed"
    assert failed.json()["detail"] == f"If-Match names no version of this file; its ETag is {etag}"

    data.write_bytes(data.read_bytes().replace(b"e1", b"e2"))
    changed = admin.get(url, HTTP_IF_NONE_MATCH=etag)
    assert changed.status_code == 410, changed.content  # never a 304 for a file that changed
