"""The common case of claiming and completing an attempt, on PostgreSQL, in one statement
each (data-modifying CTEs), so a task costs a handful of round trips instead of a dozen.

Each function does exactly what the general path in execution.py does when nothing is
unusual, and returns None when anything is: a stale or duplicate message, a workflow that
is not running or is past its deadline, a queue timeout, a concurrency-limited agent, a
task outside a workflow. The caller then takes the general path, which handles every case.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import psycopg
from django.conf import settings
from django.db import connection

from orchestration.ids import new_id

UNREACHABLE_THRESHOLD = 2**31

CLAIM_SQL = """
WITH claimed AS (
    UPDATE task_executions t
       SET status = 'running', started_at = COALESCE(t.started_at, %(now)s), worker = %(worker)s
      FROM workflows w, agents a
     WHERE t.execution_id = %(execution_id)s
       AND t.celery_task_id = %(celery_task_id)s
       AND t.status IN ('queued', 'retrying')
       AND w.workflow_id = t.workflow_id
       AND w.status = 'running'
       AND (w.deadline IS NULL OR w.deadline > %(now)s)
       AND (t.queued_at IS NULL OR t.queued_at + make_interval(secs => %(queue_timeout)s::float8) >= %(now)s)
       AND a.id = t.agent_id
       AND a.max_concurrency IS NULL
    RETURNING t.execution_id, t.workflow_id, t.agent_id, t.task_name, t.input_data, t.depends_on,
              t.timeout_seconds, a.executor, a.entrypoint, a.config,
              a.provider, a.model, a.url, a.api_key_env, a.system_prompt, a.temperature, a.max_tokens,
              (SELECT COALESCE(MAX(p.attempt_number), 0) + 1 FROM task_attempts p
                WHERE p.execution_id = t.execution_id) AS attempt_number
), attempt AS (
    INSERT INTO task_attempts (
        created_at, updated_at, execution_id, attempt_number, status, error_class, worker, celery_task_id,
        delivery_count, redelivered, timeout_seconds, input_tokens, output_tokens, tokens_used, cost_usd, started_at)
    SELECT now(), %(now)s, c.execution_id, c.attempt_number, 'running', '', %(worker)s, %(celery_task_id)s,
           %(delivery_count)s, %(redelivered)s, c.timeout_seconds, 0, 0, 0, 0, %(now)s
      FROM claimed c
    RETURNING id, attempt_number
), event AS (
    INSERT INTO events (event_id, event_type, entity_type, entity_id, workflow_id, agent_id, source, payload, severity)
    SELECT %(event_id)s, 'task_started', 'task', c.execution_id, c.workflow_id, c.agent_id, 'platform',
           jsonb_build_object('task_name', c.task_name, 'status', 'running', 'attempt', a.attempt_number,
                              'worker', %(worker)s::text, 'redelivered', %(redelivered)s::boolean),
           'info'
      FROM claimed c, attempt a
)
SELECT c.execution_id, c.workflow_id, c.agent_id, c.task_name, c.input_data, c.depends_on, c.timeout_seconds,
       c.executor, c.entrypoint, c.config, a.id, a.attempt_number,
       c.provider, c.model, c.url, c.api_key_env, c.system_prompt, c.temperature, c.max_tokens
  FROM claimed c, attempt a
"""

SUCCEED_SQL = """
WITH attempt AS (
    UPDATE task_attempts
       SET status = 'succeeded', finished_at = %(now)s, duration_ms = %(duration_ms)s, updated_at = %(now)s,
           input_tokens = %(input_tokens)s, output_tokens = %(output_tokens)s, tokens_used = %(tokens)s,
           cost_usd = %(cost)s
     WHERE id = %(attempt_id)s AND status = 'running'
    RETURNING execution_id, attempt_number
), task AS (
    UPDATE task_executions t
       SET status = 'completed', output_data = %(output)s::jsonb, error = NULL, completed_at = %(now)s,
           execution_time_ms = COALESCE(t.execution_time_ms, 0) + %(duration_ms)s,
           input_tokens = t.input_tokens + %(input_tokens)s, output_tokens = t.output_tokens + %(output_tokens)s,
           tokens_used = t.tokens_used + %(tokens)s, cost_usd = t.cost_usd + %(cost)s
      FROM attempt a
     WHERE t.execution_id = a.execution_id
    RETURNING t.execution_id, t.workflow_id, t.agent_id, t.task_name, a.attempt_number
), event AS (
    INSERT INTO events (event_id, event_type, entity_type, entity_id, workflow_id, agent_id, source, payload, severity)
    SELECT %(event_id)s, 'task_completed', 'task', execution_id, workflow_id, agent_id, 'platform',
           jsonb_build_object('task_name', task_name, 'status', 'completed', 'attempt', attempt_number,
                              'duration_ms', %(duration_rounded)s::float8),
           'info'
      FROM task
), workflow AS (
    UPDATE workflows w
       SET completed_steps = w.completed_steps + 1, current_step = task.task_name,
           total_tokens_used = w.total_tokens_used + %(tokens)s, total_cost_usd = w.total_cost_usd + %(cost)s
      FROM task
     WHERE w.workflow_id = task.workflow_id
    RETURNING w.status, w.total_steps - w.completed_steps - w.failed_steps - w.cancelled_steps AS remaining
)
SELECT task.workflow_id, task.task_name, workflow.status, workflow.remaining,
       EXISTS (SELECT 1 FROM task_executions p WHERE p.workflow_id = task.workflow_id AND p.status = 'pending')
  FROM task LEFT JOIN workflow ON true
"""


@dataclass
class FastClaim:
    execution_id: str
    workflow_id: str
    agent_id: str
    task_name: str
    input_data: dict[str, Any]
    depends_on: list[str]
    timeout_seconds: int
    executor: str
    entrypoint: str
    config: dict[str, Any]
    attempt_id: int
    attempt_number: int
    agent_fields: dict[str, Any]
    """The agent's executor settings (provider, model, url, api_key_env, system_prompt, ...)."""


def enabled() -> bool:
    return connection.vendor == "postgresql" and settings.ENGINE_FAST_PATH


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str | bytes) else value


def execute_prepared(sql: str, params: dict[str, Any] | list[Any]) -> list[tuple[Any, ...]]:
    """Run a statement as a server-side prepared statement on Django's connection, inside
    whatever transaction Django has open there. These statements run on every attempt;
    planning them each time would cost more than executing them.

    Django's connection makes client-side cursors (ClientCursor), which interpolate the
    parameters and never prepare, and sets psycopg's prepare_threshold to None, which turns
    off even explicit preparation: this cursor binds on the server, and a threshold no
    statement reaches prepares only what is asked for (ORM queries stay unprepared)."""
    connection.ensure_connection()
    raw = connection.connection
    if raw.prepare_threshold is None:
        raw.prepare_threshold = UNREACHABLE_THRESHOLD
    # In pipeline mode the BEGIN that opens the caller's transaction travels with the
    # statement: one round trip instead of two.
    # wrap_database_errors: callers see Django's exceptions (atomic_with_retry retries a
    # deadlock, run_task a lost connection), as from the ORM.
    with connection.wrap_database_errors, raw.pipeline(), psycopg.Cursor(raw) as cursor:
        cursor.execute(sql, params, prepare=True)
        return cursor.fetchall()


def claim(
    *, execution_id: str, celery_task_id: str, worker: str, redelivered: bool, now: dt.datetime
) -> FastClaim | None:
    """Claim a queued task's message in one statement (its own transaction), or None."""
    if not enabled() or redelivered:
        return None
    rows = execute_prepared(
        CLAIM_SQL,
        {
            "execution_id": execution_id,
            "celery_task_id": celery_task_id,
            "worker": worker,
            "redelivered": redelivered,
            "delivery_count": 2 if redelivered else 1,
            "now": now,
            "queue_timeout": settings.TASK_QUEUE_TIMEOUT_SECONDS,
            "event_id": new_id(),
        },
    )
    if not rows:
        return None
    row = rows[0]
    return FastClaim(
        execution_id=row[0],
        workflow_id=row[1],
        agent_id=row[2],
        task_name=row[3],
        input_data=_json(row[4]),
        depends_on=_json(row[5]),
        timeout_seconds=row[6],
        executor=row[7],
        entrypoint=row[8],
        config=_json(row[9]),
        attempt_id=row[10],
        attempt_number=row[11],
        agent_fields=dict(
            zip(
                ("provider", "model", "url", "api_key_env", "system_prompt", "temperature", "max_tokens"),
                row[12:19],
                strict=True,
            )
        ),
    )


def succeed(
    *,
    attempt_id: int,
    output: dict[str, Any],
    duration_ms: float,
    input_tokens: int,
    output_tokens: int,
    cost: Decimal,
    now: dt.datetime,
) -> tuple[str | None, str, str | None, bool] | None:
    """Record a successful attempt, complete its task and count it on the workflow, in one
    statement of the caller's transaction. The workflow row stays locked until commit.

    Returns None if the attempt was no longer running, else (workflow_id, task_name,
    workflow status, whether the workflow must be advanced). Advancing (queueing dependents,
    finishing) is needed only if some task is pending or no task remains unfinished; the
    counters come from the locked, current workflow row, and "no task pending" read from the
    statement's snapshot stays true (pending tasks are only created at submit and resume)."""
    if connection.vendor != "postgresql":
        return None
    rows = execute_prepared(
        SUCCEED_SQL,
        {
            "attempt_id": attempt_id,
            "output": json.dumps(output),
            "duration_ms": duration_ms,
            "duration_rounded": round(duration_ms, 3),
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "tokens": input_tokens + output_tokens,
            "cost": cost,
            "now": now,
            "event_id": new_id(),
        },
    )
    if not rows:
        return None
    workflow_id, task_name, status, remaining, pending = rows[0]
    return workflow_id, task_name, status, bool(pending) or remaining == 0
