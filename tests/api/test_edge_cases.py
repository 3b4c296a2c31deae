"""Odd and hostile input to the API: crafted cursors, deep JSON, too many parameters, blank
filters, reversed ranges, writes without the trailing slash, narrowed keys, the schema of
a paginated APIView."""

from __future__ import annotations

import base64
import json

import pytest
from drf_spectacular.generators import SchemaGenerator

from orchestration.models import Workflow
from tests.api.conftest import SPEC, make_caller
from tests.factories import EventFactory, WorkflowFactory


def _cursor(data: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def _raw_cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


# --- 1. a crafted cursor is a 500 ------------------------------------------------------


@pytest.mark.parametrize(
    "path, cursor, status",
    [
        ("/api/v1/events/", _raw_cursor('{"v":[1e500]}'), 400),  # OverflowError: float infinity to integer
        ("/api/v1/workflows/", _cursor({"v": ["2024-01-01T00:00:00Z", "x\u0000"]}), 400),  # DataError: NUL
        ("/api/v1/agents/", _cursor({"v": ["a\u0000"]}), 400),  # DataError: NUL
        ("/api/v1/workflows/", _raw_cursor('{"v":["2024-01-01T00:00:00Z","\\ud800"]}'), 400),  # UnicodeEncodeError
        # DataError "time zone displacement out of range"; normalised to UTC, as the datetime filters do
        ("/api/v1/workflows/", _cursor({"v": ["2024-01-01T00:00:00-23:59", "x"]}), 200),
        ("/api/v1/events/", _raw_cursor('{"v":' + "[" * 5000 + "]" * 5000 + "}"), 400),  # RecursionError
    ],
    ids=["infinity", "nul", "nul-agents", "surrogate", "utc-offset", "nesting"],
)
def test_a_cursor_no_page_handed_out_is_not_a_500(callers, path, cursor, status):
    response = callers["admin"].client.get(f"{path}?cursor={cursor}")
    assert response.status_code == status, response.content
    if status == 400:
        assert response.json()["errors"][0]["field"] == "cursor"


# --- 2. a deeply nested JSON body is a 500 -----------------------------------------------


def test_a_deeply_nested_json_body_is_a_400_not_a_500(callers):
    body = (
        '{"name": "deep", "tasks": [{"name": "a", "agent": "echo", "input": {"x": ' + "[" * 5000 + "]" * 5000 + "}}]}"
    )
    response = callers["developer"].client.post("/api/v1/workflows/", body, content_type="application/json")
    assert response.status_code == 400, response.content
    assert response["Content-Type"] == "application/problem+json"
    assert Workflow.objects.count() == 0


@pytest.mark.parametrize("replay", [False, True], ids=["new", "key-in-use"])
def test_a_json_body_the_parser_reads_but_too_deep_to_store_is_a_400(callers, replay):
    """A body 900 levels deep is within the parser's reach but not the encoder's, deeper in
    the request's stack: storing it, or comparing it with the spec stored under its
    Idempotency-Key, raised a RecursionError (a 500). Refused, nothing stored, and the next
    request is served."""
    dev = callers["developer"].client
    headers = {"HTTP_IDEMPOTENCY_KEY": "deep"} if replay else {}
    if replay:
        assert dev.post("/api/v1/workflows/", SPEC, format="json", **headers).status_code == 201
    depth = 900
    body = '{"name": "deep", "tasks": [{"name": "a", "agent": "echo", "input": {"x": %s}}]}'
    response = dev.post(
        "/api/v1/workflows/", body % ("[" * depth + "]" * depth), content_type="application/json", **headers
    )
    assert response.status_code == 400, response.content
    assert response["Content-Type"] == "application/problem+json"
    detail = response.json()["errors"][0]["detail"]
    assert "nested too deep" in detail, detail
    assert Workflow.objects.count() == (1 if replay else 0)
    assert dev.post("/api/v1/workflows/", body % "[[]]", content_type="application/json").status_code == 201


def test_a_json_body_within_a_raised_body_limit_is_not_refused_as_an_alias_bomb(callers, settings):
    """An operator who raised MAX_REQUEST_BODY_BYTES past 16 MiB takes bodies that large: a JSON
    spec of 17 MiB of text (a document to process) was stored, then refused as expanding "to
    more than 16,777,216 characters of text (...; YAML aliases repeat what they name)". A body
    holds no more characters than it has bytes unless aliases repeat them: the bound is at
    least the body limit."""
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 24 * 1024 * 1024
    text = "x" * (17 * 1024 * 1024)
    body = json.dumps({"name": "large", "tasks": [{"name": "a", "agent": "echo", "input": {"text": text}}]})
    response = callers["developer"].client.post("/api/v1/workflows/", body, content_type="application/json")
    assert response.status_code == 201, response.content[:500]
    assert len(Workflow.objects.get().tasks.get().input_data["text"]) == len(text)


# --- 3. more query parameters than DATA_UPLOAD_MAX_NUMBER_FIELDS is a 500 -----------------


@pytest.mark.parametrize("path", ["/api/v1/workflows/", "/api/v1/me/", "/api/v1/agents/"])
def test_too_many_query_parameters_is_a_400_not_a_500(callers, path):
    response = callers["developer"].client.get(path + "?" + "&".join(["x=1"] * 1100))
    assert response.status_code == 400, response.content
    assert response["Content-Type"] == "application/problem+json"


# --- 4. agent stats with `until` alone ---------------------------------------------------


def test_agent_stats_with_only_an_until_before_the_default_since_is_not_a_500(callers):
    response = callers["viewer"].client.get("/api/v1/agents/echo/stats/?until=2000-01-01T00:00:00Z")
    assert response.status_code in (200, 400), response.content
    if response.status_code == 400:
        assert response.json()["errors"][0]["field"] in ("until", "since")


# --- 5. the schema says the messages list is an array; it is a page ---------------------


def test_the_schema_of_the_conversation_messages_list_is_the_page_it_returns(callers):
    dev = callers["developer"].client
    assert (
        dev.post("/api/v1/conversations/t-1/messages/", {"agent": "echo", "content": "hi"}, format="json").status_code
        == 202
    )
    body = dev.get("/api/v1/conversations/t-1/messages/").json()
    assert set(body) == {"next", "previous", "results"}
    schema = SchemaGenerator().get_schema(request=None, public=True)
    documented = schema["paths"]["/api/v1/conversations/{instance_id}/messages/"]["get"]["responses"]["200"]
    documented = documented["content"]["application/json"]["schema"]
    if "$ref" in documented:
        documented = schema["components"]["schemas"][documented["$ref"].split("/")[-1]]
    assert documented.get("type") == "object", documented
    assert set(documented["properties"]) >= {"next", "previous", "results"}


# --- 6. a POST without the trailing slash becomes a GET ----------------------------------


def test_a_post_without_the_trailing_slash_is_not_redirected_into_a_get(callers):
    response = callers["developer"].client.post("/api/v1/workflows", SPEC, format="json")
    # 301 makes every common HTTP client (requests, curl -L, browsers' fetch) repeat it as a GET,
    # which answers 200 with the list: the workflow is silently never submitted.
    assert response.status_code != 301, response.get("Location")
    assert response["Content-Type"] == "application/problem+json" or response.status_code == 201


# --- 7. since after until ----------------------------------------------------------------


def test_events_since_after_until_is_a_400_like_agent_stats(callers):
    response = callers["admin"].client.get("/api/v1/events/?since=2030-01-01T00:00:00Z&until=2020-01-01T00:00:00Z")
    assert response.status_code == 400, response.content
    assert response.json()["errors"][0]["field"] == "until"


# --- 8. a filter of blanks is "no filter", and the keyset then drops rows -----------------


@pytest.mark.parametrize(
    "path", ["/api/v1/workflows/?workflow_type=%20", "/api/v1/tasks/?workflow=%20", "/api/v1/events/?agent=%20"]
)
def test_a_filter_of_only_blanks_is_refused_like_an_empty_one(callers, path):
    response = callers["admin"].client.get(path)
    assert response.status_code == 400, response.json()


def test_a_blank_indexed_event_filter_does_not_drop_the_rows_whose_column_is_null(callers):
    for i in range(3):
        EventFactory(agent_id=None, workflow_id=None, entity_type="agent", entity_id=f"e{i}")
    workflow = WorkflowFactory()
    for i in range(3):
        EventFactory(agent_id="echo", workflow_id=workflow.pk, entity_type="workflow", entity_id=f"w{i}")
    client = callers["admin"].client
    every = []
    url = "/api/v1/events/?limit=200"
    while url:
        page = client.get(url).json()
        every += [row["sequence"] for row in page["results"]]
        url = page["next"]
    seen = []
    url = "/api/v1/events/?agent=%20&limit=2"
    while url:
        response = client.get(url)
        if response.status_code == 400:
            return  # refused: fine
        page = response.json()
        seen += [row["sequence"] for row in page["results"]]
        url = page["next"]
    assert sorted(seen) == sorted(every)


# --- 9. a key narrowed below agent:list still reads agents --------------------------------


def test_a_key_narrowed_without_agent_list_cannot_read_agents(db, agents):
    caller = make_caller("auditor", "admin", permissions=["export:read"])
    me = caller.client.get("/api/v1/me/").json()
    assert "agent:list" not in me["permissions"]
    assert caller.client.get("/api/v1/agents/").status_code == 403
    assert caller.client.get("/api/v1/agents/echo/stats/").status_code == 403


def test_the_schema_describes_objects_not_the_serializers_internals(db):
    schema = SchemaGenerator().get_schema(public=True)
    for name, component in schema["components"]["schemas"].items():
        description = component.get("description", "")
        # The mixins' docstrings (how rows are read, how bodies are checked) are not API documentation.
        assert "machinery" not in description and "JSON bodies are taken" not in description, name


# --- 9. a query parameter no filter reads is ignored, and the list answers every row ------


@pytest.mark.parametrize(
    "path, name",
    [
        ("/api/v1/events/?workflow_id=01a2", "workflow_id"),  # the answer's field; the filter is `workflow`
        ("/api/v1/tasks/?agent_id=echo", "agent_id"),
        ("/api/v1/workflows/?state=failed", "state"),
        ("/api/v1/agents/?name=Echo", "name"),
        ("/api/v1/exports/?type=events", "type"),
    ],
)
def test_an_unknown_query_parameter_is_refused_not_ignored(callers, path, name):
    """`GET /events/?workflow_id=X` answered with every event: a client filtering by the
    field's name in the answer got a page of other workflows' events and no error."""
    EventFactory()
    response = callers["admin"].client.get(path)
    assert response.status_code == 400, response.json()
    (error,) = response.json()["errors"]
    assert error["field"] == name and error["detail"].startswith("unknown query parameter (allowed: ")


def test_the_list_parameters_that_are_not_filters_are_still_accepted(callers):
    EventFactory()
    response = callers["admin"].client.get("/api/v1/events/?limit=1&ordering=-sequence&format=json")
    assert response.status_code == 200, response.json()
    cursor = response.json()["next"]
    assert cursor is None or callers["admin"].client.get(cursor).status_code == 200
