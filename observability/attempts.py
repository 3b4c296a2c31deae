"""What the engine reports about attempts, in one call per outcome: metrics, the InfluxDB
point, and the log context. Called from orchestration.services.execution.attempt_run
after each transaction has committed; nothing here can fail or roll back the record."""

from __future__ import annotations

import datetime as dt
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
    usage: Any = None,
    error: BaseException | None = None,
    recorded: bool = True,
) -> None:
    """The outcome of attempt_succeed / attempt_fail. `recorded` False means the attempt had
    already been closed by someone else, who reported it (attempts_reaped: the reaper, a
    claim, or the cancellation, whose process kill usually stops the attempt before it gets
    here): nothing more to count."""
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
            at=timezone.now(),
        )


def attempts_reaped(*, attempt_ids: list[int]) -> None:
    """Attempts closed outside attempt_run: by the reaper (timed_out / hard_timeout, lost /
    worker_lost), at a claim (lost on redelivery, timed_out / queue_timeout), or by a
    cancellation (cancelled, while they ran)."""
    if not attempt_ids:
        return
    from orchestration.models import TaskAttempt

    with metrics.guarded("attempts_reaped"):
        # Read after the closes committed (the reaper reports after its whole pass): a later
        # attempt may have started, and even ended the task, meanwhile; that ending is its own.
        later = TaskAttempt.objects.filter(
            execution_id=OuterRef("execution_id"), attempt_number__gt=OuterRef("attempt_number")
        )
        rows = (
            TaskAttempt.objects.filter(pk__in=attempt_ids)
            .annotate(superseded=Exists(later))
            .values_list(
                "pk",
                "execution_id",
                "execution__agent_id",
                "execution__workflow_id",
                "execution__status",
                "attempt_number",
                "status",
                "cause",
                "duration_ms",
                "finished_at",
                "input_tokens",
                "output_tokens",
                "cost_usd",
                "superseded",
            )
        )
        for (
            attempt_id,
            execution_id,
            agent_id,
            workflow_id,
            task_status,
            number,
            status,
            cause,
            duration_ms,
            at,
            input_tokens,
            output_tokens,
            cost,
            superseded,
        ) in rows:
            metrics.attempt_outcome_observe(
                agent_id=agent_id,
                status=status,
                cause=cause or status,
                duration_ms=duration_ms,
                input_tokens=input_tokens,  # metered while it ran, before it was abandoned
                output_tokens=output_tokens,
                cost_usd=cost,
                task_status=task_status if task_status in FINAL_TASK_STATUSES and not superseded else None,
            )
            influx.attempt_point_write(
                agent_id=agent_id,
                status=status,
                cause=cause or status,
                attempt_id=attempt_id,
                execution_id=str(execution_id),
                workflow_id=workflow_id,
                attempt_number=number,
                duration_ms=duration_ms or 0.0,
                input_tokens=input_tokens or 0,
                output_tokens=output_tokens or 0,
                cost_usd=cost or 0,
                at=at or timezone.now(),
            )


def late_usage_recorded(*, agent_id: str, usage: Any) -> None:
    """Usage paid after its attempt was closed without a result, now added to its row: the
    close already counted what was metered before it; this counts the rest."""
    metrics.late_usage_observe(
        agent_id=agent_id,
        input_tokens=int(usage.input_tokens or 0),
        output_tokens=int(usage.output_tokens or 0),
        cost_usd=usage.cost_usd or Decimal(0),
    )


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
