"""A second PostgreSQL session for tests: another process's view of the test database (to
kill a backend, alter a table, hold a transaction open)."""

from __future__ import annotations

import psycopg
from django.db import connection


def other_connection() -> psycopg.Connection:
    s = connection.settings_dict
    return psycopg.connect(
        host=s["HOST"] or "127.0.0.1", port=s["PORT"] or 5432, user=s["USER"], dbname=s["NAME"], autocommit=True
    )
