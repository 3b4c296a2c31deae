"""The InfluxDB writer: task attempt points, batched by influxdb-client's batching write API.

Active when INFLUXDB_URL (and its token, org, bucket) is set. A point is handed to the
client's background batcher and `write` returns at once; HTTP happens on the client's own
thread, with a bounded timeout and a bounded number of retries, each after a bounded wait
(an answer's Retry-After included). Points accepted but not yet
written are counted, and past INFLUXDB_MAX_BUFFERED_POINTS new points are dropped, so a slow
or dead InfluxDB costs a bounded amount of memory and never blocks or fails a task. Every
dropped point is counted in `agentledger_influxdb_points_dropped_total`, and logged: a failed
batch as it fails, a full buffer as it fills and as it takes points again (with how many it
dropped meanwhile).

A process that exits sends what it holds and waits for InfluxDB at most
INFLUXDB_EXIT_WAIT_MS, and not at all when InfluxDB's last answer to it was a failure: a pool
process that exits holds its worker's slot until it is gone.

Measurement `task_attempt` (one point per finished attempt):
  tags    agent_id, status (succeeded, failed, timed_out, lost, ...), cause (success, error,
          soft_timeout, hard_timeout, worker_lost, ...)
  fields  duration_ms (float), input_tokens, output_tokens, attempt (integers), cost_usd (float),
          execution_id, workflow_id (strings: unbounded ids stay out of the tag index)
  time    when the attempt finished (its row's finished_at), to the millisecond, written in
          nanoseconds with the attempt's id (modulo 10**6) added as nanoseconds: InfluxDB
          keeps one point per series and timestamp, and attempts of one agent closed together
          (a reaper pass, a cancelled workflow) end at the same instant. An attempt charged
          after it was closed has its point written again, same time and tags, with its new
          totals: InfluxDB keeps that one in place of the first.

Measurement `agent_rollup` (one point per agent and rolled-up period, written after the
hourly/daily rollup into agent_metrics):
  tags    agent_id, period (hour, day)
  fields  one float per metric of the rollup: tasks, success_rate, error_rate, retries,
          latency, latency_p95, tokens, input_tokens, output_tokens, cost, wasted_cost
  time    the start of the period (second precision)

One writer per process, created on first use (after a prefork worker forked its pool
processes) and flushed when the process ends (above: bounded by INFLUXDB_EXIT_WAIT_MS): a pool
process closes it as it exits (observability/worker.py), any other process (a gunicorn worker, a
management command) at interpreter exit (atexit), its threads being daemon ones (_DaemonExecutor).
"""

from __future__ import annotations

import atexit
import datetime as dt
import functools
import logging
import os
import queue
import threading
import weakref
from concurrent.futures import Future
from decimal import Decimal
from typing import Any

from django.conf import settings
from prometheus_client import Counter

logger = logging.getLogger(__name__)

POINTS_WRITTEN = Counter("agentledger_influxdb_points_written", "Points InfluxDB accepted.")
POINTS_DROPPED = Counter(
    "agentledger_influxdb_points_dropped",
    "Points never written to InfluxDB, by reason (buffer_full: too many unwritten points; "
    "write_failed: InfluxDB refused or was unreachable after the retries; process_exit: still unwritten when "
    "the process exited; error: the point could not be built).",
    ["reason"],
)

MEASUREMENT = "task_attempt"
ROLLUP_MEASUREMENT = "agent_rollup"


def _lines(data: Any) -> int:
    if isinstance(data, bytes | bytearray):
        return data.count(b"\n") + 1 if data else 0
    if isinstance(data, str):
        return data.count("\n") + 1 if data else 0
    return 1


class _DaemonExecutor:
    """What reactivex's ThreadPoolScheduler asks of its executor (submit, shutdown): what is
    submitted runs in order on one daemon thread. A ThreadPoolExecutor does not do for the
    writer: the interpreter that exits joins its threads, then refuses it any new work, before
    atexit functions run. A process that ended between two flushes (a management command, a
    gunicorn worker) waited for the batching window's timer, up to the flush interval, then
    dropped its points ("cannot schedule new futures after interpreter shutdown"); one whose
    write to a slow or unreachable InfluxDB was under way waited for its timeout and retries."""

    def __init__(self) -> None:
        self._work: queue.SimpleQueue[tuple[Future[Any], Any] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # As a ThreadPoolExecutor's, the thread ends once the executor is gone (a writer
        # closed and dropped): it holds the queue only, not the executor. Not at exit: the
        # writer's close, an atexit function too, still has work for it.
        weakref.finalize(self, self._work.put, None).atexit = False

    def submit(self, fn: Any) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, args=(self._work,), name="influxdb-writer", daemon=True
                )
                self._thread.start()
        self._work.put((future, fn))
        return future

    def shutdown(self, wait: bool = True, **kwargs: Any) -> None:
        self._work.put(None)
        if wait and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    @staticmethod
    def _run(work: queue.SimpleQueue[tuple[Future[Any], Any] | None]) -> None:
        while (item := work.get()) is not None:
            future, fn = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:
                    future.set_exception(exc)
            del item, future, fn  # what ran refers to the executor: not held while waiting


def _daemon_scheduler(max_workers: int | None = 1) -> Any:
    """A ThreadPoolScheduler of one worker whose thread does not hold the process's exit."""
    from reactivex.scheduler import ThreadPoolScheduler

    scheduler = ThreadPoolScheduler(max_workers=1)
    scheduler.executor = _DaemonExecutor()  # the ThreadPoolExecutor replaced has started no thread
    return scheduler


@functools.cache
def _bounded_write_options() -> type:
    """influxdb-client's WriteOptions, whose retries wait at most max_retry_delay each. The
    library's waits what an answer's Retry-After asks (InfluxDB's 429 and 503 carry one), however
    long: a `Retry-After: 30` held the writer's one thread 30 s with a 500 ms timeout and a 1 s
    longest delay, and the points written meanwhile, InfluxDB answering again, were dropped as
    the buffer filled; one of an hour held it an hour."""
    from influxdb_client import WriteOptions
    from influxdb_client.client.write.retry import WritesRetry

    class BoundedRetry(WritesRetry):
        def get_retry_after(self, response: Any) -> float | None:
            seconds = super().get_retry_after(response)
            return None if seconds is None else min(seconds, self.max_retry_delay)

    class BoundedWriteOptions(WriteOptions):
        def to_retry_strategy(self, **kwargs: Any) -> Any:
            # The library's, as BoundedRetry (whose `new`, for each retry, keeps its class).
            return BoundedRetry(
                total=self.max_retries,
                retry_interval=self.retry_interval / 1_000,
                jitter_interval=self.jitter_interval / 1_000,
                max_retry_delay=self.max_retry_delay / 1_000,
                max_retry_time=self.max_retry_time / 1_000,
                exponential_base=self.exponential_base,
                retry_callback=kwargs.get("retry_callback"),
                allowed_methods=["POST"],
            )

    return BoundedWriteOptions


_client_lock = threading.Lock()


class InfluxWriter:
    """A batching influxdb-client write API with a bound on points not yet written."""

    def __init__(
        self,
        *,
        url: str,
        token: str,
        org: str,
        bucket: str,
        batch_size: int,
        flush_interval_ms: int,
        max_buffered_points: int,
        timeout_ms: int,
        max_retries: int,
        exit_wait_ms: int,
    ) -> None:
        from influxdb_client import InfluxDBClient
        from influxdb_client.client import write_api

        self.org = org
        self.bucket = bucket
        self.max_buffered_points = max_buffered_points
        self._pending = 0
        # Points dropped since the buffer last filled (logged as it fills, and as it takes points again).
        self._dropped_full = 0
        # Whether InfluxDB's last answer (a try of a batch) was a failure: refused, unreachable,
        # timed out. close() then does not wait for it.
        self._failing = False
        self._lock = threading.Lock()
        self._client = InfluxDBClient(url=url, token=token, org=org, timeout=timeout_ms, enable_gzip=False)
        options = _bounded_write_options()(
            batch_size=batch_size,
            flush_interval=flush_interval_ms,
            jitter_interval=0,
            retry_interval=min(1000, timeout_ms),
            max_retries=max_retries,
            max_retry_delay=max(timeout_ms, 1000),
            max_retry_time=max(timeout_ms, 1000) * (max_retries + 1),
            exponential_base=2,
            # At process exit one more try, waited for this long at most (see close()), then what
            # is left is dropped.
            max_close_wait=exit_wait_ms,
            # A scheduler of our own: the library's default is one object created at import
            # and shared by every writer, including across fork.
            write_scheduler=_daemon_scheduler(),
        )
        self._options = options
        # The client makes its batching window's scheduler itself, a ThreadPoolScheduler(1) that
        # starts its first timer here: it gets a daemon one too.
        with _client_lock:
            library_scheduler = write_api.ThreadPoolScheduler
            write_api.ThreadPoolScheduler = _daemon_scheduler
            try:
                self._write_api = self._client.write_api(
                    write_options=options,
                    success_callback=self._on_success,
                    error_callback=self._on_error,
                    retry_callback=self._on_retry,
                )
            finally:
                write_api.ThreadPoolScheduler = library_scheduler

    @property
    def pending(self) -> int:
        return self._pending

    def write(self, point: Any) -> bool:
        """Hand one point to the batcher; False (counted, and logged as the buffer fills and
        again as it takes points again) if the buffer is full."""
        with self._lock:
            full = self._pending >= self.max_buffered_points
            if full:
                self._dropped_full += 1
                dropped = self._dropped_full
            else:
                dropped, self._dropped_full = self._dropped_full, 0
                self._pending += 1
        if full:
            POINTS_DROPPED.labels(reason="buffer_full").inc()
            if dropped == 1:
                logger.warning(
                    "InfluxDB writer holds %d points not yet written (INFLUXDB_MAX_BUFFERED_POINTS): "
                    "new points are dropped until InfluxDB takes some",
                    self.max_buffered_points,
                )
            return False
        if dropped:
            logger.warning("InfluxDB writer takes points again; %d were dropped while it was full", dropped)
        try:
            self._write_api.write(bucket=self.bucket, org=self.org, record=point)
        except Exception:
            with self._lock:
                self._pending -= 1
            POINTS_DROPPED.labels(reason="error").inc()
            logger.warning("InfluxDB point not queued", exc_info=True)
            return False
        return True

    def _settle(self, count: int) -> int:
        """Take `count` points off the pending ones; how many were still pending (none once
        close() has counted what it left unwritten)."""
        with self._lock:
            settled = min(count, self._pending)
            self._pending -= settled
        return settled

    def _on_success(self, conf: Any, data: Any) -> None:
        self._failing = False
        POINTS_WRITTEN.inc(self._settle(_lines(data)))

    def _on_retry(self, conf: Any, data: Any, exception: Exception) -> None:
        self._failing = True

    def _on_error(self, conf: Any, data: Any, exception: Exception) -> None:
        self._failing = True
        count = _lines(data)
        POINTS_DROPPED.labels(reason="write_failed").inc(self._settle(count))
        logger.warning("InfluxDB write of %d points failed: %s", count, exception)

    def close(self) -> None:
        """Send what is buffered and release the client, waiting for the writes at most
        exit_wait_ms, and not at all when InfluxDB's last answer was a failure: a pool
        process that exits holds its worker's slot until this returns, and a write to a
        failing InfluxDB would most likely wait its whole timeout to fail again. Points still
        unwritten then are lost with the process: counted as dropped here, as no callback
        will count them (one that comes later finds them settled)."""
        if self._failing:
            # influxdb-client reads it when closing; it still polls once (0.1 s) before giving up.
            self._options.max_close_wait = 0
        try:
            self._write_api.close()
        finally:
            self._client.close()
            unwritten = self._settle(self.max_buffered_points)
            if unwritten:
                POINTS_DROPPED.labels(reason="process_exit").inc(unwritten)
                logger.warning("InfluxDB writer closed with %d points unwritten: dropped", unwritten)


_writer: InfluxWriter | None = None
_writer_pid: int | None = None
_writer_lock = threading.Lock()


def enabled() -> bool:
    return bool(getattr(settings, "INFLUXDB_URL", None))


def writer() -> InfluxWriter | None:
    """This process's writer (None when InfluxDB is not configured)."""
    global _writer, _writer_pid
    if not enabled():
        return None
    pid = os.getpid()
    if _writer is not None and _writer_pid == pid:
        return _writer
    with _writer_lock:
        if _writer is None or _writer_pid != pid:
            # A writer inherited through fork has no live threads: start a fresh one.
            _writer = InfluxWriter(
                url=settings.INFLUXDB_URL,
                token=settings.INFLUXDB_TOKEN,
                org=settings.INFLUXDB_ORG,
                bucket=settings.INFLUXDB_BUCKET,
                batch_size=settings.INFLUXDB_BATCH_SIZE,
                flush_interval_ms=settings.INFLUXDB_FLUSH_INTERVAL_MS,
                max_buffered_points=settings.INFLUXDB_MAX_BUFFERED_POINTS,
                timeout_ms=settings.INFLUXDB_TIMEOUT_MS,
                max_retries=settings.INFLUXDB_MAX_RETRIES,
                exit_wait_ms=settings.INFLUXDB_EXIT_WAIT_MS,
            )
            _writer_pid = pid
    return _writer


def writer_close() -> None:
    """Flush and close this process's writer, if it has one."""
    global _writer, _writer_pid
    with _writer_lock:
        current, _writer = _writer, None
        owned = _writer_pid == os.getpid()
        _writer_pid = None
    if current is not None and owned:
        try:
            current.close()
        except Exception:
            logger.warning("closing the InfluxDB writer failed", exc_info=True)


atexit.register(writer_close)


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def attempt_point_time(at: dt.datetime, attempt_id: int) -> int:
    """The point's time in nanoseconds: `at` to the millisecond, plus the attempt's id modulo
    10**6 as nanoseconds, so that attempts ending at the same instant stay distinct points
    (and a batch written again overwrites its own points, not another attempt's)."""
    milliseconds = (at - _EPOCH) // dt.timedelta(milliseconds=1)
    return milliseconds * 1_000_000 + attempt_id % 1_000_000


def attempt_point(
    *,
    agent_id: str,
    status: str,
    cause: str,
    attempt_id: int,
    execution_id: str,
    workflow_id: str | None,
    attempt_number: int,
    duration_ms: float,
    input_tokens: int = 0,
    output_tokens: int = 0,
    cost_usd: Decimal | float = 0,
    at: dt.datetime,
) -> Any:
    """The `task_attempt` point of one finished attempt."""
    from influxdb_client import Point, WritePrecision

    return (
        Point(MEASUREMENT)
        .tag("agent_id", agent_id)
        .tag("status", status)
        .tag("cause", cause)
        .field("duration_ms", float(duration_ms))
        .field("input_tokens", int(input_tokens))
        .field("output_tokens", int(output_tokens))
        .field("cost_usd", float(cost_usd))
        .field("attempt", int(attempt_number))
        .field("execution_id", execution_id)
        .field("workflow_id", workflow_id or "")
        .time(attempt_point_time(at, attempt_id), WritePrecision.NS)
    )


def attempt_point_write(**fields: Any) -> bool:
    """Queue the point of a finished attempt, when InfluxDB is configured. Never raises."""
    if not enabled():
        return False
    try:
        current = writer()
        point = attempt_point(**fields)
    except Exception:
        POINTS_DROPPED.labels(reason="error").inc()
        logger.warning("InfluxDB point not built", exc_info=True)
        return False
    return current.write(point) if current is not None else False


def rollup_points(*, period: str, period_start: dt.datetime) -> list[Any]:
    """The `agent_rollup` points of one rolled-up period, read from agent_metrics."""
    from influxdb_client import Point, WritePrecision

    from orchestration.models import AgentMetric

    by_agent: dict[str, dict[str, float]] = {}
    rows = AgentMetric.objects.filter(period=period, period_start=period_start).values_list(
        "agent_id", "metric_type", "metric_value"
    )
    for agent_id, metric_type, metric_value in rows:
        by_agent.setdefault(agent_id, {})[metric_type] = float(metric_value)
    points = []
    for agent_id, values in sorted(by_agent.items()):
        point = Point(ROLLUP_MEASUREMENT).tag("agent_id", agent_id).tag("period", period)
        for name, number in sorted(values.items()):
            point = point.field(name, number)
        points.append(point.time(period_start, WritePrecision.S))
    return points


def rollup_points_write(*, period: str, period_start: dt.datetime) -> int:
    """Queue the rollup points of a period, when InfluxDB is configured; how many were
    accepted. Never raises."""
    if not enabled():
        return 0
    try:
        current = writer()
        points = rollup_points(period=period, period_start=period_start)
    except Exception:
        POINTS_DROPPED.labels(reason="error").inc()
        logger.warning("InfluxDB rollup points not built", exc_info=True)
        return 0
    return sum(1 for point in points if current is not None and current.write(point))
