"""orchestration/db.py: psycopg's C timestamptz loader in place of Django's Python one gives
the same datetimes, and only where it can (a UTC session); deadlock victims are retried."""

from __future__ import annotations

import datetime as dt
import time

import psycopg
import pytest
from django.db import IntegrityError, InterfaceError, OperationalError, connection

from orchestration.db import (
    RETRY_BACKOFF_FIRST_SECONDS,
    RETRY_BACKOFF_MAX_SECONDS,
    atomic_with_retry,
    database_unreachable,
    timestamptz_fast_loader,
)

OID = psycopg.adapters.types["timestamptz"].oid
VALUES = "SELECT '2024-02-29 23:59:59.999999+00'::timestamptz, '1970-01-01 00:00:00-05'::timestamptz, NULL::timestamptz"


def read(fast: bool) -> tuple:
    with connection.cursor() as cursor:
        if fast:
            timestamptz_fast_loader(cursor.cursor, connection)
        cursor.execute(VALUES)
        return cursor.fetchone(), cursor.cursor.adapters.get_loader(OID, psycopg.pq.Format.TEXT)


@pytest.mark.django_db
def test_the_fast_loader_reads_the_same_aware_datetimes_as_djangos():
    (django_values, django_loader), (fast_values, fast_loader) = read(False), read(True)
    assert fast_values == django_values
    assert [v.tzinfo for v in fast_values[:2]] == [dt.UTC, dt.UTC] == [v.tzinfo for v in django_values[:2]]
    assert fast_values[1] == dt.datetime(1970, 1, 1, 5, tzinfo=dt.UTC) and fast_values[2] is None
    assert fast_loader is not django_loader and fast_loader.__module__.startswith(("psycopg_binary", "psycopg_c"))


@pytest.mark.django_db
def test_a_session_in_another_time_zone_keeps_djangos_loader():
    with connection.cursor() as cursor:
        cursor.execute("SET TIME ZONE 'Europe/Paris'")
        try:
            timestamptz_fast_loader(cursor.cursor, connection)
            loader = cursor.cursor.adapters.get_loader(OID, psycopg.pq.Format.TEXT)
        finally:
            cursor.execute("SET TIME ZONE 'UTC'")
    assert loader.__module__.startswith("django")


def aborted(sqlstate_error: type[Exception]) -> OperationalError:
    error = OperationalError("aborted")
    error.__cause__ = sqlstate_error()
    return error


@pytest.mark.django_db
def test_a_deadlock_victim_is_retried_with_growing_jittered_pauses(monkeypatch):
    pauses: list[float] = []
    monkeypatch.setattr(time, "sleep", pauses.append)
    tries = []

    def deadlocked_six_times() -> str:
        tries.append(1)
        if len(tries) <= 6:
            raise aborted(psycopg.errors.DeadlockDetected)
        return "done"

    assert atomic_with_retry(deadlocked_six_times) == "done"
    assert len(pauses) == 6
    for number, pause in enumerate(pauses):
        nominal = min(RETRY_BACKOFF_FIRST_SECONDS * 2**number, RETRY_BACKOFF_MAX_SECONDS)
        assert 0.5 * nominal <= pause <= 1.5 * nominal


@pytest.mark.django_db
def test_retries_end_with_the_error_and_other_errors_are_not_retried(monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    tries = []

    def always(error_class: type[Exception]) -> None:
        tries.append(error_class)
        raise aborted(error_class)

    with pytest.raises(OperationalError):
        atomic_with_retry(lambda: always(psycopg.errors.SerializationFailure), attempts=4)
    assert len(tries) == 4
    tries.clear()
    with pytest.raises(OperationalError):
        atomic_with_retry(lambda: always(psycopg.errors.LockNotAvailable))
    assert len(tries) == 1


@pytest.fixture
def reshaped_table(transactional_db):
    """A table, and a function that changes the shape of its rows from another session, as a
    migration deployed while workers run does (ADD COLUMN, ALTER COLUMN TYPE)."""
    from tests.pg import other_connection

    other = other_connection()
    other.execute("CREATE TABLE probe_reshaped (id integer PRIMARY KEY, label varchar(10))")
    other.execute("INSERT INTO probe_reshaped VALUES (1, 'a')")
    try:
        yield lambda sql: other.execute(sql)
    finally:
        connection.close()
        other.execute("DROP TABLE probe_reshaped")
        other.close()


SELECT_RESHAPED = "SELECT * FROM probe_reshaped WHERE id = %s"


@pytest.mark.parametrize(
    "change",
    ["ALTER TABLE probe_reshaped ADD COLUMN extra integer", "ALTER TABLE probe_reshaped ALTER label TYPE text"],
)
def test_a_prepared_statement_whose_rows_a_migration_reshaped_runs_again_on_a_new_connection(reshaped_table, change):
    """PostgreSQL refuses a prepared statement whose result's shape changed ("cached plan must
    not change result type"), on every connection that prepared it: a worker's claim or
    completion failed once per connection, and a completion lost so ran its agent again. Now
    the statement runs again on a new connection (outside a transaction), and a transaction
    through atomic_with_retry again as a whole."""
    from orchestration.services.fastpath import execute_prepared

    assert execute_prepared(SELECT_RESHAPED, [1]) == [(1, "a")]
    pid = connection.connection.info.backend_pid
    reshaped_table(change)
    rows = execute_prepared(SELECT_RESHAPED, [1])
    assert rows[0][:2] == (1, "a")
    assert connection.connection.info.backend_pid != pid

    pid = connection.connection.info.backend_pid
    reshaped_table("ALTER TABLE probe_reshaped ADD COLUMN later integer")
    tries = []

    def transaction() -> list:
        tries.append(1)
        return execute_prepared(SELECT_RESHAPED, [1])

    assert atomic_with_retry(transaction)[0][:2] == (1, "a")
    assert len(tries) == 2 and connection.connection.info.backend_pid != pid


def test_inside_an_outer_transaction_the_reshaped_statement_fails_as_before(reshaped_table):
    """No retry where a caller's transaction is open: its work is gone with the connection."""
    from django.db import NotSupportedError, transaction

    from orchestration.services.fastpath import execute_prepared

    execute_prepared(SELECT_RESHAPED, [1])
    reshaped_table("ALTER TABLE probe_reshaped ADD COLUMN extra integer")
    with pytest.raises(NotSupportedError, match="cached plan must not change result type"), transaction.atomic():
        atomic_with_retry(lambda: execute_prepared(SELECT_RESHAPED, [1]))


def _closed_cursor_used() -> None:
    with connection.cursor() as cursor:
        pass
    cursor.execute("SELECT 1")


def _constraint_violated() -> None:
    with connection.cursor() as cursor:
        cursor.execute("CREATE TEMPORARY TABLE unique_x (x int PRIMARY KEY)")
        cursor.execute("INSERT INTO unique_x VALUES (1), (1)")


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("fault", "error"),
    [(_closed_cursor_used, InterfaceError), (_constraint_violated, IntegrityError)],
    ids=["closed-cursor", "constraint"],
)
def test_a_fault_of_the_code_or_of_the_statement_is_not_an_unreachable_database(fault, error):
    """The API answers an unreachable database with a 503 and a warning (try again shortly): a
    bug, as a cursor used once closed (psycopg's InterfaceError), stays a 500 and an error."""
    with pytest.raises(error) as info:
        fault()
    assert not database_unreachable(info.value), repr(info.value.__cause__)
