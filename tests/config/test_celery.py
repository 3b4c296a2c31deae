"""config/celery.py's check of the database connection a worker process keeps between tasks
(CELERY_DB_REUSE_MAX, CONN_MAX_AGE), against the real PostgreSQL."""

from __future__ import annotations

import pytest
from django.db import connection

from config.celery import _drop_unusable_connections
from tests.engine import wait_for
from tests.pg import other_connection

pytestmark = pytest.mark.django_db(transaction=True)


def _backend_pid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def test_a_connection_the_server_closed_between_tasks_is_replaced_before_the_next_one(persistent_connection):
    """PostgreSQL restarted (pg_ctl restart, a crash) or the session terminated while the worker
    process waited for a task: the connection it kept was marked healthy without a look, and the
    next task's first statement failed on it ("terminating connection due to administrator
    command"), a run_task delivery sent again for nothing. It is dropped before the task, which
    runs on a new one."""
    pid = _backend_pid()
    with other_connection() as other:
        assert other.execute("SELECT pg_terminate_backend(%s)", [pid]).fetchone()[0]
        wait_for(
            lambda: not other.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone(),
            timeout=10,
            what="the terminated backend to exit",
        )
    _drop_unusable_connections()
    assert _backend_pid() != pid


def test_a_live_connection_is_kept_between_tasks_without_a_health_check(persistent_connection):
    """No SELECT 1 before each task (Django's per-request health check): the connection is kept
    and marked checked."""
    pid = _backend_pid()
    _drop_unusable_connections()
    assert connection.health_check_done
    assert _backend_pid() == pid
