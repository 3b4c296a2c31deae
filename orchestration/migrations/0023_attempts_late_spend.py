"""A finished attempt stays immutable, with one exception: an attempt closed without a result
(cancelled, lost, timed out) may have spend added to its usage columns, and only that. A
model's answer that was on its way when the attempt was closed is still charged by the
provider; the meter adds it to the attempt, its task and its workflow (execution._late_usage_add).
Every other column keeps its value and the usage only grows, checked by the database as before.

SQLite: the rules of orchestration/sqlite_rules.py, installed again (the earlier trigger is
replaced by task_attempts_finished_keep). Reversing restores the PostgreSQL function; on SQLite
the rules stay as sqlite_rules.py installs them after every migrate."""

from django.db import migrations

from orchestration.sqlite_rules import sqlite_rules_install

_RAISE = """
            RAISE EXCEPTION 'task attempt % of execution % is finished (%) and cannot change',
                OLD.attempt_number, OLD.execution_id, OLD.status
                USING ERRCODE = 'restrict_violation';"""

_KEEP = "ARRAY['input_tokens', 'output_tokens', 'tokens_used', 'cost_usd', 'updated_at']"

FORWARD = f"""
    CREATE OR REPLACE FUNCTION task_attempts_reject_finished_change() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF OLD.status <> 'running' THEN
            IF OLD.status IN ('cancelled', 'lost', 'timed_out')
               AND to_jsonb(NEW) - {_KEEP} = to_jsonb(OLD) - {_KEEP}
               AND NEW.input_tokens >= OLD.input_tokens AND NEW.output_tokens >= OLD.output_tokens
               AND NEW.tokens_used >= OLD.tokens_used AND NEW.cost_usd >= OLD.cost_usd THEN
                RETURN NEW;  -- spend charged after the attempt was closed without a result
            END IF;{_RAISE}
        END IF;
        RETURN NEW;
    END;
    $$
"""

BACKWARD = f"""
    CREATE OR REPLACE FUNCTION task_attempts_reject_finished_change() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF OLD.status <> 'running' THEN{_RAISE}
        END IF;
        RETURN NEW;
    END;
    $$
"""


def forwards(apps, schema_editor):
    if schema_editor.connection.vendor == "sqlite":
        sqlite_rules_install(schema_editor.connection)
    elif schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(FORWARD, params=None)


def backwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(BACKWARD, params=None)


class Migration(migrations.Migration):
    dependencies = [("orchestration", "0022_events_entity_index_valid")]

    operations = [migrations.RunPython(forwards, backwards, elidable=False)]
