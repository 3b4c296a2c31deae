"""Celery tasks of the training-data pipeline: each takes JSON-safe values and calls one service."""

from __future__ import annotations

from celery import shared_task

from orchestration.tasks import retried_while_away, skipped_while_away
from training_export.services.export import (
    EXPORT_RETRY_COUNTDOWN_SECONDS,
    EXPORT_TIME_LIMIT_SECONDS,
    WindowNotClosed,
    export_previous_day,
    export_run_execute,
    export_runs_sweep,
)

# A long export is not redelivered on a worker crash (acks_late off, as the broker's
# visibility timeout is shorter than the limit): export_runs_sweep (beat) records such a run
# lost, and queues again a pending run whose message was lost.


@shared_task(
    name="training_export.export_previous_day",
    bind=True,
    acks_late=False,
    ignore_result=True,
    time_limit=EXPORT_TIME_LIMIT_SECONDS,
    max_retries=12,
)
def export_previous_day_task(self, away_tries: int = 0) -> list[int]:
    """Export every data type for the previous UTC day and the days missed before it (the
    daily beat entry). A window still held open by a long transaction is retried later; after
    the last retry its exports are recorded failed, and the next night exports the day. A run
    that meets PostgreSQL or Redis away is tried again a minute later (`retried_while_away`):
    those tries, `away_tries` of the retries, do not count among the window's."""
    window_retries = self.request.retries - away_tries
    try:
        with retried_while_away(self, away_tries):
            runs = export_previous_day(
                time_limit_seconds=EXPORT_TIME_LIMIT_SECONDS, final_try=window_retries >= self.max_retries
            )
        return [run.pk for run in runs]
    except WindowNotClosed as exc:
        raise self.retry(
            exc=exc, countdown=EXPORT_RETRY_COUNTDOWN_SECONDS, max_retries=self.max_retries + away_tries
        ) from exc


@shared_task(
    name="training_export.export_run",
    bind=True,
    acks_late=False,
    ignore_result=True,
    soft_time_limit=EXPORT_TIME_LIMIT_SECONDS - 60,
    time_limit=EXPORT_TIME_LIMIT_SECONDS,
    max_retries=12,
)
def export_run_task(self, run_id: int) -> int:
    """Run the export of one pending export_runs row (queued by the API). A window held open
    by a long transaction is retried later; after the last retry the row is recorded failed."""
    try:
        return export_run_execute(
            run_id=run_id,
            final_try=self.request.retries >= self.max_retries,
            time_limit_seconds=EXPORT_TIME_LIMIT_SECONDS,
        ).pk
    except WindowNotClosed as exc:
        raise self.retry(exc=exc, countdown=EXPORT_RETRY_COUNTDOWN_SECONDS) from exc


@shared_task(name="training_export.sweep_export_runs", acks_late=False, ignore_result=True, time_limit=300)
def sweep_export_runs() -> dict[str, int]:
    """Queue again pending exports whose message was lost; record running ones past their limit
    lost (skipped, with one warning line, while PostgreSQL or Redis is away)."""
    with skipped_while_away("sweep_export_runs"):
        result = export_runs_sweep()
        return {"requeued": len(result.requeued), "lost": len(result.lost)}
    return {}
