"""Scrape-time collectors for what is state rather than events: queue depth, workflows by
status, stuck work, relay lag, consumer lag, export rows.

Each collector runs under a short bound (Redis socket timeouts, a PostgreSQL statement
timeout of METRICS_COLLECTOR_TIMEOUT_MS, and a connection that stops answering altogether cut
on our side soon after) and its result is cached for
METRICS_STATE_CACHE_SECONDS, so frequent scrapes cost one query per period. A collector that
fails reports `agentledger_collector_up{collector} 0`, counts the failure in
`agentledger_collector_errors_total` and leaves its other metrics out of that scrape; the
scrape itself always succeeds.

These are served by the web process's /metrics only (one place, whatever the number of
workers); with several web replicas, aggregate them with max(), not sum().
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import redis
from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connection, connections, transaction
from django.db.models import Count, Max, Min, Sum
from kombu.transport.redis import PRIORITY_STEPS, Channel
from prometheus_client import Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from redis.backoff import NoBackoff
from redis.retry import Retry

logger = logging.getLogger(__name__)

COLLECTOR_ERRORS = Counter(
    "agentledger_collector_errors",
    "Scrape-time collectors that failed or timed out, by collector.",
    ["collector"],
)

Families = list[Metric]


def _timeout_seconds() -> float:
    return settings.METRICS_COLLECTOR_TIMEOUT_MS / 1000


def redis_client(url: str, *, timeout_seconds: float) -> redis.Redis:
    """A Redis client that fails within `timeout_seconds`: bounded sockets, no retries (also
    used by the readiness probe)."""
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_seconds,
        socket_connect_timeout=timeout_seconds,
        retry=Retry(NoBackoff(), 0),
    )


def _redis(url: str) -> redis.Redis:
    return redis_client(url, timeout_seconds=_timeout_seconds())


class DatabaseUnanswered(Exception):
    """PostgreSQL did not answer an earlier collector of the same scrape."""


_scrape = threading.local()  # per scraping thread: `database_unanswered` during one collect()


@contextmanager
def _bounded_queries() -> Iterator[None]:
    """A transaction whose statements PostgreSQL cancels past the collector timeout. A server
    that does not answer at all (stopped, its storage stalled) cancels nothing, and its kernel
    answers the keepalives: the connection is then cut on our side once a statement has waited
    twice the timeout and a second, and the scrape's later database collectors fail at once (a new connection
    would wait DATABASE_CONNECT_TIMEOUT each). Without that the scrape would hold its thread,
    and every later scrape of the process waiting on StateCollector's lock one thread more,
    until the web had none left (/healthz included)."""
    if getattr(_scrape, "database_unanswered", False):
        raise DatabaseUnanswered("PostgreSQL did not answer an earlier collector of this scrape")
    wrapper = connections[DEFAULT_DB_ALIAS]  # this thread's: the timer's thread has its own
    guard = threading.Lock()
    bound = 2 * _timeout_seconds() + 1
    # Counted from the statement last sent: a collector of several statements, each answered
    # in time by a loaded server, may take longer than the bound in all (it was cut, and the
    # scrape's other database collectors reported down, while the server answered).
    state: dict[str, Any] = {"done": False, "cut": False, "sent": time.monotonic(), "timer": None}

    def arm(delay: float) -> None:
        state["timer"] = threading.Timer(delay, cut)
        state["timer"].daemon = True
        state["timer"].start()

    def cut() -> None:
        with guard:
            raw = wrapper.connection
            if state["done"] or raw is None or raw.closed:
                return
            if (waited := time.monotonic() - state["sent"]) < bound:
                arm(bound - waited)  # a later statement: the server answered those before it
                return
            with suppress(Exception), socket.socket(fileno=os.dup(raw.pgconn.socket)) as sock:
                sock.shutdown(socket.SHUT_RDWR)  # the blocked read sees the connection closed
                state["cut"] = True

    def sent(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: dict[str, Any]) -> Any:
        state["sent"] = time.monotonic()
        return execute(sql, params, many, context)

    if wrapper.vendor == "postgresql":
        arm(bound)
    try:
        with wrapper.execute_wrapper(sent), transaction.atomic():
            if connection.vendor == "postgresql":
                with connection.cursor() as cursor:
                    cursor.execute("SET LOCAL statement_timeout = %s", [int(settings.METRICS_COLLECTOR_TIMEOUT_MS)])
            yield
    except Exception:
        # Cut, or no connection left (it could not be opened, or was dropped as broken); a
        # statement the server cancelled leaves it open: that server answers.
        if state["cut"] or wrapper.connection is None:
            _scrape.database_unanswered = True
        raise
    finally:
        with guard:
            state["done"] = True
        if state["timer"] is not None:
            state["timer"].cancel()


# --- the collectors ---------------------------------------------------------------------


def queue_families() -> Families:
    """Messages waiting per Celery queue (LLEN of the queue and of kombu's priority
    sub-queues `<queue>\\x06\\x16<step>`), and messages reserved by workers but not yet
    acknowledged (the transport's `unacked` hash)."""
    from orchestration.services.reaper import broker_redis_url

    url = broker_redis_url()
    if url is None:
        return []
    options = getattr(settings, "CELERY_BROKER_TRANSPORT_OPTIONS", {}) or {}
    steps = options.get("priority_steps", PRIORITY_STEPS)
    sep = options.get("sep", Channel.sep)
    unacked_key = options.get("unacked_key", Channel.unacked_key)
    queues = [queue.name for queue in settings.CELERY_TASK_QUEUES]
    client = _redis(url)
    try:
        pipe = client.pipeline(transaction=False)
        keys: list[tuple[str, str]] = []
        for queue in queues:
            for step in steps:
                keys.append((queue, f"{queue}{sep}{step}" if step else queue))
        for _, key in keys:
            pipe.llen(key)
        pipe.hlen(unacked_key)
        replies = pipe.execute()
    finally:
        client.close()
    depth = dict.fromkeys(queues, 0)
    for (queue, _), length in zip(keys, replies[:-1], strict=True):
        depth[queue] += int(length)
    waiting = GaugeMetricFamily(
        "agentledger_queue_depth_messages",
        "Messages waiting in each Celery queue (all priority steps).",
        labels=["queue"],
    )
    for queue, length in depth.items():
        waiting.add_metric([queue], length)
    unacked = GaugeMetricFamily(
        "agentledger_broker_unacked_messages", "Messages delivered to workers and not yet acknowledged."
    )
    unacked.add_metric([], int(replies[-1]))
    return [waiting, unacked]


def workflow_families() -> Families:
    """Workflows by status: one GROUP BY."""
    from orchestration.models import Workflow

    with _bounded_queries():
        counts = dict(Workflow.objects.order_by().values_list("status").annotate(n=Count("*")))
    family = GaugeMetricFamily("agentledger_workflows", "Workflows by status.", labels=["status"])
    for status in Workflow.Status.values:
        family.add_metric([status], counts.get(status, 0))
    return [family]


def work_families() -> Families:
    """What may be stuck: attempts running past their hard limit plus the reaper's grace, the
    oldest running attempt, and the oldest task waiting to start. Attempts are aged as the
    reaper ages them: on the database's clock, from their rows' created_at (the claim there),
    not on this host's clock against the started_at of the worker's."""
    from orchestration.db import database_now
    from orchestration.models import TaskAttempt, TaskExecution

    with _bounded_queries():
        now = database_now()
        running = TaskAttempt.objects.filter(status=TaskAttempt.Status.RUNNING)
        summary = running.aggregate(n=Count("*"), oldest=Min("created_at"))
        overdue = 0
        if summary["n"]:
            slack = settings.TASK_HARD_TIMEOUT_GRACE_SECONDS + settings.REAPER_GRACE_SECONDS
            for created_at, timeout in running.values_list("created_at", "timeout_seconds").iterator():
                limit = (timeout or settings.TASK_DEFAULT_TIMEOUT_SECONDS) + slack
                if (now - created_at).total_seconds() > limit:
                    overdue += 1
        # A retrying task waits in its queue too, from the end of its countdown (its queued_at).
        oldest_queued = TaskExecution.objects.filter(
            status__in=(TaskExecution.Status.QUEUED, TaskExecution.Status.RETRYING), queued_at__isnull=False
        ).aggregate(oldest=Min("queued_at"))["oldest"]
    running_gauge = GaugeMetricFamily("agentledger_attempts_running", "Attempts currently running.")
    running_gauge.add_metric([], summary["n"])
    overdue_gauge = GaugeMetricFamily(
        "agentledger_attempts_overdue",
        "Running attempts past their hard time limit plus REAPER_GRACE_SECONDS (the reaper should have closed them).",
    )
    overdue_gauge.add_metric([], overdue)
    oldest_running = GaugeMetricFamily(
        "agentledger_attempt_oldest_running_age_seconds", "Age of the oldest running attempt (0 when none)."
    )
    oldest_running.add_metric([], (now - summary["oldest"]).total_seconds() if summary["oldest"] else 0.0)
    oldest_waiting = GaugeMetricFamily(
        "agentledger_task_oldest_queued_age_seconds",
        "How long the oldest queued task has waited to start (0 when none).",
    )
    oldest_waiting.add_metric([], max((now - oldest_queued).total_seconds(), 0.0) if oldest_queued else 0.0)
    return [running_gauge, overdue_gauge, oldest_running, oldest_waiting]


def _stream_last_sequence(client: redis.Redis, stream: str) -> int:
    try:
        info = client.xinfo_stream(stream)
    except redis.ResponseError as exc:
        if "no such key" in str(exc).lower():
            return 0
        raise
    last = info["last-generated-id"]
    last = last.decode() if isinstance(last, bytes) else last
    return int(last.split("-")[0])


def relay_families() -> Families:
    """Events committed but not yet on the Synapse stream: the newest event's sequence minus
    the stream's last id (the relay's checkpoint is the stream itself: `<sequence>-1`), and
    the age of the oldest such event, on the database's clock (its created_at's)."""
    if not settings.REDIS_URL:
        return []
    from orchestration.db import database_now
    from orchestration.models import Event
    from orchestration.services.relay import stream_ahead_of

    client = _redis(settings.REDIS_URL)
    try:
        published = _stream_last_sequence(client, settings.SYNAPSE_STREAM)
    finally:
        client.close()
    with _bounded_queries():
        newest = Event.objects.aggregate(n=Max("sequence"))["n"]
        oldest_unpublished = (
            Event.objects.filter(sequence__gt=published)
            .order_by("sequence")
            .values_list("created_at", flat=True)
            .first()
        )
        now = database_now()
    lag = GaugeMetricFamily(
        "agentledger_relay_lag_events", "Events committed to PostgreSQL and not yet published to the Synapse stream."
    )
    lag.add_metric([], max((newest or 0) - published, 0))
    ahead = GaugeMetricFamily(
        "agentledger_relay_stream_ahead_events",
        "How far the Synapse stream's last id is above the newest event in PostgreSQL (0 normally): events "
        "numbered below it are never published (PostgreSQL restored from an older state, or another database's "
        "stream).",
    )
    ahead.add_metric([], stream_ahead_of(newest, published))
    age = GaugeMetricFamily(
        "agentledger_relay_lag_seconds",
        "Age of the oldest event not yet published to the Synapse stream (0 when none).",
    )
    age.add_metric([], max((now - oldest_unpublished).total_seconds(), 0.0) if oldest_unpublished else 0.0)
    return [lag, age, ahead]


def consumer_families() -> Families:
    """Per consumer group of the Synapse stream: entries not yet delivered (XINFO GROUPS
    `lag`) and delivered but not acknowledged (`pending`); and the entries the consumer could
    not write, in the dead-letter stream (they are in PostgreSQL, not in the training files):
    how many it holds, and how many were ever added to it (Redis 7's `entries-added`: the
    stream is capped at SYNAPSE_STREAM_MAXLEN, so at its cap its length no longer grows however
    many are added). One round trip."""
    from orchestration.services.relay import dead_letter_stream

    if not settings.REDIS_URL:
        return []
    client = _redis(settings.REDIS_URL)
    try:
        pipe = client.pipeline(transaction=False)
        pipe.xinfo_groups(settings.SYNAPSE_STREAM)
        pipe.xinfo_stream(dead_letter_stream(settings.SYNAPSE_STREAM))
        groups, dead_info = pipe.execute(raise_on_error=False)
    finally:
        client.close()
    groups = _unless_no_key(groups, [])
    dead_info = _unless_no_key(dead_info, {"length": 0, "entries-added": 0})
    lag = GaugeMetricFamily(
        "agentledger_consumer_lag_entries",
        "Synapse stream entries not yet delivered to the consumer group.",
        labels=["group"],
    )
    pending = GaugeMetricFamily(
        "agentledger_consumer_pending_entries",
        "Synapse stream entries delivered to the consumer group and not yet acknowledged.",
        labels=["group"],
    )
    for group in groups:
        name = group["name"].decode() if isinstance(group["name"], bytes) else str(group["name"])
        if group.get("lag") is not None:  # Redis answers nil when it cannot tell (after XDEL/trim)
            lag.add_metric([name], int(group["lag"]))
        pending.add_metric([name], int(group["pending"]))
    dead = GaugeMetricFamily(
        "agentledger_synapse_dead_letters",
        "Entries of the Synapse stream the consumer could not write to the training files, kept in "
        "the dead-letter stream (<stream>:dead).",
    )
    dead.add_metric([], int(dead_info["length"]))
    families: Families = [lag, pending, dead]
    if dead_info.get("entries-added") is not None:  # Redis 7 and later
        added = CounterMetricFamily(
            "agentledger_synapse_dead_lettered",
            "Entries ever added to the Synapse dead-letter stream (<stream>:dead), trimmed ones included; "
            "it starts again from 0 when that stream is deleted.",
        )
        added.add_metric([], int(dead_info["entries-added"]))
        families.append(added)
    return families


def _unless_no_key(reply: Any, default: Any) -> Any:
    """A pipeline's reply, or `default` for the error of a key that does not exist."""
    if isinstance(reply, redis.ResponseError):
        if "no such key" not in str(reply).lower():
            raise reply
        return default
    return reply


def export_families() -> Families:
    """Rows written by successful export runs, and the last success, per data type."""
    from training_export.models import ExportRun

    with _bounded_queries():
        rows = list(
            ExportRun.objects.filter(status=ExportRun.Status.SUCCEEDED)
            .order_by()
            .values("data_type")
            .annotate(rows=Sum("rows"), last=Max("finished_at"))
        )
    total = GaugeMetricFamily(
        "agentledger_export_rows", "Rows written by successful export runs, by data type.", labels=["data_type"]
    )
    last = GaugeMetricFamily(
        "agentledger_export_last_success_timestamp_seconds",
        "When the last successful export run of each data type finished (Unix time).",
        labels=["data_type"],
    )
    for row in rows:
        total.add_metric([row["data_type"]], int(row["rows"] or 0))
        if row["last"]:
            last.add_metric([row["data_type"]], row["last"].timestamp())
    return [total, last]


COLLECTORS: dict[str, Callable[[], Families]] = {
    "queues": queue_families,
    "workflows": workflow_families,
    "work": work_families,
    "relay": relay_families,
    "consumer": consumer_families,
    "exports": export_families,
}


class StateCollector(Collector):
    """Runs every collector (cached for METRICS_STATE_CACHE_SECONDS) and reports each one's health."""

    def __init__(self, collectors: dict[str, Callable[[], Families]] | None = None) -> None:
        self.collectors = collectors if collectors is not None else COLLECTORS
        self._cache: dict[str, tuple[float, Families]] = {}
        self._lock = threading.Lock()

    def _run(self, name: str, collect: Callable[[], Families]) -> Families | None:
        ttl = settings.METRICS_STATE_CACHE_SECONDS
        cached = self._cache.get(name)
        if cached is not None and time.monotonic() - cached[0] < ttl:
            return cached[1]
        try:
            families = collect()
        except Exception as exc:
            COLLECTOR_ERRORS.labels(collector=name).inc()
            logger.warning("metrics collector %s failed: %s: %s", name, type(exc).__name__, exc)
            self._cache.pop(name, None)
            return None
        self._cache[name] = (time.monotonic(), families)
        return families

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(
            "agentledger_collector_up", "1 if the scrape-time collector answered in time, else 0.", labels=["collector"]
        )
        with self._lock:
            _scrape.database_unanswered = False
            try:
                for name, collect in self.collectors.items():
                    families = self._run(name, collect)
                    up.add_metric([name], 0 if families is None else 1)
                    yield from families or []
            finally:
                _scrape.database_unanswered = False
        yield up


state_registry = CollectorRegistry(auto_describe=False)
state_collector = StateCollector()
state_registry.register(state_collector)
