"""Migration 0025: reversing it while api_key events exist is refused, and leaves the events
table as it was: on PostgreSQL, no NOT VALID constraint refusing new api_key events; on SQLite,
no half-built copy of the table that every later migrate trips over."""

from __future__ import annotations

import importlib
import os
import sqlite3
import subprocess
import sys

import pytest
from django.db import IntegrityError, connection

from orchestration.ids import new_id
from orchestration.models import Event
from tests.engine import ROOT

pytestmark = pytest.mark.django_db(transaction=True)

migration = importlib.import_module("orchestration.migrations.0025_events_api_key_types")


def api_key_event() -> Event:
    return Event.objects.create(
        event_id=new_id(), event_type="api_key_created", entity_type="api_key", entity_id="k", source="platform"
    )


def check_constraints() -> list[tuple[str, bool]]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT conname, convalidated FROM pg_constraint WHERE conrelid = 'events'::regclass "
            "AND contype = 'c' ORDER BY conname"
        )
        return cursor.fetchall()


def test_a_refused_reverse_leaves_the_constraints_as_they_were():
    before = check_constraints()
    api_key_event()
    backwards = migration._checks(migration.OLD_EVENT_TYPES, migration.OLD_ENTITY_TYPES)
    try:
        with pytest.raises(IntegrityError, match="events hold rows outside events_event_type_valid"):
            migration._swap(connection.schema_editor(), backwards)
        assert check_constraints() == before
        api_key_event()  # the code of this version still records its api_key events
    finally:
        with connection.cursor() as cursor:
            for name in backwards:
                cursor.execute(f"ALTER TABLE events DROP CONSTRAINT IF EXISTS {name}_new")


def test_on_sqlite_a_refused_reverse_leaves_the_table_as_it_was(tmp_path):
    path = tmp_path / "db.sqlite3"
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings.local", "DATABASE_URL": f"sqlite:///{path}"}

    def manage(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def schema() -> list[tuple[str, str]]:
        with sqlite3.connect(path) as db:
            return db.execute(
                "SELECT type, name FROM sqlite_master WHERE name LIKE '%events%' ORDER BY name"
            ).fetchall()

    assert manage("migrate", "-v0").returncode == 0
    insert = (
        "from orchestration.models import Event\n"
        "Event.objects.create(event_id='e1', event_type='api_key_created', entity_type='api_key', entity_id='k')\n"
    )
    assert manage("shell", stdin=insert).returncode == 0
    before = schema()
    refused = manage("migrate", "orchestration", "0024")
    assert refused.returncode != 0 and "CHECK constraint failed" in refused.stderr
    assert schema() == before  # no new__events left behind; the triggers are still there
