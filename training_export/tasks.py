"""Celery tasks of the training-data pipeline: each takes JSON-safe values and calls one service."""

from __future__ import annotations

from celery import shared_task

from training_export.services.export import WindowNotClosed, export_previous_day


@shared_task(
    name="training_export.export_previous_day",
    bind=True,
    acks_late=False,
    ignore_result=True,
    time_limit=6 * 3600,
    max_retries=12,
)
def export_previous_day_task(self) -> list[int]:
    """Export every data type for the previous UTC day (the daily beat entry). A window still
    held open by a long transaction is retried later, not skipped."""
    try:
        return [run.pk for run in export_previous_day()]
    except WindowNotClosed as exc:
        raise self.retry(exc=exc, countdown=600) from exc
