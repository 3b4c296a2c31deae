"""Exports whose process is told to stop: a terminate signal in a Celery pool process (a
revoke's, a cold shutdown's), ^C on the command line. The run is recorded as the export sweep
records a run whose process is gone, the stop ends the export there, and the next run exports
the window again."""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import sys
from unittest import mock

import pytest
from django.db import connections

from config.celery import app
from orchestration.event_types import EventType
from orchestration.models import Event
from tests.engine import wait_for
from tests.orchestration.test_runtime_edges import _billiard_terminate_handler
from tests.training_export.test_export_sweep import DAY, export_command, seed_events_sql, writing
from tests.training_export.test_tasks import clear_of_midnight
from training_export.models import ExportRun
from training_export.services.export import (
    DATA_TYPES,
    RUN_STOPPED_ERROR,
    export_previous_day,
    export_runs_request,
    export_runs_sweep,
    format_for,
    window_for,
)


def test_an_export_stopped_by_sigterm_in_its_worker_is_recorded_lost_and_the_next_night_exports_the_day(
    worker, tmp_path
):
    """SIGTERM to the pool process exporting (a revoke's terminate, a cold shutdown): billiard's
    handler raised SystemExit in the export, which recorded the run failed with the error
    "SystemExit: -241", where the sweep, had the process died first, said it was lost. One state
    and one wording, whoever records it; and the day is exported by the next daily run."""
    yesterday = clear_of_midnight().astimezone(dt.UTC).date() - dt.timedelta(days=1)
    seed_events_sql(60000, yesterday)
    app.send_task("training_export.export_previous_day")
    directory = tmp_path / "exports" / "events" / f"{yesterday}_{yesterday}"
    wait_for(lambda: writing(directory), timeout=60, interval=0.005, what=f"the export ({worker.log_path})")
    [child] = worker.children()
    os.kill(child, signal.SIGTERM)
    stopped = wait_for(
        lambda: ExportRun.objects.filter(data_type="events").exclude(status=ExportRun.Status.RUNNING).first(),
        timeout=30,
        what=f"the stopped run's record ({worker.log_path})",
    )
    assert (stopped.status, stopped.error) == (ExportRun.Status.FAILED, RUN_STOPPED_ERROR)
    event = Event.objects.get(event_type=EventType.EXPORT_FAILED, entity_id=str(stopped.pk))
    assert event.payload["error"] == RUN_STOPPED_ERROR
    assert ExportRun.objects.count() == 1, "the stop ended the daily export"
    assert export_runs_sweep().lost == []  # recorded already: nothing left for the sweep

    app.send_task("training_export.export_previous_day")  # the next night's
    wait_for(
        lambda: ExportRun.objects.filter(status=ExportRun.Status.SUCCEEDED).count() == len(DATA_TYPES),
        timeout=90,
        what=f"the next daily export ({worker.log_path})",
    )
    again = ExportRun.objects.get(data_type="events", status=ExportRun.Status.SUCCEEDED)
    assert again.rows == 60000 and again.window_start.date() == yesterday


def _stop_in_the_second_commit_of(function: str):
    """A Django `_commit` that raises SIGTERM (billiard's handler then raises SystemExit there) as
    the COMMIT of the second transaction the export service's `function` runs is sent, as the
    stop of a pool process lands in a COMMIT; every other COMMIT as it is."""
    commit = type(connections["default"])._commit
    seen = {"commits": 0}

    def commit_terminated(self):
        frame = sys._getframe(1)
        while frame is not None and frame.f_globals.get("__name__") != "training_export.services.export":
            frame = frame.f_back
        if frame is not None and frame.f_code.co_name == function:
            seen["commits"] += 1
            if seen["commits"] == 2:
                signal.raise_signal(signal.SIGTERM)
        return commit(self)

    return commit_terminated


@pytest.mark.parametrize("landing", ["export_run", "_write"])
def test_a_stop_replaced_in_a_commit_ends_the_daily_catch_up_there_and_the_next_run_exports_the_rest(
    transactional_db, out, landing, caplog
):
    """Several missed days are exported in one run. A terminate signal landing in a COMMIT (the
    one creating the second run, or the end of its read-only snapshot) was replaced by Django's
    atomic() with "can't change 'autocommit' now", which the catch-up took for one day's failure
    and went on: each of the 24 exports left failed at once on the broken connection ("SET
    TRANSACTION ISOLATION LEVEL must be called before any query"), each logged, and only then was
    the first error raised, not as a stop."""
    today = dt.datetime.now(dt.UTC).date()
    last_exported = today - dt.timedelta(days=7)
    for data_type in DATA_TYPES:
        window = window_for(last_exported, last_exported)
        ExportRun.objects.create(
            data_type=data_type,
            format=format_for(data_type),
            window_start=window.start,
            window_end=window.end,
            status=ExportRun.Status.SUCCEEDED,
        )
    wrapper = type(connections["default"])
    with (
        _billiard_terminate_handler(),
        mock.patch.object(wrapper, "_commit", _stop_in_the_second_commit_of(landing)),
        caplog.at_level(logging.ERROR, logger="training_export.services.export"),
        pytest.raises(SystemExit),
    ):
        export_previous_day()
    tried = [r.getMessage() for r in caplog.records if r.getMessage().startswith("the daily export of")]
    assert tried == [], "no day after the stop was tried"
    runs = ExportRun.objects.exclude(window_start__date=last_exported).order_by("pk")
    if landing == "export_run":  # the second run's INSERT never committed
        assert list(runs.values_list("status", flat=True)) == [ExportRun.Status.SUCCEEDED]
    else:  # the second run, left running on the connection the stop broke: the sweep records it
        first, second = runs
        assert (first.status, second.status) == (ExportRun.Status.SUCCEEDED, ExportRun.Status.RUNNING)
        assert export_runs_sweep().lost == [second.pk]
        second.refresh_from_db()
        assert (second.status, second.error) == (ExportRun.Status.FAILED, RUN_STOPPED_ERROR)

    export_previous_day()  # the next night's: every day since the last one exported
    for data_type in DATA_TYPES:
        days = set(
            ExportRun.objects.filter(data_type=data_type, status=ExportRun.Status.SUCCEEDED).values_list(
                "window_start__date", flat=True
            )
        )
        assert days == {last_exported + dt.timedelta(days=n) for n in range(7)}, data_type


def test_an_export_stopped_by_a_cold_shutdown_is_recorded_lost_and_a_new_request_queues_the_window(worker, tmp_path):
    """A warm shutdown (SIGTERM to the worker) waits for the export; a cold one (SIGQUIT) ends the
    pool process under it, whose SystemExit recorded the run failed as "SystemExit: ..."."""
    seed_events_sql(60000)
    [run] = export_runs_request(data_types=["events"], start_date=DAY, end_date=DAY).queued
    directory = tmp_path / "exports" / "events" / f"{DAY}_{DAY}"
    wait_for(lambda: writing(directory), timeout=60, interval=0.005, what=f"the export ({worker.log_path})")
    os.kill(worker.process.pid, signal.SIGTERM)  # warm: the export goes on
    os.kill(worker.process.pid, signal.SIGQUIT)  # cold
    worker.process.wait(timeout=30)
    run.refresh_from_db()
    assert (run.status, run.error) == (ExportRun.Status.FAILED, RUN_STOPPED_ERROR)
    again = export_runs_request(data_types=["events"], start_date=DAY, end_date=DAY)
    assert again.already_exported == [] and [queued.pk for queued in again.queued] != [run.pk]


@pytest.mark.django_db(transaction=True)
def test_an_export_interrupted_on_the_command_line_is_recorded_lost(tmp_path):
    """^C (SIGINT: KeyboardInterrupt) in manage.py export_training_data recorded the run failed
    as "KeyboardInterrupt: "."""
    seed_events_sql(60000)
    out = tmp_path / "exports"
    proc = export_command(out)
    try:
        wait_for(lambda: writing(out / "events" / f"{DAY}_{DAY}"), timeout=60, interval=0.005)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    run = ExportRun.objects.get()
    assert (run.status, run.error) == (ExportRun.Status.FAILED, RUN_STOPPED_ERROR)
