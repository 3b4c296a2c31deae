"""Exports on hosts whose clocks disagree with the database's, which stamps the rows they
export: which window is closed, which day is yesterday, which run is lost. A host's clock is
this process's `timezone.now`, moved as in tests/orchestration/test_clock_skew.py."""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Callable, Iterator

import psycopg
import pytest
from django.core.management import call_command
from django.utils import timezone

from orchestration.db import database_now
from tests.engine import database_url
from training_export.models import ExportRun
from training_export.services.export import (
    EXPORT_LOST_GRACE_SECONDS,
    STAMP_MARGIN,
    WindowNotClosed,
    export_previous_day,
    export_run_execute,
    export_runs_sweep,
    window_check_closed,
    window_for,
)

WINDOW = window_for("2024-03-05", "2024-03-05")


@pytest.fixture
def host_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[dt.timedelta], None]]:
    """Set this process's clock off the real (and the database's) time."""
    real_now = timezone.now

    def set_off(offset: dt.timedelta) -> None:
        monkeypatch.setattr(timezone, "now", lambda: real_now() + offset)

    yield set_off
    monkeypatch.setattr(timezone, "now", real_now)


def test_a_window_still_being_written_is_not_closed_on_a_host_whose_clock_runs_ahead(db, settings, host_clock):
    """Today's window on a host whose clock is already past tomorrow's midnight plus the safety
    lag: it looked closed and was exported while today's rows were still being written (the
    open-transactions check sees only transactions that have begun)."""
    settings.TRAINING_EXPORT_SAFETY_LAG_SECONDS = 0
    today = database_now().astimezone(dt.UTC).date()
    window = window_for(today, today)
    host_clock(window.end + STAMP_MARGIN + dt.timedelta(minutes=5) - database_now())
    with pytest.raises(WindowNotClosed, match="not closed yet"):
        window_check_closed(window)


def test_the_daily_export_exports_the_databases_yesterday_on_a_host_whose_clock_runs_behind(
    db, out, settings, host_clock
):
    """The beat host a day behind (as much as a few minutes behind just past midnight): it took
    the day before yesterday for yesterday, and yesterday waited for the next night."""
    settings.TRAINING_EXPORT_SAFETY_LAG_SECONDS = 0
    yesterday = database_now().astimezone(dt.UTC).date() - dt.timedelta(days=1)
    host_clock(-dt.timedelta(days=1))
    runs = export_previous_day()
    assert runs and {run.window_start.astimezone(dt.UTC).date() for run in runs} == {yesterday}


def test_an_export_started_on_a_host_whose_clock_runs_behind_gets_its_deadline_on_the_databases_clock(
    db, out, host_clock
):
    """The worker two hours behind stamped the run's start and deadline (its hard limit, ten
    minutes, plus the grace) on its clock: to the sweeper, on time, the run was past its
    deadline as it began, and was recorded lost while it exported."""
    run = ExportRun.objects.create(data_type="events", window_start=WINDOW.start, window_end=WINDOW.end)
    host_clock(-dt.timedelta(hours=2))
    run = export_run_execute(run_id=run.pk, time_limit_seconds=600)
    host_clock(dt.timedelta(0))
    assert run.status == ExportRun.Status.SUCCEEDED
    run.refresh_from_db()
    assert abs((database_now() - run.started_at).total_seconds()) < 60
    assert run.deadline_at == run.started_at + dt.timedelta(seconds=600 + EXPORT_LOST_GRACE_SECONDS)
    assert run.finished_at >= run.started_at


def test_the_sweep_on_a_host_whose_clock_runs_ahead_does_not_record_a_live_run_lost(db, host_clock):
    """A run exporting, its process alive (holding its lock), its deadline an hour away on the
    database's clock; the sweeping host, two hours ahead, recorded it lost."""
    run = ExportRun.objects.create(
        data_type="events",
        window_start=WINDOW.start,
        window_end=WINDOW.end,
        status=ExportRun.Status.RUNNING,
        started_at=database_now(),
        deadline_at=database_now() + dt.timedelta(hours=1),
    )
    with psycopg.connect(database_url(), autocommit=True) as alive:
        alive.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", [f"export_run:{run.pk}"])
        host_clock(dt.timedelta(hours=2))
        assert export_runs_sweep().lost == []
    run.refresh_from_db()
    assert run.status == ExportRun.Status.RUNNING


def test_the_command_on_a_host_whose_clock_runs_ahead_does_not_call_its_own_export_an_earlier_one(db, out, host_clock):
    """manage.py took its start on its host's clock and the run's end on the database's: two
    minutes ahead, the export it had just written was printed as one already there ("--force
    exports it again")."""
    host_clock(dt.timedelta(minutes=2))
    stdout = io.StringIO()
    call_command(
        "export_training_data",
        "--type",
        "events",
        "--start",
        "2024-03-05",
        "--end",
        "2024-03-05",
        "--no-progress",
        stdout=stdout,
    )
    assert stdout.getvalue().startswith("events: 0 rows, sha256 ")
    assert "already" not in stdout.getvalue()
