from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from django.db import OperationalError, connection
from django.utils import timezone
from prometheus_client import CONTENT_TYPE_LATEST

from observability import collectors
from observability.collectors import StateCollector, state_collector
from orchestration.models import TaskAttempt, Workflow
from orchestration.services.workflows import workflow_submit
from tests.engine import flush_redis
from tests.factories import (
    AgentFactory,
    EventFactory,
    ExportRunFactory,
    TaskAttemptFactory,
    TaskExecutionFactory,
    WorkflowFactory,
)
from tests.observability.conftest import Samples, parse_samples, value


@pytest.fixture(autouse=True)
def fresh_state(settings) -> Iterator[None]:
    """No caching between scrapes unless a test asks for it, and an empty broker."""
    settings.METRICS_STATE_CACHE_SECONDS = 0
    state_collector._cache.clear()
    flush_redis()
    yield
    state_collector._cache.clear()
    flush_redis()


@pytest.fixture
def stream_name(settings) -> Iterator[str]:
    settings.SYNAPSE_STREAM = f"metrics-test-{uuid.uuid4().hex[:8]}"
    yield settings.SYNAPSE_STREAM
    redis.Redis.from_url(settings.REDIS_URL).delete(settings.SYNAPSE_STREAM, f"{settings.SYNAPSE_STREAM}:dead")


def get_metrics(client) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"] == CONTENT_TYPE_LATEST
    return parse_samples(response.content.decode())


def test_metrics_serves_django_process_and_state_metrics_unauthenticated(client, db, stream_name):
    client.get("/healthz")
    samples = get_metrics(client)
    names = {name for name, _ in samples}
    assert any(name.startswith("django_http_requests_") for name in names)
    for collector in collectors.COLLECTORS:
        assert value(samples, "agentledger_collector_up", collector=collector) == 1, collector
    for status in Workflow.Status.values:
        assert ("agentledger_workflows", frozenset({("status", status)})) in samples


def test_database_queries_are_counted_by_the_backend_wrapper(client, db, stream_name):
    before = value(get_metrics(client), "django_db_execute_total", alias="default", vendor="postgresql")
    WorkflowFactory.create_batch(3)
    list(Workflow.objects.all())
    after = value(get_metrics(client), "django_db_execute_total", alias="default", vendor="postgresql")
    assert after >= before + 4, "three inserts and a select at least"
    samples = get_metrics(client)
    assert value(samples, "django_db_query_duration_seconds_count", alias="default", vendor="postgresql") > 0


def test_workflows_by_status_are_counted_and_cached_between_scrapes(client, db, settings, stream_name):
    WorkflowFactory.create_batch(2, status=Workflow.Status.RUNNING)
    WorkflowFactory(status=Workflow.Status.COMPLETED)
    samples = get_metrics(client)
    assert value(samples, "agentledger_workflows", status="running") == 2
    assert value(samples, "agentledger_workflows", status="completed") == 1
    assert value(samples, "agentledger_workflows", status="failed") == 0

    settings.METRICS_STATE_CACHE_SECONDS = 60
    get_metrics(client)
    WorkflowFactory(status=Workflow.Status.FAILED)
    assert value(get_metrics(client), "agentledger_workflows", status="failed") == 0  # cached
    state_collector._cache.clear()
    assert value(get_metrics(client), "agentledger_workflows", status="failed") == 1


def test_queue_depth_counts_every_priority_sub_queue_and_unacked_messages(client, db, settings, stream_name):
    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    broker.lpush("normal", "m1", "m2", "m3")
    broker.lpush("high", "m4")
    broker.lpush("high\x06\x163", "m5")  # kombu's sub-queue for priority step 3
    broker.lpush("high\x06\x169", "m6")
    broker.hset("unacked", mapping={"tag-1": "m7", "tag-2": "m8"})
    samples = get_metrics(client)
    assert value(samples, "agentledger_queue_depth_messages", queue="normal") == 3
    assert value(samples, "agentledger_queue_depth_messages", queue="high") == 3
    assert value(samples, "agentledger_queue_depth_messages", queue="critical") == 0
    assert ("agentledger_queue_depth_messages", frozenset({("queue", "low")})) in samples
    assert value(samples, "agentledger_broker_unacked_messages") == 2


def test_relay_lag_is_the_events_past_the_streams_last_id(client, db, settings, stream_name):
    events = EventFactory.create_batch(3)
    stream = redis.Redis.from_url(settings.REDIS_URL)
    stream.xadd(stream_name, {"event_id": events[0].event_id}, id=f"{events[0].sequence}-1")
    samples = get_metrics(client)
    assert value(samples, "agentledger_relay_lag_events") == events[-1].sequence - events[0].sequence
    assert value(samples, "agentledger_relay_lag_seconds") >= 0
    stream.xadd(stream_name, {"event_id": events[-1].event_id}, id=f"{events[-1].sequence}-1")
    samples = get_metrics(client)
    assert value(samples, "agentledger_relay_lag_events") == 0
    assert value(samples, "agentledger_relay_lag_seconds") == 0
    assert value(samples, "agentledger_relay_stream_ahead_events") == 0


def test_ages_are_measured_on_the_databases_clock_not_the_web_hosts(client, db, stream_name, monkeypatch):
    """The web host's clock 2 minutes ahead of the database's and the workers': an event just
    committed and an attempt just claimed were reported 120 s old, past AgentLedgerRelayLagging's
    60 s, and the attempt overdue (AgentLedgerStuckAttempts), while the relay and the reaper had
    nothing to do. The web host's clock behind would hide a relay that stopped."""
    EventFactory()
    TaskAttemptFactory(status=TaskAttempt.Status.RUNNING, timeout_seconds=60)  # its worker's clock is right
    real_now = timezone.now
    monkeypatch.setattr(timezone, "now", lambda: real_now() + dt.timedelta(minutes=2))
    samples = get_metrics(client)
    assert value(samples, "agentledger_relay_lag_events") >= 1
    assert value(samples, "agentledger_relay_lag_seconds") < 60
    assert value(samples, "agentledger_attempts_running") == 1
    assert value(samples, "agentledger_attempts_overdue") == 0
    assert value(samples, "agentledger_attempt_oldest_running_age_seconds") < 60


def test_a_stream_ahead_of_the_database_is_measured(client, db, settings, stream_name):
    """PostgreSQL restored from a backup older than the stream: the events it numbers below the
    stream's last id would never be published, and the lag read 0."""
    events = EventFactory.create_batch(2)
    stream = redis.Redis.from_url(settings.REDIS_URL)
    stream.xadd(stream_name, {"event_id": "from-before-the-restore"}, id=f"{events[-1].sequence + 40}-1")
    samples = get_metrics(client)
    assert value(samples, "agentledger_relay_lag_events") == 0
    assert value(samples, "agentledger_relay_stream_ahead_events") == 40


def test_consumer_lag_and_pending_per_group(client, db, settings, stream_name):
    stream = redis.Redis.from_url(settings.REDIS_URL)
    for n in range(1, 4):
        stream.xadd(stream_name, {"n": n}, id=f"{n}-1")
    stream.xgroup_create(stream_name, "training", id="0")
    stream.xreadgroup("training", "c1", {stream_name: ">"}, count=1)
    samples = get_metrics(client)
    assert value(samples, "agentledger_consumer_lag_entries", group="training") == 2
    assert value(samples, "agentledger_consumer_pending_entries", group="training") == 1
    assert value(samples, "agentledger_synapse_dead_letters") == 0


def test_dead_letters_are_counted(client, db, settings, stream_name):
    """The entries the consumer could not write are in the dead-letter stream, in Redis only:
    a gauge, and an alert when it grows, are how anyone learns of them."""
    stream = redis.Redis.from_url(settings.REDIS_URL)
    stream.xadd(f"{stream_name}:dead", {"reason": "not JSON", "original_id": "7-1"})
    stream.xadd(f"{stream_name}:dead", {"reason": "not JSON", "original_id": "9-1"})
    assert value(get_metrics(client), "agentledger_synapse_dead_letters") == 2
    assert value(get_metrics(client), "agentledger_synapse_dead_lettered_total") == 2


def test_dead_letters_are_counted_past_the_dead_letter_streams_cap(client, db, settings, stream_name):
    """The consumer caps the dead-letter stream at SYNAPSE_STREAM_MAXLEN (`MAXLEN ~`): at its
    cap its length no longer grows, and the alert, on the length's growth, stayed silent
    however many entries went on being dead-lettered. What was ever added is counted too."""
    settings.SYNAPSE_STREAM_MAXLEN = 1000
    stream = redis.Redis.from_url(settings.REDIS_URL)
    dead = f"{stream_name}:dead"

    def dead_letter(n: int) -> None:  # as the consumer's scripts add them
        for _ in range(n):
            stream.xadd(dead, {"reason": "not JSON", "original_id": "7-1"}, maxlen=1000, approximate=True)

    try:
        dead_letter(1000)
        before = value(get_metrics(client), "agentledger_synapse_dead_lettered_total")
        dead_letter(500)
        samples = get_metrics(client)
        assert value(samples, "agentledger_synapse_dead_lettered_total") - before == 500
        assert 1000 <= value(samples, "agentledger_synapse_dead_letters") < 1100
    finally:
        stream.delete(dead)


def test_export_rows_sum_successful_runs_by_data_type(client, db, stream_name):
    finished = timezone.now()
    ExportRunFactory(status="succeeded", rows=10, data_type="events", finished_at=finished)
    ExportRunFactory(
        status="succeeded",
        rows=5,
        data_type="events",
        window_start=finished - dt.timedelta(days=3),
        window_end=finished - dt.timedelta(days=2),
        finished_at=finished - dt.timedelta(days=1),
    )
    ExportRunFactory(status="failed", rows=100, data_type="tasks", finished_at=finished)
    samples = get_metrics(client)
    assert value(samples, "agentledger_export_rows", data_type="events") == 15
    assert ("agentledger_export_rows", frozenset({("data_type", "tasks")})) not in samples
    assert value(samples, "agentledger_export_last_success_timestamp_seconds", data_type="events") == pytest.approx(
        finished.timestamp()
    )


def test_attempts_running_past_their_limit_are_reported_as_overdue(client, db, settings, stream_name):
    now = timezone.now()
    five, one = now - dt.timedelta(minutes=5), now - dt.timedelta(minutes=1)
    TaskAttemptFactory(status=TaskAttempt.Status.RUNNING, timeout_seconds=1, started_at=five, created_at=five)
    TaskAttemptFactory(status=TaskAttempt.Status.RUNNING, timeout_seconds=3600, started_at=one, created_at=one)
    TaskAttemptFactory(succeeded=True, timeout_seconds=1, started_at=now - dt.timedelta(hours=1))
    samples = get_metrics(client)
    assert value(samples, "agentledger_attempts_running") == 2
    assert value(samples, "agentledger_attempts_overdue") == 1
    assert value(samples, "agentledger_attempt_oldest_running_age_seconds") >= 300


def test_a_retried_task_waiting_in_its_queue_counts_as_the_oldest_queued(client, db, stream_name):
    """A retry is queued again, runnable once its countdown ends (its queued_at): when no
    worker takes it, it is as stuck as a first try, and the TasksWaitTooLong alert must see it."""
    now = timezone.now()
    TaskExecutionFactory(status="retrying", queued_at=now - dt.timedelta(hours=1))
    TaskExecutionFactory(status="retrying", queued_at=now + dt.timedelta(minutes=5))  # still in its countdown
    TaskExecutionFactory(status="queued", queued_at=now - dt.timedelta(minutes=2))
    assert value(get_metrics(client), "agentledger_task_oldest_queued_age_seconds") >= 3600


def test_a_task_queued_by_a_host_whose_clock_runs_behind_is_not_reported_waiting_for_long(
    client, db, stream_name, monkeypatch
):
    """The web host that submitted it 10 minutes behind the database: the task, just queued, was
    reported waiting for 600 s (past AgentLedgerTasksWaitTooLong's threshold) because its
    queued_at was that host's time, the gauge's the database's."""
    agent = AgentFactory()
    real_now = timezone.now
    monkeypatch.setattr(timezone, "now", lambda: real_now() - dt.timedelta(minutes=10))
    workflow_submit(spec={"name": "behind", "tasks": [{"name": "a", "agent": agent.id}]})
    monkeypatch.setattr(timezone, "now", real_now)
    assert value(get_metrics(client), "agentledger_task_oldest_queued_age_seconds") < 60


def test_a_hung_broker_degrades_to_an_error_count_not_a_failed_scrape(
    client, db, settings, silent_port, stream_name, caplog
):
    settings.CELERY_BROKER_URL = f"redis://127.0.0.1:{silent_port}/0"
    settings.METRICS_COLLECTOR_TIMEOUT_MS = 300
    before = value(get_metrics(client), "agentledger_collector_errors_total", collector="queues")
    caplog.clear()
    started = time.monotonic()
    samples = get_metrics(client)
    # The collector's socket timeout ended the read (without it, a broker that never answers
    # holds the scrape forever). How long the scrape took is not asserted beyond "it returned":
    # on a shared, loaded machine it took 3.1 s once (0.5 s idle).
    assert "metrics collector queues failed: TimeoutError" in caplog.text
    assert time.monotonic() - started < 60
    assert value(samples, "agentledger_collector_up", collector="queues") == 0
    assert value(samples, "agentledger_collector_up", collector="workflows") == 1
    assert value(samples, "agentledger_collector_errors_total", collector="queues") == before + 1
    assert not any(name == "agentledger_queue_depth_messages" for name, _ in samples)


def test_a_database_that_stops_answering_fails_its_collectors_and_the_scrape_returns(
    client, database_relay, settings, monkeypatch, stream_name
):
    # PostgreSQL stopped (SIGSTOP, a storage stall) under the scrape's open connection: no
    # statement_timeout fires and its kernel answers the keepalives. The scrape still answers,
    # the database collectors down, the Redis ones up; it held a web thread for good before
    # (and every later scrape of the process one more, behind the collectors' lock).
    settings.METRICS_COLLECTOR_TIMEOUT_MS = 500
    monkeypatch.setitem(connection.settings_dict["OPTIONS"], "connect_timeout", 2)
    assert value(get_metrics(client), "agentledger_collector_up", collector="workflows") == 1
    database_relay.pause()
    watchdog = threading.Timer(30, database_relay.resume)  # a scrape that hung answers after it
    watchdog.start()
    try:
        started = time.monotonic()
        samples = get_metrics(client)
        elapsed = time.monotonic() - started
    finally:
        watchdog.cancel()
    for collector in ("workflows", "work", "relay", "exports"):
        assert value(samples, "agentledger_collector_up", collector=collector) == 0, collector
    for collector in ("queues", "consumer"):
        assert value(samples, "agentledger_collector_up", collector=collector) == 1, collector
    assert elapsed < 15


def test_slow_queries_are_cancelled_by_the_collector_timeout(db, settings):
    settings.METRICS_COLLECTOR_TIMEOUT_MS = 200

    def slow() -> list:
        with collectors._bounded_queries(), connection.cursor() as cursor:
            cursor.execute("SELECT pg_sleep(60)")
        return []

    started = time.monotonic()
    with pytest.raises(OperationalError):
        slow()
    assert time.monotonic() - started < 20  # cancelled after 0.2 s, not after the query's 60 s
    families = list(StateCollector({"slow": slow}).collect())
    up = next(f for f in families if f.name == "agentledger_collector_up")
    assert [(s.labels, s.value) for s in up.samples] == [({"collector": "slow"}, 0)]


def test_a_collector_whose_statements_each_answer_in_time_is_not_cut(transactional_db, settings):
    # A loaded PostgreSQL answers each statement under the timeout, a collector of several
    # (work_families sends five, and COMMIT) taking longer than the cut's 2 x timeout + 1 s in
    # all: the server answers, its connection is not cut, nor the scrape's other database
    # collectors reported down without trying. It was cut after 2 s here, the next one skipped.
    settings.METRICS_COLLECTOR_TIMEOUT_MS = 500

    def slow_but_answering() -> list:
        with collectors._bounded_queries(), connection.cursor() as cursor:
            for _ in range(6):
                cursor.execute("SELECT pg_sleep(0.4)")
        return []

    families = list(StateCollector({"slow": slow_but_answering, "workflows": collectors.workflow_families}).collect())
    up = next(f for f in families if f.name == "agentledger_collector_up")
    assert {s.labels["collector"]: s.value for s in up.samples} == {"slow": 1, "workflows": 1}


def test_a_request_method_a_client_invents_makes_no_series_of_its_own(client, db, stream_name):
    """The method is the client's to choose, signed in or not: each one invented would be a
    latency histogram of its own in every web process's file for good."""
    methods = [f"INVENTED{uuid.uuid4().hex[:8].upper()}" for _ in range(3)]
    before = get_metrics(client)
    for method in methods:
        client.generic(method, "/healthz")
    samples = get_metrics(client)
    labelled = {dict(labels).get("method") for _, labels in samples}
    assert not labelled & set(methods)
    name = "django_http_requests_latency_seconds_by_view_method_count"
    invalid = {"view": "healthz", "method": "<invalid method>"}
    assert value(samples, name, **invalid) - value(before, name, **invalid) == 3
