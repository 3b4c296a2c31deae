"""Operations from the console: cancel and resume workflows, cancel and retry tasks, as list
actions and as buttons on an object's page, through the same services as the REST API."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import redis
from django.conf import settings
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse

from orchestration.admin import operations
from orchestration.models import Agent, Event, TaskAttempt, TaskExecution, Workflow
from tests.factories import UserFactory, WorkflowFactory
from tests.orchestration.test_engine import attempts, finished, running_attempt, submit, task

A, T, W = TaskAttempt.Status, TaskExecution.Status, Workflow.Status


def _url(model: type, view: str, *args: Any) -> str:
    return reverse(f"admin:orchestration_{model._meta.model_name}_{view}", args=args)


def _events(workflow: Workflow) -> list[str]:
    return list(Event.objects.filter(workflow_id=workflow.pk).order_by("sequence").values_list("event_type", flat=True))


def _messages(response: Any) -> str:
    return " | ".join(str(m) for m in response.context["messages"])


@pytest.fixture
def operator(client: Client) -> Client:
    client.force_login(UserFactory(is_staff=True, is_superuser=True, username="ops"))
    return client


@pytest.mark.django_db(transaction=True)
def test_an_operator_cancels_a_running_workflow_and_retries_a_failed_task_on_real_workers(engine, operator):
    """The console's actions run on a live system: a running workflow is cancelled (its worker
    process stopped, the attempt recorded cancelled by the operator); a failed task is retried
    and completes on a worker, its workflow with it."""
    engine()
    running = submit({"name": "long", "agent": "sleep", "input": {"seconds": 30}})
    attempt = running_attempt(running, "long")
    failing = finished(submit({"name": "bad", "agent": "fail", "max_retries": 0}))
    assert failing.status == W.FAILED

    response = operator.post(
        _url(Workflow, "changelist"),
        {"action": "cancel", "_selected_action": [running.pk, failing.pk]},
        follow=True,
    )

    text = _messages(response)
    assert "Cancelled: 1 workflows." in text
    assert f"Not cancelled (1): {failing}: workflow {failing.pk} is failed" in text
    running = finished(running)
    attempt.refresh_from_db()
    assert (running.status, running.error) == (W.CANCELLED, "cancelled by ops in the console")
    assert (attempt.status, attempt.cause) == (A.CANCELLED, "cancelled")
    assert "workflow_cancelled" in _events(running)
    assert Workflow.objects.get(pk=failing.pk).status == W.FAILED

    Agent.objects.filter(pk="fail").update(entrypoint="orchestration.runtime.builtin.echo")  # fixed
    bad = task(failing, "bad")
    response = operator.post(
        _url(TaskExecution, "changelist"), {"action": "retry", "_selected_action": [bad.pk]}, follow=True
    )
    assert "Retried: 1 task executions." in _messages(response)
    failing = finished(failing)
    assert failing.status == W.COMPLETED
    assert [(a.attempt_number, a.status) for a in attempts(failing, "bad")] == [(1, A.FAILED), (2, A.SUCCEEDED)]
    assert LogEntry.objects.filter(object_id=str(bad.pk), change_message="Retried in the console").count() == 1
    # The events, the audit trail, name the operator as well.
    ops = {"by": "ops", "via": "console"}
    cancelled = Event.objects.get(entity_id=running.pk, event_type="workflow_cancelled")
    retried = Event.objects.filter(event_type="workflow_resumed", entity_id=failing.pk).get()
    assert {k: cancelled.payload[k] for k in ops} == ops and {k: retried.payload[k] for k in ops} == ops


@pytest.mark.django_db
def test_an_objects_page_offers_the_operations_its_state_allows_as_post_buttons(builtin_agents, operator):
    workflow = submit({"name": "a", "agent": "echo"}, {"name": "b", "agent": "echo", "depends_on": ["a"]})
    page = operator.get(_url(Workflow, "change", workflow.pk)).content.decode()
    assert f'action="{_url(Workflow, "cancel", workflow.pk)}"' in page
    assert _url(Workflow, "resume", workflow.pk) not in page
    assert 'method="post"' in page and "csrfmiddlewaretoken" in page

    # A GET of an operation's URL (a link, a crawler) changes nothing: it shows the object's page.
    assert operator.get(_url(Workflow, "cancel", workflow.pk))["Location"] == _url(Workflow, "change", workflow.pk)
    assert Workflow.objects.get(pk=workflow.pk).status == W.RUNNING

    response = operator.post(_url(Workflow, "cancel", workflow.pk), follow=True)
    assert response.redirect_chain[-1][0] == _url(Workflow, "change", workflow.pk)
    assert "Cancelled: 1 workflows." in _messages(response)
    page = response.content.decode()
    assert _url(Workflow, "resume", workflow.pk) in page and _url(Workflow, "cancel", workflow.pk) not in page

    b = task(workflow, "b")
    task_page = operator.get(_url(TaskExecution, "change", b.pk)).content.decode()
    assert _url(TaskExecution, "retry", b.pk) in task_page
    response = operator.post(_url(TaskExecution, "retry", b.pk), follow=True)
    # The workflow stopped at its first cancel: retrying one of its tasks resumes it whole.
    assert "Retried: 1 task executions." in _messages(response)
    assert Workflow.objects.get(pk=workflow.pk).status == W.RUNNING
    assert (task(workflow, "a").status, task(workflow, "b").status) == (T.QUEUED, T.PENDING)
    assert "workflow_resumed" in _events(workflow)

    # A refusal is the service's, in its words.
    response = operator.post(_url(Workflow, "resume", workflow.pk), follow=True)
    assert f"Not resumed (1): {workflow}: workflow {workflow.pk} is running" in _messages(response)


@pytest.mark.django_db
def test_an_operation_pressed_after_the_session_ended_leads_back_to_the_objects_page(builtin_agents, client):
    """An operator whose session ended (it expired, or they logged out in another tab) presses
    Cancel on a page left open: the console asks them to log in, then sends them on to the
    address the button posted to, with a GET. That shows the workflow's page, still running,
    saying nothing was done, not the browser's "HTTP ERROR 405" over an empty answer."""
    workflow = submit({"name": "a", "agent": "echo"})
    cancel, change = _url(Workflow, "cancel", workflow.pk), _url(Workflow, "change", workflow.pk)

    to_login = client.post(cancel)
    assert to_login.status_code == 302
    login_url = to_login["Location"]
    assert parse_qs(urlsplit(login_url).query)["next"] == [cancel]
    UserFactory(is_staff=True, is_superuser=True, username="ops")
    after_login = client.post(
        login_url, {"username": "ops", "password": "correct horse battery staple", "next": cancel}, follow=True
    )

    assert [url for url, _ in after_login.redirect_chain] == [cancel, change]
    assert after_login.status_code == 200
    assert "Nothing was cancelled: the Cancel button on this page does that" in _messages(after_login)
    assert _url(Workflow, "cancel", workflow.pk) in after_login.content.decode()  # the button, to press again
    assert Workflow.objects.get(pk=workflow.pk).status == W.RUNNING


@pytest.mark.django_db
def test_cancelling_a_workflow_that_had_failed_already_says_it_ended_failed(builtin_agents, operator):
    from orchestration.services.execution import Claim, attempt_claim, attempt_run

    workflow = submit(
        {"name": "broken", "agent": "fail", "max_retries": 0},
        {"name": "slow", "agent": "sleep", "input": {"seconds": 30}},
    )
    slow, broken = task(workflow, "slow"), task(workflow, "broken")
    assert isinstance(attempt_claim(execution_id=slow.pk, celery_task_id=slow.celery_task_id, worker="w@h"), Claim)
    attempt_run(execution_id=broken.pk, celery_task_id=broken.celery_task_id, worker="w@h")
    response = operator.post(_url(Workflow, "cancel", workflow.pk), follow=True)
    shown = _messages(response)
    assert "Cancelled: 1 workflows." in shown
    workflow.refresh_from_db()
    said = "Had failed already, so ended failed with their failure kept (their running tasks were cancelled)"
    assert workflow.status == W.FAILED and f"{said}: {workflow}." in shown, shown


@pytest.mark.django_db
def test_staff_who_may_only_view_get_no_operations(builtin_agents, client):
    viewer = UserFactory(is_staff=True, username="watcher")
    viewer.user_permissions.add(*Permission.objects.filter(codename__in=["view_workflow", "view_taskexecution"]))
    client.force_login(viewer)
    workflow = submit({"name": "a", "agent": "echo"})

    listing = client.get(_url(Workflow, "changelist"))
    assert listing.status_code == 200
    assert listing.context["action_form"] is None  # no action at all: deleting is not offered either
    page = client.get(_url(Workflow, "change", workflow.pk)).content.decode()
    assert _url(Workflow, "cancel", workflow.pk) not in page
    assert client.post(_url(Workflow, "cancel", workflow.pk)).status_code == 403
    forged = client.post(_url(Workflow, "changelist"), {"action": "cancel", "_selected_action": [workflow.pk]})
    assert forged.status_code in (200, 302)
    assert Workflow.objects.get(pk=workflow.pk).status == W.RUNNING
    assert task(workflow, "a").status == T.QUEUED


@pytest.mark.django_db
def test_a_selection_too_large_is_refused_whole(builtin_agents, operator, monkeypatch):
    monkeypatch.setattr(operations, "MAX_SELECTED", 2)
    workflows = [submit({"name": "a", "agent": "echo"}) for _ in range(3)]
    response = operator.post(
        _url(Workflow, "changelist"),
        {"action": "cancel", "_selected_action": [w.pk for w in workflows]},
        follow=True,
    )
    assert "Nothing done: select at most 2 workflows to cancel." in _messages(response)
    assert set(Workflow.objects.filter(pk__in=[w.pk for w in workflows]).values_list("status", flat=True)) == {
        W.RUNNING
    }


@pytest.mark.django_db
def test_an_action_runs_on_every_row_selected_whatever_the_list_matches_now(operator):
    """Django hands an action only the selected rows the list's filters still match: of two
    workflows selected in the list of pending ones, one that started meanwhile was left out
    without a word ("Cancelled: 1 workflows") and ran on."""
    started, waiting = WorkflowFactory(status=W.PENDING), WorkflowFactory(status=W.PENDING)
    Workflow.objects.filter(pk=started.pk).update(status=W.RUNNING)
    response = operator.post(
        _url(Workflow, "changelist") + "?status__exact=pending",
        {"action": "cancel", "_selected_action": [started.pk, waiting.pk, "deleted-meanwhile"]},
        follow=True,
    )
    assert "Cancelled: 2 workflows." in _messages(response)
    assert "deleted-meanwhile: it no longer exists" in _messages(response)
    for workflow in (started, waiting):
        workflow.refresh_from_db()
        assert workflow.status == W.CANCELLED
        assert _events(workflow)[-1] == "workflow_cancelled"


@pytest.mark.django_db
def test_select_all_runs_an_action_on_the_rows_the_list_matches(operator):
    pending, running = WorkflowFactory(status=W.PENDING), WorkflowFactory(status=W.RUNNING)
    response = operator.post(
        _url(Workflow, "changelist") + "?status__exact=pending",
        {"action": "cancel", "select_across": "1", "_selected_action": [pending.pk]},
        follow=True,
    )
    assert "Cancelled: 1 workflows." in _messages(response)
    assert Workflow.objects.get(pk=pending.pk).status == W.CANCELLED
    assert Workflow.objects.get(pk=running.pk).status == W.RUNNING


@pytest.mark.django_db
def test_an_operation_on_a_missing_or_malformed_id_is_a_404(operator):
    for object_id in ("no-such-workflow", "bad\x00id"):
        assert operator.post(_url(Workflow, "cancel", object_id)).status_code == 404
    for model in (Workflow, TaskExecution, TaskAttempt, Agent):  # every object page, not only operations
        assert operator.get(_url(model, "change", "bad\x00id")).status_code == 404


def _sent_soft_limit(execution: TaskExecution) -> int:
    """The soft time limit of the task's message waiting in the broker (Celery's `timelimit`
    header is [hard, soft])."""
    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    for raw in broker.lrange(execution.priority, 0, -1):
        message = json.loads(raw)
        if message["headers"]["id"] == execution.celery_task_id:
            return message["headers"]["timelimit"][1]
    raise AssertionError(f"no message for {execution.pk} in queue {execution.priority}")


def test_a_queued_tasks_timeout_is_not_changed_under_its_message(committed, operator):
    """A queued task's message carries the time limits it was sent with; its attempt records
    the row's. Lowered in between, the reaper closes the attempt as past its (recorded) limit
    while the worker still runs it, and runs the task a second time."""
    workflow = submit({"name": "slow", "agent": "sleep", "input": {"seconds": 30}, "timeout_seconds": 300})
    queued = task(workflow, "slow")
    assert queued.status == T.QUEUED and _sent_soft_limit(queued) == 300
    url = _url(TaskExecution, "change", queued.pk)
    data = {"description": "", "priority": "normal", "max_retries": "3", "timeout_seconds": "5"}
    data |= {f"attempts-{k}": v for k, v in {"TOTAL_FORMS": 0, "INITIAL_FORMS": 0}.items()}

    response = operator.post(url, data)

    assert response.status_code == 200
    errors = response.context["adminform"].form.non_field_errors()
    assert f"task {queued.pk} is queued: its message was sent with the timeout and queue it had" in errors[0]
    queued.refresh_from_db()
    assert queued.timeout_seconds == _sent_soft_limit(queued) == 300
    # Running, its message is still the broker's: a lost worker's is delivered again with it.
    TaskExecution.objects.filter(pk=queued.pk).update(status=T.RUNNING)
    response = operator.post(url, data)
    assert response.status_code == 200
    errors = response.context["adminform"].form.non_field_errors()
    assert f"task {queued.pk} is running: its message was sent with the timeout and queue it had" in errors[0]
    # A task that has ended is sent again with the row's limits: there the change is taken.
    TaskExecution.objects.filter(pk=queued.pk).update(status=T.FAILED)
    assert operator.post(url, data).status_code == 302
    queued.refresh_from_db()
    assert queued.timeout_seconds == 5
