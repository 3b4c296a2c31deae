"""List pages run a statement compiled once per shape (pagination._statement_key) with each
request's own WHERE parameters: what a page holds must not depend on which request compiled
the statement, and the cache of statements stays bounded."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from django.db import connection
from django.db.models import F
from django.test.utils import CaptureQueriesContext

from orchestration.api import pagination
from orchestration.api.pagination import _statement_key, _StatementCache, fetch_rows, page_statements
from orchestration.models import Workflow
from tests.factories import WorkflowFactory


@pytest.fixture
def compiles(monkeypatch):
    """The page statements Django compiles in full (each call of _compile_page), from an
    empty cache."""
    page_statements.clear()
    calls: list[str] = []
    original = pagination._compile_page

    def counted(queryset, names, limit):
        calls.append(str(queryset.query))
        return original(queryset, names, limit)

    monkeypatch.setattr(pagination, "_compile_page", counted)
    yield calls
    page_statements.clear()


def _ids(response) -> list[str]:
    assert response.status_code == 200, response.content
    return [row["workflow_id"] for row in response.json()["results"]]


def test_a_list_shape_is_compiled_once_and_runs_with_each_requests_values(callers, compiles):
    owner = callers["developer"].user
    failed = [WorkflowFactory(owner=owner, status="failed").pk for _ in range(2)]
    running = [WorkflowFactory(owner=owner, status="running").pk for _ in range(3)]
    client = callers["admin"].client
    assert sorted(_ids(client.get("/api/v1/workflows/?status=failed"))) == sorted(failed)
    assert len(compiles) == 1
    assert sorted(_ids(client.get("/api/v1/workflows/?status=running"))) == sorted(running)
    assert sorted(_ids(client.get("/api/v1/workflows/?status=failed"))) == sorted(failed)
    assert len(compiles) == 1


def test_callers_sharing_a_statement_each_see_only_their_own_rows(callers, submit, compiles):
    dev, other = callers["developer"], callers["other"]
    mine = [submit(dev).json()["workflow_id"] for _ in range(2)]
    theirs = [submit(other).json()["workflow_id"] for _ in range(2)]
    assert sorted(_ids(dev.client.get("/api/v1/workflows/"))) == sorted(mine)
    assert sorted(_ids(other.client.get("/api/v1/workflows/"))) == sorted(theirs)
    my_events = dev.client.get("/api/v1/events/").json()["results"]
    their_events = other.client.get("/api/v1/events/").json()["results"]
    assert {e["workflow_id"] for e in my_events} == set(mine)
    assert {e["workflow_id"] for e in their_events} == set(theirs)
    assert len(compiles) == 2  # one statement for each list, shared by both callers


def test_every_shape_gets_its_own_statement_and_the_same_page_as_a_fresh_compilation(callers, compiles):
    owner = callers["developer"].user
    for i in range(7):
        WorkflowFactory(owner=owner, status=("failed", "running")[i % 2], priority=("high", "normal")[i % 3 % 2])
    client = callers["admin"].client
    paths = [
        "/api/v1/workflows/?limit=2",
        "/api/v1/workflows/?limit=3",
        "/api/v1/workflows/?limit=2&ordering=created_at",
        "/api/v1/workflows/?limit=2&status=failed",
        "/api/v1/workflows/?limit=2&priority=high",  # as many filters as the one before: the WHERE text differs
        "/api/v1/workflows/?limit=2&status=failed&priority=high",
        "/api/v1/workflows/?limit=2&priority=high&status=failed",  # same filters, same statement
        "/api/v1/events/?limit=2",
    ]
    first_pages = {path: client.get(path).json() for path in paths}
    assert len(compiles) == 7
    cursors = [page[link] for page in first_pages.values() for link in ("next", "previous") if page[link]]
    assert cursors
    # Each page through a cached statement, then through a fresh compilation: the same answer.
    for path in [*paths, *cursors]:
        cached = client.get(path)
        page_statements.clear()
        fresh = client.get(path)
        assert cached.status_code == fresh.status_code == 200
        assert cached.content == fresh.content, path
    later = client.get(cursors[0]).json()
    assert later["results"] and later == client.get(cursors[0]).json()


def test_the_statement_cache_keeps_the_most_recently_used_within_its_size(callers, monkeypatch):
    cache = _StatementCache(size=2)
    for key in ("a", "b"):
        cache.put((key,), key)
    assert cache.get(("a",)) == "a"  # now the most recently used
    cache.put(("c",), "c")
    assert len(cache) == 2
    assert cache.get(("b",)) is None and cache.get(("a",)) == "a" and cache.get(("c",)) == "c"

    monkeypatch.setattr(page_statements, "size", 3)
    page_statements.clear()
    client = callers["admin"].client
    for limit in range(1, 8):
        assert client.get(f"/api/v1/workflows/?limit={limit}").status_code == 200
    assert len(page_statements) == 3
    page_statements.clear()


def test_a_statement_is_keyed_by_database_alias_and_vendor():
    query = Workflow.objects.filter(status="failed").order_by("-created_at").query
    where = '"workflows"."status" = %s'
    keys = {
        _statement_key(query, ["workflow_id"], 51, SimpleNamespace(alias=alias, vendor=vendor), where)
        for alias, vendor in [("default", "postgresql"), ("default", "sqlite"), ("replica", "postgresql")]
    }
    assert len(keys) == 3


@pytest.mark.django_db
def test_queries_with_parts_outside_the_key_are_compiled_every_time(compiles):
    for name in ("b", "a", "a"):
        WorkflowFactory(name=name)
    distinct = Workflow.objects.order_by("name").distinct()
    assert [row["name"] for row in fetch_rows(distinct.values("name"), ["name"], limit=10)] == ["a", "b"]
    annotated = Workflow.objects.annotate(twice=F("error_count") * 2).order_by("name")
    assert [row["name"] for row in fetch_rows(annotated, ["name"], limit=10)] == ["a", "a", "b"]
    assert [row["name"] for row in fetch_rows(annotated, ["name"], limit=10)] == ["a", "a", "b"]
    assert len(compiles) == 3
    assert len(page_statements) == 0


@pytest.mark.django_db
def test_a_page_that_cannot_match_runs_no_query(compiles):
    with CaptureQueriesContext(connection) as queries:
        assert fetch_rows(Workflow.objects.filter(pk__in=[]).order_by("pk"), ["workflow_id"], limit=5) == []
    assert queries.captured_queries == []
