"""An index built CONCURRENTLY by a migration, for the big append-only tables (writes go on
while it builds). Not a migration itself: the loader skips modules whose name starts with "_".

A CREATE INDEX CONCURRENTLY that fails or is cancelled (a statement timeout, a killed migrate)
leaves an INVALID index of its name behind, which `IF NOT EXISTS` would then take for the
index: the planner never uses it, while every write still maintains it. Such a leftover is
dropped and built again. A column added in the same migration is added by `AddFieldOnce`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.db import migrations

Operation = Callable[[Any, Any], None]


class AddFieldOnce(migrations.AddField):
    """AddField, for a migration that also builds an index CONCURRENTLY (atomic = False): a run
    stopped during the build (killed while it waited for older transactions) has committed the
    column without recording the migration, and each run after failed on it ("column ... already
    exists"). The column found there is taken as added."""

    def database_forwards(self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any) -> None:
        model = to_state.apps.get_model(app_label, self.model_name)
        connection = schema_editor.connection
        with connection.cursor() as cursor:
            columns = {c.name for c in connection.introspection.get_table_description(cursor, model._meta.db_table)}
        if model._meta.get_field(self.name).column not in columns:
            super().database_forwards(app_label, schema_editor, from_state, to_state)


def _invalid(schema_editor: Any, name: str) -> bool:
    with schema_editor.connection.cursor() as cursor:
        cursor.execute("SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)", [name])
        row = cursor.fetchone()
    return bool(row and row[0])


def index_create(name: str, definition: str, *, unique: bool = False) -> Operation:
    """A RunPython function creating index `name` (`definition`: what follows `ON`, e.g.
    "events (entity_id, sequence)"), concurrently on PostgreSQL, replacing an invalid leftover;
    `unique` for a UNIQUE one (a partial UniqueConstraint is such an index)."""

    def run(apps: Any, schema_editor: Any) -> None:
        postgresql = schema_editor.connection.vendor == "postgresql"
        concurrently = "CONCURRENTLY" if postgresql else ""
        if postgresql and _invalid(schema_editor, name):
            schema_editor.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
        kind = "UNIQUE INDEX" if unique else "INDEX"
        schema_editor.execute(f"CREATE {kind} {concurrently} IF NOT EXISTS {name} ON {definition}")

    return run


def index_drop(name: str) -> Operation:
    def run(apps: Any, schema_editor: Any) -> None:
        concurrently = "CONCURRENTLY" if schema_editor.connection.vendor == "postgresql" else ""
        schema_editor.execute(f"DROP INDEX {concurrently} IF EXISTS {name}")

    return run
