"""The export-run sweeper: export tasks are acknowledged when they start, so a crash can leave
a row pending with no message, or running with no worker. The sweeper queues the first again
(a real worker then exports it) and records the second lost, with its export_failed event."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from django.conf import settings
from django.db import connection
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from config.celery import app
from orchestration.event_types import EventType
from orchestration.models import Event
from tests.engine import ROOT, database_url, wait_for
from tests.factories import EventFactory
from training_export.models import ExportRun
from training_export.services.export import (
    EXPORT_LOST_GRACE_SECONDS,
    EXPORT_RETRY_COUNTDOWN_SECONDS,
    EXPORT_TIME_LIMIT_SECONDS,
    RUN_STOPPED_ERROR,
    WindowNotClosed,
    export_run_execute,
    export_runs_request,
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


@pytest.fixture
def session():
    """Another database session: the process of a run that is alive holds its lock in it."""
    with psycopg.connect(database_url(), autocommit=True) as conn:
        yield conn


def test_a_running_run_past_its_deadline_is_recorded_lost_once(db, session):
    started = timezone.now() - dt.timedelta(seconds=EXPORT_TIME_LIMIT_SECONDS + EXPORT_LOST_GRACE_SECONDS + 60)
    killed = run_row(status=ExportRun.Status.RUNNING, started_at=started, deadline_at=timezone.now())
    healthy = run_row(
        status=ExportRun.Status.RUNNING,
        started_at=timezone.now() - dt.timedelta(hours=1),
        deadline_at=timezone.now() + dt.timedelta(hours=5),
    )
    # A long backfill from manage.py has no time limit, so no deadline: swept only once its
    # process is gone.
    backfill = run_row(status=ExportRun.Status.RUNNING, started_at=started - dt.timedelta(days=1))
    finished = run_row(status=ExportRun.Status.FAILED, started_at=started, error="disk full")

    # The processes exporting `healthy` and `backfill`, alive: their sessions hold the runs' locks.
    for run in (healthy, backfill):
        session.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", [f"export_run:{run.pk}"])
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
    assert periodic.interval.every == 300 and periodic.queue == "system"
    assert json.loads(periodic.kwargs) == {}


def seed_events_sql(count: int, day: dt.date = WINDOW.first_day) -> None:
    """`count` events of 200 characters each from 01:00 of `day`, one a millisecond, in one statement."""
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO events (event_id, event_type, entity_type, entity_id, source, payload, severity, "
            "created_at) SELECT 'ev-' || i, 'agent_started', 'agent', 'a', 'platform', "
            "jsonb_build_object('i', i, 'text', repeat('x', 200)), 'info', %s + i * interval '1 millisecond' "
            "FROM generate_series(1, %s) AS i",
            [dt.datetime.combine(day, dt.time(1), tzinfo=dt.UTC), count],
        )


def export_command(out: Path) -> subprocess.Popen:
    """`manage.py export_training_data` of DAY's events into `out`, started in a process of its own."""
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings.test", "DATABASE_URL": database_url()}
    command = [sys.executable, "manage.py", "export_training_data", "--type", "events", "--start", DAY]
    return subprocess.Popen(
        [*command, "--end", DAY, "--output", str(out), "--no-progress"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def writing(directory) -> bool:
    return directory.exists() and any(p.stat().st_size > 0 for p in directory.glob(".tmp-*"))


def test_a_worker_killed_mid_export_is_recorded_lost_at_the_next_sweep_not_hours_later(worker, tmp_path):
    """The OOM killer (or a hard time limit) takes a worker's child mid-export: its session, and
    so the run's lock, is gone at once; the sweeper need not wait for the deadline 6 h later."""
    seed_events_sql(60000)
    [run] = export_runs_request(data_types=["events"], start_date=DAY, end_date=DAY).queued
    directory = tmp_path / "exports" / "events" / f"{DAY}_{DAY}"
    wait_for(lambda: writing(directory), timeout=60, interval=0.005, what=f"the export ({worker.log_path})")
    assert export_runs_sweep().lost == []  # still exporting: left alone
    assert worker.kill_children()
    run.refresh_from_db()
    assert run.status == ExportRun.Status.RUNNING and run.deadline_at > timezone.now() + dt.timedelta(hours=5)

    swept = wait_for(lambda: export_runs_sweep().lost, timeout=10, what="the sweeper to see the session gone")
    assert swept == [run.pk]
    run.refresh_from_db()
    assert (run.status, run.error) == (ExportRun.Status.FAILED, RUN_STOPPED_ERROR)


@pytest.mark.django_db(transaction=True)
def test_a_manage_py_export_stopped_mid_write_is_recorded_lost_by_the_sweeper(tmp_path):
    """A run from manage.py has no deadline; stopped (a container stop sends SIGTERM, the OOM
    killer SIGKILL) it holds its advisory lock no longer, and the sweeper records it lost
    instead of leaving it running for ever (retention never deletes a running row, nor may
    the admin)."""
    seed_events_sql(60000)
    out = tmp_path / "exports"
    proc = export_command(out)
    directory = out / "events" / f"{DAY}_{DAY}"
    try:
        wait_for(lambda: writing(directory), timeout=60, interval=0.005)
        assert export_runs_sweep().lost == []  # still exporting: left alone
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    run = ExportRun.objects.get()
    assert run.status == ExportRun.Status.RUNNING and run.deadline_at is None

    swept = wait_for(lambda: export_runs_sweep().lost, timeout=10, what="the sweeper to see the session gone")
    assert swept == [run.pk]
    run.refresh_from_db()
    assert run.status == ExportRun.Status.FAILED and run.error.startswith("lost:")
    assert Event.objects.get(event_type=EventType.EXPORT_FAILED).entity_id == str(run.pk)
