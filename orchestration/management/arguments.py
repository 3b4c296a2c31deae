"""Argument types and errors the management commands share."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import redis
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import DEFAULT_DB_ALIAS, DatabaseError, OperationalError, ProgrammingError, connections

from observability.logs import redact_public
from orchestration.db import database_unreachable


def seconds(*, zero: bool = False, maximum: float | None = None) -> Callable[[str], float]:
    """An argparse type for a duration in seconds: a finite number above 0 (or 0 itself with
    `zero`), at most `maximum`. NaN and infinity are refused: a deadline computed from either
    never passes, so the command would wait for ever."""
    if maximum is not None:
        # Not "between 0 and 60" for one that refuses 0 (`worker_health --timeout 0` was told so).
        wanted = (
            f"a number of seconds from 0 to {maximum:g}"
            if zero
            else f"a positive number of seconds, at most {maximum:g}"
        )
    else:
        wanted = "a number of seconds (0 or more)" if zero else "a positive number of seconds"

    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not (math.isfinite(number) and (number >= 0 if zero else number > 0)) or (
            maximum is not None and number > maximum
        ):
            raise argparse.ArgumentTypeError(f"{value!r} is not {wanted}")
        return number

    return parse


def text(value: str) -> str:
    """An argparse type for text the database is sent (an id, a name): an argument whose bytes
    are not UTF-8 reaches Python as unpaired surrogates (PEP 383), which no query can carry."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        try:
            shown = repr(value.encode("utf-8", "surrogateescape"))  # the bytes as given
        except UnicodeEncodeError:
            shown = ascii(value)
        raise argparse.ArgumentTypeError(f"{shown} is not UTF-8 text") from None
    if "\x00" in value:
        raise argparse.ArgumentTypeError(f"{value!r} contains a NUL character")
    return value


@contextmanager
def synapse_reachable() -> Iterator[None]:
    """Redis errors of the Synapse stream's client as a CommandError naming them; without
    REDIS_URL (the embedded SQLite mode) there is no stream to reach."""
    if not settings.REDIS_URL:
        raise CommandError("the Synapse stream needs Redis: set REDIS_URL")
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise CommandError(f"cannot reach the Synapse stream: {type(exc).__name__}: {exc}") from None


# What PostgreSQL and SQLite say when a statement names a table or column the schema lacks.
_UNDEFINED_SQLSTATES = ("42P01", "42703")  # undefined_table, undefined_column
_UNDEFINED_SQLITE = ("no such table", "no such column")


class DatabaseCommand(BaseCommand):
    """A command that uses the database: one it cannot reach, or whose schema lacks the
    migrations this code needs, is a one-line error naming which database and what to do
    (`CommandError`: exit status 1, no traceback unless `--traceback`), not a traceback from
    deep inside the ORM. Any other database error is raised as it was."""

    def execute(self, *args: object, **options: object) -> str | None:
        try:
            return super().execute(*args, **options)
        except (OperationalError, ProgrammingError) as exc:
            problem = database_problem(exc)
            if problem is None:
                raise
            raise CommandError(problem) from exc


def database_problem(exc: DatabaseError, alias: str = DEFAULT_DB_ALIAS) -> str | None:
    """What an operator needs to read for `exc`: the database unreachable, or not migrated;
    None for any other error."""
    connection = connections[alias]
    where = _database_named(connection.settings_dict)
    text = redact_public(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    if connection.connection is None:
        return f"cannot connect to the database {where}: {text}"
    if database_unreachable(exc):
        # Gone under a command that was using it (a restart, a failover): a supervisor starts
        # the command again, which connects once the database is back.
        return f"lost the connection to the database {where}: {text}"
    sqlstate = getattr(exc.__cause__, "sqlstate", None)
    if sqlstate not in _UNDEFINED_SQLSTATES and not str(exc).startswith(_UNDEFINED_SQLITE):
        return None
    try:
        from django.db.migrations.executor import MigrationExecutor

        executor = MigrationExecutor(connection)
        plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
    except DatabaseError:
        return None
    if not plan:
        return None
    first = plan[0][0]
    return (
        f"the database {where} is not migrated ({text}): {len(plan)} migration(s) not applied, "
        f"the first {first.app_label}.{first.name}; run `manage.py migrate`"
    )


def _database_named(settings_dict: dict) -> str:
    name = settings_dict.get("NAME") or "?"
    if settings_dict.get("ENGINE", "").endswith("sqlite3"):
        return f"{name} (SQLite)"
    host = settings_dict.get("HOST") or "the local socket"
    port = settings_dict.get("PORT")
    return f"{name} on {host}:{port}" if port else f"{name} on {host}"
