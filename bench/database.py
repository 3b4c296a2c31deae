"""The benchmarks' own databases: created on first use, migrated, agents loaded."""

from __future__ import annotations

import io

import psycopg
from django.conf import settings
from django.core.management import call_command


def database_ensure(*, load_agents: bool = True) -> None:
    """Create the configured database if it does not exist, migrate it and sync the agents."""
    db = settings.DATABASES["default"]
    admin_dsn = (
        f"host={db['HOST'] or '127.0.0.1'} port={db['PORT'] or 5432} user={db['USER'] or 'postgres'} dbname=postgres"
    )
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [db["NAME"]]).fetchone():
            conn.execute(f'CREATE DATABASE "{db["NAME"]}"')
    call_command("migrate", verbosity=0)
    if load_agents:
        call_command("load_agents", stdout=io.StringIO())
