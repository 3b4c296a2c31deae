"""The OpenAPI schema validates, and the live API conforms to it: schemathesis generates
requests for every operation and runs every check on each answer, as each role."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import schemathesis
from django import forms
from django.core import signals
from django.core.handlers.wsgi import WSGIHandler
from django.db import close_old_connections
from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.validation import validate_schema
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import CHECKS, load_all_checks

from orchestration.api.filters import AgentFilter, AttemptFilter, EventFilter, TaskFilter, WorkflowFilter
from tests.api.conftest import ROLES, SPEC, make_caller
from training_export.api.filters import ExportRunFilter

# Valid-per-schema data can still be refused for reasons a schema cannot state: an agent id
# that does not exist (400), a state that forbids the command (409), a key reused with
# another body (422). Everything else (5xx above all) fails the run.
CONFIG = schemathesis.config.SchemathesisConfig.from_dict(
    {
        "phases": {"coverage": {"enabled": False}},
        "checks": {
            "positive_data_acceptance": {"expected-statuses": ["2xx", "400", "401", "403", "404", "409", "422"]}
        },
    }
)


def test_the_schema_is_valid_openapi_with_an_example_per_operation():
    schema = SchemaGenerator().get_schema(request=None, public=True)
    validate_schema(schema)
    operations = [(path, method, op) for path, item in schema["paths"].items() for method, op in item.items()]
    assert len(operations) >= 20
    for path, method, operation in operations:
        assert operation.get("summary"), (method, path)
        assert "200" in operation["responses"] or "201" in operation["responses"] or "202" in operation["responses"]
        problems = [code for code in operation["responses"] if code.startswith("4")]
        assert problems, (method, path)
        for code in problems:
            content = operation["responses"][code]["content"]
            assert list(content) == ["application/problem+json"], (method, path, code)
            assert content["application/problem+json"]["examples"], (method, path, code)
    posts = [op for _, method, op in operations if method in ("post", "put", "patch") and "requestBody" in op]
    assert posts
    assert "examples" in schema["paths"]["/api/v1/workflows/"]["post"]["requestBody"]["content"]["application/json"]


def test_the_schema_describes_the_spec_defaults_and_who_owns_a_workflow():
    """A spec's task retries 3 times and runs under TASK_DEFAULT_TIMEOUT_SECONDS unless it says
    otherwise, in its workflow's priority queue: the schema showed none of it. And a
    workflow's `owner` was described by the username column's form help ("Required. 150
    characters or fewer...") although it is read-only and null for a workflow submitted with
    manage.py."""
    from django.conf import settings

    schema = SchemaGenerator().get_schema(request=None, public=True)["components"]["schemas"]
    task = schema["TaskSpecRequest"]["properties"]
    assert task["max_retries"]["default"] == 3
    assert task["timeout_seconds"]["default"] == settings.TASK_DEFAULT_TIMEOUT_SECONDS
    assert "the workflow's" in task["priority"]["description"]
    assert schema["WorkflowSpecRequest"]["properties"]["priority"]["default"] == "normal"
    for name in ("Workflow", "WorkflowDetail"):
        owner = schema[name]["properties"]["owner"]
        assert owner["nullable"] and "Required" not in owner["description"], owner
        assert "manage.py" in owner["description"]


def test_every_boolean_filter_is_documented_as_a_boolean():
    """`settled` (true or false, anything else a 400) was documented as any string: its filter
    method's `bool | None` hint is no type drf-spectacular maps, so a generated client typed
    it as text."""
    schema = SchemaGenerator().get_schema(request=None, public=True)
    booleans = {
        name
        for filterset in (AgentFilter, AttemptFilter, EventFilter, ExportRunFilter, TaskFilter, WorkflowFilter)
        for name, filter_ in filterset.base_filters.items()
        if isinstance(filter_.field, forms.NullBooleanField)
    }
    assert "settled" in booleans
    documented = {
        (path, parameter["name"]): parameter
        for path, item in schema["paths"].items()
        for operation in item.values()
        for parameter in operation.get("parameters", [])
        if parameter["in"] == "query" and parameter["name"] in booleans
    }
    assert documented
    for (path, name), parameter in documented.items():
        assert parameter["schema"] == {"type": "boolean"}, (path, name, parameter)
        assert parameter["description"], (path, name)


@pytest.mark.parametrize(
    "path, orderings",
    [
        ("/api/v1/workflows/", ["-created_at", "created_at"]),
        ("/api/v1/tasks/", ["-created_at", "created_at"]),
        ("/api/v1/events/", ["sequence", "-sequence"]),
        ("/api/v1/workflows/{workflow_id}/events/", ["sequence", "-sequence"]),
        ("/api/v1/workflows/{workflow_id}/attempts/", ["started_at", "-started_at"]),
        ("/api/v1/exports/", ["-created_at", "created_at"]),
        ("/api/v1/agents/", ["id"]),
        ("/api/v1/conversations/{instance_id}/messages/", ["created_at"]),
    ],
)
def test_every_list_documents_the_orderings_it_takes(callers, path, orderings):
    """Every list reads `?ordering=` (any other value is a 400 naming them): the agents' and a
    conversation's messages did not document it, so a generated client had no way to send
    it, and a 400 for it named a parameter the schema did not have."""
    schema = SchemaGenerator().get_schema(request=None, public=True)
    parameters = {p["name"]: p for p in schema["paths"][path]["get"]["parameters"] if p["in"] == "query"}
    assert "ordering" in parameters, (path, sorted(parameters))
    documented = parameters["ordering"]["schema"]
    assert documented["type"] == "string" and sorted(documented["enum"]) == sorted(orderings), documented
    client = callers["admin"].client
    workflow_id = client.post("/api/v1/workflows/", SPEC, format="json").json()["workflow_id"]
    client.post("/api/v1/conversations/a-thread/messages/", {"agent": "echo", "content": "hi"}, format="json")
    url = path.format(workflow_id=workflow_id, instance_id="a-thread")
    refused = client.get(url, {"ordering": "bogus"})
    assert refused.status_code == 400, refused.content
    assert refused.json()["errors"] == [{"field": "ordering", "detail": f"must be one of: {', '.join(orderings)}"}]
    for ordering in orderings:
        assert client.get(url, {"ordering": ordering}).status_code == 200, (url, ordering)


def test_negotiation_problems_are_documented_as_answered(callers, settings):
    """406 (Accept), 413 (body size) and 415 (Content-Type) come before any view's code: each
    operation documents those it can give, with the problem type the live API answers."""
    schema = SchemaGenerator().get_schema(request=None, public=True)
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            expected = {"406", "413", "415"} if "requestBody" in operation else {"406"}
            assert expected <= set(operation["responses"]), (method, path)

    def documented(path: str, method: str, code: int) -> str:
        content = schema["paths"][path][method]["responses"][str(code)]["content"]["application/problem+json"]
        return next(iter(content["examples"].values()))["value"]["type"]

    admin = callers["admin"].client
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1024
    answers = {
        ("/api/v1/workflows/", "get", 406): admin.get("/api/v1/workflows/", HTTP_ACCEPT="application/xml"),
        ("/api/v1/workflows/", "post", 415): admin.post("/api/v1/workflows/", "a", content_type="text/plain"),
        ("/api/v1/agents/", "post", 413): admin.post("/api/v1/agents/", {"name": "x" * 2000}, format="json"),
    }
    for (path, method, code), response in answers.items():
        assert response.status_code == code, (path, response.content)
        assert response["Content-Type"] == "application/problem+json"
        assert response.json()["type"] == documented(path, method, code)


def test_commands_that_take_no_body_document_the_media_type_and_size_problems_they_answer(callers, settings):
    """retry and deactivate read their body (none, or `{}`) since they refuse one they would
    ignore: one in another media type is a 415, one over the size limit a 413, which the
    schema did not list for them (it has no requestBody, so the hook added neither)."""
    schema = SchemaGenerator().get_schema(request=None, public=True)
    admin = callers["admin"].client
    workflow_id = admin.post("/api/v1/workflows/", SPEC, format="json").json()["workflow_id"]
    execution_id = admin.get(f"/api/v1/workflows/{workflow_id}/").json()["tasks"][0]["execution_id"]
    commands = {
        "/api/v1/workflows/{workflow_id}/retry/": f"/api/v1/workflows/{workflow_id}/retry/",
        "/api/v1/tasks/{execution_id}/retry/": f"/api/v1/tasks/{execution_id}/retry/",
        "/api/v1/agents/{id}/deactivate/": "/api/v1/agents/echo/deactivate/",
    }
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1024
    for path, url in commands.items():
        answers = {
            415: admin.post(url, "{}", content_type="application/x-www-form-urlencoded"),
            413: admin.post(url, {"reason": "x" * 2000}, format="json"),
        }
        for code, response in answers.items():
            assert response.status_code == code, (url, response.content)
            documented = schema["paths"][path]["post"]["responses"].get(str(code))
            assert documented is not None, (path, code)
            example = next(iter(documented["content"]["application/problem+json"]["examples"].values()))
            assert response.json()["type"] == example["value"]["type"], (path, code)


def test_every_operation_documents_the_400_for_a_repeated_or_nul_query_parameter(callers):
    """ApiCommonMiddleware answers a query parameter given twice, or holding a NUL, with a 400
    before any view runs, on every operation: those that take no filters (`GET /me/`, an
    object's page) did not list a 400 at all."""
    schema = SchemaGenerator().get_schema(request=None, public=True)
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            assert "400" in operation["responses"], (method, path)
    admin = callers["admin"].client
    workflow_id = admin.post("/api/v1/workflows/", SPEC, format="json").json()["workflow_id"]
    answers = {
        "/api/v1/me/": admin.get("/api/v1/me/?a=1&a=2"),
        "/api/v1/workflows/{workflow_id}/": admin.get(f"/api/v1/workflows/{workflow_id}/?a=%00"),
    }
    for path, response in answers.items():
        assert response.status_code == 400, (path, response.content)
        documented = schema["paths"][path]["get"]["responses"]["400"]["content"]["application/problem+json"]
        example = next(iter(documented["examples"].values()))["value"]
        body = response.json()
        assert body["type"] == example["type"]
        assert body["errors"] == [{"field": "a", "detail": body["detail"].removeprefix("a: ")}]
        assert example["errors"][0]["field"] and example["detail"].startswith(example["errors"][0]["field"] + ": ")


def test_schema_and_docs_are_served(client):
    schema = client.get("/api/v1/schema/?format=json")
    assert schema.status_code == 200 and schema.json()["openapi"].startswith("3.")
    docs = client.get("/api/v1/docs/")
    assert docs.status_code == 200 and b"swagger-ui" in docs.content


# The schema as the running app serves it; requests go straight to the WSGI app.
schema = schemathesis.openapi.from_wsgi("/api/v1/schema/?format=json", WSGIHandler(), config=CONFIG)


@contextmanager
def connection_kept_open() -> Iterator[None]:
    """Like Django's test client, the app must not close the test's database connection at
    the end of each request: the test's transaction lives on it."""
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    try:
        yield
    finally:
        signals.request_started.connect(close_old_connections)
        signals.request_finished.connect(close_old_connections)


@pytest.fixture
def keys(agents, settings) -> dict[str, str]:
    """A key per role, and a workflow of the developer's so reads find something."""
    settings.API_RATE_LIMITS = {role: 1_000_000 for role in ROLES}
    settings.API_RATE_LIMIT_ANONYMOUS = 1_000_000  # its requests without a key, by address
    callers = {role: make_caller(f"fuzz-{role}", role) for role in ROLES}
    spec = {"name": "fuzz", "tasks": [{"name": "a", "agent": "echo"}]}
    callers["developer"].client.post("/api/v1/workflows/", spec, format="json")
    return {role: caller.key for role, caller in callers.items()}


FUZZ_SETTINGS = hypothesis_settings(
    max_examples=10,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.mark.parametrize("role", ROLES)
def test_api_conforms_to_its_schema(keys, subtests, role):
    """Every operation, as each role: generated requests that fit the schema and requests
    that do not, every check on each answer. One test per role rather than per operation:
    the setup is the expensive part. (The coverage phase, which enumerates boundary values,
    takes minutes; the cases it found are pinned in test_errors.py.)"""
    load_all_checks()
    headers = {"Authorization": f"Bearer {keys[role]}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20
    for operation in operations:
        with subtests.test(operation=operation.label):

            @given(
                case=st.one_of(
                    operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE)
                )
            )
            @FUZZ_SETTINGS
            def fuzz(case: schemathesis.Case) -> None:
                with connection_kept_open():
                    case.call_and_validate(headers=headers, checks=CHECKS.get_all())

            fuzz()
