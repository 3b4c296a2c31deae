"""load_sample_data: one recorded workflow whose times read in order and whose spend adds up, as the
engine writes them."""

from __future__ import annotations

import io
from decimal import Decimal

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db import connection
from django.db.models import Sum

from orchestration.models import Agent, Event, TaskAttempt, TaskExecution, Workflow
from orchestration.selectors import agent_stats, user_spend
from orchestration.services.sample_data import SAMPLE_WORKFLOW_ID
from tests.config.test_settings import production_env, run_manage


def test_the_sample_workflow_is_created_before_it_starts_and_ends(db):
    """Its rows were backdated ten minutes but created at the INSERT's time: the console and
    the JSONL export showed a workflow created after it completed, and an export of its day
    held rows created the next day."""
    call_command("load_sample_data", stdout=io.StringIO())
    workflow = Workflow.objects.get(pk=SAMPLE_WORKFLOW_ID)
    assert workflow.created_at <= workflow.started_at <= workflow.completed_at
    created_event = Event.objects.get(workflow_id=SAMPLE_WORKFLOW_ID, event_type="workflow_created")
    assert workflow.created_at == created_event.created_at
    tasks = TaskExecution.objects.filter(workflow=workflow)
    assert tasks.count() == 2
    for task in tasks:
        assert workflow.created_at <= task.created_at <= task.queued_at <= task.started_at <= task.completed_at
    attempts = TaskAttempt.objects.filter(execution__workflow=workflow)
    assert attempts.count() == 3
    for attempt in attempts:
        assert attempt.execution.queued_at <= attempt.created_at <= attempt.started_at <= attempt.finished_at


def test_the_sample_workflows_spend_adds_up_as_the_engine_records_it(db):
    """Its review's first try failed on a rate limit after paying $0.0009: the sample's metrics
    counted that as the agent's wasted spend, but the workflow said it wasted nothing and had no
    error (wasted_cost_usd 0, error_count 0), so its owner's spend (me/spend) and the agent's
    statistics disagreed about the same try."""
    call_command("load_sample_data", stdout=io.StringIO())
    workflow = Workflow.objects.get(pk=SAMPLE_WORKFLOW_ID)
    attempts = TaskAttempt.objects.filter(execution__workflow=workflow)
    wasted = attempts.filter(status__in=TaskAttempt.WASTED_STATUSES)
    paid = attempts.aggregate(tokens=Sum("tokens_used"), cost=Sum("cost_usd"))
    assert (workflow.total_tokens_used, workflow.total_cost_usd) == (paid["tokens"], paid["cost"])
    wasted_cost = wasted.aggregate(cost=Sum("cost_usd"))["cost"]
    assert (workflow.wasted_cost_usd, workflow.error_count) == (wasted_cost, wasted.count())
    assert workflow.wasted_cost_usd == Decimal("0.000900")
    owner_spend = user_spend(user_id=workflow.owner_id)["wasted_cost_usd"]
    agents_wasted = sum(agent_stats(agent_id=agent)["wasted_cost_usd"] for agent in ("akira-001", "yuki-002"))
    assert owner_spend == agents_wasted == Decimal("0.000900")


def test_production_settings_refuse_to_load_the_sample_history(transactional_db):
    """Under production settings the command wrote its made-up history into the real record (a
    backdated workflow, its attempts and events: events cannot be deleted, and the nightly
    export turns them into training data), two active llm agents that spend the deployment's
    keys, and a superuser whose password it printed: exit 0, nothing said. It refuses, saying
    why, and writes nothing."""
    database = connection.settings_dict
    url = f"postgres://{database['USER']}@{database['HOST']}:{database['PORT']}/{database['NAME']}"
    result = run_manage("load_sample_data", **production_env(DATABASE_URL=url, REDIS_URL=settings.REDIS_URL))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "production" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not Workflow.objects.filter(pk=SAMPLE_WORKFLOW_ID).exists()
    assert not Agent.objects.filter(pk__in=["akira-001", "yuki-002"]).exists()
    assert not get_user_model().objects.filter(username="admin").exists()
