"""The beat's every-few-seconds tasks (relay, reaper) while PostgreSQL or Redis is away: one
warning line a run, the next run tries again; they failed with a traceback every tick."""

from __future__ import annotations

import datetime as dt
import logging
import socket
import time

import pytest
import redis
from django.db import connection

from orchestration.db import database_now
from orchestration.models import TaskAttempt, TaskExecution
from orchestration.services.execution import attempt_claim
from orchestration.services.reaper import attempts_reap
from orchestration.services.workflows import workflow_submit
from orchestration.tasks import reap_stale_tasks, relay_events
from tests.pg import other_connection

pytestmark = pytest.mark.django_db(transaction=True)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def database_away():
    saved = dict(connection.settings_dict)
    connection.close()
    connection.settings_dict.update(HOST="127.0.0.1", PORT=_closed_port())
    yield
    connection.close()
    connection.settings_dict.update(saved)


def test_the_relay_and_the_reaper_skip_a_run_while_the_database_is_away(database_away, caplog):
    caplog.set_level(logging.WARNING, logger="orchestration.tasks")
    assert relay_events.run() == 0
    assert reap_stale_tasks.run() == {}
    said = [r.getMessage() for r in caplog.records if r.name == "orchestration.tasks"]
    assert [m.split(":")[0] for m in said] == ["relay_events skipped", "reap_stale_tasks skipped"]
    assert all("the database is not answering (connection failed" in m for m in said), said
    assert not any(r.exc_info for r in caplog.records)


def test_the_relay_skips_a_run_while_redis_is_away(settings, caplog):
    settings.REDIS_URL = f"redis://127.0.0.1:{_closed_port()}/0"
    caplog.set_level(logging.WARNING, logger="orchestration.tasks")
    assert relay_events.run() == 0
    said = [r.getMessage() for r in caplog.records if r.name == "orchestration.tasks"]
    assert len(said) == 1 and said[0].startswith("relay_events skipped: Redis is not answering"), said


@pytest.mark.parametrize(
    ("table", "task_path"),
    [("events", "orchestration.tasks.relay_events"), ("agent_metrics", "orchestration.tasks.rollup_metrics")],
)
def test_another_database_error_still_fails_the_run(caplog, table, task_path):
    """A statement cancelled (its timeout, waiting for a lock another session holds) is an
    OperationalError too, but not an unreachable database: the run fails, as before, neither
    skipped nor tried again."""
    from django.db import OperationalError
    from django.utils.module_loading import import_string

    with other_connection() as other, other.transaction():
        other.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        with connection.cursor() as cursor:
            cursor.execute("SET statement_timeout = '200ms'")
        try:
            with pytest.raises(OperationalError, match="statement timeout"):
                import_string(task_path).run()
        finally:
            connection.close()  # its session's timeout with it
    assert not [r for r in caplog.records if r.name == "orchestration.tasks"]


def test_the_daily_retention_and_the_export_sweep_skip_a_run_while_the_database_is_away(database_away, caplog):
    from orchestration.tasks import apply_retention
    from training_export.tasks import sweep_export_runs

    caplog.set_level(logging.WARNING, logger="orchestration.tasks")
    assert apply_retention.run() == {}
    assert sweep_export_runs.run() == {}
    said = [r.getMessage() for r in caplog.records if r.name == "orchestration.tasks"]
    assert [m.split(":")[0] for m in said] == ["apply_retention skipped", "sweep_export_runs skipped"]
    assert not any(r.exc_info for r in caplog.records)


@pytest.mark.parametrize(
    "task_path", ["orchestration.tasks.rollup_metrics", "training_export.tasks.export_previous_day_task"]
)
def test_the_hourly_rollup_and_the_daily_export_are_tried_again_while_the_database_is_away(
    database_away, caplog, task_path
):
    """They would otherwise wait for the next hour or night: each try that finds the database away
    is sent again a minute later (run at once here: Celery runs an eager task's retries in place),
    with one warning line, until AWAY_MAX_RETRIES are spent; then the run fails with its error."""
    from django.db import OperationalError
    from django.utils.module_loading import import_string

    from orchestration.tasks import AWAY_MAX_RETRIES, AWAY_RETRY_COUNTDOWN_SECONDS

    task = import_string(task_path)
    caplog.set_level(logging.WARNING, logger="orchestration.tasks")
    result = task.apply()
    assert result.failed() and isinstance(result.result, OperationalError), result.result
    said = [r.getMessage() for r in caplog.records if r.name == "orchestration.tasks"]
    assert len(said) == AWAY_MAX_RETRIES, said
    assert all(
        m.startswith(f"{task.name} tried again in {AWAY_RETRY_COUNTDOWN_SECONDS} s: the database is not answering")
        for m in said
    ), said[0]


@pytest.mark.parametrize("away", ["refused", "paused"])
def test_the_reaper_leaves_an_attempt_past_its_limit_to_a_pass_that_can_ask_its_worker(
    committed, monkeypatch, caplog, away
):
    """The broker away when the reaper runs (`manage.py reap_stale_tasks` during a Redis outage,
    a beat run caught by a pause): its broadcast to the attempt's worker failed, that was read
    as the worker's silence, and every attempt past its limit was closed lost, "worker ...
    stopped answering", and its task retried, while the worker lived on and could have said
    how the attempt ended (stopped for the lost broker connection, killed at its hard limit).
    Once the broker takes the question, the node's silence counts again."""
    from kombu.exceptions import OperationalError as KombuOperationalError

    from config.celery import app

    workflow, _ = workflow_submit(
        spec={"name": "away", "tasks": [{"name": "a", "agent": "echo", "timeout_seconds": 1, "max_retries": 1}]}
    )
    task = TaskExecution.objects.get(workflow=workflow)
    claim = attempt_claim(execution_id=task.pk, celery_task_id=task.celery_task_id, worker="w@alive")
    past = database_now() + dt.timedelta(minutes=1)  # past its hard limit and the grace

    def broker_away(*args: object, **kwargs: object) -> None:
        if away == "refused":
            raise KombuOperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        raise redis.TimeoutError("Timeout reading from 127.0.0.1:6379")  # a Redis pausing its clients

    with monkeypatch.context() as patched:
        patched.setattr(app.control, "broadcast", broker_away)
        caplog.set_level(logging.WARNING)
        result = attempts_reap(now=past)
    assert (result.lost, result.timed_out) == ([], [])
    attempt = TaskAttempt.objects.get(pk=claim.attempt.pk)
    assert attempt.status == TaskAttempt.Status.RUNNING
    said = [r.getMessage() for r in caplog.records]
    assert any("1 attempt(s) past their limit left to the next pass" in m for m in said), said
    assert not any(r.exc_info for r in caplog.records)

    result = attempts_reap(now=past)  # the broker back, the node silent: lost
    assert result.lost == [attempt.pk]
    attempt.refresh_from_db()
    assert (attempt.status, attempt.cause) == (TaskAttempt.Status.LOST, TaskAttempt.Cause.WORKER_LOST)
    assert "worker w@alive stopped answering" in attempt.error


def _unreachable() -> None:
    import psycopg
    from django.db import OperationalError

    try:
        raise psycopg.OperationalError("connection failed: Connection refused")
    except psycopg.OperationalError as cause:
        raise OperationalError("connection failed: Connection refused") from cause


@pytest.mark.parametrize("minutes_away", [0, 5, 13])
def test_the_tries_while_the_database_is_away_do_not_spend_the_export_s_window_retries(minutes_away):
    """The daily export retries a window still held open by a long transaction max_retries
    times, then records its exports failed (`final_try`). The tries made while the database was
    away counted among them: five minutes of outage took five of the twelve, and after twelve the
    first try that found the window open gave the night up at once."""
    from unittest import mock

    from training_export import tasks as export_tasks
    from training_export.services.export import WindowNotClosed

    task = export_tasks.export_previous_day_task
    final_tries: list[bool] = []

    def export_previous_day(*, time_limit_seconds: int, final_try: bool) -> list:
        final_tries.append(final_try)
        if len(final_tries) <= minutes_away:
            _unreachable()
        raise WindowNotClosed("a transaction holds the window open")

    with mock.patch.object(export_tasks, "export_previous_day", side_effect=export_previous_day):
        result = task.apply()
    assert isinstance(result.result, WindowNotClosed), result.result
    assert final_tries[minutes_away:] == [False] * task.max_retries + [True]


def test_the_rollup_tried_again_keeps_its_arguments(monkeypatch):
    from orchestration.services import rollup
    from orchestration.tasks import AWAY_MAX_RETRIES, rollup_metrics

    periods = []

    def rollup_previous(*, period: str) -> None:
        periods.append(period)
        _unreachable()

    monkeypatch.setattr(rollup, "rollup_previous", rollup_previous)
    assert rollup_metrics.apply(args=("day",)).failed()
    assert periods == ["day"] * (AWAY_MAX_RETRIES + 1)


def test_the_periods_a_rollup_caught_up_before_the_database_went_away_reach_influxdb(settings, monkeypatch):
    """The hourly run catches up two hours that were never rolled up, then the last one. The
    database goes away after the first is committed: the run is tried again, finds only the
    second one missed (the first has its metrics), and InfluxDB got the points of the periods
    of the try that finished only. The first hour's points were never written, for good."""
    from observability import influx
    from orchestration.services import rollup
    from orchestration.services.rollup import period_floor
    from orchestration.tasks import rollup_metrics
    from tests.engine import wait_for
    from tests.factories import AgentFactory, TaskAttemptFactory, TaskExecutionFactory
    from tests.fakes.servers import InfluxDBServer

    token = "influx-test-token-0123456789"
    last = period_floor(database_now(), "hour") - dt.timedelta(hours=1)
    hours = [last - dt.timedelta(hours=2), last - dt.timedelta(hours=1), last]
    agent = AgentFactory()
    for hour in hours:
        task = TaskExecutionFactory(
            agent=agent, status="completed", started_at=hour, completed_at=hour + dt.timedelta(minutes=1)
        )
        TaskAttemptFactory(execution=task, succeeded=True, started_at=hour + dt.timedelta(seconds=30))

    real_rollup, saved, calls = rollup.metrics_rollup, dict(connection.settings_dict), []

    def away_after_the_first_period(**kwargs):
        calls.append(kwargs["period_start"])
        if len(calls) != 2:
            return real_rollup(**kwargs)
        connection.close()  # PostgreSQL restarts between the first missed hour and the second
        connection.settings_dict.update(HOST="127.0.0.1", PORT=_closed_port())
        try:
            return real_rollup(**kwargs)
        finally:
            connection.settings_dict.update(saved)  # back for the try a minute later

    monkeypatch.setattr(rollup, "metrics_rollup", away_after_the_first_period)
    with InfluxDBServer(token=token) as server:
        settings.INFLUXDB_URL, settings.INFLUXDB_TOKEN = server.url, token
        settings.INFLUXDB_ORG, settings.INFLUXDB_BUCKET = "agentledger", "tasks"
        settings.INFLUXDB_FLUSH_INTERVAL_MS = 50
        try:
            assert rollup_metrics.apply(kwargs={"period": "hour"}).successful()
            assert calls == [hours[0], hours[1], hours[1], hours[2]]  # the try again rolled up what was left
            wait_for(lambda: len(server.points) >= 2, timeout=10, what="the rollup's points")
            time.sleep(0.3)  # and any later batch
        finally:
            influx.writer_close()
    written = sorted({point.timestamp for point in server.points if point.measurement == "agent_rollup"})
    assert written == [int(hour.timestamp()) for hour in hours], "a rolled-up hour never reached InfluxDB"
