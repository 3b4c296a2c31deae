"""Keyset pagination: stable under inserts, correct across rows sharing a timestamp, no
COUNT queries, a maximum page size, ordering, and clear errors for bad parameters. List
pages, read as rows, are exactly what DRF's serialization of the model instances gives."""

from __future__ import annotations

import base64
import datetime as dt
import json
from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework import serializers as drf_serializers
from rest_framework.renderers import JSONRenderer

from orchestration.api.serializers import EventSerializer, RowReader, TaskSerializer, WorkflowSerializer
from orchestration.models import Event, TaskExecution, Workflow
from tests.api.conftest import SPEC
from tests.factories import EventFactory, TaskExecutionFactory, WorkflowFactory


def _ids(page: dict, field: str) -> list[str]:
    return [row[field] for row in page["results"]]


def test_pages_are_stable_when_rows_are_inserted_meanwhile(callers, submit):
    dev = callers["developer"]
    created = [submit(dev).json()["workflow_id"] for _ in range(5)]
    newest_first = list(reversed(created))
    first = dev.client.get("/api/v1/workflows/?limit=2").json()
    assert _ids(first, "workflow_id") == newest_first[:2]
    for _ in range(3):
        submit(dev)
    second = dev.client.get(first["next"]).json()
    assert _ids(second, "workflow_id") == newest_first[2:4]
    third = dev.client.get(second["next"]).json()
    assert _ids(third, "workflow_id") == newest_first[4:]
    assert third["next"] is None
    back = dev.client.get(third["previous"]).json()
    assert _ids(back, "workflow_id") == newest_first[2:4]


def test_rows_sharing_a_timestamp_are_neither_skipped_nor_repeated(callers, submit):
    spec = {"name": "wide", "tasks": [{"name": f"t{i}", "agent": "echo"} for i in range(7)]}
    workflow_id = submit(callers["developer"], spec).json()["workflow_id"]
    client = callers["developer"].client
    seen: list[str] = []
    url = f"/api/v1/tasks/?workflow={workflow_id}&limit=2&ordering=created_at"
    while url:
        page = client.get(url).json()
        seen.extend(_ids(page, "task_name"))
        url = page["next"]
    assert sorted(seen) == sorted(f"t{i}" for i in range(7))
    assert len(seen) == 7


@pytest.mark.parametrize("path", ["/api/v1/workflows/", "/api/v1/tasks/", "/api/v1/events/"])
def test_lists_never_count(callers, submit, path):
    submit(callers["developer"])
    with CaptureQueriesContext(connection) as queries:
        response = callers["developer"].client.get(path + "?limit=1")
    assert response.status_code == 200
    assert not [q["sql"] for q in queries.captured_queries if "COUNT(" in q["sql"].upper()]


def test_page_size_has_a_maximum_and_bad_parameters_name_themselves(callers, settings):
    client = callers["admin"].client
    assert client.get(f"/api/v1/workflows/?limit={settings.API_MAX_PAGE_SIZE}").status_code == 200
    too_big = client.get(f"/api/v1/workflows/?limit={settings.API_MAX_PAGE_SIZE + 1}")
    assert too_big.status_code == 400 and too_big.json()["errors"][0]["field"] == "limit"
    bad_cursor = client.get("/api/v1/events/?cursor=bm9wZQ")
    assert bad_cursor.status_code == 400 and bad_cursor.json()["errors"][0]["field"] == "cursor"
    bad_order = client.get("/api/v1/events/?ordering=payload")
    assert bad_order.status_code == 400 and bad_order.json()["errors"][0]["field"] == "ordering"


def test_events_descend_on_request_and_filter_by_entity(callers, submit):
    workflow_id = submit(callers["developer"], SPEC).json()["workflow_id"]
    client = callers["developer"].client
    newest = client.get("/api/v1/events/?ordering=-sequence").json()["results"]
    assert [e["sequence"] for e in newest] == sorted((e["sequence"] for e in newest), reverse=True)
    by_entity = client.get(f"/api/v1/events/?entity_type=workflow&entity_id={workflow_id}").json()["results"]
    assert [e["event_type"] for e in by_entity] == ["workflow_created", "workflow_started"]
    none_yet = client.get("/api/v1/events/?since=2999-01-01T00:00:00Z").json()["results"]
    assert none_yet == []


@pytest.mark.parametrize("ordering", ["sequence", "-sequence"])
def test_paging_events_of_one_entity_keeps_sequence_order(callers, submit, ordering):
    workflow_id = submit(callers["developer"]).json()["workflow_id"]
    submit(callers["developer"])
    client = callers["developer"].client
    seen: list[int] = []
    url = f"/api/v1/events/?workflow={workflow_id}&limit=1&ordering={ordering}"
    while url:
        page = client.get(url).json()
        seen.extend(e["sequence"] for e in page["results"])
        url = page["next"]
    assert len(seen) == 3
    assert seen == sorted(seen, reverse=ordering.startswith("-"))


def _drf_page(serializer_class, instances) -> bytes:
    """The page as DRF's own field-by-field serialization and JSON renderer make it (none of
    the list shortcuts: no RowReader, no orjson)."""
    serializer = serializer_class()
    results = [drf_serializers.Serializer.to_representation(serializer, instance) for instance in instances]
    return JSONRenderer().render({"next": None, "previous": None, "results": results})


@pytest.fixture
def varied_rows(callers):
    """Rows with what a column can hold: no owner, time zones, decimals, NULLs, non-ASCII
    text, U+2028, an integer beyond 64 bits, nested JSON."""
    other_zone = dt.timezone(dt.timedelta(hours=5, minutes=30))
    bare = WorkflowFactory(owner=None, name="no owner", tags=[], metadata={})
    full = WorkflowFactory(
        owner=callers["developer"].user,
        name="ünïcode \u2028 line",
        status="failed",
        error="boom",
        error_count=2,
        tags=["a", "é"],
        metadata={"big": 2**70, "nested": {"list": [1, None, True, "x"]}},
        total_tokens_used=123,
        total_cost_usd=Decimal("1.234567"),
        deadline=dt.datetime(2031, 1, 2, 3, 4, 5, 600000, tzinfo=other_zone),
        started_at=dt.datetime(2030, 1, 1, tzinfo=dt.UTC),
        completed_at=dt.datetime(2030, 1, 1, 0, 0, 1, 5, tzinfo=dt.UTC),
        duration_ms=1000,
    )
    TaskExecutionFactory(workflow=bare, agent_id="echo", output_data=None, metadata={})
    TaskExecutionFactory(
        workflow=full,
        agent_id="echo",
        depends_on=["x"],
        input_data={"text": "\u2029"},
        output_data={"n": 2**65},
        cost_usd=Decimal("0.000001"),
        queued_at=dt.datetime(2030, 1, 1, tzinfo=other_zone),
    )
    EventFactory(workflow_id=full.pk, entity_id=full.pk, payload={"k": "ü", "big": -(2**70)}, severity="error")
    EventFactory(workflow_id=full.pk, entity_id=full.pk, payload={}, agent_id="echo", session_id="s-1")
    return full


def test_list_pages_are_byte_for_byte_what_drf_serialization_gives(callers, varied_rows):
    client = callers["admin"].client
    pages = {
        "/api/v1/workflows/": (WorkflowSerializer, Workflow.objects.order_by("-created_at", "-workflow_id")),
        "/api/v1/tasks/?ordering=created_at": (
            TaskSerializer,
            TaskExecution.objects.order_by("created_at", "execution_id"),
        ),
        "/api/v1/events/?ordering=-sequence": (EventSerializer, Event.objects.order_by("-sequence")),
        f"/api/v1/events/?entity_id={varied_rows.pk}": (
            EventSerializer,
            Event.objects.filter(entity_id=varied_rows.pk).order_by("sequence"),
        ),
        f"/api/v1/workflows/{varied_rows.pk}/events/": (
            EventSerializer,
            Event.objects.filter(workflow_id=varied_rows.pk).order_by("sequence"),
        ),
    }
    for path, (serializer_class, rows) in pages.items():
        response = client.get(path)
        assert response.status_code == 200, response.content
        assert response.content == _drf_page(serializer_class, rows), path


def test_next_and_previous_links_work_from_rows(callers, varied_rows):
    client = callers["admin"].client
    first = client.get("/api/v1/workflows/?limit=1").json()
    second = client.get(first["next"]).json()
    assert second["next"] is None
    back = client.get(second["previous"]).json()
    assert back["results"] == first["results"]
    assert {first["results"][0]["workflow_id"], second["results"][0]["workflow_id"]} == set(
        Workflow.objects.values_list("workflow_id", flat=True)
    )


def test_a_row_reader_refuses_fields_that_are_not_one_column():
    class Nested(WorkflowSerializer):
        tasks = TaskSerializer(many=True, read_only=True)

        class Meta(WorkflowSerializer.Meta):
            fields = (*WorkflowSerializer.Meta.fields, "tasks")

    with pytest.raises(TypeError, match="'tasks' is not a single column"):
        RowReader(Nested)


def _cursor(values: list) -> str:
    return base64.urlsafe_b64encode(json.dumps({"v": values}).encode()).decode().rstrip("=")


@pytest.mark.parametrize("ordering", ["sequence", "-sequence"])
def test_an_entitys_events_page_forward_and_back_with_the_index_bound(callers, ordering):
    events = [EventFactory(entity_id="agent-x", workflow_id=None).sequence for _ in range(5)]
    EventFactory(entity_id="agent-w")
    EventFactory(entity_id="agent-z")
    expected = sorted(events, reverse=ordering.startswith("-"))
    client = callers["admin"].client
    seen: list[int] = []
    url = f"/api/v1/events/?entity_id=agent-x&limit=2&ordering={ordering}"
    pages = []
    while url:
        with CaptureQueriesContext(connection) as queries:
            page = client.get(url).json()
        pages.append(page)
        seen.extend(e["sequence"] for e in page["results"])
        url = page["next"]
        if len(pages) > 1:
            # After a cursor on (entity_id, sequence), sequence alone is bounded too.
            sql = next(q["sql"] for q in queries.captured_queries if "LIMIT" in q["sql"] and "api_keys" not in q["sql"])
            assert '"events"."sequence" ' + (">" if ordering == "sequence" else "<") in sql
    assert seen == expected
    back = client.get(pages[-1]["previous"]).json()
    assert [e["sequence"] for e in back["results"]] == expected[2:4]


def test_a_cursor_from_another_entity_means_what_it_says(callers):
    mine = [EventFactory(entity_id="agent-m").sequence for _ in range(3)]
    client = callers["admin"].client
    before = client.get(f"/api/v1/events/?entity_id=agent-m&cursor={_cursor(['agent-a', 10**12])}").json()
    assert [e["sequence"] for e in before["results"]] == mine
    after = client.get(f"/api/v1/events/?entity_id=agent-m&cursor={_cursor(['agent-z', 0])}").json()
    assert after["results"] == []


def test_a_row_reader_passes_through_only_what_the_field_would_return_unchanged():
    text_column = Event._meta.get_field("event_type")
    integer_column = Event._meta.get_field("sequence")
    identity = RowReader._is_identity
    assert identity(drf_serializers.ChoiceField(choices=["a", "b"]), text_column)
    # a key that is not text maps the text "1" back to the integer 1
    assert not identity(drf_serializers.ChoiceField(choices=[1, 2]), text_column)
    assert not identity(drf_serializers.MultipleChoiceField(choices=["a"]), text_column)
    assert identity(drf_serializers.BigIntegerField(), integer_column)
    assert not identity(drf_serializers.BigIntegerField(coerce_to_string=True), integer_column)
    assert not identity(drf_serializers.BigIntegerField(), text_column)


@pytest.mark.parametrize(
    ("query", "values"),
    [
        ("", [True]),
        ("", [{"sequence": 1}]),
        ("", [2**70]),
        ("", ["5"]),
        ("", [1.0]),
        ("&entity_id=agent-m", ["agent-m", True]),
        ("&entity_id=agent-m", [{"a": 1}, 5]),
        ("&entity_id=agent-m", ["agent-m", -(2**63) - 1]),
    ],
)
def test_a_tampered_cursor_is_a_400_not_an_odd_page(callers, query, values):
    """`true` was read as 1, an object as its repr, 2**70 passed on to PostgreSQL."""
    EventFactory(entity_id="agent-m")
    refused = callers["admin"].client.get(f"/api/v1/events/?cursor={_cursor(values)}{query}")
    assert refused.status_code == 400, refused.content
    assert refused.json()["errors"] == [{"field": "cursor", "detail": "is not a cursor this endpoint handed out"}]


def test_a_workflow_cursor_with_a_number_for_its_id_is_a_400(callers, submit):
    submit(callers["developer"])
    client = callers["developer"].client
    refused = client.get(f"/api/v1/workflows/?cursor={_cursor(['2026-01-01T00:00:00+00:00', 5])}")
    assert refused.status_code == 400 and refused.json()["errors"][0]["field"] == "cursor"


@pytest.mark.parametrize("written", ["1_0", " 5", "\u0661\u0660", "10.0", "+3"])
def test_a_page_size_or_sequence_not_written_in_digits_is_refused_naming_itself(callers, written):
    """`limit` and `after` were read by int() and Django's IntegerField: "1_0" as 10, " 5" as 5,
    Arabic-Indic ten as 10, "10.0" as 10 (after=), where a client meant something else or nothing."""
    client = callers["admin"].client
    for parameter in ("limit", "after"):
        response = client.get("/api/v1/events/", {parameter: written})
        assert response.status_code == 400, (parameter, written, response.content)
        assert response.json()["errors"][0]["field"] == parameter
    assert client.get("/api/v1/events/", {"limit": "10", "after": "0"}).status_code == 200


@pytest.mark.parametrize("digits", [4301, 10_000])
def test_a_page_size_or_sequence_of_too_many_digits_is_refused_naming_itself(callers, digits):
    """int() refuses a string of more than 4 300 digits (a ValueError): read unguarded, such a
    `limit` or `after` was a 500 (IntegerField and the old int() had made it a 400)."""
    client = callers["admin"].client
    for parameter in ("limit", "after"):
        response = client.get("/api/v1/events/", {parameter: "9" * digits})
        assert response.status_code == 400, (parameter, digits, response.content[:200])
        assert response.json()["errors"][0]["field"] == parameter
    # Past a bigint, not past int(): an empty page after it.
    assert client.get("/api/v1/events/", {"after": "9" * 20}).json()["results"] == []
