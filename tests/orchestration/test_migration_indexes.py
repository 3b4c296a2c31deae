"""Indexes the migrations build concurrently: an INVALID leftover of an interrupted build is
built again; a valid index is left as it is."""

from __future__ import annotations

import psycopg
import pytest
from django.db import connection

from orchestration.migrations._concurrent_index import index_create
from tests.engine import manage, manage_started, wait_for
from tests.pg import database_migrated_to

NAME = "idx_events_entity_id_sequence"  # migration 0014's, checked again by 0022


def _state() -> tuple[int, bool]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexrelid::oid, indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)", [NAME])
        return cursor.fetchone()


def _create() -> None:
    with connection.schema_editor(atomic=False) as editor:
        index_create(NAME, "events (entity_id, sequence)")(None, editor)


@pytest.mark.django_db(transaction=True)
def test_an_invalid_leftover_is_built_again_and_a_valid_index_left_alone():
    oid, valid = _state()
    assert valid
    _create()
    assert _state() == (oid, True)  # nothing rebuilt
    with connection.cursor() as cursor:
        # What a cancelled CREATE INDEX CONCURRENTLY leaves (the test role is a superuser).
        cursor.execute("UPDATE pg_index SET indisvalid = false WHERE indexrelid = to_regclass(%s)", [NAME])
    assert _state() == (oid, False)
    _create()
    new_oid, valid = _state()
    assert valid and new_oid != oid


BUILDING = (
    "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
    "AND query LIKE 'CREATE UNIQUE INDEX CONCURRENTLY%%'"
)
APPLIED = "SELECT 1 FROM django_migrations WHERE name = '0042_messages_idempotency_key'"
VALID = "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass('messages_owner_idempotency_key_unique')"


@pytest.mark.django_db
def test_a_migrate_killed_while_0042_builds_its_index_can_be_run_again():
    """Migration 0042 adds a column, then builds its index concurrently (not atomic): the build
    waits for the transactions older than it, and a migrate killed meanwhile (a deploy's time
    limit) had committed the column without recording the migration. Every migrate after
    failed on it ("column ... already exists") until someone mended the database by hand."""
    with (
        database_migrated_to("orchestration", "0041_agents_definition_hash") as (url, env),
        psycopg.connect(url, autocommit=True) as holder,
        psycopg.connect(url, autocommit=True) as watcher,
    ):
        holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        holder.execute("SELECT count(*) FROM agents")  # a snapshot the build waits for
        migrate = manage_started("migrate", "orchestration", "0042", "--no-input", env=env)
        try:
            wait_for(lambda: watcher.execute(BUILDING).fetchone(), what="the index build, waiting")
        finally:
            migrate.kill()
            migrate.communicate()
        holder.execute("ROLLBACK")
        # The killed session's build ends as it may: the column is there, 0042 not recorded.
        wait_for(lambda: not watcher.execute(BUILDING).fetchone(), what="the killed build to end")
        assert watcher.execute(APPLIED).fetchone() is None

        manage("migrate", "orchestration", "--no-input", env=env)

        assert watcher.execute(APPLIED).fetchone() == (1,)
        assert watcher.execute(VALID).fetchone() == (True,)
