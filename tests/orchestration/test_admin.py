"""The operations console (Django admin) for the orchestration models."""

from __future__ import annotations

import datetime as dt
import io
import json
import re
from collections.abc import Callable
from html.parser import HTMLParser
from typing import Any

import pytest
from django.contrib import admin
from django.contrib.admin.models import LogEntry
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission
from django.core.management import call_command
from django.db import connection, models
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone
from django.utils.html import escape
from django_celery_beat.models import PeriodicTask

from orchestration.admin.workflows import TaskExecutionInline
from orchestration.models import (
    Agent,
    AgentInteraction,
    AgentMetric,
    AgentPlaygroundMessage,
    ApiKey,
    Event,
    TaskAttempt,
    TaskExecution,
    Workflow,
)
from orchestration.services.access import api_key_create, api_key_revoke
from orchestration.services.conversations import conversation_message_post
from orchestration.services.specs import spec_parse
from orchestration.services.workflows import workflow_submit
from tests.engine import wait_for
from tests.factories import (
    AgentFactory,
    ApiKeyFactory,
    EventFactory,
    InteractionFactory,
    MessageFactory,
    MetricFactory,
    TaskAttemptFactory,
    TaskExecutionFactory,
    UserFactory,
    WorkflowFactory,
)
from tests.orchestration.edge_agents import edge_agent

pytestmark = pytest.mark.django_db


def _event() -> Event:
    workflow = WorkflowFactory()
    return EventFactory(entity_id=workflow.pk, workflow_id=workflow.pk, agent_id=AgentFactory().pk)


# One row of each model, created with its own related rows (workflow, agent, owner, ...), so a
# changelist that fetches a related row per line shows up as more queries for more rows.
MAKERS: dict[type[models.Model], Callable[[], models.Model]] = {
    Agent: AgentFactory,
    Workflow: WorkflowFactory,
    TaskExecution: TaskExecutionFactory,
    TaskAttempt: lambda: TaskAttemptFactory(failed=True),
    Event: _event,
    AgentPlaygroundMessage: lambda: MessageFactory(owner=UserFactory(), execution=TaskExecutionFactory()),
    AgentMetric: MetricFactory,
    AgentInteraction: lambda: InteractionFactory(execution=TaskExecutionFactory()),
    ApiKey: ApiKeyFactory,
}
ALL_MODELS = list(MAKERS)
VIEWER_MODELS = [Agent, Workflow, TaskExecution, TaskAttempt, Event, AgentInteraction]
NOT_FOR_VIEWERS = [m for m in ALL_MODELS if m not in VIEWER_MODELS]
ADDABLE = [Agent]


def _ids(model: type[models.Model]) -> str:
    return model.__name__


def _url(model: type[models.Model], view: str, *args: Any) -> str:
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_{view}", args=args)


def _count_queries(client: Client, url: str) -> int:
    with CaptureQueriesContext(connection) as queries:
        response = client.get(url)
    assert response.status_code == 200
    return len(queries.captured_queries)


def _management_data(response: Any) -> dict[str, Any]:
    """The inline formsets' management forms as the change page rendered them."""
    data: dict[str, Any] = {}
    for inline in response.context["inline_admin_formsets"]:
        management = inline.formset.management_form
        for name in management.fields:
            data[management.add_prefix(name)] = management.initial.get(name, "")
    return data


@pytest.fixture
def superuser() -> Any:
    return UserFactory(is_staff=True, is_superuser=True)


@pytest.fixture
def su_client(client: Client, superuser: Any) -> Client:
    client.force_login(superuser)
    return client


@pytest.fixture
def viewer_client(client: Client) -> Client:
    client.force_login(UserFactory(role="viewer"))
    return client


@pytest.mark.parametrize("model", ALL_MODELS, ids=_ids)
def test_superuser_sees_every_changelist_and_change_page(su_client: Client, model: type[models.Model]) -> None:
    obj = MAKERS[model]()

    changelist = su_client.get(_url(model, "changelist"))
    change = su_client.get(_url(model, "change", obj.pk))

    assert changelist.status_code == 200
    assert changelist.context["cl"].result_count == 1
    assert change.status_code == 200


@pytest.mark.parametrize("model", ALL_MODELS, ids=_ids)
def test_add_page_only_where_records_are_not_written_by_the_platform(
    su_client: Client, model: type[models.Model]
) -> None:
    response = su_client.get(_url(model, "add"))

    assert response.status_code == (200 if model in ADDABLE else 403)


def test_superuser_adds_an_agent(su_client: Client) -> None:
    response = su_client.post(
        _url(Agent, "add"),
        {"id": "new-001", "name": "New", "executor": "python", "status": "active", "entrypoint": "builtins.len"},
    )

    assert response.status_code == 302, response.context["adminform"].form.errors
    assert Agent.objects.get(pk="new-001").name == "New"


def test_an_http_agent_at_a_loopback_address_is_refused_in_the_console(su_client: Client, settings: Any) -> None:
    """As through the API: the agent would fail every task with this very explanation."""
    settings.AGENT_HTTP_ALLOW_PRIVATE = False
    response = su_client.post(
        _url(Agent, "add"),
        {"id": "svc-001", "name": "Svc", "executor": "http", "status": "active", "url": "http://127.0.0.1:9000/"},
    )
    assert response.status_code == 200
    assert response.context["adminform"].form.non_field_errors() == [
        "url: agent URL 'http://127.0.0.1:9000/' refused: '127.0.0.1' is a loopback address "
        "(set AGENT_HTTP_ALLOW_PRIVATE=true to allow)"
    ]
    assert not Agent.objects.filter(pk="svc-001").exists()


@pytest.mark.parametrize("model", VIEWER_MODELS, ids=_ids)
def test_viewer_sees_changelist_and_change_page_without_edit_controls(
    viewer_client: Client, model: type[models.Model]
) -> None:
    obj = MAKERS[model]()

    changelist = viewer_client.get(_url(model, "changelist"))
    change = viewer_client.get(_url(model, "change", obj.pk))

    assert changelist.status_code == 200
    assert changelist.context["cl"].result_count == 1
    assert b"delete_selected" not in changelist.content
    assert change.status_code == 200
    assert change.context["has_change_permission"] is False
    assert b'name="_save"' not in change.content
    assert change.context["adminform"].form.fields == {}


@pytest.mark.parametrize("model", NOT_FOR_VIEWERS, ids=_ids)
def test_viewer_cannot_see_what_the_role_does_not_grant(viewer_client: Client, model: type[models.Model]) -> None:
    obj = MAKERS[model]()

    assert viewer_client.get(_url(model, "changelist")).status_code == 403
    assert viewer_client.get(_url(model, "change", obj.pk)).status_code == 403


def test_viewer_posting_a_workflow_change_is_forbidden_and_changes_nothing(viewer_client: Client) -> None:
    workflow = WorkflowFactory(name="original")

    response = viewer_client.post(
        _url(Workflow, "change", workflow.pk), {"name": "changed", "priority": "high", "tasks-TOTAL_FORMS": "0"}
    )

    assert response.status_code == 403
    workflow.refresh_from_db()
    assert (workflow.name, workflow.priority) == ("original", "normal")


def test_viewer_posting_an_agent_change_is_forbidden_and_changes_nothing(viewer_client: Client) -> None:
    agent = AgentFactory(name="original")

    response = viewer_client.post(
        _url(Agent, "change", agent.pk), {"name": "changed", "executor": "python", "status": "inactive"}
    )

    assert response.status_code == 403
    agent.refresh_from_db()
    assert (agent.name, agent.status) == ("original", "active")


def test_event_cannot_be_added_changed_or_deleted_even_by_a_superuser(su_client: Client) -> None:
    event = EventFactory(payload={"k": "v"})

    changelist = su_client.get(_url(Event, "changelist"))
    change = su_client.get(_url(Event, "change", event.pk))

    assert changelist.status_code == 200
    assert b"delete_selected" not in changelist.content
    assert change.status_code == 200
    assert change.context["has_change_permission"] is False
    assert change.context["has_delete_permission"] is False
    assert b'name="_save"' not in change.content
    assert su_client.get(_url(Event, "add")).status_code == 403
    assert su_client.get(_url(Event, "delete", event.pk)).status_code == 403
    assert su_client.post(_url(Event, "delete", event.pk), {"post": "yes"}).status_code == 403
    assert su_client.post(_url(Event, "change", event.pk), {"source": "edited"}).status_code == 403
    assert Event.objects.get(pk=event.pk).source == "platform"


def test_task_attempt_cannot_be_added_or_changed(su_client: Client) -> None:
    attempt = TaskAttemptFactory(failed=True)

    change = su_client.get(_url(TaskAttempt, "change", attempt.pk))

    assert change.context["has_change_permission"] is False
    assert b'name="_save"' not in change.content
    assert su_client.post(_url(TaskAttempt, "change", attempt.pk), {"worker": "edited"}).status_code == 403


@pytest.mark.parametrize("model", ALL_MODELS, ids=_ids)
def test_changelist_query_count_does_not_grow_with_rows(su_client: Client, model: type[models.Model]) -> None:
    url = _url(model, "changelist")
    for _ in range(3):
        MAKERS[model]()
    su_client.get(url)
    with_3_rows = _count_queries(su_client, url)
    for _ in range(12):
        MAKERS[model]()

    with_15_rows = _count_queries(su_client, url)

    assert model.objects.count() >= 15
    assert with_15_rows == with_3_rows


def test_workflow_change_query_count_does_not_grow_with_tasks(su_client: Client) -> None:
    workflow = WorkflowFactory()
    for _ in range(2):
        TaskExecutionFactory(workflow=workflow)
    url = _url(Workflow, "change", workflow.pk)
    su_client.get(url)
    with_2_tasks = _count_queries(su_client, url)
    for _ in range(8):
        TaskExecutionFactory(workflow=workflow)

    assert _count_queries(su_client, url) == with_2_tasks


class _FormData(HTMLParser):
    """What a browser posts from the form `form_id` of a page: its inputs (checkboxes only when
    checked, no buttons), selected options and textareas."""

    def __init__(self, form_id: str) -> None:
        super().__init__()
        self.form_id, self.inside, self.data = form_id, False, {}
        self.select: str | None = None
        self.textarea: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "form":
            self.inside = a.get("id") == self.form_id
        elif not self.inside:
            return
        elif tag == "option" and self.select and "selected" in a:
            self.data[self.select] = a.get("value") or ""
        elif tag == "input" and a.get("name") and a.get("type") not in ("submit", "button"):
            if a.get("type") != "checkbox" or "checked" in a:
                self.data[a["name"]] = a.get("value") or ""
        elif tag in ("select", "textarea") and a.get("name"):
            setattr(self, tag, a["name"])
            self.data[a["name"]] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self.inside = False
        elif tag in ("select", "textarea"):
            setattr(self, tag, None)

    def handle_data(self, data: str) -> None:
        if self.textarea:
            # A browser drops the newline that opens a textarea's text.
            self.data[self.textarea] += data.removeprefix("\n") if not self.data[self.textarea] else data


def _posted(page: Any, form_id: str) -> dict[str, str]:
    parser = _FormData(form_id)
    parser.feed(page.content.decode())
    return parser.data


def test_a_workflow_with_many_tasks_lists_the_first_and_its_page_saves(su_client: Client) -> None:
    """A workflow may have thousands of tasks (WORKFLOW_MAX_TASKS). Its page drew them all, each
    a row of the page's form (seconds per hundreds of rows) posted with every save: past about
    500 tasks, saving a change of its description was a 400 (too many fields)."""
    workflow = WorkflowFactory(name="big", total_steps=600)
    agent = AgentFactory()
    TaskExecution.objects.bulk_create(TaskExecutionFactory.build_batch(600, workflow=workflow, agent=agent))
    url = _url(Workflow, "change", workflow.pk)
    page = su_client.get(url)

    saved = su_client.post(url, {**_posted(page, "workflow_form"), "description": "edited"})

    assert saved.status_code == 302
    workflow.refresh_from_db()
    assert workflow.description == "edited"
    shown = [form.instance for form in page.context["inline_admin_formsets"][0].formset.forms]
    first = list(TaskExecution.objects.filter(workflow=workflow).order_by("created_at", "execution_id"))
    assert shown == first[: TaskExecutionInline.shown]
    tasks_link = escape(f"{_url(TaskExecution, 'changelist')}?workflow__workflow_id__exact={workflow.pk}")
    assert f'(the first {TaskExecutionInline.shown}: <a href="{tasks_link}">all of them</a>)' in page.content.decode()


def test_task_change_query_count_does_not_grow_with_attempts(su_client: Client) -> None:
    task = TaskExecutionFactory()
    TaskAttemptFactory(execution=task, attempt_number=1, failed=True)
    url = _url(TaskExecution, "change", task.pk)
    su_client.get(url)
    with_1_attempt = _count_queries(su_client, url)
    for number in range(2, 6):
        TaskAttemptFactory(execution=task, attempt_number=number, failed=True)

    assert _count_queries(su_client, url) == with_1_attempt


def test_workflow_page_lists_its_tasks_with_links_and_links_its_events(su_client: Client) -> None:
    workflow = WorkflowFactory()
    tasks = [TaskExecutionFactory(workflow=workflow, task_name=name) for name in ("fetch", "summarise")]
    other = TaskExecutionFactory(task_name="not-mine")

    content = su_client.get(_url(Workflow, "change", workflow.pk)).content.decode()

    for task in tasks:
        assert f'<a href="{_url(TaskExecution, "change", task.pk)}">{task.task_name}</a>' in content
    assert other.task_name not in content
    assert escape(f"{_url(Event, 'changelist')}?workflow_id={workflow.pk}") in content


def test_event_changelist_filters_by_the_linked_workflow_id(su_client: Client) -> None:
    workflow = WorkflowFactory()
    mine = EventFactory(workflow_id=workflow.pk)
    EventFactory(workflow_id="someone-else")

    response = su_client.get(_url(Event, "changelist"), {"workflow_id": workflow.pk})

    assert [event.pk for event in response.context["cl"].result_list] == [mine.pk]


def test_task_page_shows_its_attempts_and_events_of_the_task_and_its_attempts(su_client: Client) -> None:
    task = TaskExecutionFactory()
    first = TaskAttemptFactory(execution=task, attempt_number=1, failed=True, error_class="RateLimitError")
    TaskAttemptFactory(execution=task, attempt_number=2, succeeded=True)
    task_event = EventFactory(event_type="task_queued", entity_type="task", entity_id=task.pk)
    attempt_event = EventFactory(event_type="task_retrying", entity_type="attempt", entity_id=str(first.pk))
    foreign_event = EventFactory(event_type="task_failed", entity_type="task", entity_id="another-task")

    response = su_client.get(_url(TaskExecution, "change", task.pk))
    content = response.content.decode()

    assert response.status_code == 200
    attempts = response.context["inline_admin_formsets"][0].formset.queryset
    assert [attempt.attempt_number for attempt in attempts] == [1, 2]
    assert "RateLimitError" in content
    assert f'<a href="{_url(TaskAttempt, "change", first.pk)}">1</a>' in content
    for event in (task_event, attempt_event):
        assert f'<a href="{_url(Event, "change", event.pk)}">{event.pk}</a>' in content
    assert _url(Event, "change", foreign_event.pk) not in content
    assert escape(f"{_url(Event, 'changelist')}?entity_id={task.pk}") in content


def test_attempt_page_shows_the_events_of_that_attempt(su_client: Client) -> None:
    task = TaskExecutionFactory()
    first = TaskAttemptFactory(execution=task, attempt_number=1, failed=True)
    TaskAttemptFactory(execution=task, attempt_number=2, succeeded=True)
    retrying = EventFactory(event_type="task_retrying", entity_type="task", entity_id=task.pk, payload={"attempt": 1})
    completed = EventFactory(event_type="task_completed", entity_type="task", entity_id=task.pk, payload={"attempt": 2})

    content = su_client.get(_url(TaskAttempt, "change", first.pk)).content.decode()

    assert f'<a href="{_url(Event, "change", retrying.pk)}">{retrying.pk}</a>' in content
    assert _url(Event, "change", completed.pk) not in content


def test_a_task_or_attempt_page_shows_events_only_to_staff_who_may_view_events(client: Client) -> None:
    """The audit log is its own model: a staff user who may view tasks and attempts but not
    events does not read the events' payloads on their pages (the event list would refuse them)."""
    task = TaskExecutionFactory()
    attempt = TaskAttemptFactory(execution=task, attempt_number=1, failed=True)
    EventFactory(
        event_type="task_retrying", entity_type="task", entity_id=task.pk, payload={"attempt": 1, "k": "PAYLOAD"}
    )
    pages = [_url(TaskExecution, "change", task.pk), _url(TaskAttempt, "change", attempt.pk)]

    client.force_login(_staff_with("view_taskexecution", "view_taskattempt"))
    assert client.get(_url(Event, "changelist")).status_code == 403
    for page in pages:
        response = client.get(page)
        assert response.status_code == 200
        assert "PAYLOAD" not in response.content.decode()

    client.force_login(_staff_with("view_taskexecution", "view_taskattempt", "view_event"))
    for page in pages:
        assert "PAYLOAD" in client.get(page).content.decode()


@pytest.mark.django_db(transaction=True)
def test_a_conversation_is_read_on_its_reply_tasks_page_only_by_staff_who_may_view_messages(engine, client) -> None:
    """A conversation's reply task holds the user's message as its input and the agent's reply
    as its output. A staff user who may view tasks but not conversation messages (the viewer
    role: the message list answers them 403) read every user's conversations there."""
    engine()
    asked = conversation_message_post(
        agent=Agent.objects.get(pk="assistant"),
        instance_id="alice-1",
        content="keywords: diagnosis hemoglobin",
        owner=UserFactory(username="alice"),
    )
    task = wait_for(lambda: (t := TaskExecution.objects.get(pk=asked.execution_id)).is_terminal and t, what="the reply")
    assert task.status == TaskExecution.Status.COMPLETED
    page = _url(TaskExecution, "change", task.pk)

    client.force_login(UserFactory(role="viewer"))
    assert client.get(_url(AgentPlaygroundMessage, "changelist")).status_code == 403
    response = client.get(page)
    assert response.status_code == 200
    assert "hemoglobin" not in response.content.decode()
    assert client.get(_url(TaskExecution, "changelist")).status_code == 200

    client.force_login(_staff_with("view_taskexecution", "view_agentplaygroundmessage"))
    assert "hemoglobin" in client.get(page).content.decode()


def _conversation_replied(agent_id: str, content: str) -> TaskExecution:
    asked = conversation_message_post(
        agent=Agent.objects.get(pk=agent_id),
        instance_id=f"alice-{agent_id}",
        content=content,
        owner=UserFactory(username="alice"),
    )
    task = wait_for(lambda: (t := TaskExecution.objects.get(pk=asked.execution_id)).is_terminal and t, what="the reply")
    assert task.status == TaskExecution.Status.COMPLETED
    return task


@pytest.mark.django_db(transaction=True)
def test_a_conversations_hand_offs_are_read_in_the_interactions_only_by_staff_who_may_view_messages(
    engine, client
) -> None:
    """A hand-off made by a conversation's reply task holds the user's message (the hand-off's
    input and its output in the payload, here its message too). The viewer role may view
    interactions, not conversations: it read every user's there, in the list and on the page."""
    engine()
    edge_agent("relay", "relays")
    task = _conversation_replied("relay", "diagnosis hemoglobin")
    interaction = AgentInteraction.objects.get(execution=task)
    of_workflow = InteractionFactory(message="a workflow's hand-off")
    lists, page = _url(AgentInteraction, "changelist"), _url(AgentInteraction, "change", interaction.pk)

    client.force_login(UserFactory(role="viewer"))
    assert client.get(_url(AgentPlaygroundMessage, "changelist")).status_code == 403
    listed = client.get(lists).content.decode()
    assert "hemoglobin" not in listed
    assert "a workflow&#x27;s hand-off" in listed  # the rest of the list is as it was
    shown = client.get(page)
    assert shown.status_code == 200
    assert "hemoglobin" not in shown.content.decode()
    assert "a workflow&#x27;s hand-off" in client.get(_url(AgentInteraction, "change", of_workflow.pk)).content.decode()

    client.force_login(_staff_with("view_agentinteraction", "view_agentplaygroundmessage"))
    assert "hemoglobin" in client.get(lists).content.decode()
    assert "hemoglobin" in client.get(page).content.decode()


@pytest.mark.django_db(transaction=True)
def test_a_conversations_tool_calls_and_hand_offs_show_their_payload_only_to_staff_who_may_view_messages(
    engine, client
) -> None:
    """The tool_executed event of a tool a conversation's reply called holds the user's text
    (its input_params), an agent_interaction event the hand-off's message: the viewer role may
    view events, not conversations, and read every user's on the event's page."""
    engine()
    edge_agent("relay", "relays")
    _conversation_replied("assistant", "stats: diagnosis hemoglobin")
    _conversation_replied("relay", "diagnosis anaemia")
    tool = Event.objects.get(event_type="tool_executed")
    handoff = Event.objects.get(event_type="agent_interaction")
    of_workflow = EventFactory(event_type="tool_executed", workflow_id=WorkflowFactory().pk, payload={"x": "PAYLOAD"})
    pages = {_url(Event, "change", event.pk): word for event, word in ((tool, "hemoglobin"), (handoff, "anaemia"))}

    client.force_login(UserFactory(role="viewer"))
    for page, word in pages.items():
        shown = client.get(page)
        assert shown.status_code == 200
        assert word not in shown.content.decode()
    assert "PAYLOAD" in client.get(_url(Event, "change", of_workflow.pk)).content.decode()

    client.force_login(_staff_with("view_event", "view_agentplaygroundmessage"))
    for page, word in pages.items():
        assert word in client.get(page).content.decode()


def test_json_fields_are_pretty_printed_and_escaped(su_client: Client) -> None:
    hostile = {"z": [1, 2], "a": "<script>alert('x')</script>", "nested": {"y": True}}
    task = TaskExecutionFactory(input_data=hostile, output_data={"answer": 42})
    event = EventFactory(payload=hostile)

    task_page = su_client.get(_url(TaskExecution, "change", task.pk)).content.decode()
    event_page = su_client.get(_url(Event, "change", event.pk)).content.decode()

    expected = escape(json.dumps(hostile, indent=2, sort_keys=True))
    assert "{\n  &quot;a&quot;: &quot;&lt;script&gt;" in expected
    for page in (task_page, event_page):
        assert expected in page
        assert "<script>alert" not in page
    assert escape(json.dumps({"answer": 42}, indent=2)) in task_page


def test_a_workflow_whose_data_nests_deeply_still_has_its_pages(su_client: Client, builtin_agents: None) -> None:
    """A spec's JSON nests as deep as its parser reads (about a thousand levels), and the worker
    runs it. Masking walks a level of lists in two calls, on top of the page's own: a few hundred
    levels made the workflow's and the task's pages a 500 (with DEBUG on, minutes of the debug
    page printing each frame)."""
    deep: Any = "sk-live-0123456789abcdef0123"
    for _ in range(600):
        deep = [deep]
    text = json.dumps({"name": "deep", "tasks": [{"name": "t", "agent": "echo", "input": {"deep": deep}}]})
    workflow, _ = workflow_submit(spec=spec_parse(text, fmt="json"))
    task = TaskExecution.objects.get(workflow=workflow)

    pages = [
        su_client.get(_url(Workflow, "change", workflow.pk)),
        su_client.get(_url(TaskExecution, "change", task.pk)),
    ]

    for page in pages:
        assert page.status_code == 200
        content = page.content.decode()
        assert "not shown: nested too deeply to mask" in content
        assert "sk-live-0123456789abcdef0123" not in content


def test_workflow_form_edits_descriptive_fields_but_not_engine_state(su_client: Client) -> None:
    workflow = WorkflowFactory(name="before")
    TaskExecutionFactory(workflow=workflow)
    url = _url(Workflow, "change", workflow.pk)
    page = su_client.get(url)
    form_fields = set(page.context["adminform"].form.fields)

    response = su_client.post(
        url,
        {
            **_management_data(page),
            "name": "after",
            "description": "",
            "workflow_type": "test",
            "priority": "high",
            "deadline_0": "",
            "deadline_1": "",
            "status": "completed",
            "completed_steps": "7",
            "total_cost_usd": "99",
            "error": "forged",
        },
    )

    assert response.status_code == 302
    workflow.refresh_from_db()
    assert (workflow.name, workflow.priority) == ("after", "high")
    assert (workflow.status, workflow.completed_steps, workflow.total_cost_usd, workflow.error) == (
        "pending",
        0,
        0,
        None,
    )
    assert form_fields == {"name", "description", "workflow_type", "priority", "deadline", "continue_on_failure"}


def test_workflow_form_refuses_a_deadline_already_past(su_client: Client) -> None:
    """Submission refuses a deadline already past; the console stored one, and the workflow then
    failed at its next claim, or could never be resumed, without a word. A deadline left as it
    was, or a future one, is saved."""
    workflow = WorkflowFactory(name="before")
    TaskExecutionFactory(workflow=workflow)
    url = _url(Workflow, "change", workflow.pk)
    page = su_client.get(url)
    data = {**_management_data(page), "name": "after", "description": "", "workflow_type": "", "priority": "normal"}

    past = su_client.post(url, {**data, "deadline_0": "2020-01-01", "deadline_1": "00:00:00"})
    assert past.status_code == 200
    assert "is in the past" in str(past.context["adminform"].form.errors["deadline"])
    workflow.refresh_from_db()
    assert (workflow.name, workflow.deadline) == ("before", None)

    future = (timezone.now() + dt.timedelta(days=1)).astimezone(dt.UTC)
    saved = su_client.post(url, {**data, "deadline_0": future.date().isoformat(), "deadline_1": "12:00:00"})
    assert saved.status_code == 302
    workflow.refresh_from_db()
    assert workflow.name == "after" and workflow.deadline is not None


def test_workflow_form_refuses_a_deadline_past_the_year_9999_in_utc(su_client: Client, settings) -> None:
    """The console reads a deadline in TIME_ZONE: 9999-12-31 23:59 in New York is in the year
    10000 in UTC, which PostgreSQL stored and then no query could read back (the workflow's
    pages, the list, the engine). Submission refuses it so (specs.py)."""
    settings.TIME_ZONE = "America/New_York"
    workflow = WorkflowFactory(name="before")
    TaskExecutionFactory(workflow=workflow)
    url = _url(Workflow, "change", workflow.pk)
    page = su_client.get(url)
    data = {**_management_data(page), "name": "after", "description": "", "workflow_type": "", "priority": "normal"}

    refused = su_client.post(url, {**data, "deadline_0": "9999-12-31", "deadline_1": "23:59:00"})
    assert refused.status_code == 200
    assert "after 9999-12-31 UTC" in str(refused.context["adminform"].form.errors["deadline"])
    workflow.refresh_from_db()
    assert (workflow.name, workflow.deadline) == ("before", None)
    assert su_client.get(_url(Workflow, "changelist")).status_code == 200

    saved = su_client.post(url, {**data, "deadline_0": "9999-12-31", "deadline_1": "18:59:00"})
    assert saved.status_code == 302
    workflow.refresh_from_db()
    assert workflow.deadline == dt.datetime(9999, 12, 31, 23, 59, tzinfo=dt.UTC)


def test_task_form_edits_limits_but_not_engine_state(su_client: Client) -> None:
    task = TaskExecutionFactory()
    TaskAttemptFactory(execution=task, attempt_number=1, failed=True)
    url = _url(TaskExecution, "change", task.pk)
    page = su_client.get(url)
    data = {
        **_management_data(page),
        "description": "",
        "priority": "low",
        "max_retries": "5",
        "timeout_seconds": "60",
        "status": "completed",
        "retry_count": "3",
        "worker": "forged",
    }

    out_of_range = su_client.post(url, {**data, "max_retries": "101"})
    response = su_client.post(url, data)

    assert out_of_range.status_code == 200
    assert "max_retries" in out_of_range.context["adminform"].form.errors
    assert response.status_code == 302
    task.refresh_from_db()
    assert (task.priority, task.max_retries, task.timeout_seconds) == ("low", 5, 60)
    assert (task.status, task.retry_count, task.worker) == ("pending", 0, "")


def test_task_form_holds_limits_to_the_ranges_a_submitted_spec_is_held_to(su_client: Client, settings) -> None:
    """A timeout above TASK_MAX_TIMEOUT_SECONDS outlasts the broker's visibility timeout (sized
    for it): the message of a healthy task would be delivered again while it runs."""
    settings.TASK_MAX_TIMEOUT_SECONDS, settings.TASK_MAX_RETRIES_LIMIT = 3600, 20
    task = TaskExecutionFactory(status=TaskExecution.Status.FAILED)
    url = _url(TaskExecution, "change", task.pk)
    data = {
        **_management_data(su_client.get(url)),
        "description": "",
        "priority": "normal",
        "max_retries": "3",
        "timeout_seconds": "300",
    }

    too_long = su_client.post(url, {**data, "timeout_seconds": "86400"})
    too_many = su_client.post(url, {**data, "max_retries": "21"})

    assert too_long.status_code == 200
    assert too_long.context["adminform"].form.errors["timeout_seconds"] == [
        "must be between 1 and 3600 (TASK_MAX_TIMEOUT_SECONDS)"
    ]
    assert too_many.context["adminform"].form.errors["max_retries"] == [
        "must be between 0 and 20 (TASK_MAX_RETRIES_LIMIT)"
    ]
    task.refresh_from_db()
    assert (task.timeout_seconds, task.max_retries) == (300, 3)


@pytest.mark.parametrize(
    ("model", "lookup"),
    [
        (TaskExecution, "input_data__api_key__startswith"),
        (Workflow, "spec__tasks__0__input__api_key__startswith"),
        (Event, "payload__api_key__regex"),
        (TaskAttempt, "traceback__contains"),
        (AgentPlaygroundMessage, "content__startswith"),
        (ApiKey, "secret_hash__startswith"),
    ],
    ids=lambda value: value if isinstance(value, str) else value.__name__,
)
def test_a_list_cannot_be_filtered_on_what_the_console_masks(
    su_client: Client, model: type[models.Model], lookup: str
) -> None:
    """Django lets a changelist URL filter on any of the model's own fields: the count of
    `?input_data__api_key__startswith=sk-a`, then `sk-ab`, ... spells out the secret the page masks."""
    secret = "sk-live-0123456789abcdef0123"
    task = TaskExecutionFactory(input_data={"api_key": secret})
    task.workflow.spec = {"tasks": [{"input": {"api_key": secret}}]}
    task.workflow.save(update_fields=["spec"])
    EventFactory(payload={"api_key": secret})
    TaskAttemptFactory(execution=task, failed=True, traceback=f"Traceback: {secret}")
    MessageFactory(content=secret)
    ApiKeyFactory(secret_hash="ab" * 32)

    response = su_client.get(_url(model, "changelist"), {lookup: secret[:4] if model is not ApiKey else "ab"})

    assert response.status_code == 400
    # The links between the console's pages filter on ids, which stay allowed.
    assert su_client.get(_url(Event, "changelist"), {"workflow_id": task.workflow_id}).status_code == 200
    assert su_client.get(_url(TaskExecution, "changelist"), {"agent__id__exact": task.agent_id}).status_code == 200


def test_agent_stats_are_read_only(su_client: Client) -> None:
    agent = AgentFactory(total_tasks_completed=4)

    form = su_client.get(_url(Agent, "change", agent.pk)).context["adminform"].form

    assert not {"id", "total_tasks_completed", "total_tokens_used", "average_latency_ms", "success_rate"} & set(
        form.fields
    )


def test_an_agent_loaded_from_a_definition_file_is_read_only_in_the_console_but_for_the_operators_fields(
    su_client: Client,
) -> None:
    agent = AgentFactory(name="from file", definition_path="echo.json", definition_hash="0" * 64)

    page = su_client.get(_url(Agent, "change", agent.pk))
    assert set(page.context["adminform"].form.fields) == {"status", "max_concurrency"}
    assert "edit that file" in page.content.decode()
    su_client.post(
        _url(Agent, "change", agent.pk),
        {"name": "edited", "executor": "python", "status": "inactive", "max_concurrency": "2"},
    )
    agent.refresh_from_db()
    assert (agent.name, agent.status, agent.max_concurrency) == ("from file", "inactive", 2)

    api_made = AgentFactory(name="api")
    assert {"name", "status", "system_prompt"} <= set(
        su_client.get(_url(Agent, "change", api_made.pk)).context["adminform"].form.fields
    )


def test_the_status_and_max_concurrency_set_in_the_console_survive_load_agents(
    su_client: Client, superuser: Any, tmp_path
) -> None:
    # Each deploy runs load_agents: a built-in agent taken out of service (or limited) in the
    # console was active and unlimited again after it.
    definition = {"id": "flaky-x", "name": "Flaky", "executor": "python"}
    (tmp_path / "flaky.json").write_text(
        json.dumps({**definition, "entrypoint": "orchestration.runtime.builtin.flaky"})
    )
    call_command("load_agents", str(tmp_path), stdout=io.StringIO())
    su_client.post(_url(Agent, "change", "flaky-x"), {"status": "inactive", "max_concurrency": "1"})

    out = io.StringIO()
    call_command("load_agents", str(tmp_path), stdout=out)
    agent = Agent.objects.get(pk="flaky-x")
    assert (agent.status, agent.max_concurrency) == ("inactive", 1), out.getvalue()
    assert "kept        flaky-x: status inactive (the definition: active)" in out.getvalue()
    change = Event.objects.filter(event_type="agent_registered", entity_id="flaky-x").order_by("sequence")[1]
    assert (change.payload["change"], change.payload["by"]) == ("deactivated", superuser.username)


def test_a_file_defined_agent_the_checks_now_refuse_can_still_be_taken_out_of_service_in_the_console(
    su_client: Client, settings: Any
) -> None:
    """The console changes only the operator's fields of a file's agent, but its form checked the
    whole definition: an agent whose file a narrowed setting now refuses (its key variable no
    longer admitted) could not be made inactive, the form naming a field it cannot change."""
    agent = AgentFactory(
        id="llm-file",
        executor="llm",
        entrypoint="",
        provider="openai",
        model="gpt-4o-mini",
        api_key_env="OPENAI_API_KEY",
        definition_path="llm.json",
    )
    settings.AGENT_API_KEY_ENV_ALLOWED = ["PLATFORM_AGENT_*"]

    response = su_client.post(_url(Agent, "change", agent.pk), {"status": "inactive", "max_concurrency": "2"})
    assert response.status_code == 302, response.context["adminform"].form.errors
    agent.refresh_from_db()
    assert (agent.status, agent.max_concurrency) == ("inactive", 2)

    # What the form does change is still checked: 0 would be no limit at all to the engine.
    response = su_client.post(_url(Agent, "change", agent.pk), {"status": "inactive", "max_concurrency": "0"})
    assert "max_concurrency: must be at least 1" in str(response.context["adminform"].form.errors)
    agent.refresh_from_db()
    assert agent.max_concurrency == 2


def test_staff_who_may_not_view_agents_learn_nothing_of_one_from_its_page(client: Client) -> None:
    """The note that an agent is defined in a file was queued before the page's permission
    check: a staff user refused the page (403) read the agent's definition file on the next
    page they opened, for any id they tried."""
    AgentFactory(id="secret-agent", definition_path="internal/secret-agent.yaml", definition_hash="0" * 64)
    client.force_login(_staff_with("view_workflow"))

    assert client.get(_url(Agent, "change", "secret-agent")).status_code == 403

    page = client.get(reverse("admin:index")).content.decode()
    assert "secret-agent" not in page


def test_event_search_matches_ids_exactly(su_client: Client) -> None:
    wanted = EventFactory(entity_id="task-abc")
    EventFactory(entity_id="task-abcdef")

    response = su_client.get(_url(Event, "changelist"), {"q": "task-abc"})

    assert [event.pk for event in response.context["cl"].result_list] == [wanted.pk]


@pytest.mark.parametrize("term", ["²", "1²"])
def test_an_event_search_for_digits_that_are_no_sequence_number_finds_the_ids_typed(su_client: Client, term) -> None:
    """A term of digits is a sequence number too; "²" (a digit to str.isdigit, which int()
    refuses) was a 500."""
    wanted = EventFactory(entity_id=term)
    EventFactory(entity_id="1")

    response = su_client.get(_url(Event, "changelist"), {"q": term})

    assert response.status_code == 200
    assert [event.pk for event in response.context["cl"].result_list] == [wanted.pk]


def test_revoke_action_revokes_only_keys_not_yet_revoked(su_client: Client) -> None:
    earlier = timezone.now() - dt.timedelta(days=3)
    active = ApiKeyFactory()
    already_revoked = ApiKeyFactory(revoked_at=earlier)
    untouched = ApiKeyFactory()

    response = su_client.post(
        _url(ApiKey, "changelist"),
        {"action": "revoke_selected", "_selected_action": [active.pk, already_revoked.pk]},
        follow=True,
    )

    assert response.status_code == 200
    assert "Revoked 1 key(s). 1 already revoked." in response.content.decode()
    active.refresh_from_db()
    already_revoked.refresh_from_db()
    untouched.refresh_from_db()
    assert active.revoked_at is not None
    assert not active.is_active
    assert already_revoked.revoked_at == earlier
    assert untouched.revoked_at is None
    assert LogEntry.objects.filter(object_id=str(active.pk), change_message="Revoked").count() == 1


def test_api_key_revoke_returns_the_keys_it_revoked() -> None:
    now = timezone.now()
    active, expired = ApiKeyFactory(), ApiKeyFactory(expires_at=now - dt.timedelta(days=1))
    revoked = ApiKeyFactory(revoked_at=now - dt.timedelta(days=1))

    result = api_key_revoke(api_key_ids=[active.pk, expired.pk, revoked.pk], now=now)

    assert result == sorted([active.pk, expired.pk])
    assert set(ApiKey.objects.filter(revoked_at=now).values_list("pk", flat=True)) == {active.pk, expired.pk}
    assert api_key_revoke(api_key_ids=[active.pk], now=now) == []


def test_api_key_rename_to_a_taken_name_is_a_form_error(su_client: Client) -> None:
    owner = UserFactory()
    ApiKeyFactory(owner=owner, name="ci")
    key = ApiKeyFactory(owner=owner, name="laptop")

    response = su_client.post(_url(ApiKey, "change", key.pk), {"name": "ci", "expires_at_0": "", "expires_at_1": ""})

    assert response.status_code == 200
    assert "name" in response.context["adminform"].form.errors


def test_api_key_form_refuses_an_expiry_past_the_year_9999_in_utc(su_client: Client, settings) -> None:
    """As a workflow's deadline: read in TIME_ZONE, 9999-12-31 23:59 in New York is in the year
    10000 in UTC (0001-01-01 00:30 in Berlin in the year 0), which PostgreSQL stored and then no
    query could read back (the key list, the key's own page, every request the key signed)."""
    settings.TIME_ZONE = "America/New_York"
    key = ApiKeyFactory(name="laptop")
    url = _url(ApiKey, "change", key.pk)

    refused = su_client.post(url, {"name": "renamed", "expires_at_0": "9999-12-31", "expires_at_1": "23:59:00"})
    assert refused.status_code == 200
    assert "after 9999-12-31 UTC" in str(refused.context["adminform"].form.errors["expires_at"])
    key.refresh_from_db()
    assert (key.name, key.expires_at) == ("laptop", None)
    assert su_client.get(_url(ApiKey, "changelist")).status_code == 200

    settings.TIME_ZONE = "Europe/Berlin"
    refused = su_client.post(url, {"name": "renamed", "expires_at_0": "0001-01-01", "expires_at_1": "00:30:00"})
    assert refused.status_code == 200
    assert "before 0001-01-01 UTC" in str(refused.context["adminform"].form.errors["expires_at"])
    key.refresh_from_db()
    assert (key.name, key.expires_at) == ("laptop", None)
    assert su_client.get(_url(ApiKey, "changelist")).status_code == 200

    settings.TIME_ZONE = "America/New_York"
    saved = su_client.post(url, {"name": "laptop", "expires_at_0": "9999-12-31", "expires_at_1": "18:59:00"})
    assert saved.status_code == 302
    key.refresh_from_db()
    assert key.expires_at == dt.datetime(9999, 12, 31, 23, 59, tzinfo=dt.UTC)


def test_secret_hash_never_appears_in_admin_pages(su_client: Client) -> None:
    secret_hash = "5ec12e7" * 9
    key = ApiKeyFactory(secret_hash=secret_hash)
    pages = [
        _url(ApiKey, "changelist"),
        _url(ApiKey, "change", key.pk),
        _url(ApiKey, "history", key.pk),
        _url(ApiKey, "delete", key.pk),
        f"{_url(ApiKey, 'changelist')}?q={key.prefix}",
    ]

    responses = [su_client.get(url) for url in pages]
    responses.append(
        su_client.post(
            _url(ApiKey, "changelist"), {"action": "revoke_selected", "_selected_action": [key.pk]}, follow=True
        )
    )
    responses.append(su_client.get(_url(ApiKey, "history", key.pk)))

    for response in responses:
        assert response.status_code == 200
        assert secret_hash not in response.content.decode()
        assert "secret_hash" not in response.content.decode()
    assert key.prefix in responses[1].content.decode()


def test_a_key_deleted_in_the_console_is_recorded_revoked_first(su_client: Client, superuser: Any) -> None:
    """Deleting a key ends it as revoking it does: the audit log, which says it was created,
    also says when and by whom it stopped working (a key revoked before is not revoked again)."""
    owner = UserFactory(role="viewer")
    one, two, revoked = (api_key_create(owner=owner, name=name).api_key for name in ("one", "two", "revoked"))
    api_key_revoke(api_key_ids=[revoked.pk], now=timezone.now())

    deleted = su_client.post(_url(ApiKey, "delete", one.pk), {"post": "yes"})
    deleted_selected = su_client.post(
        _url(ApiKey, "changelist"),
        {"action": "delete_selected", "_selected_action": [two.pk, revoked.pk], "post": "yes"},
    )

    assert (deleted.status_code, deleted_selected.status_code) == (302, 302)
    assert not ApiKey.objects.filter(owner=owner).exists()
    ended = Event.objects.filter(event_type="api_key_revoked").order_by("sequence")
    assert [(e.payload["prefix"], e.payload.get("by"), e.payload.get("via")) for e in ended] == [
        (revoked.prefix, None, None),
        (one.prefix, superuser.username, "console"),
        (two.prefix, superuser.username, "console"),
    ]


def test_the_keys_of_a_user_deleted_in_the_console_are_recorded_revoked_first(
    su_client: Client, superuser: Any
) -> None:
    leaving, staying = UserFactory(role="viewer"), UserFactory(role="viewer")
    theirs = api_key_create(owner=leaving, name="theirs").api_key
    kept = api_key_create(owner=staying, name="kept").api_key

    deleted = su_client.post(reverse("admin:auth_user_delete", args=[leaving.pk]), {"post": "yes"})

    assert deleted.status_code == 302
    assert list(ApiKey.objects.values_list("pk", flat=True)) == [kept.pk]
    ended = Event.objects.filter(event_type="api_key_revoked")
    assert [(e.payload["prefix"], e.payload.get("by"), e.payload.get("via")) for e in ended] == [
        (theirs.prefix, superuser.username, "console")
    ]


def test_a_user_who_owns_workflows_or_messages_is_refused_deletion_without_reading_them(su_client: Client) -> None:
    """Django collects every row an account's deletion would reach before it refuses it: the
    delete page of a user with 50 000 conversation messages read them all (35 s, 226 MB) to say
    the messages may not be deleted. The account is refused at once, saying why."""
    chatty, owner = UserFactory(username="chatty"), UserFactory(username="owner")
    MessageFactory.create_batch(3, owner=chatty)
    WorkflowFactory(owner=owner)

    with CaptureQueriesContext(connection) as queries:
        page = su_client.get(reverse("admin:auth_user_delete", args=[chatty.pk]))
    read = [q["sql"] for q in queries.captured_queries if 'FROM "agent_playground_messages"' in q["sql"]]
    posted = su_client.post(reverse("admin:auth_user_delete", args=[owner.pk]), {"post": "yes"})
    selected = su_client.post(
        reverse("admin:auth_user_changelist"),
        {"action": "delete_selected", "_selected_action": [chatty.pk, owner.pk], "post": "yes"},
    )

    assert page.context["protected"] == [
        "User chatty: owns conversation messages, which are kept; deactivate the account instead"
    ]
    assert read and all(sql.endswith("LIMIT 1") for sql in read), read
    assert posted.context["protected"] == ["User owner: owns workflows, which are kept; deactivate the account instead"]
    assert len(selected.context["protected"]) == 2
    assert set(get_user_model().objects.filter(pk__in=[chatty.pk, owner.pk]).values_list("username", flat=True)) == {
        "chatty",
        "owner",
    }
    assert AgentPlaygroundMessage.objects.filter(owner=chatty).count() == 3


def test_revoking_only_keys_already_revoked_is_not_reported_as_a_success(su_client: Client) -> None:
    revoked = ApiKeyFactory(revoked_at=timezone.now() - dt.timedelta(days=1))

    response = su_client.post(
        _url(ApiKey, "changelist"), {"action": "revoke_selected", "_selected_action": [revoked.pk]}, follow=True
    )

    [message] = list(response.context["messages"])
    assert str(message) == "Revoked 0 key(s). 1 already revoked."
    assert message.level_tag == "warning"


def test_revoking_from_the_list_of_active_keys_revokes_every_key_selected_and_says_so(su_client: Client) -> None:
    """The action counted the keys the list still matched after revoking them: from the list of
    active keys (the list a leaked key is revoked from) it said "Revoked 1 key(s). -1 already
    revoked.", and a key that had expired since the page was shown was left out unrevoked (an
    expiry extended later would bring it back)."""
    active = ApiKeyFactory()
    expired_meanwhile = ApiKeyFactory(expires_at=timezone.now() - dt.timedelta(seconds=1))

    response = su_client.post(
        _url(ApiKey, "changelist") + "?state=active",
        {"action": "revoke_selected", "_selected_action": [active.pk, expired_meanwhile.pk, 0]},
        follow=True,
    )

    [message] = list(response.context["messages"])
    assert str(message) == "Revoked 2 key(s). 1 selected no longer exist."
    assert ApiKey.objects.filter(pk__in=[active.pk, expired_meanwhile.pk], revoked_at__isnull=True).count() == 0


def _staff_with(*codenames: str) -> Any:
    staff = UserFactory(is_staff=True)
    staff.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    return staff


def test_a_staff_user_cannot_create_a_key_for_a_user_with_permissions_they_lack(client: Client) -> None:
    """A key acts as its owner: minting one for a superuser or an admin would hand its holder
    their rights."""
    staff = _staff_with("add_apikey", "view_apikey")
    superuser = UserFactory(is_staff=True, is_superuser=True)
    admin_role = UserFactory(role="admin")
    client.force_login(staff)
    create = reverse("admin:orchestration_apikey_create_key")

    for owner in (superuser, admin_role):
        response = client.post(create, {"owner": owner.pk, "name": "borrowed"})
        assert response.status_code == 200
        assert "owner" in response.context["form"].errors
    own = client.post(create, {"owner": staff.pk, "name": "mine"})

    assert own.status_code == 200  # the page showing the new key
    assert list(ApiKey.objects.values_list("owner", flat=True)) == [staff.pk]


def test_a_staff_user_cannot_rotate_the_key_of_a_user_with_permissions_they_lack(client: Client) -> None:
    staff = _staff_with("add_apikey", "change_apikey", "view_apikey")
    boss = UserFactory(is_staff=True, is_superuser=True)
    old = ApiKeyFactory(owner=boss)
    client.force_login(staff)

    response = client.post(
        _url(ApiKey, "changelist"), {"action": "rotate_selected", "_selected_action": [old.pk]}, follow=True
    )

    shown = " ".join(str(m) for m in response.context["messages"])
    assert "not rotated" in shown
    assert "al_" not in shown
    old.refresh_from_db()
    assert old.revoked_at is None
    assert ApiKey.objects.filter(owner=boss).count() == 1


def test_a_staff_user_cannot_bring_back_the_expired_key_of_a_user_with_permissions_they_lack(
    client: Client,
) -> None:
    """Extending a key's expiry hands out its owner's rights for longer, as minting one does."""
    staff = _staff_with("change_apikey", "view_apikey")
    boss = UserFactory(is_staff=True, is_superuser=True)
    now = timezone.now()
    created = api_key_create(owner=boss, name="ci", expires_at=now + dt.timedelta(seconds=1), now=now)
    ApiKey.objects.filter(pk=created.api_key.pk).update(expires_at=now - dt.timedelta(days=30))
    client.force_login(staff)

    response = client.post(
        _url(ApiKey, "change", created.api_key.pk),
        {"name": "ci", "expires_at_0": "2099-01-01", "expires_at_1": "00:00:00"},
    )

    assert response.status_code == 403
    assert ApiKey.objects.get(pk=created.api_key.pk).expires_at < now
    assert client.get(_url(ApiKey, "change", created.api_key.pk)).context["has_change_permission"] is False
    own = api_key_create(owner=staff, name="mine", expires_at=now + dt.timedelta(days=1), now=now).api_key
    extended = client.post(
        _url(ApiKey, "change", own.pk), {"name": "mine", "expires_at_0": "2099-01-01", "expires_at_1": "00:00:00"}
    )
    assert extended.status_code == 302
    assert ApiKey.objects.get(pk=own.pk).expires_at.year == 2099


def test_a_new_key_is_shown_in_the_answer_that_made_it_never_put_in_a_cookie(su_client: Client) -> None:
    """The key's secret exists only in the page that shows it: a redirect would carry it to the
    next page in the messages cookie, which is signed, not encrypted."""
    owner = UserFactory(role="developer")

    created = su_client.post(_url(ApiKey, "create_key"), {"owner": owner.pk, "name": "deploy"})
    old = ApiKey.objects.get(owner=owner)
    rotated = su_client.post(_url(ApiKey, "changelist"), {"action": "rotate_selected", "_selected_action": [old.pk]})

    for response in (created, rotated):
        assert "messages" not in response.cookies, "the message with the key is not stored for a later page"
        assert response.status_code == 200
        key = re.search(rb"al_[0-9a-f]{8}_[\w-]+", response.content).group(0)
        assert _url(ApiKey, "change", ApiKey.objects.get(prefix=key.split(b"_")[1].decode()).pk).encode() in (
            response.content
        )
    assert ApiKey.objects.filter(owner=owner, revoked_at__isnull=True).count() == 1


def test_a_staff_user_cannot_grant_a_group_permissions_they_lack(client: Client) -> None:
    """Django's group admin would let anyone who may change groups tick every permission on a
    group of their own, and so hold them: groups follow the user admin's rule."""
    staff = _staff_with("change_group", "view_group", "view_workflow")
    own = Group.objects.create(name="operators")
    own.permissions.add(Permission.objects.get(codename="view_workflow"))
    staff.groups.add(own)
    client.force_login(staff)

    response = client.post(
        _url(Group, "change", own.pk),
        {"name": "operators", "permissions": list(Permission.objects.values_list("pk", flat=True))},
    )

    assert response.status_code == 200, "the form refuses the permissions the staff user lacks"
    assert set(own.permissions.values_list("codename", flat=True)) == {"view_workflow"}
    staff = type(staff).objects.get(pk=staff.pk)
    assert not staff.has_perm("orchestration.add_apikey")
    admin_group = Group.objects.get(name="admin")
    assert client.get(_url(Group, "change", admin_group.pk)).context["has_change_permission"] is False
    assert client.post(_url(Group, "delete", admin_group.pk), {"post": "yes"}).status_code == 403
    assert Group.objects.filter(name="admin").exists()


@pytest.mark.parametrize("model", [Workflow, TaskExecution, TaskAttempt], ids=_ids)
def test_workflows_tasks_and_attempts_cannot_be_deleted_in_the_console(
    su_client: Client, model: type[models.Model]
) -> None:
    """Attempts are the immutable record of what ran (the database guards them against UPDATE
    only), and a workflow counts its tasks: deleting one would leave total_steps and the
    progress counters wrong. Retention deletes finished workflows with their tasks and attempts."""
    workflow = WorkflowFactory(status="running", total_steps=2, completed_steps=1)
    task = TaskExecutionFactory(workflow=workflow, status="completed")
    TaskExecutionFactory(workflow=workflow, status="running")
    attempt = TaskAttemptFactory(execution=task, attempt_number=1, succeeded=True)
    obj = {Workflow: workflow, TaskExecution: task, TaskAttempt: attempt}[model]

    changelist = su_client.get(_url(model, "changelist"))
    change = su_client.get(_url(model, "change", obj.pk))
    delete_page = su_client.get(_url(model, "delete", obj.pk))
    delete = su_client.post(_url(model, "delete", obj.pk), {"post": "yes"})
    action = su_client.post(
        _url(model, "changelist"), {"action": "delete_selected", "_selected_action": [obj.pk], "post": "yes"}
    )

    assert b"delete_selected" not in changelist.content
    assert change.context["has_delete_permission"] is False
    assert (delete_page.status_code, delete.status_code) == (403, 403)
    assert action.status_code in (200, 302)  # the changelist again: no such action
    assert model.objects.filter(pk=obj.pk).exists()
    assert (TaskExecution.objects.filter(workflow=workflow).count(), TaskAttempt.objects.count()) == (2, 1)


@pytest.mark.parametrize("model", [AgentPlaygroundMessage, AgentInteraction, AgentMetric], ids=_ids)
def test_messages_interactions_and_metrics_cannot_be_deleted_in_the_console(
    su_client: Client, model: type[models.Model]
) -> None:
    """A deleted message would change the thread's history and the next export of its window;
    retention deletes them with the conversation's reply tasks."""
    obj = MAKERS[model]()

    changelist = su_client.get(_url(model, "changelist"))
    change = su_client.get(_url(model, "change", obj.pk))
    delete = su_client.post(_url(model, "delete", obj.pk), {"post": "yes"})
    action = su_client.post(
        _url(model, "changelist"), {"action": "delete_selected", "_selected_action": [obj.pk], "post": "yes"}
    )

    assert b"delete_selected" not in changelist.content
    assert change.context["has_delete_permission"] is False
    assert delete.status_code == 403
    assert action.status_code in (200, 302)
    assert model.objects.filter(pk=obj.pk).exists()


@pytest.mark.parametrize(
    "record",
    [
        lambda agent: TaskExecutionFactory(agent=agent),
        lambda agent: MessageFactory(agent=agent, owner=UserFactory()),
        lambda agent: InteractionFactory(to_agent=agent),
        lambda agent: MetricFactory(agent=agent),
    ],
    ids=["task", "message", "interaction", "metric"],
)
def test_an_agent_with_a_record_is_deactivated_not_deleted_in_the_console(
    su_client: Client, record: Callable[[Agent], models.Model]
) -> None:
    agent = AgentFactory()
    record(agent)

    change = su_client.get(_url(Agent, "change", agent.pk))
    delete = su_client.post(_url(Agent, "delete", agent.pk), {"post": "yes"})
    action = su_client.post(
        _url(Agent, "changelist"), {"action": "delete_selected", "_selected_action": [agent.pk], "post": "yes"}
    )

    assert change.context["has_delete_permission"] is False
    assert delete.status_code == 403
    assert action.status_code in (200, 302)
    assert Agent.objects.filter(pk=agent.pk).exists()


def test_an_agent_nothing_was_recorded_for_can_be_deleted_in_the_console(su_client: Client) -> None:
    agent = AgentFactory()

    delete = su_client.post(_url(Agent, "delete", agent.pk), {"post": "yes"})

    assert delete.status_code == 302
    assert not Agent.objects.filter(pk=agent.pk).exists()


def test_an_agent_deleted_in_the_console_is_recorded_as_an_event(su_client: Client, superuser: Any) -> None:
    """Every change of an agent is an agent_registered event (README), its deletion too: the
    audit log said it had been created (in the console, or through the API) and nothing more,
    while the agent was gone and its id could be taken by another definition."""
    fields = {"id": "oops-001", "name": "Oops", "executor": "python", "status": "active", "entrypoint": "builtins.len"}
    assert su_client.post(_url(Agent, "add"), fields).status_code == 302

    assert su_client.post(_url(Agent, "delete", "oops-001"), {"post": "yes"}).status_code == 302

    assert not Agent.objects.filter(pk="oops-001").exists()
    events = Event.objects.filter(event_type="agent_registered", agent_id="oops-001").order_by("sequence")
    assert [(event.payload["change"], event.payload["by"]) for event in events] == [
        ("created", superuser.username),
        ("deleted", superuser.username),
    ]
    assert events.last().payload["fields"]["name"] == "Oops"  # the definition that was deleted


CONSOLE_CANARY = "canary-5d1e8b"


def test_the_console_masks_secrets_in_every_users_data(su_client: Client) -> None:
    """Staff see every user's inputs, outputs, errors and messages; the credentials in them
    are masked as the training files mask them (key names, patterns), the rest stays."""
    secret_input = {"password": f"pw-{CONSOLE_CANARY}", "prompt": f"use sk-{CONSOLE_CANARY}abcdefghijklmnop"}
    workflow = WorkflowFactory(metadata={"api_key": CONSOLE_CANARY}, error=f"token={CONSOLE_CANARY} refused")
    task = TaskExecutionFactory(
        workflow=workflow,
        input_data=secret_input,
        output_data={"reply": f"Bearer {CONSOLE_CANARY}"},
        error=f"password={CONSOLE_CANARY}",
    )
    attempt = TaskAttemptFactory(
        execution=task,
        failed=True,
        error=f"password={CONSOLE_CANARY}",
        traceback=f"Traceback ...\nValueError: api_key={CONSOLE_CANARY}",
    )
    event = EventFactory(
        entity_id=task.pk, workflow_id=workflow.pk, payload={"input": secret_input, "note": "kept in view"}
    )
    message = MessageFactory(owner=UserFactory(), content=f"my key is sk-{CONSOLE_CANARY}abcdefghijklmnop, thanks")
    interaction = InteractionFactory(message=f"secret={CONSOLE_CANARY}", payload={"token": CONSOLE_CANARY})

    pages = [
        _url(Workflow, "change", workflow.pk),
        _url(TaskExecution, "change", task.pk),
        _url(TaskAttempt, "change", attempt.pk),
        _url(Event, "change", event.pk),
        _url(AgentPlaygroundMessage, "change", message.pk),
        _url(AgentPlaygroundMessage, "changelist"),
        _url(AgentInteraction, "change", interaction.pk),
        _url(AgentInteraction, "changelist"),
    ]
    for url in pages:
        response = su_client.get(url)
        page = response.content.decode()
        assert response.status_code == 200, url
        assert CONSOLE_CANARY not in page, url
        assert "[REDACTED]" in page, url
    assert "kept in view" in su_client.get(_url(Event, "change", event.pk)).content.decode()
    assert "thanks" in su_client.get(_url(AgentPlaygroundMessage, "change", message.pk)).content.decode()


def test_an_agent_made_in_the_console_is_checked_like_the_apis(su_client: Client) -> None:
    response = su_client.post(
        _url(Agent, "add"),
        {"id": "llm-001", "name": "LLM", "executor": "llm", "status": "active", "api_key_env": "sk-live-0123456789abc"},
    )

    assert response.status_code == 200
    errors = " ".join(response.context["adminform"].form.non_field_errors())
    assert "model: required for the llm executor" in errors
    assert "api_key_env: must be an environment variable name" in errors
    assert not Agent.objects.filter(pk="llm-001").exists()


def test_agent_changes_in_the_console_are_recorded_as_events(su_client: Client, superuser: Any) -> None:
    def changes() -> list[tuple[str, Any]]:
        events = Event.objects.filter(event_type="agent_registered", agent_id="new-001").order_by("sequence")
        return [(event.payload["change"], event.payload["by"]) for event in events]

    fields = {"id": "new-001", "name": "New", "executor": "python", "status": "active", "entrypoint": "builtins.len"}
    assert su_client.post(_url(Agent, "add"), fields).status_code == 302
    url = _url(Agent, "change", "new-001")
    assert su_client.post(url, {**fields, "name": "Renamed"}).status_code == 302
    assert su_client.post(url, {**fields, "name": "Renamed", "status": "inactive"}).status_code == 302
    assert su_client.post(url, {**fields, "name": "Renamed", "status": "inactive"}).status_code == 302  # no change

    assert Agent.objects.get(pk="new-001").status == "inactive"
    name = superuser.username
    assert changes() == [("created", name), ("updated", name), ("deactivated", name)]


def test_workflow_task_and_key_edits_in_the_console_are_recorded_as_events(su_client: Client, superuser: Any) -> None:
    """These edits were recorded only in django_admin_log, which neither the API nor the event
    stream reads: extending a key's expiry hands out its owner's rights again unrecorded. Each
    appends an event naming who and each field changed, old and new (never the key's secret)."""
    workflow = WorkflowFactory(name="before")
    task = TaskExecutionFactory(workflow=workflow, status=TaskExecution.Status.FAILED)
    key = ApiKeyFactory(name="ci", expires_at=timezone.now() - dt.timedelta(days=1))
    url = _url(Workflow, "change", workflow.pk)
    data = {
        **_management_data(su_client.get(url)),
        "name": "after",
        "description": "",
        "workflow_type": workflow.workflow_type,
    }
    assert su_client.post(url, {**data, "priority": "normal"}).status_code == 302
    url = _url(TaskExecution, "change", task.pk)
    data = {**_management_data(su_client.get(url)), "description": "", "priority": "normal", "timeout_seconds": "300"}
    assert su_client.post(url, {**data, "max_retries": "5"}).status_code == 302
    url = _url(ApiKey, "change", key.pk)
    assert (
        su_client.post(url, {"name": "ci", "expires_at_0": "2099-01-01", "expires_at_1": "00:00:00"}).status_code == 302
    )

    by = {"by": superuser.username, "via": "console"}
    edits = {event.event_type: event for event in Event.objects.filter(event_type__endswith="_changed")}
    assert set(edits) == {"workflow_changed", "task_changed", "api_key_changed"}
    assert edits["workflow_changed"].entity_id == edits["workflow_changed"].workflow_id == workflow.pk
    assert edits["workflow_changed"].payload == {"changes": {"name": {"old": "before", "new": "after"}}, **by}
    assert (edits["task_changed"].entity_id, edits["task_changed"].workflow_id) == (task.pk, workflow.pk)
    assert edits["task_changed"].payload["changes"] == {"max_retries": {"old": 3, "new": 5}}
    assert edits["task_changed"].payload["by"] == superuser.username
    payload = edits["api_key_changed"].payload
    assert (edits["api_key_changed"].entity_id, payload["prefix"], payload["by"]) == (
        str(key.pk),
        key.prefix,
        superuser.username,
    )
    assert payload["changes"]["expires_at"]["old"] == key.expires_at.isoformat()
    assert payload["changes"]["expires_at"]["new"].startswith("2099-01-01")
    assert key.secret_hash not in json.dumps(payload)


def _racing_save(monkeypatch: pytest.MonkeyPatch, model_admin: Any, meanwhile: Callable[[], Any]) -> None:
    """Runs `meanwhile` between the change view reading the row and saving it, as a concurrent
    write committed in that moment would."""
    save_form = model_admin.save_form

    def racing(self: Any, request: Any, form: Any, change: bool) -> Any:
        meanwhile()
        return save_form(self, request, form, change)

    monkeypatch.setattr(model_admin, "save_form", racing)


def test_renaming_a_key_does_not_undo_a_revocation_made_meanwhile(
    su_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = ApiKeyFactory(name="before")
    revoked_at = timezone.now()
    _racing_save(
        monkeypatch,
        admin.site.get_model_admin(ApiKey).__class__,
        lambda: api_key_revoke(api_key_ids=[key.pk], now=revoked_at),
    )

    response = su_client.post(_url(ApiKey, "change", key.pk), {"name": "after", "expires_at_0": "", "expires_at_1": ""})

    assert response.status_code == 302
    key.refresh_from_db()
    assert (key.name, key.revoked_at) == ("after", revoked_at)


def test_editing_a_workflow_or_task_keeps_what_the_engine_wrote_meanwhile(
    su_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    workflow = WorkflowFactory(name="before", status="running", total_steps=1)
    # (failed: a running task's priority and timeout are its message's, not to be changed)
    task = TaskExecutionFactory(workflow=workflow, status="failed")

    _racing_save(
        monkeypatch,
        admin.site.get_model_admin(Workflow).__class__,
        lambda: Workflow.objects.filter(pk=workflow.pk).update(
            status="completed", completed_steps=1, total_tokens_used=30
        ),
    )
    _racing_save(
        monkeypatch,
        admin.site.get_model_admin(TaskExecution).__class__,
        lambda: TaskExecution.objects.filter(pk=task.pk).update(status="completed", tokens_used=30),
    )
    workflow_page = su_client.get(_url(Workflow, "change", workflow.pk))
    task_page = su_client.get(_url(TaskExecution, "change", task.pk))

    renamed = su_client.post(
        _url(Workflow, "change", workflow.pk),
        {**_management_data(workflow_page), "name": "after", "workflow_type": "test", "priority": "normal"},
    )
    limited = su_client.post(
        _url(TaskExecution, "change", task.pk),
        {**_management_data(task_page), "priority": "high", "max_retries": "3", "timeout_seconds": "300"},
    )

    assert (renamed.status_code, limited.status_code) == (302, 302)
    workflow.refresh_from_db()
    task.refresh_from_db()
    assert (workflow.name, workflow.status, workflow.completed_steps, workflow.total_tokens_used) == (
        "after",
        "completed",
        1,
        30,
    )
    assert (task.priority, task.status, task.tokens_used) == ("high", "completed", 30)


def test_a_users_page_shows_their_spend_and_wasted_spend(su_client: Client) -> None:
    """DESIGN §4's wasted spend per user, in the console (the API's me/spend/)."""
    owner = UserFactory(username="spender")
    WorkflowFactory(owner=owner, total_tokens_used=40, total_cost_usd="0.400000", wasted_cost_usd="0.150000")
    old = WorkflowFactory(owner=owner, total_tokens_used=1, total_cost_usd="2.000000", wasted_cost_usd="2.000000")
    Workflow.objects.filter(pk=old.pk).update(created_at=timezone.now() - dt.timedelta(days=10))
    WorkflowFactory(total_cost_usd="9.000000", wasted_cost_usd="9.000000")  # another user's
    page = su_client.get(reverse("admin:auth_user_change", args=[owner.pk]))
    assert page.status_code == 200
    html = page.content.decode()
    day = "<td>last 24 hours</td><td>1</td><td>0</td><td>40</td><td>0.400000</td><td>0.150000</td>"
    month = "<td>last 30 days</td><td>2</td><td>0</td><td>41</td><td>2.400000</td><td>2.150000</td>"
    assert day in html and month in html
    add = su_client.get(reverse("admin:auth_user_add"))
    assert add.status_code == 200 and "last 24 hours" not in add.content.decode()


def test_a_users_spend_is_shown_only_to_staff_who_may_see_what_workflows_cost(client: Client) -> None:
    """Managing accounts (auth's user permissions) is not seeing what every user's work costs:
    the workflows' and tasks' own pages need their view permissions."""
    owner = UserFactory(username="spender")
    WorkflowFactory(owner=owner, total_tokens_used=40, total_cost_usd="0.400000", wasted_cost_usd="0.150000")
    page = reverse("admin:auth_user_change", args=[owner.pk])

    accounts_only = _staff_with("view_user", "change_user")
    client.force_login(accounts_only)
    response = client.get(page)
    assert response.status_code == 200
    assert "last 24 hours" not in response.content.decode() and "0.400000" not in response.content.decode()

    client.force_login(_staff_with("view_user", "view_workflow", "view_taskexecution"))
    assert "<td>last 24 hours</td><td>1</td>" in client.get(page).content.decode()


@pytest.mark.django_db(transaction=True)
def test_a_console_page_whose_statement_is_cancelled_is_a_503_saying_so(su_client: Client, caplog) -> None:
    """The web's statement timeout (compose: WEB_STATEMENT_TIMEOUT_SECONDS) cut a changelist or
    an edit short, here behind a migration's lock: a page that says so, not a bare 500."""
    import psycopg

    from tests.engine import database_url

    with connection.cursor() as cursor:
        cursor.execute("SET statement_timeout = '300ms'")  # what the setting's options do
    try:
        with psycopg.connect(database_url(), autocommit=False) as other:
            other.execute("LOCK TABLE events, agents IN ACCESS EXCLUSIVE MODE")
            listed = su_client.get(_url(Event, "changelist"))
            added = su_client.post(
                _url(Agent, "add"),
                {
                    "id": "new-001",
                    "name": "New",
                    "executor": "python",
                    "status": "active",
                    "entrypoint": "builtins.len",
                },
            )
            other.rollback()
    finally:
        with connection.cursor() as cursor:
            cursor.execute("RESET statement_timeout")
    assert listed.status_code == 503 and listed["Retry-After"] == "5"
    assert "it was cancelled (nothing was changed)" in listed.content.decode()
    assert added.status_code == 503 and "Retry-After" not in added
    assert "may have been saved" in added.content.decode()  # the console promises nothing for a write
    assert not Agent.objects.filter(pk="new-001").exists()
    assert f"a database statement was cancelled in {_url(Event, 'changelist')}" in caplog.text


@pytest.mark.parametrize(
    ("model", "make"),
    [
        (AgentInteraction, lambda secret: InteractionFactory(message=f"use {secret} for the call")),
        (AgentPlaygroundMessage, lambda secret: MessageFactory(content=f"my key is {secret}")),
    ],
    ids=lambda value: value.__name__ if isinstance(value, type) else "",
)
def test_a_list_cannot_be_searched_for_what_the_console_masks(
    request: pytest.FixtureRequest, model: type[models.Model], make: Callable[[str], Any]
) -> None:
    """The search box is the same oracle as a lookup in the URL: `?q=sk-live-0`, then
    `?q=sk-live-01`, ... finds the row for as long as the guess is right, and so spells out the
    secret the page masks."""
    secret = "sk-live-0123456789abcdef0123"
    row = make(secret)
    client = request.getfixturevalue("viewer_client" if model in VIEWER_MODELS else "su_client")
    page = client.get(_url(model, "change", row.pk))
    assert secret not in page.content.decode()  # the page masks it

    right = client.get(_url(model, "changelist"), {"q": secret[:12]})
    wrong = client.get(_url(model, "changelist"), {"q": secret[:11] + "x"})

    assert right.status_code == wrong.status_code == 200
    assert right.context["cl"].result_count == wrong.context["cl"].result_count == 0


def test_a_staff_user_who_may_change_users_gains_no_rights_through_them(client: Client) -> None:
    """Django's user admin lets whoever may change users tick their own superuser status,
    grant any permission or group and set a superuser's password: here none of that, the rule
    the console's API keys follow (may_mint_keys_for)."""
    from django.contrib.auth.models import Group

    staff = _staff_with("view_user", "change_user", "delete_user", "view_workflow")
    boss = UserFactory(is_staff=True, is_superuser=True)
    powerful = Group.objects.create(name="powerful")
    powerful.permissions.add(*Permission.objects.filter(codename__in=["change_workflow", "view_workflow"]))
    dormant = UserFactory(is_staff=True, is_active=False)
    dormant.groups.add(powerful)
    client.force_login(staff)
    own = reverse("admin:auth_user_change", args=[staff.pk])

    form = client.get(own).context["adminform"].form
    assert "is_superuser" not in form.fields
    assert set(form.fields["user_permissions"].queryset.values_list("codename", flat=True)) == {
        "view_user",
        "change_user",
        "delete_user",
        "view_workflow",
    }
    assert powerful not in form.fields["groups"].queryset
    change_workflow = list(Permission.objects.filter(codename="change_workflow").values_list("pk", flat=True))
    response = client.post(
        own,
        {
            "username": staff.username,
            "is_active": "on",
            "is_staff": "on",
            "is_superuser": "on",
            "user_permissions": change_workflow,
            "date_joined_0": "2026-01-01",
            "date_joined_1": "00:00:00",
        },
    )
    assert response.status_code == 200 and "user_permissions" in response.context["adminform"].form.errors
    staff.refresh_from_db()
    assert not staff.is_superuser and not staff.has_perm("orchestration.change_workflow")

    for account in (boss, dormant):  # a superuser; an inactive account whose group holds more
        assert client.get(reverse("admin:auth_user_password_change", args=[account.pk])).status_code == 403
        assert client.post(reverse("admin:auth_user_delete", args=[account.pk]), {"post": "yes"}).status_code == 403
        page = client.get(reverse("admin:auth_user_change", args=[account.pk]))
        assert page.status_code == 200 and "is_active" not in page.context["adminform"].form.fields  # read-only
    assert type(staff).objects.filter(pk__in=[boss.pk, dormant.pk]).count() == 2


def test_a_nul_in_a_list_filter_is_a_400_naming_it(su_client: Client) -> None:
    """The console's lists take any lookup of the model's own fields from the URL, and
    PostgreSQL refuses a NUL character in any text it is given: `?workflow_id__gt=%00` was a 500."""
    WorkflowFactory()
    response = su_client.get(_url(Workflow, "changelist") + "?workflow_id__gt=%00")
    assert response.status_code == 400
    assert "The query parameter workflow_id__gt contains a NUL character" in response.content.decode()


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("created_at__range=2024-01-01,2024-02-01", "a range cannot be given in a URL"),
        ("name__range=", "a range cannot be given in a URL"),
        ("name__regex=(", "invalid regular expression"),
        ("created_at__year=0", "year 0 is out of range"),
        ("created_at__year=99999999999999999999", "a number is out of range"),
    ],
)
def test_a_list_filter_the_database_cannot_run_is_refused_with_a_message_naming_it(
    su_client: Client, query: str, reason: str
) -> None:
    """Filters Django accepts while building the list's query but that fail when its rows are
    counted (Django does not split a range's bounds; PostgreSQL refuses a bad regular
    expression; a year outside 1-9999 has no date): each was a 500. Now the list is shown
    unfiltered, as for any filter Django refuses, with a message naming it."""
    WorkflowFactory()
    url = _url(Workflow, "changelist")
    response = su_client.get(f"{url}?{query}")
    assert (response.status_code, response["Location"]) == (302, f"{url}?e=1")
    page = su_client.get(response["Location"])
    assert page.status_code == 200
    (message,) = [str(m) for m in page.context["messages"]]
    assert message.startswith(f"The list cannot be filtered by {query.split('=')[0]} = ")
    assert reason in message


@pytest.mark.parametrize(
    ("path", "query"),
    [("/admin/auth/group/", "name__regex=("), ("/admin/django_celery_beat/periodictask/", "last_run_at__year=0")],
)
def test_the_lists_of_other_apps_refuse_such_filters_too(su_client: Client, path: str, query: str) -> None:
    response = su_client.get(f"{path}?{query}")
    assert (response.status_code, response["Location"]) == (302, f"{path}?e=1")
    (message,) = [str(m) for m in su_client.get(response["Location"]).context["messages"]]
    assert message.startswith(f"The list cannot be filtered by {query.split('=')[0]} = ")


def test_staff_who_may_only_view_the_schedules_cannot_disable_or_run_them(client: Client) -> None:
    """django-celery-beat's list actions (enable, disable, toggle, run) name no permission, and
    Django offered and ran them for whoever could view the schedules: a view-only operator
    turned off the reaper of stale tasks. They need the change permission."""
    schedule = PeriodicTask.objects.get(name="reap stale tasks")
    assert schedule.enabled
    url = "/admin/django_celery_beat/periodictask/"
    client.force_login(_staff_with("view_periodictask"))

    page = client.get(url)
    for action in ("disable_tasks", "toggle_tasks"):
        posted = client.post(url, {"action": action, "_selected_action": [schedule.pk]}, follow=True)
        assert (posted.status_code, [str(m) for m in posted.context["messages"]]) == (200, [])

    assert page.context["action_form"] is None
    assert PeriodicTask.objects.get(pk=schedule.pk).enabled

    client.force_login(_staff_with("view_periodictask", "change_periodictask"))
    client.post(url, {"action": "disable_tasks", "_selected_action": [schedule.pk]})
    assert not PeriodicTask.objects.get(pk=schedule.pk).enabled
