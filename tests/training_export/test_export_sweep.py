"""The export-run sweeper: export tasks are acknowledged when they start, so a crash can leave
a row pending with no message, or running with no worker. The sweeper queues the first again
(a real worker then exports it) and records the second lost, with its export_failed event."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from django.conf import settings
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from config.celery import app
from orchestration.event_types import EventType
from orchestration.models import Event
from tests.engine import wait_for
from tests.factories import EventFactory
from training_export.models import ExportRun
from training_export.services.export import (
    EXPORT_LOST_GRACE_SECONDS,
    EXPORT_RETRY_COUNTDOWN_SECONDS,
    EXPORT_TIME_LIMIT_SECONDS,
    WindowNotClosed,
    export_run_execute,
    export_runs_sweep,
    window_for,
)

DAY = "2024-03-05"
WINDOW = window_for(DAY, DAY)


def pending_silence() -> dt.timedelta:
    """How long a pending row must show no sign of life before the sweeper queues it again."""
    return dt.timedelta(
        seconds=settings.BROKER_VISIBILITY_TIMEOUT_SECONDS + EXPORT_RETRY_COUNTDOWN_SECONDS + EXPORT_LOST_GRACE_SECONDS
    )


def run_row(**fields) -> ExportRun:
    fields.setdefault("data_type", "events")
    return ExportRun.objects.create(window_start=WINDOW.start, window_end=WINDOW.end, **fields)


def test_a_pending_run_whose_message_was_lost_is_queued_again_and_exported_by_a_worker(worker, tmp_path):
    EventFactory(event_type=EventType.AGENT_STARTED, created_at=WINDOW.start + dt.timedelta(hours=1))
    lost_message = run_row()  # pending, and no message for it in the broker
    assert export_runs_sweep().requeued == []  # recently touched: its message may still be waiting

    later = timezone.now() + pending_silence() + dt.timedelta(seconds=1)
    swept = export_runs_sweep(now=later)
    assert swept.requeued == [lost_message.pk] and swept.lost == []

    wait_for(
        lambda: ExportRun.objects.get(pk=lost_message.pk).finished_at is not None,
        timeout=60,
        what=f"the re-queued export ({worker.log_path})",
    )
    lost_message.refresh_from_db()
    assert lost_message.status == ExportRun.Status.SUCCEEDED and lost_message.rows == 1
    assert ExportRun.objects.count() == 1  # the worker took over the same row
    assert Event.objects.filter(event_type=EventType.EXPORT_COMPLETED, entity_id=str(lost_message.pk)).count() == 1


def test_a_running_run_past_its_deadline_is_recorded_lost_once(db):
    started = timezone.now() - dt.timedelta(seconds=EXPORT_TIME_LIMIT_SECONDS + EXPORT_LOST_GRACE_SECONDS + 60)
    killed = run_row(status=ExportRun.Status.RUNNING, started_at=started, deadline_at=timezone.now())
    healthy = run_row(
        status=ExportRun.Status.RUNNING,
        started_at=timezone.now() - dt.timedelta(hours=1),
        deadline_at=timezone.now() + dt.timedelta(hours=5),
    )
    # A long backfill from manage.py has no time limit, so no deadline: never swept.
    backfill = run_row(status=ExportRun.Status.RUNNING, started_at=started - dt.timedelta(days=1))
    finished = run_row(status=ExportRun.Status.FAILED, started_at=started, error="disk full")

    swept = export_runs_sweep()
    assert swept.lost == [killed.pk] and swept.requeued == []
    killed.refresh_from_db()
    assert killed.status == ExportRun.Status.FAILED and killed.error.startswith("lost:")
    assert killed.finished_at is not None
    for row, status in ((healthy, "running"), (backfill, "running"), (finished, "failed")):
        row.refresh_from_db()
        assert row.status == status
    assert finished.error == "disk full"
    [event] = Event.objects.filter(event_type=EventType.EXPORT_FAILED)
    assert (event.entity_id, event.payload["error"]) == (str(killed.pk), killed.error)

    assert export_runs_sweep().lost == []  # a second sweep records nothing new
    assert Event.objects.filter(event_type=EventType.EXPORT_FAILED).count() == 1


def test_runs_in_workers_get_a_deadline_and_runs_from_manage_py_none(db, settings, tmp_path):
    from training_export.services.export import export_run

    settings.TRAINING_EXPORT_DIR = tmp_path
    EventFactory(event_type=EventType.AGENT_STARTED, created_at=WINDOW.start + dt.timedelta(hours=1))
    limited = export_run(data_type="events", start_date=DAY, end_date=DAY, time_limit_seconds=600)
    assert limited.deadline_at == limited.started_at + dt.timedelta(seconds=600 + EXPORT_LOST_GRACE_SECONDS)
    unlimited = export_run(data_type="tasks", start_date=DAY, end_date=DAY)
    assert unlimited.deadline_at is None
    pending = run_row(data_type="workflows")
    claimed = export_run_execute(run_id=pending.pk, time_limit_seconds=60)
    assert claimed.status == ExportRun.Status.SUCCEEDED
    assert claimed.deadline_at == claimed.started_at + dt.timedelta(seconds=60 + EXPORT_LOST_GRACE_SECONDS)


def test_a_pending_run_waiting_for_its_window_shows_a_sign_of_life(db, settings):
    run = run_row()
    before = ExportRun.objects.filter(pk=run.pk).values_list("updated_at", flat=True).get()
    settings.TRAINING_EXPORT_SAFETY_LAG_SECONDS = 10**9  # the window counts as still open
    with pytest.raises(WindowNotClosed):
        export_run_execute(run_id=run.pk)
    run.refresh_from_db()
    assert run.status == ExportRun.Status.PENDING and run.updated_at > before


def test_the_sweeper_is_scheduled_and_registered(db):
    app.loader.import_default_modules()
    periodic = PeriodicTask.objects.get(name="sweep export runs")
    assert periodic.task == "training_export.sweep_export_runs" and periodic.task in app.tasks
    assert periodic.interval.every == 300 and periodic.queue == "critical"
    assert json.loads(periodic.kwargs) == {}
