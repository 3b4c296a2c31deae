"""Database helpers shared by the services."""

from __future__ import annotations

import datetime as dt
from typing import Any

RETRY_BACKOFF_FIRST_SECONDS = 0.01
RETRY_BACKOFF_MAX_SECONDS = 0.5


def atomic_with_retry(fn: Any, *, attempts: int = 8) -> Any:
    """Run fn() in a transaction, retrying when PostgreSQL aborts it as a deadlock victim or a
    serialization failure (both are safe to retry: nothing of the aborted try was kept).

    The budget is generous, with jittered exponential backoff (under 2 s in all):
    an error that escapes a task's completion makes the worker treat it as a lost connection,
    so the attempt is recorded lost and the agent runs again, which costs far more than
    waiting for the other transaction."""
    import random
    import time

    from django.db import OperationalError, transaction

    for attempt in range(1, attempts + 1):
        try:
            with transaction.atomic():
                return fn()
        except OperationalError as exc:
            sqlstate = getattr(exc.__cause__, "sqlstate", None)
            if sqlstate not in ("40P01", "40001") or attempt == attempts:
                raise
            backoff = min(RETRY_BACKOFF_FIRST_SECONDS * 2 ** (attempt - 1), RETRY_BACKOFF_MAX_SECONDS)
            time.sleep(backoff * random.uniform(0.5, 1.5))  # noqa: S311 - jitter, not a secret
    raise AssertionError("unreachable")


def timestamptz_fast_loader(cursor: Any, connection: Any) -> None:
    """Parse timestamptz values read by `cursor` (a psycopg cursor of the Django connection
    `connection`) with psycopg's C loader instead of Django's Python subclass of the pure-Python
    one: 0.09 instead of 0.9 ms for a page of 51 rows with three timestamps each.

    Both give the same aware datetimes in UTC when Django's time zone and the session's are
    UTC (Django sets the session's, TIME_ZONE = "UTC"); in any other case nothing changes."""
    if connection.vendor != "postgresql" or connection.timezone != dt.UTC:
        return
    if connection.connection.info.parameter_status("TimeZone") != "UTC":
        return
    import psycopg

    oid = psycopg.adapters.types["timestamptz"].oid
    cursor.adapters.register_loader(oid, psycopg.adapters.get_loader(oid, psycopg.pq.Format.TEXT))
