"""Celery-side wiring (connected in config/celery.py): the worker's metrics endpoint, the
task log context, submit-to-start timing and secret-free argument reprs.

Worker metrics use prometheus_client's multiprocess mode. The prefork pool processes each
write their samples to files under PROMETHEUS_MULTIPROC_DIR; the worker's main process
serves their sum on WORKER_METRICS_PORT (`/metrics`), and a pool process that exits is
marked dead so its live gauges stop counting (its counters keep adding up, as they should).
The counter and histogram files of processes that have exited (recycled by
--max-tasks-per-child, killed at a hard time limit or a cancellation) are merged into one
file per type at the next scrape, so the directory and the scrape's cost stay bounded by the
pool's size rather than growing with every process the worker ever ran. The web's /metrics
does the same for gunicorn's processes (replaced at every reload, crash or timeout).
"""

from __future__ import annotations

import fcntl
import glob
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

from django.conf import settings

from observability import influx, logs, metrics
from observability.attempts import queue_wait_seconds

logger = logging.getLogger(__name__)

RUN_TASK = "orchestration.run_task"
PUBLISHED_AT_HEADER = "agentledger_published_at"

_server: Any = None
_redactor = logs.RedactFilter()


def metrics_server_start() -> int | None:
    """Serve this worker's metrics (all its pool processes) on WORKER_METRICS_PORT.
    Returns the port, or None when disabled or impossible (logged, the worker runs on)."""
    global _server
    port = settings.WORKER_METRICS_PORT
    if not port or _server is not None:
        return None
    if not settings.PROMETHEUS_MULTIPROC_DIR:
        logger.error(
            "WORKER_METRICS_PORT is set but PROMETHEUS_MULTIPROC_DIR is not: the pool processes' metrics "
            "cannot be collected; worker metrics are not served"
        )
        return None
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(PoolMetricsCollector(settings.PROMETHEUS_MULTIPROC_DIR))
    try:
        _server, _thread = start_http_server(port, addr=settings.WORKER_METRICS_ADDR, registry=registry)
    except OSError as exc:
        logger.error("worker metrics not served: cannot listen on %s:%s (%s)", settings.WORKER_METRICS_ADDR, port, exc)
        return None
    logger.info("worker metrics on http://%s:%s/metrics", settings.WORKER_METRICS_ADDR, port)
    return port


# Types whose samples from several processes add up (gauges do not: each mode keeps its own).
SUMMED_TYPES = ("counter", "histogram", "summary")
ARCHIVE = "archive"  # <type>_archive.db: what the exited processes had written
MERGE_LOCK = ".merge.lock"  # not *.db: never read as samples


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dead_process_files_merge(path: str, *, alive: Callable[[int], bool] = process_alive) -> int:
    """Merge the counter, histogram and summary files of processes that no longer exist into
    `<type>_archive.db` (values of the same sample added up, as MultiProcessCollector adds them)
    and remove them; how many files were merged. Not safe against a concurrent read of the
    directory: the caller serializes it with the scrape."""
    from prometheus_client.mmap_dict import MmapedDict

    merged = 0
    for kind in SUMMED_TYPES:
        dead = []
        for name in glob.glob(os.path.join(path, f"{kind}_*.db")):
            pid = os.path.basename(name)[len(kind) + 1 : -len(".db")]
            if pid.isdigit() and not alive(int(pid)):
                dead.append(name)
        if not dead:
            continue
        archive = os.path.join(path, f"{kind}_{ARCHIVE}.db")
        totals: dict[str, float] = {}
        for name in [archive, *dead] if os.path.exists(archive) else dead:
            for key, number, _timestamp, _pos in MmapedDict.read_all_values_from_file(name):
                totals[key] = totals.get(key, 0.0) + number
        staging = f"{archive}.tmp"  # not *.db: never read as samples
        with suppress(FileNotFoundError):
            os.remove(staging)
        values = MmapedDict(staging)
        try:
            for key, number in totals.items():
                values.write_value(key, number, 0.0)
        finally:
            values.close()
        os.replace(staging, archive)
        for name in dead:
            os.remove(name)
        merged += len(dead)
    return merged


class PoolMetricsCollector:
    """The sum of what every process wrote under `path` (prometheus_client's
    MultiProcessCollector), after merging the files of processes that have exited. Each
    merge and read holds the directory's lock: the worker serves its scrapes in threads, and
    the web's gunicorn processes each serve them from one directory."""

    def __init__(self, path: str) -> None:
        from prometheus_client import multiprocess

        self.path = path
        self._collector = multiprocess.MultiProcessCollector(None, path=path)
        self._lock = threading.Lock()

    def collect(self) -> Iterable[Any]:
        with self._lock, directory_locked(self.path):
            with metrics.guarded("merge_dead_process_files"):
                dead_process_files_merge(self.path)
            return list(self._collector.collect())


@contextmanager
def directory_locked(path: str) -> Iterator[None]:
    """An exclusive lock on the metrics directory, across processes (flock on MERGE_LOCK)."""
    fd = os.open(os.path.join(path, MERGE_LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def metrics_server_stop() -> None:
    global _server
    if _server is not None:
        _server.shutdown()
        _server.server_close()
        _server = None


def pool_process_exit(pid: int) -> None:
    """A pool process is going away: flush its InfluxDB points, mark its metrics files dead."""
    influx.writer_close()
    if settings.PROMETHEUS_MULTIPROC_DIR:
        from prometheus_client import multiprocess

        with metrics.guarded("mark_process_dead"):
            multiprocess.mark_process_dead(pid)


def task_started(task: Any, args: Any, kwargs: Any) -> None:
    """task_prerun: the execution id into the log context; submit-to-start time for run_task."""
    logs.log_context_clear()
    if getattr(task, "name", None) != RUN_TASK:
        return
    execution_id = (kwargs or {}).get("execution_id") or (args[0] if args else None)
    with metrics.guarded("log_context"):
        logs.log_context_bind(execution_id=execution_id)
    with metrics.guarded("queue_wait"):
        request = task.request
        delivery = request.delivery_info or {}
        published_at = request.get(PUBLISHED_AT_HEADER)
        if delivery.get("redelivered") and _ran_since(execution_id, published_at):
            # Its wait was observed at the first delivery; since its publication stamp, the
            # message ran on a worker that was lost (and sat out the visibility timeout). A
            # message a worker held without starting it (a shutdown restores its prefetched
            # and countdown messages, redelivered too) is still waiting for its first start.
            return
        wait = queue_wait_seconds(published_at=published_at, eta=request.get("eta"), now=time.time())
        if wait is not None:
            metrics.queue_wait_observe(queue=delivery.get("routing_key") or "", seconds=wait)


def _ran_since(execution_id: Any, published_at: Any) -> bool:
    """Whether an attempt of the task started after its message's publication (True when the
    message carries no publication stamp)."""
    if not isinstance(published_at, int | float):
        return True
    import datetime as dt

    from orchestration.models import TaskAttempt

    since = dt.datetime.fromtimestamp(published_at, tz=dt.UTC)
    return TaskAttempt.objects.filter(execution_id=execution_id, started_at__gte=since).exists()


def task_ended() -> None:
    logs.log_context_clear()


def before_publish(headers: dict[str, Any] | None) -> None:
    """Stamp the publication time (for submit-to-start latency) and mask secrets in the
    argument reprs Celery logs when a worker receives the message."""
    if headers is None:
        return
    with metrics.guarded("publish_headers"):
        headers.setdefault(PUBLISHED_AT_HEADER, time.time())
        secrets = _redactor.secrets()
        for key in ("argsrepr", "kwargsrepr"):
            if isinstance(headers.get(key), str):
                headers[key] = logs.redact(headers[key], secrets)
