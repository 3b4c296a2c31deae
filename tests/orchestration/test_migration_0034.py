"""Migration 0034 (updated_at's database default) on a database in use: each table's ALTER is
its own transaction and waits at most 10 s for its table's lock. In one transaction, the
migration took agents, api_keys and task_attempts and held them while it waited for
task_executions, which an export was reading: every API request's key check waited with it."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from tests.engine import manage, manage_started, output_of, wait_for
from tests.pg import database_migrated_to

pytestmark = pytest.mark.django_db

DEFAULTS = """
SELECT c.relname FROM pg_attrdef d
JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum AND a.attname = 'updated_at'
JOIN pg_class c ON c.oid = d.adrelid ORDER BY 1
"""


@pytest.fixture
def database_at_0033() -> Iterator[tuple[str, dict[str, str]]]:
    with database_migrated_to("orchestration", "0033") as database:
        yield database


def test_the_migration_holds_no_other_table_while_it_waits_for_one_and_gives_up_after_its_lock_timeout(
    database_at_0033: tuple[str, dict[str, str]],
) -> None:
    url, env = database_at_0033
    with psycopg.connect(url) as export, psycopg.connect(url, autocommit=True) as test:
        # An export's snapshot: task_executions read, the transaction open.
        export.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        export.execute("SELECT count(*) FROM task_executions").fetchone()
        run = manage_started("migrate", "orchestration", "0034", "--no-input", env=env)
        try:
            wait_for(
                lambda: test.execute(
                    "SELECT 1 FROM pg_locks WHERE relation = 'task_executions'::regclass AND NOT granted"
                ).fetchone(),
                timeout=120,
                what="the migration to wait for task_executions",
            )
            with psycopg.connect(url, autocommit=True) as api:  # a key check, meanwhile
                api.execute("SET lock_timeout = '2s'")
                assert api.execute("SELECT count(*) FROM api_keys").fetchone() == (0,)
                assert api.execute("SELECT count(*) FROM agents").fetchone() == (0,)
            output = output_of(run, timeout=60)  # gives up after its 10 s
        finally:
            run.kill()
            export.rollback()
        assert run.returncode != 0, output
        assert "lock timeout" in output, output
        # Run again once the export is over: done, the tables before it not altered twice.
        manage("migrate", "orchestration", "0034", "--no-input", env=env)
        altered = [name for (name,) in test.execute(DEFAULTS).fetchall()]
        assert altered == ["agents", "api_keys", "task_attempts", "task_executions", "workflows"]


@pytest.fixture
def database_at_0034() -> Iterator[tuple[str, dict[str, str]]]:
    with database_migrated_to("orchestration", "0034") as database:
        yield database


def test_reversed_it_also_gives_up_after_its_lock_timeout_and_leaves_the_session_as_it_was(
    database_at_0034: tuple[str, dict[str, str]],
) -> None:
    """Reversed, the operations run in the opposite order: the reset came first and the 10 s
    last, so the defaults were dropped with no lock timeout (queued behind the export, every
    task transition queued behind them) and the migrations reversed after it in the same run
    kept the 10 s."""
    url, env = database_at_0034
    with psycopg.connect(url) as export:
        export.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        export.execute("SELECT count(*) FROM task_executions").fetchone()
        run = manage_started("migrate", "orchestration", "0033", "--no-input", env=env)
        try:
            output = output_of(run, timeout=60)  # gives up after its 10 s
        finally:
            export.rollback()
        assert run.returncode != 0, output
        assert "lock timeout" in output, output
    shell = "from django.db import connection, migrations\n" + "\n".join(
        [
            "import importlib",
            "m = importlib.import_module('orchestration.migrations.0034_updated_at_database_clock').Migration",
            "with connection.schema_editor(atomic=False) as editor:",
            "    for op in reversed(m.operations):",
            "        if isinstance(op, migrations.RunPython):",
            "            op.reverse_code(None, editor)",
            "print(connection.cursor().execute('SHOW lock_timeout').fetchone()[0])",
        ]
    )
    assert manage("shell", "-c", shell, env=env).stdout.strip().splitlines()[-1] == "0"
    manage("migrate", "orchestration", "0033", "--no-input", env=env)
    assert [name for (name,) in psycopg.connect(url).execute(DEFAULTS).fetchall()] == []
