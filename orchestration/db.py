"""Small database expressions used by the services, portable between PostgreSQL and SQLite."""

from __future__ import annotations

from typing import Any

from django.db.models import Func, JSONField, Value


class JSONMerge(Func):
    """`column || value` for JSON objects (PostgreSQL), json_patch on SQLite."""

    template = "(%(expressions)s)"
    arg_joiner = " || "
    output_field = JSONField()

    def __init__(self, column: str, value: dict[str, Any]) -> None:
        from django.db.models import F

        super().__init__(F(column), Value(value, output_field=JSONField()))

    def as_sqlite(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        return self.as_sql(compiler, connection, template="json_patch(%(expressions)s)", arg_joiner=", ", **extra)


class JSONAppend(Func):
    """Append one element to a JSON array column."""

    template = "(%(expressions)s)"
    arg_joiner = " || "
    output_field = JSONField()

    def __init__(self, column: str, element: Any) -> None:
        from django.db.models import F

        super().__init__(F(column), Value([element], output_field=JSONField()))

    def as_sqlite(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        # json_insert(col, '$[#]', json(element)): the element is the single item of the array value.
        return self.as_sql(
            compiler,
            connection,
            template="json_insert(%(expressions)s -> '$[0]')",
            arg_joiner=", '$[#]', ",
            **extra,
        )


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
