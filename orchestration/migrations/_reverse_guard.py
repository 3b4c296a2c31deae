"""A reverse that the rows written since a migration make impossible, refused by name before
anything changes. Not a migration itself: the loader skips modules whose name starts with "_".

A migration that lets a column take a new value (an event type, an attempt's cause, an export
run's status) is reversed by putting the old check back; with rows holding the new value, the
database then refuses with only "violates the new constraint". Those rows are records: events are
append-only and a finished attempt is immutable, so nothing can change them to let the reverse
through. `refuse_reverse_while` is the migration's last operation, so reversing it checks first
and raises IrreversibleError naming the table, the column, the values and how many rows hold them.
"""

from __future__ import annotations

from typing import Any

from django.db import migrations
from django.db.migrations.exceptions import IrreversibleError


def refuse_reverse_while(migration: str, *, table: str, column: str, values: list[str], why: str) -> Any:
    """A RunPython that does nothing forwards and, reversed, raises IrreversibleError while any
    row of `table` has `column` in `values` (the values `migration` allowed); `why`: what those
    rows are and why they stay."""

    def check(apps: Any, schema_editor: Any) -> None:
        placeholders = ", ".join(["%s"] * len(values))
        with schema_editor.connection.cursor() as cursor:
            cursor.execute(
                f"SELECT {column}, count(*) FROM {table} WHERE {column} IN ({placeholders}) GROUP BY 1 ORDER BY 1",
                values,
            )
            held = cursor.fetchall()
        if held:
            counts = ", ".join(f"{count} with {value!r}" for value, count in held)
            raise IrreversibleError(
                f"{migration} cannot be reversed on this database: {table} holds rows whose {column} "
                f"the schema before it refuses ({counts}); {why}. It is still applied."
            )

    return migrations.RunPython(migrations.RunPython.noop, check, elidable=False)
