"""GET /me/spend/: DESIGN §4's spend and wasted spend per user, over a window."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from django.utils import timezone

from orchestration.models import TaskAttempt, Workflow
from tests.factories import MessageFactory, TaskAttemptFactory, TaskExecutionFactory, WorkflowFactory

A = TaskAttempt.Status


def workflow(owner, *, tokens: int, cost: str, wasted: str, days_ago: int = 0) -> Workflow:
    made = WorkflowFactory(
        owner=owner, total_tokens_used=tokens, total_cost_usd=Decimal(cost), wasted_cost_usd=Decimal(wasted)
    )
    if days_ago:
        Workflow.objects.filter(pk=made.pk).update(created_at=timezone.now() - dt.timedelta(days=days_ago))
    return made


def reply(owner, *, tries: list[tuple[str, str, int]]):
    """A conversation reply task (no workflow) answering `owner`'s message, with its tries
    (status, cost, tokens); the task's totals are its tries', as the engine keeps them."""
    task = TaskExecutionFactory(
        workflow=None,
        task_type="conversation",
        tokens_used=sum(tokens for _, _, tokens in tries),
        cost_usd=sum((Decimal(cost) for _, cost, _ in tries), Decimal(0)),
    )
    for number, (status, cost, tokens) in enumerate(tries, start=1):
        TaskAttemptFactory(
            execution=task,
            attempt_number=number,
            status=status,
            cost_usd=Decimal(cost),
            tokens_used=tokens,
            finished_at=timezone.now(),
        )
    MessageFactory(owner=owner, agent=task.agent, execution=task)
    return task


@pytest.fixture
def recorded(callers):
    dev, other = callers["developer"].user, callers["other"].user
    workflow(dev, tokens=100, cost="0.500000", wasted="0.100000")
    workflow(dev, tokens=50, cost="0.250000", wasted="0")
    workflow(dev, tokens=999, cost="9", wasted="9", days_ago=3)  # outside the default 24 hours
    workflow(other, tokens=7, cost="0.7", wasted="0.7")
    reply(dev, tries=[(A.FAILED, "0.010000", 10), (A.SUCCEEDED, "0.020000", 20)])
    reply(other, tries=[(A.LOST, "0.5", 5)])
    return callers


def spend(caller, query: str = ""):
    return caller.client.get(f"/api/v1/me/spend/{query}")


def test_a_users_spend_and_wasted_spend_over_the_last_day(recorded):
    response = spend(recorded["developer"])
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["username"] == "dev" and body["until"] is None
    assert body["workflows"] == {"count": 2, "tokens": 150, "cost_usd": "0.750000", "wasted_cost_usd": "0.100000"}
    assert body["conversation_replies"] == {
        "count": 1,
        "tokens": 30,
        "cost_usd": "0.030000",
        "wasted_cost_usd": "0.010000",  # the failed try
    }
    assert (body["total_tokens"], body["total_cost_usd"], body["wasted_cost_usd"]) == (180, "0.780000", "0.110000")


def test_the_window_is_the_callers_to_choose(recorded):
    since = (timezone.now() - dt.timedelta(days=4)).isoformat()
    body = spend(recorded["developer"], f"?since={since.replace('+', '%2B')}").json()
    assert body["workflows"]["count"] == 3 and body["wasted_cost_usd"] == "9.110000"
    until = (timezone.now() - dt.timedelta(days=1)).isoformat()
    body = spend(recorded["developer"], f"?since={since.replace('+', '%2B')}&until={until.replace('+', '%2B')}").json()
    assert body["workflows"]["count"] == 1 and body["conversation_replies"]["count"] == 0
    response = spend(recorded["developer"], f"?until={since.replace('+', '%2B')}")
    assert response.status_code == 400
    assert response.json()["errors"] == [{"field": "until", "detail": "must be after since (default: 24 hours ago)"}]


def test_admins_read_anyones_spend_others_only_their_own(recorded):
    body = spend(recorded["admin"], "?user=dev").json()
    assert body["username"] == "dev" and body["total_cost_usd"] == "0.780000"
    assert spend(recorded["admin"]).json()["total_cost_usd"] == "0.000000", "the admin's own: nothing"
    assert spend(recorded["admin"], "?user=ghost").status_code == 404
    refused = spend(recorded["developer"], "?user=eve")
    assert refused.status_code == 403 and "Only an admin" in refused.json()["detail"]
    assert spend(recorded["developer"], "?user=dev").json()["total_cost_usd"] == "0.780000"
    other = spend(recorded["other"]).json()
    assert (other["workflows"]["wasted_cost_usd"], other["conversation_replies"]["wasted_cost_usd"]) == (
        "0.700000",
        "0.500000",
    )
    viewer = spend(recorded["viewer"])
    assert viewer.status_code == 200 and viewer.json()["total_tokens"] == 0
    assert spend(recorded["norole"]).status_code == 403


def test_a_narrowed_admin_key_cannot_read_anyones_spend(recorded):
    """An admin's key narrowed to a permission that reads no workflow (here export:read) must
    not read another user's workflow costs: every other read of workflows and tasks needs
    workflow:read, which the key does not grant."""
    from tests.api.conftest import make_caller

    narrowed = make_caller("alice2", "admin", permissions=["export:read"])
    assert narrowed.client.get("/api/v1/workflows/").status_code == 403, "the key reads no workflow"
    response = spend(narrowed, "?user=dev")
    assert response.status_code == 403, response.content


def test_a_key_narrowed_to_workflow_read_still_reads_spend(recorded):
    from tests.api.conftest import make_caller

    scoped = make_caller("alice3", "admin", permissions=["workflow:read"])
    body = spend(scoped, "?user=dev").json()
    assert body["total_cost_usd"] == "0.780000"


@pytest.mark.parametrize(
    "query, field, detail",
    [
        ("?user=", "user", "must not be empty"),
        ("?since=%20", "since", "must not be empty"),
        ("?username=dev", "username", "unknown query parameter (allowed: format, since, until, user)"),
    ],
)
def test_an_empty_or_unknown_parameter_is_refused_not_read_as_absent(recorded, query, field, detail):
    """`?user=` answered the admin's own spend as if it were the user asked for."""
    response = spend(recorded["admin"], query)
    assert response.status_code == 400
    assert response.json()["errors"] == [{"field": field, "detail": detail}]
