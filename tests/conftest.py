"""Suite-wide fixtures. The suite runs against real PostgreSQL and Redis; if either is
unreachable the run fails at once with the address it tried (no silent skips)."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
import redis
from django.conf import settings
from django.db import connection
from django.db.backends.postgresql.operations import DatabaseOperations

from tests.fakes.relay import TcpRelay


def pytest_configure(config: pytest.Config) -> None:
    try:
        redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        raise pytest.UsageError(f"Redis is not reachable at REDIS_URL ({exc}); start it (see README)") from exc


_original_execute_sql_flush = DatabaseOperations.execute_sql_flush


def _execute_sql_flush_with_append_only_events(self: DatabaseOperations, sql_list: list[str]) -> None:
    """Transactional tests end with a TRUNCATE of every table, which the events table
    rightly refuses. For that flush only, and inside the flush's own transaction (ALTER
    TABLE is transactional in PostgreSQL, and holds an exclusive lock meanwhile, so no other
    session ever sees the trigger off), the append-only trigger is disabled and re-enabled.
    tests/orchestration/test_database_rules.py checks it is enabled after such a test."""
    if any('"events"' in statement for statement in sql_list):
        sql_list = [
            "ALTER TABLE events DISABLE TRIGGER events_append_only",
            *sql_list,
            "ALTER TABLE events ENABLE TRIGGER events_append_only",
        ]
    _original_execute_sql_flush(self, sql_list)


DatabaseOperations.execute_sql_flush = _execute_sql_flush_with_append_only_events


@pytest.fixture(autouse=True)
def _secret_values_of_this_test_only() -> Iterator[None]:
    """The secret values the redaction masks are cached per process (read again every minute,
    from the environment and the agents table) and so are the keys agents read (the log
    filter masks them): a test's (its environment variables, its agents) must not be the
    next one's, which pytest-django may run in another order."""
    yield
    redaction = sys.modules.get("training_export.services.redaction")
    if redaction is not None:
        redaction._secret_values = None
        redaction._secret_values_read_at = 0.0
        redaction._table_env_names = ()
    synapse = sys.modules.get("training_export.services.synapse")
    if synapse is not None:
        synapse._FORMATS_REFRESHED.clear()
    logs = sys.modules.get("observability.logs")
    if logs is not None and logs._registered:
        with logs._registered_lock:
            logs._registered.clear()
            logs._registered_version += 1


@pytest.fixture(autouse=True)
def _log_context_of_this_test_only() -> Iterator[None]:
    """A worker clears the log context (workflow, execution, attempt) before and after each
    task (task_prerun, task_postrun); a test that runs an attempt in-process has no such end,
    and its context was on the next test's log lines (a test of the lines' text then failed by
    the order the tests ran in)."""
    yield
    logs = sys.modules.get("observability.logs")
    if logs is not None:
        logs.log_context_clear()


@pytest.fixture
def persistent_connection(transactional_db: None) -> Iterator[None]:
    """The default connection as a server keeps it: reused between requests and tasks
    (CONN_MAX_AGE) with its health check (CONN_HEALTH_CHECKS); the test settings close it
    after each. Closed first, since a connection's lifetime is set when it is opened."""
    settings_dict = connection.settings_dict
    saved = settings_dict["CONN_MAX_AGE"], settings_dict["CONN_HEALTH_CHECKS"]
    settings_dict["CONN_MAX_AGE"], settings_dict["CONN_HEALTH_CHECKS"] = 600, True
    connection.close()
    try:
        yield
    finally:
        settings_dict["CONN_MAX_AGE"], settings_dict["CONN_HEALTH_CHECKS"] = saved
        connection.close()


@pytest.fixture
def database_relay(persistent_connection, monkeypatch) -> Iterator[TcpRelay]:
    """The default connection reaches PostgreSQL through a TcpRelay (reopened through it), as a
    web thread's persistent connection does; the relay is resumed and closed afterwards."""
    settings_dict = connection.settings_dict
    relay = TcpRelay((settings_dict["HOST"] or "127.0.0.1", int(settings_dict["PORT"] or 5432)))
    monkeypatch.setitem(settings_dict, "HOST", "127.0.0.1")
    monkeypatch.setitem(settings_dict, "PORT", str(relay.port))
    connection.close()
    try:
        yield relay
    finally:
        relay.resume()
        connection.close()
        relay.close()
