"""Celery tasks: each takes ids and JSON-safe values and calls one service."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import redis
from celery import Task, shared_task
from celery.app.task import X_DEATH_HEADERS
from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError, connections

from orchestration.db import database_unreachable, sent_again_read, sent_again_record, stop_if_interrupted
from orchestration.services.execution import attempt_run
from orchestration.workers import DatabaseErrorMet, NoAttemptStarted, current_process

logger = logging.getLogger(__name__)


# An hourly or daily run that met PostgreSQL or Redis away is tried again this much later (it
# would otherwise wait for the next hour or night), at most this many times before it fails.
AWAY_RETRY_COUNTDOWN_SECONDS = 60
AWAY_MAX_RETRIES = 30


def _away(exc: BaseException) -> str | None:
    """What is away, if `exc` says PostgreSQL or Redis is not answering (down, restarting,
    failing over); None for any other error (a fault of the statement or of the code).

    A database error that replaced a terminate signal's SystemExit (Django's atomic() on the
    busy connection of an interrupted COMMIT) is raised again as that SystemExit: the beat's
    tasks run in the pool processes too, where a revoke's SIGTERM reaches whatever runs when it
    arrives. Raised as the run's failure, it left the process running with billiard's handler
    flag set, and the next attempt's agent error there was taken for a stop."""
    stop_if_interrupted(exc)
    if isinstance(exc, DatabaseError):
        if not database_unreachable(exc):
            return None
        connections.close_all()
        return f"the database is not answering ({str(exc).strip().splitlines()[0]})"
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        return f"Redis is not answering ({exc})"
    return None


@contextlib.contextmanager
def skipped_while_away(task: str) -> Iterator[None]:
    """For the beat's frequent tasks (relay and reaper every few seconds, the export sweep every
    minute) and the daily retention, whose next run does the same work: while PostgreSQL or
    Redis is away (restarting, failing over), a run ends with one warning line and the next one
    tries again, instead of a failure and its traceback every few seconds burying whatever else
    the log says (`/readyz` and the relay-lag gauges say the outage). Any other error fails the
    run as before."""
    try:
        yield
    except (DatabaseError, redis.ConnectionError, redis.TimeoutError) as exc:
        what = _away(exc)
        if what is None:
            raise
        logger.warning("%s skipped: %s", task, what)


@contextlib.contextmanager
def retried_while_away(task: Task, away_tries: int) -> Iterator[None]:
    """For the hourly rollup and the daily export, which would otherwise wait an hour or a
    night: while PostgreSQL or Redis is away, the run is sent again AWAY_RETRY_COUNTDOWN_SECONDS
    later, with one warning line; once AWAY_MAX_RETRIES are spent it fails, with its error. A
    retry that cannot be sent (the broker away: the same Redis, as deployed) makes Celery reject
    the message (acks_late is off: the run is dropped; the next hour or night catches up). Any
    other error fails the run as before.

    `away_tries` is the task's own keyword argument of that name (0 when the beat sends it):
    these tries are counted apart from the task's other retries (the export's for a window
    still open), which they neither spend nor are spent by."""
    try:
        yield
    except (DatabaseError, redis.ConnectionError, redis.TimeoutError) as exc:
        what = _away(exc)
        if what is None or away_tries >= AWAY_MAX_RETRIES:
            raise
        logger.warning("%s tried again in %d s: %s", task.name, AWAY_RETRY_COUNTDOWN_SECONDS, what)
        raise task.retry(
            args=task.request.args or (),
            kwargs={**(task.request.kwargs or {}), "away_tries": away_tries + 1},
            exc=exc,
            countdown=AWAY_RETRY_COUNTDOWN_SECONDS,
            max_retries=task.request.retries + 1,  # the count above decides
        ) from exc


# The header of a message run_task sends again: what ended the attempt its delivery leaves
# running (db.sent_again_record), with the `retries` of the message it is on. A header, not a
# keyword argument: a worker of an earlier release, during a rolling deploy, runs the message
# all the same (its run_task takes no such argument), and records the attempt by its own rules.
SENT_AGAIN_HEADER = "agentledger_sent_again"

_unknown_arguments_logged: set[str] = set()


def _unknown_arguments(names: list[str]) -> None:
    """Log, once in this process for each name, keyword arguments run_task does not know: sent
    by a later release (a rolling deploy, or one rolled back), and ignored."""
    new = [name for name in names if name not in _unknown_arguments_logged]
    if new:
        _unknown_arguments_logged.update(new)
        logger.warning("run_task ignores keyword arguments it does not know (a later release's?): %s", ", ".join(new))


def _sent_again(request: Any, database_error: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the message says ended the attempt an earlier delivery of it left running: its header,
    when this release's run_task sent it again; the keyword argument of the release before (a
    database error), for messages it queued. A header that a worker of an earlier release
    carried on unchanged in its own retry (Celery keeps a message's headers) is another
    delivery's: its `retries` is not this message's."""
    header = (request.headers or {}).get(SENT_AGAIN_HEADER)
    if isinstance(header, dict) and type(header.get("retries")) is int and header["retries"] == request.retries:
        record = sent_again_read(header)
        if record is None:
            logger.warning(
                "run_task %s: its %s header is not readable (not as this release writes it), read as an earlier "
                "release's retry: %.300r",
                request.id,
                SENT_AGAIN_HEADER,
                header,
            )
        return record
    if database_error is not None:
        return sent_again_read(database_error)
    return None


@shared_task(
    name="orchestration.run_task",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=30,
    # In the worker's main process: remembers a hard time-out or a lost pool process for the reaper.
    Request="orchestration.workers:RunTaskRequest",
)
def run_task(self, execution_id: str, database_error: dict[str, Any] | None = None, **unknown: Any) -> str:
    """Run one attempt of a task execution (the message's id identifies the attempt).

    If the database connection is lost, the message is sent again (same id) and this delivery
    ends. Nothing of it was recorded, except a claim that committed: the retried delivery then
    closes that attempt as lost (connection_lost) and starts the next one. So too when the
    database answered a write with an error (a lock or statement timeout, a deadlock that
    outlasted atomic_with_retry, a full disk), cause database_error with that error. The message
    sent again says which in its SENT_AGAIN_HEADER (`database_error`: the keyword argument
    that said it before, read for the messages that release queued). Keyword arguments of a
    later release are ignored (logged once)."""
    if unknown:
        _unknown_arguments(sorted(unknown))
    delivery = self.request.delivery_info or {}
    sent_again = _sent_again(self.request, database_error)
    claimed: list[int] = []
    try:
        return attempt_run(
            execution_id=execution_id,
            celery_task_id=self.request.id,
            worker=self.request.hostname or "",
            redelivered=bool(delivery.get("redelivered")),
            retried=self.request.retries > 0,
            sent_again=sent_again,
            process=current_process(),
            claimed=claimed.append,
        ).value
    except (InterfaceError, OperationalError) as exc:
        connections.close_all()
        cap = settings.TASK_CONNECTION_RETRY_MAX_COUNTDOWN_SECONDS  # the visibility timeout covers it
        record = sent_again_record(exc, attempt_number=claimed[-1] if claimed else None, carried=sent_again)
        if record is sent_again:
            logger.warning(
                "run_task %s: this delivery started no attempt (%s: %s); its message is sent again "
                "with what ended attempt %s (%s)",
                self.request.id,
                type(exc).__name__,
                exc,
                record["attempt_number"],
                record["cause"],
            )
        if not claimed:
            # No attempt of this delivery's is left running: the worker's main process keeps
            # what it remembers of the one that is, if it ran here (RunTaskRequest.on_retry).
            met: Exception = NoAttemptStarted(f"{type(exc).__name__}: {exc}")
        elif record["cause"] == "database_error":
            met = DatabaseErrorMet(record["error_class"], record["error"])  # the main process remembers it
        else:
            met = exc
        # The message's own headers go on, as Celery's retry keeps them, but not RabbitMQ's
        # dead-letter ones, which Celery's retry drops (else a dead-letter cycle to RabbitMQ).
        headers = {k: v for k, v in (self.request.headers or {}).items() if k not in X_DEATH_HEADERS}
        raise self.retry(
            args=[execution_id],
            kwargs=unknown,
            headers={**headers, SENT_AGAIN_HEADER: {**record, "retries": self.request.retries + 1}},
            exc=met,
            countdown=min(2 ** min(self.request.retries, 5), cap),
        ) from exc


@shared_task(name="orchestration.reap_stale_tasks", acks_late=False, ignore_result=True)
def reap_stale_tasks() -> dict[str, int]:
    """Close abandoned attempts, fail workflows past their deadline, time out tasks no worker
    took from the queue, re-send lost messages."""
    from orchestration.services.reaper import attempts_reap_reported, queued_sweep

    with skipped_while_away("reap_stale_tasks"):
        result = attempts_reap_reported()
        resent = queued_sweep()
        return {
            "timed_out": len(result.timed_out),
            "lost": len(result.lost),
            "workflows_failed": len(result.workflows_failed),
            "queue_timed_out": len(result.queue_timed_out),
            "resent": len(resent),
        }
    return {}


@shared_task(name="orchestration.relay_events", acks_late=False, ignore_result=True)
def relay_events() -> int:
    """Publish committed events to the Synapse stream, in order. Without Redis (the embedded
    first-run mode) there is no stream: events stay in the table, the source of truth."""
    from django.conf import settings

    from orchestration.services.relay import events_relay

    if not settings.REDIS_URL:
        return 0
    with skipped_while_away("relay_events"):
        return events_relay().published
    return 0


@shared_task(name="orchestration.rollup_metrics", bind=True, acks_late=False, ignore_result=True, time_limit=1800)
def rollup_metrics(self, period: str = "hour", period_start: str | None = None, away_tries: int = 0) -> dict[str, int]:
    """Roll up the last complete hour or day, or the one starting at `period_start` (ISO 8601,
    for backfills), into agent_metrics (and agents, workflow totals; InfluxDB as each period is
    committed). `away_tries`: see retried_while_away."""
    import datetime as dt

    from orchestration.services.rollup import metrics_rollup, rollup_previous

    with retried_while_away(self, away_tries):
        if period_start is None:
            result = rollup_previous(period=period)
        else:
            result = metrics_rollup(period=period, period_start=dt.datetime.fromisoformat(period_start))
    return {
        "metrics": result.metrics,
        "agents_refreshed": result.agents_refreshed,
        "workflows_reconciled": result.workflows_reconciled,
    }


@shared_task(name="orchestration.apply_retention", acks_late=False, ignore_result=True, time_limit=3600)
def apply_retention() -> dict[str, int]:
    """Delete rows older than each table's RETENTION_DAYS_* setting (a run that meets the
    database away is skipped: the next night's deletes the same rows)."""
    from orchestration.services.retention import retention_apply

    with skipped_while_away("apply_retention"):
        return retention_apply().deleted
    return {}
