"""One fixed data set for the rollup, built the same way on PostgreSQL (in the test process) and
on SQLite (in a `manage.py shell` subprocess), so that the two SQL branches can be compared
figure by figure. Deterministic: a seeded generator plus hand-placed edge cases (period
boundaries to the microsecond, NULL durations, inexact decimal sums, one-task agents)."""

from __future__ import annotations

import datetime as dt
import json
import random
from decimal import Decimal
from typing import Any

H = dt.datetime(2024, 3, 5, 10, 0, tzinfo=dt.UTC)
TASK_STATUSES = ("completed", "completed", "completed", "failed", "timed_out", "cancelled", "running")
ATTEMPT_STATUSES = ("succeeded", "failed", "timed_out", "lost")


def rollup_scenario_build() -> None:
    """Agents, workflows, tasks and attempts around the hour H and its day."""
    from orchestration.models import Agent, TaskAttempt, TaskExecution, Workflow

    rng = random.Random(20240305)
    agents = [Agent.objects.create(id=f"rollup-{n}", name=f"Rollup {n}") for n in range(4)]
    workflows = [
        Workflow.objects.create(
            name=f"rollup {n}",
            status="completed",
            started_at=H,
            completed_at=H + dt.timedelta(minutes=50 + n),
            total_tokens_used=1,
            total_cost_usd=Decimal("0.3"),
        )
        for n in range(3)
    ]
    number = 0

    def task(agent: Any, *, status: str, at: dt.datetime, ms: float | None, cost: str, tokens: int) -> Any:
        nonlocal number
        number += 1
        return TaskExecution.objects.create(
            workflow=workflows[number % len(workflows)],
            agent=agent,
            task_name=f"t{number}",
            status=status,
            completed_at=at,
            execution_time_ms=ms,
            tokens_used=tokens,
            input_tokens=tokens // 3,
            output_tokens=tokens - tokens // 3,
            cost_usd=Decimal(cost),
            retry_count=rng.randint(0, 3),
        )

    # Agents 0-2: many tasks across H-1h .. H+2h (the hour and the day see different sets).
    for agent in agents[:3]:
        for _ in range(rng.randint(20, 45)):
            at = H + dt.timedelta(microseconds=rng.randint(-3_600_000_000, 7_200_000_000))
            ms = None if rng.random() < 0.1 else round(rng.uniform(1, 5000), rng.choice((0, 1, 3)))
            cost = f"{rng.choice((0.1, 0.2, 0.3, 0.000001, 0.123457, 1.1)) * rng.randint(1, 3):.6f}"
            execution = task(
                agent, status=rng.choice(TASK_STATUSES), at=at, ms=ms, cost=cost, tokens=rng.randint(0, 5000)
            )
            for attempt_number in range(1, rng.randint(1, 3) + 1):
                finished = at - dt.timedelta(seconds=rng.randint(0, 1800))
                TaskAttempt.objects.create(
                    execution=execution,
                    attempt_number=attempt_number,
                    status=rng.choice(ATTEMPT_STATUSES),
                    started_at=finished - dt.timedelta(seconds=5),
                    finished_at=finished,
                    cost_usd=Decimal(f"{rng.choice((0.1, 0.2, 0.7, 0.000003)):.6f}"),
                )
    # Edges of the hour: the start is in, the end is out, one microsecond either side.
    edge = agents[0]
    task(edge, status="completed", at=H, ms=10.5, cost="0.1", tokens=1)
    task(edge, status="failed", at=H + dt.timedelta(hours=1), ms=20, cost="0.2", tokens=2)
    task(
        edge,
        status="completed",
        at=H + dt.timedelta(hours=1) - dt.timedelta(microseconds=1),
        ms=30,
        cost="0.2",
        tokens=4,
    )
    task(edge, status="completed", at=H - dt.timedelta(microseconds=1), ms=40, cost="0.4", tokens=8)
    # A workflow whose recorded total is right: 0.1 + 0.2 is 0.3 in decimal, not in binary.
    exact = Workflow.objects.create(
        name="rollup exact", status="completed", started_at=H, completed_at=H + dt.timedelta(minutes=30),
        total_tokens_used=3, total_cost_usd=Decimal("0.3"),
    )  # fmt: skip
    for n, cost in enumerate(("0.1", "0.2"), start=1):
        TaskExecution.objects.create(
            workflow=exact, agent=agents[3], task_name=f"exact{n}", status="completed",
            completed_at=H + dt.timedelta(minutes=20 + n), execution_time_ms=5, tokens_used=n, cost_usd=Decimal(cost),
        )  # fmt: skip
    # Agent 3: one task (p95 of a single value) and waste from a task that finished the day before.
    task(agents[3], status="completed", at=H + dt.timedelta(minutes=7), ms=123.456, cost="0.1", tokens=3)
    old = task(agents[3], status="failed", at=H - dt.timedelta(days=1), ms=None, cost="0.2", tokens=3)
    for attempt_number, status in enumerate(("failed", "timed_out", "lost", "succeeded"), start=1):
        TaskAttempt.objects.create(
            execution=old,
            attempt_number=attempt_number,
            status=status,
            started_at=H,
            finished_at=H + dt.timedelta(minutes=attempt_number),
            cost_usd=Decimal("0.1"),
        )


def rollup_figures() -> dict[str, Any]:
    """Run the hourly and daily rollups and read back every figure they wrote."""
    from orchestration.models import Agent, AgentMetric, Workflow
    from orchestration.services.rollup import metrics_rollup

    day = H.replace(hour=0)
    hour = metrics_rollup(period="hour", period_start=H, now=H + dt.timedelta(hours=3))
    daily = metrics_rollup(period="day", period_start=day, now=H + dt.timedelta(hours=3))
    again = metrics_rollup(period="hour", period_start=H, now=H + dt.timedelta(hours=3))
    return {
        "results": [[r.metrics, r.agents_refreshed, r.workflows_reconciled] for r in (hour, daily, again)],
        "metrics": sorted(
            [m.agent_id, m.period, m.period_start.isoformat(), m.metric_type, m.metric_unit, m.metric_value, m.context]
            for m in AgentMetric.objects.all()
        ),
        "agents": sorted(
            [a.id, a.total_tasks_completed, a.total_tokens_used, a.average_latency_ms, a.success_rate]
            for a in Agent.objects.filter(id__startswith="rollup-")
        ),
        "workflows": sorted(
            [w.name, w.total_tokens_used, str(w.total_cost_usd)]
            for w in Workflow.objects.filter(name__startswith="rollup")
        ),
    }


def rollup_scenario_print() -> None:
    """What the SQLite subprocess runs: build, roll up, print the figures as one JSON line."""
    rollup_scenario_build()
    print(json.dumps(rollup_figures()))
