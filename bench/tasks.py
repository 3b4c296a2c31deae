"""Tasks for the benchmark's bare-Celery and django-celery-results runs."""

from celery import shared_task


@shared_task(name="bench.noop", ignore_result=True)
def noop() -> None:
    """Does nothing and records nothing."""


@shared_task(name="bench.noop_recorded", ignore_result=False, track_started=True)
def noop_recorded() -> None:
    """Does nothing; django-celery-results records STARTED and SUCCESS (result_extended)."""
