"""orchestration/db.py: psycopg's C timestamptz loader in place of Django's Python one gives
the same datetimes, and only where it can (a UTC session); deadlock victims are retried."""

from __future__ import annotations

import datetime as dt
import time

import psycopg
import pytest
from django.db import OperationalError, connection

from orchestration.db import (
    RETRY_BACKOFF_FIRST_SECONDS,
    RETRY_BACKOFF_MAX_SECONDS,
    atomic_with_retry,
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
