"""Keyset pagination: stable under inserts, correct across rows sharing a timestamp, no
COUNT queries, a maximum page size, ordering, and clear errors for bad parameters."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from tests.api.conftest import SPEC


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
