"""Keep export_runs.updated_at true on every UPDATE (see orchestration 0002)."""

from django.db import migrations

from orchestration.sqlite_rules import sqlite_rules_install


def forwards(apps, schema_editor):
    vendor = schema_editor.connection.vendor
    if vendor == "postgresql":
        schema_editor.execute(
            "CREATE TRIGGER update_export_runs_updated_at BEFORE UPDATE ON export_runs "
            "FOR EACH ROW EXECUTE FUNCTION update_updated_at_column()"
        )
    elif vendor == "sqlite":
        sqlite_rules_install(schema_editor.connection)
    else:
        raise RuntimeError(f"no database rules for {vendor}; use PostgreSQL or SQLite")


def backwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute("DROP TRIGGER IF EXISTS update_export_runs_updated_at ON export_runs")
    else:
        schema_editor.execute("DROP TRIGGER IF EXISTS update_export_runs_updated_at")


class Migration(migrations.Migration):
    dependencies = [
        ("training_export", "0001_initial"),
        ("orchestration", "0002_database_rules"),
    ]

    operations = [migrations.RunPython(forwards, backwards)]
