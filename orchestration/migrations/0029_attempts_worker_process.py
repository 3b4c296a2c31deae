"""task_attempts.worker_pid, worker_started_at, pool_pid: the process an attempt ran in, behind
its worker's node name (orchestration/workers.py). A worker killed and restarted under the
same name answers for it again; the reaper tells the two processes apart by these, and
records the attempt lost instead of hard-timed-out. Rows recorded before stay NULL: the
reaper keeps its earlier rule for them.

Nullable, without a default or a CHECK: on PostgreSQL adding them changes only the catalog (no
rewrite or scan of the table). A finished attempt keeps them as every other column: the
PostgreSQL rule compares whole rows (migration 0023); on SQLite, where the rule names its
columns, the trigger is installed again with them (and without them when reversed)."""

from typing import Any

from django.db import migrations, models

from orchestration.sqlite_rules import sqlite_rules_install


def sqlite_rule_drop(apps: Any, schema_editor: Any) -> None:
    """Reversing, before the columns go: SQLite refuses to drop a column a trigger names."""
    if schema_editor.connection.vendor == "sqlite":
        schema_editor.execute("DROP TRIGGER IF EXISTS task_attempts_finished_keep")


def sqlite_rule_install(apps: Any, schema_editor: Any) -> None:
    """The rule again, with the table's columns: forwards with the new ones, reversing (once
    they are dropped) without them."""
    if schema_editor.connection.vendor == "sqlite":
        sqlite_rule_drop(apps, schema_editor)
        sqlite_rules_install(schema_editor.connection)


class Migration(migrations.Migration):
    dependencies = [("orchestration", "0028_column_checks_as_domains")]

    operations = [
        migrations.RunPython(migrations.RunPython.noop, sqlite_rule_install, elidable=False),
        migrations.AddField(
            model_name="taskattempt",
            name="worker_pid",
            field=models.IntegerField(blank=True, help_text="pid of the worker's main process", null=True),
        ),
        migrations.AddField(
            model_name="taskattempt",
            name="worker_started_at",
            field=models.DateTimeField(blank=True, help_text="when the worker's main process started", null=True),
        ),
        migrations.AddField(
            model_name="taskattempt",
            name="pool_pid",
            field=models.IntegerField(blank=True, help_text="pid of the pool process that ran the attempt", null=True),
        ),
        migrations.RunPython(sqlite_rule_install, sqlite_rule_drop, elidable=False),
    ]
