"""The Celery application. Settings come from Django settings under the CELERY_ namespace."""

import os

from celery import Celery
from celery.signals import (
    before_task_publish,
    setup_logging,
    task_postrun,
    task_prerun,
    worker_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")

app = Celery("agentledger")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@task_prerun.connect
def _drop_unusable_connections(**kwargs: object) -> None:
    """Before each task, drop database connections that errored, were left in a transaction
    or outlived CONN_MAX_AGE, as Django does at the start of each request."""
    from django.db import close_old_connections, connections

    close_old_connections()
    # close_old_connections re-arms Django's per-request health check (a SELECT 1 round trip).
    # A worker does not pay it per task: a connection that breaks mid-task raises, is marked
    # errored and is checked (and dropped) here before the next one, and run_task retries. One
    # that the server closed while the process waited for a task (PostgreSQL restarted or
    # crashed, pg_terminate_backend) is dropped here too (`_closed_by_server`): the next task's
    # first statement failed on it, and its delivery with it.
    for connection in connections.all(initialized_only=True):
        if connection.connection is None:
            continue
        if _closed_by_server(connection):
            connection.close()
        else:
            connection.health_check_done = True


def _closed_by_server(connection: object) -> bool:
    """Whether the server has written to, or closed, the socket of a PostgreSQL connection
    that is idle between tasks, asked without a round trip: nothing is due on it then but a
    termination notice ("terminating connection due to administrator command") or the end of
    the stream. (The workers LISTEN for nothing; anything else there would only cost a new
    connection.)"""
    import select

    if connection.vendor != "postgresql":
        return False
    try:
        socket = connection.connection.pgconn.socket
    except Exception:  # psycopg's OperationalError: the connection is closed already
        return True
    poll = select.poll()  # not select.select, which refuses a descriptor above 1023
    poll.register(socket, select.POLLIN)
    return bool(poll.poll(0))


@setup_logging.connect
def _configure_logging(**kwargs: object) -> None:
    """Workers log through Django's LOGGING (JSON with LOG_FORMAT=json, secrets masked,
    task context on every record) instead of Celery's own handlers."""
    import logging.config

    from django.conf import settings

    logging.config.dictConfig(settings.LOGGING)


@before_task_publish.connect
def _stamp_message(headers: dict | None = None, **kwargs: object) -> None:
    from observability.worker import before_publish

    before_publish(headers)


@task_prerun.connect
def _task_context(task: object = None, args: object = None, kwargs: object = None, **extra: object) -> None:
    from observability.worker import task_started

    task_started(task, args, kwargs)


@task_postrun.connect
def _task_context_clear(**kwargs: object) -> None:
    from observability.worker import task_ended

    task_ended()


@worker_init.connect
def _worker_process_record(**kwargs: object) -> None:
    """Which process this worker is (pid, start time), recorded before its pool forks: attempts
    record it, and the reaper asks for it (orchestration/workers.py, which also registers that
    remote-control command)."""
    from orchestration.workers import worker_started

    worker_started()


@worker_init.connect
def _agent_runtime_preload(**kwargs: object) -> None:
    """Workers run agents: the HTTP client (about 0.1 s to import) and the tool registry with
    its JSON-schema validators are loaded here, in the main process before the pool forks, so
    that no child pays them inside its first attempt's time limit. Other processes (web,
    exporter, consumer) import them only where an agent is used."""
    import httpx  # noqa: F401

    from orchestration.runtime.tools import registry

    registry()


@worker_ready.connect
def _metrics_server_start(**kwargs: object) -> None:
    from observability.worker import metrics_server_start

    metrics_server_start()


@worker_shutdown.connect
def _metrics_server_stop(**kwargs: object) -> None:
    from observability.worker import metrics_server_stop

    metrics_server_stop()


@worker_process_shutdown.connect
def _pool_process_exit(pid: int | None = None, **kwargs: object) -> None:
    from observability.worker import pool_process_exit

    pool_process_exit(pid or os.getpid())
