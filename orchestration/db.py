"""Database helpers shared by the services."""

from __future__ import annotations

from typing import Any


def atomic_with_retry(fn: Any, *, attempts: int = 3) -> Any:
    """Run fn() in a transaction, retrying when PostgreSQL aborts it as a deadlock victim or a
    serialization failure (both are safe to retry: nothing of the aborted try was kept)."""
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
            time.sleep(0.01 * attempt)
    raise AssertionError("unreachable")
