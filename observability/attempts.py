"""What the engine reports about attempts, in one call per outcome: metrics, the InfluxDB
point, and the log context. Called from orchestration.services.execution.attempt_run
after each transaction has committed; nothing here can fail or roll back the record."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from django.db.models import Exists, OuterRef
from django.utils import timezone

from observability import influx, logs, metrics

FINAL_TASK_STATUSES = ("completed", "failed", "timed_out")


def attempt_started(*, execution_id: str, workflow_id: str | None, agent_id: str, attempt_number: int) -> None:
    """An attempt was claimed: bind the log context and count a retry when it is not the first."""
    with metrics.guarded("log_context"):
        logs.log_context_bind(execution_id=execution_id, workflow_id=workflow_id, attempt=attempt_number)
    metrics.attempt_started_observe(agent_id=agent_id, attempt_number=attempt_number)


def attempt_finished(
    *,
    attempt: Any,
    agent_id: str,
    workflow_id: str | None,
    duration_ms: float,
    finished_at: dt.datetime,
    usage: Any = None,
    error: BaseException | None = None,
    recorded: bool = True,
) -> None:
    """The outcome of attempt_succeed / attempt_fail. `recorded` False means the attempt had
    already been closed by someone else, who reported it (attempts_reaped: the reaper, a
    claim, or the cancellation, whose process kill usually stops the attempt before it gets
    here): nothing more to count. `finished_at`: the end its record holds; the InfluxDB point
    is written at it, so that a charge added to a timed-out attempt later (late_usage_recorded,
    from its row) replaces the point instead of adding a second one."""
    if not recorded:
        return
    with metrics.guarded("attempt_finished"):
        if error is None:
            status, cause, task_status = "succeeded", "success", "completed"
        else:
            timed_out = isinstance(error, SoftTimeLimitExceeded)
            status, cause = ("timed_out", "soft_timeout") if timed_out else ("failed", "error")
            task_status = _final_task_status(attempt.execution_id)
        input_tokens = int(getattr(usage, "input_tokens", 0) or 0)
        output_tokens = int(getattr(usage, "output_tokens", 0) or 0)
        cost = getattr(usage, "cost_usd", None) or Decimal(0)
        metrics.attempt_outcome_observe(
            agent_id=agent_id,
            status=status,
            cause=cause,
            duration_ms=duration_ms,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cost_usd=cost,
            task_status=task_status,
        )
        influx.attempt_point_write(
            agent_id=agent_id,
            status=status,
            cause=cause,
            attempt_id=attempt.pk,
            execution_id=str(attempt.execution_id),
            workflow_id=workflow_id,
            attempt_number=attempt.attempt_number,
            duration_ms=duration_ms,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cost_usd=cost,
            at=finished_at,
        )


def attempts_reaped(*, attempts: Sequence[Any]) -> None:
    """Attempts closed outside attempt_run: by the reaper (timed_out / hard_timeout, lost /
    worker_lost), at a claim (lost on redelivery, timed_out / queue_timeout), or by a
    cancellation (cancelled, while they ran). `attempts` are the rows as their close read them,
    under its lock: their tokens and cost are what the close added to the task and workflow, and
    what is counted here. Their rows may hold more by now (a charge that arrived after the close,
    counted as it was added: late_usage_recorded)."""
    if not attempts:
        return
    from orchestration.models import TaskAttempt

    closed = {attempt.pk: attempt for attempt in attempts}
    with metrics.guarded("attempts_reaped"):
        # Read after the closes committed (the reaper reports after its whole pass): a later
        # attempt may have started, and even ended the task, meanwhile; that ending is its own.
        later = TaskAttempt.objects.filter(
            execution_id=OuterRef("execution_id"), attempt_number__gt=OuterRef("attempt_number")
        )
        rows = (
            TaskAttempt.objects.filter(pk__in=closed)
            .annotate(superseded=Exists(later))
            .values(*_CLOSED_COLUMNS, "execution__status", "superseded")
        )
        for row in rows:
            task_status = row["execution__status"]
            at_close = closed[row["pk"]]  # what it had metered while it ran, before it was abandoned
            metrics.attempt_outcome_observe(
                agent_id=row["execution__agent_id"],
                status=row["status"],
                cause=row["cause"] or row["status"],
                duration_ms=row["duration_ms"],
                input_tokens=at_close.input_tokens,
                output_tokens=at_close.output_tokens,
                cost_usd=at_close.cost_usd,
                task_status=task_status if task_status in FINAL_TASK_STATUSES and not row["superseded"] else None,
            )
            _closed_point_write(row)


# What the point of an attempt closed without a result is written from (attempts_reaped).
_CLOSED_COLUMNS = (
    "pk",
    "execution_id",
    "execution__agent_id",
    "execution__workflow_id",
    "attempt_number",
    "status",
    "cause",
    "duration_ms",
    "finished_at",
    "input_tokens",
    "output_tokens",
    "cost_usd",
)


def _closed_point_write(row: dict[str, Any]) -> None:
    """The InfluxDB point of an attempt closed without a result, from its row. Its tags and time
    depend only on how and when it was closed, so writing it again with the row's later totals
    replaces the point (InfluxDB keeps one per series and timestamp) instead of adding one."""
    influx.attempt_point_write(
        agent_id=row["execution__agent_id"],
        status=row["status"],
        cause=row["cause"] or row["status"],
        attempt_id=row["pk"],
        execution_id=str(row["execution_id"]),
        workflow_id=row["execution__workflow_id"],
        attempt_number=row["attempt_number"],
        duration_ms=row["duration_ms"] or 0.0,
        input_tokens=row["input_tokens"] or 0,
        output_tokens=row["output_tokens"] or 0,
        cost_usd=row["cost_usd"] or 0,
        at=row["finished_at"] or timezone.now(),
    )


def late_usage_recorded(*, attempt_id: int, agent_id: str, usage: Any) -> None:
    """Usage paid after its attempt was closed without a result, now added to its row: the
    close already counted what was metered before it; this counts the rest, and writes the
    attempt's InfluxDB point again with its row's new totals (in place of the close's)."""
    metrics.late_usage_observe(
        agent_id=agent_id,
        input_tokens=int(usage.input_tokens or 0),
        output_tokens=int(usage.output_tokens or 0),
        cost_usd=usage.cost_usd or Decimal(0),
    )
    if not influx.enabled():
        return
    from orchestration.models import TaskAttempt

    with metrics.guarded("late_usage"):
        row = TaskAttempt.objects.filter(pk=attempt_id).values(*_CLOSED_COLUMNS).first()
        if row is not None:
            _closed_point_write(row)


def _final_task_status(execution_id: Any) -> str | None:
    from orchestration.models import TaskExecution

    status = TaskExecution.objects.filter(pk=execution_id).values_list("status", flat=True).first()
    return status if status in FINAL_TASK_STATUSES else None


def queue_wait_seconds(*, published_at: float | None, eta: str | dt.datetime | None, now: float) -> float | None:
    """Seconds a message waited to start: from publication, or from its ETA (a retry countdown
    is backoff, not queueing) when that is later."""
    if published_at is None:
        return None
    runnable = float(published_at)
    if eta:
        when = dt.datetime.fromisoformat(eta) if isinstance(eta, str) else eta
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        runnable = max(runnable, when.timestamp())
    return max(now - runnable, 0.0)
