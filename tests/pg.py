"""A second PostgreSQL session for tests: another process's view of the test database (to
kill a backend, alter a table, hold a transaction open)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import psycopg
from django.conf import settings
from django.db import connection


def other_connection() -> psycopg.Connection:
    s = connection.settings_dict
    return psycopg.connect(
        host=s["HOST"] or "127.0.0.1", port=s["PORT"] or 5432, user=s["USER"], dbname=s["NAME"], autocommit=True
    )


@contextlib.contextmanager
def database_migrated_to(app: str, migration: str) -> Iterator[tuple[str, dict[str, str]]]:
    """A database of its own (dropped after), migrated to `app`'s `migration` by manage.py:
    its URL for psycopg and the environment for manage.py commands on it."""
    from tests.engine import database_url, manage

    name = f"{connection.settings_dict['NAME']}_{app}_{migration}"
    url = f"{database_url().rsplit('/', 1)[0]}/{name}"
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings.test", "DATABASE_URL": url}
    env["REDIS_URL"] = settings.REDIS_URL
    with other_connection() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        manage("migrate", app, migration, "--no-input", env=env)
        yield url.replace("postgres://", "postgresql://"), env
    finally:
        with other_connection() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
