"""The SQL rollup into agent_metrics, the agents' summary columns and workflow totals."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from orchestration.db import database_now
from orchestration.models import AgentMetric, TaskAttempt, TaskExecution, Workflow
from orchestration.services.rollup import metrics_rollup, period_floor, rollup_previous
from tests.engine import sqlite_manage
from tests.factories import AgentFactory, TaskAttemptFactory, TaskExecutionFactory, WorkflowFactory
from tests.orchestration.rollup_scenario import rollup_figures, rollup_scenario_build


def approx(value: float) -> Any:
    return pytest.approx(value, rel=1e-12, abs=0)


H = dt.datetime(2024, 3, 5, 10, 0, tzinfo=dt.UTC)


def task(agent, *, status, at, ms, tokens=10, cost="0.01", retries=0, workflow=None) -> TaskExecution:
    return TaskExecutionFactory(
        agent=agent,
        status=status,
        started_at=at - dt.timedelta(milliseconds=ms),
        completed_at=at,
        execution_time_ms=ms,
        tokens_used=tokens,
        input_tokens=tokens // 2,
        output_tokens=tokens - tokens // 2,
        cost_usd=Decimal(cost),
        retry_count=retries,
        **({"workflow": workflow} if workflow else {}),
    )


def metrics(agent, period="hour", start=H) -> dict[str, float]:
    return {
        m.metric_type: m.metric_value
        for m in AgentMetric.objects.filter(agent=agent, period=period, period_start=start)
    }


@pytest.fixture
def activity(db):
    agent = AgentFactory()
    other = AgentFactory()
    for i, ms in enumerate((100, 200, 300)):
        task(agent, status="completed", at=H + dt.timedelta(minutes=10 + i), ms=ms)
    failed = task(agent, status="failed", at=H + dt.timedelta(minutes=30), ms=400, cost="0.02", retries=1)
    for number in (1, 2):
        TaskAttemptFactory(
            execution=failed,
            attempt_number=number,
            failed=True,
            started_at=H + dt.timedelta(minutes=20 + number),
            cost_usd=Decimal("0.0075"),
        )
    task(agent, status="completed", at=H + dt.timedelta(hours=1, minutes=5), ms=999)  # next hour
    task(agent, status="running", at=H + dt.timedelta(minutes=5), ms=50)  # not finished
    # The other agent only wasted money in this hour (its task finished earlier).
    earlier = task(other, status="failed", at=H - dt.timedelta(hours=2), ms=10)
    TaskAttemptFactory(
        execution=earlier,
        attempt_number=1,
        failed=True,
        started_at=H + dt.timedelta(minutes=1),
        cost_usd=Decimal("0.5"),
    )
    return agent, other


def test_hourly_rollup_computes_each_metric_in_sql(activity):
    agent, other = activity
    result = metrics_rollup(period="hour", period_start=H)
    values = metrics(agent)
    assert values == {
        "tasks": 4,
        "success_rate": 75.0,
        "error_rate": 25.0,
        "retries": 1,
        "latency": 250.0,
        "latency_p95": pytest.approx(385.0),  # percentile_cont: 300 + 0.85 * (400 - 300)
        # spend: of the attempts that ended in the hour (the fixture's tasks carry tokens and
        # cost without attempts, which the engine never writes; only the two failed tries count)
        "tokens": 0,
        "input_tokens": 0,
        "output_tokens": 0,
        "cost": pytest.approx(0.015),
        "wasted_cost": pytest.approx(0.015),
    }
    assert metrics(other) == {"tokens": 0, "input_tokens": 0, "output_tokens": 0, "cost": 0.5, "wasted_cost": 0.5}
    assert result.metrics == len(values) + 5
    unit = AgentMetric.objects.get(agent=agent, metric_type="latency_p95", period="hour", period_start=H)
    assert unit.metric_unit == "ms" and unit.context["tasks"] == 4


def test_rerunning_a_period_replaces_its_values(activity):
    agent, _ = activity
    metrics_rollup(period="hour", period_start=H)
    count = AgentMetric.objects.count()
    task(agent, status="completed", at=H + dt.timedelta(minutes=50), ms=500)
    metrics_rollup(period="hour", period_start=H)
    assert AgentMetric.objects.count() == count
    assert metrics(agent)["tasks"] == 5
    assert metrics(agent)["success_rate"] == 80.0


def test_rerunning_a_period_drops_metrics_that_no_longer_have_a_value(activity):
    agent, _ = activity
    metrics_rollup(period="hour", period_start=H)
    assert metrics(agent)["tasks"] == 4
    TaskExecution.objects.filter(agent=agent).delete()  # e.g. retention
    metrics_rollup(period="hour", period_start=H)
    assert metrics(agent) == {}


def test_daily_rollup_covers_the_whole_day(activity):
    agent, _ = activity
    day = H.replace(hour=0)
    metrics_rollup(period="day", period_start=day)
    assert metrics(agent, "day", day)["tasks"] == 5  # the next hour's task is the same day


def test_agents_summary_columns_are_refreshed(activity):
    agent, _ = activity
    metrics_rollup(period="hour", period_start=H)
    agent.refresh_from_db()
    assert agent.total_tasks_completed == 4
    assert agent.total_tokens_used == 60  # every task, finished or not
    assert agent.average_latency_ms == pytest.approx((100 + 200 + 300 + 999) / 4)
    assert agent.success_rate == pytest.approx(80.0)  # 4 completed of 5 finished


def test_workflow_totals_are_reconciled_with_their_tasks(db):
    agent = AgentFactory()
    workflow = WorkflowFactory(
        status=Workflow.Status.COMPLETED,
        started_at=H,
        completed_at=H + dt.timedelta(minutes=59),
        total_tokens_used=3,
        total_cost_usd=Decimal("9"),
    )
    task(agent, status="completed", at=H + dt.timedelta(minutes=1), ms=5, tokens=7, cost="0.25", workflow=workflow)
    task(agent, status="failed", at=H + dt.timedelta(minutes=2), ms=5, tokens=5, cost="0.5", workflow=workflow)
    result = metrics_rollup(period="hour", period_start=H)
    workflow.refresh_from_db()
    assert (workflow.total_tokens_used, workflow.total_cost_usd) == (12, Decimal("0.75"))
    assert result.workflows_reconciled == 1
    assert metrics_rollup(period="hour", period_start=H).workflows_reconciled == 0


def test_rollup_previous_rolls_up_the_last_complete_period(activity):
    agent, _ = activity
    result = rollup_previous(period="hour", now=H + dt.timedelta(hours=1, minutes=7))
    assert result.period_start == H
    assert metrics(agent)["tasks"] == 4


def test_rollup_previous_on_a_host_whose_clock_runs_ahead_rolls_up_the_databases_last_hour(db, monkeypatch):
    """The beat's worker an hour ahead of the database, which stamps completed_at: it took the
    hour still being written for the last complete one, rolled it up short of the tasks that
    finished after, and never came back to it (a period with metrics is not missed)."""
    real_now = timezone.now
    monkeypatch.setattr(timezone, "now", lambda: real_now() + dt.timedelta(hours=1))
    before = period_floor(database_now(), "hour")
    result = rollup_previous(period="hour")
    after = period_floor(database_now(), "hour")  # an hour may begin meanwhile
    assert result.period_start in {before - dt.timedelta(hours=1), after - dt.timedelta(hours=1)}


def test_a_period_the_beat_ran_late_for_is_rolled_up_by_the_next_run(activity, settings):
    """The hourly message for hour H (sent at H+1h05) waited on its queue until after H+2h (a
    worker down, a backlog of low-priority tasks): it takes the hour before the time it runs,
    H+1h. Hour H must still be rolled up, or its figures are missing for good and the hours
    no longer add up to what was spent."""
    agent, other = activity
    result = rollup_previous(period="hour", now=H + dt.timedelta(hours=2, minutes=1))
    assert result.period_start == H + dt.timedelta(hours=1)
    assert metrics(agent, start=H + dt.timedelta(hours=1))["tasks"] == 1
    assert metrics(agent)["tasks"] == 4
    assert metrics(other)["wasted_cost"] == 0.5
    # Every period with activity before it, and only those: the other agent's task finished at H-2h.
    assert result.caught_up == [H - dt.timedelta(hours=2), H]
    assert metrics(other, start=H - dt.timedelta(hours=2))["tasks"] == 1
    # Nothing is missed any more; the next run rolls up its own hour alone.
    assert rollup_previous(period="hour", now=H + dt.timedelta(hours=3, minutes=5)).caught_up == []
    # Not past the metrics' retention: what retention deleted is not written again.
    settings.RETENTION_DAYS_AGENT_METRICS = 1
    AgentMetric.objects.all().delete()
    late = rollup_previous(period="hour", now=H + dt.timedelta(days=1, hours=1))  # retention keeps H+1h on
    assert late.caught_up == [H + dt.timedelta(hours=1)]


def test_a_period_retention_deleted_is_not_rolled_up_again_after_every_retention_run(activity, settings):
    """Retention deletes the metrics of the periods that start more than
    RETENTION_DAYS_AGENT_METRICS ago. The catch-up must not write such a period again (a
    warning, a rollup and metrics past their retention after every retention run): it starts
    at the first period retention keeps."""
    from orchestration.services.retention import retention_apply

    settings.RETENTION_DAYS_AGENT_METRICS = 1
    now = H + dt.timedelta(days=1, minutes=30)  # retention keeps the periods from H+30min: H+1h on
    first = rollup_previous(period="hour", now=now)
    retention_apply(now=now)
    again = rollup_previous(period="hour", now=now + dt.timedelta(minutes=10))
    assert again.caught_up == [], "what retention deleted was rolled up again"
    assert first.caught_up == [H + dt.timedelta(hours=1)]
    assert not AgentMetric.objects.filter(period="hour", period_start__lt=now - dt.timedelta(days=1)).exists()


def test_a_day_the_beat_ran_late_for_is_rolled_up_by_the_next_run(activity):
    agent, _ = activity
    day = H.replace(hour=0)
    rollup_previous(period="day", now=day + dt.timedelta(days=2, minutes=15))
    assert metrics(agent, "day", day)["tasks"] == 5


def test_a_period_start_must_be_aligned(db):
    with pytest.raises(ValueError, match="not the start of a hour"):
        metrics_rollup(period="hour", period_start=H + dt.timedelta(minutes=1))
    with pytest.raises(ValueError, match="unknown period"):
        metrics_rollup(period="week", period_start=H)
    assert TaskAttempt.objects.count() == 0


def sqlite_figures(tmp_path: Path) -> dict[str, Any]:
    """The rollup scenario on a fresh SQLite database (the embedded default), in a subprocess."""
    code = "from tests.orchestration.rollup_scenario import rollup_scenario_print; rollup_scenario_print()"
    sqlite_manage(tmp_path, "migrate", "--no-input")
    result = sqlite_manage(tmp_path, "shell", "-c", code)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.subprocess
def test_the_sqlite_rollup_computes_the_same_figures_as_postgresql(db, tmp_path):
    lite = sqlite_figures(tmp_path)
    rollup_scenario_build()
    postgres = json.loads(json.dumps(rollup_figures()))
    assert len(postgres["metrics"]) > 80  # the scenario exercises every metric for several agents
    assert {row[3] for row in postgres["metrics"]} == {
        "tasks", "success_rate", "error_rate", "retries", "latency", "latency_p95",
        "tokens", "input_tokens", "output_tokens", "cost", "wasted_cost",
    }  # fmt: skip
    lite_metrics = {tuple(row[:4]): row[4:] for row in lite.pop("metrics")}
    postgres_metrics = {tuple(row[:4]): row[4:] for row in postgres.pop("metrics")}
    # Exact, except the averages: both databases sum doubles, in the order they scan the rows.
    differing = {
        key: (lite_metrics.get(key), value)
        for key, value in postgres_metrics.items()
        if lite_metrics.get(key) != (value if key[3] != "latency" else [value[0], approx(value[1]), value[2]])
    }
    assert not differing, "\n".join(f"{key}: sqlite {got}, postgresql {want}" for key, (got, want) in differing.items())
    assert lite_metrics.keys() == postgres_metrics.keys()
    lite_agents, postgres_agents = lite.pop("agents"), postgres.pop("agents")
    assert [row[:3] + row[4:] for row in lite_agents] == [row[:3] + row[4:] for row in postgres_agents]
    assert [row[3] for row in lite_agents] == [approx(row[3]) for row in postgres_agents]  # average latency
    assert lite == postgres  # the rollup results (rows written, agents refreshed, workflows reconciled), totals
    assert postgres["results"][2][2] == 0  # a second run finds every workflow total right


def test_spend_that_arrives_after_its_hour_was_rolled_up_is_rolled_up_by_the_next_run(
    db, django_capture_on_commit_callbacks
):
    """A model's answer that arrives after its attempt was cancelled (or reaped) is added to the
    attempt, which ended in an hour that may already be rolled up. The next run rolls that hour
    up again, or its cost misses the late bill for good and the hours no longer add up to what
    the attempts cost."""
    from django.utils import timezone

    from orchestration.runtime.context import Usage
    from orchestration.services.execution import _meter
    from orchestration.services.rollup import period_floor
    from orchestration.services.workflows import task_cancel

    agent = AgentFactory()
    execution = TaskExecutionFactory(agent=agent, workflow=None, status="running", celery_task_id="m-late")
    attempt = TaskAttemptFactory(
        execution=execution,
        started_at=timezone.now() - dt.timedelta(seconds=3),
        input_tokens=700,
        output_tokens=50,
        tokens_used=750,
        cost_usd=Decimal("0.0125"),
    )
    with django_capture_on_commit_callbacks(execute=True):
        task_cancel(execution_id=execution.pk)
    attempt.refresh_from_db()
    hour = period_floor(attempt.finished_at, "hour")
    rollup_previous(period="hour", now=hour + dt.timedelta(hours=1, minutes=5))
    assert metrics(agent, start=hour)["cost"] == approx(0.0125)

    _meter(attempt.pk)(Usage(200, 80, Decimal("0.020")))  # the answer, paid, after the close

    result = rollup_previous(period="hour", now=hour + dt.timedelta(hours=2, minutes=5))
    attempt.refresh_from_db()
    assert attempt.cost_usd == Decimal("0.0325")
    assert metrics(agent, start=hour)["cost"] == approx(0.0325)
    assert metrics(agent, start=hour)["tokens"] == 1030
    assert result.caught_up == [hour]
    # rolled up again once: nothing changed since
    assert rollup_previous(period="hour", now=hour + dt.timedelta(hours=3, minutes=5)).caught_up == []


@pytest.mark.parametrize(("period", "away"), [("hour", dt.timedelta(days=4)), ("day", dt.timedelta(days=12))])
def test_periods_missed_while_the_beat_was_away_longer_than_the_catch_up_are_rolled_up(activity, period, away):
    """The beat (or the worker of its queue) away for longer than the catch-up's look-back:
    every period with activity since the last one rolled up is rolled up when it comes back,
    not only those of the last CATCHUP, or the hours (days) of the start of the outage have no
    metrics for good and no longer add up to the days (the spend)."""
    agent, _ = activity
    step = dt.timedelta(hours=1) if period == "hour" else dt.timedelta(days=1)
    last = period_floor(H, period)
    rollup_previous(period=period, now=last + 2 * step + dt.timedelta(minutes=20))
    back = last + 2 * step + away
    # A task finished in the outage's first period, its middle one and its last complete one.
    active = [last + 2 * step, last + 2 * step + away / 2, back - step]
    for start in active:
        task(agent, status="completed", at=start + dt.timedelta(minutes=30), ms=10)
    result = rollup_previous(period=period, now=back + dt.timedelta(minutes=20))
    assert result.period_start == back - step
    assert result.caught_up == active[:-1]
    assert [metrics(agent, period, start).get("tasks") for start in active] == [1, 1, 1]


def test_a_task_recorded_after_its_hour_was_rolled_up_is_rolled_up_by_the_next_run(activity):
    """A try that ended just before the hour and whose record was written after the hour's
    rollup (its write retried through a lost connection, stamped with the time it ended): with
    no spend (a python tool) nothing said the hour had grown, and its task was missing from the
    hour's figures for good."""
    agent, _ = activity
    rollup_previous(period="hour", now=H + dt.timedelta(hours=1, minutes=5))
    assert metrics(agent)["tasks"] == 4
    late = task(agent, status="completed", at=H + dt.timedelta(minutes=59, seconds=58), ms=600, tokens=0, cost="0")
    TaskAttemptFactory(execution=late, attempt_number=1, succeeded=True, started_at=late.started_at)

    result = rollup_previous(period="hour", now=H + dt.timedelta(hours=2, minutes=5))
    assert result.caught_up == [H]
    assert (metrics(agent)["tasks"], metrics(agent)["success_rate"]) == (5, 80.0)
    assert rollup_previous(period="hour", now=H + dt.timedelta(hours=3, minutes=5)).caught_up == []
