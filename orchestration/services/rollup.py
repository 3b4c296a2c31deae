"""The rollup: per-agent metrics per hour and per day, computed in SQL.

`metrics_rollup` writes, for one period [start, start + hour|day), one `agent_metrics` row
per agent and metric with one INSERT ... SELECT ... ON CONFLICT DO UPDATE (the
`agent_metrics_one_per_period` unique index), so running it again for the same period
replaces the values instead of adding rows. Measured per agent over the tasks that finished
in the period (completed, failed or timed out; cancelled ones never ran to an outcome):

- tasks, success_rate and error_rate (percent), retries (sum of retry_count);
- latency (average) and latency_p95 (percentile_cont) of execution_time_ms;
- tokens, input_tokens, output_tokens, cost: of the attempts that ended in the period, each
  attempt once, in the period it ended (a resumed task finishes twice; its spend does not
  count twice, and summing the periods gives what was spent);
- wasted_cost: the cost of the attempts that failed, timed out or were lost in the period.

It then refreshes the agents' summary columns (all time) and reconciles the token and cost
totals of the workflows that finished in the period with the sum of their tasks. Once the
period is committed, its points go to InfluxDB (when configured).

The beat's entry point, `rollup_previous`, rolls up the last complete period, and before it
the earlier ones that saw activity but have no metrics: a run that came late (a worker down, a
backlog on its queue) takes the period before the time it runs, and the one it was sent for
would otherwise never be rolled up; after the beat was away for days, every period since the
last one rolled up. It rolls up again the earlier periods whose attempts were
charged more since their metrics were written (an answer that arrived after its attempt was
closed), so that summing the periods still gives what was spent.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Count, Sum
from django.db.models.functions import Coalesce, Trunc
from django.utils import timezone

from observability.influx import rollup_points_write
from orchestration.db import database_now
from orchestration.models import AgentMetric, TaskAttempt, TaskExecution

logger = logging.getLogger(__name__)

PERIODS = {AgentMetric.Period.HOUR: dt.timedelta(hours=1), AgentMetric.Period.DAY: dt.timedelta(days=1)}
# How far back rollup_previous looks for periods that were never rolled up (further, to the last
# period rolled up, after a longer stop) and for spend added since.
CATCHUP = {AgentMetric.Period.HOUR: dt.timedelta(days=2), AgentMetric.Period.DAY: dt.timedelta(days=7)}
FINISHED = ("completed", "failed", "timed_out")
# SQLite keeps decimals as doubles, so its SUM of costs drifts (0.1 + 0.2 = 0.30000000000000004);
# rounding the sums to the columns' decimal places gives PostgreSQL's exact numeric sums there.
COST_PLACES = TaskExecution._meta.get_field("cost_usd").decimal_places
WASTED_ATTEMPTS = TaskAttempt.WASTED_STATUSES

# (metric_type, unit, SQL expression over the per-agent aggregates a.* and the p95 p.v)
METRICS = (
    ("tasks", "count", "a.tasks"),
    ("success_rate", "percent", "100.0 * a.succeeded / a.tasks"),
    ("error_rate", "percent", "100.0 * a.errored / a.tasks"),
    ("retries", "count", "a.retries"),
    ("latency", "ms", "a.latency"),
    ("latency_p95", "ms", "p.v"),
    ("tokens", "tokens", "w.tokens"),
    ("input_tokens", "tokens", "w.input_tokens"),
    ("output_tokens", "tokens", "w.output_tokens"),
    ("cost", "usd", "w.cost"),
    ("wasted_cost", "usd", "COALESCE(w.wasted, 0)"),
)

# percentile_cont on PostgreSQL; SQLite (the embedded first-run database) has no ordered-set
# aggregates, so there the same interpolation is spelled with window functions, in
# PostgreSQL's own arithmetic (lo + f * (hi - lo), f = 0.95 * (n - 1) - floor(...)) so that
# both give the same double.
_P95 = {
    "postgresql": """
        SELECT agent_id, percentile_cont(0.95) WITHIN GROUP (ORDER BY execution_time_ms) AS v
        FROM finished WHERE execution_time_ms IS NOT NULL GROUP BY agent_id
    """,
    "sqlite": """
        SELECT agent_id, x + (0.95 * (n - 1) - i) * (COALESCE(next_x, x) - x) AS v
        FROM (
            SELECT agent_id, execution_time_ms AS x,
                   LEAD(execution_time_ms) OVER ordered AS next_x,
                   ROW_NUMBER() OVER ordered - 1 AS i,
                   COUNT(*) OVER (PARTITION BY agent_id) AS n
            FROM finished WHERE execution_time_ms IS NOT NULL
            WINDOW ordered AS (PARTITION BY agent_id ORDER BY execution_time_ms)
        ) ranked
        WHERE i = CAST(0.95 * (n - 1) AS INTEGER)
    """,
}
_NEW_ID = {"postgresql": "gen_random_uuid()", "sqlite": "lower(hex(randomblob(16)))"}
_CONTEXT = {
    "postgresql": "jsonb_build_object('tasks', a.tasks, 'period_end', %(end_text)s)",
    "sqlite": "json_object('tasks', a.tasks, 'period_end', %(end_text)s)",
}


def _rollup_sql(vendor: str) -> str:
    values = ",\n".join(f"('{name}', '{unit}', {expression})" for name, unit, expression in METRICS)
    cast = "::double precision" if vendor == "postgresql" else ""
    # Built from the constants above only; the period bounds are query parameters.
    return f"""
    WITH finished AS (
        SELECT agent_id, status, retry_count, execution_time_ms, tokens_used, input_tokens, output_tokens, cost_usd
        FROM task_executions
        WHERE completed_at >= %(start)s AND completed_at < %(end)s AND status IN {FINISHED!r}
    ),
    agg AS (
        SELECT agent_id,
               COUNT(*) AS tasks,
               SUM(CASE WHEN status = 'completed' THEN 1 ELSE 0 END) AS succeeded,
               SUM(CASE WHEN status <> 'completed' THEN 1 ELSE 0 END) AS errored,
               SUM(retry_count) AS retries,
               AVG(execution_time_ms) AS latency
        FROM finished GROUP BY agent_id
    ),
    p95 AS ({_P95[vendor]}),
    wasted AS (
        -- Spend is counted per attempt, in the period the attempt ended: every attempt once,
        -- whatever became of its task (a resumed task finishes twice; its spend does not).
        SELECT t.agent_id,
               ROUND(SUM(CASE WHEN ta.status IN {WASTED_ATTEMPTS!r} THEN ta.cost_usd ELSE 0 END), {COST_PLACES})
                   AS wasted,
               SUM(ta.tokens_used) AS tokens,
               SUM(ta.input_tokens) AS input_tokens,
               SUM(ta.output_tokens) AS output_tokens,
               ROUND(SUM(ta.cost_usd), {COST_PLACES}) AS cost
        FROM task_attempts ta JOIN task_executions t ON t.execution_id = ta.execution_id
        WHERE ta.finished_at >= %(start)s AND ta.finished_at < %(end)s
        GROUP BY t.agent_id
    ),
    agents_in_period AS (SELECT agent_id FROM agg UNION SELECT agent_id FROM wasted)
    INSERT INTO agent_metrics
        (id, agent_id, metric_type, metric_value, metric_unit, period, period_start, recorded_at, context, created_at)
    SELECT {_NEW_ID[vendor]}, x.agent_id, m.metric_type, m.metric_value{cast}, m.metric_unit, %(period)s, %(start)s,
           %(now)s, m.context, %(now)s
    FROM agents_in_period x
    LEFT JOIN agg a ON a.agent_id = x.agent_id
    LEFT JOIN p95 p ON p.agent_id = x.agent_id
    LEFT JOIN wasted w ON w.agent_id = x.agent_id
    CROSS JOIN LATERAL (
        SELECT v.metric_type, v.metric_unit, v.metric_value, {_CONTEXT[vendor]} AS context
        FROM (VALUES {values}) AS v (metric_type, metric_unit, metric_value)
    ) m
    WHERE m.metric_value IS NOT NULL
    ON CONFLICT (agent_id, metric_type, period, period_start) WHERE period IS NOT NULL
    DO UPDATE SET metric_value = excluded.metric_value, metric_unit = excluded.metric_unit,
                  recorded_at = excluded.recorded_at, context = excluded.context
    """  # noqa: S608


def _sqlite_rollup_sql() -> str:
    """SQLite has neither LATERAL nor column lists on VALUES: one SELECT per metric instead."""
    selects = []
    for name, unit, expression in METRICS:
        selects.append(
            f"SELECT lower(hex(randomblob(16))), x.agent_id, '{name}', {expression}, '{unit}', %(period)s, "  # noqa: S608
            f"%(start)s, %(now)s, json_object('tasks', a.tasks, 'period_end', %(end_text)s), %(now)s "
            "FROM agents_in_period x LEFT JOIN agg a ON a.agent_id = x.agent_id "
            "LEFT JOIN p95 p ON p.agent_id = x.agent_id LEFT JOIN wasted w ON w.agent_id = x.agent_id "
            f"WHERE ({expression}) IS NOT NULL"
        )
    common = _rollup_sql("sqlite")
    head = common[: common.index("INSERT INTO agent_metrics")]
    insert = (
        "INSERT INTO agent_metrics (id, agent_id, metric_type, metric_value, metric_unit, period, period_start, "  # noqa: S608
        "recorded_at, context, created_at) SELECT * FROM (" + " UNION ALL ".join(selects) + ") WHERE true "
        "ON CONFLICT (agent_id, metric_type, period, period_start) WHERE period IS NOT NULL "
        "DO UPDATE SET metric_value = excluded.metric_value, metric_unit = excluded.metric_unit, "
        "recorded_at = excluded.recorded_at, context = excluded.context"
    )
    return head + insert


AGENTS_REFRESH_SQL = f"""
    UPDATE agents SET
        total_tasks_completed = s.completed,
        total_tokens_used = s.tokens,
        average_latency_ms = s.latency,
        success_rate = s.success_rate
    FROM (
        SELECT a.id AS agent_id,
               SUM(CASE WHEN t.status = 'completed' THEN 1 ELSE 0 END) AS completed,
               COALESCE(SUM(t.tokens_used), 0) AS tokens,
               COALESCE(AVG(CASE WHEN t.status = 'completed' THEN t.execution_time_ms END), 0) AS latency,
               CASE WHEN SUM(CASE WHEN t.status IN {FINISHED!r} THEN 1 ELSE 0 END) = 0 THEN 100.0
                    ELSE 100.0 * SUM(CASE WHEN t.status = 'completed' THEN 1 ELSE 0 END)
                         / SUM(CASE WHEN t.status IN {FINISHED!r} THEN 1 ELSE 0 END) END AS success_rate
        -- every agent, so that one whose last tasks were pruned (retention) is reset too
        FROM agents a LEFT JOIN task_executions t ON t.agent_id = a.id GROUP BY a.id
    ) s
    WHERE agents.id = s.agent_id
      AND (agents.total_tasks_completed <> s.completed OR agents.total_tokens_used <> s.tokens
           OR agents.average_latency_ms <> s.latency OR agents.success_rate <> s.success_rate)
"""  # noqa: S608

WORKFLOWS_RECONCILE_SQL = f"""
    UPDATE workflows SET total_tokens_used = s.tokens, total_cost_usd = s.cost
    FROM (
        SELECT w.workflow_id, {{version}} AS row_version,
               SUM(t.tokens_used) AS tokens, ROUND(SUM(t.cost_usd), {COST_PLACES}) AS cost
        FROM workflows w JOIN task_executions t ON t.workflow_id = w.workflow_id
        WHERE w.completed_at >= %(start)s AND w.completed_at < %(end)s
        GROUP BY w.workflow_id, row_version
    ) s
    WHERE workflows.workflow_id = s.workflow_id
      AND {{same_version}}
      AND (workflows.total_tokens_used <> s.tokens OR workflows.total_cost_usd <> s.cost)
"""  # noqa: S608
# The sums are read with the statement's snapshot. A row that a concurrent transaction (a
# resumed run's completion) changes meanwhile is re-checked by PostgreSQL on its newest version
# for this statement's own conditions only, not the sums: it would be set back to sums that lack
# that run. Its version (xmin) read with the sums must still be the row's, or it is left to the
# next reconcile. SQLite serialises writers.
_RECONCILE_VERSION = {
    "postgresql": {"version": "w.xmin::text", "same_version": "workflows.xmin::text = s.row_version"},
    "sqlite": {"version": "''", "same_version": "1 = 1"},
}


@dataclass
class RollupResult:
    period: str
    period_start: dt.datetime
    metrics: int = 0
    agents_refreshed: int = 0
    workflows_reconciled: int = 0
    caught_up: list[dt.datetime] = field(default_factory=list)  # earlier periods rolled up first


def period_floor(value: dt.datetime, period: str) -> dt.datetime:
    value = value.astimezone(dt.UTC)
    if period == AgentMetric.Period.HOUR:
        return value.replace(minute=0, second=0, microsecond=0)
    if period == AgentMetric.Period.DAY:
        return value.replace(hour=0, minute=0, second=0, microsecond=0)
    raise ValueError(f"unknown period {period!r}; expected one of {sorted(PERIODS)}")


@transaction.atomic
def metrics_rollup(*, period: str, period_start: dt.datetime, now: dt.datetime | None = None) -> RollupResult:
    """Roll up one period (hour or day starting at `period_start`, UTC) into agent_metrics,
    refresh the agents' summary columns and reconcile the period's workflow totals. Safe to
    run again: it replaces the period's values."""
    if timezone.is_naive(period_start):
        raise ValueError("period_start must be timezone-aware")
    if period_floor(period_start, period) != period_start.astimezone(dt.UTC):
        raise ValueError(f"period_start {period_start.isoformat()} is not the start of a {period}")
    vendor = connection.vendor
    if vendor not in _P95:
        raise RuntimeError(f"no rollup for {vendor}; use PostgreSQL or SQLite")
    start = period_start.astimezone(dt.UTC)
    end = start + PERIODS[period]
    now = now or database_now()
    adapt = connection.ops.adapt_datetimefield_value
    params = {
        "start": adapt(start),
        "end": adapt(end),
        "now": adapt(now),
        "period": period,
        "end_text": end.isoformat(),
    }
    sql = _rollup_sql(vendor) if vendor == "postgresql" else _sqlite_rollup_sql()
    result = RollupResult(period=period, period_start=start)
    with connection.cursor() as cursor:
        if vendor == "postgresql":
            # One rollup of a period at a time (two beats, a backfill, a run overlapping the
            # next). Each replaces the period's rows: its DELETE takes them in the table's order,
            # its upsert in the query's. A run whose DELETE waited for another, which then
            # committed, found nothing to delete and upserted that run's rows while a third
            # deleted them: each waited for rows the other held, and PostgreSQL aborted one
            # ("deadlock detected"). SQLite serialises writers.
            cursor.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", [f"rollup:{period}:{start.isoformat()}"]
            )
        # Replace, not merge: a metric that no longer has a value (tasks deleted, no p95) goes.
        AgentMetric.objects.filter(period=period, period_start=start).delete()
        cursor.execute(sql, params)
        cursor.execute(AGENTS_REFRESH_SQL)
        result.agents_refreshed = cursor.rowcount
        cursor.execute(WORKFLOWS_RECONCILE_SQL.format(**_RECONCILE_VERSION[vendor]), params)
        result.workflows_reconciled = cursor.rowcount
    result.metrics = AgentMetric.objects.filter(period=period, period_start=start).count()
    # Period by period, as each is committed: a run that fails part way (the database away, its
    # time limit) has rolled up the periods before, which the next run, finding their metrics,
    # does not roll up again; written after the run, their points never reached InfluxDB.
    transaction.on_commit(lambda: rollup_points_write(period=period, period_start=start))
    if result.workflows_reconciled:
        logger.warning(
            "%d workflow(s) finished %s..%s had token/cost totals different from the sum of their tasks; corrected",
            result.workflows_reconciled,
            start.isoformat(),
            end.isoformat(),
        )
    return result


def periods_missed(*, period: str, before: dt.datetime, now: dt.datetime) -> list[dt.datetime]:
    """The periods before `before`, CATCHUP[period] back or from the last period rolled up if
    that is earlier (and never past the metrics' retention), in which a task finished or an
    attempt ended but that have no metrics: never rolled up. A period with nothing in it has
    nothing to roll up."""
    since = before - CATCHUP[period]
    # The beat, or the worker of its queue, away for longer than CATCHUP: the periods between
    # the last one rolled up and CATCHUP back were never rolled up, and would never be.
    # Read down the metrics' age index (Coalesce: its expression), the newest first.
    newest = (
        AgentMetric.objects.annotate(age=Coalesce("period_start", "recorded_at"))
        .filter(period=period, age__lt=before)
        .order_by("-age")
        .values_list("age", flat=True)
        .first()
    )
    if newest is not None:
        since = min(since, newest)
    if settings.RETENTION_DAYS_AGENT_METRICS > 0:
        # The first period retention keeps (it deletes those that start before its cutoff):
        # one that starts earlier would be written again after every retention run.
        cutoff = now - dt.timedelta(days=settings.RETENTION_DAYS_AGENT_METRICS)
        kept = period_floor(cutoff, period)
        since = max(since, kept if kept >= cutoff else kept + PERIODS[period])
    if since >= before:
        return []

    def starts(model: type, column: str, **conditions: object) -> set[dt.datetime]:
        rows = model.objects.filter(**{f"{column}__gte": since, f"{column}__lt": before}, **conditions)
        rows = rows.annotate(start=Trunc(column, period, tzinfo=dt.UTC)).order_by()
        return set(rows.values_list("start", flat=True).distinct())

    # Tasks finished, per period and agent.
    finished = {
        (start, agent_id): n
        for start, agent_id, n in TaskExecution.objects.filter(
            completed_at__gte=since, completed_at__lt=before, status__in=FINISHED
        )
        .annotate(start=Trunc("completed_at", period, tzinfo=dt.UTC))
        .values_list("start", "agent_id")
        .annotate(n=Count("*"))
        .order_by()
    }
    active = {start for start, _ in finished} | starts(TaskAttempt, "finished_at")
    rolled = AgentMetric.objects.filter(period=period, period_start__gte=since, period_start__lt=before)
    missed = active - set(rolled.order_by().values_list("period_start", flat=True).distinct())
    return sorted(missed | _grown(period=period, since=since, before=before, finished=finished))


def _grown(
    *, period: str, since: dt.datetime, before: dt.datetime, finished: dict[tuple[dt.datetime, str], int]
) -> set[dt.datetime]:
    """The periods in [since, before) whose attempts now hold more tokens or cost than their
    metrics say, or with more tasks `finished` in them (per period and agent) than their
    metrics count: an attempt closed without a result (cancelled, lost, timed out) is charged
    the answer that was on its way when it arrives, and the record of a try that ended just
    before the end of a period (stamped then) may be written after its rollup ran (retried
    through a lost connection, or a database away); spent nothing (a python tool), it changed
    no spend. Both only grow; a sum below the metrics is retention's deletion (or a task
    resumed), not rolled up again."""
    ended = (
        TaskAttempt.objects.filter(finished_at__gte=since, finished_at__lt=before)
        .annotate(start=Trunc("finished_at", period, tzinfo=dt.UTC))
        .values("start", "execution__agent_id")
        .annotate(tokens=Sum("tokens_used"), cost=Sum("cost_usd"))
        .order_by()
    )
    recorded = {
        (start, agent_id, metric): value
        for start, agent_id, metric, value in AgentMetric.objects.filter(
            period=period,
            period_start__gte=since,
            period_start__lt=before,
            metric_type__in=("tokens", "cost", "tasks"),
        ).values_list("period_start", "agent_id", "metric_type", "metric_value")
    }
    grown = {start for (start, agent_id), n in finished.items() if n > recorded.get((start, agent_id, "tasks"), 0.0)}
    for row in ended:
        key = (row["start"], row["execution__agent_id"])
        if float(row["tokens"] or 0) > recorded.get((*key, "tokens"), 0.0) or float(
            round(row["cost"] or 0, COST_PLACES)
        ) > recorded.get((*key, "cost"), 0.0):
            grown.add(row["start"])
    return grown


def rollup_previous(*, period: str, now: dt.datetime | None = None) -> RollupResult:
    """Roll up the last complete hour or day (the beat entry point), after the earlier periods
    that were missed (`periods_missed`). The last complete period is the database's, whose clock
    stamps what is rolled up: on a host ahead of it, the hour still being written was rolled up
    short and, having metrics, never again."""
    now = now or database_now()
    last = period_floor(now, period) - PERIODS[period]
    missed = periods_missed(period=period, before=last, now=now)
    for start in missed:
        metrics_rollup(period=period, period_start=start, now=now)
    if missed:
        logger.warning(
            "rolled up %d %s period(s) that were missed: %s", len(missed), period, [m.isoformat() for m in missed]
        )
    result = metrics_rollup(period=period, period_start=last, now=now)
    result.caught_up = missed
    return result
