"""An index built CONCURRENTLY by a migration, for the big append-only tables (writes go on
while it builds). Not a migration itself: the loader skips modules whose name starts with "_".

A CREATE INDEX CONCURRENTLY that fails or is cancelled (a statement timeout, a killed migrate)
leaves an INVALID index of its name behind, which `IF NOT EXISTS` would then take for the
index: the planner never uses it, while every write still maintains it. Such a leftover is
dropped and built again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Operation = Callable[[Any, Any], None]


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
