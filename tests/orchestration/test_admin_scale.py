"""The console's lists over the big tables read no table whole: the count stops at a cap, the
filters' values come from index probes, the severity filter has its index."""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.contrib import admin
from django.db import connection, models
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from orchestration.admin import scale
from orchestration.models import (
    AgentInteraction,
    AgentMetric,
    AgentPlaygroundMessage,
    Event,
    TaskAttempt,
    TaskExecution,
    Workflow,
)
from tests.factories import (
    EventFactory,
    InteractionFactory,
    MessageFactory,
    MetricFactory,
    TaskAttemptFactory,
    TaskExecutionFactory,
    UserFactory,
    WorkflowFactory,
)

pytestmark = pytest.mark.django_db

BIG_TABLES = [Event, Workflow, TaskExecution, TaskAttempt, AgentPlaygroundMessage, AgentInteraction, AgentMetric]


def _url(model: type[models.Model]) -> str:
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")


@pytest.fixture
def su_client(client: Client) -> Client:
    client.force_login(UserFactory(is_staff=True, is_superuser=True))
    return client


def _statements(client: Client, url: str) -> tuple[Any, list[str]]:
    with CaptureQueriesContext(connection) as queries:
        response = client.get(url)
    assert response.status_code == 200
    return response, [query["sql"] for query in queries.captured_queries]


@pytest.mark.parametrize("model", BIG_TABLES, ids=lambda model: model.__name__)
def test_a_big_tables_list_counts_at_most_the_cap_and_reads_no_distinct_values(su_client, model):
    _, statements = _statements(su_client, _url(model))
    table = model._meta.db_table
    counts = [sql for sql in statements if "COUNT(" in sql.upper() and f'"{table}"' in sql]
    assert counts, statements
    for sql in counts:
        assert f"LIMIT {scale.ADMIN_COUNT_LIMIT + 1}" in sql, sql  # never the whole table
    # No date hierarchy (DISTINCT of every row's date, MIN/MAX) and no DISTINCT of a column.
    assert not [sql for sql in statements if re.search(r"DISTINCT|DATE_TRUNC|\bMIN\(", sql, re.I)], statements


def test_a_list_longer_than_the_cap_says_so_and_pages_up_to_it(su_client, monkeypatch):
    monkeypatch.setattr(scale, "ADMIN_COUNT_LIMIT", 5)
    for _ in range(8):
        EventFactory()
    response, _ = _statements(su_client, _url(Event))
    assert "more than 5 events" in response.content.decode()
    assert response.context["cl"].paginator.capped
    # Nor does the action bar offer to act on "all 6" when the action would reach every match.
    for _ in range(8):
        WorkflowFactory()
    response, _ = _statements(su_client, _url(Workflow))
    page = response.content.decode()
    assert "Select all matching workflows (more than 5)" in page and "Select all 6" not in page
    monkeypatch.setattr(scale, "ADMIN_COUNT_LIMIT", 50)
    response, _ = _statements(su_client, _url(Event))
    assert "8 events" in response.content.decode() and "more than" not in response.content.decode()


def test_the_filters_offer_the_values_that_occur_from_the_index(su_client):
    alice, bob = UserFactory(username="alice"), UserFactory(username="bob")
    UserFactory(username="carol")  # owns nothing
    WorkflowFactory(owner=alice, workflow_type="etl")
    WorkflowFactory(owner=alice, workflow_type="report")
    WorkflowFactory(owner=bob, workflow_type="etl")
    WorkflowFactory(owner=None, workflow_type="")
    TaskExecutionFactory(workflow=WorkflowFactory(owner=bob, workflow_type="etl"))
    response, _ = _statements(su_client, _url(Workflow))
    filters = {
        spec.title: [choice["display"] for choice in spec.choices(response.context["cl"])]
        for spec in response.context["cl"].filter_specs
    }
    assert filters["workflow type"] == ["All", "", "etl", "report"]
    assert filters["owner"] == ["All", "alice", "bob", "-"]  # "-": no owner, as Django's filter offers
    response, _ = _statements(su_client, _url(TaskExecution))
    owners = next(spec for spec in response.context["cl"].filter_specs if spec.field_path == "workflow__owner")
    assert [choice["display"] for choice in owners.choices(response.context["cl"])] == ["All", "alice", "bob", "-"]
    # Choosing a value filters as Django's own filter does.
    response, _ = _statements(su_client, _url(Workflow) + "?workflow_type=etl")
    assert response.context["cl"].result_count == 3


def test_distinct_indexed_values_stops_at_its_limit():
    for name in ("c", "a", "b", "a"):
        WorkflowFactory(workflow_type=name)
    assert scale.distinct_indexed_values(Workflow, "workflow_type") == ["a", "b", "c"]
    assert scale.distinct_indexed_values(Workflow, "workflow_type", limit=2) == ["a", "b"]


def test_a_page_of_warnings_reads_the_severity_index(transactional_db):
    with connection.cursor() as cursor:
        cursor.execute("SET enable_seqscan = off")
        try:
            cursor.execute(
                "EXPLAIN SELECT sequence FROM events WHERE severity = 'warning' ORDER BY sequence DESC LIMIT 100"
            )
            plan = "\n".join(row[0] for row in cursor.fetchall())
        finally:
            cursor.execute("SET enable_seqscan = on")
    assert "idx_events_severity_flagged" in plan, plan


def test_the_owner_filter_offers_every_owner_like_djangos(su_client):
    """FILTER_VALUES_LIMIT (200) also cuts the owner filter: with more than 200 users who
    own workflows, those with the highest ids (the newest users) are silently not offered,
    where RelatedOnlyFieldListFilter offered every one."""
    owners = [UserFactory(username=f"owner{i:03d}") for i in range(scale.FILTER_VALUES_LIMIT + 5)]
    for owner in owners:
        WorkflowFactory(owner=owner)
    response, _ = _statements(su_client, _url(Workflow))
    spec = next(spec for spec in response.context["cl"].filter_specs if spec.field_path == "owner")
    offered = [choice["display"] for choice in spec.choices(response.context["cl"])]
    assert owners[-1].username in offered, len(offered)


def _assert_found_by_index(statements: list[str], term: str) -> None:
    """`term` is an index condition in the plans of the statements naming it (as a big table
    gets them), never a filter applied to every row read."""
    plans = []
    with connection.cursor() as cursor:
        cursor.execute("SET enable_seqscan = off")
        try:
            for sql in statements:
                if sql.startswith("SELECT") and term in sql:
                    cursor.execute("EXPLAIN " + sql.replace("%", "%%"))
                    plans.append("\n".join(row[0] for row in cursor.fetchall()))
        finally:
            cursor.execute("SET enable_seqscan = on")
    lines = [line for plan in plans for line in plan.splitlines()]
    assert [line for line in lines if "Index Cond" in line and term in line], plans
    assert not [line for line in lines if "Filter" in line and term in line], plans


@pytest.mark.parametrize(
    "model", [Workflow, TaskExecution, TaskAttempt, AgentPlaygroundMessage], ids=lambda model: model.__name__
)
def test_an_id_pasted_in_the_search_is_found_by_its_index(su_client, model):
    """Django's `=` search compares UPPER(column), which no index holds, OR-ed with substring
    searches, which none can serve: one id cost a read of every row (0.7 s at 300 000
    workflows, for the count and again for the page)."""
    task = TaskExecutionFactory()
    attempt = TaskAttemptFactory(execution=task, celery_task_id="c3d2a1b0-celery-message-id")
    message = MessageFactory(execution=task)
    term = {Workflow: task.workflow_id, TaskExecution: task.pk, TaskAttempt: attempt.celery_task_id}.get(
        model, message.pk
    )
    response, statements = _statements(su_client, f"{_url(model)}?q={term}")
    assert response.context["cl"].result_count == 1
    _assert_found_by_index(statements, term)
    # A name is still searched by substring, as before.
    response, _ = _statements(su_client, f"{_url(Workflow)}?q=workflow")
    assert response.context["cl"].result_count >= 1


def test_an_id_searched_in_the_event_log_is_found_by_its_indexes(su_client):
    """The event search looks a term up in five id columns at once: with one of them
    (session_id) in no index, the OR of them was no index condition, and every search read
    the whole log (0.3 s at 4 M events, twice per page)."""
    EventFactory(entity_type="conversation", entity_id="thread-7", session_id="thread-7")
    EventFactory()
    response, statements = _statements(su_client, f"{_url(Event)}?q=thread-7")
    assert response.context["cl"].result_count == 1
    _assert_found_by_index(statements, "thread-7")


def test_a_term_that_is_an_id_still_finds_the_rows_it_names(su_client):
    """A term that is one row's id (an idempotency key is the client's own string) and another
    row's name finds both, as Django's search does: an operator searching a name is not shown
    only the row whose key happens to be that name."""
    keyed = WorkflowFactory(name="nightly-report", idempotency_key="nightly-report")
    other = WorkflowFactory(name="nightly-report")
    response, _ = _statements(su_client, f"{_url(Workflow)}?q=nightly-report")
    assert {row.pk for row in response.context["cl"].result_list} == {keyed.pk, other.pk}


def _inline_rows(response: Any) -> int:
    (inline,) = response.context["inline_admin_formsets"]
    return len(inline.formset.forms)


def test_a_workflow_page_shows_its_first_tasks_and_links_to_them_all(su_client, monkeypatch):
    """A form per task: a workflow of 5,000 tasks was a 14.5 MB page that took 47 s."""
    from orchestration.admin.workflows import TaskExecutionInline

    monkeypatch.setattr(TaskExecutionInline, "shown", 5, raising=False)
    workflow = WorkflowFactory(name="before")
    for _ in range(8):
        TaskExecutionFactory(workflow=workflow)
    url = reverse("admin:orchestration_workflow_change", args=[workflow.pk])

    page = su_client.get(url)

    assert _inline_rows(page) == 5
    all_tasks = f"{_url(TaskExecution)}?workflow__workflow_id__exact={workflow.pk}"
    assert f'(the first 5: <a href="{all_tasks}">all of them</a>)' in page.content.decode()
    assert su_client.get(all_tasks).context["cl"].result_count == 8
    # The page still saves what it edits.
    form = page.context["adminform"].form
    data = {name: form[name].value() or "" for name in ("description", "workflow_type", "priority")}
    management = page.context["inline_admin_formsets"][0].formset.management_form
    data |= {management.add_prefix(name): management.initial.get(name, "") for name in management.fields}
    response = su_client.post(url, {**data, "name": "after", "deadline_0": "", "deadline_1": ""})
    assert response.status_code == 302
    workflow.refresh_from_db()
    assert workflow.name == "after"


def test_a_task_page_shows_its_first_attempts_and_links_to_them_all(su_client, monkeypatch):
    """A form per attempt: a task tried 1,000 times was a 3.3 MB page that took 13 s."""
    from orchestration.admin.tasks import TaskAttemptInline

    monkeypatch.setattr(TaskAttemptInline, "shown", 5, raising=False)
    task = TaskExecutionFactory()
    for number in range(1, 9):
        TaskAttemptFactory(execution=task, attempt_number=number, failed=True)

    page = su_client.get(reverse("admin:orchestration_taskexecution_change", args=[task.pk]))

    assert _inline_rows(page) == 5
    all_attempts = f"{_url(TaskAttempt)}?execution__execution_id__exact={task.pk}"
    assert f'(the first 5: <a href="{all_attempts}">all of them</a>)' in page.content.decode()
    assert su_client.get(all_attempts).context["cl"].result_count == 8


def test_a_page_with_fewer_rows_than_it_shows_lists_them_all_under_the_plain_heading(su_client):
    task = TaskExecutionFactory()
    for number in range(1, 4):
        TaskAttemptFactory(execution=task, attempt_number=number, failed=True)

    page = su_client.get(reverse("admin:orchestration_taskexecution_change", args=[task.pk]))

    assert _inline_rows(page) == 3
    assert "the first" not in page.content.decode()


@pytest.mark.parametrize(
    ("model", "unread"),
    [
        (Workflow, ['"workflows"."spec"', '"workflows"."step_results"', '"workflows"."state_data"']),
        (TaskExecution, ['"workflows"."spec"', '"workflows"."step_results"', '"task_executions"."output_data"']),
        (TaskAttempt, ['"workflows"."spec"', '"workflows"."step_results"', '"task_executions"."output_data"']),
        (AgentInteraction, ['"workflows"."spec"', '"workflows"."step_results"']),
    ],
    ids=lambda value: getattr(value, "__name__", "columns"),
)
def test_a_list_reads_no_document_it_does_not_show(su_client, model, unread):
    """A workflow's spec and step results grow with its tasks (5,000 of them: megabytes), and a
    task's output is a model's whole answer: a page of tasks of big workflows took 12 s, most of
    it decoding each line's workflow spec."""
    workflow = WorkflowFactory(spec={"tasks": ["…"]}, step_results={"a": "…"})
    task = TaskExecutionFactory(workflow=workflow, output_data={"answer": "…"})
    TaskAttemptFactory(execution=task, attempt_number=1, failed=True)
    InteractionFactory(workflow=workflow, execution=task)

    response, statements = _statements(su_client, _url(model))

    page = max((sql for sql in statements if f'FROM "{model._meta.db_table}"' in sql), key=len)  # the rows'
    for column in unread:
        assert column not in page, column
    assert response.context["cl"].result_count == 1


def _sorts(plan: dict, kinds: tuple[str, ...] = ("Sort",)) -> list[dict]:
    """The Sort nodes of an EXPLAIN (FORMAT JSON) plan, plain ones only by default (an
    Incremental Sort only orders rows an index already gives in order of their first key)."""
    found = [plan] if plan["Node Type"] in kinds else []
    for child in plan.get("Plans", ()):
        found += _sorts(child, kinds)
    return found


def _page_plan(client: Client, model: type[models.Model], url: str) -> dict:
    """The plan of the statement that reads the list's page at `url` (of 2 rows, as a test sets
    list_per_page), as a big table gets it."""
    _, statements = _statements(client, url)
    page = max((sql for sql in statements if f'FROM "{model._meta.db_table}"' in sql), key=len)
    assert page.endswith("LIMIT 2"), page
    with connection.cursor() as cursor:
        cursor.execute("SET enable_seqscan = off")  # the plan a big table gets, on a small one
        try:
            cursor.execute(f"EXPLAIN (FORMAT JSON) {page}")
            (plan,) = cursor.fetchone()[0]
        finally:
            cursor.execute("SET enable_seqscan = on")
    return plan["Plan"]


ROW_MAKERS = {
    Event: EventFactory,
    Workflow: WorkflowFactory,
    TaskExecution: TaskExecutionFactory,
    TaskAttempt: lambda: TaskAttemptFactory(failed=True),
    AgentPlaygroundMessage: MessageFactory,
    AgentInteraction: InteractionFactory,
    AgentMetric: MetricFactory,
}


@pytest.mark.parametrize("model", BIG_TABLES, ids=lambda model: model.__name__)
def test_a_big_tables_page_is_read_in_the_order_of_an_index_not_sorted(su_client, monkeypatch, model):
    """A page ordered by a column no index holds sorts the whole table first: the attempts list
    (by started_at) took 2.6 s at 1.3 M attempts, the messages and interactions lists (by
    created_at) 1 to 2 s at 500 000 rows, and grew with the table."""
    for _ in range(3):
        ROW_MAKERS[model]()
    monkeypatch.setattr(type(admin.site._registry[model]), "list_per_page", 2)  # one page of several
    assert [node["Sort Key"] for node in _sorts(_page_plan(su_client, model, _url(model)))] == []


@pytest.mark.parametrize("order", ["", "-"], ids=["ascending", "descending"])
def test_the_event_log_is_sorted_by_no_column_its_indexes_do_not_read_in_order(su_client, monkeypatch, order):
    """Sorted by any other column than the sequence, the page sorted the whole log (or all the
    events of the column's first value) before showing any: at 1 M events 1.0 s by created at,
    1.5 s by severity or source, 0.85 s by type, 0.6 s by agent, for a page read in 0.1 ms. Nor
    does a URL naming such a column (`?o=6`) sort by it."""
    for _ in range(3):
        EventFactory()
    monkeypatch.setattr(type(admin.site._registry[Event]), "list_per_page", 2)
    columns = admin.site._registry[Event].list_display
    sorted_by = {}
    for index, column in enumerate(columns):
        plan = _page_plan(su_client, Event, f"{_url(Event)}?o={order}{index}")
        sorted_by[column] = [node["Sort Key"] for node in _sorts(plan, ("Sort", "Incremental Sort"))]
    assert sorted_by == {column: [] for column in columns}


@pytest.mark.parametrize("model", BIG_TABLES, ids=lambda model: model.__name__)
def test_a_sorted_list_is_counted_in_no_order(su_client, model):
    """Any n rows count the same. A count that kept the list's order (a LIMIT keeps it) sorted
    the whole table when the list was sorted by a column no index holds: 0.5 s for the events
    by "created at" at 4 M events, as much again as the page."""
    ROW_MAKERS[model]()
    _, statements = _statements(su_client, f"{_url(model)}?o=-1")
    table = model._meta.db_table
    counts = [sql for sql in statements if "COUNT(" in sql.upper() and f'"{table}"' in sql]
    assert counts, statements
    assert not [sql for sql in counts if "ORDER BY" in sql], counts


def test_a_term_in_no_task_is_searched_in_the_names_alone(su_client):
    """Django's search of a term that is no id compared UPPER() of the task's, its workflow's and
    every attempt's id, and joined the attempts, so the list was read DISTINCT: 2.3-4 s a page
    at 900 000 tasks. The ids are looked up by index; the statements reading the list compare
    only the names (the workflow's in its own table, not joined to every task)."""
    TaskAttemptFactory(celery_task_id="c3d2a1b0-celery-message-id")
    response, statements = _statements(su_client, f"{_url(TaskExecution)}?q=nothing")
    assert response.context["cl"].result_count == 0
    listing = [sql for sql in statements if "task_executions" in sql and "LIKE" in sql]
    assert listing
    assert not [sql for sql in listing if "DISTINCT" in sql or "task_attempts" in sql or "IN ('nothing')" in sql]


def test_a_task_is_found_by_any_of_its_ids_pasted_in_another_case_or_beside_a_name(su_client):
    """The ids are written lower-case (new_id(), Celery's uuid4()): an id pasted upper-cased is
    found as Django's case-insensitive search found it, by the index; and a word of a term may
    still be an id while another is a name, as in Django's search."""
    task = TaskExecutionFactory(task_name="summarise")
    TaskExecutionFactory(task_name="summarise")
    attempt = TaskAttemptFactory(execution=task, celery_task_id="c3d2a1b0-celery-message-id")
    for term in (task.pk.upper(), task.workflow_id.upper(), attempt.celery_task_id.upper()):
        response, statements = _statements(su_client, f"{_url(TaskExecution)}?q={term}")
        assert [row.pk for row in response.context["cl"].result_list] == [task.pk], term
        _assert_found_by_index(statements, term)
    response, _ = _statements(su_client, f"{_url(TaskExecution)}?q={attempt.celery_task_id} summarise")
    assert [row.pk for row in response.context["cl"].result_list] == [task.pk]
    response, _ = _statements(su_client, f"{_url(TaskExecution)}?q=summarise")
    assert response.context["cl"].result_count == 2
    response, _ = _statements(su_client, f"{_url(TaskExecution)}?q={task.workflow.name}")
    assert [row.pk for row in response.context["cl"].result_list] == [task.pk]


def test_a_word_in_no_field_finds_no_task_when_the_search_fields_are_all_ids(su_client, monkeypatch):
    """A word that is no id and that no other search field holds matched every task: the ids'
    condition, with no row found, was an empty Q() (Django's search lists none)."""
    monkeypatch.setattr(
        type(admin.site._registry[TaskExecution]), "search_fields", ("=execution_id", "=attempts__celery_task_id")
    )
    TaskAttemptFactory(celery_task_id="c3d2a1b0-celery-message-id")
    TaskExecutionFactory()
    response, _ = _statements(su_client, f"{_url(TaskExecution)}?q=nothing")
    assert response.context["cl"].result_count == 0
    assert list(response.context["cl"].result_list) == []


def test_a_task_found_by_several_of_its_attempts_is_listed_once(su_client, monkeypatch):
    """A substring field through a to-many relation was matched across a join: a task two of
    whose attempts matched was listed twice and counted twice, the search having told Django's
    list there were no duplicates to remove."""
    task_admin = type(admin.site._registry[TaskExecution])
    monkeypatch.setattr(task_admin, "search_fields", (*task_admin.search_fields, "attempts__worker"))
    task = TaskExecutionFactory()
    TaskAttemptFactory(execution=task, attempt_number=1, worker="celery@host-7")
    TaskAttemptFactory(execution=task, attempt_number=2, worker="celery@host-7")
    TaskAttemptFactory(worker="celery@host-8")
    response, _ = _statements(su_client, f"{_url(TaskExecution)}?q=host-7")
    assert response.context["cl"].result_count == 1
    assert [row.pk for row in response.context["cl"].result_list] == [task.pk]
