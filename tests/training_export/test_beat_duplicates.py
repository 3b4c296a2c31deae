"""The periodic work when beat misbehaves: two beats sending every entry twice (the daily
export must not export each window twice at once), and a backlog of queued periodic messages
(each pipeline entry expires, so a queue drained late does not run stale copies)."""

from __future__ import annotations

import datetime as dt
import threading

import pytest
from django.db import connection
from django_celery_beat.models import PeriodicTask
from django_celery_beat.schedulers import ModelEntry

from config.celery import app
from training_export.models import ExportRun
from training_export.services import export as export_module
from training_export.services.export import DATA_TYPES, export_previous_day

NIGHT = dt.datetime(2024, 3, 20, 0, 30, tzinfo=dt.UTC)


@pytest.mark.django_db(transaction=True)
def test_a_second_beats_daily_export_does_not_export_the_windows_the_first_is_exporting(out, monkeypatch):
    """Two beats send the daily entry twice; the second copy starts while the first is writing."""
    writing, release = threading.Event(), threading.Event()
    first_thread: list[threading.Thread] = []
    original = export_module._write

    def slow_write(*args, **kwargs):
        if threading.current_thread() in first_thread:
            writing.set()
            release.wait(30)
        return original(*args, **kwargs)

    monkeypatch.setattr(export_module, "_write", slow_write)
    first_runs: list[list[ExportRun]] = []

    def first() -> None:
        try:
            first_runs.append(export_previous_day(now=NIGHT))
        finally:
            connection.close()

    thread = threading.Thread(target=first)
    first_thread.append(thread)
    thread.start()
    try:
        assert writing.wait(30), "the first daily export never started writing"
        second = export_previous_day(now=NIGHT)
    finally:
        release.set()
        thread.join(60)
    assert first_runs and len(first_runs[0]) == len(DATA_TYPES)
    assert second == []
    # One run per type for the night, not two exports of each window racing each other.
    assert ExportRun.objects.count() == len(DATA_TYPES)
    assert set(ExportRun.objects.values_list("status", flat=True)) == {ExportRun.Status.SUCCEEDED}


PIPELINE = {
    "rollup agent metrics hourly": 3600,
    "rollup agent metrics daily": 86400,
    "export training data (previous UTC day)": 86400,
    "retention": 86400,
}


def test_the_pipeline_entries_expire_before_their_next_run(db):
    """A message of a crontab entry waiting on its queue (no worker on `low`, a backlog of user
    tasks) is dropped once the next run is due: the catch-up of each task covers the missed
    period, and a day of hourly rollups does not run 24 times at once afterwards."""
    for name, seconds in PIPELINE.items():
        periodic = PeriodicTask.objects.get(name=name)
        assert periodic.expire_seconds == seconds, name
        assert ModelEntry(periodic, app=app).options["expires"] == seconds, name


def test_the_expiry_migration_keeps_an_operators_edit(db):
    from django.apps import apps as global_apps
    from django.db.migrations.executor import MigrationExecutor

    PeriodicTask.objects.filter(name="retention").update(expire_seconds=None, expires=NIGHT)
    PeriodicTask.objects.filter(name="rollup agent metrics daily").update(expire_seconds=120)
    PeriodicTask.objects.filter(name="rollup agent metrics hourly").update(expire_seconds=None)
    executor = MigrationExecutor(connection)
    migration = executor.loader.get_migration("orchestration", "0031_pipeline_schedules_expire")
    migration.operations[0].code(global_apps, None)
    assert PeriodicTask.objects.get(name="retention").expire_seconds is None
    assert PeriodicTask.objects.get(name="rollup agent metrics daily").expire_seconds == 120
    assert PeriodicTask.objects.get(name="rollup agent metrics hourly").expire_seconds == 3600
