"""What a request costs in queries, pinned: the API key, its owner and the owner's role in
one statement, then the page (no COUNT, no per-row query). Also what the shortcuts behind
those numbers must keep: the strongest role wins, filter errors stay per request."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import django_filters
import pytest
from django.contrib.auth.models import Group
from django.db import connection
from django.http import QueryDict
from django.test.utils import CaptureQueriesContext

from orchestration.api.filters import EventFilter, StrictFilterSet
from orchestration.models import Agent, Event, TaskExecution
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


def test_a_filter_set_with_a_range_filter_cannot_share_its_form():
    class ByDuration(StrictFilterSet):
        duration = django_filters.RangeFilter(field_name="execution_time_ms")

        class Meta:
            model = TaskExecution
            fields = ("duration",)

    with pytest.raises(TypeError, match="ByDuration: a multi-value filter"):
        ByDuration(QueryDict("duration_min=1")).is_valid()


def test_each_filter_set_gets_its_own_filters_without_a_deep_copy():
    """The declared filters are copied shallowly per filter set: each instance still gets
    its own filter objects (django-filter sets `parent` and `model` on them) and its own
    `extra`, and the declared ones are left untouched."""
    first = EventFilter(QueryDict("entity_id=a"), queryset=Event.objects.all())
    second = EventFilter(QueryDict("entity_id=b"), queryset=Event.objects.all())
    for name, declared in EventFilter.base_filters.items():
        assert first.filters[name] is not declared
        assert first.filters[name] is not second.filters[name]
        assert first.filters[name].parent is first and second.filters[name].parent is second
        assert first.filters[name].extra == declared.extra
        assert first.filters[name].extra is not declared.extra
        assert not hasattr(declared, "parent")
    assert first.is_valid() and second.is_valid()
    assert str(first.qs.query) == str(Event.objects.filter(entity_id="a").query)
    assert str(second.qs.query) == str(Event.objects.filter(entity_id="b").query)


def test_a_filter_with_a_method_calls_it_on_its_own_filter_set():
    """A `method` filter is bound to its filter instance (FilterMethod): it is deep-copied
    so that the method is looked up on the filter set that owns the copy."""

    class ByName(StrictFilterSet):
        named = django_filters.CharFilter(method="filter_named")

        class Meta:
            model = Agent
            fields = ("named",)

        def filter_named(self, queryset, name, value):
            self.seen = value
            return queryset.filter(name=value)

    filterset = ByName(QueryDict("named=echo"), queryset=Agent.objects.all())
    assert filterset.is_valid()
    assert str(filterset.qs.query) == str(Agent.objects.filter(name="echo").query)
    assert filterset.seen == "echo"


def test_filter_forms_share_their_fields_but_not_their_field_dicts():
    """Form instances of a filter set clean with the same field objects (the per-instance
    deep copy was most of a filter's cost) but each has its own dict of them."""
    first = EventFilter(QueryDict("severity=loud"), queryset=Event.objects.all()).form
    second = EventFilter(QueryDict("severity=info"), queryset=Event.objects.all()).form
    assert first.fields is not second.fields
    assert first.fields["severity"] is second.fields["severity"]
    del first.fields["severity"]
    assert "severity" in second.fields
    assert first.is_valid() and "severity" not in first.cleaned_data
    assert second.is_valid() and second.cleaned_data["severity"] == "info"


def test_filter_validation_stays_per_request_across_threads():
    """Shared form fields are only read while cleaning: threads validating different query
    strings at once each get their own answer."""
    cases = [
        ("severity=info&since=2026-01-01T00:00:00Z", True, []),
        ("severity=loud", False, ["severity"]),
        ("since=yesterday&event_type=nope", False, ["event_type", "since"]),
        ("entity_id=x&until=2026-01-01T00:00:00%2B02:00", True, []),
    ]

    def check(i: int) -> None:
        query, valid, fields = cases[i % len(cases)]
        filterset = EventFilter(QueryDict(query), queryset=Event.objects.none())
        assert filterset.is_valid() is valid, query
        assert sorted(filterset.errors) == fields, query

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(check, range(800)))
