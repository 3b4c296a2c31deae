"""What a request costs in queries, pinned: the API key, its owner and the owner's role in
one statement, then the page (no COUNT, no per-row query). Also what the shortcuts behind
those numbers must keep: the strongest role wins, filter errors stay per request."""

from __future__ import annotations

import django_filters
import pytest
from django.contrib.auth.models import Group
from django.db import connection
from django.http import QueryDict
from django.test.utils import CaptureQueriesContext

from orchestration.api.filters import StrictFilterSet
from orchestration.models import Agent, TaskExecution
from tests.api.conftest import make_caller


def _queries(client, path: str) -> list[str]:
    with CaptureQueriesContext(connection) as queries:
        response = client.get(path)
    assert response.status_code == 200, response.content
    return [q["sql"] for q in queries.captured_queries]


@pytest.mark.parametrize(
    "path, expected",
    [
        ("/api/v1/me/", 1),
        ("/api/v1/workflows/?status=running", 2),
        ("/api/v1/workflows/?limit=1", 2),
        ("/api/v1/tasks/", 2),
        ("/api/v1/events/", 2),
        ("/api/v1/events/?entity_id={workflow}", 2),
        ("/api/v1/workflows/{workflow}/", 3),  # + the workflow with its owner, + its tasks
        ("/api/v1/workflows/{workflow}/events/", 3),  # + the workflow (ownership)
    ],
)
def test_requests_cost_a_fixed_number_of_queries(callers, submit, path, expected):
    dev = callers["developer"]
    workflow = submit(dev).json()["workflow_id"]
    submit(dev)
    dev.client.get("/api/v1/me/")  # last_used_at was just written: no write in the measured request
    queries = _queries(dev.client, path.format(workflow=workflow))
    assert len(queries) == expected, queries
    assert "api_keys" in queries[0]


def test_a_list_page_costs_the_same_queries_at_any_size(callers, submit):
    dev = callers["developer"]
    for _ in range(6):
        submit(dev)
    dev.client.get("/api/v1/me/")
    assert len(_queries(dev.client, "/api/v1/workflows/?limit=1")) == len(
        _queries(dev.client, "/api/v1/workflows/?limit=6")
    )


def test_the_key_lookup_finds_the_strongest_role_of_the_owner(db):
    caller = make_caller("both", "viewer")
    caller.user.groups.add(Group.objects.get(name="developer"))
    Group.objects.get_or_create(name="unrelated")[0].user_set.add(caller.user)
    assert caller.client.get("/api/v1/me/").json()["role"] == "developer"
    caller.user.groups.add(Group.objects.get(name="admin"))
    assert caller.client.get("/api/v1/me/").json()["role"] == "admin"


def test_a_superuser_without_groups_is_admin_and_a_user_without_a_role_is_refused(db):
    root = make_caller("root", None)
    root.user.is_superuser = True
    root.user.save(update_fields=["is_superuser"])
    assert root.client.get("/api/v1/me/").json()["role"] == "admin"
    nobody = make_caller("nobody", None)
    refused = nobody.client.get("/api/v1/workflows/")
    assert refused.status_code == 403
    assert "no role" in refused.json()["detail"]


def test_filter_errors_stay_with_their_request(callers, submit):
    client = callers["developer"].client
    submit(callers["developer"])
    bad = client.get("/api/v1/events/?severity=loud&since=yesterday")
    assert bad.status_code == 400
    assert sorted(e["field"] for e in bad.json()["errors"]) == ["severity", "since"]
    empty = client.get("/api/v1/events/?entity_id=")
    assert empty.status_code == 400
    assert [e["field"] for e in empty.json()["errors"]] == ["entity_id"]
    good = client.get("/api/v1/events/?severity=info")
    assert good.status_code == 200
    assert good.json()["results"]
    assert {e["severity"] for e in good.json()["results"]} == {"info"}


def test_a_filter_set_with_request_dependent_choices_cannot_share_its_form():
    class ByAgent(StrictFilterSet):
        agent = django_filters.ModelChoiceFilter(queryset=Agent.objects.all())

        class Meta:
            model = TaskExecution
            fields = ("agent",)

    with pytest.raises(TypeError, match="ByAgent: a filter whose choices depend on the request"):
        ByAgent(QueryDict("agent=echo")).is_valid()
