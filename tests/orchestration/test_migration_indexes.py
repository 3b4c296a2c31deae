"""Indexes the migrations build concurrently: an INVALID leftover of an interrupted build is
built again; a valid index is left as it is."""

from __future__ import annotations

import pytest
from django.db import connection

from orchestration.migrations._concurrent_index import index_create

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
