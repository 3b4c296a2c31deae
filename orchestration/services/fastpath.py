"""The common case of claiming and completing an attempt, on PostgreSQL, in one statement
each (data-modifying CTEs), so a task costs a handful of round trips instead of a dozen.

Each function does exactly what the general path in execution.py does when nothing is
unusual, and returns None when anything is: a stale or duplicate message, a workflow that
is not running or is past its deadline, a queue timeout, a concurrency-limited agent, a
task outside a workflow. The caller then takes the general path, which handles every case.

insert_rows stores many new rows (a submission's tasks and events) in one statement, and
update_rows writes columns of many existing rows (the tasks a fan-out queues or a cancel ends).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, NotSupportedError, OperationalError, connection, models
from django.db.models.expressions import DatabaseDefault
from django.db.models.fields import NOT_PROVIDED

from orchestration.db import plan_changed, prepared_cursor
from orchestration.ids import new_id
from orchestration.models import Agent, TaskAttempt
from orchestration.workers import WorkerProcess, attempt_fields

AGENT_FIELDS = Agent._meta.concrete_fields
ATTEMPT_FIELDS = TaskAttempt._meta.concrete_fields
AGENT_ATTNAMES = [f.attname for f in AGENT_FIELDS]
ATTEMPT_ATTNAMES = [f.attname for f in ATTEMPT_FIELDS]
AGENT_JSON = tuple(i for i, f in enumerate(AGENT_FIELDS) if f.get_internal_type() == "JSONField")


def _columns(fields: Any, alias: str) -> str:
    return ", ".join(f'{alias}."{f.column}"' for f in fields)


# The claimed task, then every column of the new attempt and of the agent, so that both
# are built as loaded rows (Model.from_db) without another query. Only column names from
# the models' metadata are interpolated. Whitespace is collapsed: psycopg caches the
# conversion of statements up to 4 kB only.
# Its time (`clock`) is the database's, unless the caller gives one: the deadline and the queue
# timeout are checked, and the attempt starts, on the clock every host shares (the worker's may
# be off it), and the attempt's started_at gives that clock to the rest of the attempt.
CLAIM_SQL = f"""
WITH clock AS (
    SELECT COALESCE(%(now)s::timestamptz, statement_timestamp()) AS now
), claimed AS (
    UPDATE task_executions t
       SET status = 'running', started_at = COALESCE(t.started_at, k.now), worker = %(worker)s
      FROM workflows w, agents a, clock k
     WHERE t.execution_id = %(execution_id)s
       AND t.celery_task_id = %(celery_task_id)s
       AND t.status IN ('queued', 'retrying')
       AND w.workflow_id = t.workflow_id
       AND w.status = 'running'
       AND (w.deadline IS NULL OR w.deadline > k.now)
       AND (t.queued_at IS NULL OR t.queued_at + make_interval(secs => %(queue_timeout)s::float8) >= k.now)
       AND a.id = t.agent_id
       AND a.status = 'active'
       AND a.max_concurrency IS NULL
    RETURNING t.execution_id, t.workflow_id, t.agent_id, t.task_name, t.input_data, t.depends_on,
              t.timeout_seconds, w.total_steps - w.completed_steps - w.failed_steps - w.cancelled_steps AS remaining,
              (SELECT COALESCE(MAX(p.attempt_number), 0) + 1 FROM task_attempts p
                WHERE p.execution_id = t.execution_id) AS attempt_number
), attempt AS (
    INSERT INTO task_attempts (
        created_at, updated_at, execution_id, attempt_number, status, error_class, worker, worker_pid,
        worker_started_at, pool_pid, celery_task_id, delivery_count, redelivered, timeout_seconds, input_tokens,
        output_tokens, tokens_used, cost_usd, started_at)
    SELECT now(), k.now, c.execution_id, c.attempt_number, 'running', '', %(worker)s, %(worker_pid)s::integer,
           %(worker_started_at)s::timestamptz, %(pool_pid)s::integer, %(celery_task_id)s,
           %(delivery_count)s, %(redelivered)s, c.timeout_seconds, 0, 0, 0, 0, k.now
      FROM claimed c, clock k
    RETURNING *
), event AS (
    INSERT INTO events (event_id, event_type, entity_type, entity_id, workflow_id, agent_id, source, payload, severity)
    SELECT %(event_id)s, 'task_started', 'task', c.execution_id, c.workflow_id, c.agent_id, 'platform',
           jsonb_build_object('task_name', c.task_name, 'status', 'running', 'attempt', a.attempt_number,
                              'worker', %(worker)s::text, 'redelivered', %(redelivered)s::boolean,
                              'agent_definition_sha256', g.definition_hash),
           'info'
      FROM claimed c JOIN agents g ON g.id = c.agent_id, attempt a
)
SELECT c.workflow_id, c.task_name, c.input_data, c.depends_on,
       {_columns(ATTEMPT_FIELDS, "a")}, {_columns(AGENT_FIELDS, "g")},
       c.remaining > 1 AND NOT EXISTS (
           SELECT 1 FROM task_executions p WHERE p.workflow_id = c.workflow_id AND p.status = 'pending')
  FROM claimed c CROSS JOIN attempt a JOIN agents g ON g.id = c.agent_id
"""  # noqa: S608
CLAIM_SQL = " ".join(CLAIM_SQL.split())

# What a successful attempt sets on its row, and the completion of its task with the
# task_completed event (from the CTE `attempt`, which returns execution_id, attempt_number):
# shared by SUCCEED_SQL and SUCCEED_ALONE_SQL.
ATTEMPT_SUCCEEDED_SET = """
SET status = 'succeeded', finished_at = %(now)s, duration_ms = %(duration_ms)s, updated_at = %(now)s,
           input_tokens = %(input_tokens)s, output_tokens = %(output_tokens)s, tokens_used = %(tokens)s,
           cost_usd = %(cost)s
""".strip()
TASK_COMPLETED_CTES = """
task AS (
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
)
""".strip()

SUCCEED_SQL = f"""
WITH attempt AS (
    UPDATE task_attempts
       {ATTEMPT_SUCCEEDED_SET}
     WHERE id = %(attempt_id)s AND status = 'running'
    RETURNING execution_id, attempt_number
), {TASK_COMPLETED_CTES}, workflow AS (
    UPDATE workflows w
       SET completed_steps = w.completed_steps + 1, current_step = task.task_name,
           total_tokens_used = w.total_tokens_used + %(tokens)s, total_cost_usd = w.total_cost_usd + %(cost)s
      FROM task
     WHERE w.workflow_id = task.workflow_id
    RETURNING w.status, w.total_steps - w.completed_steps - w.failed_steps - w.cancelled_steps AS remaining,
              w.deadline
)
SELECT task.workflow_id, task.task_name, workflow.status, workflow.remaining,
       EXISTS (SELECT 1 FROM task_executions p WHERE p.workflow_id = task.workflow_id AND p.status = 'pending'),
       workflow.deadline
  FROM task LEFT JOIN workflow ON true
"""  # noqa: S608 - only the constants above are interpolated


# Succeed in a statement of its own (autocommit), when the completion cannot need advancing
# the workflow: the attempt row is locked first, then the workflow's counters are updated only
# while, on the current (locked, re-checked) workflow row, another task stays unfinished after
# this one, no task is pending and the workflow's deadline has not passed. Otherwise nothing
# is written and the caller takes the transaction of SUCCEED_SQL (BEGIN and COMMIT are two
# more round trips).
# When the workflow row was updated meanwhile, PostgreSQL re-checks the counters on its new
# version, but the NOT EXISTS (pending) subquery keeps the statement's snapshot: sound because
# a task made pending while another attempt of the workflow runs never waits on that attempt's
# task (submit and resume happen with none running: a workflow that stops at a failure ends
# only once its running tasks have, progress.workflow_on_task_failed; a retry queues its task in
# the transaction that makes it pending, and the dependents it makes pending again wait on that
# task, whose completion starts after that commit), the same fact SUCCEED_SQL's own pending check
# rests on (tests/orchestration/test_resume_races.py).
SUCCEED_ALONE_SQL = f"""
WITH locked AS (
    SELECT a.id, a.execution_id, a.attempt_number FROM task_attempts a
     WHERE a.id = %(attempt_id)s AND a.status = 'running'
       FOR UPDATE
), workflow AS (
    UPDATE workflows w
       SET completed_steps = w.completed_steps + 1, current_step = t.task_name,
           total_tokens_used = w.total_tokens_used + %(tokens)s, total_cost_usd = w.total_cost_usd + %(cost)s
      FROM locked l JOIN task_executions t ON t.execution_id = l.execution_id
     WHERE w.workflow_id = t.workflow_id
       AND w.total_steps - w.completed_steps - w.failed_steps - w.cancelled_steps > 1
       AND (w.deadline IS NULL OR w.deadline >= %(now)s)
       AND NOT EXISTS (SELECT 1 FROM task_executions p WHERE p.workflow_id = w.workflow_id AND p.status = 'pending')
    RETURNING w.workflow_id
), attempt AS (
    UPDATE task_attempts
       {ATTEMPT_SUCCEEDED_SET}
      FROM locked l, workflow
     WHERE task_attempts.id = l.id
    RETURNING task_attempts.execution_id, task_attempts.attempt_number
), {TASK_COMPLETED_CTES}
SELECT (SELECT count(*) FROM locked), (SELECT count(*) FROM task)
"""  # noqa: S608 - only the constants above are interpolated
SUCCEED_ALONE_SQL = " ".join(SUCCEED_ALONE_SQL.split())


@dataclass
class FastClaim:
    workflow_id: str
    task_name: str
    input_data: dict[str, Any]
    depends_on: list[str]
    attempt: TaskAttempt
    agent: Agent
    # At the claim, another task of the workflow was unfinished and none was pending: the
    # completion will likely need no advancing, so succeed_alone is worth trying first.
    standalone: bool


def enabled() -> bool:
    return connection.vendor == "postgresql" and settings.ENGINE_FAST_PATH


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str | bytes) else value


def execute_prepared(sql: str, params: dict[str, Any] | list[Any]) -> list[tuple[Any, ...]]:
    """Run a statement as a server-side prepared statement on Django's connection, inside
    whatever transaction Django has open there (see prepared_cursor). These statements run
    on every attempt; planning them each time would cost more than executing them."""
    # wrap_database_errors (in prepared_cursor): callers see Django's exceptions
    # (atomic_with_retry retries a deadlock, run_task a lost connection), as from the ORM.
    # No pipeline mode: it would send the BEGIN with the statement, but psycopg's pipeline
    # costs more per statement (client and server CPU, and wall time) than the round trip
    # it saves.
    # A statement refused because a migration changed the shape of its rows (a worker running
    # across a deploy) runs again once on a new connection, outside a transaction; inside one,
    # atomic_with_retry runs the whole transaction again.
    for first_try in (True, False):
        try:
            with prepared_cursor(connection) as cursor:
                cursor.execute(sql, params, prepare=True)
                return cursor.fetchall()
        except NotSupportedError as exc:
            if not first_try or connection.in_atomic_block or not plan_changed(exc):
                raise
            connection.close()
    raise AssertionError("unreachable")


PASSED_AS_IS = frozenset(
    {
        "CharField",
        "TextField",
        "IntegerField",
        "BigIntegerField",
        "PositiveIntegerField",
        "SmallIntegerField",
        "FloatField",
        "BooleanField",
        "AutoField",
        "BigAutoField",
    }
)


def _as_is(value: Any) -> Any:
    return value


def _to_json(field: models.Field) -> Callable[[Any], Any] | None:
    """How one field's value goes into the JSON document of insert_rows, or None when this
    field type is not handled here (insert_rows then leaves the rows to bulk_create)."""
    kind = field.target_field.get_internal_type() if field.is_relation else field.get_internal_type()
    if kind in PASSED_AS_IS:
        return _as_is
    if kind == "JSONField":
        return _as_is if field.encoder is None else None
    if kind == "DateTimeField":
        return lambda value: None if value is None else value.isoformat()
    if kind == "DecimalField":
        return lambda value: None if value is None else str(value)
    return None


def insert_rows(objs: Sequence[models.Model]) -> None:
    """Insert new rows of one model in one statement: on PostgreSQL, all rows travel as one
    JSON parameter that json_to_recordset unpacks. bulk_create prepares every field value of
    every row in Python and sends one placeholder per value (58,000 for a workflow of 2,000
    tasks), which costs more than the insert itself. Columns with a database default the
    objects leave to the database (created_at) and auto-increment keys are filled in by the
    database and not read back. Elsewhere (SQLite), for field types not handled here, or for
    explicit auto-increment keys, bulk_create does it."""
    if not objs:
        return
    model = type(objs[0])
    defaulted = {
        f.attname: isinstance(getattr(objs[0], f.attname), DatabaseDefault)
        for f in model._meta.concrete_fields
        if f.db_default is not NOT_PROVIDED
    }
    fields = [
        f
        for f in model._meta.concrete_fields
        if not (f.primary_key and f.get_internal_type() in ("AutoField", "BigAutoField"))
        and not defaulted.get(f.attname)
    ]
    converters = [_to_json(f) for f in fields]
    auto_pk = model._meta.pk.get_internal_type() in ("AutoField", "BigAutoField")
    uniform = all(
        isinstance(getattr(obj, attname), DatabaseDefault) == left
        for attname, left in defaulted.items()
        for obj in objs
    ) and not (auto_pk and any(obj.pk is not None for obj in objs))
    if connection.vendor != "postgresql" or None in converters or not uniform:
        model.objects.bulk_create(objs)
        return
    stamped = [f for f in fields if getattr(f, "auto_now", False) or getattr(f, "auto_now_add", False)]
    columns = [(f.column, f.attname, convert) for f, convert in zip(fields, converters, strict=True)]
    rows = []
    for obj in objs:
        for f in stamped:
            f.pre_save(obj, add=True)
        rows.append({column: convert(getattr(obj, attname)) for column, attname, convert in columns})
    quote = connection.ops.quote_name
    names = ", ".join(quote(f.column) for f in fields)
    record = ", ".join(f"{quote(f.column)} {f.db_type(connection)}" for f in fields)
    # Identifiers and types come from the model's metadata, quoted; the rows are a parameter.
    # Rows are inserted in list order (identity keys, like events.sequence, follow it).
    sql = (
        f"INSERT INTO {quote(model._meta.db_table)} ({names}) "  # noqa: S608
        f"SELECT {names} FROM ROWS FROM (json_to_recordset(%s::json) AS ({record})) "
        f"WITH ORDINALITY AS r({names}, row_number) ORDER BY row_number"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [json.dumps(rows)])
    for obj in objs:
        obj._state.adding = False
        obj._state.db = connection.alias


def update_rows(objs: Sequence[models.Model], fields: Sequence[str]) -> None:
    """Write `fields` of existing rows of one model, as the objects hold them, in one statement:
    on PostgreSQL the values travel as one JSON parameter (as in insert_rows), joined to the
    rows by primary key. bulk_update sends a CASE with one WHEN per row for every field, which
    PostgreSQL walks for each row it updates, and Django builds an expression per value: its
    cost grows with the square of the rows (the 4,999 tasks a fan-out made ready kept their
    parent's completion running for 68 s; cancelling a workflow of 5,000 tasks took 58 s).
    Elsewhere (SQLite), or for field types not handled here, bulk_update does it."""
    if not objs:
        return
    model = type(objs[0])
    written = [model._meta.pk, *(model._meta.get_field(name) for name in fields)]
    converters = [_to_json(f) for f in written]
    if connection.vendor != "postgresql" or None in converters:
        model.objects.bulk_update(objs, fields)
        return
    columns = [(f.column, f.attname, convert) for f, convert in zip(written, converters, strict=True)]
    rows = [{column: convert(getattr(obj, attname)) for column, attname, convert in columns} for obj in objs]
    quote = connection.ops.quote_name
    table, key = quote(model._meta.db_table), quote(model._meta.pk.column)
    record = ", ".join(f"{quote(f.column)} {f.db_type(connection)}" for f in written)
    assignments = ", ".join(f"{quote(f.column)} = r.{quote(f.column)}" for f in written[1:])
    # Identifiers and types come from the model's metadata, quoted; the rows are a parameter.
    sql = (
        f"UPDATE {table} SET {assignments} FROM json_to_recordset(%s::json) AS r({record}) "  # noqa: S608
        f"WHERE {table}.{key} = r.{key}"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [json.dumps(rows)])


def claim(
    *,
    execution_id: str,
    celery_task_id: str,
    worker: str,
    redelivered: bool,
    now: dt.datetime | None,
    process: WorkerProcess | None = None,
) -> FastClaim | None:
    """Claim a queued task's message in one statement (its own transaction), or None. `now`:
    None for the database's clock (see CLAIM_SQL)."""
    if not enabled() or redelivered:
        return None
    rows = execute_prepared(
        CLAIM_SQL,
        {
            "execution_id": execution_id,
            "celery_task_id": celery_task_id,
            "worker": worker,
            "redelivered": redelivered,
            "delivery_count": 1,  # a redelivered message takes the general path (above)
            "now": now,
            "queue_timeout": settings.TASK_QUEUE_TIMEOUT_SECONDS,
            "event_id": new_id(),
            **attempt_fields(process),
        },
    )
    if not rows:
        return None
    row = rows[0]
    attempt_values = row[4 : 4 + len(ATTEMPT_FIELDS)]
    agent_values = list(row[4 + len(ATTEMPT_FIELDS) : -1])
    for i in AGENT_JSON:
        agent_values[i] = _json(agent_values[i])
    return FastClaim(
        workflow_id=row[0],
        task_name=row[1],
        input_data=_json(row[2]),
        depends_on=_json(row[3]),
        attempt=TaskAttempt.from_db(DEFAULT_DB_ALIAS, ATTEMPT_ATTNAMES, attempt_values),
        agent=Agent.from_db(DEFAULT_DB_ALIAS, AGENT_ATTNAMES, agent_values),
        standalone=row[-1],
    )


@dataclass(frozen=True)
class Completion:
    """A successful attempt as SUCCEED_SQL and SUCCEED_ALONE_SQL record it (the same values)."""

    attempt_id: int
    output: dict[str, Any]
    duration_ms: float
    input_tokens: int
    output_tokens: int
    cost: Decimal
    now: dt.datetime

    def params(self) -> dict[str, Any]:
        return {
            "attempt_id": self.attempt_id,
            "output": json.dumps(self.output),
            "duration_ms": self.duration_ms,
            "duration_rounded": round(self.duration_ms, 3),
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "tokens": self.input_tokens + self.output_tokens,
            "cost": self.cost,
            "now": self.now,
            "event_id": new_id(),
        }


def succeed(
    completion: Completion,
) -> tuple[str | None, str, str | None, bool, dt.datetime | None] | None:
    """Record a successful attempt, complete its task and count it on the workflow, in one
    statement of the caller's transaction. The workflow row stays locked until commit.

    Returns None if the attempt was no longer running, else (workflow_id, task_name,
    workflow status, whether the workflow must be advanced, its deadline). Advancing (queueing
    dependents, finishing) is needed only if some task is pending or no task remains unfinished
    (or, the caller checks, the deadline has passed: then the workflow fails); the counters come
    from the locked, current workflow row, and "no task pending" read from the statement's
    snapshot stays true for this task's dependents (see SUCCEED_ALONE_SQL's note)."""
    if connection.vendor != "postgresql":
        return None
    rows = execute_prepared(
        SUCCEED_SQL,
        completion.params(),
    )
    if not rows:
        return None
    workflow_id, task_name, status, remaining, pending, deadline = rows[0]
    return workflow_id, task_name, status, bool(pending) or remaining == 0, deadline


def succeed_alone(completion: Completion) -> bool | None:
    """Record a successful attempt that needs nothing else in its transaction, in one
    statement committed on its own (what SUCCEED_SQL writes, and no more): True when
    recorded, False when the attempt was no longer running (nothing recorded), None when the
    completion may need the workflow advanced (nothing written; the caller uses succeed() in
    its transaction). Only outside any transaction: the statement is the transaction."""
    if not enabled() or not connection.get_autocommit() or connection.in_atomic_block:
        return None
    try:
        rows = execute_prepared(
            SUCCEED_ALONE_SQL,
            completion.params(),
        )
    except OperationalError as exc:
        if getattr(exc.__cause__, "sqlstate", None) in ("40P01", "40001"):
            return None  # a deadlock victim: nothing was kept; the transactional path retries
        raise
    locked, completed = rows[0]
    if not locked:
        return False
    return True if completed else None
